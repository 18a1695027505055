"""Attention backward, FlashAttention-2 style: preprocess (delta = rowsum(dO * O) - dLSE), then dK/dV with a
program per key block, then dQ with a program per query block. Scores are recomputed from q, k and the
saved LSE; with RoPE the kernels work on rotated tiles and rotate dq, dk back (transposed rotation). The
relative scheme's bucket-table gradient comes from the dK/dV kernel: each program sums its tiles' score
gradients per bucket in registers and writes one partial row per query head, which the launcher sums (no
atomics: deterministic and contention-free). The packed layout (VARLEN) works as in the forward: the batch
index is the sequence, whose rows tiles.sequence_rows finds, and a block past its sequence's end does no work."""
import triton
import triton.language as tl

from .forward import key_block_range
from .position import (LOG2E, POS_ALIBI, POS_RELATIVE, add_relative_bucket_grad, alibi_slope_log2,
                       position_bias_log2, relative_positions, tile_distance, visible_mask)
from .tiles import load_qk_tiles, load_tile, qk_dot, sequence_rows, store_qk_grad, store_tile


@triton.jit
def _attn_bwd_preprocess_kernel(Out, DOut, Lse, DLse, Delta, CuSeqlensQ, stride_ob, stride_oh, stride_on, stride_od,
                                stride_dob, stride_doh, stride_don, stride_dod, num_heads, seq_len_q, max_seqlen_q,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
                                VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta (B, Hq, Nq) fp32 = sum_d dO * O - dLSE, the softmax-gradient row term. DLse (B, Hq, Nq) fp32, the
    gradient of the returned LSE, is read only when HAS_DLSE; rows with no visible key (LSE -inf) have P = 0
    everywhere, so their dLSE is ignored rather than let through as a NaN or inf."""
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    tb, q_start, len_q = sequence_rows(CuSeqlensQ, b, seq_len_q, max_seqlen_q, VARLEN, False)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < len_q
    o = load_tile(Out + tb * stride_ob + h * stride_oh + q_start * stride_on, offs_m, len_q, stride_on, stride_od,
                  offs_d, mask_d)
    do = load_tile(DOut + tb * stride_dob + h * stride_doh + q_start * stride_don, offs_m, len_q, stride_don,
                   stride_dod, offs_d, mask_d)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    rows = (tb * num_heads + h) * seq_len_q + q_start + offs_m
    if HAS_DLSE:
        visible = tl.load(Lse + rows, mask=mask_m, other=float("-inf")) != float("-inf")
        delta -= tl.load(DLse + rows, mask=visible, other=0.0)
    tl.store(Delta + rows, delta, mask=mask_m)


@triton.jit
def _score_probs(q_main, q_pass, k_main, k_pass, lse_log2, rel, offs_n, seq_len_k, qk_scale_log2, slope_log2,
                 RelBias, max_distance, window, HAS_PASS: tl.constexpr, POS: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Recomputed probabilities P (BLOCK_M, BLOCK_N) fp32 of a tile from (main, pass) q, k tiles, its
    relative positions rel and the row LSE (log2 domain; +inf for rows to skip, so their P is 0)."""
    s = qk_dot(q_main, q_pass, k_main, k_pass, HAS_PASS, DOT_PRECISION) * qk_scale_log2
    if POS == POS_ALIBI or POS == POS_RELATIVE:
        s += position_bias_log2(rel, slope_log2, RelBias, max_distance, POS)
    s = tl.where(visible_mask(rel, offs_n, seq_len_k, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
    return tl.math.exp2(s - lse_log2[:, None])


@triton.jit
def _load_row_stats(Lse, Delta, row_base, offs_m, seq_len_q):
    """LSE in the log2 domain (+inf for padded rows and rows with no visible key) and Delta."""
    mask_m = offs_m < seq_len_q
    lse = tl.load(Lse + row_base + offs_m, mask=mask_m, other=float("-inf"))
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
    return lse_log2, delta


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DOut, DK, DV, Lse, Delta, QOffset, KOffset, Slopes, InvFreq, RelBias, RelBuckets,
                          DRelTable, CuSeqlensQ, CuSeqlensK,
                          stride_qb, stride_qh, stride_qn, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_dob, stride_doh, stride_don, stride_dod,
                          stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                          stride_sb, stride_sh, stride_rh,
                          num_heads, num_kv_groups, seq_len_q, seq_len_k, sm_scale, window, attention_factor,
                          max_distance, num_buckets, max_seqlen_q, max_seqlen_k, len_bucket_q, len_bucket_k,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MAIN_BLOCK: tl.constexpr,
                          PASS_BLOCK: tl.constexpr, HAS_PASS: tl.constexpr, ROTARY_DIM: tl.constexpr,
                          POS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr, REL_GRAD: tl.constexpr,
                          NUM_BUCKETS_BLOCK: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """dK, dV (B, Hkv, Nk, D) for one key block of one kv head, summed over its query-head group (so no
    atomics). Query blocks that cannot see this key block are skipped.

    REL_GRAD (POS_RELATIVE only): also the key block's share of the bucket-table gradient, one row of
    DRelTable (key blocks, B, Hq, num_buckets) fp32 per query head, summed by the launcher (a key block past its
    sequence's end writes zeros). RelBuckets
    (2, max_distance + 1) int32 maps each distance-table entry to its bucket; NUM_BUCKETS_BLOCK is the
    power of two >= num_buckets that sizes the per-bucket register accumulator.
    """
    start_n = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    num_kv_heads = num_heads // num_kv_groups
    b = (batch_head // num_kv_heads).to(tl.int64)
    kv_h = (batch_head % num_kv_heads).to(tl.int64)
    tb, q_start, len_q = sequence_rows(CuSeqlensQ, b, seq_len_q, max_seqlen_q, VARLEN, False)
    _, k_start, len_k = sequence_rows(CuSeqlensK, b, seq_len_k, max_seqlen_k, VARLEN, False)
    if VARLEN:  # a block past its sequence's end (the grid covers the longest) visits no query and stores nothing
        len_q = tl.where(start_n < len_k, len_q, 0)
    q_off = tl.load(QOffset + b)
    k_off = tl.load(KOffset + b)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    k_main, k_pass = load_qk_tiles(K + tb * stride_kb + kv_h * stride_kh + k_start * stride_kn, offs_n, len_k,
                                   stride_kn, stride_kd, k_off + offs_n, InvFreq, attention_factor, HEAD_DIM,
                                   MAIN_BLOCK, PASS_BLOCK, HAS_PASS, ROTARY_DIM, POS, INTERLEAVED)
    v = load_tile(V + tb * stride_vb + kv_h * stride_vh + k_start * stride_vn, offs_n, len_k, stride_vn, stride_vd,
                  offs_d, mask_d)

    # Query rows that can see keys [start_n, n_end): i >= k_off - q_off + start_n (causal) and
    # i < k_off - q_off + n_end - 1 + window (window).
    n_end = tl.minimum(start_n + BLOCK_N, len_k)
    lo = tl.full([], 0, tl.int64)
    hi = tl.full([], 0, tl.int64) + len_q
    if CAUSAL:
        lo = tl.minimum(tl.maximum(k_off - q_off + start_n, 0), hi)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, tl.maximum(k_off - q_off + n_end - 1 + window, 0))
    lo = lo.to(tl.int32)
    hi = hi.to(tl.int32)

    dk_main = tl.zeros([BLOCK_N, MAIN_BLOCK], tl.float32)
    dk_pass = tl.zeros([BLOCK_N, PASS_BLOCK], tl.float32)  # used only when HAS_PASS
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale_log2 = sm_scale * LOG2E
    for g in range(0, num_kv_groups):
        h = kv_h * num_kv_groups + g
        slope_log2 = alibi_slope_log2(Slopes + b * stride_sb + h * stride_sh, POS)
        Qh = Q + tb * stride_qb + h * stride_qh + q_start * stride_qn
        DOh = DOut + tb * stride_dob + h * stride_doh + q_start * stride_don
        row_base = (tb * num_heads + h) * seq_len_q + q_start
        if REL_GRAD:
            d_rel = tl.zeros([NUM_BUCKETS_BLOCK], tl.float32)  # this head's bucket gradient from this key block
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_main, q_pass = load_qk_tiles(Qh, offs_m, len_q, stride_qn, stride_qd, q_off + offs_m, InvFreq,
                                           attention_factor, HEAD_DIM, MAIN_BLOCK, PASS_BLOCK, HAS_PASS, ROTARY_DIM,
                                           POS, INTERLEAVED)
            do = load_tile(DOh, offs_m, len_q, stride_don, stride_dod, offs_d, mask_d)
            lse_log2, delta = _load_row_stats(Lse, Delta, row_base, offs_m, len_q)
            rel = relative_positions(q_off + start_m, k_off + start_n, BLOCK_M, BLOCK_N)
            p = _score_probs(q_main, q_pass, k_main, k_pass, lse_log2, rel, offs_n, len_k, qk_scale_log2,
                             slope_log2, RelBias + h * stride_rh, max_distance, window, HAS_PASS, POS, CAUSAL,
                             HAS_WINDOW, DOT_PRECISION)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])  # dL/dscore (natural-log domain), exactly 0 where P is 0
            ds_t = tl.trans(ds.to(q_main.dtype))
            dk_main = tl.dot(ds_t, q_main, dk_main, input_precision=DOT_PRECISION)
            if HAS_PASS:
                dk_pass = tl.dot(ds_t, q_pass, dk_pass, input_precision=DOT_PRECISION)
            if REL_GRAD:  # the bias enters the score unscaled, so its gradient is ds; after the dots the q tiles
                # are dead, which keeps the per-bucket sums within the registers of every shipped config
                d_rel = add_relative_bucket_grad(d_rel, ds, tile_distance(q_off + start_m, k_off + start_n),
                                                 RelBuckets, max_distance, BLOCK_M, BLOCK_N, NUM_BUCKETS_BLOCK)
        if REL_GRAD:  # row (key block, b, h) of DRelTable: B * Hq = programs along axis 1 * num_kv_groups
            row = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + batch_head) * num_kv_groups + g
            buckets = tl.arange(0, NUM_BUCKETS_BLOCK)
            tl.store(DRelTable + row * num_buckets + buckets, d_rel, mask=buckets < num_buckets)
    _, k_start, len_k = sequence_rows(CuSeqlensK, b, seq_len_k, max_seqlen_k, VARLEN, True)  # not held in the loop
    # dk_main / dk_pass are w.r.t. the rotated k tiles; store_qk_grad rotates them back.
    store_qk_grad(DK + tb * stride_dkb + kv_h * stride_dkh + k_start * stride_dkn, offs_n, len_k, stride_dkn,
                  stride_dkd, dk_main * sm_scale, dk_pass * sm_scale, k_off + offs_n, InvFreq, attention_factor,
                  HEAD_DIM, MAIN_BLOCK, PASS_BLOCK, HAS_PASS, ROTARY_DIM, POS, INTERLEAVED)
    store_tile(DV + tb * stride_dvb + kv_h * stride_dvh + k_start * stride_dvn, dv, offs_n, len_k, stride_dvn,
               stride_dvd, offs_d, mask_d)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DOut, DQ, Lse, Delta, QOffset, KOffset, Slopes, InvFreq, RelBias, CuSeqlensQ,
                        CuSeqlensK,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_dob, stride_doh, stride_don, stride_dod,
                        stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                        stride_sb, stride_sh, stride_rh,
                        num_heads, num_kv_groups, seq_len_q, seq_len_k, sm_scale, window, attention_factor,
                        max_distance, max_seqlen_q, max_seqlen_k, len_bucket_q, len_bucket_k,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MAIN_BLOCK: tl.constexpr,
                        PASS_BLOCK: tl.constexpr, HAS_PASS: tl.constexpr, ROTARY_DIM: tl.constexpr,
                        POS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ (B, Hq, Nq, D) for one query block of one query head over the key blocks it can see."""
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    kv_h = h // num_kv_groups
    tb, q_start, len_q = sequence_rows(CuSeqlensQ, b, seq_len_q, max_seqlen_q, VARLEN, False)
    _, k_start, len_k = sequence_rows(CuSeqlensK, b, seq_len_k, max_seqlen_k, VARLEN, False)
    if VARLEN:  # a block past its sequence's end (the grid covers the longest) visits no key and stores nothing
        len_k = tl.where(start_m < len_q, len_k, 0)
    q_off = tl.load(QOffset + b)
    k_off = tl.load(KOffset + b)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_main, q_pass = load_qk_tiles(Q + tb * stride_qb + h * stride_qh + q_start * stride_qn, offs_m, len_q,
                                   stride_qn, stride_qd, q_off + offs_m, InvFreq, attention_factor, HEAD_DIM,
                                   MAIN_BLOCK, PASS_BLOCK, HAS_PASS, ROTARY_DIM, POS, INTERLEAVED)
    do = load_tile(DOut + tb * stride_dob + h * stride_doh + q_start * stride_don, offs_m, len_q, stride_don,
                   stride_dod, offs_d, mask_d)
    lse_log2, delta = _load_row_stats(Lse, Delta, (tb * num_heads + h) * seq_len_q + q_start, offs_m, len_q)
    slope_log2 = alibi_slope_log2(Slopes + b * stride_sb + h * stride_sh, POS)
    RelBias += h * stride_rh
    K += tb * stride_kb + kv_h * stride_kh + k_start * stride_kn
    V += tb * stride_vb + kv_h * stride_vh + k_start * stride_vn

    q_end = tl.minimum(start_m + BLOCK_M, len_q)
    lo, hi = key_block_range(start_m, q_end, q_off - k_off, len_k, window, BLOCK_N, CAUSAL, HAS_WINDOW)
    dq_main = tl.zeros([BLOCK_M, MAIN_BLOCK], tl.float32)
    dq_pass = tl.zeros([BLOCK_M, PASS_BLOCK], tl.float32)  # used only when HAS_PASS
    qk_scale_log2 = sm_scale * LOG2E
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_main, k_pass = load_qk_tiles(K, offs_n, len_k, stride_kn, stride_kd, k_off + offs_n, InvFreq,
                                       attention_factor, HEAD_DIM, MAIN_BLOCK, PASS_BLOCK, HAS_PASS, ROTARY_DIM, POS,
                                       INTERLEAVED)
        v = load_tile(V, offs_n, len_k, stride_vn, stride_vd, offs_d, mask_d)
        rel = relative_positions(q_off + start_m, k_off + start_n, BLOCK_M, BLOCK_N)
        p = _score_probs(q_main, q_pass, k_main, k_pass, lse_log2, rel, offs_n, len_k, qk_scale_log2, slope_log2,
                         RelBias, max_distance, window, HAS_PASS, POS, CAUSAL, HAS_WINDOW, DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k_main.dtype)
        dq_main = tl.dot(ds, k_main, dq_main, input_precision=DOT_PRECISION)
        if HAS_PASS:
            dq_pass = tl.dot(ds, k_pass, dq_pass, input_precision=DOT_PRECISION)
    tb, q_start, len_q = sequence_rows(CuSeqlensQ, b, seq_len_q, max_seqlen_q, VARLEN, True)  # not held in the loop
    # dq_main / dq_pass are w.r.t. the rotated q tiles; store_qk_grad rotates them back.
    store_qk_grad(DQ + tb * stride_dqb + h * stride_dqh + q_start * stride_dqn, offs_m, len_q, stride_dqn,
                  stride_dqd, dq_main * sm_scale, dq_pass * sm_scale, q_off + offs_m, InvFreq, attention_factor,
                  HEAD_DIM, MAIN_BLOCK, PASS_BLOCK, HAS_PASS, ROTARY_DIM, POS, INTERLEAVED)
