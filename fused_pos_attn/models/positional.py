"""Position schemes of the length-generalization models, chosen by name.

Two families:
- absolute (model side, added to the token embeddings): `sinusoidal` (Vaswani et al.) and `learned`
  (a trainable (train_len, d_model) table);
- in-attention (handed to `fused_attention` as its `pos` argument): `nope` (no position at all), `rope`,
  `rope_linear`, `rope_yarn`, `alibi`, `t5` (a learnable per-layer (heads, 32) T5 bucket table,
  max_distance 128).

`rope`, `rope_linear` and `rope_yarn` train identically (plain RoPE, theta 10000); they differ only when a
sequence is longer than the training length L_train: `rope` extrapolates, `rope_linear` interpolates
positions by the factor context_len / L_train (position interpolation), `rope_yarn` applies YaRN with that
factor and original length L_train (attention factor 0.1 ln s + 1 included).

`learned` past its table: positions >= train_len all read the last row (the position is clamped). The
ALiBi paper's learned baseline cannot run past L at all; the clamp is this package's choice so that the
model can be evaluated at every length, and it is reported as such.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..positions import ALiBi, PositionScheme, RelativeBias, RoPE
from ..rope_scaling import Linear, YaRN

SCHEMES = ("nope", "sinusoidal", "learned", "rope", "rope_linear", "rope_yarn", "alibi", "t5")
ABSOLUTE_SCHEMES = ("sinusoidal", "learned")
ROPE_SCHEMES = ("rope", "rope_linear", "rope_yarn")
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128


def check_scheme(name: str) -> str:
    """name if it is one of SCHEMES, else ValueError listing them."""
    if name not in SCHEMES:
        raise ValueError(f"position scheme must be one of {', '.join(SCHEMES)}; got {name!r}")
    return name


def training_scheme(name: str) -> str:
    """The scheme a model is trained with: the RoPE variants all train as plain `rope`."""
    return "rope" if check_scheme(name) in ROPE_SCHEMES else name


def sinusoidal_table(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """Vaswani et al.'s encoding: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same).

    positions: (N,) int64. Returns (N, d_model) fp32. Defined for every position, so it never runs out.
    """
    inv_freq = 10000.0 ** -(torch.arange(0, d_model, 2, dtype=torch.float64, device=positions.device) / d_model)
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (N, ceil(d/2))
    table = torch.stack((torch.sin(angle), torch.cos(angle)), dim=-1).flatten(1)[:, :d_model]
    return table.to(torch.float32)


class AbsolutePositions(nn.Module):
    """Absolute position vectors added to the token embeddings (`sinusoidal` or `learned`).

    Args:
        scheme: "sinusoidal" or "learned".
        d_model: width of the embeddings.
        train_len: rows of the learned table (the training length); positions past it are clamped to
            train_len - 1. Ignored by `sinusoidal`.
    """

    def __init__(self, scheme: str, d_model: int, train_len: int):
        super().__init__()
        if scheme not in ABSOLUTE_SCHEMES:
            raise ValueError(f"AbsolutePositions scheme must be one of {ABSOLUTE_SCHEMES}, got {scheme!r}")
        self.scheme, self.d_model, self.train_len = scheme, d_model, train_len
        self.table: Optional[nn.Parameter] = None
        if scheme == "learned":
            self.table = nn.Parameter(torch.randn(train_len, d_model) * d_model ** -0.5)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (N,) int64 -> (N, d_model) vectors to add to every batch row."""
        if self.table is not None:
            return self.table[positions.clamp(max=self.train_len - 1)]
        return sinusoidal_table(positions, self.d_model)


class AttentionPositions(nn.Module):
    """The `pos` argument of one attention layer's `fused_attention` call (one instance per layer).

    Args:
        scheme: any of SCHEMES; the absolute ones and `nope` give pos "none".
        num_heads: query heads (rows of the T5 table).
        train_len: L_train, the length above which the RoPE variants rescale.
        rope_theta: RoPE base.

    `t5` owns a learnable (num_heads, 32) bucket table, zero-initialized (the layer starts as `nope` and
    learns its biases), causal buckets, max_distance 128.
    """

    def __init__(self, scheme: str, num_heads: int, train_len: int, rope_theta: float = 10000.0):
        super().__init__()
        self.scheme = check_scheme(scheme)
        self.num_heads, self.train_len, self.rope_theta = num_heads, train_len, rope_theta
        self.table: Optional[nn.Parameter] = None
        if scheme == "t5":
            self.table = nn.Parameter(torch.zeros(num_heads, T5_BUCKETS))

    def position(self, context_len: int) -> PositionScheme | str:
        """The fused_attention `pos` for a call whose largest position + 1 is context_len.

        rope_linear / rope_yarn: factor s = context_len / train_len when that exceeds 1, else plain RoPE.
        """
        scheme = self.scheme
        if scheme in ("nope",) + ABSOLUTE_SCHEMES:
            return "none"
        if scheme == "alibi":
            return ALiBi()
        if scheme == "t5":
            return RelativeBias(self.table, max_distance=T5_MAX_DISTANCE, bidirectional=False)
        factor = context_len / self.train_len
        if scheme == "rope" or factor <= 1.0:
            return RoPE(theta=self.rope_theta)
        if scheme == "rope_linear":
            return RoPE(theta=self.rope_theta, scaling=Linear(factor))
        return RoPE(theta=self.rope_theta, scaling=YaRN(factor, original_max_len=self.train_len))

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, train_len={self.train_len}"


def extra_parameters(scheme: str, d_model: int, num_heads: int, num_layers: int, train_len: int) -> int:
    """Parameters a scheme adds to the `nope` model: the learned table or the per-layer T5 tables."""
    if scheme == "learned":
        return train_len * d_model
    if scheme == "t5":
        return num_layers * num_heads * T5_BUCKETS
    return 0

