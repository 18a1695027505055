"""Which tokens of a sequence each rank holds, and moving tensors between full and sharded form.

A sequence of N tokens is split over the P ranks of a group along its sequence dim:
- "contiguous": N cut into P chunks, rank r holds chunk r (tokens [r N/P, (r + 1) N/P)).
- "zigzag": N cut into 2P chunks, rank r holds chunks r and 2P - 1 - r, in that order. Under causal masking
  every rank then owns one early and one late chunk and does the same work.
A rank's shard is its chunks concatenated; each chunk is a run of consecutive global positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Chunk:
    """A run of a rank's shard: local rows [local_start, local_start + length) hold the global tokens
    [global_start, global_start + length)."""

    local_start: int
    global_start: int
    length: int

    @property
    def global_end(self) -> int:
        return self.global_start + self.length


def check_layout(layout: str) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 1 if layout == "contiguous" else 2


def rank_chunk_ids(layout: str, world: int, rank: int) -> tuple[int, ...]:
    """The indices of the chunks rank holds, in shard order (the sequence is cut into world * chunks_per_rank)."""
    return (rank,) if layout == "contiguous" else (rank, 2 * world - 1 - rank)


def rank_chunks(layout: str, world: int, rank: int, shard_len: int) -> list[Chunk]:
    """rank's chunks for shards of shard_len tokens (shard_len divisible by chunks_per_rank(layout))."""
    length = shard_len // chunks_per_rank(layout)
    return [Chunk(i * length, chunk * length, length) for i, chunk in enumerate(rank_chunk_ids(layout, world, rank))]


def check_shard_length(layout: str, shard_len: int, what: str) -> None:
    """A zigzag shard is two equal chunks: its length must be even (the full length divisible by 2P)."""
    if shard_len % chunks_per_rank(layout):
        raise ValueError(f"{what} must be even for layout 'zigzag' (the sequence is cut into 2P equal chunks, "
                         f"so N must be divisible by 2P), got {shard_len}")


def global_positions(layout: str, world: int, rank: int, shard_len: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(shard_len,) int64: the global position (from 0) of each token of rank's shard."""
    return torch.cat([torch.arange(c.global_start, c.global_end, device=device)
                      for c in rank_chunks(layout, world, rank, shard_len)])


def shard(x: torch.Tensor, layout: str, world: int, rank: int, dim: int) -> torch.Tensor:
    """rank's shard of the full tensor x along dim (a view for "contiguous", a new tensor for "zigzag")."""
    size = x.shape[dim]
    pieces = world * chunks_per_rank(layout)
    if size % pieces:
        raise ValueError(f"x.shape[{dim}] = {size} must be divisible by {pieces} (P = {world} ranks, "
                         f"layout {layout!r} cuts the sequence into {pieces} chunks)")
    chunks = rank_chunks(layout, world, rank, size // world)
    parts = [x.narrow(dim, c.global_start, c.length) for c in chunks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _chunk_order(layout: str, world: int) -> list[int]:
    """The chunk indices in rank-major order: position i of a rank-major concatenation of the shards holds
    chunk _chunk_order[i]."""
    return [chunk for rank in range(world) for chunk in rank_chunk_ids(layout, world, rank)]


def _permute_chunks(x: torch.Tensor, sources: list[int]) -> torch.Tensor:
    """x's len(sources) equal chunks along dim 0, rearranged: output chunk i is input chunk sources[i] (x itself
    when that is the identity)."""
    if sources == list(range(len(sources))):
        return x
    pieces = x.chunk(len(sources))
    return torch.cat([pieces[source] for source in sources])


def rank_major_to_global(x: torch.Tensor, layout: str, world: int) -> torch.Tensor:
    """x (P * shard_len, ...): the shards concatenated in rank order along dim 0 -> the full sequence in
    global order along dim 0."""
    order = _chunk_order(layout, world)
    return _permute_chunks(x, [order.index(chunk) for chunk in range(len(order))])


def global_to_rank_major(x: torch.Tensor, layout: str, world: int) -> torch.Tensor:
    """Inverse of rank_major_to_global."""
    return _permute_chunks(x, _chunk_order(layout, world))
