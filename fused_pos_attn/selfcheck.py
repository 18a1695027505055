"""Correctness self-check: each kernel backend usable here against the fp64 dense reference.

One small causal GQA call per (backend, scheme): q (2, 4, 19, 64), k and v (2, 2, 37, 64). D = 64 because the
CUDA C++ kernels take D in {64, 128}. The partial RoPE and relative parameters are those of
tests/test_attention_backends.py's SCHEMES, so on a GPU the Triton kernels this check compiles are the ones
`pytest -m gpu` compiled before it (`make gpu-check` runs the tests first; Triton caches kernels on disk).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends
from .attention import fused_attention
from .positions import RelativeBias, RoPE
from .rope_scaling import YaRN

Q_SHAPE, KV_SHAPE = (2, 4, 19, 64), (2, 2, 37, 64)
SHAPE_NOTE = f"causal, GQA {Q_SHAPE[1]}:{KV_SHAPE[1]}, Nq={Q_SHAPE[2]}, Nk={KV_SHAPE[2]}, D={Q_SHAPE[3]}"
SCHEMES = {"none": "none", "alibi": "alibi", "rope": "rope",
           "rope (interleaved, partial)": RoPE(rotary_dim=12, interleaved=True),
           "rope (YaRN x4)": RoPE(scaling=YaRN(4.0, original_max_len=16)),
           "relative (T5)": RelativeBias(torch.randn(Q_SHAPE[1], 16, generator=torch.Generator().manual_seed(0)),
                                         max_distance=12)}


@dataclass
class CheckResult:
    backend: str
    scheme: str
    dtype: torch.dtype
    out_error: float
    grad_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return max(self.out_error, self.grad_error) <= self.tolerance


def kernel_backends(device: str) -> list[str]:
    """Kernel backends that can run fp16 (B, H, N, 64) tensors of `device`, of "triton" (CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1), "cuda" (when the extension was built with the CUDA C++ kernels) and
    "cpu" (the native kernels): those backends.select accepts."""
    probe = torch.zeros(1, 1, 1, Q_SHAPE[3], dtype=torch.float16, device=device)
    usable = []
    for name in ("triton", "cuda", "cpu"):
        try:
            backends.select(name, probe)
        except (ValueError, TypeError, ImportError):
            continue
        usable.append(name)
    return usable


def check_one(backend: str, pos, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[float, float]:
    """Max |error| of out and of (dq, dk, dv) against the fp64 reference on the causal GQA call of Q_SHAPE,
    KV_SHAPE, relative to the reference's max magnitude."""
    gen = torch.Generator().manual_seed(seed)
    shapes = (Q_SHAPE, KV_SHAPE, KV_SHAPE)
    inputs = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grad_out = torch.randn(shapes[0], generator=gen).to(device)
    results = []
    for name, cast in ((backend, dtype), ("reference", torch.float64)):
        leaves = [t.detach().to(cast).requires_grad_() for t in inputs]
        out = fused_attention(*leaves, pos, causal=True, backend=name)
        out.backward(grad_out.to(cast))
        results.append([out] + [t.grad for t in leaves])
    fused, ref = results
    return relative_error(fused[0], ref[0]), max(relative_error(a, b) for a, b in zip(fused[1:], ref[1:]))


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|."""
    return ((value.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


def run_self_check(device: str) -> list[CheckResult]:
    """Every (kernel backend, scheme) on this device; fp16 on CUDA, fp32 on CPU."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    tolerance = 2e-2 if dtype == torch.float16 else 1e-4
    return [CheckResult(backend, name, dtype, *check_one(backend, pos, device, dtype), tolerance)
            for backend in kernel_backends(device) for name, pos in SCHEMES.items()]


def format_results(results: list[CheckResult]) -> str:
    lines = ["| backend | scheme | dtype | rel. error out | rel. error grads | tolerance | result |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.backend} | {r.scheme} | {str(r.dtype).replace('torch.', '')} | {r.out_error:.2e} | "
              f"{r.grad_error:.2e} | {r.tolerance:.0e} | {'PASS' if r.passed else 'FAIL'} |" for r in results]
    return "\n".join(lines)
