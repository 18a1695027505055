"""DESIGN.md's tolerance rule: a backend passes when
max|out - ref64| <= factor * max|out_same_dtype - ref64| + floor,
with ref64 the fp64 reference, out_same_dtype the reference run in the backend's dtype, factor 2 for
outputs and 3 for gradients, and floor a rounding floor of the dtype relative to the output scale."""
import torch

ROUNDING_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64, treating equal infinities (LSE of empty rows) as equal."""
    a, b = a.double(), b.double()
    same_inf = torch.isinf(a) & (a == b)
    return torch.where(same_inf, 0.0, (a - b).abs()).max().item() if a.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor,
                              factor: float, what: str) -> None:
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    finite = ref64[torch.isfinite(ref64)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    bound = factor * max_err(same_dtype, ref64) + ROUNDING_FLOOR[out.dtype] * scale
    err = max_err(out, ref64)
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} ({out.dtype})"
