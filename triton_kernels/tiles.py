"""Tile loads and stores shared by the forward and backward kernels.

q and k rows are handled as two tiles, `main` and `pass`:
- RoPE: main (R, MAIN_BLOCK) holds the rotary columns in paired layout (see rope_pair_columns), rotated
  in registers as they are loaded; pass (R, PASS_BLOCK) holds the columns >= rotary_dim, unrotated, and
  exists only when HAS_PASS (partial rotary). Scores are main.main^T + pass.pass^T.
- Other schemes: main holds all HEAD_DIM columns in order (MAIN_BLOCK = BLOCK_D); no pass tile.
v, out and dO rows are always plain (R, BLOCK_D) tiles.

Row offsets are int64: row * stride_n passes 2^31 elements in a (B, N, H, D) cache viewed as (B, H, N, D)
once N * H * D does (262144 rows at H * D = 8192); column offsets stay int32 (d * stride_d is small).

Two layouts (fused_pos_attn's AttentionSpec): dense, where batch b owns all N rows of q[b], k[b]; and packed
(VARLEN), where the tensors have B = 1 and sequence b owns the rows cu_seqlens[b]:cu_seqlens[b + 1] of N.
sequence_rows gives every kernel its batch's tensor index, first row and length, so the kernels address both
layouts the same way: base pointer at (batch, head, first row), then rows 0 .. length - 1 of that sequence.
"""
import os

import triton
import triton.language as tl

from .position import POS_ROPE, rope_cos_sin, rope_pair_columns, rope_rotate_pairs


@triton.jit
def row_offsets(offs_rows, stride_n):
    """(R, 1) int64 element offsets of rows offs_rows (R,) int32 of a matrix with row stride stride_n."""
    return offs_rows.to(tl.int64)[:, None] * stride_n


@triton.jit
def sequence_rows(CuSeqlens, b, num_rows, max_seqlen, VARLEN: tl.constexpr, REREAD: tl.constexpr):
    """(tensor batch index, first row (int64), row count (int32)) of batch or sequence b along a tensor's N axis
    of num_rows rows.

    Dense: (b, 0, num_rows). VARLEN: (0, start, length) of rows CuSeqlens[b]:CuSeqlens[b + 1] ((S + 1,) int64),
    clamped so that no cu_seqlens makes a kernel leave the tensor: start into [0, num_rows], end into
    [start, num_rows], and at most max_seqlen rows (the grids cover that many).

    REREAD: read CuSeqlens again (volatile loads the compiler cannot merge with the first read) for an epilogue
    after the main loop, so that the sequence's start and length are not held in registers across the loop,
    as a dense kernel's are not (its lengths are kernel arguments). Holding them tipped ptxas into capping
    some RoPE kernels at 128 registers, with spills (dQ at D = 128 on sm_80, forward at D = 256 on sm_90)."""
    if VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CuSeqlens + b, volatile=REREAD), 0), num_rows).to(tl.int32)
        end = tl.minimum(tl.maximum(tl.load(CuSeqlens + b + 1, volatile=REREAD), start), num_rows).to(tl.int32)
        return 0, start.to(tl.int64), tl.minimum(end - start, max_seqlen)
    else:
        return b, 0, num_rows


@triton.jit
def key_rows(offs_n, len_k, BlockTable, page_size, num_rows_k, PAGED: tl.constexpr):
    """(rows, bound): the k / v rows holding a batch's keys offs_n (BLOCK_N,), and the row count load_tile masks
    them with. Dense: (offs_n, len_k). PAGED: key j at row BlockTable[j // page_size] * page_size + j % page_size
    (the batch's row of block ids; ids clamped into the num_rows_k // page_size pages), keys >= len_k sent to row
    num_rows_k, past the bound (masked)."""
    if PAGED:
        used = offs_n < len_k
        page = tl.load(BlockTable + offs_n // page_size, mask=used, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_rows_k // page_size - 1)
        return tl.where(used, page * page_size + offs_n % page_size, num_rows_k), num_rows_k
    else:
        return offs_n, len_k


# layout_fence is on for Triton before 3.9 (3.6 needs it; 3.9 allocates registers better without it) and off
# under the interpreter, which has no inline assembly.
FENCE = tl.constexpr(tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9)
                     and os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def layout_fence(x):
    """x, through an identity Triton's layout passes cannot look through (a non-pure inline-asm mov). Without it
    Triton 3.6 hoists the dot-operand layout conversion of a rotated RoPE tile up through the rotation, so
    every warp recomputes the whole tile's sin/cos (the mma operand layout is replicated across warps):
    thousands of bytes of register spills on sm_80. Triton 3.9 keeps the conversion after the rotation."""
    if FENCE:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False,
                                      pack=32 // x.dtype.primitive_bitwidth)
    return x


@triton.jit
def load_tile(Base, offs_rows, num_rows, stride_n, stride_d, offs_d, mask_d):
    """(R, len(offs_d)) tile of rows offs_rows of a (N, D) matrix; rows >= num_rows and masked dims read 0."""
    mask = (offs_rows < num_rows)[:, None] & mask_d[None, :]
    return tl.load(Base + row_offsets(offs_rows, stride_n) + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def store_tile(Base, tile, offs_rows, num_rows, stride_n, stride_d, offs_d, mask_d):
    """Store tile (R, len(offs_d)) into rows offs_rows of a (N, D) matrix, cast to its dtype, masked as load_tile."""
    mask = (offs_rows < num_rows)[:, None] & mask_d[None, :]
    tl.store(Base + row_offsets(offs_rows, stride_n) + offs_d[None, :] * stride_d, tile.to(Base.dtype.element_ty),
             mask=mask)


@triton.jit
def load_qk_tiles(Base, offs_rows, num_rows, stride_n, stride_d, positions, InvFreq, attention_factor,
                  HEAD_DIM: tl.constexpr, MAIN_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr,
                  HAS_PASS: tl.constexpr, ROTARY_DIM: tl.constexpr, POS: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """(main, pass) tiles of q or k rows at positions (R,), in the input dtype (pass == main without HAS_PASS)."""
    if POS == POS_ROPE:
        column, real = rope_pair_columns(MAIN_BLOCK, ROTARY_DIM, INTERLEAVED)
        x = load_tile(Base, offs_rows, num_rows, stride_n, stride_d, column, real)
        cos, sin = rope_cos_sin(positions, InvFreq, attention_factor, MAIN_BLOCK // 2, ROTARY_DIM)
        main = layout_fence(rope_rotate_pairs(x, cos, sin, False).to(x.dtype))
    else:
        offs_d = tl.arange(0, MAIN_BLOCK)
        main = load_tile(Base, offs_rows, num_rows, stride_n, stride_d, offs_d, offs_d < HEAD_DIM)
    passthrough = main
    if HAS_PASS:
        offs_p = tl.arange(0, PASS_BLOCK)
        passthrough = load_tile(Base + ROTARY_DIM * stride_d, offs_rows, num_rows, stride_n, stride_d, offs_p,
                                offs_p < HEAD_DIM - ROTARY_DIM)
    return main, passthrough


@triton.jit
def qk_dot(q_main, q_pass, k_main, k_pass, HAS_PASS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(R_q, R_k) fp32 q.k^T from (main, pass) tiles."""
    s = tl.dot(q_main, tl.trans(k_main), input_precision=DOT_PRECISION)
    if HAS_PASS:
        s = tl.dot(q_pass, tl.trans(k_pass), s, input_precision=DOT_PRECISION)
    return s


@triton.jit
def store_qk_grad(Base, offs_rows, num_rows, stride_n, stride_d, grad_main, grad_pass, positions, InvFreq,
                  attention_factor, HEAD_DIM: tl.constexpr, MAIN_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr,
                  HAS_PASS: tl.constexpr, ROTARY_DIM: tl.constexpr, POS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store fp32 gradients w.r.t. the (main, pass) tiles as gradients w.r.t. the original q / k rows
    (RoPE: the transposed rotation maps them back)."""
    if POS == POS_ROPE:
        column, real = rope_pair_columns(MAIN_BLOCK, ROTARY_DIM, INTERLEAVED)
        cos, sin = rope_cos_sin(positions, InvFreq, attention_factor, MAIN_BLOCK // 2, ROTARY_DIM)
        grad_main = rope_rotate_pairs(grad_main, cos, sin, True)
    else:
        column = tl.arange(0, MAIN_BLOCK)
        real = column < HEAD_DIM
    store_tile(Base, grad_main, offs_rows, num_rows, stride_n, stride_d, column, real)
    if HAS_PASS:
        offs_p = tl.arange(0, PASS_BLOCK)
        store_tile(Base + ROTARY_DIM * stride_d, grad_pass, offs_rows, num_rows, stride_n, stride_d, offs_p,
                   offs_p < HEAD_DIM - ROTARY_DIM)
