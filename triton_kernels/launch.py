"""Launchers: allocate outputs, pick configs (autotuned on GPU, fixed under the interpreter), launch.

Inputs are plain tensors and scalars; nothing here knows the public package's types.
"""
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .configs import (INTERPRETER_CONFIG, backward_dkdv_configs, backward_dq_configs, block_d_for,
                      forward_configs)
from .forward import _attn_fwd_kernel
from .position import POS_ALIBI, POS_NONE, POS_RELATIVE, POS_ROPE

POS_CODES = {"none": POS_NONE.value, "alibi": POS_ALIBI.value, "rope": POS_ROPE.value,
             "relative": POS_RELATIVE.value}
POS_NAMES = {code: name for name, code in POS_CODES.items()}
_TUNE_KEY = ["HEAD_DIM", "ROTARY_DIM", "POS", "CAUSAL", "HAS_WINDOW", "INTERLEAVED", "DOT_PRECISION",
             "len_bucket_q", "len_bucket_k"]
_CONFIG_LISTS = {_attn_fwd_kernel: forward_configs, _attn_bwd_dkdv_kernel: backward_dkdv_configs,
                 _attn_bwd_dq_kernel: backward_dq_configs}


@dataclass(frozen=True)
class KernelPosition:
    """Position parameters as the kernels take them.

    kind: "none" | "alibi" | "rope" | "relative". slopes: (B, Hq) fp32 or None. inv_freq: (rotary_dim/2,)
    fp32 or None. rel_bias: (Hq, 2, max_distance + 1) contiguous fp32 bias by signed distance, or None.
    """

    kind: str
    slopes: Optional[torch.Tensor]
    inv_freq: Optional[torch.Tensor]
    rotary_dim: int
    interleaved: bool
    attention_factor: float
    rel_bias: Optional[torch.Tensor] = None
    max_distance: int = 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _autotuned(kernel, block_d: int, pos: str):
    return triton.autotune(configs=_CONFIG_LISTS[kernel](block_d, pos), key=_TUNE_KEY)(kernel)


def _launch(kernel, grid_fn, args: list, meta: dict) -> None:
    """Launch kernel with autotuning on GPU, or with the fixed interpreter config on CPU tensors."""
    if _interpreting():
        cfg = INTERPRETER_CONFIG.kwargs
        kernel[grid_fn(cfg)](*args, **meta, **cfg)
    else:
        _autotuned(kernel, meta["BLOCK_D"], POS_NAMES[meta["POS"]])[grid_fn](*args, **meta)


def _tile_widths(position: KernelPosition, head_dim: int) -> dict:
    """Constexpr widths of the q/k tiles (see tiles.py): RoPE splits rows into rotary columns in paired
    layout (MAIN_BLOCK) and pass-through columns (PASS_BLOCK, when rotary_dim < D)."""
    if position.kind != "rope":
        return dict(MAIN_BLOCK=block_d_for(head_dim), PASS_BLOCK=16, HAS_PASS=False, ROTARY_DIM=0)
    rotary_dim, pass_dim = position.rotary_dim, head_dim - position.rotary_dim
    return dict(MAIN_BLOCK=2 * max(8, triton.next_power_of_2(rotary_dim // 2)),
                PASS_BLOCK=max(16, triton.next_power_of_2(pass_dim)), HAS_PASS=pass_dim > 0, ROTARY_DIM=rotary_dim)


def _common(q: torch.Tensor, k: torch.Tensor, position: KernelPosition, scale: float, causal: bool,
            window: Optional[int]):
    """Scalar arguments and constexpr flags shared by the three attention kernels."""
    batch, num_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    placeholder = torch.zeros(1, dtype=torch.float32, device=q.device)
    slopes = position.slopes if position.slopes is not None else placeholder.expand(batch, num_heads)
    inv_freq = position.inv_freq if position.inv_freq is not None else placeholder
    rel_bias = position.rel_bias if position.rel_bias is not None else placeholder.expand(num_heads, 2, 1)
    scalars = [num_heads, num_heads // k.shape[1], seq_q, seq_k, float(scale), int(window or 0),
               float(position.attention_factor), int(position.max_distance), triton.next_power_of_2(seq_q),
               triton.next_power_of_2(seq_k)]
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), **_tile_widths(position, head_dim),
                POS=POS_CODES[position.kind], CAUSAL=causal, HAS_WINDOW=window is not None,
                INTERLEAVED=position.interleaved, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return slopes, inv_freq, rel_bias, scalars, meta


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: torch.Tensor,
                      k_offset: torch.Tensor, position: KernelPosition, scale: float, causal: bool,
                      window: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D), offsets (B,) int64 -> out like q, lse (B, Hq, Nq) fp32."""
    batch, num_heads, seq_q, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads, seq_q), dtype=torch.float32, device=q.device)
    slopes, inv_freq, rel_bias, scalars, meta = _common(q, k, position, scale, causal, window)
    args = [q, k, v, out, lse, q_offset, k_offset, slopes, inv_freq, rel_bias, *q.stride(), *k.stride(),
            *v.stride(), *out.stride(), *slopes.stride(), rel_bias.stride(0), *scalars]
    _launch(_attn_fwd_kernel, lambda cfg: (triton.cdiv(seq_q, cfg["BLOCK_M"]), batch * num_heads), args, meta)
    return out, lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, q_offset: torch.Tensor, k_offset: torch.Tensor,
                       position: KernelPosition, scale: float, causal: bool,
                       window: Optional[int]) -> tuple:
    """Gradients dq (like q), dk, dv (like k, v) of attention_forward's output, and d_rel_bias (like
    position.rel_bias, fp32) for the relative scheme, else None."""
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    slopes, inv_freq, rel_bias, scalars, meta = _common(q, k, position, scale, causal, window)
    delta = torch.empty_like(lse)
    preprocess_rows = 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(seq_q, preprocess_rows), batch * num_heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), num_heads, seq_q,
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=preprocess_rows)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_rel_bias = torch.zeros_like(rel_bias)  # accumulated with atomics by the dK/dV kernel
    shared = [q, k, v, grad_out]
    strides = [*q.stride(), *k.stride(), *v.stride(), *grad_out.stride()]
    _launch(_attn_bwd_dkdv_kernel, lambda cfg: (triton.cdiv(seq_k, cfg["BLOCK_N"]), batch * num_kv_heads),
            [*shared, dk, dv, lse, delta, q_offset, k_offset, slopes, inv_freq, rel_bias, d_rel_bias, *strides,
             *dk.stride(), *dv.stride(), *slopes.stride(), rel_bias.stride(0), *scalars], meta)
    _launch(_attn_bwd_dq_kernel, lambda cfg: (triton.cdiv(seq_q, cfg["BLOCK_M"]), batch * num_heads),
            [*shared, dq, lse, delta, q_offset, k_offset, slopes, inv_freq, rel_bias, *strides, *dq.stride(),
             *slopes.stride(), rel_bias.stride(0), *scalars], meta)
    return dq, dk, dv, (d_rel_bias if position.kind == "relative" else None)
