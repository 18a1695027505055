"""Context-parallel benchmark on CPUs with gloo: the cost of splitting one sequence over P ranks.

    python bench/context_parallel.py                 # timing at N = 8192, memory at N = 4k .. 32k; writes results
    python bench/context_parallel.py --quick         # N = 1024, memory at 1k / 2k, table on stdout only

Causal self-attention, B = 1, H = 8, D = 64, fp32, --pos (default alibi). Providers:
  one_process       fused_attention on the full sequence in one process with P threads (P = --world, 2).
  ring_zigzag       context_parallel_attention over P gloo ranks x 1 thread, method ring, layout zigzag.
  ring_contiguous   the same, layout contiguous: causal work unbalanced (rank P - 1 computes P blocks, rank 0 one).
  allgather_zigzag  method allgather, layout zigzag.
The same cores do the work either way, so the ratio to one_process is the price of communication, merging and
chunked kernel calls (DESIGN.md target: ring_zigzag <= 1.3x one_process for causal ALiBi at N = 8k).
Timing: providers interleaved round robin (--rounds rounds; the ranks idle while one_process runs and back),
each a median over >= --min-time s of calls; a distributed call is timed between barriers, its time the slowest
rank's; the minimum over rounds is reported. Sent MiB: the bytes each rank sends per call (K/V, in the backward
also the fp32 dK/dV), from the ring plan.
Memory: one fwd+bwd call in fresh processes (a fresh group per N and --memory-worlds size), the peak RSS above the
process's baseline before its inputs exist (inputs, outputs, gradients and workspace; the largest rank's).
Writes bench/results/context_parallel_cpu_<device>.{md,csv}.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from fused_pos_attn import fused_attention
from fused_pos_attn.benchmarking import (MIB, fix_malloc_thresholds, peak_memory_since, position_scheme, results_stem,
                                         run_in_fresh_process, software_versions, start_peak_memory, time_step,
                                         write_results)
from fused_pos_attn.distributed import context_parallel_attention
from fused_pos_attn.distributed.rank_pool import RankPool
from fused_pos_attn.distributed.ring import RingPlan

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROVIDERS = {"one_process": None, "ring_zigzag": ("ring", "zigzag"), "ring_contiguous": ("ring", "contiguous"),
             "allgather_zigzag": ("allgather", "zigzag")}
MODES = ("fwd", "fwd+bwd")
HEADS, HEAD_DIM = 8, 64
CSV_FIELDS = ("device", "provider", "pos", "mode", "world", "seq_len", "heads", "head_dim", "dtype", "ms",
              "ratio_to_one_process", "sent_mib_per_rank")
MEMORY_FIELDS = ("device", "provider", "pos", "world", "seq_len", "peak_mib", "ratio_to_one_process")


def _inputs(seq_len: int, requires_grad: bool, seed: int) -> list[torch.Tensor]:
    """q, k, v (1, H, seq_len, D) fp32 and the output gradient."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=gen) for _ in range(4)]
    return [t.requires_grad_(requires_grad and i < 3) for i, t in enumerate(tensors)]


def _step(provider: str, pos: str, mode: str, seq_len: int, rank: int = 0):
    """A callable running one call of provider (on this rank's shard of seq_len tokens when distributed)."""
    q, k, v, grad = _inputs(seq_len, mode != "fwd", seed=rank)
    if PROVIDERS[provider] is None:
        attention = lambda: fused_attention(q, k, v, position_scheme(pos, HEADS), causal=True)  # noqa: E731
    else:
        method, layout = PROVIDERS[provider]
        attention = lambda: context_parallel_attention(q, k, v, position_scheme(pos, HEADS), causal=True,  # noqa: E731
                                                       layout=layout, method=method)
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return attention()
        return forward
    return lambda: torch.autograd.grad(attention(), (q, k, v), grad)


def rank_time(rank: int, world: int, provider: str, pos: str, mode: str, seq_len: int, min_time_s: float) -> float:
    """On each rank: the median over repeated calls of the slowest rank's time (ms), after one warmup call."""
    step = _step(provider, pos, mode, seq_len // world, rank)
    step()
    times = []
    while len(times) < 3 or sum(times) < min_time_s * 1e3:
        dist.barrier()
        start = time.perf_counter()
        step()
        elapsed = torch.tensor((time.perf_counter() - start) * 1e3, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times)


def peak_mib(provider: str, pos: str, seq_len: int, rank: int = 0, world: int = 1) -> float:
    """Extra peak RSS (MiB) of one fwd+bwd call of seq_len // world tokens, measured in this fresh process."""
    fix_malloc_thresholds()
    _step(provider, pos, "fwd+bwd", 64 * world, rank)()  # thread pools, kernels' first-call allocations
    base = start_peak_memory("cpu")
    _step(provider, pos, "fwd+bwd", seq_len // world, rank)()
    return peak_memory_since("cpu", base) / MIB


def rank_peak_mib(rank: int, world: int, provider: str, pos: str, seq_len: int) -> float:
    return peak_mib(provider, pos, seq_len, rank, world)


def sent_mib(provider: str, mode: str, world: int, seq_len: int) -> float:
    """MiB one rank sends per call (the most any rank sends): K/V shards (fp32) forward; backward again plus the
    fp32 dK/dV accumulators (ring) or the reduce-scatter of dK/dV (allgather)."""
    if PROVIDERS[provider] is None:
        return 0.0
    method, layout = PROVIDERS[provider]
    kv = 2 * HEADS * (seq_len // world) * HEAD_DIM * 4 / MIB  # one K/V shard pair, fp32
    if method == "allgather":
        shifts = world - 1  # all-gather: each rank's shard reaches every other rank
        return shifts * kv * (1 if mode == "fwd" else 2)
    shifts = RingPlan.build(None, 0, world, layout, seq_len // world, causal=True, window=None).shifts
    forward = shifts * kv
    backward = shifts * 2 * kv + (kv if shifts else 0)  # K/V and the dK/dV accumulator per shift, then home
    return forward if mode == "fwd" else forward + backward


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    pool = RankPool(args.world, threads=1, timeout_s=1800)
    torch.set_num_threads(args.world)
    rows = []
    try:
        for mode in args.modes:
            best = {name: math.inf for name in PROVIDERS}
            for _ in range(args.rounds):
                for name in PROVIDERS:
                    if PROVIDERS[name] is None:
                        ms = time_step(_step(name, args.pos, mode, args.seq_len), "cpu", min_time_s=args.min_time)[0]
                    else:
                        ms = pool.run(rank_time, name, args.pos, mode, args.seq_len, args.min_time)[0]
                    best[name] = min(best[name], ms)
            for name, ms in best.items():
                rows.append(dict(provider=name, mode=mode, ms=ms, ratio=ms / best["one_process"],
                                 sent=sent_mib(name, mode, args.world, args.seq_len)))
            print(f"{mode}: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in best.items()), file=sys.stderr)
    finally:
        pool.close()
    memory = []
    for seq_len in args.memory_lens:
        single = run_in_fresh_process(peak_mib, "one_process", args.pos, seq_len, preload=["fused_pos_attn"])
        memory.append(dict(provider="one_process", world=1, seq_len=seq_len, peak_mib=single, ratio=1.0))
        for world in args.memory_worlds:
            for name in (n for n in PROVIDERS if PROVIDERS[n] is not None):
                group = RankPool(world, threads=1, timeout_s=1800)
                try:
                    mib = max(group.run(rank_peak_mib, name, args.pos, seq_len))
                finally:
                    group.close()
                memory.append(dict(provider=name, world=world, seq_len=seq_len, peak_mib=mib, ratio=mib / single))
                print(f"memory N={seq_len} {name} x{world}: {mib:.0f} MiB ({mib / single:.2f}x)", file=sys.stderr)
    return rows, memory


def markdown_table(args: argparse.Namespace, rows: Sequence[dict], memory: Sequence[dict]) -> str:
    lines = [f"Causal {args.pos}, N = {args.seq_len}, B = 1, H = {HEADS}, D = {HEAD_DIM}, fp32; {args.world} ranks x 1 "
             f"thread vs one process x {args.world} threads.\n",
             "| mode | provider | ms | x one_process | MiB sent per rank |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['provider']} | {r['ms']:.0f} | {r['ratio']:.2f} | {r['sent']:.0f} |" for r in rows]
    lens = sorted({m["seq_len"] for m in memory})
    if not lens:
        return "\n".join(lines) + "\n"
    lines += ["", "Peak memory of one fwd+bwd call, MiB above the process baseline (inputs, outputs, gradients, "
              "workspace; distributed: the largest rank's), and its ratio to one_process:\n",
              "| provider | ranks | " + " | ".join(f"N = {n}" for n in lens) + " |", "|---|---|" + "---|" * len(lens)]
    for name, world in sorted({(m["provider"], m["world"]) for m in memory}, key=lambda p: (p[1], p[0])):
        cells = [next(m for m in memory if (m["provider"], m["world"], m["seq_len"]) == (name, world, n)) for n in lens]
        lines.append(f"| {name} | {world} | " + " | ".join(f"{c['peak_mib']:.0f} ({c['ratio']:.2f}x)" for c in cells)
                     + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pos", choices=("none", "alibi", "rope", "relative"), default="alibi")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--memory-lens", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--memory-worlds", type=int, nargs="*", default=[2, 4], help="ranks of the memory runs")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per measurement")
    parser.add_argument("--quick", action="store_true", help="N = 1024, memory at 1k and 2k, one round, no files")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.memory_lens, args.rounds, args.min_time = 1024, [1024, 2048], 1, 0.1
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    env = {**software_versions("cpu"), "load average before the run (1 min)": f"{os.getloadavg()[0]:.2f}",
           "distributed": f"gloo, {args.world} processes on one machine (loopback TCP)"}
    rows, memory = run(args)
    table = markdown_table(args, rows, memory)
    print(table)
    if args.quick:
        return
    stem, command = results_stem(__file__, args.out_dir, "cpu", env["device"], argv)
    write_results(stem, f"Context parallelism (gloo): {env['device']}", env, command, table, CSV_FIELDS,
                  [[env["device"], r["provider"], args.pos, r["mode"], args.world, args.seq_len, HEADS, HEAD_DIM,
                    "float32", f"{r['ms']:.3f}", f"{r['ratio']:.3f}", f"{r['sent']:.1f}"] for r in rows])
    with open(stem + "_memory.csv", "w") as f:
        f.write(",".join(MEMORY_FIELDS) + "\n")
        f.writelines(f"{env['device']},{m['provider']},{args.pos},{m['world']},{m['seq_len']},{m['peak_mib']:.1f},"
                     f"{m['ratio']:.3f}\n" for m in memory)
    print(f"wrote {stem}.md, .csv, _memory.csv", file=sys.stderr)


if __name__ == "__main__":
    main()
