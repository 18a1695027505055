"""Triton backend: maps an AttentionSpec onto the Triton launchers."""
from __future__ import annotations

import torch

from fused_pos_attn.triton_kernels import KernelPosition, attention_backward, attention_forward

from ..spec import AttentionSpec


def _kernel_position(spec: AttentionSpec) -> KernelPosition:
    p = spec.position
    rel_bias = p.rel_bias.detach() if p.rel_bias is not None else None
    return KernelPosition(kind=p.kind, slopes=p.slopes, inv_freq=p.inv_freq, rotary_dim=p.rotary_dim,
                          interleaved=p.interleaved, attention_factor=p.attention_factor, rel_bias=rel_bias,
                          max_distance=p.max_distance)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Nq, D) like q, lse (B, Hq, Nq) fp32."""
    return attention_forward(q, k, v, spec.q_offset, spec.k_offset, _kernel_position(spec), spec.scale,
                             spec.causal, spec.window)


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, spec: AttentionSpec) -> tuple:
    """dq, dk, dv for grad_out (B, Hq, Nq, D), and d_rel_bias (Hq, 2, max_distance + 1) or None."""
    return attention_backward(grad_out, q, k, v, out, lse, spec.q_offset, spec.k_offset,
                              _kernel_position(spec), spec.scale, spec.causal, spec.window)
