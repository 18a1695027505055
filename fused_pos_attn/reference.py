"""The one dense oracle: builds the bias and rotates q/k explicitly, exactly as POSITIONS.md says.

Tests and benchmarks compare every backend with `attention_reference`; the building blocks
(`apply_rope`, `position_bias`, `visibility`) are also what the "dense bias + SDPA" benchmark provider
uses. Memory is O(Nq x Nk): use it for checking, not for speed.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch

from .positions import ALIBI_KIND, RELATIVE_KIND, ROPE_KIND, ResolvedPosition, t5_bucket
from .spec import AttentionSpec


def position_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype position math (RoPE cos/sin, ALiBi distances, relative biases) runs in for scores of dtype:
    fp64 for fp64, else fp32 (half-precision callers get their positions exact, then one cast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def absolute_positions(offset: torch.Tensor, length: int) -> torch.Tensor:
    """(B,) int64 offsets -> (B, length) int64 absolute positions offset[b] + i."""
    return offset[:, None] + torch.arange(length, device=offset.device, dtype=torch.int64)[None, :]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, position: ResolvedPosition) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x (B, H, N, D) at positions (B, N); returns a new tensor.

    As Hugging Face transformers does: the angle pos * inv_freq is formed in fp32 (as the kernels form it),
    cos and sin (times the attention factor) are computed in position_dtype(x.dtype) and cast to x's dtype,
    and the rotation runs in x's dtype. So a half-precision x gets exact positions (an fp16 angle would be
    inf past 65504, a bf16 one rounded to 4 radians near position 1000) and only x's own rounding.
    """
    r = position.rotary_dim
    angle = positions.to(torch.float32)[:, None, :, None] * position.inv_freq.to(positions.device)  # (B,1,N,r/2)
    angle = angle.to(position_dtype(x.dtype))
    cos = (torch.cos(angle) * position.attention_factor).to(x.dtype)
    sin = (torch.sin(angle) * position.attention_factor).to(x.dtype)
    rot, passthrough = x[..., :r], x[..., r:]
    if position.interleaved:
        even, odd = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    else:
        first, second = rot[..., : r // 2], rot[..., r // 2:]
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return torch.cat((rotated, passthrough), dim=-1)


def visibility(pq: torch.Tensor, pk: torch.Tensor, causal: bool, window: Optional[int]) -> torch.Tensor:
    """(B, Nq), (B, Nk) positions -> (B, 1, Nq, Nk) bool: key j visible to query i."""
    rel = pq[:, None, :, None] - pk[:, None, None, :]
    visible = torch.ones_like(rel, dtype=torch.bool)
    if causal:
        visible &= rel >= 0
    if window is not None:
        visible &= rel < window
    return visible


def position_bias(pq: torch.Tensor, pk: torch.Tensor, position: ResolvedPosition,
                  dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Additive score bias (B, Hq, Nq, Nk) in dtype, or None for schemes without one.

    Built in position_dtype(dtype) and cast to dtype at the end, as Hugging Face transformers builds ALiBi
    and T5 biases: distances are exact integers whatever dtype the scores have. Relative: the T5 bucket of
    every (query, key) pair from the formula itself, then the table lookup; differentiable in the table.
    """
    exact = position_dtype(dtype)
    if position.kind == ALIBI_KIND:
        distance = (pq[:, None, :, None] - pk[:, None, None, :]).abs().to(exact)
        return (-position.slopes.to(exact)[:, :, None, None] * distance).to(dtype)
    if position.kind == RELATIVE_KIND:
        buckets = t5_bucket(pk[:, None, :] - pq[:, :, None], position.bidirectional, position.rel_table.shape[1],
                            position.max_distance)  # (B, Nq, Nk)
        return position.rel_table.to(exact)[:, buckets].transpose(0, 1).to(dtype)
    return None


def sequence_spec(spec: AttentionSpec, s: int, position: Optional[ResolvedPosition] = None) -> AttentionSpec:
    """The dense spec of packed sequence s alone: its offsets and its row of ALiBi slopes (of position, default
    spec.position)."""
    position = spec.position if position is None else position
    if position.slopes is not None:
        position = dataclasses.replace(position, slopes=position.slopes[s:s + 1])
    return dataclasses.replace(spec, q_offset=spec.q_offset[s:s + 1], k_offset=spec.k_offset[s:s + 1],
                               position=position, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                               max_seqlen_k=0)


def packed_sequences(spec: AttentionSpec) -> Iterator[tuple[slice, slice, AttentionSpec]]:
    """For a packed spec: per sequence s, (its query rows, its key rows, sequence_spec(spec, s)), read from
    cu_seqlens on the host."""
    starts_q, starts_k = spec.cu_seqlens_q.tolist(), spec.cu_seqlens_k.tolist()
    for s in range(spec.num_sequences):
        yield slice(starts_q[s], starts_q[s + 1]), slice(starts_k[s], starts_k[s + 1]), sequence_spec(spec, s)


def unpaged(t: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """A paged spec's k or v (1, Hkv, num_pages * page_size, D) as the dense (B, Hkv, max_pages * page_size, D)
    tensor its block_table addresses (page ids assumed in range, as fused_attention_with_kvcache checks)."""
    pages = spec.block_table.to(t.device, torch.int64)  # (B, max_pages)
    rows = (pages[:, :, None] * spec.page_size + torch.arange(spec.page_size, device=t.device)).flatten(1)
    return t[0][:, rows].transpose(0, 1)  # (Hkv, B, L, D) -> (B, Hkv, L, D)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                        upcast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with the position scheme of `spec`.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); or, for a packed spec (spec.varlen), q (1, Hq, total_q, D) and
    k, v (1, Hkv, total_k, D) with each sequence attended alone (a loop: this is the oracle); for a paged spec,
    k and v are its pages, gathered into the dense layout first. Computes in fp64 when upcast, else in q's dtype, with the
    position math, the scores' scale-and-bias and the softmax in position_dtype (fp32 for half-precision
    inputs), as the kernels do: only the rotation, the two matmuls and the probabilities fed to the second
    one round to the compute dtype. (Hugging Face's eager attention also runs the softmax in fp32, but adds
    the bias in the input dtype, which rounds an ALiBi score of -750 to a multiple of 4 in bf16.)
    Returns out (B, Hq, Nq, D) in the compute dtype and lse (B, Hq, Nq) in position_dtype. Rows with no
    visible key give out = 0 and lse = -inf. Differentiable in q, k, v (and a relative table) by autograd.
    """
    if spec.varlen:
        parts = [attention_reference(q[:, :, rows_q], k[:, :, rows_k], v[:, :, rows_k], alone, upcast)
                 for rows_q, rows_k, alone in packed_sequences(spec)]
        return torch.cat([out for out, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)
    if spec.paged:
        k, v = unpaged(k, spec), unpaged(v, spec)
    dtype = torch.float64 if upcast else q.dtype
    exact = position_dtype(dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    pq = absolute_positions(spec.q_offset, q.shape[2])
    pk = absolute_positions(spec.k_offset, k.shape[2])
    if spec.position.kind == ROPE_KIND:
        q, k = apply_rope(q, pq, spec.position), apply_rope(k, pk, spec.position)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    scores = torch.matmul(q, k.transpose(-1, -2)).to(exact) * spec.scale  # (B, Hq, Nq, Nk)
    bias = position_bias(pq, pk, spec.position, exact)
    if bias is not None:
        scores = scores + bias
    visible = visibility(pq, pk, spec.causal, spec.window)
    if spec.seqused_k is not None:  # batch b's keys past seqused_k[b] are not part of the call
        used = torch.arange(k.shape[2], device=k.device) < spec.seqused_k.to(k.device)[:, None]  # (B, Nk)
        visible = visible & used[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    # Rows with no visible key: softmax over zeros instead of all -inf, so neither the values nor the
    # gradients see inf - inf; their probabilities are then zeroed and their LSE set to -inf.
    has_key = visible.any(dim=-1, keepdim=True)
    scores = torch.where(has_key, scores, torch.zeros_like(scores))
    lse = torch.logsumexp(scores, dim=-1)
    probs = (torch.exp(scores - lse[..., None]) * has_key).to(dtype)
    lse = lse.masked_fill(~has_key[..., 0], float("-inf"))
    return torch.matmul(probs, v), lse
