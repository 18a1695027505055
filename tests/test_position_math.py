"""Three implementations of the position math agree on a grid: the C++ header position.h (evaluated by the
CPU op torch.ops.fused_pos_attn.position_probe; the CPU and CUDA kernels are built on it), the Triton helpers
of triton_kernels/position.py (through the probe kernels below: under TRITON_INTERPRET=1 without CUDA, on the
GPU otherwise) and the Python reference (fused_pos_attn/reference.py, positions.py).

The grid covers negative distances, window edges, distances past max_distance and |rel| beyond 2^31. The
kernels saturate tile distances at +-2^30 (position.h clamp_rel, Triton relative_positions); the reference
does not, so beyond that the reference is compared at the saturated distance.
"""
import math

import pytest
import torch

import fused_pos_attn._C  # noqa: F401  registers torch.ops.fused_pos_attn.*
from fused_pos_attn import RelativeBias
from fused_pos_attn.positions import ResolvedPosition, t5_bucket
from fused_pos_attn.reference import apply_rope, position_bias, visibility

try:
    import triton
    import triton.language as tl

    from fused_pos_attn.triton_kernels import position as tpos
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

CLAMP = 1 << 30
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if not hasattr(torch.ops.fused_pos_attn, "position_probe"):
    pytest.skip("the installed extension predates position_probe: rebuild it", allow_module_level=True)

# Signed distances rel = pq - pk: small, around windows and max_distance, past int32 and near int64's ends.
REL = sorted({*range(-20, 21), 99, 100, 101, -99, -100, -101, CLAMP - 1, CLAMP, CLAMP + 1, -CLAMP - 1, -CLAMP,
              2 ** 31 - 1, 2 ** 31, 2 ** 31 + 5, -(2 ** 31), -(2 ** 31) - 5, 3 * 10 ** 9, -3 * 10 ** 9, 2 ** 40,
              -(2 ** 40), 2 ** 62, -(2 ** 62)})
WINDOWS = (0, 1, 7, 100)  # 0: no window
MAX_DISTANCE = 12


def clamp(x: int) -> int:
    return max(-CLAMP, min(CLAMP, x))


def probe(rel, slopes=None, positions=(0,), inv_freq=(0.0,), head_dim=8, rotary_dim=8, interleaved=False,
          max_distance=MAX_DISTANCE, causal=False, window=0, seq_k=40):
    """position.h's helpers on a grid, as a dict of CPU tensors."""
    rel = torch.tensor(rel, dtype=torch.int64)
    slopes = torch.full(rel.shape, 0.5) if slopes is None else torch.as_tensor(slopes, dtype=torch.float32)
    out = torch.ops.fused_pos_attn.position_probe(
        rel, slopes, torch.tensor(positions, dtype=torch.int64), torch.tensor(inv_freq, dtype=torch.float32),
        head_dim, rotary_dim, interleaved, max_distance, causal, window, seq_k)
    names = ("clamped", "alibi", "visible", "bias_index", "key_first", "key_last", "rope_partner", "rope_freq_index",
             "rope_sign", "angle")
    return dict(zip(names, out))


# ------------------------------------------------------------------------------------------------ C++ vs Python

def test_clamp_rel():
    assert probe(REL)["clamped"].tolist() == [clamp(r) for r in REL]


@pytest.mark.parametrize("slope", [0.5, 2.0 ** -8, 0.3])
def test_alibi_bias_matches_reference(slope):
    """Bit-exact in fp32 (both form -slope * float(|rel|)), at the saturated distance beyond 2^30."""
    cpp = probe(REL, slopes=[slope] * len(REL))["alibi"]
    pq = torch.tensor([[clamp(r) for r in REL]], dtype=torch.int64)
    ref = position_bias(pq, torch.zeros(1, 1, dtype=torch.int64),
                        ResolvedPosition("alibi", slopes=torch.tensor([[slope]])), torch.float32)[0, 0, :, 0]
    assert torch.equal(cpp, ref)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_key_visible_matches_reference(causal, window):
    cpp = probe(REL, causal=causal, window=window)["visible"]
    pq = torch.tensor([REL], dtype=torch.int64)
    ref = visibility(pq, torch.zeros(1, 1, dtype=torch.int64), causal, window or None)[0, 0, :, 0]
    assert torch.equal(cpp, ref)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_visible_keys_is_the_visible_interval(causal, window):
    """visible_keys(q_pos, k_offset=0, seq_k) is exactly the set of keys the reference's mask shows."""
    seq_k = 40
    q_pos = list(range(-10, 60)) + [10 ** 12, -(10 ** 12)]
    got = probe(q_pos, causal=causal, window=window, seq_k=seq_k)
    mask = visibility(torch.tensor([q_pos]), torch.arange(seq_k)[None], causal, window or None)[0, 0]
    for i, row in enumerate(mask):
        first, last = got["key_first"][i].item(), got["key_last"][i].item()
        keys = row.nonzero().flatten().tolist()
        if keys:
            assert (first, last) == (keys[0], keys[-1] + 1) and len(keys) == last - first, q_pos[i]
        else:
            assert first == last and 0 <= first <= seq_k, q_pos[i]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_bias_index_matches_t5_buckets(bidirectional):
    """The distance table (RelativeBias's fold) indexed by relative_bias_index gives table[h, bucket(pk - pq)]
    of the reference's T5 formula at every distance, including past max_distance and beyond int32."""
    table = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    resolved = RelativeBias(table, MAX_DISTANCE, bidirectional).resolve(1, 3, 8, 10, torch.device("cpu"))
    index = probe(REL)["bias_index"]
    kernel = resolved.rel_bias.reshape(3, -1)[:, index]
    buckets = t5_bucket(-torch.tensor(REL, dtype=torch.int64), bidirectional, 16, MAX_DISTANCE)
    assert torch.equal(kernel, table[:, buckets])


@pytest.mark.parametrize("rotary_dim", [8, 4, 2])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_columns_match_reference_rotation(rotary_dim, interleaved):
    """x'[d] = x[d] cos + x[partner(d)] sign(d) sin with position.h's rope_column reproduces apply_rope on
    every basis vector (pass-through columns: partner d, sign 0)."""
    head_dim, pos = 8, 3
    got = probe([0], head_dim=head_dim, rotary_dim=rotary_dim, interleaved=interleaved)
    partner, freq_index, sign = got["rope_partner"], got["rope_freq_index"], got["rope_sign"]
    inv_freq = torch.tensor([0.7 ** i for i in range(rotary_dim // 2)], dtype=torch.float32)
    position = ResolvedPosition("rope", inv_freq=inv_freq, rotary_dim=rotary_dim, interleaved=interleaved)
    basis = torch.eye(head_dim, dtype=torch.float64)[None, None]  # (1, 1, D, D): row c is e_c
    rotated = apply_rope(basis, torch.full((1, head_dim), pos), position)[0, 0]
    for c in range(head_dim):
        expected = torch.zeros(head_dim, dtype=torch.float64)
        angle = torch.tensor(pos, dtype=torch.float32) * inv_freq[freq_index[c]]
        if c < rotary_dim:
            expected[c] = math.cos(angle.item())  # e_c contributes cos to itself ...
            p = partner[c].item()  # ... and sign(p) sin to its partner p, whose partner is c
            assert partner[p] == c and freq_index[p] == freq_index[c] and sign[p] == -sign[c] != 0
            expected[p] = sign[p].item() * math.sin(angle.item())
        else:
            assert partner[c] == c and sign[c] == 0
            expected[c] = 1.0
        assert torch.allclose(rotated[c], expected, atol=1e-12), c


def test_rope_angle_is_fp32_product_like_reference():
    positions = [0, 1, 17, 4095, 131071, 10 ** 6, 3 * 10 ** 9, -5]
    inv_freq = [1.0, 0.1, 1e-4, 0.37, 3.3e-3, 1e-6, 1e-9, 0.5]
    got = probe([0], positions=positions, inv_freq=inv_freq)["angle"]
    ref = torch.tensor(positions, dtype=torch.int64).to(torch.float32) * torch.tensor(inv_freq)
    assert torch.equal(got, ref)


# ------------------------------------------------------------------------------------------ C++ vs Triton helpers

if HAS_TRITON:
    @triton.jit
    def _tile_probe_kernel(QStart, KStart, Slope, Rel, Alibi, Visible, Index, window, seq_len_k, max_distance,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                           HAS_WINDOW: tl.constexpr):
        """One program per tile origin (QStart[i], KStart[i]): the tile's rel, ALiBi bias (natural units),
        visibility and relative-table index, each (BLOCK_M, BLOCK_N)."""
        i = tl.program_id(0)
        rel = tpos.relative_positions(tl.load(QStart + i), tl.load(KStart + i), BLOCK_M, BLOCK_N)
        offs = i * BLOCK_M * BLOCK_N + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        slope_log2 = tpos.alibi_slope_log2(Slope + i, tpos.POS_ALIBI)
        tl.store(Rel + offs, rel)
        tl.store(Alibi + offs, tpos.alibi_bias_log2(rel, slope_log2) * tpos.LN2)
        visible = tpos.visible_mask(rel, tl.arange(0, BLOCK_N), seq_len_k, window, CAUSAL, HAS_WINDOW)
        tl.store(Visible + offs, visible.to(tl.int8))
        tl.store(Index + offs, tpos.relative_bias_index(rel, max_distance))

    @triton.jit
    def _rope_probe_kernel(Positions, InvFreq, Column, Real, Cos, Sin, attention_factor, N: tl.constexpr,
                           MAIN_BLOCK: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
        """Paired-layout columns of a rotary tile, and cos / sin (N, MAIN_BLOCK // 2) at N positions."""
        column, real = tpos.rope_pair_columns(MAIN_BLOCK, ROTARY_DIM, INTERLEAVED)
        slots = tl.arange(0, MAIN_BLOCK)
        tl.store(Column + slots, column)
        tl.store(Real + slots, real.to(tl.int8))
        cos, sin = tpos.rope_cos_sin(tl.load(Positions + tl.arange(0, N)), InvFreq, attention_factor,
                                     MAIN_BLOCK // 2, ROTARY_DIM)
        offs = tl.arange(0, N)[:, None] * (MAIN_BLOCK // 2) + tl.arange(0, MAIN_BLOCK // 2)[None, :]
        tl.store(Cos + offs, cos)
        tl.store(Sin + offs, sin)


# Tile origins whose q_start - k_start spans small, window-edge, saturated and beyond-int32 differences.
ORIGINS = [(0, 0), (5, 0), (0, 5), (10, 3), (3, 10), (100, 0), (0, 100), (CLAMP, 0), (CLAMP + 7, 0), (0, CLAMP + 7),
           (3 * 10 ** 9, 0), (0, 3 * 10 ** 9), (3 * 10 ** 9 + 4, 3 * 10 ** 9), (2 ** 40, 2 ** 40 + 9), (2 ** 62, 0)]


def _triton_tiles(causal: bool, window: int, block: int = 8, seq_len_k: int = 6):
    n = len(ORIGINS)
    dev = dict(device=DEVICE)
    q_start = torch.tensor([o[0] for o in ORIGINS], dtype=torch.int64, **dev)
    k_start = torch.tensor([o[1] for o in ORIGINS], dtype=torch.int64, **dev)
    slope = torch.linspace(0.01, 1.0, n, **dev)
    rel = torch.empty(n, block, block, dtype=torch.int32, **dev)
    alibi = torch.empty(n, block, block, **dev)
    visible = torch.empty(n, block, block, dtype=torch.int8, **dev)
    index = torch.empty(n, block, block, dtype=torch.int32, **dev)
    _tile_probe_kernel[(n,)](q_start, k_start, slope, rel, alibi, visible, index, window, seq_len_k, MAX_DISTANCE,
                             BLOCK_M=block, BLOCK_N=block, CAUSAL=causal, HAS_WINDOW=window > 0)
    return slope.cpu(), rel.cpu().long(), alibi.cpu(), visible.cpu().bool(), index.cpu().long()


@needs_triton
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_tile_helpers_match_header(causal, window):
    block, seq_len_k = 8, 6
    slope, rel, alibi, visible, index = _triton_tiles(causal, window, block, seq_len_k)
    offsets = torch.arange(block)[:, None] - torch.arange(block)[None, :]
    for i, (q_start, k_start) in enumerate(ORIGINS):
        expected_rel = clamp(q_start - k_start) + offsets  # saturated tile origin, then the in-tile offsets
        assert torch.equal(rel[i], expected_rel), ORIGINS[i]
        flat = expected_rel.flatten().tolist()
        got = probe(flat, slopes=[slope[i].item()] * len(flat), causal=causal, window=window)
        assert torch.allclose(alibi[i].flatten(), got["alibi"], rtol=1e-6, atol=0), ORIGINS[i]
        in_range = (torch.arange(block) < seq_len_k)[None, :].expand(block, block).flatten()
        assert torch.equal(visible[i].flatten(), got["visible"] & in_range), ORIGINS[i]
        assert torch.equal(index[i].flatten(), got["bias_index"]), ORIGINS[i]


@needs_triton
@pytest.mark.parametrize("rotary_dim,main_block", [(8, 8), (12, 16), (4, 8)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_triton_rope_helpers_match_header(rotary_dim, main_block, interleaved):
    positions = [0, 1, 17, 4095, 131071, 10 ** 6, 3 * 10 ** 7, 12345]  # N must be a power of two
    inv_freq = torch.tensor([0.9 ** i for i in range(rotary_dim // 2)], dtype=torch.float32)
    factor = 1.25
    column = torch.empty(main_block, dtype=torch.int32, device=DEVICE)
    real = torch.empty(main_block, dtype=torch.int8, device=DEVICE)
    cos = torch.empty(len(positions), main_block // 2, device=DEVICE)
    sin = torch.empty_like(cos)
    _rope_probe_kernel[(1,)](torch.tensor(positions, device=DEVICE), inv_freq.to(DEVICE), column, real, cos, sin,
                             factor, N=len(positions), MAIN_BLOCK=main_block, ROTARY_DIM=rotary_dim,
                             INTERLEAVED=interleaved)
    column, real, cos, sin = column.cpu().long(), real.cpu().bool(), cos.cpu(), sin.cpu()
    head_dim = max(rotary_dim, main_block)
    got = probe([0], head_dim=head_dim, rotary_dim=rotary_dim, interleaved=interleaved)
    pairs = rotary_dim // 2
    assert real.tolist() == [slot // 2 < pairs for slot in range(main_block)]
    assert sorted(column[real].tolist()) == list(range(rotary_dim))
    for p in range(pairs):  # slot 2p holds the pair's first column (sign -1), slot 2p + 1 its partner
        first, second = column[2 * p].item(), column[2 * p + 1].item()
        assert (got["rope_partner"][first], got["rope_freq_index"][first], got["rope_sign"][first]) == (second, p, -1)
        assert (got["rope_partner"][second], got["rope_freq_index"][second], got["rope_sign"][second]) == (first, p, 1)
    # cos / sin of the header's fp32 angle (the same for every backend), times the attention factor.
    pos_grid = [pos for pos in positions for _ in range(pairs)]
    freq_grid = inv_freq.repeat(len(positions)).tolist()
    angle = probe([0], positions=pos_grid, inv_freq=freq_grid)["angle"].reshape(len(positions), pairs).double()
    assert torch.allclose(cos[:, :pairs].double(), torch.cos(angle) * factor, atol=2e-6, rtol=0)
    assert torch.allclose(sin[:, :pairs].double(), torch.sin(angle) * factor, atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------ Triton relative gradient

if HAS_TRITON:
    @triton.jit
    def _bucket_grad_probe_kernel(DS, Diag, RelBuckets, Out, max_distance, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, NUM_BUCKETS_BLOCK: tl.constexpr):
        """Program i: the per-bucket sums (NUM_BUCKETS_BLOCK,) of tile DS[i] (BLOCK_M, BLOCK_N) at tile distance
        Diag[i], from a zero accumulator."""
        i = tl.program_id(0)
        offs = i * BLOCK_M * BLOCK_N + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        acc = tpos.add_relative_bucket_grad(tl.zeros([NUM_BUCKETS_BLOCK], tl.float32), tl.load(DS + offs),
                                            tl.load(Diag + i), RelBuckets, max_distance, BLOCK_M, BLOCK_N,
                                            NUM_BUCKETS_BLOCK)
        tl.store(Out + i * NUM_BUCKETS_BLOCK + tl.arange(0, NUM_BUCKETS_BLOCK), acc)


# Tile distances: inside the exact buckets, across rel = 0, straddling and past max_distance on both sides, saturated.
TILE_DISTANCES = [0, 3, -3, 11, -11, 12, -12, 20, -40, 200, -200, CLAMP, -CLAMP]


def _bucket_map(kind: str) -> tuple[torch.Tensor, int]:
    """(2, MAX_DISTANCE + 1) int32 bucket of each distance-table entry, and the bucket count: T5's 16 buckets,
    16 monotone on each side but shared by both (so equal end buckets alone do not make a tile one bucket), or
    32 (the most the Triton backward takes) with gaps."""
    distance = torch.arange(MAX_DISTANCE + 1, dtype=torch.int32)
    if kind == "shared_ids":
        return distance.expand(2, -1).contiguous(), 16
    if kind == "spread_32":
        return torch.stack((distance, 31 - distance.flip(0))), 32
    position = RelativeBias(torch.zeros(1, 16), MAX_DISTANCE, kind == "bidirectional").resolve(
        1, 1, 8, 10, torch.device("cpu"))
    return position.rel_buckets, 16


@needs_triton
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 16), (32, 32), (16, 32)])  # interpreter + dK/dV configs
@pytest.mark.parametrize("buckets", ["bidirectional", "causal", "shared_ids", "spread_32"])
def test_triton_bucket_grad_sums_each_bucket(block_m, block_n, buckets):
    """add_relative_bucket_grad gives, per bucket, the sum of the tile elements whose distance falls in it:
    tiles in one bucket (one sum) and tiles spanning several (diagonal sums), against a scatter-add in fp64."""
    bucket_map, num_buckets = _bucket_map(buckets)
    diag = torch.tensor(TILE_DISTANCES, dtype=torch.int32)
    ds = torch.randn(len(diag), block_m, block_n, generator=torch.Generator().manual_seed(block_m + block_n))
    out = torch.empty(len(diag), num_buckets, device=DEVICE)
    _bucket_grad_probe_kernel[(len(diag),)](ds.to(DEVICE), diag.to(DEVICE), bucket_map.to(DEVICE), out,
                                            MAX_DISTANCE, BLOCK_M=block_m, BLOCK_N=block_n,
                                            NUM_BUCKETS_BLOCK=num_buckets)
    rel = diag.long()[:, None, None] + torch.arange(block_m)[:, None] - torch.arange(block_n)[None, :]
    index = probe(rel.flatten().tolist())["bias_index"].reshape(len(diag), -1)  # position.h's table index
    bucket = bucket_map.flatten().long()[index]
    want = torch.zeros(len(diag), num_buckets, dtype=torch.float64).scatter_add_(1, bucket,
                                                                                 ds.double().reshape(len(diag), -1))
    assert torch.allclose(out.cpu().double(), want, atol=1e-4, rtol=0)  # fp32 sums of up to 1024 terms
    assert (bucket.min(1).values != bucket.max(1).values).sum() >= 4  # several tiles span more than one bucket


@needs_triton
def test_triton_scheme_tags_come_from_the_one_table():
    from fused_pos_attn.triton_kernels.scheme_codes import SCHEME_CODES
    tags = {name: getattr(tpos, f"POS_{name.upper()}").value for name in SCHEME_CODES}
    assert tags == SCHEME_CODES
