"""Host-side position parameters: default ALiBi slopes and RoPE frequencies against POSITIONS.md's
formulas (computed here independently), and the shapes / dtypes / devices a backend receives."""
import math

import pytest
import torch

from fused_pos_attn import ALiBi, RoPE, alibi_slopes, fused_attention
from fused_pos_attn.positions import NoPosition, ResolvedPosition, as_position_scheme

CPU = torch.device("cpu")


def expected_alibi_slopes(n: int) -> list[float]:
    """POSITIONS.md: n a power of two: 2^(-8h/n), h = 1..n; otherwise c = 2^floor(log2 n),
    slopes(c) followed by every other slope of 2c heads (starting with the first), n - c of them."""
    def pow2(m):
        return [2.0 ** (-8.0 * h / m) for h in range(1, m + 1)]

    if n & (n - 1) == 0:
        return pow2(n)
    c = 1
    while 2 * c <= n:
        c *= 2
    extra = [s for idx, s in enumerate(pow2(2 * c)) if idx % 2 == 0]
    return pow2(c) + extra[: n - c]


@pytest.mark.parametrize("n", [1, 2, 8, 12, 16, 40, 3, 6])
def test_alibi_default_slopes_match_formula(n):
    got = alibi_slopes(n)
    assert got.shape == (n,) and got.dtype == torch.float32
    want = torch.tensor(expected_alibi_slopes(n), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-7, atol=0)


def test_alibi_8_heads_is_half_to_1_over_256():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -h for h in range(1, 9)]), rtol=0, atol=0)


def test_alibi_12_heads_explicit_list():
    want = [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    torch.testing.assert_close(alibi_slopes(12).double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-7, atol=0)


def test_alibi_40_heads_structure():
    s = alibi_slopes(40).double()
    # first 32: 2^(-h/4); then 8 of 2^(-8h/64) for odd h = 1, 3, ..., 15
    torch.testing.assert_close(s[:32], torch.tensor([2.0 ** (-h / 4) for h in range(1, 33)],
                                                    dtype=torch.float64), rtol=1e-7, atol=0)
    torch.testing.assert_close(s[32:], torch.tensor([2.0 ** (-h / 8) for h in range(1, 16, 2)],
                                                    dtype=torch.float64), rtol=1e-7, atol=0)


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_alibi_slopes_bad_num_heads(n):
    with pytest.raises(ValueError, match=rf"num_heads must be a positive int, got {n!r}"):
        alibi_slopes(n)


@pytest.mark.parametrize("head_dim, rotary_dim", [(8, None), (16, None), (64, None), (16, 8), (64, 32),
                                                  (80, 64), (10, 2)])
@pytest.mark.parametrize("theta", [10000.0, 500000.0, 2.0])
def test_rope_default_inv_freq(head_dim, rotary_dim, theta):
    r = head_dim if rotary_dim is None else rotary_dim
    resolved = RoPE(theta=theta, rotary_dim=rotary_dim).resolve(2, 4, head_dim, 17, CPU)
    want = torch.tensor([theta ** (-2.0 * i / r) for i in range(r // 2)], dtype=torch.float64)
    assert resolved.kind == "rope" and resolved.rotary_dim == r
    assert resolved.inv_freq.shape == (r // 2,) and resolved.inv_freq.dtype == torch.float32
    assert resolved.inv_freq.is_contiguous()
    torch.testing.assert_close(resolved.inv_freq.double(), want, rtol=1e-7, atol=0)
    assert resolved.attention_factor == 1.0 and resolved.slopes is None


def test_rope_explicit_inv_freq_and_flags():
    inv = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    resolved = RoPE(inv_freq=inv, interleaved=True, attention_factor=1.25).resolve(1, 2, 8, 5, CPU)
    assert resolved.rotary_dim == 6 and resolved.interleaved is True
    assert resolved.attention_factor == 1.25
    assert resolved.inv_freq.dtype == torch.float32
    torch.testing.assert_close(resolved.inv_freq, inv.float(), rtol=0, atol=0)


def test_resolved_none():
    resolved = NoPosition().resolve(2, 4, 8, 5, CPU)
    assert resolved == ResolvedPosition("none")
    assert resolved.slopes is None and resolved.inv_freq is None and resolved.rotary_dim == 0


@pytest.mark.parametrize("batch, heads", [(1, 1), (3, 8), (2, 12)])
def test_resolved_alibi_default_shape(batch, heads):
    resolved = ALiBi().resolve(batch, heads, 16, 9, CPU)
    assert resolved.kind == "alibi" and resolved.inv_freq is None and resolved.rotary_dim == 0
    assert resolved.slopes.shape == (batch, heads) and resolved.slopes.dtype == torch.float32
    assert resolved.slopes.device == CPU
    for b in range(batch):
        torch.testing.assert_close(resolved.slopes[b], alibi_slopes(heads), rtol=0, atol=0)


def test_resolved_device_meta():
    meta = torch.device("meta")
    assert ALiBi().resolve(2, 4, 8, 5, meta).slopes.device.type == "meta"
    assert ALiBi(torch.ones(4)).resolve(2, 4, 8, 5, meta).slopes.device.type == "meta"
    assert RoPE().resolve(2, 4, 8, 5, meta).inv_freq.device.type == "meta"


def test_alibi_head_slopes_expand_to_batch():
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64, requires_grad=True)
    resolved = ALiBi(slopes).resolve(4, 3, 8, 5, CPU)
    assert resolved.slopes.shape == (4, 3) and resolved.slopes.dtype == torch.float32
    assert not resolved.slopes.requires_grad  # slopes are constants
    torch.testing.assert_close(resolved.slopes, slopes.detach().float().expand(4, 3), rtol=0, atol=0)


def test_alibi_batch_slopes_kept_per_batch():
    slopes = torch.tensor([[0.5, 0.25], [0.75, 0.1]])
    resolved = ALiBi(slopes).resolve(2, 2, 8, 5, CPU)
    torch.testing.assert_close(resolved.slopes, slopes, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_batch_slopes_used_per_batch(causal):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    slopes = torch.tensor([[0.5, 0.25, 1.0, 0.1], [2.0, 0.0, 0.3, 0.7]])
    out, lse = fused_attention(q, k, v, ALiBi(slopes), causal=causal, return_lse=True, backend="reference")
    for b in range(2):
        ob, lb = fused_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], ALiBi(slopes[b]), causal=causal,
                                 return_lse=True, backend="reference")
        torch.testing.assert_close(out[b:b + 1], ob, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[b:b + 1], lb, rtol=0, atol=1e-6)
    # and the two batches' slopes really differ in effect
    swapped = fused_attention(q, k, v, ALiBi(slopes.flip(0)), causal=causal, backend="reference")
    assert not torch.allclose(out, swapped)


def test_as_position_scheme():
    assert isinstance(as_position_scheme("none"), NoPosition)
    assert isinstance(as_position_scheme("alibi"), ALiBi)
    assert isinstance(as_position_scheme("rope"), RoPE)
    obj = RoPE(theta=500.0)
    assert as_position_scheme(obj) is obj
    assert math.isclose(as_position_scheme("rope").theta, 10000.0)
