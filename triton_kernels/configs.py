"""Launch configurations: autotune candidates for A100/H100-class GPUs, and one small config for the
CPU interpreter. The static check (tests/test_static_gpu.py) compiles every candidate listed here for
sm_80 and sm_90; each list holds only shapes it found free of register spills for every scheme that
uses the list (RoPE's rotation and partial-rotary tiles, and the relative bias gather, need more
registers, so those schemes get their own lists where the shared ones spill). `pos` is the scheme name:
"none", "alibi", "rope" or "relative".
"""
import triton

HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)  # BLOCK_D values: head dims are padded up to one of these


def block_d_for(head_dim: int) -> int:
    """Padded head dim: the smallest bucket >= head_dim (tl.dot needs >= 16 and a power of two)."""
    return max(16, triton.next_power_of_2(head_dim))


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def forward_configs(block_d: int, pos: str) -> list:
    """Forward: a program owns BLOCK_M query rows and streams BLOCK_N keys per step."""
    if block_d <= 64 and pos == "relative":  # M64 N64 on 4 warps spills on sm_90
        shapes = [(128, 64, 8, 3), (64, 32, 4, 4)]
    elif block_d <= 64:
        shapes = [(128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 4)]
    elif block_d <= 128:
        shapes = [(128, 32, 8, 3), (64, 64, 8, 3)]
    elif pos == "rope":
        shapes = [(32, 32, 8, 2), (32, 32, 8, 3)]
    else:
        shapes = [(64, 32, 8, 2), (64, 16, 8, 2)]
    return _configs(shapes)


def backward_dkdv_configs(block_d: int, pos: str) -> list:
    """dK/dV: a program owns BLOCK_N keys and streams BLOCK_M query rows per step."""
    if block_d <= 64:
        shapes = [(64, 16, 8, 3)]
    elif block_d <= 128 and pos == "rope":  # M16 spills on sm_90 at HEAD_DIM 80 with full rotary
        shapes = [(32, 32, 8, 2)]
    elif block_d <= 128:
        shapes = [(32, 32, 8, 2), (16, 32, 8, 2)]
    elif pos == "rope":
        shapes = [(16, 32, 8, 1), (16, 32, 8, 2)]
    else:
        shapes = [(32, 32, 8, 1)]
    return _configs(shapes)


def backward_dq_configs(block_d: int, pos: str) -> list:
    """dQ: a program owns BLOCK_M query rows and streams BLOCK_N keys per step."""
    if block_d <= 64:
        shapes = [(128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)]
    elif block_d <= 128:
        shapes = [(64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 8, 2)]
    else:
        shapes = [(32, 32, 8, 1)]
    return _configs(shapes)


# Under TRITON_INTERPRET=1 every program runs in numpy: the smallest legal tiles keep tests quick while
# still crossing several blocks at N = 17 or 97.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
