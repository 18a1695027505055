"""Backend selection. A kernel backend is a module with
`forward(q, k, v, spec) -> (out, lse)` and
`backward(grad_out, grad_lse, q, k, v, out, lse, spec, rel_grad) -> (dq, dk, dv, d_rel_table)`:
grad_lse is None or the (B, Hq, Nq) gradient of lse; rel_grad says whether the relative scheme's table
needs its gradient d_rel_table (Hq, num_buckets), else None is returned for it.
The dense reference is not a kernel backend: `select` returns None for it. Each kernel backend module names
itself in NAME, the name fused_pos_attn.ops' custom ops take (`by_name` maps it back).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

import torch

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "reference")
KERNEL_BACKENDS = ("triton", "cuda", "cpu")  # module <name>_backend of this package, NAME == name


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def by_name(name: str) -> ModuleType:
    """The kernel backend module named name (one of KERNEL_BACKENDS)."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}_backend")


def select(name: str, q: torch.Tensor) -> Optional[ModuleType]:
    """Backend module for tensors like q, or None for the dense reference.

    auto: Triton for CUDA tensors, the native C++ kernels for CPU tensors. The CUDA C++ kernels, which no
    GPU run has validated yet, are picked by auto only where Triton is not installed and they support the
    call; backend="cuda" selects them explicitly.
    """
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "reference":
        return None
    if name == "auto" and q.is_cuda:
        return _auto_for_cuda(q)
    if name == "triton":
        return _triton_for(q)
    if name == "cuda":
        return _cuda_for(q)
    return _cpu_for(q)


def _auto_for_cuda(q: torch.Tensor) -> ModuleType:
    """Triton when it is installed; else the CUDA C++ kernels when built and supporting q; else a clear error."""
    try:
        import triton  # noqa: F401
    except ImportError:
        from . import cuda_backend
        if cuda_backend.built_with_cuda() and q.dtype in cuda_backend.DTYPES \
                and q.shape[-1] in cuda_backend.HEAD_DIMS:
            return cuda_backend
        raise ImportError("backend='auto' on CUDA tensors needs Triton, which is not installed: "
                          "pip install 'triton>=3.6' (or install fused_pos_attn[triton]). The CUDA C++ kernels "
                          f"are {'built' if cuda_backend.built_with_cuda() else 'not built'} and cover float16 / "
                          f"bfloat16 with head dim in {cuda_backend.HEAD_DIMS} only; got {q.dtype}, head dim "
                          f"{q.shape[-1]}") from None
    return _triton_for(q)


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
