"""Position schemes: host-side precomputation only.

Each scheme object turns its parameters into a `ResolvedPosition`: a kind tag plus the few small
vectors and scalars the kernels read (ALiBi slopes, RoPE inv_freq + attention factor). Kernels never see
an Nq x Nk bias or a rotated copy of q/k; the math they apply is in ../shared/POSITIONS.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .rope_scaling import DynamicNTK, Linear, Llama3, LongRoPE, RopeScaling, YaRN, yarn_mscale

NONE, ALIBI_KIND, ROPE_KIND, RELATIVE_KIND = "none", "alibi", "rope", "relative"


@dataclass(frozen=True)
class ResolvedPosition:
    """What a backend receives for one call.

    kind: "none" | "alibi" | "rope".
    slopes: (B, Hq) fp32 ALiBi slopes on the tensors' device (a stride-0 expand when shared by batch).
    inv_freq: (rotary_dim // 2,) fp32 RoPE inverse frequencies on the tensors' device.
    rotary_dim: number of leading head dims that rotate (even, <= D); 0 unless kind == "rope".
    interleaved: RoPE pairs (2i, 2i+1) instead of rotate-half (i, i + rotary_dim/2).
    attention_factor: multiplies RoPE cos and sin (so logits scale by its square).
    rel_table: (Hq, num_buckets) fp32 T5 bucket table (may require grad); the reference reads it.
    rel_bias: (Hq, 2, max_distance + 1) fp32 bias by signed distance, the table folded through the buckets
        (row 0: key at or before the query, row 1: key after it; column min(|pq - pk|, max_distance)),
        detached: the kernels read it; gradients flow to rel_table instead.
    rel_buckets: (2, max_distance + 1) int32, the bucket of each rel_bias entry:
        rel_bias[h, s, d] == rel_table[h, rel_buckets[s, d]].
    max_distance, bidirectional: T5 bucket parameters.
    """

    kind: str
    slopes: Optional[torch.Tensor] = None
    inv_freq: Optional[torch.Tensor] = None
    rotary_dim: int = 0
    interleaved: bool = False
    attention_factor: float = 1.0
    rel_table: Optional[torch.Tensor] = None
    rel_bias: Optional[torch.Tensor] = None
    rel_buckets: Optional[torch.Tensor] = None
    max_distance: int = 0
    bidirectional: bool = False

    @property
    def num_buckets(self) -> int:
        """Number of T5 buckets (columns of rel_table); 0 for other schemes."""
        return 0 if self.rel_table is None else self.rel_table.shape[1]


class PositionScheme:
    """Base class: `resolve` maps call shapes to the kernel parameters."""

    def resolve(self, batch: int, num_heads: int, head_dim: int, seq_len: int, device: torch.device,
                causal: bool = False) -> ResolvedPosition:
        """seq_len: the call's length (for length-dependent schemes); causal: the call's masking (for
        schemes whose form depends on it)."""
        raise NotImplementedError


class NoPosition(PositionScheme):
    """Plain attention (pos="none")."""

    def resolve(self, batch, num_heads, head_dim, seq_len, device, causal=False) -> ResolvedPosition:
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


def _cached_per_device(build):
    """build, cached per arguments (a device among them) in eager mode: a call on a CUDA device then makes no
    host-to-device copy (and can be captured in a CUDA graph) once the same parameters have been seen on that
    device. Under torch.compile build itself is traced (its small tensors become constants of the graph)."""
    cached = functools.lru_cache(maxsize=64)(build)

    @functools.wraps(build)
    def lookup(*args):
        return build(*args) if torch.compiler.is_compiling() else cached(*args)
    return lookup


@_cached_per_device
def _default_slopes_on(num_heads: int, device: torch.device) -> torch.Tensor:
    return alibi_slopes(num_heads).to(device)


def _cached_copy(owner, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """tensor as contiguous fp32 on device, copied once per device and in-place version of tensor (under
    torch.compile copied in the graph, as _cached_frequencies computes)."""
    if tensor.device == device and tensor.dtype == torch.float32:
        return tensor
    if torch.compiler.is_compiling():
        return tensor.to(device=device, dtype=torch.float32).contiguous()
    cache = owner.__dict__.setdefault("_device_copies", {})
    key = (device, tensor.data_ptr(), tensor._version)
    if key not in cache:
        cache.clear()
        cache[key] = tensor.to(device=device, dtype=torch.float32).contiguous()
    return cache[key]


def _cached_frequencies(rope: "RoPE", rotary_dim: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """rope.frequencies for a length-independent RoPE, inv_freq on device, computed once per rotary_dim and
    device (and version of a user-given inv_freq). Under torch.compile computed in the graph instead: a cache
    filled during tracing would invalidate the compiled graph's guards on the next call."""
    if torch.compiler.is_compiling():
        inv_freq, factor = rope.frequencies(rotary_dim, 0)
        return inv_freq.to(device).contiguous(), factor
    cache = rope.__dict__.setdefault("_device_frequencies", {})
    user = rope.inv_freq
    key = (rotary_dim, device, None if user is None else (user.data_ptr(), user._version))
    if key not in cache:
        inv_freq, factor = rope.frequencies(rotary_dim, 0)
        cache[key] = (inv_freq.to(device).contiguous(), factor)
    return cache[key]


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

    def resolve(self, batch, num_heads, head_dim, seq_len, device, causal=False) -> ResolvedPosition:
        if self.slopes is None:
            slopes = _default_slopes_on(num_heads, device)
        else:
            slopes = _cached_copy(self, self.slopes.detach(), device)
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


# RoPE.from_hf: the rope_parameters keys each transformers rope type may carry (beyond HF_ROPE_COMMON_KEYS).
HF_ROPE_COMMON_KEYS = ["rope_type", "type", "rope_theta", "partial_rotary_factor"]
HF_ROPE_KEYS = {
    "default": [],
    "linear": ["factor"],
    "dynamic": ["factor"],
    "yarn": ["factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate",
             "original_max_position_embeddings"],
    "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
    "longrope": ["short_factor", "long_factor", "factor", "attention_factor", "original_max_position_embeddings"],
}
INTERLEAVED_HF_MODELS = ("gptj", "codegen")  # model types whose rotary pairs are (2i, 2i + 1)


class RoPE(PositionScheme):
    """Rotary position embedding applied in-kernel to q at pq(i) and k at pk(j); v is never rotated.

    Args:
        theta: base of the default frequencies inv_freq_i = theta^(-2i/r).
        rotary_dim: r, the number of leading head dims that rotate (even, <= D); None means D.
        interleaved: pairs (2i, 2i+1) (GPT-J/RoFormer) instead of rotate-half (i, i + r/2) (NeoX/Llama).
        inv_freq: optional explicit (r/2,) frequency vector; it replaces the theta frequencies. Every
            context-extension scaling is such a vector plus an attention factor.
        attention_factor: multiplies cos and sin; logits scale by its square. With a scaling, the
            scaling's own factor (YaRN's mscale) is multiplied into it.
        scaling: None or a context-extension scaling (Linear, NTK, DynamicNTK, YaRN, Llama3, LongRoPE) that
            computes inv_freq and an attention factor from theta, rotary_dim and, for DynamicNTK and LongRoPE,
            the call's length.
            Exclusive with inv_freq.
    """

    def __init__(self, theta: float = 10000.0, rotary_dim: Optional[int] = None, interleaved: bool = False,
                 inv_freq: Optional[torch.Tensor] = None, attention_factor: float = 1.0,
                 scaling: Optional[RopeScaling] = None):
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
        if scaling is not None:
            if not isinstance(scaling, RopeScaling):
                raise TypeError(f"RoPE scaling must be None or a Linear, NTK, DynamicNTK, YaRN, Llama3 or LongRoPE "
                                f"object, got {type(scaling).__name__}")
            if inv_freq is not None:
                raise ValueError("RoPE takes inv_freq or scaling, not both: a scaling computes inv_freq from theta")
        self.theta = float(theta)
        self.rotary_dim = rotary_dim
        self.interleaved = bool(interleaved)
        self.inv_freq = inv_freq
        self.attention_factor = float(attention_factor)
        self.scaling = scaling

    @classmethod
    def from_hf(cls, config) -> "RoPE":
        """The RoPE of a Hugging Face transformers model config (Llama, Mistral, Qwen2/3, Phi-3, GPT-NeoX, GPT-J, ...).

        config: a transformers config object or its dict (config.json). Keys read, by attribute or item:
        - `rope_parameters` (transformers >= 5) or else `rope_scaling` (older): a dict with `rope_type` (or
          `type`) in "default", "linear", "dynamic", "yarn", "llama3", "longrope" and that type's keys
          (HF_ROPE_KEYS): `factor`; `low_freq_factor`, `high_freq_factor` (llama3); `beta_fast`, `beta_slow`,
          `attention_factor`, `mscale`, `mscale_all_dim`, `truncate` (yarn); `short_factor`, `long_factor`,
          `attention_factor` (longrope); `original_max_position_embeddings` (yarn, llama3, longrope; the
          config's own key wins, else `max_position_embeddings`); `rope_theta` and `partial_rotary_factor` may
          sit here too. None or {} means "default". A key outside the type's list raises ValueError, so a
          config is never silently read as a different rotation.
        - `rope_theta` (default 10000) and `partial_rotary_factor` (default 1) when not in that dict; GPT-NeoX's
          older config.json names for them, `rotary_emb_base` and `rotary_pct`, likewise.
        - `head_dim`, or else `hidden_size // num_attention_heads` (`n_embd // n_head` for GPT-J):
          rotary_dim = int(head_dim * partial_rotary_factor), or the config's `rotary_dim` where it has one
          (GPT-J; None there means the whole head).
        - `model_type`: "gptj" and "codegen" rotate interleaved pairs (2i, 2i + 1) (rotate-every-two); every
          other model rotate-half.
        - `max_position_embeddings`: dynamic's original length (as in transformers), yarn's factor when
          it is null (max_position_embeddings / original_max_position_embeddings), longrope's factor likewise.
        YaRN's `attention_factor` wins; else `mscale` and `mscale_all_dim` (both non-zero) give
        yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim); else the default 0.1*ln(s) + 1.
        Other rope types and per-layer dicts raise ValueError naming them.
        """
        def get(source, key, default=None):
            value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
            return default if value is None else value

        params = get(config, "rope_parameters") or get(config, "rope_scaling") or {}
        if not isinstance(params, dict):
            raise TypeError(f"RoPE.from_hf: rope_parameters / rope_scaling must be a dict, got {type(params).__name__}")
        if any(isinstance(value, dict) for value in params.values()):
            raise ValueError(f"RoPE.from_hf: per-layer rope_parameters {sorted(params)} are not supported; "
                             f"build one RoPE per layer type")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in HF_ROPE_KEYS:
            raise ValueError(f"RoPE.from_hf: unsupported rope_type {rope_type!r}; supported: "
                             f"{', '.join(HF_ROPE_KEYS)}")
        unknown = sorted(set(params) - set(HF_ROPE_KEYS[rope_type]) - set(HF_ROPE_COMMON_KEYS))
        if unknown:
            raise ValueError(f"RoPE.from_hf: rope_parameters keys {unknown} are not understood for rope_type "
                             f"{rope_type!r} (known: {sorted(HF_ROPE_COMMON_KEYS + HF_ROPE_KEYS[rope_type])})")
        theta = params.get("rope_theta", get(config, "rope_theta", get(config, "rotary_emb_base", 10000.0)))
        partial = params.get("partial_rotary_factor", get(config, "partial_rotary_factor", get(config, "rotary_pct",
                                                                                               1.0)))
        head_dim = get(config, "head_dim")
        if head_dim is None:
            hidden = get(config, "hidden_size", get(config, "n_embd"))
            heads = get(config, "num_attention_heads", get(config, "n_head"))
            if hidden is None or heads is None:
                raise ValueError("RoPE.from_hf: config needs head_dim, or hidden_size and num_attention_heads")
            head_dim = hidden // heads
        rotary_dim = get(config, "rotary_dim", int(head_dim * partial))
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"RoPE.from_hf: rotary dim {rotary_dim} (config rotary_dim, or int(head_dim * "
                             f"partial_rotary_factor) = int({head_dim} * {partial})) must be a positive even int <= "
                             f"head_dim {head_dim}")
        interleaved = get(config, "model_type") in INTERLEAVED_HF_MODELS

        def need(key):
            if params.get(key) is None:
                raise ValueError(f"RoPE.from_hf: rope_type {rope_type!r} needs rope_parameters[{key!r}]")
            return params[key]

        def need_config(key):
            if get(config, key) is None:
                raise ValueError(f"RoPE.from_hf: rope_type {rope_type!r} needs config {key}")
            return get(config, key)

        def original_len():  # transformers gives the config-level value priority (Phi-3)
            value = get(config, "original_max_position_embeddings", params.get("original_max_position_embeddings"))
            return int(value if value is not None else need_config("max_position_embeddings"))

        def factor_or_ratio(original):  # yarn, longrope: a null factor is max_position_embeddings / original
            factor = params.get("factor")
            return need_config("max_position_embeddings") / original if factor is None else factor

        if rope_type == "default":
            scaling = None
        elif rope_type == "linear":
            scaling = Linear(need("factor"))
        elif rope_type == "dynamic":
            scaling = DynamicNTK(need("factor"), int(need_config("max_position_embeddings")))
        elif rope_type == "llama3":
            scaling = Llama3(need("factor"), need("low_freq_factor"), need("high_freq_factor"), original_len())
        elif rope_type == "longrope":
            original = original_len()
            scaling = LongRoPE(need("short_factor"), need("long_factor"), original, factor_or_ratio(original),
                               params.get("attention_factor"))
        else:  # yarn
            original = original_len()
            factor = factor_or_ratio(original)
            mscale = params.get("attention_factor")
            if mscale is None and params.get("mscale") and params.get("mscale_all_dim"):
                mscale = yarn_mscale(factor, params["mscale"]) / yarn_mscale(factor, params["mscale_all_dim"])
            scaling = YaRN(factor, original, beta_fast=params.get("beta_fast") or 32,
                           beta_slow=params.get("beta_slow") or 1, mscale=mscale,
                           truncate=params.get("truncate", True))
        return cls(theta=float(theta), rotary_dim=rotary_dim, interleaved=interleaved, scaling=scaling)

    @property
    def length_dependent(self) -> bool:
        """True when the frequencies depend on the call's length (DynamicNTK)."""
        return self.scaling is not None and self.scaling.length_dependent

    def frequencies(self, rotary_dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
        """(inv_freq (rotary_dim/2,) fp32 on CPU, attention factor) for a call whose current length (largest
        absolute position + 1) is seq_len."""
        if self.scaling is not None:
            inv_freq, factor = self.scaling.frequencies(self.theta, rotary_dim, seq_len)
            return inv_freq, self.attention_factor * factor
        if self.inv_freq is not None:
            return self.inv_freq.detach().to(torch.float32), self.attention_factor
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
        return (self.theta ** -exponents).to(torch.float32), self.attention_factor

    def resolve(self, batch, num_heads, head_dim, seq_len, device, causal=False) -> ResolvedPosition:
        if self.inv_freq is not None and self.rotary_dim is None:
            rotary_dim = 2 * self.inv_freq.shape[0]
        else:
            rotary_dim = head_dim if self.rotary_dim is None else self.rotary_dim
        if rotary_dim > head_dim:
            given = "rotary_dim" if self.rotary_dim is not None else "2 * len(inv_freq)"
            raise ValueError(f"RoPE rotary_dim must be <= head dim D={head_dim}, got {given} = {rotary_dim}")
        if self.length_dependent:  # DynamicNTK: new frequencies whenever the length changes
            inv_freq, factor = self.frequencies(rotary_dim, seq_len)
            inv_freq = inv_freq.to(device).contiguous()
        else:
            inv_freq, factor = _cached_frequencies(self, rotary_dim, device)
        return ResolvedPosition(ROPE_KIND, inv_freq=inv_freq, rotary_dim=rotary_dim,
                                interleaved=self.interleaved, attention_factor=factor)

    def __repr__(self) -> str:
        return (f"RoPE(theta={self.theta}, rotary_dim={self.rotary_dim}, interleaved={self.interleaved}, "
                f"attention_factor={self.attention_factor}, scaling={self.scaling!r})")


MAX_RELATIVE_DISTANCE = 1 << 20  # bounds the (Hq, 2, max_distance + 1) distance table


def t5_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
              max_distance: int) -> torch.Tensor:
    """T5 bucket of relative_position = pk - pq (int64 tensor, any shape), as POSITIONS.md defines it.

    The log is taken in fp32 like transformers' T5Attention._relative_position_bucket, so bucket edges
    match it exactly. Returns int64 buckets in [0, num_buckets).
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.int64) * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # Distances below max_exact are 0 after the clamp, so the log never sees 0 where it is used.
    log_ratio = torch.log(distance.clamp(min=max_exact).to(torch.float32) / max_exact)
    far = max_exact + (log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)).to(torch.int64)
    far = far.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


@_cached_per_device
def _bucket_layout(max_distance: int, num_buckets: int, bidirectional: bool, device: torch.device) -> torch.Tensor:
    """rel_buckets (2, max_distance + 1) int32 on device, computed once per parameters and device: row 0 holds
    keys at or before the query (pk - pq = -distance), row 1 keys after it."""
    distance = torch.arange(max_distance + 1, dtype=torch.int64)
    buckets = t5_bucket(torch.stack((-distance, distance)), bidirectional, num_buckets, max_distance)
    return buckets.to(device=device, dtype=torch.int32).contiguous()


def fold_distance_grad(d_rel_bias: torch.Tensor, rel_buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Gradient w.r.t. rel_bias (Hq, 2, max_distance + 1) -> gradient w.r.t. the (Hq, num_buckets) table, fp32:
    each bucket sums the distance entries that map to it (the chain rule through rel_bias = table[:, rel_buckets]).

    T5 buckets are non-decreasing in the distance on each side, so bucket b covers one run of distances per
    side, [searchsorted(b), searchsorted(b, right)), summed as a difference of fp64 prefix sums. Deterministic
    (no atomics), O(size), free of host synchronization and of data-dependent shapes (torch.compile traces it).
    """
    prefix = torch.nn.functional.pad(d_rel_bias.to(torch.float64).cumsum(-1), (1, 0))  # (Hq, 2, D + 2)
    sorted_buckets = rel_buckets.to(torch.int64)  # (2, D + 1), each row non-decreasing
    bucket_ids = torch.arange(num_buckets, device=rel_buckets.device).expand(2, num_buckets).contiguous()
    start = torch.searchsorted(sorted_buckets, bucket_ids)  # (2, num_buckets) first distance of each run
    end = torch.searchsorted(sorted_buckets, bucket_ids, right=True)
    heads = prefix.shape[0]
    run_sums = prefix.gather(-1, end.expand(heads, 2, num_buckets)) - prefix.gather(-1, start.expand(heads, 2,
                                                                                                       num_buckets))
    return run_sums.sum(1).to(torch.float32)


class RelativeBias(PositionScheme):
    """T5 relative position bias: bias_ij = table[h, bucket(pk(j) - pq(i))], added after the softmax scale.

    Args:
        table: (Hq, num_buckets) learnable bias table, any float dtype (used in fp32); it receives a
            gradient through fused_attention.
        max_distance: distances from max_distance on share the last bucket (T5 default 128).
        bidirectional: separate buckets for keys after the query (T5 encoder). None: bidirectional
            exactly when the call is not causal.

    Kernels never evaluate the bucket formula: per call the table is folded into a (Hq, 2, max_distance + 1)
    bias-by-distance table (`ResolvedPosition.rel_bias`), which the kernels index by the signed distance
    computed in registers. The bucket edges are thus computed once, by the same fp32 formula as the
    reference and transformers, instead of by each backend's own log (once per parameters and device:
    the bucket map `rel_buckets` is cached). The kernels return the gradient of the bucket table itself,
    or of the distance table folded back through the buckets (`fold_distance_grad`),
    only when the table requires it. A table on the CPU is checked for NaN / inf; a CUDA table is not
    (the check would synchronize the device on every call), nor is any table under torch.compile.
    """

    def __init__(self, table: torch.Tensor, max_distance: int = 128, bidirectional: Optional[bool] = None):
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"RelativeBias table must be a torch.Tensor, got {type(table).__name__}")
        if table.dim() != 2 or not table.is_floating_point():
            raise ValueError(f"RelativeBias table must be a floating-point tensor of shape (Hq, num_buckets), "
                             f"got {table.dtype} of shape {tuple(table.shape)}")
        if bidirectional is not None and not isinstance(bidirectional, bool):
            raise TypeError(f"RelativeBias bidirectional must be a bool or None, got {type(bidirectional).__name__}")
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) \
                or not 1 <= max_distance <= MAX_RELATIVE_DISTANCE:
            raise ValueError(f"RelativeBias max_distance must be an int in [1, {MAX_RELATIVE_DISTANCE}], "
                             f"got {max_distance!r}")
        self.table = table
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def resolve(self, batch, num_heads, head_dim, seq_len, device, causal=False) -> ResolvedPosition:
        bidirectional = (not causal) if self.bidirectional is None else self.bidirectional
        num_buckets = self.table.shape[1]
        if self.table.shape[0] != num_heads:
            raise ValueError(f"RelativeBias table must have shape (Hq, num_buckets) with Hq={num_heads}, "
                             f"got {tuple(self.table.shape)}")
        max_exact = num_buckets // (4 if bidirectional else 2)
        if max_exact < 1:
            raise ValueError(f"RelativeBias table needs num_buckets >= {4 if bidirectional else 2} "
                             f"({'bidirectional' if bidirectional else 'causal'} buckets), got {num_buckets}")
        if self.max_distance <= max_exact:
            raise ValueError(f"RelativeBias max_distance must exceed the exact-bucket range {max_exact} "
                             f"(num_buckets // {4 if bidirectional else 2}), got {self.max_distance}")
        # Checked only where it costs no device synchronization and no graph break: a CUDA call stays sync-free
        # (and capturable in a CUDA graph), a compiled one traceable; a NaN there propagates to the output as
        # NaN, as in any layer.
        if self.table.device.type == "cpu" and not torch.compiler.is_compiling() \
                and not torch.isfinite(self.table.detach()).all():
            raise ValueError("RelativeBias table must be finite (found NaN or inf)")
        table = self.table.to(device=device, dtype=torch.float32)
        buckets = _bucket_layout(self.max_distance, num_buckets, bidirectional, device)
        rel_bias = table.detach()[:, buckets.long()].contiguous()  # (Hq, 2, max_distance + 1)
        return ResolvedPosition(RELATIVE_KIND, rel_table=table, rel_bias=rel_bias, rel_buckets=buckets,
                                max_distance=self.max_distance, bidirectional=bidirectional)

    def __repr__(self) -> str:
        return (f"RelativeBias(table={tuple(self.table.shape)}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional})")


_BY_NAME = {"none": NoPosition, "alibi": ALiBi, "rope": RoPE}
# In eager mode a string names one default instance, so that its per-device caches (frequencies) persist across
# calls (a decode step passing pos="rope" would otherwise recompute them every call); under torch.compile a fresh
# one, which the graph does not guard on.
_DEFAULTS = {name: scheme() for name, scheme in _BY_NAME.items()}
PositionArg = Union[str, PositionScheme]


def as_position_scheme(pos: PositionArg) -> PositionScheme:
    """Map pos="none" | "alibi" | "rope" or a scheme object to a scheme object."""
    if isinstance(pos, PositionScheme):
        return pos
    if isinstance(pos, str):
        if pos not in _BY_NAME:
            raise ValueError(f"pos must be one of {sorted(_BY_NAME)} or a position object, got {pos!r}")
        return _BY_NAME[pos]() if torch.compiler.is_compiling() else _DEFAULTS[pos]
    raise TypeError(f"pos must be a str or a position object (ALiBi, RoPE, RelativeBias), "
                    f"got {type(pos).__name__}")
