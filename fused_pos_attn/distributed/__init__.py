"""Context parallelism: a sequence split along N across the ranks of a torch.distributed group (NCCL on GPUs,
gloo on CPUs), attention computed with every position scheme on global positions.

    from fused_pos_attn.distributed import context_parallel_attention, shard_sequence, gather_sequence
    q_local = shard_sequence(q, layout="zigzag")                     # (B, H, N / P, D), this rank's tokens
    out_local = context_parallel_attention(q_local, k_local, v_local, pos="alibi", causal=True)
    out = gather_sequence(out_local, layout="zigzag")               # (B, H, N, D) on every rank
"""
from .context_parallel import (METHODS, ContextParallel, context_parallel_attention, gather_sequence,
                               shard_sequence)
from .layout import LAYOUTS

__all__ = ["context_parallel_attention", "shard_sequence", "gather_sequence", "ContextParallel", "LAYOUTS",
           "METHODS"]
