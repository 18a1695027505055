"""KV-cache decode benchmark: the attention of one decode step (Nq new query rows against a cache of Nk keys).

    python bench/decode.py                   # default plan on the default device, writes results
    python bench/decode.py --quick           # Nk 1024 / 4096, table on stdout only

Providers, per scheme (B = 1, Hq = 8, D = 64, fp32 on CPU / bf16 on CUDA; MHA and GQA 8 / 2):
  fused  fused_attention over the cache as stored: un-rotated keys, RoPE applied to q and every key in the
         kernel at its position (q_offset = Nk - Nq), the ALiBi bias computed in the kernel.
  paged  fused_attention_with_kvcache over the same keys in a paged cache (pages of 16 rows, shuffled), the
         new rows already written (cache_seqlens = Nk - Nq).
  cuda   fused's call on backend="cuda": the CUDA C++ split-KV forward (csrc/cuda/launch.h decode_plan) instead
         of the Triton one (CUDA devices with the CUDA C++ kernels built, fp16 / bf16; else "-").
  sdpa   what models do without the kernel: RoPE keys cached already rotated (only the new query rotated per
         step), the ALiBi bias row (1, H, Nq, Nk) built per step; then F.scaled_dot_product_attention
         (enable_gqa for GQA). For pos none both are plain attention.
Timing: the providers interleaved round robin over --rounds rounds; each measurement the minimum of --calls calls
(decode steps are short: the minimum is the uncontended time); the minimum over rounds is reported.
kv TB/s: the K and V bytes a fused (or cuda) call reads (2 x Hkv x Nk x D x element size) over its time (H200:
4.8 TB/s peak).
Writes bench/results/decode_<device>_<model>.{md,csv}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fused_pos_attn import fused_attention, fused_attention_with_kvcache
from fused_pos_attn.backends import native
from fused_pos_attn.benchmarking import results_stem, software_versions, write_results
from fused_pos_attn.positions import ALiBi, RoPE
from fused_pos_attn.reference import apply_rope, position_bias

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCHEMES = {"none": lambda: "none", "alibi": ALiBi, "rope": RoPE}
CSV_FIELDS = ("device", "pos", "kv_heads", "q_rows", "keys", "dtype", "fused_ms", "paged_ms", "sdpa_ms",
              "fused_over_sdpa", "paged_over_sdpa", "fused_kv_tb_s", "cuda_ms", "cuda_kv_tb_s")
HEADS, HEAD_DIM, PAGE_SIZE = 8, 64, 16


def providers(pos: str, keys: int, q_rows: int, kv_heads: int, device: str, dtype: torch.dtype) -> dict:
    """name -> a no-argument callable running one decode step's attention."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, q_rows, HEAD_DIM, generator=gen).to(device, dtype)
    k, v = (torch.randn(1, kv_heads, keys, HEAD_DIM, generator=gen).to(device, dtype) for _ in range(2))
    scheme = SCHEMES[pos]()
    offset = keys - q_rows
    resolved = None if pos == "none" else scheme.resolve(1, HEADS, HEAD_DIM, keys, torch.device(device), causal=True)
    positions_q = torch.arange(offset, keys, device=device)[None]
    positions_k = torch.arange(keys, device=device)[None]
    k_rotated = apply_rope(k, positions_k, resolved) if pos == "rope" else k  # the cache a model keeps

    def sdpa():
        mask = None
        if pos == "alibi":
            mask = position_bias(positions_q, positions_k, resolved, dtype)
        if q_rows > 1:  # causal among the new rows
            causal = positions_q[0][:, None] >= positions_k[0][None, :]
            mask = (torch.zeros(causal.shape, dtype=dtype, device=device) if mask is None else mask).masked_fill(
                ~causal, float("-inf"))
        query = apply_rope(q, positions_q, resolved) if pos == "rope" else q
        return F.scaled_dot_product_attention(query, k_rotated, v, attn_mask=mask, enable_gqa=kv_heads != HEADS)

    # The same keys in shuffled pages: (num_pages, PAGE_SIZE, Hkv, D) and the (1, pages) table that orders them.
    num_pages = -(-keys // PAGE_SIZE)
    order = torch.randperm(num_pages, generator=gen)
    pages_k, pages_v = (torch.zeros(num_pages * PAGE_SIZE, kv_heads, HEAD_DIM, device=device, dtype=dtype)
                        for _ in range(2))
    pages_k[:keys], pages_v[:keys] = k[0].transpose(0, 1), v[0].transpose(0, 1)
    pages_k, pages_v = (t.view(num_pages, PAGE_SIZE, kv_heads, HEAD_DIM)[torch.argsort(order)]
                        for t in (pages_k, pages_v))
    block_table = order[None].to(device=device, dtype=torch.int32)
    q_rows_first = q.transpose(1, 2)  # (1, Nq, Hq, D)

    def paged():
        return fused_attention_with_kvcache(q_rows_first, pages_k, pages_v, offset, scheme, block_table=block_table)

    steps = {"fused": lambda: fused_attention(q, k, v, scheme, causal=True, q_offset=offset), "paged": paged,
             "sdpa": sdpa}
    if device == "cuda" and native.built_with_cuda() and dtype in (torch.float16, torch.bfloat16):
        steps["cuda"] = lambda: fused_attention(q, k, v, scheme, causal=True, q_offset=offset, backend="cuda")
    return steps


def min_ms(step, device: str, calls: int) -> float:
    best = math.inf
    for _ in range(calls + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


@torch.no_grad()
def run(args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    rows = []
    for pos in args.pos:
        for kv_heads in args.kv_heads:
            for q_rows in args.q_rows:
                for keys in args.keys:
                    steps = providers(pos, keys, q_rows, kv_heads, args.device, dtype)
                    best = {name: math.inf for name in steps}
                    for _ in range(args.rounds):
                        for name, step in steps.items():
                            best[name] = min(best[name], min_ms(step, args.device, args.calls))
                    best.setdefault("cuda", math.nan)  # not run: no CUDA C++ kernels here
                    rows.append(dict(pos=pos, kv_heads=kv_heads, q_rows=q_rows, keys=keys, **best))
                    print(f"{pos} Hkv={kv_heads} Nq={q_rows} Nk={keys}: fused {best['fused']:.3f} ms, paged "
                          f"{best['paged']:.3f} ms, sdpa {best['sdpa']:.3f} ms", file=sys.stderr)
    return rows


def kv_tb_s(row: dict, dtype: torch.dtype, provider: str = "fused") -> float:
    """TB/s of K and V read by a provider's call: 2 x Hkv x Nk x D elements over its time (nan: not run)."""
    kv_bytes = 2 * row["kv_heads"] * row["keys"] * HEAD_DIM * torch.empty(0, dtype=dtype).element_size()
    return kv_bytes / (row[provider] * 1e-3) / 1e12


def _cell(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def markdown_table(rows: Sequence[dict], dtype: torch.dtype) -> str:
    lines = ["| pos | Hq / Hkv | Nq | Nk | fused ms | paged ms | sdpa ms | fused / sdpa | paged / sdpa "
             "| fused kv TB/s | cuda ms | cuda kv TB/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['pos']} | {HEADS} / {r['kv_heads']} | {r['q_rows']} | {r['keys']} | {r['fused']:.3f} | "
              f"{r['paged']:.3f} | {r['sdpa']:.3f} | {r['fused'] / r['sdpa']:.2f} | {r['paged'] / r['sdpa']:.2f} | "
              f"{kv_tb_s(r, dtype):.3f} | {_cell(r['cuda'], 3)} | {_cell(kv_tb_s(r, dtype, 'cuda'), 3)} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--pos", nargs="+", choices=tuple(SCHEMES), default=["rope", "alibi", "none"])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--q-rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--keys", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20, help="calls per measurement (their minimum is kept)")
    parser.add_argument("--quick", action="store_true", help="Nk 1024 / 4096, Nq 1, one round, no files")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.keys, args.q_rows, args.rounds, args.calls = [1024, 4096], [1], 1, 10
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    env = {**software_versions(args.device), "threads": str(torch.get_num_threads()),
           "load average before the run (1 min)": f"{os.getloadavg()[0]:.2f}",
           "config": f"B=1, Hq={HEADS}, D={HEAD_DIM}, {args.dtype}, causal, q_offset = Nk - Nq",
           "timing": f"providers interleaved, min over {args.rounds} rounds of the min of {args.calls} calls"}
    rows = run(args)
    dtype = getattr(torch, args.dtype)
    table = markdown_table(rows, dtype)
    print(table)
    if args.quick:
        return
    stem, command = results_stem(__file__, args.out_dir, args.device, env["device"], argv)
    write_results(stem, f"KV-cache decode attention: {env['device']}", env, command, table, CSV_FIELDS,
                  [[env["device"], r["pos"], r["kv_heads"], r["q_rows"], r["keys"], args.dtype, f"{r['fused']:.4f}",
                    f"{r['paged']:.4f}", f"{r['sdpa']:.4f}", f"{r['fused'] / r['sdpa']:.3f}",
                    f"{r['paged'] / r['sdpa']:.3f}", f"{kv_tb_s(r, dtype):.4f}", _cell(r["cuda"], 4),
                    _cell(kv_tb_s(r, dtype, "cuda"), 4)] for r in rows])
    print(f"wrote {stem}.md, .csv", file=sys.stderr)


if __name__ == "__main__":
    main()
