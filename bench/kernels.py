"""Kernel benchmark: fused attention vs dense-bias SDPA, the SDPA floor and flex_attention.

    python bench/kernels.py                       # full matrix on the default device
    python bench/kernels.py --device cpu --pos alibi --modes fwd --seq-lens 1024 2048
    python bench/kernels.py --quick               # small matrix, table on stdout only

Prints a markdown table (median ms, ratio to sdpa_floor, extra peak MiB) and, unless --quick, writes
bench/results/kernels_<device>_<model>.{md,csv,png}, each headed by the device and software versions.
On a GPU, `make gpu-check` runs bench/gpu_bench.py instead: a fixed plan in TFLOP/s at fp16 / bf16, D 64 / 128.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from fused_pos_attn.benchmarking import (FLOOR, MODES, POSITIONS, REFERENCE_PROVIDER, Measurement, floor_ms,
                                         markdown_table, provider_names, results_stem, run_benchmarks,
                                         software_versions, write_results)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULTS = {  # device type -> (seq lens, longest N for the backward modes, dtype)
    "cpu": ((512, 1024, 2048, 4096), 2048, "float32"),
    "cuda": ((1024, 2048, 4096, 8192, 16384), None, "float16"),
}
CSV_FIELDS = ("device", "provider", "pos", "mode", "batch", "heads", "seq_len", "head_dim", "dtype", "causal",
              "median_ms", "ratio_to_floor", "peak_mib", "skipped")


def environment(device: str, args: argparse.Namespace) -> dict[str, str]:
    """Device, software versions, date and the shape configuration, for the headers of every output."""
    return {
        **software_versions(device),
        "threads": str(torch.get_num_threads()),
        "load average before the run (1 min)": f"{os.getloadavg()[0]:.2f}",
        "config": f"B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} causal, self-attention",
        "timing": f"median of {args.repeats} passes over the whole plan, each a median over >= {args.min_time} s "
                  "of calls",
    }


def csv_rows(results: Sequence[Measurement], env: dict[str, str]) -> list[list]:
    """Long format, one row per measurement (CSV_FIELDS)."""
    rows = []
    for m in results:
        c = m.case
        ratio = m.median_ms / floor_ms(results, m.mode, c.seq_len)
        rows.append([env["device"], m.provider, c.pos, m.mode, c.batch, c.heads, c.seq_len, c.head_dim, c.dtype,
                     c.causal, f"{m.median_ms:.4f}", f"{ratio:.4f}", f"{m.peak_mib:.2f}", m.skipped])
    return rows


def plot(path: str, results: Sequence[Measurement], env: dict[str, str]) -> None:
    """Median ms vs N (log-log), one line per provider, one panel per (pos, mode)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda y, _: f"{y:g}")
    two_and_five = FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "25" else "")

    positions = [p for p in POSITIONS if any(m.case.pos == p and m.provider != FLOOR for m in results)]
    modes = [md for md in MODES if any(m.mode == md for m in results)]
    providers = list(dict.fromkeys(m.provider for m in results))
    seq_lens = sorted({m.case.seq_len for m in results})
    fig, axes = plt.subplots(len(positions), len(modes), figsize=(4.6 * len(modes), 3.6 * len(positions)),
                             squeeze=False, sharex=True)
    for row, pos in enumerate(positions):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            for i, provider in enumerate(providers):
                want_pos = "none" if provider == FLOOR else pos
                points = sorted((m.case.seq_len, m.median_ms) for m in results if m.provider == provider
                                and m.case.pos == want_pos and m.mode == mode and not m.skipped)
                if points:
                    label = f"{provider} (dense oracle)" if provider == REFERENCE_PROVIDER else provider
                    ax.plot(*zip(*points), marker="o", color=f"C{i}", label=label,
                            linestyle="--" if provider == FLOOR else "-")
            ax.set_xscale("log", base=2)
            ax.set_xticks(seq_lens, [str(n) for n in seq_lens])
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(two_and_five)
            ax.set_title(f"pos={pos}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
            if row == len(positions) - 1:
                ax.set_xlabel("N (sequence length)")
            if col == 0:
                ax.set_ylabel("median time (ms)")
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"{env['device']}, {env['config']}, {env['threads']} threads, torch {env['torch']}")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pos", nargs="+", choices=POSITIONS, default=list(POSITIONS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seq-lens", nargs="+", type=int, help="default: 512..4096 on CPU, 1024..16384 on CUDA")
    parser.add_argument("--max-train-seq-len", type=int,
                        help="longest N for bwd and fwd+bwd (default 2048 on CPU, all on CUDA)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="default float32 on CPU, float16 on CUDA")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--providers", nargs="+", help="default: every provider available on the device")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per measurement")
    parser.add_argument("--repeats", type=int, default=3,
                        help="run the whole plan this many times; each cell is the median over the runs")
    parser.add_argument("--quick", action="store_true",
                        help="N in {256, 1024}, fwd only, no flex_attention; print the table, write no files")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    seq_lens, max_train, dtype = DEFAULTS[args.device]
    if args.quick:
        seq_lens, args.modes, args.min_time, args.repeats = (256, 1024), ["fwd"], 0.2, 1
    args.seq_lens = args.seq_lens or list(seq_lens)
    args.max_train_seq_len = args.max_train_seq_len or max_train
    args.dtype = args.dtype or dtype
    args.providers = args.providers or provider_names(args.device, include_flex=not args.quick)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    env = environment(args.device, args)
    results = run_benchmarks(args.providers, args.pos, args.seq_lens, args.modes, args.max_train_seq_len,
                             args.min_time, repeats=args.repeats, batch=args.batch, heads=args.heads,
                             head_dim=args.head_dim, dtype=args.dtype, device=args.device)
    table = markdown_table(results)
    print(table)
    if args.quick:
        return
    stem, command = results_stem(__file__, args.out_dir, args.device, env["device"], argv)
    write_results(stem, f"Kernel benchmark: {env['device']}", env, command, table, CSV_FIELDS, csv_rows(results, env))
    plot(stem + ".png", results, env)
    print(f"wrote {stem}.md, .csv, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
