"""fused_attention_with_kvcache: a decoding (or chunked-prefill) step over a KV cache in FlashAttention's kvcache
layout, contiguous or paged, with the position scheme applied in the kernel to the cache's un-rotated keys.

The cache holds keys as they were projected (never rotated), so a RoPE scheme whose frequencies change with the
length (DynamicNTK, LongRoPE) rotates every cached key with the current frequencies, and evicting or shifting
entries needs no re-rotation. The new tokens' keys and values (k_new, v_new) are written into the cache in place
first, then attended with the rest.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import backends
from .attention import attend, check_bool, check_heads, check_scale, check_tensor_types, check_window, \
    current_length
from .positions import PositionArg, as_position_scheme
from .spec import AttentionSpec

_CACHE_LAYOUT = "(B, max_len, Hkv, D) or pages (num_pages, page_size, Hkv, D)"
_LAYOUTS = dict(q="(B, Nq, Hq, D)", k_cache=_CACHE_LAYOUT, v_cache=_CACHE_LAYOUT, k_new="(B, Nq, Hkv, D)",
                v_new="(B, Nq, Hkv, D)")


def fused_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 cache_seqlens: Union[int, torch.Tensor], pos: PositionArg = "none", *,
                                 block_table: Optional[torch.Tensor] = None, k_new: Optional[torch.Tensor] = None,
                                 v_new: Optional[torch.Tensor] = None, causal: bool = True,
                                 window: Optional[int] = None, scale: Optional[float] = None,
                                 return_lse: bool = False, backend: str = "auto"):
    """Attention of Nq new query tokens per row over a KV cache (forward only: the output carries no gradient).

    Args:
        q: (B, Nq, Hq, D), the new tokens' queries (un-rotated).
        k_cache, v_cache: the cache, un-rotated keys. Contiguous: (B, max_len, Hkv, D), any strides. Paged
            (block_table given): (num_pages, page_size, Hkv, D) with any page_size >= 1, each page's rows
            consecutive in memory (stride(0) == page_size * stride(1)).
        cache_seqlens: int or (B,) integer tensor: row b's valid cache length before this step's tokens.
        pos: "none" | "alibi" | "rope" or an ALiBi / RoPE / RelativeBias object.
        block_table: (B, max_pages) int32 / int64: row b's logical cache rows [p * page_size, (p + 1) *
            page_size) live in page block_table[b, p].
        k_new, v_new: (B, Nq, Hkv, D) or None: the new tokens' keys and values, written (un-rotated) into the
            cache at rows cache_seqlens[b] + i, in place, before attending. Without them the caller has written
            those rows already.
        causal: key j visible to query i iff j <= cache_seqlens[b] + i. window: left sliding window w > 0.
        scale: multiplies q.k (default 1/sqrt(D)). return_lse: also return the (B, Hq, Nq) fp32 log-sum-exp.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference" (as fused_attention's).

    Positions are cache indices: query i of row b sits at cache_seqlens[b] + i, cache row j at j, and row b
    attends its first cache_seqlens[b] + Nq cache rows. (FlashAttention without new keys reads cache_seqlens as
    the length after the step; here it is always the length before it.)

    Everything is checked before the cache is written: shapes, dtypes, devices, cache_seqlens[b] + Nq within
    the cache (max_len, or max_pages * page_size), block_table entries within [0, num_pages). Those value checks
    read cache_seqlens and block_table back to the host (a device synchronization for CUDA tensors).

    Returns:
        out (B, Nq, Hq, D) in q's dtype, and lse (B, Hq, Nq) when return_lse.
    """
    paged = block_table is not None
    check_tensor_types(dict(q=q, k_cache=k_cache, v_cache=v_cache), _LAYOUTS)
    batch, seq_q, num_heads, head_dim = q.shape
    slots, capacity, num_kv_heads = _check_cache(k_cache, paged)
    check_heads(num_heads, num_kv_heads, head_dim, k_cache.shape[3])
    if batch == 0 or seq_q == 0 or num_heads == 0:
        raise ValueError(f"q must have B, Nq, Hq >= 1, got shape {tuple(q.shape)}")
    if not paged and slots != batch:
        raise ValueError(f"k_cache must have q's batch size B={batch} (B, max_len, Hkv, D), got {tuple(k_cache.shape)}")
    pages = _check_block_table(block_table, batch, q.device) if paged else None
    if pages is not None:
        capacity *= pages.shape[1]  # a row's keys: max_pages * page_size
    new_kv = _check_new_kv(k_new, v_new, (batch, seq_q, num_kv_heads, head_dim), q)
    lengths = _check_seqlens(cache_seqlens, batch, q.device)
    longest = _check_values(lengths, pages, seq_q, capacity, slots)
    chosen = backends.select(backend, q)
    _check_paged_dtype(chosen, q, paged)
    k4, v4 = (_kernel_view(t, paged) for t in (k_cache, v_cache))

    scheme = as_position_scheme(pos)
    causal = check_bool(causal, "causal")
    check_bool(return_lse, "return_lse")
    spec_scale, spec_window = check_scale(scale, head_dim), check_window(window)
    length = current_length(scheme, longest, 0, seq_q, longest + seq_q, fallback=longest + seq_q)
    position = scheme.resolve(batch, num_heads, head_dim, length, q.device, causal=causal)

    if new_kv is not None:
        _write_new_kv(k_cache, v_cache, *new_kv, lengths, pages)
    spec = AttentionSpec(causal=causal, scale=spec_scale, window=spec_window, q_offset=lengths,
                         k_offset=torch.zeros_like(lengths), position=position, seqused_k=lengths + seq_q,
                         block_table=pages, page_size=k_cache.shape[1] if paged else 0)
    with torch.no_grad():
        result = attend(q.transpose(1, 2), k4, v4, spec, backend, return_lse)
    out, lse = result if return_lse else (result, None)
    out = out.transpose(1, 2)  # (B, Nq, Hq, D): a view of the kernels' (B, Hq, Nq, D) output
    return (out, lse) if return_lse else out


def _check_cache(k_cache: torch.Tensor, paged: bool) -> tuple[int, int, int]:
    """(batch or num_pages, max_len or page_size, Hkv) of a cache; paged caches need consecutive page rows."""
    slots, rows, num_kv_heads, _ = k_cache.shape
    if rows == 0 or num_kv_heads == 0:
        raise ValueError(f"k_cache must have {'page_size' if paged else 'max_len'} >= 1 and Hkv >= 1, got shape "
                         f"{tuple(k_cache.shape)}")
    if paged and slots == 0:
        raise ValueError("k_cache must hold at least one page, got num_pages = 0")
    return slots, rows, num_kv_heads


def _check_block_table(block_table, batch: int, device: torch.device) -> torch.Tensor:
    """(B, max_pages) int32 / int64 -> an int64 contiguous copy (its values: _check_values)."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a (B, max_pages) int32 tensor or None, got {type(block_table).__name__}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_table must be an int32 or int64 tensor, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise ValueError(f"block_table must have shape (B, max_pages) = ({batch}, >= 1), got "
                         f"{tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on q's device {device}, got {block_table.device}")
    return block_table.to(torch.int64).contiguous()


def _check_new_kv(k_new, v_new, shape: tuple, q: torch.Tensor):
    """(k_new, v_new) checked against shape (B, Nq, Hkv, D) and q's dtype and device, or None."""
    if k_new is None and v_new is None:
        return None
    if k_new is None or v_new is None:
        raise ValueError("k_new and v_new must be given together (or both None)")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {_LAYOUTS[name]} or None, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {_LAYOUTS[name]} = {shape}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's dtype {q.dtype} and device {q.device}, got {t.dtype} on "
                             f"{t.device}")
    return k_new, v_new


def _check_seqlens(cache_seqlens, batch: int, device: torch.device) -> torch.Tensor:
    """int or (B,) integer tensor -> a (B,) int64 copy on device (its values: _check_values)."""
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(f"cache_seqlens must be an int or a (B,) integer tensor, got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dtype.is_floating_point or cache_seqlens.dtype.is_complex or \
                cache_seqlens.dtype == torch.bool:
            raise TypeError(f"cache_seqlens must be an integer tensor, got {cache_seqlens.dtype}")
        if tuple(cache_seqlens.shape) not in ((batch,), ()):
            raise ValueError(f"cache_seqlens must have shape (B,) = ({batch},), got {tuple(cache_seqlens.shape)}")
        lengths = cache_seqlens.to(device=device, dtype=torch.int64, copy=True).expand(batch).contiguous()
    else:
        lengths = torch.full((batch,), cache_seqlens, dtype=torch.int64, device=device)
    return lengths


def _check_values(lengths: torch.Tensor, pages: Optional[torch.Tensor], seq_q: int, capacity: int,
                  num_pages: int) -> int:
    """Every length in [0, capacity - Nq] and every page index in [0, num_pages), read back to the host in one
    transfer (one synchronization on CUDA); returns the largest length."""
    ranges = torch.stack(torch.aminmax(lengths) + (torch.aminmax(pages) if pages is not None else ())).tolist()
    lowest, highest = ranges[:2]
    if lowest < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {lowest}")
    if highest + seq_q > capacity:
        raise ValueError(f"cache too short: cache_seqlens {highest} + Nq {seq_q} new tokens > {capacity} rows the "
                         f"cache holds for a row (max_len, or max_pages * page_size)")
    if pages is not None and (ranges[2] < 0 or ranges[3] >= num_pages):
        bad = ranges[2] if ranges[2] < 0 else ranges[3]
        raise ValueError(f"block_table entries must be page indices in [0, num_pages={num_pages}), got {bad}")
    return highest


def _check_paged_dtype(chosen, q: torch.Tensor, paged: bool) -> None:
    """Paged caches in fp64 run on the reference only."""
    if chosen is not None and paged and q.dtype == torch.float64:
        raise TypeError("paged caches take float16, bfloat16 or float32 on the kernel backends, got float64 (use "
                        "backend='reference')")


def _write_new_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                  lengths: torch.Tensor, pages: Optional[torch.Tensor]) -> None:
    """k_new / v_new (B, Nq, Hkv, D) into cache rows lengths[b] + i of each row b, in place."""
    batch, seq_q = k_new.shape[:2]
    rows = lengths[:, None] + torch.arange(seq_q, device=lengths.device)  # (B, Nq) logical cache rows
    if pages is None:
        index = (torch.arange(batch, device=rows.device)[:, None].expand(batch, seq_q), rows)
    else:
        page_size = k_cache.shape[1]
        index = (pages.gather(1, rows // page_size), rows % page_size)
    k_cache.index_put_(index, k_new)
    v_cache.index_put_(index, v_new)


def _kernel_view(cache: torch.Tensor, paged: bool) -> torch.Tensor:
    """The kernels' view of a cache: (B, Hkv, max_len, D), or pages as (1, Hkv, num_pages * page_size, D)."""
    if not paged:
        return cache.transpose(1, 2)
    num_pages, page_size, num_kv_heads, head_dim = cache.shape
    row_stride = cache.stride(1) if page_size > 1 else cache.stride(0)
    if num_pages > 1 and cache.stride(0) != page_size * row_stride:
        raise ValueError("k_cache / v_cache pages must hold their rows consecutively (stride(0) == page_size * "
                         f"stride(1)), got strides {cache.stride()}")
    rows = cache.as_strided((num_pages * page_size, num_kv_heads, head_dim),
                            (row_stride, cache.stride(2), cache.stride(3)), cache.storage_offset())
    return rows.transpose(0, 1).unsqueeze(0)
