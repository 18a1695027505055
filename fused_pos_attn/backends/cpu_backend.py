"""Native CPU backend: torch.ops.fused_pos_attn.attention_forward / attention_backward from the C++
extension (csrc/cpu/), registered for the CPU dispatch key. The same ops carry the CUDA C++ kernels for
CUDA tensors when built (cuda_backend.py calls this module with CUDA tensors); `_op_args` is the one place
their position arguments are built."""
from __future__ import annotations

import torch

import fused_pos_attn._C  # noqa: F401  loads the library, registering torch.ops.fused_pos_attn.*

from ..spec import AttentionSpec

POS_CODES = {"none": 0, "alibi": 1, "rope": 2, "relative": 3}


def _op_args(spec: AttentionSpec, q: torch.Tensor) -> tuple:
    """The position / masking arguments of both ops (FPA_POSITION_SCHEMA in csrc/ops.cpp)."""
    p = spec.position
    batch, heads = q.shape[0], q.shape[1]
    slopes = p.slopes if p.slopes is not None else torch.zeros(1, 1, device=q.device).expand(batch, heads)
    inv_freq = p.inv_freq if p.inv_freq is not None else torch.zeros(0, device=q.device)
    rel_bias = p.rel_bias.detach() if p.rel_bias is not None else torch.zeros(0, 2, 1, device=q.device)
    return (spec.q_offset, spec.k_offset, POS_CODES[p.kind], slopes, inv_freq, p.rotary_dim, p.interleaved,
            p.attention_factor, rel_bias, p.max_distance, spec.causal, spec.window or 0, spec.scale)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Nq, D) like q, lse (B, Hq, Nq) fp32 (fp64 for fp64 inputs)."""
    return torch.ops.fused_pos_attn.attention_forward(q, k, v, *_op_args(spec, q))


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, spec: AttentionSpec) -> tuple:
    """dq, dk, dv for grad_out (B, Hq, Nq, D), and d_rel_bias (Hq, 2, max_distance + 1) or None."""
    dq, dk, dv, d_rel_bias = torch.ops.fused_pos_attn.attention_backward(grad_out, q, k, v, out, lse,
                                                                         *_op_args(spec, q))
    return dq, dk, dv, (d_rel_bias if spec.position.kind == "relative" else None)
