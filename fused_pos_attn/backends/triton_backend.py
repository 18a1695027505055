"""Triton backend: maps an AttentionSpec onto the Triton launchers.

Both layouts of AttentionSpec reach the same kernels: dense (B, H, N, D) tensors, and packed (varlen) ones,
(1, H, total, D) views with spec.cu_seqlens_q / cu_seqlens_k, which the kernels take as their VARLEN flag."""
from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch

from fused_pos_attn.triton_kernels import (MAX_GRAD_BUCKETS, KernelCall, KernelPosition, attention_backward,
                                           attention_forward)

from ..spec import AttentionSpec

NAME = "triton"  # the backend argument of fused_pos_attn.ops' custom ops


def _kernel_call(spec: AttentionSpec) -> KernelCall:
    """The launchers' view of spec: KernelCall's fields (the packed layout's cu_seqlens_* and max_seqlen_*
    included), read from spec's fields of the same names."""
    values = {f.name: getattr(spec, f.name) for f in fields(KernelCall) if f.name != "position"}
    return KernelCall(position=KernelPosition.of(spec.position), **values)


def _check_grad_buckets(spec: AttentionSpec) -> None:
    """The dK/dV kernel sums the table gradient per bucket in registers: at most MAX_GRAD_BUCKETS buckets."""
    num_buckets = spec.position.num_buckets
    if num_buckets > MAX_GRAD_BUCKETS:
        raise ValueError(f"RelativeBias table has num_buckets={num_buckets} columns; backend='triton' computes its "
                         f"gradient only for num_buckets <= {MAX_GRAD_BUCKETS} (use backend='cpu' or 'cuda', or "
                         f"a table that does not require grad)")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Nq, D) like q, lse (B, Hq, Nq) fp32; packed layout: out (1, Hq, total_q, D) like q, lse
    (1, Hq, total_q)."""
    return attention_forward(q, k, v, _kernel_call(spec))


def backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, spec: AttentionSpec,
             rel_grad: bool) -> tuple:
    """dq, dk, dv like q, k, v for grad_out (B, Hq, Nq, D) and grad_lse ((B, Hq, Nq) fp32 contiguous, or None),
    and d_rel_table (Hq, num_buckets) fp32 when rel_grad (relative scheme), else None."""
    if rel_grad:
        _check_grad_buckets(spec)
    return attention_backward(grad_out, grad_lse, q, k, v, out, lse, _kernel_call(spec), rel_grad)
