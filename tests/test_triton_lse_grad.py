"""The Triton backend's gradient through the returned LSE: delta = rowsum(dO * O) - dLSE in the preprocess
kernel. Against the dense fp64 reference (DESIGN.md tolerance rule), with rows that see no key; grad_lse None
is exactly zero; the dLSE of a row with no visible key is ignored (even NaN or inf).

Runs under TRITON_INTERPRET=1 without CUDA (tests/conftest.py); shapes stay small.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from fused_pos_attn import RelativeBias, RoPE, fused_attention  # noqa: E402
from fused_pos_attn.backends import triton_backend  # noqa: E402
from fused_pos_attn.spec import AttentionSpec  # noqa: E402
from tolerance import assert_close_to_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(backend, dtype, pos="none", use_out=True, seed=0, **kwargs):
    """Gradients (dq, dk, dv[, d_table]) of sum(out * g) + sum(lse * g_lse) (without the first term if not
    use_out) through fused_attention; q (2, 4, 19, 16), k/v (2, 2, 27, 16)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 19, 16, generator=gen)
    k, v = (torch.randn(2, 2, 27, 16, generator=gen) for _ in range(2))
    g, g_lse = torch.randn(q.shape, generator=gen), torch.randn(2, 4, 19, generator=gen)
    device = "cpu" if backend == "reference" else DEVICE
    leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    if pos == "relative":
        pos = RelativeBias(torch.randn(4, 16, generator=gen).requires_grad_(), max_distance=12)
        leaves.append(pos.table)
    out, lse = fused_attention(*leaves[:3], pos, return_lse=True, backend=backend, **kwargs)
    loss = (lse * g_lse.to(device, lse.dtype)).sum()
    if use_out:
        loss = loss + (out * g.to(device, out.dtype)).sum()
    loss.backward()
    return [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]  # lse alone does not depend on v


CASES = {
    # Queries 0-4 of batch 0 sit before every key: rows with no visible key (LSE -inf).
    "causal_empty_rows": dict(causal=True, q_offset=torch.tensor([0, 8]), k_offset=torch.tensor([5, 0])),
    "window_rope": dict(pos=RoPE(), causal=True, window=6),
    "relative": dict(pos="relative"),
    "lse_only": dict(use_out=False, causal=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_lse_gradient_matches_reference(case, dtype):
    fused = _grads("triton", dtype, **CASES[case])
    ref64, same = _grads("reference", torch.float64, **CASES[case]), _grads("reference", dtype, **CASES[case])
    for name, got, want, same_dtype in zip(("dq", "dk", "dv", "d_table"), fused, ref64, same):
        assert_close_to_reference(got.cpu(), want, same_dtype, 3.0, f"{name} {case}", dtype)


def _backend_backward(grad_lse_of):
    """dq, dk, dv from the backend with grad_lse = grad_lse_of(lse) (None or a tensor), causal rows 0-4 of
    batch 0 without a visible key."""
    gen = torch.Generator().manual_seed(1)
    q, grad_out = (torch.randn(2, 2, 13, 16, generator=gen).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(2, 2, 21, 16, generator=gen).to(DEVICE) for _ in range(2))
    position = RoPE().resolve(2, 2, 16, 21, torch.device(DEVICE))
    spec = AttentionSpec(causal=True, scale=0.25, window=None, q_offset=torch.tensor([0, 9], device=DEVICE),
                         k_offset=torch.tensor([5, 0], device=DEVICE), position=position)
    out, lse = triton_backend.forward(q, k, v, spec)
    assert torch.isinf(lse[0, :, :5]).all() and torch.isfinite(lse[0, :, 5:]).all()
    return triton_backend.backward(grad_out, grad_lse_of(lse), q, k, v, out, lse, spec, False)[:3]


def test_no_grad_lse_is_zero_grad_lse():
    without = _backend_backward(lambda lse: None)
    zeros = _backend_backward(torch.zeros_like)
    assert all(torch.equal(a, b) for a, b in zip(without, zeros))


def test_grad_lse_of_rows_without_keys_is_ignored():
    """Those rows have P = 0 everywhere: any dLSE there, NaN and inf included, changes nothing."""
    def finite(lse):
        return torch.where(torch.isinf(lse), 0.0, torch.randn(lse.shape, generator=torch.Generator().manual_seed(2)))

    def poisoned(lse):
        return torch.where(torch.isinf(lse), torch.tensor([float("nan"), float("inf")]).repeat(7)[:13], finite(lse))

    clean, dirty = _backend_backward(finite), _backend_backward(poisoned)
    assert all(torch.isfinite(t).all() and torch.equal(a, t) for a, t in zip(clean, dirty))
