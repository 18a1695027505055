"""T5 relative position bias: the bucket formula against transformers' own, the folded distance table the
kernels read, the table's gradient, and the RelativeBias parameter errors.

Kernel outputs and gradients for the relative scheme are checked against the reference with every other
scheme in test_attention_backends.py ("relative" cases); this file covers what is specific to it.
"""
import pytest
import torch

from fused_pos_attn import RelativeBias, fused_attention
from fused_pos_attn.positions import t5_bucket

CPU = torch.device("cpu")
BUCKET_PARAMS = [(32, 128), (32, 64), (16, 20), (8, 5), (64, 1000), (10, 7)]


@pytest.mark.parametrize("num_buckets,max_distance", BUCKET_PARAMS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_matches_transformers_t5(num_buckets, max_distance, bidirectional):
    """Every relative position in a wide range, including the exact bucket edges (16, 32, 64 at the
    defaults) where an fp32 log decides the bucket."""
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    if bidirectional and num_buckets // 4 >= max_distance:
        pytest.skip("max_distance inside the exact range is rejected by RelativeBias")
    relative = torch.arange(-5000, 5001, dtype=torch.int64)
    want = t5.T5Attention._relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=num_buckets,
                                                    max_distance=max_distance)
    got = t5_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_distance_table_folds_buckets_exactly(bidirectional):
    """rel_bias[h, side, min(|rel|, max_distance)] == table[h, bucket(-rel)] for every rel, far beyond
    max_distance too: the kernels' lookup is the reference's bias."""
    table = torch.randn(3, 32)
    resolved = RelativeBias(table, max_distance=50, bidirectional=bidirectional).resolve(1, 3, 16, 10, CPU)
    assert resolved.rel_bias.shape == (3, 2, 51) and resolved.rel_bias.is_contiguous()
    rel = torch.arange(-400, 401)  # pq - pk
    side = (rel < 0).long()
    column = rel.abs().clamp(max=50)
    looked_up = resolved.rel_bias[:, side, column]
    want = table[:, t5_bucket(-rel, bidirectional, 32, 50)]
    assert torch.equal(looked_up, want)


def test_bidirectional_defaults_to_not_causal():
    table = torch.randn(2, 32)
    assert RelativeBias(table).resolve(1, 2, 8, 4, CPU, causal=False).bidirectional is True
    assert RelativeBias(table).resolve(1, 2, 8, 4, CPU, causal=True).bidirectional is False
    assert RelativeBias(table, bidirectional=True).resolve(1, 2, 8, 4, CPU, causal=True).bidirectional is True


def test_bias_matters():
    """Positive control: a different table changes the output (the bias reaches the kernel)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=gen) for _ in range(3))
    table = torch.randn(2, 32, generator=gen)
    out = fused_attention(q, k, v, RelativeBias(table), causal=True, backend="cpu")
    shifted = table.clone()
    shifted[:, 5] += 3.0  # one bucket only
    out_shifted = fused_attention(q, k, v, RelativeBias(shifted), causal=True, backend="cpu")
    assert (out - out_shifted).abs().max() > 1e-2


def test_cpu_table_gradient_is_deterministic():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 200, 32, generator=gen)
    k, v = (torch.randn(3, 2, 300, 32, generator=gen) for _ in range(2))
    grads = []
    for _ in range(3):
        table = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
        fused_attention(q, k, v, RelativeBias(table), causal=True, backend="cpu").square().sum().backward()
        grads.append(table.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    assert grads[0].abs().sum() > 0


def test_table_of_any_float_dtype_gets_its_gradient_in_that_dtype():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    table = torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True)
    fused_attention(q, k, v, RelativeBias(table, max_distance=10), backend="cpu").sum().backward()
    assert table.grad is not None and table.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(table=[[0.0]]), TypeError, r"RelativeBias table must be a torch.Tensor, got list"),
    (dict(table=torch.zeros(4)), ValueError, r"RelativeBias table must be a floating-point tensor of shape "
                                             r"\(Hq, num_buckets\), got torch.float32 of shape \(4,\)"),
    (dict(table=torch.zeros(2, 8, dtype=torch.int64)), ValueError, r"must be a floating-point tensor"),
    (dict(table=torch.zeros(2, 8), max_distance=0), ValueError,
     r"RelativeBias max_distance must be an int in \[1, 1048576\], got 0"),
    (dict(table=torch.zeros(2, 8), max_distance=-3), ValueError, r"max_distance must be an int in .* got -3"),
    (dict(table=torch.zeros(2, 8), max_distance=2.5), ValueError, r"max_distance must be an int in .* got 2.5"),
    (dict(table=torch.zeros(2, 8), max_distance=1 << 21), ValueError, r"max_distance must be an int in"),
    (dict(table=torch.zeros(2, 8), bidirectional="yes"), TypeError,
     r"RelativeBias bidirectional must be a bool or None, got str"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        RelativeBias(**kwargs)


@pytest.mark.parametrize("table,kwargs,causal,match", [
    (torch.zeros(3, 32), {}, True, r"RelativeBias table must have shape \(Hq, num_buckets\) with Hq=2, got \(3, 32\)"),
    (torch.zeros(2, 3), {}, False, r"RelativeBias table needs num_buckets >= 4 \(bidirectional buckets\), got 3"),
    (torch.zeros(2, 1), {}, True, r"RelativeBias table needs num_buckets >= 2 \(causal buckets\), got 1"),
    (torch.zeros(2, 32), dict(max_distance=16), True,
     r"RelativeBias max_distance must exceed the exact-bucket range 16 \(num_buckets // 2\), got 16"),
    (torch.full((2, 8), float("nan")), {}, True, r"RelativeBias table must be finite"),
])
def test_call_errors(table, kwargs, causal, match):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=match):
        fused_attention(q, q, q, RelativeBias(table, **kwargs), causal=causal, backend="cpu")
