"""torch.compile over fused_attention / fused_attention_varlen: the custom ops of fused_pos_attn/ops.py trace
with fullgraph=True (zero graph breaks), forward and backward, and the compiled call equals the eager one; dynamic
shapes compile once for many lengths; torch.library.opcheck passes for every op of the package.

Compiled and eager runs execute the same kernels on the same inputs, so they must agree to the last bit up to
what Inductor changes around the op (the loss arithmetic): compared with a tight tolerance. The eager kernels are
checked against the reference elsewhere (test_attention_backends.py, test_varlen.py).
"""
import dataclasses

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from kernel_backends import HAS_TRITON, backend, device_of  # noqa: F401  (backend: fixture)

import fused_pos_attn as fpa
from fused_pos_attn import ops
from fused_pos_attn.backends import native
from fused_pos_attn.positions import ResolvedPosition, as_position_scheme
from fused_pos_attn.spec import AttentionSpec

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 13, 21, 16
TRITON_MARK = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _schemes(device):
    table = torch.randn(HQ, 32, device=device, requires_grad=True)
    return {
        "none": "none",
        "alibi": "alibi",
        "alibi_batch_slopes": fpa.ALiBi(torch.rand(B, HQ, device=device)),
        "rope": "rope",
        "rope_partial_interleaved": fpa.RoPE(rotary_dim=8, interleaved=True),
        "rope_yarn": fpa.RoPE(scaling=fpa.YaRN(4.0, 16)),
        "relative": fpa.RelativeBias(table, max_distance=20),
    }


SCHEMES = list(_schemes("cpu"))
# (causal, window, Hkv, q_offset, k_offset): int and tensor offsets, GQA and MHA, a window with and without causal
MASKS = [(True, None, HKV, None, None), (False, 6, HKV, 3, 0), (True, 5, HQ, "tensor", "tensor")]


def _inputs(device, dtype=torch.float32, nq=NQ, nk=NK, hkv=HKV):
    torch.manual_seed(0)
    q = torch.randn(B, HQ, nq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, hkv, nk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, hkv, nk, D, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def _leaves(q, k, v, pos):
    table = getattr(pos, "table", None)
    return [q, k, v] + ([table] if table is not None else [])


def _loss_and_grads(fn, q, k, v, pos):
    out, lse = fn(q, k, v)
    # lse enters the loss only where finite (a row with no visible key has lse -inf)
    loss = (out.float() ** 2).sum() + torch.where(lse.isfinite(), lse, 0).sum()
    return out, lse, torch.autograd.grad(loss, _leaves(q, k, v, pos))


def _assert_same(compiled, eager):
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


MASK_IDS = ["causal", "window-int-offsets", "causal-window-mha-tensor-offsets"]
# The native kernels run every scheme x mask; the Triton interpreter (slow) every scheme with the first mask and
# the masks' other paths with the schemes whose tiles differ most.
COMPILE_CASES = [pytest.param("cpu", scheme, mask, id=f"cpu-{scheme}-{mask_id}")
                 for scheme in SCHEMES for mask, mask_id in zip(MASKS, MASK_IDS)] + [
    pytest.param("triton", scheme, mask, id=f"triton-{scheme}-{mask_id}", marks=TRITON_MARK)
    for scheme in SCHEMES for mask, mask_id in zip(MASKS, MASK_IDS)
    if mask_id == "causal" or scheme in ("rope_partial_interleaved", "relative")]


@pytest.mark.parametrize("backend, scheme, mask", COMPILE_CASES)
def test_fused_attention_compiles_fullgraph_and_equals_eager(backend, scheme, mask):
    device = device_of(backend)
    pos = _schemes(device)[scheme]
    causal, window, hkv, q_offset, k_offset = mask
    q, k, v = _inputs(device, hkv=hkv)
    if q_offset == "tensor":
        q_offset, k_offset = torch.tensor([8, 40], device=device), torch.tensor([0, 31], device=device)

    def attention(q, k, v):
        return fpa.fused_attention(q, k, v, pos, causal=causal, window=window, q_offset=q_offset, k_offset=k_offset,
                                   return_lse=True, backend=backend)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention, fullgraph=True, backend=counter)
    *outputs, grads = _loss_and_grads(compiled, q, k, v, pos)
    *expected, expected_grads = _loss_and_grads(attention, q, k, v, pos)
    assert counter.frame_count == 1
    _assert_same(outputs, expected)
    _assert_same(grads, expected_grads)


@pytest.mark.parametrize("scheme", ["alibi", "rope_partial_interleaved", "relative"])
def test_fused_attention_varlen_compiles_fullgraph_and_equals_eager(backend, scheme):  # noqa: F811
    device = device_of(backend)
    pos = _schemes(device)[scheme]
    cu_seqlens = torch.tensor([0, 5, 5, 17, 30], device=device, dtype=torch.int32)  # an empty sequence included
    torch.manual_seed(0)
    q = torch.randn(30, HQ, D, device=device, requires_grad=True)
    k, v = (torch.randn(30, HKV, D, device=device, requires_grad=True) for _ in range(2))
    if scheme == "alibi":
        pos = fpa.ALiBi(torch.rand(4, HQ, device=device))  # (S, Hq) per-sequence slopes

    def attention(q, k, v):
        out, lse = fpa.fused_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, 13, 13, pos, causal=True, window=9,
                                              return_lse=True, backend=backend)
        return out, lse

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    *outputs, grads = _loss_and_grads(compiled, q, k, v, pos)
    *expected, expected_grads = _loss_and_grads(attention, q, k, v, pos)
    _assert_same(outputs, expected)
    _assert_same(grads, expected_grads)


def test_inductor_compiles_a_training_step():
    """The default backend (Inductor, which generates and compiles C++ for the code around the op on CPU): the
    custom ops run as extern kernels inside the generated forward and backward."""
    pos = _schemes("cpu")["relative"]
    q, k, v = _inputs("cpu")

    def attention(q, k, v):
        return fpa.fused_attention(q, k, v, pos, causal=True, return_lse=True)

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True)
    *outputs, grads = _loss_and_grads(compiled, q, k, v, pos)
    *expected, expected_grads = _loss_and_grads(attention, q, k, v, pos)
    _assert_same(outputs, expected)
    _assert_same(grads, expected_grads)


DYNAMIC_CASES = [pytest.param(backend, scheme, how, id=f"{backend}-{scheme}-{how}",
                              marks=TRITON_MARK if backend == "triton" else ())
                 for backend in ("cpu", "triton") for scheme in ("alibi", "rope", "relative")
                 for how in ("dynamic=True", "mark_dynamic") if backend == "cpu" or scheme == "rope"]


@pytest.mark.parametrize("backend, scheme, how", DYNAMIC_CASES)
def test_dynamic_shapes_compile_once_for_many_lengths(backend, scheme, how):
    device = device_of(backend)
    pos = _schemes(device)[scheme]

    def attention(q, k, v):
        return fpa.fused_attention(q, k, v, pos, causal=True, backend=backend)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention, fullgraph=True, backend=counter, dynamic=True if how == "dynamic=True"
                             else None)
    for n in (17, 29, 40, 64):
        q, k, v = _inputs(device, nq=n, nk=n)
        if how == "mark_dynamic":
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)
        out = compiled(q, k, v)
        out.sum().backward()
        torch.testing.assert_close(out, attention(q, k, v), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations for 4 lengths"


def test_dynamic_ntk_compiles_from_int_offsets_and_breaks_the_graph_on_tensor_offsets():
    """DynamicNTK's frequencies depend on the call's largest position. From int offsets it is arithmetic on the
    shapes: no graph break, and under dynamic shapes no compilation per length (measured: 2 compilations for
    lengths on both sides of the original length, then none). From tensor offsets it is read from the tensors:
    a graph break (the documented exception), with the compiled result still equal to eager."""
    pos = fpa.RoPE(scaling=fpa.DynamicNTK(2.0, 16))

    def attention(q, k, v, q_offset=None):
        return fpa.fused_attention(q, k, v, pos, causal=True, q_offset=q_offset, backend="cpu")

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention, fullgraph=True, backend=counter, dynamic=True)
    for n in (8, 12, 20, 28, 40, 50):  # the original length is 16
        q, k, v = _inputs("cpu", nq=n, nk=n)
        torch.testing.assert_close(compiled(q, k, v), attention(q, k, v), rtol=1e-6, atol=1e-6)
    assert counter.frame_count <= 2

    q, k, v = _inputs("cpu")
    offsets = torch.tensor([0, 30])
    explained = torch._dynamo.explain(attention)(q, k, v, offsets)
    assert explained.graph_break_count >= 1
    torch.testing.assert_close(torch.compile(attention, backend="aot_eager")(q, k, v, offsets),
                               attention(q, k, v, offsets), rtol=1e-6, atol=1e-6)


def _spec_arguments(device, scheme, causal=True, varlen=False, dtype=torch.float32):
    """(q, k, v, AttentionSpec) of a small validated call, built as fused_attention builds it."""
    q, k, v = _inputs(device, dtype)
    scheme = as_position_scheme(_schemes(device)[scheme])
    offsets = torch.tensor([3, 0], device=device)
    position = scheme.resolve(B, HQ, D, 64, torch.device(device), causal=causal)
    packed = {}
    if varlen:
        q, k, v = (t.detach()[:1].clone().requires_grad_() for t in (q, k, v))
        cu = torch.tensor([0, 6, NQ], device=device)
        cu_k = torch.tensor([0, 9, NK], device=device)
        packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu_k, max_seqlen_q=7, max_seqlen_k=12)
    spec = AttentionSpec(causal=causal, scale=0.3, window=7, q_offset=offsets, k_offset=offsets.flip(0),
                         position=position, **packed)
    return q, k, v, spec


OPCHECK_CASES = [pytest.param(backend, scheme, varlen, id=f"{backend}-{scheme}-{'varlen' if varlen else 'dense'}",
                              marks=TRITON_MARK if backend == "triton" else ())
                 for backend in ("cpu", "triton") for scheme in SCHEMES for varlen in (False, True)
                 if backend == "cpu" or not varlen or scheme in ("rope_partial_interleaved", "relative")]


@pytest.mark.parametrize("backend, scheme, varlen", OPCHECK_CASES)
def test_opcheck_fused_attention_ops(backend, scheme, varlen, dtype=torch.float32):
    """Schema, fake implementation, autograd registration and AOT dispatch (static and dynamic shapes) of the
    package's forward op and its backward op."""
    device = device_of(backend)
    q, k, v, spec = _spec_arguments(device, scheme, varlen=varlen, dtype=dtype)
    forward_args = (q, k, v, *ops.flatten(spec), backend)
    torch.library.opcheck(torch.ops.fused_pos_attn.fused_attention, forward_args)
    out, lse = torch.ops.fused_pos_attn.fused_attention(*forward_args)
    grad_out = torch.randn_like(out)
    rel_grad = spec.position.rel_table is not None
    # The backward op has no gradient of its own (no double backward): its inputs are given without one.
    spec_args = [arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in ops.flatten(spec)]
    for grad_lse in (None, torch.randn_like(lse)):
        backward_args = (grad_out, grad_lse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                         rel_grad, *spec_args, backend)
        torch.library.opcheck(torch.ops.fused_pos_attn.fused_attention_backward, backward_args)


def test_opcheck_fused_attention_ops_fp64():
    """float64 on the native kernels: lse is float64 there, and the fake must say so."""
    test_opcheck_fused_attention_ops("cpu", "relative", False, dtype=torch.float64)


@pytest.mark.parametrize("scheme", ["alibi", "rope_partial_interleaved", "relative"])
def test_opcheck_extension_ops(scheme):
    """The C++ extension's TORCH_LIBRARY ops (CPU kernels here; CUDA ones in test_gpu.py) with their fake
    implementations (native.py). They carry no autograd of their own: the package's op above does."""
    q, k, v, spec = _spec_arguments("cpu", scheme)
    q, k, v = (t.detach() for t in (q, k, v))
    call = native.op_args(spec, q)
    torch.library.opcheck(torch.ops.fused_pos_attn.attention_forward, (q, k, v), call)
    out, lse = torch.ops.fused_pos_attn.attention_forward(q, k, v, **call)
    for rel_grad in (False, True):
        torch.library.opcheck(torch.ops.fused_pos_attn.attention_backward,
                              (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, rel_grad), call)


def test_spec_flattening_round_trips():
    """ops.flatten / unflatten carry every field of AttentionSpec and its ResolvedPosition through the ops."""
    _, _, _, spec = _spec_arguments("cpu", "relative", varlen=True)
    again = ops.unflatten(ops.flatten(spec))
    for field in dataclasses.fields(AttentionSpec):
        if field.name != "position":
            assert getattr(again, field.name) is getattr(spec, field.name), field.name
    for field in dataclasses.fields(ResolvedPosition):
        assert getattr(again.position, field.name) is getattr(spec.position, field.name), field.name
