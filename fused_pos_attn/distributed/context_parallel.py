"""context_parallel_attention and the sequence shard / gather helpers around it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .. import backends
from ..attention import (OffsetArg, check_qkv, is_int, check_bool, check_offsets, check_scale,
                         check_window, current_length)
from ..positions import PositionArg, as_position_scheme
from ..spec import AttentionSpec
from .allgather import allgather_attention
from .comm import GatherSequence, check_ranks_agree, group_rank_and_size
from .layout import check_layout, check_shard_length, global_positions, shard
from .ring import RingAttention, RingPlan

METHODS = ("ring", "allgather")


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: PositionArg = "none", *,
                               causal: bool = False, scale: Optional[float] = None, window: Optional[int] = None,
                               group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag",
                               method: str = "ring", position_offset: OffsetArg = 0, return_lse: bool = False,
                               backend: str = "auto"):
    """Self-attention over a sequence split along N across the ranks of group, with every position scheme
    computed from global positions: the result on each rank is its rows of fused_attention on the full sequence.

    Args:
        q: (B, Hq, n, D) this rank's shard of the queries, k, v: (B, Hkv, n, D) of the keys and values (n = N / P
            on each of the P ranks, the shards made by shard_sequence with the same layout). Any strides.
        pos, causal, scale, window: as fused_attention, on global positions.
        group: the context-parallel process group (None: the default group).
        layout: "zigzag" (rank r holds chunks r and 2P - 1 - r of 2P: causal work balanced; n must be even) or
            "contiguous" (rank r holds tokens [r n, (r + 1) n)).
        method: "ring": K/V shards travel around the ring by point-to-point transfers that overlap the compute,
            partial results merged by LSE in fp32; pairs of chunks with no visible key are skipped, and with a
            window the ring stops after the last step any rank needs. "allgather": K/V gathered once (P x the
            K/V shard in memory; cheap under GQA / MQA), then one kernel call per query chunk.
        position_offset: int or (B,) int tensor, the global position of token 0 (a prefix or cache before the
            sequence); the same on every rank.
        return_lse: also return the (B, Hq, n) fp32 log-sum-exp (fp64 for fp64 inputs), differentiable.
        backend: "auto" | "triton" | "cuda" | "cpu", a kernel backend (the ring's backward calls the kernels'
            backward with the global LSE; the dense reference has none).

    Returns:
        out (B, Hq, n, D) in q's dtype (and lse), differentiable in q, k, v and a RelativeBias table. The
        table is a parameter like the projection weights: each rank's gradient holds its own queries'
        contribution, and the data-parallel wrapper spanning the context-parallel ranks (DDP / FSDP, as torchtitan
        arranges it) sums them into the full gradient.

    Every rank must make the same call on an equal shard. Before any data moves, one all_gather_object of the
    call's shapes and arguments checks that: an invalid input on one rank (an odd zigzag shard, a bad argument) or
    calls that differ across ranks raise a ValueError on every rank, not a hang (a host synchronization per call).
    """
    rank, world = group_rank_and_size(group)
    error, signature, prepared = None, {}, None
    try:
        signature, prepared = _prepare(q, k, v, pos, causal, scale, window, group, layout, method, position_offset,
                                       return_lse, backend, world)
    except Exception as exc:  # raised on every rank by check_ranks_agree, after the others learn of it
        error = exc
    check_ranks_agree(signature, error, group)
    spec, rel_table, chosen = prepared
    if method == "ring":
        plan = RingPlan.build(group, rank, world, layout, q.shape[2], causal, spec.window)
        out, lse = RingAttention.apply(q, k, v, rel_table, plan, spec, chosen)
    else:
        out, lse = allgather_attention(q, k, v, spec, chosen.NAME, group, rank, world, layout)
    return (out, lse) if return_lse else out


def _prepare(q, k, v, pos, causal, scale, window, group, layout, method, position_offset, return_lse, backend,
             world: int) -> tuple[dict, tuple]:
    """Validate one rank's call: (signature that must match across ranks, (spec of global token 0, the T5 table
    or None, the kernel backend module))."""
    check_qkv(q, k, v)
    batch, num_heads, shard_len, head_dim = q.shape
    if k.shape[2] != shard_len:
        raise ValueError(f"q and k must be shards of the same sequence (equal length n), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    check_layout(layout)
    check_shard_length(layout, shard_len, "the shard length n (q.shape[2])")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    causal = check_bool(causal, "causal")
    check_bool(return_lse, "return_lse")
    chosen = backends.select(backend, q)
    if chosen is None:
        raise ValueError("backend='reference' is not supported by context_parallel_attention: the ring's backward "
                         "runs the kernels' backward on each block; use 'auto', 'cpu', 'triton' or 'cuda'")
    if dist.get_backend(group) == "nccl" and not q.is_cuda:
        raise ValueError(f"q must be a CUDA tensor for an NCCL group, got device {q.device}")
    scheme = as_position_scheme(pos)
    offset = check_offsets(position_offset, "position_offset", batch, q.device, default=0)
    total = world * shard_len
    start = position_offset if is_int(position_offset) else offset  # an int start reads no tensor
    length = current_length(scheme, start, start, total, total, fallback=total)
    position = scheme.resolve(batch, num_heads, head_dim, length, q.device, causal=causal)
    spec = AttentionSpec(causal=causal, scale=check_scale(scale, head_dim), window=check_window(window),
                         q_offset=offset, k_offset=offset, position=position)
    signature = dict(shapes=(tuple(q.shape), tuple(k.shape), tuple(v.shape)), dtype=str(q.dtype),
                     arguments=(repr(scheme), causal, spec.scale, spec.window, layout, method, return_lse,
                                chosen.NAME),
                     position_offset=offset.tolist(), group=dist.get_process_group_ranks(group or dist.group.WORLD))
    return signature, (spec, position.rel_table, chosen)


def shard_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag",
                   dim: int = 2) -> torch.Tensor:
    """This rank's shard of the full tensor x along its sequence dim (dim 2 of (B, H, N, D); 1 of (B, N, ...)).

    x.shape[dim] must be divisible by P ("contiguous") or 2P ("zigzag"). No communication; differentiable (the
    full tensor's gradient is zero outside the shard). A view of x for "contiguous", a copy for "zigzag"."""
    rank, world = group_rank_and_size(group)
    return shard(x, check_layout(layout), world, rank, dim)


def gather_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag",
                    dim: int = 2) -> torch.Tensor:
    """The full tensor from every rank's shard x along dim, in global order: the inverse of shard_sequence
    (an all-gather). Differentiable: each rank's gradient of the full tensor counts as its own loss's, so the
    shard's gradient is their sum over the ranks (a reduce-scatter)."""
    _, world = group_rank_and_size(group)
    check_layout(layout)
    check_shard_length(layout, x.shape[dim], f"x.shape[{dim}]")
    return GatherSequence.apply(x, dim, layout, group, world)


@dataclass(frozen=True)
class ContextParallel:
    """How a model's sequences are split over ranks, for models that take it (TransformerLM.forward's
    context_parallel): the group, the layout and the attention method."""

    group: Optional[dist.ProcessGroup] = None
    layout: str = "zigzag"
    method: str = "ring"

    @property
    def world_size(self) -> int:
        return group_rank_and_size(self.group)[1]

    def positions(self, shard_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(shard_len,) int64 global positions (from 0) of this rank's tokens."""
        rank, world = group_rank_and_size(self.group)
        return global_positions(check_layout(self.layout), world, rank, shard_len, device)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return shard_sequence(x, self.group, self.layout, dim)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return gather_sequence(x, self.group, self.layout, dim)
