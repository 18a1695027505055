"""Backend selection. A kernel backend is a module with
`forward(q, k, v, spec) -> (out, lse)` and `backward(grad_out, q, k, v, out, lse, spec) -> (dq, dk, dv)`.
The dense reference is not a kernel backend: `select` returns None for it.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Optional

import torch

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "reference")
_warned_cpu_fallback = False


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select(name: str, q: torch.Tensor) -> Optional[ModuleType]:
    """Backend module for tensors like q, or None for the dense reference."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "reference":
        return None
    if name == "triton":
        return _triton_for(q)
    if name in ("cuda", "cpu"):
        raise ValueError(f"backend={name!r} is not built in this version of fused_pos_attn; "
                         "use backend='triton' or 'reference'")
    if q.is_cuda:
        return _triton_for(q)
    _warn_cpu_fallback()
    return None


def _triton_for(q: torch.Tensor) -> ModuleType:
    if q.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32; got float64 "
                        "(use backend='reference' for float64)")
    if not q.is_cuda and not triton_interpreter_enabled():
        raise ValueError(f"backend='triton' needs CUDA tensors (got device {q.device}), or "
                         "TRITON_INTERPRET=1 set before import to run the kernels on CPU tensors")
    from . import triton_backend
    return triton_backend


def _warn_cpu_fallback() -> None:
    global _warned_cpu_fallback
    if not _warned_cpu_fallback:
        _warned_cpu_fallback = True
        warnings.warn("fused_pos_attn: no native CPU backend is built yet; backend='auto' on CPU tensors "
                      "runs the dense reference (O(Nq*Nk) memory)", RuntimeWarning, stacklevel=3)
