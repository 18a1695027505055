"""Native CPU backend: the C++ kernels of csrc/cpu (tiled FlashAttention-2 forward and backward), called
through torch.ops.fused_pos_attn (native.py, which loads the extension after checking the CPU's features).

Dense and packed (varlen) specs alike: a packed call passes q (1, Hq, total_q, D), k / v (1, Hkv, total_k, D) and
the spec's cu_seqlens; its work is split into (sequence, head, query block) tasks handed to the threads one at a
time, so sequences of different lengths keep the threads balanced."""
from __future__ import annotations

from typing import Optional

import torch

from ..spec import AttentionSpec
from . import native

NAME = "cpu"  # the backend argument of fused_pos_attn.ops' custom ops


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Nq, D) like q, lse (B, Hq, Nq) fp32 (fp64 for fp64 inputs); packed: lse (1, Hq, total_q)."""
    return native.forward(q, k, v, spec)


def backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, spec: AttentionSpec,
             rel_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """dq, dk, dv for grad_out (B, Hq, Nq, D) and grad_lse (B, Hq, Nq) or None; d_rel_table (Hq, num_buckets)
    fp32 when the scheme is relative and rel_grad, else None."""
    return native.backward(grad_out, grad_lse, q, k, v, out, lse, spec, rel_grad)
