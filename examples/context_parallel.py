"""Context-parallel attention under torchrun, unchanged on CPUs (gloo) and on a multi-GPU node (NCCL, one GPU per
process): every rank holds 1/P of the sequence, attention runs with ALiBi, RoPE and T5 buckets on global
positions, and each result is checked against one-device fused_attention on the whole sequence.

    torchrun --standalone --nproc-per-node 2 examples/context_parallel.py                  # 2 CPU processes
    torchrun --standalone --nproc-per-node 8 examples/context_parallel.py --seq-len 65536  # a node of 8 GPUs
"""
import argparse
import os

import torch
import torch.distributed as dist

from fused_pos_attn import RelativeBias, RoPE, YaRN, fused_attention
from fused_pos_attn.distributed import context_parallel_attention, gather_sequence, shard_sequence


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--method", choices=("ring", "allgather"), default="ring")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)

    # The full batch, the same on every rank only so that this example can check the result against one device.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, args.seq_len, 64, generator=gen).to(device, dtype)        # (B, Hq, N, D)
    k, v = (torch.randn(1, 2, args.seq_len, 64, generator=gen).to(device, dtype) for _ in range(2))  # GQA: Hkv 2
    table = torch.randn(8, 32, generator=gen).to(device)
    schemes = {"alibi": "alibi", "rope (YaRN x4)": RoPE(theta=1e4, scaling=YaRN(4.0, original_max_len=1024)),
               "t5": RelativeBias(table, max_distance=128)}

    for name, pos in schemes.items():
        # Each rank's shard (B, H, N / P, D): zigzag chunks r and 2P - 1 - r, so causal work is balanced.
        q_local, k_local, v_local = (shard_sequence(x).requires_grad_() for x in (q, k, v))
        out_local = context_parallel_attention(q_local, k_local, v_local, pos, causal=True, method=args.method)
        out_local.float().square().mean().backward()  # a loss on this rank's rows: dq, dk, dv of the shards
        out = gather_sequence(out_local.detach())     # (B, H, N, D) on every rank
        expected = fused_attention(q, k, v, pos, causal=True)
        error = (out.float() - expected.float()).abs().max().item()
        if dist.get_rank() == 0:
            print(f"{name}: {dist.get_world_size()} ranks x {args.seq_len // dist.get_world_size()} tokens, "
                  f"{args.method}, max |context parallel - one device| = {error:.1e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
