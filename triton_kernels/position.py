"""Position math inside Triton kernels (mirrors csrc/include/fused_pos_attn/position.h).

Conventions (../shared/POSITIONS.md): scores live in the log2 domain inside the kernels, so ALiBi slopes
arrive pre-multiplied by log2(e) and relative biases are multiplied by it when loaded. `rel` is always
pq(i) - pk(j) for a (BLOCK_M, BLOCK_N) tile.
"""
import triton
import triton.language as tl

from .scheme_codes import SCHEME_CODES

# Position scheme tags passed as the POS constexpr, from the one table of scheme codes.
POS_NONE = tl.constexpr(SCHEME_CODES["none"])
POS_ALIBI = tl.constexpr(SCHEME_CODES["alibi"])
POS_ROPE = tl.constexpr(SCHEME_CODES["rope"])
POS_RELATIVE = tl.constexpr(SCHEME_CODES["relative"])

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Tile-relative distances are clamped to +-2^30 so int64 offsets never overflow int32 tile math.
REL_CLAMP = tl.constexpr(1 << 30)


@triton.jit
def tile_distance(q_start, k_start):
    """int32 pq - pk of a tile's first query and key, at int64 absolute positions q_start / k_start,
    saturated at +-2^30."""
    return tl.minimum(tl.maximum(q_start - k_start, -REL_CLAMP), REL_CLAMP).to(tl.int32)


@triton.jit
def relative_positions(q_start, k_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) int32 pq(i) - pk(j) of a tile whose first query / key sit at the int64
    absolute positions q_start / k_start (the tile distance saturating at +-2^30)."""
    return tile_distance(q_start, k_start) + (tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :])


@triton.jit
def visible_mask(rel, offs_n, seq_len_k, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key in range, and causal / left-window conditions on rel = pq - pk."""
    visible = (offs_n < seq_len_k)[None, :]
    if CAUSAL:
        visible = visible & (rel >= 0)
    if HAS_WINDOW:
        visible = visible & (rel < window)
    return visible


@triton.jit
def alibi_slope_log2(SlopePtr, POS: tl.constexpr):
    """The head's ALiBi slope times log2(e) (0 for other schemes, whose slopes are never read)."""
    slope_log2 = 0.0
    if POS == POS_ALIBI:
        slope_log2 = tl.load(SlopePtr) * LOG2E
    return slope_log2


@triton.jit
def alibi_bias_log2(rel, slope_log2):
    """ALiBi bias -m * |pq - pk| in the log2 domain (slope_log2 = m * log2(e))."""
    return -slope_log2 * tl.abs(rel).to(tl.float32)


@triton.jit
def relative_bias_index(rel, max_distance):
    """Index into one head's (2, max_distance + 1) relative bias table (position.h relative_bias_index):
    row 0 for keys at or before the query (rel >= 0), row 1 after it, column min(|rel|, max_distance)."""
    return tl.where(rel < 0, max_distance + 1, 0) + tl.minimum(tl.abs(rel), max_distance)


@triton.jit
def add_relative_bucket_grad(acc, ds, diag, RelBuckets, max_distance, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             NUM_BUCKETS_BLOCK: tl.constexpr):
    """acc (NUM_BUCKETS_BLOCK,) fp32 plus the tile's score gradient ds (BLOCK_M, BLOCK_N) fp32 summed per bucket.

    Element (i, j) sits at distance rel = diag + i - j (diag: the tile's tile_distance, as in
    relative_positions); RelBuckets (2, max_distance + 1) int32 holds the bucket of each
    relative_bias_index. Buckets are monotone in the distance on each side of rel = 0, so a tile whose end
    distances share a side and a bucket lies in that bucket entirely (every tile farther than max_distance,
    most tiles in the wide logarithmic buckets): one sum. Other tiles are summed per diagonal first (a
    diagonal shares one rel), then the diagonals per bucket, with no atomics and a fixed summation order.
    """
    buckets = tl.arange(0, NUM_BUCKETS_BLOCK)
    rel_lo = diag - (BLOCK_N - 1)  # the tile spans distances [rel_lo, rel_hi]
    rel_hi = diag + (BLOCK_M - 1)
    first = tl.load(RelBuckets + relative_bias_index(rel_lo, max_distance))
    last = tl.load(RelBuckets + relative_bias_index(rel_hi, max_distance))
    if (first == last) & ((rel_lo >= 0) | (rel_hi < 0)):
        acc += tl.where(buckets == first, tl.sum(tl.sum(ds, 1), 0), 0.0)
    else:
        # Diagonal c holds the elements with i - j = c - (BLOCK_N - 1), at distance rel_lo + c: element (c, j) of
        # the skewed tile is ds[c + j - (BLOCK_N - 1), j], 0 where that row is off the tile. DIAGS, a power of two
        # >= BLOCK_M + BLOCK_N - 1, covers every diagonal. (A skew along rows, gathering columns into a (BLOCK_M,
        # DIAGS) tile, is larger when BLOCK_M > BLOCK_N and spilled on sm_90 at 16 x 32.)
        DIAGS: tl.constexpr = 2 * BLOCK_M if BLOCK_M >= BLOCK_N else 2 * BLOCK_N
        diags = tl.arange(0, DIAGS)
        rows = diags[:, None] + tl.arange(0, BLOCK_N)[None, :] - (BLOCK_N - 1)  # (DIAGS, BLOCK_N)
        on_tile = (rows >= 0) & (rows < BLOCK_M)
        diag_sums = tl.sum(tl.where(on_tile, tl.gather(ds, tl.where(on_tile, rows, 0), 0), 0.0), 1)  # (DIAGS,)
        diag_buckets = tl.load(RelBuckets + relative_bias_index(rel_lo + diags, max_distance))
        acc += tl.sum(tl.where(diag_buckets[:, None] == buckets[None, :], diag_sums[:, None], 0.0), 0)
    return acc


@triton.jit
def position_bias_log2(rel, slope_log2, RelBias, max_distance, POS: tl.constexpr):
    """Additive score bias of a tile in the log2 domain: ALiBi from the slope, relative from the head's
    table RelBias (2, max_distance + 1); 0 for the other schemes."""
    if POS == POS_ALIBI:
        return alibi_bias_log2(rel, slope_log2)
    else:
        return tl.load(RelBias + relative_bias_index(rel, max_distance)) * LOG2E


@triton.jit
def rope_pair_columns(MAIN_BLOCK: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Head-dim column of each slot of a rotary tile in paired layout, and which slots are real.

    Slot j holds member j % 2 of rotation pair j // 2: rotate-half pairs columns (p, p + r/2),
    interleaved pairs (2p, 2p + 1). q and k share this column order, so q.k is unchanged by it.
    """
    slot = tl.arange(0, MAIN_BLOCK)
    pair = slot // 2
    member = slot % 2
    if INTERLEAVED:
        column = 2 * pair + member
    else:
        column = pair + member * (ROTARY_DIM // 2)
    return column, pair < ROTARY_DIM // 2


@triton.jit
def rope_cos_sin(positions, InvFreq, attention_factor, HALF_BLOCK: tl.constexpr, ROTARY_DIM: tl.constexpr):
    """cos, sin (R, HALF_BLOCK) fp32 of pair p at positions (R,) int64, times the attention factor.

    The angle pos * inv_freq is rounded to fp32 exactly as the reference does."""
    pair = tl.arange(0, HALF_BLOCK)
    inv_freq = tl.load(InvFreq + pair, mask=pair < ROTARY_DIM // 2, other=0.0)
    angle = positions.to(tl.float32)[:, None] * inv_freq[None, :]
    return tl.cos(angle) * attention_factor, tl.sin(angle) * attention_factor


@triton.jit
def rope_rotate_pairs(x, cos, sin, TRANSPOSED: tl.constexpr):
    """Rotate a paired-layout tile x (R, 2 * HALF_BLOCK) in registers: (a, b) -> (a c - b s, b c + a s).
    TRANSPOSED applies the inverse rotation (angle -> -angle), mapping gradients w.r.t. rotated rows back."""
    first, second = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], x.shape[1] // 2, 2)))
    if TRANSPOSED:
        sin = -sin
    return tl.reshape(tl.join(first * cos - second * sin, second * cos + first * sin), x.shape)
