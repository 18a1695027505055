"""Tile loads and stores shared by the forward and backward kernels.

q and k rows are handled as two tiles, `main` and `pass`:
- RoPE: main (R, MAIN_BLOCK) holds the rotary columns in paired layout (see rope_pair_columns), rotated
  in registers as they are loaded; pass (R, PASS_BLOCK) holds the columns >= rotary_dim, unrotated, and
  exists only when HAS_PASS (partial rotary). Scores are main.main^T + pass.pass^T.
- Other schemes: main holds all HEAD_DIM columns in order (MAIN_BLOCK = BLOCK_D); no pass tile.
v, out and dO rows are always plain (R, BLOCK_D) tiles.
"""
import triton
import triton.language as tl

from .position import POS_ROPE, rope_cos_sin, rope_pair_columns, rope_rotate_pairs


@triton.jit
def load_tile(Base, offs_rows, num_rows, stride_n, stride_d, offs_d, mask_d):
    """(R, len(offs_d)) tile of rows offs_rows of a (N, D) matrix; rows >= num_rows and masked dims read 0."""
    mask = (offs_rows < num_rows)[:, None] & mask_d[None, :]
    return tl.load(Base + offs_rows[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def load_qk_tiles(Base, offs_rows, num_rows, stride_n, stride_d, positions, InvFreq, attention_factor,
                  HEAD_DIM: tl.constexpr, MAIN_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr,
                  HAS_PASS: tl.constexpr, ROTARY_DIM: tl.constexpr, POS: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """(main, pass) tiles of q or k rows at positions (R,), in the input dtype (pass == main without HAS_PASS)."""
    if POS == POS_ROPE:
        column, real = rope_pair_columns(MAIN_BLOCK, ROTARY_DIM, INTERLEAVED)
        x = tl.load(Base + offs_rows[:, None] * stride_n + column[None, :] * stride_d,
                    mask=(offs_rows < num_rows)[:, None] & real[None, :], other=0.0)
        cos, sin = rope_cos_sin(positions, InvFreq, attention_factor, MAIN_BLOCK // 2, ROTARY_DIM)
        main = rope_rotate_pairs(x, cos, sin, False).to(x.dtype)
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
    row_mask = (offs_rows < num_rows)[:, None]
    if POS == POS_ROPE:
        column, real = rope_pair_columns(MAIN_BLOCK, ROTARY_DIM, INTERLEAVED)
        cos, sin = rope_cos_sin(positions, InvFreq, attention_factor, MAIN_BLOCK // 2, ROTARY_DIM)
        grad_main = rope_rotate_pairs(grad_main, cos, sin, True)
    else:
        column = tl.arange(0, MAIN_BLOCK)
        real = column < HEAD_DIM
    tl.store(Base + offs_rows[:, None] * stride_n + column[None, :] * stride_d,
             grad_main.to(Base.dtype.element_ty), mask=row_mask & real[None, :])
    if HAS_PASS:
        offs_p = tl.arange(0, PASS_BLOCK)
        tl.store(Base + offs_rows[:, None] * stride_n + (ROTARY_DIM + offs_p[None, :]) * stride_d,
                 grad_pass.to(Base.dtype.element_ty), mask=row_mask & (offs_p < HEAD_DIM - ROTARY_DIM)[None, :])
