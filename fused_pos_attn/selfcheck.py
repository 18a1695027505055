"""Correctness self-check: each kernel backend usable here against the fp64 dense reference."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import fused_attention
from .backends import triton_interpreter_enabled
from .positions import RelativeBias, RoPE
from .rope_scaling import YaRN

SCHEMES = {"none": "none", "alibi": "alibi", "rope": "rope",
           "rope (interleaved, partial)": RoPE(rotary_dim=8, interleaved=True),
           "rope (YaRN x4)": RoPE(scaling=YaRN(4.0, original_max_len=16)),
           "relative (T5)": RelativeBias(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)))}


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
    """Kernel backends that can run on tensors of this device."""
    backends = ["cpu"] if device == "cpu" else []
    try:
        import triton  # noqa: F401
    except ImportError:
        return backends
    return backends + (["triton"] if device == "cuda" or triton_interpreter_enabled() else [])


def check_one(backend: str, pos, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[float, float]:
    """Max |error| of out and of (dq, dk, dv) against the fp64 reference on a small causal GQA call with
    Nq != Nk, relative to the reference's max magnitude."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((2, 4, 19, 32), (2, 2, 37, 32), (2, 2, 37, 32))
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
