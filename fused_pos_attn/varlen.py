"""fused_attention_varlen: packed sequences in FlashAttention's varlen layout, each with its own positions.

The sequences reach the kernels as one packed call (AttentionSpec's packed layout): every kernel walks the
(sequence, query block) grid and reads each sequence's rows from cu_seqlens, so nothing is padded and no
Python loop runs over the sequences.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from .attention import (OffsetArg, attend, check_bool, check_heads, check_offsets, check_scale,
                        check_tensor_types, check_window, current_length)
from .positions import PositionArg, as_position_scheme
from .spec import AttentionSpec


def fused_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                           max_seqlen_k: Optional[int] = None, pos: PositionArg = "none", *, causal: bool = False,
                           scale: Optional[float] = None, window: Optional[int] = None, q_offset: OffsetArg = None,
                           k_offset: OffsetArg = None, return_lse: bool = False, backend: str = "auto"):
    """Attention over S packed sequences, each attending only to itself, positions restarting per sequence.

    Args:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D) with Hq % Hkv == 0. Any strides on the first two dims
            (e.g. slices of a packed (total, 3, H, D) qkv tensor); not copied.
        cu_seqlens_q, cu_seqlens_k: (S + 1,) int32 or int64 cumulative lengths on q's device, from 0 to
            total_q / total_k: sequence s owns query rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] and key rows
            cu_seqlens_k[s]:cu_seqlens_k[s + 1]. Zero-length sequences are allowed (a query row whose
            sequence has no key gets out 0 and lse -inf).
        max_seqlen_q, max_seqlen_k: the longest query / key sequence, Python ints, or None to compute them.
            cu_seqlens and max_seqlen are checked whenever that costs no device sync: always for CPU tensors,
            and on CUDA when a max_seqlen is None (computing it syncs once, and the same read checks
            everything). With both given on CUDA, or under torch.compile, nothing is read back (as
            FlashAttention): values inconsistent with cu_seqlens then give wrong rows, but the kernels clamp
            every sequence into [0, total) and to max_seqlen rows, so they never read or write out of bounds.
            Under torch.compile pass both: computing them reads cu_seqlens on the host, a graph break.
        pos: "none" | "alibi" | "rope" or an ALiBi / RoPE / RelativeBias object. ALiBi slopes may be (Hq,) or
            (S, Hq), one row per sequence (FlashAttention's per-batch slopes).
        causal, scale, window: as fused_attention, within each sequence.
        q_offset, k_offset: int or (S,) int tensor: query row i of sequence s sits at q_offset[s] + i, key j
            at k_offset[s] + j. Defaults align each sequence bottom-right, as fused_attention does:
            k_offset = 0 and q_offset = k_offset + len_k(s) - len_q(s). So RoPE positions restart at 0 in
            every document, and ALiBi / T5 distances never cross a document boundary.
        return_lse: also return lse (Hq, total_q) fp32 (fp64 for fp64 inputs), FlashAttention's varlen
            layout; differentiable.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".

    Returns:
        out (total_q, Hq, D) contiguous in q's dtype, and lse when return_lse. Differentiable in q, k, v and a RelativeBias table.
    """
    check_tensor_types(dict(q=q, k=k, v=v),
                       dict(q="(total_q, Hq, D)", k="(total_k, Hkv, D)", v="(total_k, Hkv, D)"))
    total_q, num_heads, head_dim = q.shape
    total_k = k.shape[0]
    check_heads(num_heads, k.shape[1], head_dim, k.shape[2])
    if num_heads == 0:
        raise ValueError(f"Hq must be >= 1, got q {tuple(q.shape)}")
    cu_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    cu_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length S + 1, got "
                         f"{cu_q.shape[0]} and {cu_k.shape[0]}")
    num_sequences = cu_q.shape[0] - 1
    max_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    if not ((q.is_cuda or torch.compiler.is_compiling()) and max_q is not None and max_k is not None):
        max_q = _check_cumulative(cu_q, "cu_seqlens_q", total_q, "total_q = q.shape[0]", max_q, "max_seqlen_q")
        max_k = _check_cumulative(cu_k, "cu_seqlens_k", total_k, "total_k = k.shape[0]", max_k, "max_seqlen_k")
    len_q, len_k = cu_q.diff(), cu_k.diff()  # (S,) int64, no sync

    scheme = as_position_scheme(pos)
    causal = check_bool(causal, "causal")
    k_off = check_offsets(k_offset, "k_offset", num_sequences, q.device, default=0, batch_name="S")
    q_off = check_offsets(q_offset, "q_offset", num_sequences, q.device, default=None, batch_name="S")
    if q_off is None:
        q_off = k_off + (len_k - len_q)
    length = current_length(scheme, q_off, k_off, len_q, len_k, fallback=max(max_q, max_k, 1))
    position = scheme.resolve(num_sequences, num_heads, head_dim, length, q.device, causal=causal)
    spec = AttentionSpec(causal=causal, scale=check_scale(scale, head_dim), window=check_window(window),
                         q_offset=q_off, k_offset=k_off, position=position, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                         max_seqlen_q=min(max_q, total_q), max_seqlen_k=min(max_k, total_k))
    packed_q, packed_k, packed_v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, total, D) views
    result = attend(packed_q, packed_k, packed_v, spec, backend, return_lse)
    out, lse = result if return_lse else (result, None)
    # (total_q, Hq, D): a view of the kernels' output when q was packed densely (empty_like kept its layout);
    # a copy only for other layouts
    out = out.squeeze(0).transpose(0, 1).contiguous()
    return (out, lse.squeeze(0)) if return_lse else out


def _check_cu_seqlens(value: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """(S + 1,) int32 / int64 on device -> an int64 contiguous copy (saved for backward: never the caller's)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a (S + 1,) int32 tensor of cumulative lengths, got {type(value).__name__}")
    if value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] < 2:
        raise ValueError(f"{name} must have shape (S + 1,) with S >= 1 sequences, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {value.device}")
    return value.to(dtype=torch.int64, copy=True).contiguous()


def _check_max_seqlen(value: Optional[int], name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python int or None, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a Python int or None, got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_cumulative(cu: torch.Tensor, name: str, total: int, total_text: str, max_seqlen: Optional[int],
                      max_name: str) -> int:
    """Checks cu's values (one read; a sync for CUDA tensors) and returns the longest sequence's length, or
    max_seqlen when given (it must be at least that)."""
    starts = cu.tolist()
    lengths = [end - start for start, end in zip(starts[:-1], starts[1:])]
    if starts[0] != 0:
        raise ValueError(f"{name} must start at 0, got {starts[0]}")
    bad = next((s for s, length in enumerate(lengths) if length < 0), None)
    if bad is not None:
        raise ValueError(f"{name} must be non-decreasing, but entry {bad + 1} ({starts[bad + 1]}) < entry {bad} "
                         f"({starts[bad]})")
    if starts[-1] != total:
        raise ValueError(f"{name}'s last entry must equal {total_text} = {total}, got {starts[-1]}")
    longest = max(lengths)
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence in {name} ({longest})")
    return max_seqlen
