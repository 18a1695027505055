"""Ring attention: K/V blocks travel around the group while each rank attends its queries to them.

At step t rank r holds the K/V shard of rank (r - t) mod P. It posts the shift of that block to rank r + 1 (and
the receive of the next from r - 1) before computing on it, so the transfer overlaps the compute, and merges
each partial result into fp32 (out, LSE) accumulators. Pairs of (query chunk, key chunk) that the causal mask or
the window leaves without a visible key are not computed, and steps where no rank has such a pair are not
taken: with a window the ring stops after the last step any rank needs.

Backward runs the same ring: the block's K/V travel again, together with the block's fp32 dK/dV accumulator,
to which each rank adds its queries' contribution; after the last step each accumulator goes straight home.
Every block's backward is the kernel's with the global out and LSE, so it is exact (delta = rowsum(dO * O) -
dLSE uses the merged output).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
import torch.distributed as dist

from ..spec import AttentionSpec, lse_dtype
from .comm import start_exchange, wait_all
from .layout import Chunk, rank_chunks

_KV_TAG, _GRAD_TAG, _HOME_TAG = 0, 1, 2


def pair_visible(q: Chunk, k: Chunk, causal: bool, window: Optional[int]) -> bool:
    """Whether some query of chunk q sees some key of chunk k (key visible iff pk <= pq when causal, and
    pq - pk < window when windowed)."""
    if causal and k.global_start > q.global_end - 1:
        return False
    return window is None or q.global_start - (k.global_end - 1) < window


@dataclass(frozen=True)
class RingPlan:
    """The work of one rank. steps[t]: the (query chunk, key chunk) pairs it computes at step t, when it holds
    the K/V of rank (rank - t) mod world; len(steps) - 1 shifts are taken (the last step any rank needs)."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world: int
    steps: list[list[tuple[Chunk, Chunk]]]

    @classmethod
    def build(cls, group, rank: int, world: int, layout: str, shard_len: int, causal: bool,
              window: Optional[int]) -> "RingPlan":
        def pairs(r: int, t: int) -> list[tuple[Chunk, Chunk]]:
            q_chunks = rank_chunks(layout, world, r, shard_len)
            k_chunks = rank_chunks(layout, world, (r - t) % world, shard_len)
            return [(qc, kc) for qc in q_chunks for kc in k_chunks if pair_visible(qc, kc, causal, window)]

        needed = [t for t in range(world) if any(pairs(r, t) for r in range(world))]
        last = max(needed, default=0)
        return cls(group, rank, world, [pairs(rank, t) for t in range(last + 1)])

    @property
    def shifts(self) -> int:
        return len(self.steps) - 1

    def shift(self, blocks: tuple[torch.Tensor, ...], tag: int) -> tuple[tuple[torch.Tensor, ...], list]:
        """Start sending blocks to the next rank and receiving the previous rank's into new buffers."""
        incoming = tuple(torch.empty_like(block) for block in blocks)
        works = start_exchange([(block, (self.rank + 1) % self.world) for block in blocks],
                               [(buffer, (self.rank - 1) % self.world) for buffer in incoming], self.group, tag)
        return incoming, works


def _pair_spec(spec: AttentionSpec, q_chunk: Chunk, k_chunk: Chunk) -> AttentionSpec:
    """spec with the offsets of the pair's first query and key (spec's offsets are those of global token 0)."""
    return dataclasses.replace(spec, q_offset=spec.q_offset + q_chunk.global_start,
                               k_offset=spec.k_offset + k_chunk.global_start)


def _rows(x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """The chunk's rows of a (..., n, D) or (B, H, n) tensor along its sequence dim (2)."""
    return x.narrow(2, chunk.local_start, chunk.length)


def merge_partial(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: (out_acc, lse_acc), attention over one key set, becomes attention over its union with the key
    set of (out, lse). out* (B, H, n, D), lse* (B, H, n); a row with no visible key has lse -inf and out 0."""
    merged = torch.logaddexp(lse_acc, lse)
    finite = torch.where(torch.isinf(merged), torch.zeros_like(merged), merged)  # rows still without a key
    out_acc.mul_(torch.exp(lse_acc - finite).unsqueeze(-1)).add_(out * torch.exp(lse - finite).unsqueeze(-1))
    lse_acc.copy_(merged)


class RingAttention(torch.autograd.Function):
    """(q, k, v shards, T5 table or None) -> (out, lse) of the global attention for this rank's queries.

    Memory per rank beyond the inputs and outputs: the K/V shard received and the one arriving (forward and
    backward), fp32 out / dq accumulators; in the backward, while more shifts follow, the arriving, the sent and
    the held block's fp32 dK/dV (the last step adds into the arrived accumulators directly)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_table: Optional[torch.Tensor],
                plan: RingPlan, spec: AttentionSpec, backend: ModuleType):
        acc_dtype = lse_dtype(q.dtype)
        out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)
        kv = (k.contiguous(), v.contiguous())  # the K/V shard held at step t, rank (rank - t)'s (sent whole)
        for t, pairs in enumerate(plan.steps):
            incoming, works = plan.shift(kv, _KV_TAG) if t < plan.shifts else (None, [])
            for q_chunk, k_chunk in pairs:
                out, lse = backend.forward(_rows(q, q_chunk), _rows(kv[0], k_chunk), _rows(kv[1], k_chunk),
                                           _pair_spec(spec, q_chunk, k_chunk))
                merge_partial(_rows(out_acc, q_chunk), _rows(lse_acc, q_chunk), out, lse)
            wait_all(works)
            kv = incoming
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.plan, ctx.spec, ctx.backend = plan, spec, backend
        ctx.set_materialize_grads(False)
        return out, lse_acc

    @staticmethod
    def backward(ctx, grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor]):
        q, k, v, out, lse = ctx.saved_tensors
        plan, spec, backend = ctx.plan, ctx.spec, ctx.backend
        rel_grad = ctx.needs_input_grad[3]
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        grad_lse = None if grad_lse is None else grad_lse.to(lse.dtype).contiguous()
        # The kernels take lse (and dLSE) rows contiguous: each query chunk's, once.
        chunks = {q_chunk for pairs in plan.steps for q_chunk, _ in pairs}
        lse_rows = {c: _rows(lse, c).contiguous() for c in chunks}
        grad_lse_rows = {c: None if grad_lse is None else _rows(grad_lse, c).contiguous() for c in chunks}
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        d_table = None
        kv = (k.contiguous(), v.contiguous())
        dkv, dkv_works = None, []  # the held block's (dK, dV) accumulators, arriving by dkv_works
        for t, pairs in enumerate(plan.steps):
            last = t == plan.shifts
            incoming, works = (None, []) if last else plan.shift(kv, _KV_TAG)
            if last:  # no transfer left to overlap: take the arriving accumulators first and add into them
                wait_all(dkv_works)
                dkv_works = []
            # Otherwise this step's contribution is added once the held block's accumulators have arrived, so
            # their transfer overlaps this compute.
            target = dkv if last and dkv is not None else tuple(
                torch.zeros(k.shape, dtype=lse.dtype, device=k.device) for _ in range(2))
            for q_chunk, k_chunk in pairs:
                rows = lambda x: _rows(x, q_chunk)  # noqa: E731
                dq_pair, dk_pair, dv_pair, d_table_pair = backend.backward(
                    rows(grad_out), grad_lse_rows[q_chunk], rows(q), _rows(kv[0], k_chunk), _rows(kv[1], k_chunk),
                    rows(out), lse_rows[q_chunk], _pair_spec(spec, q_chunk, k_chunk), rel_grad)
                rows(dq).add_(dq_pair)
                _rows(target[0], k_chunk).add_(dk_pair)
                _rows(target[1], k_chunk).add_(dv_pair)
                if rel_grad:
                    d_table = d_table_pair if d_table is None else d_table + d_table_pair
            wait_all(dkv_works)
            if target is not dkv:
                dkv = target if dkv is None else tuple(acc.add_(c) for acc, c in zip(dkv, target))
            del target
            if not last:
                dkv, dkv_works = plan.shift(dkv, _GRAD_TAG)
            wait_all(works)
            kv = incoming
        if plan.shifts:  # the accumulators of rank (rank - shifts)'s block go home; ours arrive
            home = tuple(torch.empty_like(acc) for acc in dkv)
            wait_all(start_exchange([(acc, (plan.rank - plan.shifts) % plan.world) for acc in dkv],
                                    [(buffer, (plan.rank + plan.shifts) % plan.world) for buffer in home],
                                    plan.group, _HOME_TAG))
            dkv = home
        if rel_grad and d_table is None:  # no pair on this rank (cannot happen with self-attention's diagonal)
            d_table = torch.zeros_like(spec.position.rel_table)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), d_table, None, None, None
