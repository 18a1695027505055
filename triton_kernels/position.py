"""Position math inside Triton kernels (mirrors csrc/include/fused_pos_attn/position.h).

Conventions (../shared/POSITIONS.md): scores live in the log2 domain inside the kernels, so ALiBi slopes
arrive pre-multiplied by log2(e). `rel` is always pq(i) - pk(j) for a (BLOCK_M, BLOCK_N) tile.
"""
import triton
import triton.language as tl

# Position scheme tags passed as the POS constexpr.
POS_NONE = tl.constexpr(0)
POS_ALIBI = tl.constexpr(1)
POS_ROPE = tl.constexpr(2)

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
def rope_tables(positions, InvFreq, rotary_dim, attention_factor, BLOCK_D: tl.constexpr,
                INTERLEAVED: tl.constexpr):
    """cos and signed sin tables (R, BLOCK_D) fp32 and the partner column index (BLOCK_D,) int32.

    positions: (R,) int64 absolute positions. Rotating a row x gives x * cos + x[partner] * signed_sin;
    columns >= rotary_dim get cos = 1, sin = 0 (pass-through, no attention factor). The angle
    pos * inv_freq is rounded to fp32 exactly as the reference does.
    """
    offs_d = tl.arange(0, BLOCK_D)
    half = rotary_dim // 2
    rotary = offs_d < rotary_dim
    if INTERLEAVED:
        freq_index = offs_d // 2
        partner = offs_d ^ 1
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        first_half = offs_d < half
        freq_index = tl.where(first_half, offs_d, offs_d - half)
        partner = tl.where(first_half, offs_d + half, offs_d - half)
        sign = tl.where(first_half, -1.0, 1.0)
    partner = tl.where(rotary, partner, offs_d)
    inv_freq = tl.load(InvFreq + freq_index, mask=rotary, other=0.0)
    angle = positions.to(tl.float32)[:, None] * inv_freq[None, :]
    cos = tl.where(rotary[None, :], tl.cos(angle) * attention_factor, 1.0)
    signed_sin = tl.where(rotary[None, :], tl.sin(angle) * (attention_factor * sign[None, :]), 0.0)
    return cos, signed_sin, partner


@triton.jit
def rope_rotate(x, cos, signed_sin, partner):
    """Rotate an fp32 tile x (R, BLOCK_D) in registers; pass -signed_sin for the transposed rotation
    (the backward maps d(rotated) back to d(original))."""
    x_partner = tl.gather(x, tl.broadcast_to(partner[None, :], x.shape), axis=1)
    return x * cos + x_partner * signed_sin


@triton.jit
def rope_rotate_tile(x, positions, InvFreq, rotary_dim, attention_factor, BLOCK_D: tl.constexpr,
                     INTERLEAVED: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Rotate a freshly loaded tile x (R, BLOCK_D) at positions (R,); returns fp32."""
    cos, signed_sin, partner = rope_tables(positions, InvFreq, rotary_dim, attention_factor, BLOCK_D,
                                           INTERLEAVED)
    if TRANSPOSED:
        signed_sin = -signed_sin
    return rope_rotate(x.to(tl.float32), cos, signed_sin, partner)
