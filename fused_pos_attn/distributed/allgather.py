"""All-gather context parallelism: each rank gathers the whole K/V sequence once (cheap under GQA / MQA, where
K/V are a fraction of Q's size), then attends each of its query chunks to the one contiguous run of keys it can
see (up to the chunk's end when causal, from its first query's window start when windowed) in a single kernel
call. No merge is needed; the backward is the kernels' through autograd, and the K/V gradients of the gathered
sequence are reduce-scattered back to their owners (GatherSequence)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from ..attention import attend
from ..spec import AttentionSpec
from .comm import GatherSequence
from .layout import rank_chunks


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, backend: str,
                        group: Optional[dist.ProcessGroup], rank: int, world: int,
                        layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, n, D), lse (B, Hq, n) of this rank's queries q (B, Hq, n, D) over the gathered k, v
    (B, Hkv, n, D) shards; spec's offsets are those of global token 0."""
    k_full = GatherSequence.apply(k, 2, layout, group, world)  # (B, Hkv, P n, D) in global order
    v_full = GatherSequence.apply(v, 2, layout, group, world)
    total = k_full.shape[2]
    outs, lses = [], []
    for chunk in rank_chunks(layout, world, rank, q.shape[2]):
        first = 0 if spec.window is None else max(0, chunk.global_start - spec.window + 1)
        end = chunk.global_end if spec.causal else total
        chunk_spec = dataclasses.replace(spec, q_offset=spec.q_offset + chunk.global_start,
                                         k_offset=spec.k_offset + first)
        out, lse = attend(q.narrow(2, chunk.local_start, chunk.length), k_full[:, :, first:end],
                          v_full[:, :, first:end], chunk_spec, backend, True)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, 2), torch.cat(lses, 2)
