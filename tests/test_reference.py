"""The dense oracle itself, validated against independent implementations (never against itself):
torch SDPA, plain Python loops, complex-number RoPE, gradcheck and hypothesis properties."""
import cmath
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_pos_attn import ALiBi, RelativeBias, RoPE, fused_attention
from fused_pos_attn.positions import ResolvedPosition
from fused_pos_attn.reference import apply_rope, attention_reference, position_bias
from fused_pos_attn.spec import AttentionSpec

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def qkv(b, hq, hkv, nq, nk, d, seed=0, dtype=F64):
    return randn(b, hq, nq, d, seed=seed, dtype=dtype), randn(b, hkv, nk, d, seed=seed + 1, dtype=dtype), \
        randn(b, hkv, nk, d, seed=seed + 2, dtype=dtype)


def ref(q, k, v, pos="none", **kw):
    return fused_attention(q, k, v, pos, return_lse=True, backend="reference", **kw)


def lse_atol(lse):
    return 1e-10 if lse.dtype == F64 else 2e-6


def assert_lse_close(got, want):
    """LSE comparison; equal infinities (rows with no visible key) count as equal."""
    atol = lse_atol(got)
    got, want = got.double(), want.double()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all()
    if fin.any():
        atol *= max(1.0, want[fin].abs().max().item())
    torch.testing.assert_close(got[fin], want[fin], rtol=0, atol=atol)


# --------------------------------------------------------------------------- plain Python loop oracle


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _rope_vec(x, pos, inv_freq, rotary_dim, interleaved, factor):
    """Rotate list x at integer position pos using complex numbers; the angle is formed in fp32 (the
    documented convention of the oracle and of Hugging Face transformers)."""
    out = list(x)
    half = rotary_dim // 2
    for i in range(half):
        a_idx, b_idx = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        angle = _f32(_f32(float(pos)) * inv_freq[i])
        z = complex(x[a_idx], x[b_idx]) * factor * cmath.exp(1j * angle)
        out[a_idx], out[b_idx] = z.real, z.imag
    return out


def loop_attention(q, k, v, *, kind="none", slopes=None, inv_freq=None, rotary_dim=0, interleaved=False,
                   factor=1.0, causal=False, window=None, scale=None, q_off=None, k_off=None):
    """Straight from POSITIONS.md with Python floats. q_off/k_off: per-batch lists (default bottom-right).
    slopes: (B, Hq) nested list. Returns out (B, Hq, Nq, D) and lse (B, Hq, Nq) fp64 tensors."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k_off = [0] * B if k_off is None else list(k_off)
    q_off = [k_off[b] + Nk - Nq for b in range(B)] if q_off is None else list(q_off)
    qd, kd, vd = q.tolist(), k.tolist(), v.tolist()
    out = [[[[0.0] * D for _ in range(Nq)] for _ in range(Hq)] for _ in range(B)]
    lse = [[[-math.inf] * Nq for _ in range(Hq)] for _ in range(B)]
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for i in range(Nq):
                pq = q_off[b] + i
                qi = qd[b][h][i]
                if kind == "rope":
                    qi = _rope_vec(qi, pq, inv_freq, rotary_dim, interleaved, factor)
                scores, rows = [], []
                for j in range(Nk):
                    pk = k_off[b] + j
                    if causal and not pk <= pq:
                        continue
                    if window is not None and not pq - pk < window:
                        continue
                    kj = kd[b][hk][j]
                    if kind == "rope":
                        kj = _rope_vec(kj, pk, inv_freq, rotary_dim, interleaved, factor)
                    s = scale * sum(x * y for x, y in zip(qi, kj))
                    if kind == "alibi":
                        s += -slopes[b][h] * abs(pq - pk)
                    scores.append(s)
                    rows.append(vd[b][hk][j])
                if not scores:
                    continue
                m = max(scores)
                total = sum(math.exp(s - m) for s in scores)
                lse[b][h][i] = m + math.log(total)
                for s, vj in zip(scores, rows):
                    p = math.exp(s - lse[b][h][i])
                    for d in range(D):
                        out[b][h][i][d] += p * vj[d]
    return torch.tensor(out, dtype=F64), torch.tensor(lse, dtype=F64)


# --------------------------------------------------------------------------- pos = "none" vs SDPA


@pytest.mark.parametrize("b, hq, n, d", [(1, 1, 1, 4), (2, 3, 7, 8), (1, 2, 17, 16)])
def test_none_causal_square_matches_sdpa(b, hq, n, d):
    q, k, v = qkv(b, hq, hq, n, n, d)
    out, lse = ref(q, k, v, causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    assert_lse_close(lse, torch.logsumexp(scores, dim=-1))


@pytest.mark.parametrize("nq, nk", [(1, 9), (5, 3), (4, 11), (9, 1)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_none_noncausal_rectangular_matches_sdpa(nq, nk, scale):
    q, k, v = qkv(2, 2, 2, nq, nk, 8, seed=3)
    out, lse = ref(q, k, v, scale=scale)
    want = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    s = 1 / math.sqrt(8) if scale is None else scale
    assert_lse_close(lse, torch.logsumexp(s * (q @ k.transpose(-1, -2)), dim=-1))


def test_upcast_computes_in_fp64():
    q, k, v = qkv(1, 2, 1, 4, 6, 8, dtype=torch.float32)
    spec = AttentionSpec(causal=True, scale=0.25, window=None, q_offset=torch.tensor([2]),
                         k_offset=torch.tensor([0]), position=ResolvedPosition("none"))
    out, lse = attention_reference(q, k, v, spec)
    assert out.dtype == F64 and lse.dtype == F64
    want_out, want_lse = loop_attention(q.double(), k.double(), v.double(), causal=True, scale=0.25)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    assert_lse_close(lse, want_lse)
    out32, _ = attention_reference(q, k, v, spec, upcast=False)
    assert out32.dtype == torch.float32


# --------------------------------------------------------------------------- ALiBi vs a loop


ALIBI_CASES = [
    # (nq, nk, causal, window, q_off, k_off)
    (4, 4, True, None, None, None),
    (3, 6, True, None, None, None),
    (6, 3, True, None, None, None),        # first three rows see no key
    (4, 5, False, None, None, None),       # symmetric bidirectional bias
    (5, 5, True, 2, None, None),
    (4, 6, False, 3, None, None),          # left window without causal: future keys stay visible
    (3, 4, True, None, [5, 9], [2, 0]),   # per-batch offsets
    (3, 4, False, 2, [1, 7], [3, 3]),
    (1, 7, True, 4, None, None),           # decode with a window
]


@pytest.mark.parametrize("nq, nk, causal, window, q_off, k_off", ALIBI_CASES)
@pytest.mark.parametrize("custom_slopes", [False, True])
def test_alibi_matches_loop(nq, nk, causal, window, q_off, k_off, custom_slopes):
    b, hq, hkv, d = 2, 4, 2, 4
    q, k, v = qkv(b, hq, hkv, nq, nk, d, seed=nq * 10 + nk)
    if custom_slopes:
        slopes = torch.tensor([[0.9, 0.1, 0.0, 0.33], [0.25, 1.5, 0.7, 0.05]])
        pos = ALiBi(slopes)
    else:
        slopes = torch.tensor([[2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]] * b)  # 4-head default slopes
        pos = "alibi"
    kw = dict(causal=causal, window=window)
    if q_off is not None:
        kw.update(q_offset=torch.tensor(q_off), k_offset=torch.tensor(k_off))
    out, lse = ref(q, k, v, pos, **kw)
    want_out, want_lse = loop_attention(q, k, v, kind="alibi", slopes=slopes.double().tolist(), causal=causal,
                                        window=window, q_off=q_off, k_off=k_off)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    assert_lse_close(lse, want_lse)


def test_alibi_lse_is_of_the_symmetric_form():
    """Under causal masking +m*pk alone gives the same softmax but another LSE; ours is -m*|pq-pk|."""
    q, k, v = qkv(1, 1, 1, 1, 3, 2)
    q = torch.zeros_like(q)  # all dot products 0: scores are the bias alone
    _, lse = ref(q, k, v, ALiBi(torch.tensor([1.0])), causal=True)
    # one query at position 2, keys at 0, 1, 2: scores -2, -1, 0
    assert_lse_close(lse, torch.tensor([[[math.log(math.exp(-2) + math.exp(-1) + 1.0)]]], dtype=F64))


# --------------------------------------------------------------------------- RoPE vs complex numbers


def complex_rope(x, positions, inv_freq, rotary_dim, interleaved, factor=1.0):
    """x (B, H, N, D) fp64, positions (B, N) int: view rotation pairs as complex numbers and multiply by
    factor * exp(i * angle). The angle pos * inv_freq is formed in fp32 like the oracle documents."""
    r = rotary_dim
    rot, tail = x[..., :r], x[..., r:]
    if interleaved:
        z = torch.view_as_complex(rot.reshape(*rot.shape[:-1], r // 2, 2).contiguous())
    else:
        z = torch.complex(rot[..., : r // 2], rot[..., r // 2:])
    angle = (positions.to(torch.float32)[:, None, :, None] * inv_freq.to(torch.float32)).double()
    z = z * factor * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        rotated = torch.view_as_real(z).flatten(-2)
    else:
        rotated = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((rotated, tail), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d, rotary_dim", [(8, 8), (8, 4), (10, 6), (6, 2)])
@pytest.mark.parametrize("factor", [1.0, 1.3])
def test_apply_rope_matches_complex(interleaved, d, rotary_dim, factor):
    x = randn(2, 3, 7, d, seed=5)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [40, 3, 17, -2, 100, 1000, 8]])
    resolved = RoPE(rotary_dim=rotary_dim, interleaved=interleaved, attention_factor=factor) \
        .resolve(2, 3, d, 7, torch.device("cpu"))
    got = apply_rope(x, positions, resolved)
    want = complex_rope(x, positions, resolved.inv_freq, rotary_dim, interleaved, factor)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # partial rotary: the tail passes through bit-exactly, and x itself is not modified
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])
    assert torch.equal(x, randn(2, 3, 7, d, seed=5))


def test_rope_pairing_conventions_differ():
    """Rotate-half and interleaved are different maps (a swap of pairing would go unnoticed otherwise)."""
    x = randn(1, 1, 3, 8, seed=2)
    positions = torch.tensor([[1, 2, 3]])
    half = apply_rope(x, positions, RoPE().resolve(1, 1, 8, 3, torch.device("cpu")))
    inter = apply_rope(x, positions, RoPE(interleaved=True).resolve(1, 1, 8, 3, torch.device("cpu")))
    assert not torch.allclose(half, inter)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 4])
@pytest.mark.parametrize("causal, nq, nk, offsets", [(True, 5, 5, False), (False, 3, 6, False),
                                                      (True, 4, 6, True)])
def test_rope_attention_matches_sdpa_on_complex_rotated(interleaved, rotary_dim, causal, nq, nk, offsets):
    b, hq, d = 2, 2, 8
    q, k, v = qkv(b, hq, hq, nq, nk, d, seed=11)
    k_off = torch.tensor([3, 50]) if offsets else torch.zeros(b, dtype=torch.int64)
    q_off = k_off + (nk - nq)
    pos = RoPE(rotary_dim=rotary_dim, interleaved=interleaved)
    out, lse = ref(q, k, v, pos, causal=causal, q_offset=q_off, k_offset=k_off)
    r = d if rotary_dim is None else rotary_dim
    inv = pos.resolve(b, hq, d, nk, torch.device("cpu")).inv_freq
    pq = q_off[:, None] + torch.arange(nq)
    pk = k_off[:, None] + torch.arange(nk)
    qr, kr = complex_rope(q, pq, inv, r, interleaved), complex_rope(k, pk, inv, r, interleaved)
    mask = (pk[:, None, None, :] <= pq[:, None, :, None]) if causal else None
    want = F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    scores = (qr @ kr.transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    assert_lse_close(lse, torch.logsumexp(scores, dim=-1))


def test_rope_relative_property():
    """Rotary logits depend only on pq - pk: shifting both offsets by the same amount changes nothing."""
    q, k, v = qkv(1, 2, 2, 4, 4, 8, seed=4)
    a, la = ref(q, k, v, "rope", causal=True)
    b, lb = ref(q, k, v, "rope", causal=True, q_offset=37, k_offset=37)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(la.double(), lb.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factor", [0.5, 1.7])
def test_rope_attention_factor_scales_logits_by_square(factor):
    q, k, v = qkv(1, 2, 1, 4, 6, 8, seed=9)
    cpu = torch.device("cpu")
    base, scaled = RoPE(), RoPE(attention_factor=factor)
    positions_q, positions_k = torch.tensor([[2, 3, 4, 5]]), torch.arange(6)[None]
    s1 = apply_rope(q, positions_q, base.resolve(1, 2, 8, 6, cpu)) @ \
        apply_rope(k, positions_k, base.resolve(1, 2, 8, 6, cpu)).transpose(-1, -2)
    sf = apply_rope(q, positions_q, scaled.resolve(1, 2, 8, 6, cpu)) @ \
        apply_rope(k, positions_k, scaled.resolve(1, 2, 8, 6, cpu)).transpose(-1, -2)
    torch.testing.assert_close(sf, factor ** 2 * s1, rtol=1e-12, atol=1e-12)
    # and through the attention: equal to the unscaled rotation with scale * factor^2
    out_f, lse_f = ref(q, k, v, scaled, causal=True)
    out_1, lse_1 = ref(q, k, v, base, causal=True, scale=factor ** 2 / math.sqrt(8))
    torch.testing.assert_close(out_f, out_1, rtol=0, atol=1e-12)
    assert_lse_close(lse_f, lse_1)


def test_v_is_not_rotated():
    """With q = k = 0 every key gets the same weight: out is the plain mean of the visible v rows."""
    q, k, v = qkv(1, 1, 1, 3, 3, 4, seed=6)
    q, k = torch.zeros_like(q), torch.zeros_like(k)
    out, _ = ref(q, k, v, "rope", causal=True, q_offset=10, k_offset=10)
    want = torch.stack([v[0, 0, : i + 1].mean(0) for i in range(3)])
    torch.testing.assert_close(out[0, 0], want, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- half precision: exact positions

HALF = [torch.float16, torch.bfloat16]
CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_rope_rounds_only_the_rotation(dtype):
    """cos / sin come from the fp32 angle in fp32 and are rounded once: where an fp16 angle would be inf
    (past 65504) or a bf16 one off by up to 4 radians (near 1000), the half-precision rotation is the fp64
    one up to a few roundings of x's dtype (cos, sin, two products and a sum: < 4 eps of max |x|)."""
    x = randn(1, 2, 5, 8, seed=21, dtype=dtype)
    positions = torch.tensor([[0, 999, 1001, 4097, 70001]])
    resolved = RoPE().resolve(1, 2, 8, 5, CPU)
    got = apply_rope(x, positions, resolved)
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = apply_rope(x.double(), positions, resolved)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=4 * torch.finfo(dtype).eps * x.abs().max().item())


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_alibi_bias_is_rounded_once(dtype):
    """-m * |pq - pk| formed in fp32 and rounded to dtype once (half an eps), at distances a half-precision
    distance would round (bf16 past 256) or overflow (fp16 past 65504)."""
    pq, pk = torch.tensor([[1001, 4099, 70001]]), torch.tensor([[0, 3, 5, 1000]])
    slopes = torch.tensor([0.3, 2.0 ** -8])
    got = position_bias(pq, pk, ALiBi(slopes).resolve(1, 2, 8, 4, CPU), dtype)
    assert got.dtype == dtype and torch.isfinite(got).all()
    exact = -slopes.double()[None, :, None, None] * (pq[:, None, :, None] - pk[:, None, None, :]).abs().double()
    torch.testing.assert_close(got.double(), exact, rtol=torch.finfo(dtype).eps / 2 + 1e-6, atol=0)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("pos", ["rope", "alibi", "relative"])
def test_half_precision_reference_is_accurate_at_far_positions(dtype, pos):
    """The same-dtype reference that tests/tolerance.py measures kernels against differs from the fp64 one
    by the rounding of its matmuls only, also thousands of positions from the origin or the keys: its
    output within 2 eps of the output scale, its LSE within 2 eps of the LSE scale."""
    if pos == "relative":
        pos = RelativeBias(torch.randn(4, 32, generator=torch.Generator().manual_seed(3)))
    q, k, v = qkv(1, 4, 2, 16, 24, 16, seed=22, dtype=dtype)
    offsets = dict(q_offset=torch.tensor([4000]), k_offset=torch.tensor([1000 if pos == "alibi" else 3990]))
    out, lse = ref(q, k, v, pos, **offsets)
    out64, lse64 = ref(q.double(), k.double(), v.double(), pos, **offsets)
    eps = torch.finfo(dtype).eps
    for got, want in ((out, out64), (lse, lse64)):
        scale = max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= 2 * eps * scale


def test_half_precision_reference_dtypes():
    """upcast=False: out in the input dtype, lse in fp32 (the softmax runs in fp32 for half inputs)."""
    q, k, v = qkv(1, 2, 1, 4, 6, 8, dtype=torch.bfloat16)
    spec = AttentionSpec(causal=True, scale=0.25, window=None, q_offset=torch.tensor([2]),
                         k_offset=torch.tensor([0]), position=ALiBi().resolve(1, 2, 8, 6, CPU))
    out, lse = attention_reference(q, k, v, spec, upcast=False)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("pos", ["none", "alibi", "rope"])
def test_bottom_right_nq_lt_nk(pos):
    nq, nk = 3, 7
    q, k, v = qkv(2, 2, 2, nq, nk, 8, seed=12)
    out, lse = ref(q, k, v, pos, causal=True)
    full, full_lse = ref(q, k, v, pos, causal=False, q_offset=nk - nq)
    # the last query sees every key
    torch.testing.assert_close(out[:, :, -1], full[:, :, -1], rtol=0, atol=1e-12)
    assert_lse_close(lse[:, :, -1], full_lse[:, :, -1])
    # row i sees exactly keys 0 .. i + nk - nq: it equals attention restricted to those keys
    for i in range(nq):
        last = i + nk - nq + 1
        row, _ = ref(q[:, :, i:i + 1], k[:, :, :last], v[:, :, :last], pos, causal=False,
                     q_offset=i + nk - nq, k_offset=0)
        torch.testing.assert_close(out[:, :, i:i + 1], row, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pos", ["none", "alibi", "rope"])
def test_decode_sees_all_keys(pos):
    q, k, v = qkv(2, 4, 2, 1, 9, 8, seed=13)
    out, lse = ref(q, k, v, pos, causal=True)
    full, full_lse = ref(q, k, v, pos, causal=False)
    torch.testing.assert_close(out, full, rtol=0, atol=0)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=0)
    if pos == "none":
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                       v.repeat_interleave(2, 1)),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("pos", ["none", "alibi", "rope"])
def test_nq_gt_nk_rows_without_keys(pos):
    nq, nk = 6, 2
    q, k, v = qkv(2, 2, 1, nq, nk, 4, seed=14)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = ref(q, k, v, pos, causal=True)
    empty = nq - nk
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    assert torch.isneginf(lse[:, :, :empty]).all()
    assert torch.isfinite(lse[:, :, empty:]).all() and torch.isfinite(out).all()
    # the last nk rows are an ordinary square causal attention
    sq, _ = ref(q[:, :, empty:], k, v, pos, causal=True)
    torch.testing.assert_close(out[:, :, empty:], sq, rtol=0, atol=1e-12)
    (out * randn(*out.shape, seed=15)).sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), f"non-finite d{name}"
    assert torch.equal(q.grad[:, :, :empty], torch.zeros_like(q.grad[:, :, :empty]))


def test_all_rows_without_keys():
    q, k, v = qkv(1, 1, 1, 3, 3, 4)
    q.requires_grad_()
    out, lse = ref(q, k, v, "alibi", causal=True, q_offset=0, k_offset=10)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# --------------------------------------------------------------------------- GQA


@pytest.mark.parametrize("pos", ["none", "alibi", "rope"])
@pytest.mark.parametrize("hq, hkv", [(4, 2), (6, 1), (6, 3)])
def test_gqa_equals_repeated_kv(pos, hq, hkv):
    q, k, v = qkv(2, hq, hkv, 5, 7, 8, seed=16)
    k, v = k.requires_grad_(), v.requires_grad_()
    out, lse = ref(q, k, v, pos, causal=True, window=4)
    g = hq // hkv
    kr = k.detach().repeat_interleave(g, dim=1).requires_grad_()
    vr = v.detach().repeat_interleave(g, dim=1).requires_grad_()
    out_r, lse_r = ref(q, kr, vr, pos, causal=True, window=4)
    torch.testing.assert_close(out, out_r, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_r, rtol=0, atol=0)
    w = randn(*out.shape, seed=17)
    (out * w).sum().backward()
    (out_r * w).sum().backward()
    # head h reads kv head h // g: the grads of the repeated copies sum to the grouped grads
    torch.testing.assert_close(k.grad, kr.grad.unflatten(1, (hkv, g)).sum(2), rtol=0, atol=1e-12)
    torch.testing.assert_close(v.grad, vr.grad.unflatten(1, (hkv, g)).sum(2), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("pos", ["none", "alibi", "rope", "rope_partial_interleaved"])
@pytest.mark.parametrize("causal, window", [(True, None), (True, 2), (False, 2)])
def test_gradcheck(pos, causal, window):
    if pos == "rope_partial_interleaved":
        pos = RoPE(rotary_dim=2, interleaved=True)
    # Nq > Nk: with causal the first rows have no visible key
    q, k, v = qkv(2, 2, 1, 4, 3, 4, seed=18)
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    offsets = dict(q_offset=torch.tensor([-1, 4]), k_offset=torch.tensor([0, 2]))

    def fn(q, k, v):
        return fused_attention(q, k, v, pos, causal=causal, window=window, backend="reference", **offsets)

    out = fn(q, k, v)
    if causal:
        assert torch.equal(out[0, :, :1], torch.zeros_like(out[0, :, :1]))  # batch 0 row 0: no key
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# --------------------------------------------------------------------------- hypothesis property test


@st.composite
def attention_problems(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    nq, nk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d = draw(st.sampled_from([2, 4, 6, 8]))
    kind = draw(st.sampled_from(["none", "alibi", "rope"]))
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 5)))
    offsets = draw(st.sampled_from(["default", "int", "tensor"]))
    if offsets == "int":
        q_off, k_off = draw(st.integers(-4, 12)), draw(st.integers(0, 12))
    elif offsets == "tensor":
        q_off = draw(st.lists(st.integers(-4, 12), min_size=b, max_size=b))
        k_off = draw(st.lists(st.integers(0, 12), min_size=b, max_size=b))
    else:
        q_off = k_off = None
    rotary_dim = draw(st.sampled_from([r for r in range(2, d + 1, 2)]))
    interleaved = draw(st.booleans())
    per_batch_slopes = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return dict(b=b, hkv=hkv, hq=hq, nq=nq, nk=nk, d=d, kind=kind, causal=causal, window=window,
                q_off=q_off, k_off=k_off, rotary_dim=rotary_dim, interleaved=interleaved,
                per_batch_slopes=per_batch_slopes, seed=seed)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_problems())
def test_property_reference_matches_loop(p):
    b, hq, nq, nk, d = p["b"], p["hq"], p["nq"], p["nk"], p["d"]
    q, k, v = qkv(b, hq, p["hkv"], nq, nk, d, seed=p["seed"])
    loop_kw = dict(kind=p["kind"], causal=p["causal"], window=p["window"])
    if p["kind"] == "alibi":
        slopes = (torch.rand(b if p["per_batch_slopes"] else 1, hq,
                             generator=torch.Generator().manual_seed(p["seed"])) * 0.9 + 0.05)
        pos = ALiBi(slopes if p["per_batch_slopes"] else slopes[0])
        loop_kw["slopes"] = slopes.expand(b, hq).double().tolist()
    elif p["kind"] == "rope":
        pos = RoPE(rotary_dim=p["rotary_dim"], interleaved=p["interleaved"])
        r = p["rotary_dim"]
        loop_kw.update(inv_freq=[_f32(10000.0 ** (-2.0 * i / r)) for i in range(r // 2)], rotary_dim=r,
                       interleaved=p["interleaved"])
    else:
        pos = "none"

    kw = dict(causal=p["causal"], window=p["window"])
    if p["q_off"] is None:
        q_off_list = k_off_list = None
    elif isinstance(p["q_off"], int):
        kw.update(q_offset=p["q_off"], k_offset=p["k_off"])
        q_off_list, k_off_list = [p["q_off"]] * b, [p["k_off"]] * b
    else:
        kw.update(q_offset=torch.tensor(p["q_off"]), k_offset=torch.tensor(p["k_off"]))
        q_off_list, k_off_list = p["q_off"], p["k_off"]

    out, lse = ref(q, k, v, pos, **kw)
    want_out, want_lse = loop_attention(q, k, v, q_off=q_off_list, k_off=k_off_list, **loop_kw)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-9)
    assert_lse_close(lse, want_lse)

    # rows with a visible key: softmax weights sum to 1 (v = 1 -> out = 1); rows without: out 0, lse -inf
    ones_out, ones_lse = ref(q, k, torch.ones_like(v), pos, **kw)
    has_key = torch.isfinite(want_lse)
    expected = torch.where(has_key[..., None], 1.0, 0.0).to(F64).expand_as(ones_out)
    torch.testing.assert_close(ones_out, expected, rtol=0, atol=1e-12)
    assert torch.equal(torch.isneginf(ones_lse), ~has_key)
