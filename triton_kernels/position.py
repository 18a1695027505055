"""Position math inside Triton kernels (mirrors csrc/include/fused_pos_attn/position.h).

Conventions (../shared/POSITIONS.md): scores live in the log2 domain inside the kernels, so ALiBi slopes
arrive pre-multiplied by log2(e) and relative biases are multiplied by it when loaded. `rel` is always
pq(i) - pk(j) for a (BLOCK_M, BLOCK_N) tile.
"""
import triton
import triton.language as tl

# Position scheme tags passed as the POS constexpr.
POS_NONE = tl.constexpr(0)
POS_ALIBI = tl.constexpr(1)
POS_ROPE = tl.constexpr(2)
POS_RELATIVE = tl.constexpr(3)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Tile-relative distances are clamped to +-2^30 so int64 offsets never overflow int32 tile math.
REL_CLAMP = tl.constexpr(1 << 30)


@triton.jit
def relative_positions(q_start, k_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) int32 pq(i) - pk(j) of a tile whose first query / key sit at the int64
    absolute positions q_start / k_start (saturating at +-2^30)."""
    diag = tl.minimum(tl.maximum(q_start - k_start, -REL_CLAMP), REL_CLAMP).to(tl.int32)
    return diag + (tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :])


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
