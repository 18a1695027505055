"""CUDA C++ backend: the kernels of csrc/cuda (FlashAttention-2 forward / backward on mma.sync tensor cores).

It calls the same torch.ops.fused_pos_attn ops as the CPU backend, with the same arguments (built in one
place, cpu_backend._op_args); for CUDA tensors the dispatcher runs the CUDA implementations registered by
csrc/ops.cpp. Supported: float16 / bfloat16, head dim in HEAD_DIMS, sm_80 or newer (`backends.select`
checks the first two before any kernel runs).

The kernels read q, k, v (and grad_out, out in the backward) with any B / H / N strides, e.g. a (B, N, H, D)
tensor viewed with transpose(1, 2), but need unit stride along the head dim: a tensor whose last stride is
not 1 is copied with .contiguous() first (only then).
"""
from __future__ import annotations

import torch

from ..spec import AttentionSpec
from . import cpu_backend

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)


def built_with_cuda() -> bool:
    """True when the extension was compiled with the CUDA kernels (a CUDA toolkit and a CUDA build of torch
    at install time)."""
    return torch.ops.fused_pos_attn.build_info() == "cpu+cuda"


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Nq, D) like q, lse (B, Hq, Nq) fp32."""
    return cpu_backend.forward(*(_unit_last_stride(t) for t in (q, k, v)), spec)


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, spec: AttentionSpec) -> tuple:
    """dq, dk, dv for grad_out (B, Hq, Nq, D), and d_rel_bias (Hq, 2, max_distance + 1) or None."""
    grad_out, q, k, v, out = (_unit_last_stride(t) for t in (grad_out, q, k, v, out))
    return cpu_backend.backward(grad_out, q, k, v, out, lse, spec)
