"""Launch configurations: autotune candidates for A100/H100-class GPUs, and one small config for the
CPU interpreter. The static check (tests/test_static_gpu.py) compiles every candidate listed here for
sm_80 and sm_90; each list holds only shapes it found free of register spills, under Triton 3.9 and 3.6,
for every variant of the schemes that use the list (RoPE's rotation and partial-rotary tiles, and the
relative bias gather and table gradient, need more registers, so those schemes get their own lists where
the shared ones spill). `pos` is the scheme name: "none", "alibi", "rope" or "relative".

Shapes are (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]). The notes say which variant spilled in a
dropped shape (bench/results/static_check*.md has every compile). Where no shape with BLOCK_N >= 32 was clean on
both Triton versions, the list keeps the one that was. maxnreg 255 (MAX_REGISTERS) lifts ptxas's own cap: left to
itself, ptxas gave some 8-warp RoPE kernels 128 registers per thread (two blocks per SM) and spilled 12-168 bytes
rather than use more; with the cap lifted the same shapes compile with 150-255 registers and no spill.
"""
import triton

HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)  # BLOCK_D values: head dims are padded up to one of these


def block_d_for(head_dim: int) -> int:
    """Padded head dim: the smallest bucket >= head_dim (tl.dot needs >= 16 and a power of two)."""
    return max(16, triton.next_power_of_2(head_dim))


MAX_REGISTERS = 255  # per thread, the hardware limit


def _configs(shapes):
    return [triton.Config({"BLOCK_M": shape[0], "BLOCK_N": shape[1]}, num_warps=shape[2], num_stages=shape[3],
                          maxnreg=shape[4] if len(shape) > 4 else None) for shape in shapes]


def forward_configs(block_d: int, pos: str) -> list:
    """Forward: a program owns BLOCK_M query rows and streams BLOCK_N keys per step."""
    if block_d <= 64 and pos == "relative":  # M64 N64 w4 spills (sm_90), M128 N64 too (bf16 window)
        shapes = [(128, 32, 8, 3), (64, 32, 4, 4)]
    elif block_d <= 64 and pos == "rope":  # 3 and 4 stages spill (bf16), as do M64 N32 and M128 N32
        shapes = [(128, 64, 8, 2, MAX_REGISTERS)]  # capped at 128 registers: D 32 interleaved rotary D/2 spilled
    elif block_d <= 64:
        shapes = [(128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 4)]
    elif block_d <= 128 and pos == "rope":  # M64 N64 spills under Triton 3.6 (full rotary, sm_80)
        shapes = [(128, 32, 8, 3), (128, 16, 8, 3)]
    elif block_d <= 128 and pos == "relative":  # M128 N32 and M64 N64 spill (bf16 window, sm_90)
        shapes = [(64, 32, 8, 3)]
    elif block_d <= 128:
        shapes = [(128, 32, 8, 3), (64, 64, 8, 3)]
    elif pos == "rope":  # capped at 128 registers M16 N32 spilled (interleaved D/2, Triton 3.6; half rotary, 3.9);
        shapes = [(16, 32, 8, 2, MAX_REGISTERS)]  # M32 N16 spills under 3.6 uncapped; 3 stages too (paged, 3.6)
    elif pos == "relative":  # M64 N32 spills (bf16 window, sm_90)
        shapes = [(64, 16, 8, 2)]
    else:
        shapes = [(64, 32, 8, 2), (64, 16, 8, 2)]
    return _configs(shapes)


def backward_dkdv_configs(block_d: int, pos: str) -> list:
    """dK/dV: a program owns BLOCK_N keys and streams BLOCK_M query rows per step."""
    if block_d <= 64 and pos == "rope":  # 3 stages spill (rotary D/4, sm_80), so does every N32 shape tried;
        shapes = [(64, 16, 8, 2, MAX_REGISTERS)]  # capped at 128 registers, D 32 interleaved spilled (Triton 3.6)
    elif block_d <= 64 and pos == "relative":  # the bucket-gradient gather spills M64, and M32 N32 at 3 stages,
        shapes = [(16, 32, 8, 2), (32, 16, 8, 3)]  # at 2 too (D 32 packed, Triton 3.6, sm_80); M32 N16 s2 (3.9)
    elif block_d <= 64:
        shapes = [(64, 16, 8, 3), (64, 32, 8, 3)]
    elif block_d <= 128 and pos == "rope":  # M32 N32 spills (interleaved D/4); M32 N16 at 2 stages too, even
        shapes = [(32, 16, 8, 1, MAX_REGISTERS), (16, 32, 8, 2, MAX_REGISTERS)]  # uncapped (Triton 3.9, sm_80)
    elif block_d <= 128 and pos == "relative":  # M32 N32 at 2 stages spills (128 buckets, bf16 window)
        shapes = [(32, 16, 8, 2), (32, 32, 8, 1)]
    elif block_d <= 128:  # M16 N32 spills (bf16 non-causal, Triton 3.6)
        shapes = [(32, 32, 8, 2), (32, 16, 8, 2)]
    elif pos == "rope":  # 2 stages spill (interleaved D/4); capped at 128 registers, 1 stage spilled (interleaved
        shapes = [(16, 32, 8, 1, MAX_REGISTERS)]  # rotary D/2, Triton 3.6, sm_90)
    elif pos == "relative":  # M32 spills (128 buckets; no table gradient, non-causal)
        shapes = [(16, 32, 8, 1)]
    else:
        shapes = [(32, 32, 8, 1)]
    return _configs(shapes)


def backward_dq_configs(block_d: int, pos: str) -> list:
    """dQ: a program owns BLOCK_M query rows and streams BLOCK_N keys per step."""
    if block_d <= 32 and pos == "rope":  # every 8-warp shape tried spills at HEAD_DIM 32 (bf16)
        shapes = [(64, 32, 4, 3)]
    elif block_d <= 64 and pos == "rope":  # N64 spills (interleaved D/4, sm_80)
        shapes = [(128, 32, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3)]
    elif block_d <= 64 and pos == "relative":  # N64 spills (sm_80; bf16 window)
        shapes = [(128, 32, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3)]
    elif block_d <= 64:
        shapes = [(128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)]
    elif block_d <= 128 and pos == "rope":  # M64 N32 spills under 3.6 (full and half rotary, sm_80)
        shapes = [(64, 16, 8, 1), (32, 16, 8, 2, MAX_REGISTERS)]  # capped at 128 registers: D 80 spilled
    elif block_d <= 128:
        shapes = [(64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 8, 2)]
    elif pos == "rope":  # M32 spills at 255 registers (interleaved, bf16, Triton 3.9), 1 stage under 3.6
        shapes = [(16, 32, 8, 2, MAX_REGISTERS), (16, 32, 8, 3, MAX_REGISTERS)]
    else:
        shapes = [(32, 32, 8, 1)]
    return _configs(shapes)


def decode_configs(block_d: int, pos: str, block_m: int) -> list:
    """Split-KV decode forward (launch.decode_plan): the tile's block_m rows (16: launch.MAX_DECODE_TILE_ROWS)
    are a few query rows of a GQA group's heads, streamed over many keys; 4 warps, 2 stages, ptxas's register
    cap lifted. 64-row tiles spilled (up to 4 KB at D = 256 with RoPE) and so did 16-row ones at 3 stages or
    with the default cap (8-96 B, RoPE)."""
    if block_d <= 64 and pos == "rope":  # N128 spilled 12-76 B (Triton 3.6)
        shapes = [(block_m, 64, 4, 2, MAX_REGISTERS)]
    elif block_d <= 64:
        shapes = [(block_m, 64, 4, 2, MAX_REGISTERS), (block_m, 128, 4, 2, MAX_REGISTERS)]
    elif block_d <= 128 and pos == "rope":  # N64 spilled 84-192 B (Triton 3.6)
        shapes = [(block_m, 32, 4, 2, MAX_REGISTERS)]
    elif block_d <= 128:
        shapes = [(block_m, 64, 4, 2, MAX_REGISTERS), (block_m, 32, 4, 2, MAX_REGISTERS)]
    elif pos == "rope":  # N32 spilled 36-48 B (sm_80, sm_90)
        shapes = [(block_m, 16, 4, 2, MAX_REGISTERS)]
    else:
        shapes = [(block_m, 32, 4, 2, MAX_REGISTERS), (block_m, 16, 4, 2, MAX_REGISTERS)]
    return _configs(shapes)


# Under TRITON_INTERPRET=1 every program runs in numpy: the smallest legal tiles keep tests quick while
# still crossing several blocks at N = 17 or 97.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
