"""DESIGN.md's tolerance rule. A backend's result `out` passes against the fp64 reference `ref64` when

    max|out - ref64| <= min(factor * max|same_dtype - ref64| + FLOOR * scale,  CAP[dtype] * scale)

- same_dtype: the reference run in the backend's compute dtype `dtype` (its inputs'). It computes positions
  (RoPE cos/sin, ALiBi distances, relative biases) and the softmax in fp32 and rounds only its matmuls to
  dtype (fused_pos_attn/reference.py), so its error is the rounding a kernel has too, never rounded
  positions, which a kernel must not have.
- factor: 2 for what a forward returns (out, lse), 3 for gradients.
- scale: max(1, max |ref64|) over the finite entries.
- FLOOR: ROUNDING_FLOOR of out's dtype for forward results (an fp32 LSE of half inputs is kept in fp32 by
  every backend), of the compute dtype for gradients (a relative table's gradient, returned in fp32, sums
  terms of delta = rowsum(dO * O) over the half-precision output).
- CAP: per compute dtype, what correct kernels never come near, so a loose same-dtype reference cannot
  widen the bound past it. Largest max|out - ref64| / scale of correct kernels, measured over
  tests/test_attention_backends.py's case matrix run at every dtype (schemes, windows, GQA/MQA, Nq != Nk,
  D 16-256, strided layouts, per-batch offsets up to 3e9, far positions near 4000 and 3000 from the keys,
  N up to 1025 x 1025 and 255 x 2048), test_inference_positions.py, on the native CPU kernels and the
  Triton 3.9 interpreter (which runs fp16 and fp32 only); no GPU was available:

      dtype     out        lse        dq/dk/dv   relative-table grad   CAP
      bf16      3.5e-3     1.4e-7     5.7e-3     2.0e-2                5e-2
      fp16      6.4e-4     2.1e-4     1.5e-3     1.3e-3                1e-2
      fp32      4.6e-7     1.9e-7     8.2e-7     4.9e-6                1e-4
      fp64      1.0e-15    2.5e-16    1.0e-15    -                     1e-9

  Left out above: the table gradient of a bucket that holds every key (queries 3000 after the keys) is a
  sum cancelling to 0, where kernels reach 2.6e-2 (bf16) / 3.6e-3 (fp16) at scale 1, beyond the rule; no
  test has such a case.
  Each cap is 2.5x (bf16, the table gradient at 255 x 2048) to 20x (fp32) the largest error above, at
  least 3x the floor, and below what a position off by one costs (0.2-0.9 of the output scale for RoPE,
  ALiBi or T5 buckets: tests/test_low_precision_positions.py).
"""
from typing import Optional

import torch

ROUNDING_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
CAP = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}
GRADIENT_FACTOR = 3.0


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64, treating equal infinities (LSE of empty rows) as equal."""
    a, b = a.double(), b.double()
    same_inf = torch.isinf(a) & (a == b)
    return torch.where(same_inf, 0.0, (a - b).abs()).max().item() if a.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor, factor: float,
                              what: str, dtype: Optional[torch.dtype] = None) -> None:
    """Assert the rule above for `out` (any shape, like ref64). factor: 2.0 for out and lse, 3.0 for
    gradients. dtype: the backend's compute dtype (its inputs'), default out.dtype; pass it for results
    returned in another dtype (the fp32 LSE and relative-table gradient of half-precision inputs)."""
    dtype = out.dtype if dtype is None else dtype
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    finite = ref64[torch.isfinite(ref64)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    floor = ROUNDING_FLOOR[dtype if factor >= GRADIENT_FACTOR else out.dtype]
    bound = min(factor * max_err(same_dtype, ref64) + floor * scale, CAP[dtype] * scale)
    err = max_err(out, ref64)
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} ({out.dtype}, computed in {dtype})"
