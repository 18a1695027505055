"""The returned LSE is differentiable on the native kernels: a gradient reaching lse enters their backward as
delta = rowsum(dO * O) - dLSE (csrc/cpu/attention_backward.cpp; the CUDA preprocess kernel, checked in
tests/test_cuda_emulated.py with check_lse_case below). Checked against the dense reference through autograd
with DESIGN.md's tolerance rule, for losses that use out and lse, and lse alone.
"""
import pytest
import torch

from fused_pos_attn import RelativeBias, fused_attention
from fused_pos_attn.backends import cpu_backend
from fused_pos_attn.positions import as_position_scheme
from fused_pos_attn.spec import AttentionSpec
from test_attention_backends import SCHEMES, Case, case_inputs, position_for
from tolerance import assert_close_to_reference

LOSSES = ["out_and_lse", "lse_only"]


def lse_loss_grads(q, k, v, grad_out, grad_lse, case: Case, backend: str, loss: str, dtype=None) -> list:
    """(dq, dk, dv[, d_table]) of fused_attention on copies of q, k, v cast to dtype, back-propagating grad_out
    into out (unless loss is "lse_only") and grad_lse into lse."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    pos = position_for(case.pos, case.heads_q)
    if isinstance(pos, RelativeBias):
        leaves.append(pos.table)
    out, lse = fused_attention(*leaves[:3], pos, return_lse=True, backend=backend, **case.kwargs)
    outputs, grads = [lse], [grad_lse.to(lse.dtype)]
    if loss == "out_and_lse":
        outputs, grads = [out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)]
    torch.autograd.backward(outputs, grads)
    return [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]  # lse does not depend on v


def check_lse_case(case: Case, dtype: torch.dtype, backend: str, loss: str, seed: int = 0) -> None:
    """The backend's gradients for a loss through lse against the fp64 and same-dtype references. dLSE is
    random everywhere, also on rows without a visible key (lse -inf), where it must have no effect."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = case_inputs(case, dtype, backend, gen)
    grad_lse = torch.randn(q.shape[:3], generator=gen).to(q.device)
    fused = lse_loss_grads(q, k, v, grad_out, grad_lse, case, backend, loss)
    ref64 = lse_loss_grads(q, k, v, grad_out, grad_lse, case, "reference", loss, torch.float64)
    same = lse_loss_grads(q, k, v, grad_out, grad_lse, case, "reference", loss, dtype)
    for name, got, want64, want_same in zip(("dq", "dk", "dv", "d_table"), fused, ref64, same):
        assert_close_to_reference(got, want64, want_same, 3.0, f"{name} ({loss}) {case}", dtype)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("scheme", ["none", "alibi", "rope_partial_interleaved", "relative"])
def test_lse_gradient_matches_reference(scheme, loss):
    """GQA, causal + window, Nq > Nk: the first rows see no key (lse -inf)."""
    check_lse_case(Case(heads_q=4, heads_kv=2, seq_q=30, seq_k=23, pos=SCHEMES[scheme],
                        kwargs=dict(causal=True, window=9)), torch.float32, "cpu", loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_lse_gradient_other_dtypes(dtype):
    check_lse_case(Case(seq_q=33, seq_k=40, head_dim=32, pos=SCHEMES["relative"], kwargs=dict(causal=True)), dtype,
                   "cpu", "out_and_lse")


def test_lse_gradient_long_rows_span_tiles():
    """Query and key counts past one 128 x 256 CPU tile, rows in several tiles."""
    check_lse_case(Case(batch=1, heads_q=2, heads_kv=1, seq_q=300, seq_k=600, head_dim=32, pos=SCHEMES["rope"],
                        kwargs=dict(causal=True)), torch.float32, "cpu", "lse_only")


def test_gradcheck_through_lse():
    """fp64 gradcheck of (out, lse) together: both outputs' gradients are exact derivatives."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    assert torch.autograd.gradcheck(
        lambda q, k, v: fused_attention(q, k, v, "alibi", causal=True, return_lse=True, backend="cpu"), (q, k, v))


def _spec_and_inputs(causal: bool = True):
    """A direct backend call's inputs: ALiBi, Nq = 12 > Nk = 5 with causal (rows 0..6 see no key)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 12, 16, generator=gen)
    k, v = (torch.randn(2, 1, 5, 16, generator=gen) for _ in range(2))
    offsets = torch.zeros(2, dtype=torch.int64)
    spec = AttentionSpec(causal=causal, scale=0.25, window=None, q_offset=offsets - 7, k_offset=offsets,
                         position=as_position_scheme("alibi").resolve(2, 2, 16, 12, q.device))
    out, lse = cpu_backend.forward(q, k, v, spec)
    return q, k, v, out, lse, spec, torch.randn(q.shape, generator=gen)


def test_rows_without_keys_ignore_grad_lse():
    """dLSE on a row whose lse is -inf (even NaN or inf) changes nothing and makes no NaN."""
    q, k, v, out, lse, spec, grad_out = _spec_and_inputs()
    empty = torch.isneginf(lse)
    assert empty.any() and not empty.all()
    grad_lse = torch.randn(lse.shape)
    clean = cpu_backend.backward(grad_out, grad_lse.masked_fill(empty, 0.0), q, k, v, out, lse, spec, False)
    for poison in (float("nan"), float("inf"), 5.0):
        poisoned = cpu_backend.backward(grad_out, grad_lse.masked_fill(empty, poison), q, k, v, out, lse, spec, False)
        for name, a, b in zip(("dq", "dk", "dv"), poisoned, clean):
            assert not torch.isnan(a).any(), f"{name}: NaN for dLSE {poison} on rows without keys"
            assert torch.equal(a, b), f"{name} changed with dLSE {poison} on rows without keys"


def test_grad_lse_none_is_zero():
    q, k, v, out, lse, spec, grad_out = _spec_and_inputs(causal=False)
    without = cpu_backend.backward(grad_out, None, q, k, v, out, lse, spec, False)
    zeros = cpu_backend.backward(grad_out, torch.zeros_like(lse), q, k, v, out, lse, spec, False)
    with_lse = cpu_backend.backward(grad_out, torch.ones_like(lse), q, k, v, out, lse, spec, False)
    assert all(torch.equal(a, b) for a, b in zip(without[:3], zeros[:3]))
    assert not torch.equal(without[0], with_lse[0])  # the gradient of lse reaches dq
    # dLSE = 1 on every row adds the score gradient of sum(lse) = P: dV gets nothing from it.
    torch.testing.assert_close(with_lse[2], without[2], atol=0, rtol=0)
