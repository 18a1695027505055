"""The validated description of one attention call, shared by every backend and the reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .positions import ResolvedPosition


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend returns lse in for inputs of dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class AttentionSpec:
    """Everything but q, k, v.

    Two layouts reach the backends, both as 4-D (B, H, N, D) tensors:
    - dense (cu_seqlens_q is None): q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D); batch b's rows are q[b].
    - packed (varlen): q (1, Hq, total_q, D), k / v (1, Hkv, total_k, D) (views of FlashAttention's
      (total, H, D) tensors); sequence s owns query rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] and key rows
      cu_seqlens_k[s]:cu_seqlens_k[s + 1]. The call's batch is the S sequences: offsets and ALiBi slopes
      are per sequence, LSE is (1, Hq, total_q).

    q_offset, k_offset: (B,) int64 (dense) or (S,) int64 (packed) on the tensors' device; query row i of
        batch / sequence b sits at q_offset[b] + i, key column j at k_offset[b] + j.
    window: left window w (key visible iff pq - pk < w) or None.
    cu_seqlens_q, cu_seqlens_k: (S + 1,) int64 contiguous on the tensors' device, non-decreasing, from 0 to
        total_q / total_k, or None for the dense layout. Validated by fused_attention_varlen when that is
        cheap (always for CPU tensors); kernels still clamp every sequence's rows into [0, total) so that
        no cu_seqlens can make them read or write out of bounds.
    max_seqlen_q, max_seqlen_k: packed layout only (0 for dense, where N is the tensors'): the longest
        sequence's length, an upper bound that sizes grids and workspaces (kernels process at most that many
        rows of a sequence).

    Two forward-only additions of the dense layout, for KV caches (fused_attention_with_kvcache):
    seqused_k: (B,) int64 contiguous or None: batch b attends only its first seqused_k[b] keys (clamped by the
        kernels into [0, Nk]); the rest of its key rows are never read.
    block_table, page_size: a paged cache, or None and 0. k / v are then (1, Hkv, num_pages * page_size, D)
        views of (num_pages, page_size, Hkv, D) pages, block_table (B, max_pages) int64 contiguous, and key j of
        batch b is row block_table[b, j // page_size] * page_size + j % page_size (Nk, the keys a batch may
        have, is max_pages * page_size; seqused_k is then required). Kernels clamp page ids into the cache.
    """

    causal: bool
    scale: float
    window: Optional[int]
    q_offset: torch.Tensor
    k_offset: torch.Tensor
    position: ResolvedPosition
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    seqused_k: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    page_size: int = 0

    @property
    def paged(self) -> bool:
        """True when k / v are pages addressed through block_table."""
        return self.block_table is not None

    @property
    def varlen(self) -> bool:
        """True for the packed layout."""
        return self.cu_seqlens_q is not None

    @property
    def num_sequences(self) -> int:
        """The call's batch: B (dense) or S (packed), the length of q_offset."""
        return self.q_offset.shape[0]
