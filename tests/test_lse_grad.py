"""The returned LSE is differentiable on every backend (issue 9, section 2).

A gradient through lse enters the backward as delta = rowsum(dO * O) - dLSE. Each backend's gradients of
(out * w).sum() + (lse * u).sum() and of (lse * u).sum() alone, in q, k, v and a RelativeBias table, are
checked against the fp64 reference's autograd with DESIGN.md's tolerance rule. u is nonzero on rows with no
visible key as well: their LSE is -inf and P = 0, so their dLSE must change nothing and give no NaN.
The use case, merging two partial attentions by their LSE, is checked end to end.
"""
from typing import Callable, Optional

import pytest
import torch

from fused_pos_attn import ALiBi, RelativeBias, RoPE, fused_attention
from fused_pos_attn.backends import cuda_backend
from tolerance import assert_close_to_reference

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
HAS_CUDA = torch.cuda.is_available()

BACKENDS = [
    "reference",
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")),
    pytest.param("cuda", marks=[pytest.mark.gpu,  # the CUDA C++ kernels: float16 / bfloat16, D in (64, 128)
                                pytest.mark.skipif(not cuda_backend.built_with_cuda(),
                                                   reason="the CUDA C++ kernels are not built")]),
]

HEADS_Q, HEADS_KV = 4, 2


def relative_bias() -> RelativeBias:
    """A fresh leaf (Hq, 8) table per call, so each run's table gradient is its own."""
    table = torch.randn(HEADS_Q, 8, generator=torch.Generator().manual_seed(7))
    return RelativeBias(table.requires_grad_(), max_distance=6)


SCHEMES: dict[str, Callable[[], object]] = {
    "none": lambda: "none",
    "alibi": lambda: ALiBi(),
    "rope": lambda: RoPE(),
    "relative": relative_bias,
}

# (Nq, Nk, fused_attention keywords). Both leave rows without a visible key:
# causal, Nq > Nk, bottom-right aligned: query 0 sits at position -1, before every key;
# windowed non-causal: batch 1's queries 3..5 sit at positions 8..10, more than window - 1 after every key.
MASKS = {
    "causal": (6, 5, dict(causal=True)),
    "window": (6, 5, dict(causal=False, window=4, q_offset=torch.tensor([0, 5]), k_offset=torch.tensor([0, 0]))),
}


def device_and_dtype(backend: str) -> tuple[str, torch.dtype, int]:
    """(device, dtype, head dim) a backend runs this test at: fp32 on CPU and the Triton interpreter, the
    CUDA C++ kernels' smallest configuration on a GPU."""
    if backend == "cuda":
        return "cuda", torch.float16, 64
    if backend == "triton" and HAS_CUDA:
        return "cuda", torch.float32, 16
    return "cpu", torch.float32, 16


def gradients(q, k, v, make_pos, kwargs: dict, backend: str, w: Optional[torch.Tensor], u: torch.Tensor,
              dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """[dq, dk, dv(, d_table)] on the CPU of w . out + u . lse (w None: u . lse alone) for q, k, v cast to
    dtype on device; leaves the loss does not reach get zeros."""
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, v)]
    pos = make_pos()
    inputs = leaves + ([pos.table] if isinstance(pos, RelativeBias) else [])
    kwargs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    out, lse = fused_attention(*leaves, pos, return_lse=True, backend=backend, **kwargs)
    assert lse.requires_grad, f"{backend}: the returned lse is not differentiable"
    outputs, seeds = [lse], [u.to(device, lse.dtype)]
    if w is not None:
        outputs, seeds = [out, lse], [w.to(device, out.dtype), u.to(device, lse.dtype)]
    grads = torch.autograd.grad(outputs, inputs, seeds, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def check_against_reference(got: list, ref64: list, same: list, dtype: torch.dtype, what: str) -> None:
    for name, g, want, same_dtype in zip(("dq", "dk", "dv", "d_table"), got, ref64, same):
        assert torch.isfinite(g).all(), f"{what}: non-finite {name}"
        assert_close_to_reference(g.cpu(), want, same_dtype, 3.0, f"{name} {what}", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("loss", ["out_and_lse", "lse_only"])
def test_lse_gradient_matches_reference(backend, scheme, mask, loss):
    device, dtype, head_dim = device_and_dtype(backend)
    seq_q, seq_k, kwargs = MASKS[mask]
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, HEADS_Q, seq_q, head_dim, generator=gen)
    k, v = (torch.randn(2, HEADS_KV, seq_k, head_dim, generator=gen) for _ in range(2))
    w = torch.randn(q.shape, generator=gen) if loss == "out_and_lse" else None
    u = torch.randn(2, HEADS_Q, seq_q, generator=gen)  # nonzero on the rows without a key too
    run = dict(make_pos=SCHEMES[scheme], kwargs=kwargs, w=w, u=u)
    ref64 = gradients(q, k, v, backend="reference", dtype=torch.float64, device="cpu", **run)
    same = gradients(q, k, v, backend="reference", dtype=dtype, device="cpu", **run)
    got = gradients(q, k, v, backend=backend, dtype=dtype, device=device, **run)
    check_against_reference(got, ref64, same, dtype, f"{backend} {scheme} {mask} {loss}")


def merged_halves(q, k, v, make_pos, backend: str) -> torch.Tensor:
    """Causal attention of q over k, v computed as two calls, over the first and the second half of the keys,
    merged by their LSEs (what context parallelism and chunked attention do)."""
    half, q_offset = k.shape[2] // 2, k.shape[2] - q.shape[2]  # queries aligned with the last key
    (out1, lse1), (out2, lse2) = (
        fused_attention(q, k[:, :, keys], v[:, :, keys], make_pos(), causal=True, q_offset=q_offset,
                        k_offset=keys.start, return_lse=True, backend=backend)
        for keys in (slice(0, half), slice(half, k.shape[2])))
    lse = torch.logaddexp(lse1, lse2)
    # the first query sees no key of the second half: lse2 = -inf, weight exp(-inf) = 0, and no NaN
    weight1, weight2 = torch.exp(lse1 - lse)[..., None], torch.exp(lse2 - lse)[..., None]
    return out1 * weight1.to(out1.dtype) + out2 * weight2.to(out2.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["alibi", "rope"])
def test_merging_partial_attentions_by_lse_has_the_full_gradient(backend, scheme):
    device, dtype, head_dim = device_and_dtype(backend)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, HEADS_Q, 6, head_dim, generator=gen)
    k, v = (torch.randn(1, HEADS_KV, 10, head_dim, generator=gen) for _ in range(2))
    w = torch.randn(q.shape, generator=gen)

    def merged_gradients(backend, dtype, device):
        leaves = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, v)]
        out = merged_halves(*leaves, SCHEMES[scheme], backend)
        return [g.cpu() for g in torch.autograd.grad(out, leaves, w.to(device, out.dtype))]

    def full_gradients(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fused_attention(*leaves, SCHEMES[scheme](), causal=True, backend="reference")
        return list(torch.autograd.grad(out, leaves, w.to(dtype)))

    got = merged_gradients(backend, dtype, device)
    check_against_reference(got, full_gradients(torch.float64), full_gradients(dtype), dtype,
                            f"merged halves {backend} {scheme}")


def test_cpu_lse_gradcheck():
    """fp64 on the native CPU kernels: the LSE's gradient agrees with finite differences (rows all have a
    visible key here: finite differences of an LSE of -inf are undefined)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, n, 4, generator=gen, dtype=torch.float64, requires_grad=True) for n in (3, 5, 5))
    assert torch.autograd.gradcheck(
        lambda q, k, v: fused_attention(q, k, v, "rope", causal=True, window=4, return_lse=True, backend="cpu"),
        (q, k, v))
