"""Position schemes: host-side precomputation only.

Each scheme object turns its parameters into a `ResolvedPosition`: a kind tag plus the few small
vectors and scalars the kernels read (ALiBi slopes, RoPE inv_freq + attention factor). Kernels never see
an Nq x Nk bias or a rotated copy of q/k; the math they apply is in ../shared/POSITIONS.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

NONE, ALIBI_KIND, ROPE_KIND = "none", "alibi", "rope"


@dataclass(frozen=True)
class ResolvedPosition:
    """What a backend receives for one call.

    kind: "none" | "alibi" | "rope".
    slopes: (B, Hq) fp32 ALiBi slopes on the tensors' device (a stride-0 expand when shared by batch).
    inv_freq: (rotary_dim // 2,) fp32 RoPE inverse frequencies on the tensors' device.
    rotary_dim: number of leading head dims that rotate (even, <= D); 0 unless kind == "rope".
    interleaved: RoPE pairs (2i, 2i+1) instead of rotate-half (i, i + rotary_dim/2).
    attention_factor: multiplies RoPE cos and sin (so logits scale by its square).
    """

    kind: str
    slopes: Optional[torch.Tensor] = None
    inv_freq: Optional[torch.Tensor] = None
    rotary_dim: int = 0
    interleaved: bool = False
    attention_factor: float = 1.0


class PositionScheme:
    """Base class: `resolve` maps call shapes to the kernel parameters."""

    def resolve(self, batch: int, num_heads: int, head_dim: int, seq_len: int,
                device: torch.device) -> ResolvedPosition:
        raise NotImplementedError


class NoPosition(PositionScheme):
    """Plain attention (pos="none")."""

    def resolve(self, batch, num_heads, head_dim, seq_len, device) -> ResolvedPosition:
        return ResolvedPosition(NONE)

    def __repr__(self) -> str:
        return "NoPosition()"


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Default ALiBi slopes, shape (num_heads,), fp32 (POSITIONS.md; equals BLOOM's build_alibi_tensor).

    n a power of two: m_h = 2^(-8h/n), h = 1..n. Otherwise c = 2^floor(log2 n) and the slopes are those of
    c heads followed by every other slope of 2c heads, n - c of them.
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(PositionScheme):
    """ALiBi: bias_ij = -m_h * |pq(i) - pk(j)|, added after the softmax scale.

    Args:
        slopes: None for the paper's default slopes, or a tensor of shape (Hq,) or (B, Hq); any float
            dtype, converted to fp32. Slopes are constants (no gradient).
    """

    def __init__(self, slopes: Optional[torch.Tensor] = None):
        if slopes is not None:
            if not isinstance(slopes, torch.Tensor):
                raise TypeError(f"ALiBi slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
            if slopes.dim() not in (1, 2):
                raise ValueError(f"ALiBi slopes must have shape (Hq,) or (B, Hq), got {tuple(slopes.shape)}")
            if not slopes.is_floating_point():
                raise TypeError(f"ALiBi slopes must be a floating-point tensor, got {slopes.dtype}")
            if not torch.isfinite(slopes).all():
                raise ValueError("ALiBi slopes must be finite (found NaN or inf)")
        self.slopes = slopes

    def resolve(self, batch, num_heads, head_dim, seq_len, device) -> ResolvedPosition:
        slopes = alibi_slopes(num_heads) if self.slopes is None else self.slopes.detach()
        slopes = slopes.to(device=device, dtype=torch.float32)
        if slopes.dim() == 1:
            if slopes.shape[0] != num_heads:
                raise ValueError(f"ALiBi slopes must have shape (Hq,)=({num_heads},) or (B, Hq)=({batch}, "
                                 f"{num_heads}), got {tuple(slopes.shape)}")
            slopes = slopes.unsqueeze(0).expand(batch, num_heads)
        elif tuple(slopes.shape) != (batch, num_heads):
            raise ValueError(f"ALiBi slopes must have shape (Hq,)=({num_heads},) or (B, Hq)=({batch}, "
                             f"{num_heads}), got {tuple(slopes.shape)}")
        return ResolvedPosition(ALIBI_KIND, slopes=slopes)

    def __repr__(self) -> str:
        return f"ALiBi(slopes={'default' if self.slopes is None else tuple(self.slopes.shape)})"


class RoPE(PositionScheme):
    """Rotary position embedding applied in-kernel to q at pq(i) and k at pk(j); v is never rotated.

    Args:
        theta: base of the default frequencies inv_freq_i = theta^(-2i/r).
        rotary_dim: r, the number of leading head dims that rotate (even, <= D); None means D.
        interleaved: pairs (2i, 2i+1) (GPT-J/RoFormer) instead of rotate-half (i, i + r/2) (NeoX/Llama).
        inv_freq: optional explicit (r/2,) frequency vector; it replaces the theta frequencies. Every
            context-extension scaling is such a vector plus an attention factor.
        attention_factor: multiplies cos and sin (YaRN's mscale); logits scale by its square.
    """

    def __init__(self, theta: float = 10000.0, rotary_dim: Optional[int] = None, interleaved: bool = False,
                 inv_freq: Optional[torch.Tensor] = None, attention_factor: float = 1.0):
        if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1.0:
            raise ValueError(f"RoPE theta must be a finite number > 1, got {theta!r}")
        if rotary_dim is not None and (not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool)
                                       or rotary_dim <= 0 or rotary_dim % 2):
            raise ValueError(f"RoPE rotary_dim must be a positive even int or None, got {rotary_dim!r}")
        if not isinstance(attention_factor, (int, float)) or not math.isfinite(attention_factor) \
                or attention_factor <= 0:
            raise ValueError(f"RoPE attention_factor must be a finite number > 0, got {attention_factor!r}")
        if inv_freq is not None:
            if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or not inv_freq.is_floating_point() \
                    or inv_freq.shape[0] == 0:
                raise ValueError("RoPE inv_freq must be a 1-D floating-point tensor of length rotary_dim // 2")
            if rotary_dim is not None and inv_freq.shape[0] != rotary_dim // 2:
                raise ValueError(f"RoPE inv_freq must have length rotary_dim // 2 = {rotary_dim // 2}, "
                                 f"got {inv_freq.shape[0]}")
            if not torch.isfinite(inv_freq).all():
                raise ValueError("RoPE inv_freq must be finite (found NaN or inf)")
        self.theta = float(theta)
        self.rotary_dim = rotary_dim
        self.interleaved = bool(interleaved)
        self.inv_freq = inv_freq
        self.attention_factor = float(attention_factor)

    def frequencies(self, rotary_dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
        """(inv_freq (rotary_dim/2,) fp32 on CPU, attention factor) for a call of length seq_len."""
        if self.inv_freq is not None:
            return self.inv_freq.detach().to(torch.float32), self.attention_factor
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
        return (self.theta ** -exponents).to(torch.float32), self.attention_factor

    def resolve(self, batch, num_heads, head_dim, seq_len, device) -> ResolvedPosition:
        if self.inv_freq is not None and self.rotary_dim is None:
            rotary_dim = 2 * self.inv_freq.shape[0]
        else:
            rotary_dim = head_dim if self.rotary_dim is None else self.rotary_dim
        if rotary_dim > head_dim:
            given = "rotary_dim" if self.rotary_dim is not None else "2 * len(inv_freq)"
            raise ValueError(f"RoPE rotary_dim must be <= head dim D={head_dim}, got {given} = {rotary_dim}")
        inv_freq, factor = self.frequencies(rotary_dim, seq_len)
        return ResolvedPosition(ROPE_KIND, inv_freq=inv_freq.to(device).contiguous(), rotary_dim=rotary_dim,
                                interleaved=self.interleaved, attention_factor=factor)

    def __repr__(self) -> str:
        return (f"RoPE(theta={self.theta}, rotary_dim={self.rotary_dim}, interleaved={self.interleaved}, "
                f"attention_factor={self.attention_factor})")


_BY_NAME = {"none": NoPosition, "alibi": ALiBi, "rope": RoPE}
PositionArg = Union[str, PositionScheme]


def as_position_scheme(pos: PositionArg) -> PositionScheme:
    """Map pos="none" | "alibi" | "rope" or a scheme object to a scheme object."""
    if isinstance(pos, PositionScheme):
        return pos
    if isinstance(pos, str):
        if pos not in _BY_NAME:
            raise ValueError(f"pos must be one of {sorted(_BY_NAME)} or a position object, got {pos!r}")
        return _BY_NAME[pos]()
    raise TypeError(f"pos must be a str or a position object (ALiBi, RoPE), got {type(pos).__name__}")
