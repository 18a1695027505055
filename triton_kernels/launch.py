"""Launchers: allocate outputs, build each kernel's keyword arguments, pick configs (autotuned on GPU, fixed
under the interpreter) and launch on q's CUDA device.

Inputs are plain tensors and scalars; nothing here knows the public package's types. Every kernel is
launched with keyword arguments from kernel_arguments(), the one place a kernel argument gets its value:
the kernels share parameter names (Q, stride_qn, seq_len_q, POS, ...), so a new per-call parameter is one
entry there plus the parameter in the kernels that read it, and no argument can bind by position.
"""
import contextlib
import functools
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import triton

from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .configs import (INTERPRETER_CONFIG, backward_dkdv_configs, backward_dq_configs, block_d_for, decode_configs,
                      forward_configs)
from .forward import _attn_fwd_kernel, _attn_split_merge_kernel
from .interpreter_compat import fix_loop_bounds
from .scheme_codes import SCHEME_CODES, SCHEME_NAMES

# The dK/dV kernel sums the bucket-table gradient in a (NUM_BUCKETS_BLOCK,) register vector through a
# (diagonals, NUM_BUCKETS_BLOCK) one-hot. 32 buckets (T5's default) compile spill-free in every shipped config;
# 64 spilled on sm_80 (M64 N16 at D = 64), as did 128 even with the one-hot built 32 buckets at a time.
MAX_GRAD_BUCKETS = 32
# The preprocess kernel is a row reduction, launched with one fixed tile (tests/test_static_gpu.py compiles it);
# so is the split-KV merge.
PREPROCESS_CONFIG = triton.Config({"BLOCK_M": 64}, num_warps=4)
MERGE_CONFIG = triton.Config({"BLOCK_M": 16}, num_warps=4)
# Split-KV decoding (decode_plan): calls with at most this many query rows per batch / sequence ...
MAX_DECODE_ROWS = 16
# ... put up to this many rows (query rows x GQA heads) in one tile, and split the keys until the grid has
# DECODE_WAVES programs per SM (the interpreter: INTERPRETER_PROGRAMS programs), each split keeping at least
# MIN_SPLIT_KEYS keys (the interpreter: 2 of its 16-key blocks, so that small tests take the split).
MAX_DECODE_TILE_ROWS = 16  # 64-row tiles spilled (configs.decode_configs)
DECODE_WAVES = 2
INTERPRETER_PROGRAMS = 8
MIN_SPLIT_KEYS = 256
INTERPRETER_MIN_SPLIT_KEYS = 32
TUNED = ("BLOCK_M", "BLOCK_N")  # meta-parameters a launch config sets; kernel_arguments never does
_TUNE_KEY = ["HEAD_DIM", "ROTARY_DIM", "POS", "CAUSAL", "HAS_WINDOW", "INTERLEAVED", "DOT_PRECISION", "REL_GRAD",
             "NUM_BUCKETS_BLOCK", "VARLEN", "SEQUSED", "PAGED", "GROUP", "SPLIT", "len_bucket_q", "len_bucket_k"]
_CONFIG_LISTS = {_attn_fwd_kernel: forward_configs, _attn_bwd_dkdv_kernel: backward_dkdv_configs,
                 _attn_bwd_dq_kernel: backward_dq_configs}
# Stride parameters of each strided tensor parameter: stride_<prefix><dim> for the dims its strides name
# ((B, H, N, D) tensors: b, h, n, d; slopes (B, Hq): b, h; the relative bias (Hq, 2, max_distance + 1): h).
_STRIDE_NAMES = {name: tuple(f"stride_{prefix}{dim}" for dim in dims) for name, prefix, dims in (
    ("Q", "q", "bhnd"), ("K", "k", "bhnd"), ("V", "v", "bhnd"), ("Out", "o", "bhnd"), ("DOut", "do", "bhnd"),
    ("DQ", "dq", "bhnd"), ("DK", "dk", "bhnd"), ("DV", "dv", "bhnd"), ("Slopes", "s", "bh"), ("RelBias", "r", "h"),
    ("OutPartial", "p", "bhnd"))}


@dataclass(frozen=True)
class KernelPosition:
    """Position parameters as the kernels take them (field names as in fused_pos_attn's ResolvedPosition).

    kind: "none" | "alibi" | "rope" | "relative". slopes: (B, Hq) fp32 or None. inv_freq: (rotary_dim/2,)
    fp32 or None. rel_bias: (Hq, 2, max_distance + 1) contiguous fp32 bias by signed distance, or None.
    rel_buckets: (2, max_distance + 1) contiguous int32 T5 bucket of each rel_bias entry, or None;
    num_buckets: the bucket count (columns of the bucket table whose gradient the backward returns).
    """

    kind: str
    slopes: Optional[torch.Tensor]
    inv_freq: Optional[torch.Tensor]
    rotary_dim: int
    interleaved: bool
    attention_factor: float
    rel_bias: Optional[torch.Tensor] = None
    max_distance: int = 0
    rel_buckets: Optional[torch.Tensor] = None
    num_buckets: int = 0

    @classmethod
    def of(cls, position) -> "KernelPosition":
        """The kernel view of any object with these attributes (a ResolvedPosition)."""
        return cls(**{f.name: getattr(position, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class KernelCall:
    """One attention call but its tensors: query row i of batch b sits at q_offset[b] + i, key j at
    k_offset[b] + j (offsets (B,) int64 on the tensors' device); scale multiplies q.k; window: left window
    or None (field names as in fused_pos_attn's AttentionSpec).

    Packed (varlen) layout when cu_seqlens_q is set: q (1, Hq, total_q, D), k / v (1, Hkv, total_k, D), and
    sequence s owns query rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] and key rows cu_seqlens_k[s]:cu_seqlens_k[s + 1]
    ((S + 1,) int64 on the tensors' device; the kernels clamp them into the tensors, whatever their values);
    the batch b above is then the sequence s (offsets and ALiBi slopes have S rows). max_seqlen_q / max_seqlen_k
    bound the sequences' lengths: they size the grids and workspaces (0 and unused in the dense layout).

    KV caches, forward only (dense layout): seqused_k (B,) int64, batch b's key count (its first key rows);
    block_table (B, max_pages) int64 contiguous and page_size for a paged cache, k / v then (1, Hkv,
    num_pages * page_size, D) and key j of batch b at row block_table[b, j // page_size] * page_size + j % page_size.
    """

    q_offset: torch.Tensor
    k_offset: torch.Tensor
    position: KernelPosition
    scale: float
    causal: bool
    window: Optional[int]
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    seqused_k: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    page_size: int = 0

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    def extent(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int]:
        """(batches or sequences, rows per batch or longest sequence of q, same of k): what grids cover."""
        if self.varlen:
            return self.q_offset.shape[0], max(0, int(self.max_seqlen_q)), max(0, int(self.max_seqlen_k))
        if self.block_table is not None:  # a batch's keys: its max_pages * page_size logical rows
            return q.shape[0], q.shape[2], self.block_table.shape[1] * self.page_size
        return q.shape[0], q.shape[2], k.shape[2]


@dataclass(frozen=True)
class DecodePlan:
    """How a decode-shaped forward runs: `group` query heads of one kv head per program (their rows share the
    tile's block_m rows and each K / V load), the keys split `splits` ways (partials merged by a second kernel)."""

    group: int
    splits: int
    block_m: int


def decode_plan(q: torch.Tensor, k: torch.Tensor, call: KernelCall) -> Optional[DecodePlan]:
    """The split-KV plan of a forward with at most MAX_DECODE_ROWS query rows per batch / sequence, else None.
    group: the largest divisor of Hq / Hkv whose rows fit MAX_DECODE_TILE_ROWS; splits: enough programs for
    DECODE_WAVES per SM (INTERPRETER_PROGRAMS under the interpreter), each split keeping MIN_SPLIT_KEYS keys."""
    sequences, rows_q, rows_k = call.extent(q, k)
    num_heads, num_kv_groups = q.shape[1], q.shape[1] // k.shape[1]
    if rows_q > MAX_DECODE_ROWS or rows_q == 0:
        return None
    group = max(d for d in range(1, num_kv_groups + 1)
                if num_kv_groups % d == 0 and d * rows_q <= max(MAX_DECODE_TILE_ROWS, rows_q))
    block_m = max(16, triton.next_power_of_2(group * rows_q))
    programs = sequences * (num_heads // group)
    if _interpreting():
        target, min_keys = INTERPRETER_PROGRAMS, INTERPRETER_MIN_SPLIT_KEYS
    else:
        target, min_keys = DECODE_WAVES * _sm_count(q.device), MIN_SPLIT_KEYS
    splits = max(1, min(triton.cdiv(target, programs), rows_k // min_keys))
    return DecodePlan(group=group, splits=splits, block_m=block_m)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile_widths(position: KernelPosition, head_dim: int) -> dict:
    """Constexpr widths of the q/k tiles (see tiles.py): RoPE splits rows into rotary columns in paired
    layout (MAIN_BLOCK) and pass-through columns (PASS_BLOCK, when rotary_dim < D)."""
    if position.kind != "rope":
        return dict(MAIN_BLOCK=block_d_for(head_dim), PASS_BLOCK=16, HAS_PASS=False, ROTARY_DIM=0)
    rotary_dim, pass_dim = position.rotary_dim, head_dim - position.rotary_dim
    return dict(MAIN_BLOCK=2 * max(8, triton.next_power_of_2(rotary_dim // 2)),
                PASS_BLOCK=max(16, triton.next_power_of_2(pass_dim)), HAS_PASS=pass_dim > 0, ROTARY_DIM=rotary_dim)


def kernel_arguments(kernel, call: KernelCall, plan: Optional[DecodePlan] = None, **tensors: torch.Tensor) -> dict:
    """Keyword arguments of one launch of kernel: one value for each of its parameters but TUNED ones.

    tensors: the launch's tensors by kernel parameter name: Q (B, Hq, Nq, D) and K (B, Hkv, Nk, D) always (they
    give the shapes), and those of Out, Lse, DOut, Delta, DQ, DK, DV, DLse, DRelTable the launch has. Position
    tensors come from call.position, with placeholders for those a scheme lacks (never read); every strided
    tensor brings its strides. Passing DLse turns on HAS_DLSE, DRelTable turns on REL_GRAD; call.cu_seqlens_q
    turns on VARLEN (seq_len_q / seq_len_k are then the packed totals, the tensors' N). plan: a decode
    forward's GROUP and splits (SPLIT, num_splits); None for one head per program and no split.
    """
    q, k = tensors["Q"], tensors["K"]
    batch, num_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    position = call.position
    _, rows_q, rows_k = call.extent(q, k)
    placeholder = torch.zeros(2, dtype=torch.float32, device=q.device)  # 8 bytes: one element of every type used
    fp32, int32, int64 = placeholder[:1], placeholder.view(torch.int32)[:1], placeholder.view(torch.int64)
    values = dict(
        QOffset=call.q_offset, KOffset=call.k_offset,
        Slopes=position.slopes if position.slopes is not None else fp32.expand(batch, num_heads),
        InvFreq=position.inv_freq if position.inv_freq is not None else fp32,
        RelBias=position.rel_bias if position.rel_bias is not None else fp32.expand(num_heads, 2, 1),
        RelBuckets=position.rel_buckets if position.rel_buckets is not None else int32,
        CuSeqlensQ=call.cu_seqlens_q if call.varlen else int64,
        CuSeqlensK=call.cu_seqlens_k if call.varlen else int64,
        SeqUsedK=call.seqused_k if call.seqused_k is not None else int64,
        BlockTable=call.block_table if call.block_table is not None else int64,
        DLse=fp32, DRelTable=fp32)
    values.update(tensors)
    for name, stride_names in _STRIDE_NAMES.items():
        if name in values:
            values.update(zip(stride_names, values[name].stride()))
    rel_grad = "DRelTable" in tensors
    values.update(
        num_heads=num_heads, num_kv_groups=num_heads // k.shape[1], seq_len_q=seq_q, seq_len_k=seq_k,
        sm_scale=float(call.scale), window=int(call.window or 0), attention_factor=float(position.attention_factor),
        max_distance=int(position.max_distance), num_buckets=int(position.num_buckets),
        max_seqlen_q=rows_q, max_seqlen_k=rows_k, page_size=int(call.page_size),
        max_pages=call.block_table.shape[1] if call.block_table is not None else 0,
        len_bucket_q=triton.next_power_of_2(rows_q), len_bucket_k=triton.next_power_of_2(rows_k),
        HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), **_tile_widths(position, head_dim),
        POS=SCHEME_CODES[position.kind], CAUSAL=bool(call.causal), HAS_WINDOW=call.window is not None,
        INTERLEAVED=bool(position.interleaved), DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_DLSE="DLse" in tensors, REL_GRAD=rel_grad, VARLEN=call.varlen, SEQUSED=call.seqused_k is not None,
        PAGED=call.block_table is not None, GROUP=plan.group if plan else 1, SPLIT=bool(plan and plan.splits > 1),
        num_splits=plan.splits if plan else 1,
        NUM_BUCKETS_BLOCK=triton.next_power_of_2(position.num_buckets) if rel_grad else 1)
    missing = [name for name in kernel.arg_names if name not in values and name not in TUNED]
    if missing:
        raise TypeError(f"kernel_arguments has no value for {kernel.__name__}'s parameters {missing}")
    return {name: values[name] for name in kernel.arg_names if name not in TUNED}


def _configs(kernel, block_d: int, pos: str, decode_block_m: Optional[int] = None) -> list:
    """The launch configs of kernel: autotune candidates on GPU, the one interpreter config on CPU tensors.
    decode_block_m: a decode plan's tile rows (forward only), which fixes BLOCK_M."""
    if kernel is _attn_bwd_preprocess_kernel:
        return [PREPROCESS_CONFIG]
    if kernel is _attn_split_merge_kernel:
        return [MERGE_CONFIG]
    if decode_block_m is not None:
        if _interpreting():
            return [triton.Config({"BLOCK_M": decode_block_m, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
        return decode_configs(block_d, pos, decode_block_m)
    if _interpreting():
        return [INTERPRETER_CONFIG]
    return _CONFIG_LISTS[kernel](block_d, pos)


@functools.lru_cache(maxsize=None)
def _autotuned(kernel, block_d: int, pos: str, decode_block_m: Optional[int] = None):
    """kernel autotuned over its config list. The dK/dV kernel writes DRelTable rows only for the key blocks
    of its config, so trial launches with other BLOCK_N must not leave rows behind: reset_to_zero (the
    autotuner zeroes it before every trial and again before the real launch). No kernel accumulates into
    an output, so no other buffer needs resetting."""
    names = kernel.arg_names
    return triton.autotune(configs=_configs(kernel, block_d, pos, decode_block_m),
                           key=[n for n in _TUNE_KEY if n in names],
                           reset_to_zero=["DRelTable"] if "DRelTable" in names else None)(kernel)


def _launch(kernel, grid, call: KernelCall, plan: Optional[DecodePlan] = None, **tensors: torch.Tensor) -> None:
    """Launch kernel over grid(meta) with kernel_arguments(kernel, call, plan, **tensors) and its configs. An empty
    grid (packed sequences all empty along the grid's axis) launches nothing: its size is 0 under every config."""
    kwargs = kernel_arguments(kernel, call, plan, **tensors)
    block_d, pos = kwargs["BLOCK_D"], SCHEME_NAMES[kwargs.get("POS", SCHEME_CODES["none"])]
    decode_block_m = plan.block_m if plan is not None and kernel is _attn_fwd_kernel else None
    configs = _configs(kernel, block_d, pos, decode_block_m)
    if 0 in grid(configs[0].all_kwargs()):
        return
    if _interpreting():
        fix_loop_bounds()
    if len(configs) == 1:  # nothing to tune
        meta = configs[0].all_kwargs()
        kernel[grid(meta)](**kwargs, **meta)
    else:
        _autotuned(kernel, block_d, pos, decode_block_m)[grid](**kwargs)


def _device_context(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device. A no-op for CPU tensors
    (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      call: KernelCall) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> out like q, lse (B, Hq, Nq) fp32 (natural log); packed layout
    (call.varlen): B = 1, N the totals, lse (1, Hq, total_q). A program per (query block, batch or sequence *
    query head); decode shapes (decode_plan) per (query block, batch or sequence * GQA head group, key split),
    the splits' partial results then merged by _attn_split_merge_kernel."""
    batch, num_heads, seq_q, head_dim = q.shape
    sequences, rows_q, _ = call.extent(q, k)
    plan = decode_plan(q, k, call)
    group, splits = (plan.group, plan.splits) if plan else (1, 1)
    with _device_context(q.device):
        out = torch.empty_like(q)
        lse = torch.empty((batch, num_heads, seq_q), dtype=torch.float32, device=q.device)
        # Split s of head h lands at head s * Hq + h of fp32 partials.
        partial_out = torch.empty((batch, splits * num_heads, seq_q, head_dim), dtype=torch.float32,
                                  device=q.device) if splits > 1 else out
        partial_lse = lse.new_empty((batch, splits * num_heads, seq_q)) if splits > 1 else lse
        _launch(_attn_fwd_kernel, lambda meta: (triton.cdiv(rows_q, meta["BLOCK_M"] // group),
                                                sequences * num_heads // group, splits),
                call, plan, Q=q, K=k, V=v, Out=partial_out, Lse=partial_lse)
        if splits > 1:
            _launch(_attn_split_merge_kernel, lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * num_heads),
                    call, plan, Q=q, K=k, OutPartial=partial_out, LsePartial=partial_lse, Out=out, Lse=lse)
    return out, lse


def attention_backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, call: KernelCall,
                       rel_grad: bool) -> tuple:
    """Gradients of attention_forward's (out, lse) given grad_out (like out) and grad_lse ((B, Hq, Nq) contiguous
    fp32, or None for zero): dq (like q), dk, dv (like k, v), and for rel_grad (relative scheme) the gradient
    of the (Hq, num_buckets) bucket table as fp32, else None. Packed layout (call.varlen): B = 1 and N the totals
    as in attention_forward; the grids and the table's partial rows cover max_seqlen_q / max_seqlen_k. KV-cache
    calls (seqused_k, pages) are forward only."""
    if call.seqused_k is not None or call.block_table is not None:
        raise ValueError("seqused_k and paged caches are forward only: attention_backward does not take them")
    num_heads, head_dim = q.shape[1], q.shape[3]
    num_kv_heads = k.shape[1]
    sequences, rows_q, rows_k = call.extent(q, k)
    rel_grad = rel_grad and call.position.kind == "relative"
    with _device_context(q.device):
        delta = torch.empty_like(lse)
        dlse = {} if grad_lse is None else dict(DLse=grad_lse)
        _launch(_attn_bwd_preprocess_kernel,
                lambda meta: (triton.cdiv(rows_q, meta["BLOCK_M"]), sequences * num_heads),
                call, Q=q, K=k, Out=out, DOut=grad_out, Lse=lse, Delta=delta, **dlse)

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        shared = dict(Q=q, K=k, V=v, DOut=grad_out, Lse=lse, Delta=delta)
        table = {}
        if rel_grad:  # a partial row per (key block, batch, query head), for the smallest BLOCK_N it may run with
            block_n = min(c.kwargs["BLOCK_N"] for c in _configs(_attn_bwd_dkdv_kernel, block_d_for(head_dim),
                                                                  "relative"))
            table["DRelTable"] = torch.zeros((triton.cdiv(rows_k, block_n), sequences, num_heads,
                                              call.position.num_buckets), dtype=torch.float32, device=q.device)
        _launch(_attn_bwd_dkdv_kernel,
                lambda meta: (triton.cdiv(rows_k, meta["BLOCK_N"]), sequences * num_kv_heads),
                call, DK=dk, DV=dv, **shared, **table)
        _launch(_attn_bwd_dq_kernel, lambda meta: (triton.cdiv(rows_q, meta["BLOCK_M"]), sequences * num_heads),
                call, DQ=dq, **shared)
        # (Hq, num_buckets): a fixed-order reduction of the partial rows, so the result is deterministic
        d_rel_table = table["DRelTable"].sum(dim=(0, 1)) if rel_grad else None
    return dq, dk, dv, d_rel_table
