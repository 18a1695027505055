"""CUDA C++ backend: the kernels of csrc/cuda (FlashAttention-2 forward / backward on mma.sync tensor cores).

It calls the same torch.ops.fused_pos_attn ops as the CPU backend, through native.py (one builder of their
arguments); for CUDA tensors the dispatcher runs the CUDA implementations registered by csrc/ops.cpp.
Supported: float16 / bfloat16, head dim in HEAD_DIMS, sm_80 or newer (`backends.select` checks the first two
before any kernel runs).

The kernels read q, k, v (and grad_out, out in the backward) with any B / H / N strides, e.g. a (B, N, H, D)
tensor viewed with transpose(1, 2), but need unit stride along the head dim: a tensor whose last stride is
not 1 is copied with .contiguous() first (only then).

Packed (varlen) specs: q (1, Hq, total_q, D), k / v (1, Hkv, total_k, D) with the spec's cu_seqlens; grids span
the longest sequence (max_seqlen_q / max_seqlen_k) and blocks past a sequence's rows exit. cu_seqlens are not
checked on the device (that would synchronize): the kernels clamp every sequence's rows into the tensors and to at
most max_seqlen rows, so no cu_seqlens reads or writes outside them. dq is 0 on rows no sequence owns.

Decode shapes (at most 16 query rows per batch / sequence) run split-KV (csrc/cuda/launch.h decode_plan: GQA heads
sharing a block, keys split over the SMs, partials merged by a second kernel). KV-cache specs (seqused_k, paged
caches: fused_attention_with_kvcache) are forward only, as on every backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..spec import AttentionSpec
from . import native

NAME = "cuda"  # the backend argument of fused_pos_attn.ops' custom ops

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
built_with_cuda = native.built_with_cuda


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Nq, D) like q, lse (B, Hq, Nq) fp32."""
    return native.forward(*(_unit_last_stride(t) for t in (q, k, v)), spec)


def backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, spec: AttentionSpec,
             rel_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """dq, dk, dv for grad_out (B, Hq, Nq, D) and grad_lse (B, Hq, Nq) fp32 or None; d_rel_table
    (Hq, num_buckets) fp32 when the scheme is relative and rel_grad, else None."""
    grad_out, q, k, v, out = (_unit_last_stride(t) for t in (grad_out, q, k, v, out))
    return native.backward(grad_out, grad_lse, q, k, v, out, lse, spec, rel_grad)
