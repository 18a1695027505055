"""Communication for context parallelism: the group's shape, point-to-point shifts around the ring, the
differentiable all-gather of a sharded sequence, and the check that every rank made the same call."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .layout import global_to_rank_major, rank_major_to_global

# torch 2.13 renamed the tensor collectives (the old names warn); torch 2.11 has only the old ones.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def group_rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(this process's rank in group, group size); group None is the default group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "(or run under torchrun) before context-parallel calls")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on processes outside the group
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group "
                         f"(ranks {dist.get_process_group_ranks(group)})")
    return rank, dist.get_world_size(group)


def global_rank(group: Optional[dist.ProcessGroup], group_rank: int) -> int:
    """The global rank of group_rank (point-to-point ops take global ranks)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def start_exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                   group: Optional[dist.ProcessGroup], tag: int) -> list:
    """Post asynchronous sends (tensor, group rank to) and receives (buffer, group rank from) as one batch;
    returns the works to wait on. Every rank must post its batches in the same order (NCCL matches them by
    order, gloo by tag)."""
    ops = [dist.P2POp(dist.isend, tensor, global_rank(group, peer), group, tag) for tensor, peer in sends]
    ops += [dist.P2POp(dist.irecv, buffer, global_rank(group, peer), group, tag) for buffer, peer in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def wait_all(works: list) -> None:
    for work in works:
        work.wait()


class GatherSequence(torch.autograd.Function):
    """All-gather a sharded sequence into global order along dim: x (..., n, ...) -> (..., P * n, ...).

    Backward: each rank's gradient of the full tensor is its own loss's; the shard's gradient is their sum over
    the ranks (a reduce-scatter, in fp32), as if the ranks' losses were summed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, layout: str, group: Optional[dist.ProcessGroup],
                world: int) -> torch.Tensor:
        ctx.dim, ctx.layout, ctx.group, ctx.world = dim, layout, group, world
        local = x.movedim(dim, 0).contiguous()  # (n, ...): all_gather_into_tensor concatenates along dim 0
        gathered = local.new_empty((world * local.shape[0],) + local.shape[1:])
        _all_gather(gathered, local, group=group)
        return rank_major_to_global(gathered, layout, world).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = global_to_rank_major(grad.movedim(ctx.dim, 0), ctx.layout, ctx.world)
        full = full.to(torch.float64 if grad.dtype == torch.float64 else torch.float32).contiguous()
        mine = full.new_empty((full.shape[0] // ctx.world,) + full.shape[1:])
        _reduce_scatter(mine, full, group=ctx.group)
        return mine.to(grad.dtype).movedim(0, ctx.dim), None, None, None, None


def check_ranks_agree(signature: dict, error: Optional[Exception], group: Optional[dist.ProcessGroup]) -> None:
    """Raise on every rank when any rank's input is invalid (error) or the ranks' calls differ (signature:
    name -> a comparable description of what must match).

    One all_gather_object of these small descriptions, before any data moves: a mistake on one rank becomes an
    exception on all of them instead of a hang or a wrong result. It is a host synchronization (on NCCL, of the
    current CUDA device)."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (None if error is None else f"{type(error).__name__}: {error}", signature),
                           group=group)
    if error is not None:
        raise error
    failed = [rank for rank, (message, _) in enumerate(gathered) if message is not None]
    if failed:
        raise ValueError(f"context parallel: the input on rank(s) {failed} is invalid, so every rank stops: "
                         f"{gathered[failed[0]][0]}")
    for name in signature:
        values = [sig[name] for _, sig in gathered]
        if any(value != values[0] for value in values):
            per_rank = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))
            raise ValueError(f"context parallel: the ranks' {name} differ ({per_rank}); every rank of the group "
                             f"must make the same call on its equal shard")
