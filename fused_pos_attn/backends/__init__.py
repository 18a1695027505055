"""Backend selection. A kernel backend is a module with
`forward(q, k, v, spec) -> (out, lse)` and `backward(grad_out, q, k, v, out, lse, spec) -> (dq, dk, dv)`.
The dense reference is not a kernel backend: `select` returns None for it.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "reference")


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select(name: str, q: torch.Tensor) -> Optional[ModuleType]:
    """Backend module for tensors like q, or None for the dense reference.

    auto: Triton for CUDA tensors, the native C++ kernels for CPU tensors (never the CUDA C++ kernels,
    which no GPU run has validated yet; backend="cuda" selects them explicitly).
    """
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "reference":
        return None
    if name == "triton" or (name == "auto" and q.is_cuda):
        return _triton_for(q)
    if name == "cuda":
        return _cuda_for(q)
    return _cpu_for(q)


def _triton_for(q: torch.Tensor) -> ModuleType:
    if q.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32; got float64 "
                        "(use backend='cpu' or 'reference' for float64)")
    if not q.is_cuda and not triton_interpreter_enabled():
        raise ValueError(f"backend='triton' needs CUDA tensors (got device {q.device}), or "
                         "TRITON_INTERPRET=1 set before import to run the kernels on CPU tensors")
    from . import triton_backend
    return triton_backend


def _cuda_for(q: torch.Tensor) -> ModuleType:
    from . import cuda_backend
    if not cuda_backend.built_with_cuda():
        raise ValueError("backend='cuda' (the CUDA C++ kernels) is not built in this installation of fused_pos_attn "
                         "(it needs a CUDA toolkit and a CUDA build of torch at install time); use backend='triton' "
                         "or 'auto' for CUDA tensors")
    if not q.is_cuda:
        raise ValueError(f"backend='cuda' needs CUDA tensors, got device {q.device}")
    if q.dtype not in cuda_backend.DTYPES:
        raise TypeError(f"backend='cuda' supports float16 and bfloat16; got {q.dtype} (use backend='triton' for "
                        "float32)")
    if q.shape[-1] not in cuda_backend.HEAD_DIMS:
        raise ValueError(f"backend='cuda' supports head dim D in {cuda_backend.HEAD_DIMS}, got head dim "
                         f"D={q.shape[-1]} (use backend='triton' for other head dims)")
    return cuda_backend


def _cpu_for(q: torch.Tensor) -> ModuleType:
    if q.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got device {q.device}")
    from . import cpu_backend
    return cpu_backend
