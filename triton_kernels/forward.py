"""Attention forward: one program per (query block, batch * query head), online softmax over key blocks. In the
packed layout (VARLEN) the batch is the sequence: a program per (query block of max_seqlen_q, sequence * query
head), over its own sequence's rows and keys only."""
import triton
import triton.language as tl

from .position import (LN2, LOG2E, POS_ALIBI, POS_RELATIVE, alibi_slope_log2, position_bias_log2, tile_distance,
                       visible_mask)
from .tiles import key_rows, load_qk_tiles, load_tile, qk_dot, sequence_rows, store_tile


@triton.jit
def key_block_range(q_start, q_end, delta, seq_len_k, window, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key range [lo, hi) (int32, lo a multiple of BLOCK_N) that query rows [q_start, q_end) can see.

    delta = q_offset - k_offset (int64): key j is left of query i iff j <= delta + i.
    """
    hi = tl.full([], 0, tl.int64) + seq_len_k
    lo = tl.full([], 0, tl.int64)
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(delta + q_end, 0))
    if HAS_WINDOW:
        lo = tl.minimum(tl.maximum(delta + q_start - window + 1, 0), hi)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q_main, q_pass, K, V, InvFreq, RelBias, BlockTable, stride_kn, stride_kd,
                    stride_vn, stride_vd, q_pos_start, row_steps, k_off, seq_len_k, num_rows_k, page_size, lo, hi,
                    qk_scale_log2, slope_log2, max_distance, window, attention_factor, offs_d, mask_d,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    MAIN_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr, HAS_PASS: tl.constexpr,
                    ROTARY_DIM: tl.constexpr, POS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    INTERLEAVED: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    PAGED: tl.constexpr):
    """Online-softmax update over key blocks [lo, hi) of seq_len_k keys. acc (BLOCK_M, BLOCK_D) fp32; m_i, l_i
    (BLOCK_M,) in the log2 domain. MASKED=False is only used on blocks every row sees in full. Tile row r holds
    the query at position q_pos_start + row_steps[r]. PAGED: keys are read through BlockTable (the batch's row)
    from K / V's num_rows_k rows (key_rows)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows_n, bound_n = key_rows(offs_n, seq_len_k, BlockTable, page_size, num_rows_k, PAGED)
        k_main, k_pass = load_qk_tiles(K, rows_n, bound_n, stride_kn, stride_kd, k_off + offs_n, InvFreq,
                                       attention_factor, HEAD_DIM, MAIN_BLOCK, PASS_BLOCK, HAS_PASS, ROTARY_DIM,
                                       POS, INTERLEAVED)
        s = qk_dot(q_main, q_pass, k_main, k_pass, HAS_PASS, DOT_PRECISION) * qk_scale_log2  # (BLOCK_M, BLOCK_N)
        if POS == POS_ALIBI or POS == POS_RELATIVE or MASKED:
            rel = tile_distance(q_pos_start, k_off + start_n) + (row_steps[:, None] - tl.arange(0, BLOCK_N)[None, :])
            if POS == POS_ALIBI or POS == POS_RELATIVE:
                s += position_bias_log2(rel, slope_log2, RelBias, max_distance, POS)
            if MASKED:
                s = tl.where(visible_mask(rel, offs_n, seq_len_k, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(V, rows_n, bound_n, stride_vn, stride_vd, offs_d, mask_d)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse, QOffset, KOffset, Slopes, InvFreq, RelBias, CuSeqlensQ, CuSeqlensK,
                     SeqUsedK, BlockTable,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_on, stride_od,
                     stride_sb, stride_sh, stride_rh,
                     num_heads, num_kv_groups, seq_len_q, seq_len_k, sm_scale, window, attention_factor,
                     max_distance, max_seqlen_q, max_seqlen_k, len_bucket_q, len_bucket_k, page_size, max_pages,
                     num_splits,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MAIN_BLOCK: tl.constexpr,
                     PASS_BLOCK: tl.constexpr, HAS_PASS: tl.constexpr, ROTARY_DIM: tl.constexpr, POS: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, INTERLEAVED: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr, SEQUSED: tl.constexpr, PAGED: tl.constexpr,
                     GROUP: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out (B, Hq, Nq, D) and Lse (B, Hq, Nq) fp32, natural log. RelBias (Hq, 2, max_distance + 1) fp32 is read
    for POS_RELATIVE only. len_bucket_* only key the autotuner. VARLEN: B = 1, seq_len_q / seq_len_k are the
    packed totals, and CuSeqlensQ / CuSeqlensK ((S + 1,) int64) give each sequence's rows (see sequence_rows).
    KV caches (dense layout): SEQUSED reads batch b's key count from SeqUsedK (B,) int64 (clamped into [0, its
    keys]); PAGED reads K / V (1, Hkv, seq_len_k = num_pages * page_size, D) through BlockTable (B, max_pages)
    int64, batch b's keys being its max_pages * page_size logical rows (key_rows).

    Decoding (a few query rows over many keys), split-KV: GROUP > 1 puts GROUP query heads of one kv head's group
    (GROUP divides num_kv_groups) in one program, tile row r holding query row r // GROUP of head r % GROUP, so the
    group's heads share each K / V load and a one-token query fills the tile's rows; the program axis 1 then runs
    over batch * num_heads / GROUP. SPLIT divides each program's key blocks into num_splits runs, one per program
    along axis 2: Out (B, num_splits * Hq, Nq, D) fp32 and Lse (B, num_splits * Hq, Nq) receive split s of head h
    at head s * Hq + h, each normalized by its own sum, for _attn_split_merge_kernel to combine."""
    rows_per_program: tl.constexpr = BLOCK_M // GROUP  # query rows of each head in the tile
    batch_head = tl.program_id(1)
    b = (batch_head // (num_heads // GROUP)).to(tl.int64)
    h = (batch_head % (num_heads // GROUP)).to(tl.int64) * GROUP  # the program's first head
    kv_h = h // num_kv_groups
    start_m = tl.program_id(0) * rows_per_program  # the program's first query row
    tb, q_start, len_q = sequence_rows(CuSeqlensQ, b, seq_len_q, max_seqlen_q, VARLEN, False)
    tb_k, k_start, len_k = sequence_rows(CuSeqlensK, b, seq_len_k, max_seqlen_k, VARLEN, False)
    if PAGED:
        tb_k = 0
        len_k = max_pages * page_size
        BlockTable += b * max_pages
    if SEQUSED:
        len_k = tl.minimum(tl.maximum(tl.load(SeqUsedK + b), 0), len_k).to(tl.int32)
    if VARLEN:  # a block past its sequence's end (the grid covers the longest) visits no key and stores nothing.
        # Not an early `return`: that branch cost the backward up to 50 registers (dQ spilled at D = 256, sm_90).
        len_k = tl.where(start_m < len_q, len_k, 0)
    q_off = tl.load(QOffset + b)
    k_off = tl.load(KOffset + b)

    # Tile row r: query row offs_m[r] (start_m + row_steps[r]) of head h + head_steps[r] (GROUP > 1; head_col is
    # head_steps as a (BLOCK_M, 1) column), else of head h (both 0). Rows past rows_per_program * GROUP (GROUP not
    # dividing BLOCK_M) are sent past len_q: never loaded or stored.
    if GROUP > 1:
        tile_rows = tl.arange(0, BLOCK_M)
        row_steps = tl.where(tile_rows < rows_per_program * GROUP, tile_rows // GROUP, len_q)
        head_steps = (tile_rows % GROUP).to(tl.int64)
        head_col = head_steps[:, None]
    else:
        row_steps = tl.arange(0, BLOCK_M)
        head_steps = 0
        head_col = 0
    offs_m = start_m + row_steps
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_main, q_pass = load_qk_tiles(Q + tb * stride_qb + (h + head_col) * stride_qh + q_start * stride_qn, offs_m,
                                   len_q, stride_qn, stride_qd, q_off + offs_m, InvFreq, attention_factor, HEAD_DIM,
                                   MAIN_BLOCK, PASS_BLOCK, HAS_PASS, ROTARY_DIM, POS, INTERLEAVED)
    slope_log2 = alibi_slope_log2(Slopes + b * stride_sb + (h + head_col) * stride_sh, POS)
    RelBias += (h + head_col) * stride_rh
    K += tb_k * stride_kb + kv_h * stride_kh + k_start * stride_kn
    V += tb_k * stride_vb + kv_h * stride_vh + k_start * stride_vn

    # Visible keys [lo, hi); inside it, [full_lo, full_hi) holds whole blocks every row sees unmasked.
    q_end = tl.minimum(start_m + rows_per_program, len_q)
    delta = q_off - k_off
    lo, hi = key_block_range(start_m, q_end, delta, len_k, window, BLOCK_N, CAUSAL, HAS_WINDOW)
    split = tl.program_id(2)
    if SPLIT:  # this split's run of the key blocks
        blocks_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
        lo = tl.minimum(lo + split * blocks_per_split * BLOCK_N, hi)
        hi = tl.minimum(lo + blocks_per_split * BLOCK_N, hi)
    full_hi = (len_k // BLOCK_N) * BLOCK_N
    if CAUSAL:  # block [n, n + BLOCK_N) is fully left of every row iff n + BLOCK_N <= delta + start_m + 1
        full_hi = tl.minimum(full_hi, (tl.maximum(delta + start_m + 1, 0) // BLOCK_N) * BLOCK_N).to(tl.int32)
    full_lo = lo
    if HAS_WINDOW:  # block fully inside every row's window iff n >= delta + q_end - window
        full_lo = tl.maximum(lo, ((tl.maximum(delta + q_end - window, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
                             ).to(tl.int32)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale_log2 = sm_scale * LOG2E
    q_pos_start = q_off + start_m
    # Masked edge, unmasked interior, masked edge.
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q_main, q_pass, K, V, InvFreq, RelBias, BlockTable, stride_kn,
                                    stride_kd, stride_vn, stride_vd, q_pos_start, row_steps, k_off, len_k, seq_len_k,
                                    page_size, lo, full_lo, qk_scale_log2, slope_log2, max_distance, window,
                                    attention_factor, offs_d, mask_d, BLOCK_M, BLOCK_N, HEAD_DIM, MAIN_BLOCK,
                                    PASS_BLOCK, HAS_PASS, ROTARY_DIM, POS, CAUSAL, HAS_WINDOW, INTERLEAVED, True,
                                    DOT_PRECISION, PAGED)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q_main, q_pass, K, V, InvFreq, RelBias, BlockTable, stride_kn,
                                    stride_kd, stride_vn, stride_vd, q_pos_start, row_steps, k_off, len_k, seq_len_k,
                                    page_size, full_lo, full_hi, qk_scale_log2, slope_log2, max_distance, window,
                                    attention_factor, offs_d, mask_d, BLOCK_M, BLOCK_N, HEAD_DIM, MAIN_BLOCK,
                                    PASS_BLOCK, HAS_PASS, ROTARY_DIM, POS, CAUSAL, HAS_WINDOW, INTERLEAVED, False,
                                    DOT_PRECISION, PAGED)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q_main, q_pass, K, V, InvFreq, RelBias, BlockTable, stride_kn,
                                    stride_kd, stride_vn, stride_vd, q_pos_start, row_steps, k_off, len_k, seq_len_k,
                                    page_size, full_hi, hi, qk_scale_log2, slope_log2, max_distance, window,
                                    attention_factor, offs_d, mask_d, BLOCK_M, BLOCK_N, HEAD_DIM, MAIN_BLOCK,
                                    PASS_BLOCK, HAS_PASS, ROTARY_DIM, POS, CAUSAL, HAS_WINDOW, INTERLEAVED, True,
                                    DOT_PRECISION, PAGED)

    # Rows with no visible key: out = 0, lse = -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    h_out = split * num_heads + h  # the output head of the program's first head (split s: head s * Hq + h)
    store_tile(Out + tb * stride_ob + (h_out + head_col) * stride_oh + q_start * stride_on, out, offs_m, len_q,
               stride_on, stride_od, offs_d, mask_d)
    tl.store(Lse + (tb * num_splits * num_heads + h_out + head_steps) * seq_len_q + q_start + offs_m, lse,
             mask=offs_m < len_q)


@triton.jit
def _attn_split_merge_kernel(OutPartial, LsePartial, Out, Lse,
                             stride_pb, stride_ph, stride_pn, stride_pd,
                             stride_ob, stride_oh, stride_on, stride_od,
                             num_heads, num_splits, seq_len_q,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Out (B, Hq, Nq, D) and Lse (B, Hq, Nq) fp32 of a split-KV forward from its splits' partial results:
    OutPartial (B, num_splits * Hq, Nq, D) fp32 and LsePartial (B, num_splits * Hq, Nq) fp32 contiguous, split s
    of head h at head s * Hq + h (each normalized by its own sum; LSE -inf where the split saw no key). Every
    split is weighted by exp(its LSE - the rows' largest). One program per (BLOCK_M rows, batch * head)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (tl.program_id(1) // num_heads).to(tl.int64)
    h = (tl.program_id(1) % num_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows = offs_m < seq_len_q
    split_lse = LsePartial + (b * num_splits * num_heads + h) * seq_len_q + offs_m  # split s: + s * Hq * Nq
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(split_lse + s * num_heads * seq_len_q, mask=rows, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(num_splits):
        weight = tl.exp(tl.load(split_lse + s * num_heads * seq_len_q, mask=rows, other=float("-inf")) - m_safe)
        part = load_tile(OutPartial + b * stride_pb + (s * num_heads + h) * stride_ph, offs_m, seq_len_q, stride_pn,
                         stride_pd, offs_d, mask_d)
        acc += weight[:, None] * part
        total += weight
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total)))
    store_tile(Out + b * stride_ob + h * stride_oh, out, offs_m, seq_len_q, stride_on, stride_od, offs_d, mask_d)
    tl.store(Lse + (b * num_heads + h) * seq_len_q + offs_m, lse, mask=rows)
