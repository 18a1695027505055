"""The validated description of one attention call, shared by every backend and the reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .positions import ResolvedPosition


@dataclass(frozen=True)
class AttentionSpec:
    """Everything but q, k, v.

    q_offset, k_offset: (B,) int64 on the tensors' device; query row i sits at q_offset[b] + i,
        key column j at k_offset[b] + j.
    window: left window w (key visible iff pq - pk < w) or None.
    """

    causal: bool
    scale: float
    window: Optional[int]
    q_offset: torch.Tensor
    k_offset: torch.Tensor
    position: ResolvedPosition
