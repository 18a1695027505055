"""The native ops' interface (csrc/ops.cpp, fused_pos_attn/backends/native.py): the one argument builder
matches the schema generated from csrc's FPA_CALL_ARGS, the relative table's gradient is computed only when
asked for, and bad backward inputs get errors naming the argument."""
import pytest
import torch

from fused_pos_attn import RelativeBias
from fused_pos_attn.backends import cpu_backend, native
from fused_pos_attn.spec import AttentionSpec

OPS = torch.ops.fused_pos_attn
# Leading arguments of each op before the per-call position / masking arguments.
LEADING = {"attention_forward": ["q", "k", "v"],
           "attention_backward": ["grad_out", "grad_lse", "q", "k", "v", "out", "lse", "rel_grad"]}


def _relative_call(table_requires_grad: bool = True):
    """Inputs of one relative-scheme call (GQA, causal, distances past max_distance), and its forward."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 30, 16, generator=gen)
    k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(2))
    table = torch.randn(4, 8, generator=gen).requires_grad_(table_requires_grad)
    position = RelativeBias(table, max_distance=5).resolve(2, 4, 16, 40, q.device, causal=True)
    offsets = torch.zeros(2, dtype=torch.int64)
    spec = AttentionSpec(causal=True, scale=0.25, window=None, q_offset=offsets + 10, k_offset=offsets,
                         position=position)
    out, lse = cpu_backend.forward(q, k, v, spec)
    return q, k, v, out, lse, spec, torch.randn(q.shape, generator=gen)


@pytest.mark.parametrize("op", list(LEADING))
def test_op_args_match_the_schema(op):
    """native.op_args builds exactly the schema's position / masking arguments, in its order."""
    q, _, _, _, _, spec, _ = _relative_call()
    names = [a.name for a in getattr(OPS, op).default._schema.arguments]
    assert names[:len(LEADING[op])] == LEADING[op]
    assert list(native.op_args(spec, q)) == names[len(LEADING[op]):]


def test_table_gradient_only_when_asked():
    """rel_grad=False: no table gradient (None), the other gradients unchanged; the op returns it empty."""
    q, k, v, out, lse, spec, grad_out = _relative_call()
    with_table = cpu_backend.backward(grad_out, None, q, k, v, out, lse, spec, True)
    without = cpu_backend.backward(grad_out, None, q, k, v, out, lse, spec, False)
    assert without[3] is None and with_table[3].shape == (4, 8) and with_table[3].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(with_table[:3], without[:3]))
    raw = OPS.attention_backward(grad_out, None, q, k, v, out, lse, False, **native.op_args(spec, q))
    assert raw[3].numel() == 0


def test_no_table_gradient_for_other_schemes():
    q, k, v, out, lse, spec, grad_out = _relative_call()
    position = spec.position.__class__("alibi", slopes=torch.full((2, 4), 0.1))
    spec = AttentionSpec(spec.causal, spec.scale, spec.window, spec.q_offset, spec.k_offset, position)
    out, lse = cpu_backend.forward(q, k, v, spec)
    assert cpu_backend.backward(grad_out, None, q, k, v, out, lse, spec, True)[3] is None


@pytest.mark.parametrize("bad,match", [
    (lambda lse: lse.double(), r"grad_lse must be a contiguous \(B, Hq, Nq\) Float tensor like lse"),
    (lambda lse: lse[:, :, :-1].contiguous(), r"grad_lse must be a contiguous \(B, Hq, Nq\) Float tensor"),
    (lambda lse: lse.transpose(0, 1).contiguous().transpose(0, 1), r"grad_lse must be a contiguous"),
], ids=["dtype", "shape", "strides"])
def test_bad_grad_lse_is_named(bad, match):
    q, k, v, out, lse, spec, grad_out = _relative_call()
    with pytest.raises(RuntimeError, match=match):
        OPS.attention_backward(grad_out, bad(torch.zeros_like(lse)), q, k, v, out, lse, True,
                               **native.op_args(spec, q))


def test_bad_lse_is_named():
    q, k, v, out, lse, spec, grad_out = _relative_call()
    with pytest.raises(RuntimeError, match=r"lse must be a contiguous \(B, Hq, Nq\) Float tensor"):
        OPS.attention_backward(grad_out, None, q, k, v, out, lse[:, :2].contiguous(), True,
                               **native.op_args(spec, q))
