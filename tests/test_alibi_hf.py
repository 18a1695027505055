"""ALiBi completeness: default slopes equal BLOOM's, any float dtype of slopes is converted to fp32,
(Hq,) and (B, Hq) slopes, and the symmetric bidirectional bias without causal masking; the cpu and triton
backends against the reference, and the reference against an explicit dense bias."""
import pytest
import torch
import torch.nn.functional as F

from fused_pos_attn import ALiBi, alibi_slopes, fused_attention
from test_attention_backends import HAS_TRITON, Case, check_case

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))
BACKENDS = [TRITON, "cpu"]


def bloom_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes read from transformers' BLOOM build_alibi_tensor: slope * (key position 1)."""
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    alibi = bloom.build_alibi_tensor(torch.ones(1, 2, dtype=torch.int64), num_heads, torch.float32)
    return alibi.reshape(num_heads, 2)[:, 1]  # (B * heads, 1, N) with B = 1; column 0 is position 0


BLOOM_RTOL = 1e-6  # BLOOM raises an fp32 base to integer powers (up to ~4 ulp off); ours is rounded once


@pytest.mark.parametrize("num_heads", range(1, 65))
def test_default_slopes_equal_bloom(num_heads):
    expected = bloom_slopes(num_heads)
    torch.testing.assert_close(alibi_slopes(num_heads), expected, rtol=BLOOM_RTOL, atol=0)
    resolved = ALiBi().resolve(3, num_heads, 16, 10, torch.device("cpu"))
    assert resolved.slopes.dtype == torch.float32 and resolved.slopes.shape == (3, num_heads)
    torch.testing.assert_close(resolved.slopes, expected.expand(3, num_heads), rtol=BLOOM_RTOL, atol=0)


def test_default_slopes_known_values():
    assert alibi_slopes(8).tolist() == [2.0 ** -h for h in range(1, 9)]
    twelve = [2.0 ** -h for h in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve), rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", ["heads", "batch_heads"])
def test_slopes_of_any_float_dtype_are_converted(dtype, shape):
    base = torch.tensor([0.5, 0.3, 0.1, 0.0625])
    slopes = (base if shape == "heads" else torch.stack((base, base.flip(0)))).to(dtype)
    resolved = ALiBi(slopes).resolve(2, 4, 16, 10, torch.device("cpu"))
    assert resolved.slopes.dtype == torch.float32 and resolved.slopes.shape == (2, 4)
    torch.testing.assert_close(resolved.slopes, slopes.float().expand(2, 4), rtol=0, atol=0)
    assert slopes.dtype == dtype  # the caller's tensor is untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_slopes_dtype_end_to_end(dtype, backend):
    slopes = torch.tensor([[0.5, 0.3, 0.1, 0.0625], [0.25, 0.7, 0.05, 0.2]], dtype=dtype)
    check_case(Case(heads_q=4, heads_kv=2, seq_q=13, seq_k=21, pos=ALiBi(slopes), kwargs=dict(causal=True)),
               torch.float32, backend, backward=False)
    # identical (bit for bit) to passing the fp32 slopes
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, 13 if i == 0 else 21, 16, generator=gen) for i in range(3))
    out = fused_attention(q, k, v, ALiBi(slopes), causal=True, backend=backend)
    out32 = fused_attention(q, k, v, ALiBi(slopes.float()), causal=True, backend=backend)
    torch.testing.assert_close(out, out32, rtol=0, atol=0)


@pytest.mark.parametrize("slopes_shape", ["heads", "batch_heads"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_slope_shapes(slopes_shape, causal, backend):
    gen = torch.Generator().manual_seed(2)
    shape = (4,) if slopes_shape == "heads" else (2, 4)
    slopes = torch.rand(shape, generator=gen) * 0.5 + 0.01
    check_case(Case(heads_q=4, heads_kv=2, seq_q=17, seq_k=23, pos=ALiBi(slopes), kwargs=dict(causal=causal)),
               torch.float32, backend)


def dense_alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq, Nk) bias -m_h * |pq - pk| from (B, H) slopes and (B, N) absolute positions."""
    distance = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).abs().to(slopes.dtype)
    return -slopes[:, :, None, None] * distance


@pytest.mark.parametrize("backend", ["reference", TRITON, "cpu"])
def test_bidirectional_bias_is_symmetric(backend):
    """Without causal masking keys after the query are penalized like keys before it (|pq - pk|), with
    per-batch offsets; checked against SDPA with an explicit dense bias."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, seq_q, seq_k, dim = 2, 4, 11, 19, 16
    q = torch.randn(batch, heads, seq_q, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, heads, seq_k, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    slopes = torch.tensor([[0.5, 0.25, 0.125, 0.0625], [0.3, 0.2, 0.1, 0.9]])
    q_offset, k_offset = torch.tensor([4, 0]), torch.tensor([0, 6])
    q_pos = q_offset[:, None] + torch.arange(seq_q)
    k_pos = k_offset[:, None] + torch.arange(seq_k)
    bias = dense_alibi_bias(slopes.double(), q_pos, k_pos)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    dtype = torch.float64 if backend == "reference" else torch.float32
    out = fused_attention(q.to(dtype), k.to(dtype), v.to(dtype), ALiBi(slopes), q_offset=q_offset,
                          k_offset=k_offset, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)
    # a key j steps after query i weighs like the key j steps before it: the bias really is two-sided
    assert bias[0, 0, 0, 0].item() == bias[0, 0, 0, 8].item() == -2.0


@pytest.mark.parametrize("backend", ["reference", TRITON, "cpu"])
def test_causal_output_equals_bloom_formulation(backend):
    """Under causal masking BLOOM's bias m_h * pk(j) gives the same softmax as -m_h * (pq(i) - pk(j))."""
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    gen = torch.Generator().manual_seed(4)
    batch, heads, seq, dim = 2, 6, 21, 16
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=gen) for _ in range(3))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    alibi = bloom.build_alibi_tensor(mask, heads, torch.float32).reshape(batch, heads, 1, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              attn_mask=alibi.double().masked_fill(~causal, float("-inf")))
    out = fused_attention(q, k, v, "alibi", causal=True, backend=backend)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
