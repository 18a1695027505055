"""The fixed GPU benchmark plan of `make gpu-check`: fused attention (Triton and CUDA C++) against SDPA.

    python bench/gpu_bench.py                  # the whole plan on the current CUDA device (~2.5 min on an
                                               # H100, estimated)
    python bench/gpu_bench.py --budget-s 120   # start no cell after 120 s: the rest is reported as skipped
    python bench/gpu_bench.py --dry-run        # print the plan and its time estimate (no GPU needed)

Every cell is causal self-attention over 16k tokens (B = 16384 // N) with model width 2048 (H = 2048 // D),
as FlashAttention's own benchmarks, in one mode: "fwd" or "fwd+bwd". Per (dtype, D, N, mode) the columns are
  SDPA flash (floor)   F.scaled_dot_product_attention on its flash backend, no position: the floor
  triton / cuda <pos>  fused_attention(backend="triton" / "cuda") with ALiBi and RoPE in the kernel; pos none
                       too at bf16 D=128, the kernels' own cost without a position
  ALiBi bias + SDPA    a (1, H, N, N) ALiBi + causal bias built per call, then SDPA (skipped where the bias
                       would exceed DENSE_BIAS_LIMIT: dense_bias_bytes)
  RoPE + SDPA          q and k rotated into new tensors, then SDPA flash (how models apply RoPE today)
  flex ALiBi           torch.compile'd flex_attention with an ALiBi score_mod (bf16 D=128 N=8192 only: each
                       shape and mode costs a compile)
(providers of fused_pos_attn.benchmarking). Blocks run in PLAN order, bf16 first, so a time budget cuts the
least informative cells. Reported: TFLOP/s (benchmarking.attention_flops, causal counted half) and the time
ratio to the floor, plus the extra peak memory of one call. Results go to
bench/results/gpu_bench_<device>.{csv,md,png} (--out-dir): CSV rows as cells finish, the markdown after each
block, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from fused_pos_attn.benchmarking import (FLOOR, GIB, MIB, Case, Measurement, attention_flops, build_provider,
                                         dense_bias_bytes, device_name, fused_backends, gpu_median_ms, is_optional,
                                         make_inputs, make_step, peak_memory_since, slug, software_versions,
                                         start_peak_memory)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOKENS = 16384  # B * N of every cell
MODEL_WIDTH = 2048  # H * D of every cell
MODES = ("fwd", "fwd+bwd")
DENSE_BIAS_LIMIT = 4 * GIB
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16"}
CSV_FIELDS = ("provider", "pos", "column", "mode", "dtype", "head_dim", "seq_len", "batch", "heads", "median_ms",
              "tflops", "ratio_to_floor", "peak_mib", "skipped")


@dataclass(frozen=True)
class Block:
    """Cells of one dtype and head dim: each (N, mode) row gets every provider of `columns` (provider, pos)."""

    dtype: str
    head_dim: int
    seq_lens: tuple[int, ...]
    columns: tuple[tuple[str, str], ...]


FLOOR_COLUMN = (FLOOR, "none")
FUSED = tuple((f"fused:{backend}", pos) for backend in ("triton", "cuda") for pos in ("alibi", "rope"))
FUSED_NONE = (("fused:triton", "none"), ("fused:cuda", "none"))
UNFUSED = (("sdpa_dense_bias", "alibi"), ("sdpa_dense_bias", "rope"))
ALL_N = (1024, 2048, 4096, 8192, 16384)
PLAN = (  # the flex block's ratios use the floor of the first block's rows
    Block("bfloat16", 128, ALL_N, (FLOOR_COLUMN, *FUSED, *FUSED_NONE, *UNFUSED)),
    Block("bfloat16", 64, ALL_N, (FLOOR_COLUMN, *FUSED, *UNFUSED)),
    Block("bfloat16", 128, (8192,), (("flex_attention", "alibi"),)),
    Block("float16", 128, (1024, 16384), (FLOOR_COLUMN, *FUSED, *UNFUSED)),
    Block("float16", 64, (1024, 16384), (FLOOR_COLUMN, *FUSED, *UNFUSED)),
)
TIMING_MS = {"warmup_ms": 10, "rep_ms": 50}  # gpu_median_ms: >= 3 timed calls at N = 16384 fwd+bwd (~15 ms)
COLUMN_NAMES = {FLOOR_COLUMN: "SDPA flash (floor)", ("sdpa_dense_bias", "alibi"): "ALiBi bias + SDPA",
                ("sdpa_dense_bias", "rope"): "RoPE + SDPA", ("flex_attention", "alibi"): "flex ALiBi",
                **{(p, pos): f"{p.split(':')[1]} {pos.replace('alibi', 'ALiBi').replace('rope', 'RoPE')}"
                   for p, pos in FUSED + FUSED_NONE}}

# Time model of the dry run's estimate (seconds, H100-class GPU and host; bench/results/gpu_check_*.md has
# measured stage times): per measured cell (warmup call, TIMING_MS, the memory call; plus 10 calls); the
# Triton autotuner's first call per (kernels, N) key (25 + 100 ms per config); torch.compile of flex_attention
# per shape and mode.
EST_STARTUP_S, EST_CELL_S, EST_SLOW_GPU_TFLOPS = 15.0, 0.15, 150e12
EST_AUTOTUNE_S = {"fwd": 0.5, "fwd+bwd": 0.9}
EST_FLEX_COMPILE_S = {"fwd": 10.0, "fwd+bwd": 20.0}


@dataclass(frozen=True)
class Cell:
    """One measurement of the plan: provider on case in mode, or a skip decided by the plan (skip != "")."""

    provider: str
    case: Case
    mode: str
    skip: str = ""

    @property
    def column(self) -> str:
        return COLUMN_NAMES[(self.provider, self.case.pos)]

    @property
    def row(self) -> tuple[str, int, int, str]:
        return self.case.dtype, self.case.head_dim, self.case.seq_len, self.mode


def plan_case(pos: str, dtype: str, head_dim: int, seq_len: int) -> Case:
    """The causal self-attention case of the plan: TOKENS tokens, width MODEL_WIDTH, on CUDA."""
    return Case(pos=pos, seq_len=seq_len, batch=max(1, TOKENS // seq_len), heads=MODEL_WIDTH // head_dim,
                head_dim=head_dim, dtype=dtype, device="cuda", causal=True)


def plan_skip(provider: str, case: Case) -> str:
    """Why the plan does not run provider on case ("" when it does): dense biases above DENSE_BIAS_LIMIT."""
    if provider == "sdpa_dense_bias" and case.pos in ("alibi", "relative"):
        size = dense_bias_bytes(case)
        if size > DENSE_BIAS_LIMIT:
            return (f"its (1, H, N, N) fp32 bias would take {size / GIB:.0f} GiB "
                    f"(> {DENSE_BIAS_LIMIT / GIB:.0f} GiB limit)")
    return ""


def build_plan(blocks: Sequence[Block] = PLAN) -> list[list[Cell]]:
    """The cells of each block in run order: N ascending, fwd before fwd+bwd, the floor first in each row.
    Needs no GPU: the providers' availability is checked when the plan runs."""
    plan = []
    for block in blocks:
        cells = []
        for n in block.seq_lens:
            for mode in MODES:
                for provider, pos in block.columns:
                    case = plan_case(pos, block.dtype, block.head_dim, n)
                    cells.append(Cell(provider, case, mode, plan_skip(provider, case)))
        plan.append(cells)
    return plan


def estimate_seconds(plan: Sequence[Sequence[Cell]]) -> float:
    """Rough wall time of running the plan (EST_* model): a planning aid for the gpu-check budget."""
    total = EST_STARTUP_S
    for cell in (c for block in plan for c in block if not c.skip):
        call_s = attention_flops(cell.case, cell.mode) / EST_SLOW_GPU_TFLOPS
        total += EST_CELL_S + 10 * call_s
        if cell.provider == "fused:triton":
            total += EST_AUTOTUNE_S[cell.mode]
        elif cell.provider == "flex_attention":
            total += EST_FLEX_COMPILE_S[cell.mode]
    return total


def describe_plan(plan: Sequence[Sequence[Cell]]) -> str:
    """The plan as a markdown table, one row per (dtype, D, N): which columns run (both modes) or are skipped."""
    lines = ["| dtype | D | N | B x H | columns (each fwd and fwd+bwd) | not run |", "|---|---:|---:|---|---|---|"]
    for block in plan:
        for n in dict.fromkeys(c.case.seq_len for c in block):
            row = [c for c in block if c.case.seq_len == n and c.mode == MODES[0]]
            case = row[0].case
            runs = ", ".join(c.column for c in row if not c.skip)
            skipped = "; ".join(f"{c.column}: {c.skip}" for c in row if c.skip)
            lines.append(f"| {DTYPE_NAMES[case.dtype]} | {case.head_dim} | {n} | {case.batch} x {case.heads} | "
                         f"{runs} | {skipped} |")
    cells = [c for block in plan for c in block]
    measured = sum(not c.skip for c in cells)
    lines.append(f"\n{len(cells)} cells, {measured} measured; estimated {estimate_seconds(plan):.0f} s on an "
                 "H100-class GPU (rough model: EST_* in bench/gpu_bench.py)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- measuring

def _all_finite(result: object) -> bool:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor))


def measure_cell(cell: Cell) -> Measurement:
    """Median GPU time and extra peak memory of one cell. One untimed call first (compilation, autotuning),
    whose results must be finite; then one call for peak memory; then gpu_median_ms."""
    case, mode = cell.case, cell.mode
    step = make_step(build_provider(cell.provider, case), mode, make_inputs(case, requires_grad=mode != "fwd"))
    if not _all_finite(step()):
        raise FloatingPointError("non-finite values in the outputs or gradients")
    base = start_peak_memory(case.device)
    step()
    peak = peak_memory_since(case.device, base)
    return Measurement(cell.provider, case, mode, gpu_median_ms(step, **TIMING_MS), peak / MIB)


def _skipped(cell: Cell, reason: str) -> Measurement:
    return Measurement(cell.provider, cell.case, cell.mode, math.nan, math.nan, reason)


def run_cell(cell: Cell, unavailable: dict[str, str]) -> Measurement:
    """measure_cell, or a skipped Measurement: planned skip, provider not available, or the error it raised
    ("error: ..." for the providers that must run, so that the run fails)."""
    if cell.skip:
        return _skipped(cell, cell.skip)
    if cell.provider in unavailable:
        return _skipped(cell, unavailable[cell.provider])
    try:
        return measure_cell(cell)
    except Exception as err:  # noqa: BLE001  recorded in the results; a failed provider must not end the run
        if isinstance(err, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        first_line = (str(err).strip().splitlines() or [""])[0]
        prefix = "" if is_optional(cell.provider) else "error: "
        return _skipped(cell, f"{prefix}{type(err).__name__}: {first_line}"[:200])


def unavailable_providers(device: str) -> dict[str, str]:
    """provider -> why it cannot run here, for the fused backends this installation lacks."""
    usable = fused_backends(device)
    reasons = {"fused:triton": "Triton is not installed", "fused:cuda": "the CUDA C++ kernels are not built in "
               "this installation (see gpu_build_<device>.log of make gpu-check)"}
    return {provider: why for provider, why in reasons.items() if provider.split(":")[1] not in usable}


# -------------------------------------------------------------------------------------------- reporting

def tflops(m: Measurement) -> float:
    return attention_flops(m.case, m.mode) / (m.median_ms * 1e-3) / 1e12


def _floors(results: Sequence[Measurement]) -> dict[tuple, float]:
    return {(m.case.dtype, m.case.head_dim, m.case.seq_len, m.mode): m.median_ms
            for m in results if m.provider == FLOOR}


def _column(m: Measurement) -> str:
    return COLUMN_NAMES[(m.provider, m.case.pos)]


def summary_table(results: Sequence[Measurement]) -> str:
    """One row per (dtype, D, N, mode), one column per provider: TFLOP/s (time / floor time); then notes on
    every skipped or failed cell."""
    floors = _floors(results)
    columns = list(dict.fromkeys(_column(m) for m in results))
    index = {(m.case.dtype, m.case.head_dim, m.case.seq_len, m.mode, _column(m)): m for m in results}
    rows = list(dict.fromkeys((m.case.dtype, m.case.head_dim, m.case.seq_len, m.mode) for m in results))
    rows.sort(key=lambda r: (r[0] != "bfloat16", -r[1], r[3] != "fwd", r[2]))
    lines = ["| dtype | D | mode | N | " + " | ".join(columns) + " |", "|---|---:|---|---:|" + "---:|" * len(columns)]
    for dtype, head_dim, n, mode in rows:
        cells = []
        for column in columns:
            m = index.get((dtype, head_dim, n, mode, column))
            if m is None:
                cells.append("")
            elif m.skipped:
                cells.append("error" if m.skipped.startswith("error") else "skipped")
            else:
                ratio = m.median_ms / floors.get((dtype, head_dim, n, mode), math.nan)
                cells.append(f"{tflops(m):.0f}" if m.provider == FLOOR else f"{tflops(m):.0f} ({ratio:.2f}x)")
        lines.append(f"| {DTYPE_NAMES[dtype]} | {head_dim} | {mode} | {n} | " + " | ".join(cells) + " |")
    notes = ["", "TFLOP/s of causal attention (FLOPs counted half for the mask: benchmarking.attention_flops); "
             "(x): time relative to the SDPA flash floor of the same row, below 1 is faster. Empty: not in the "
             "plan."]
    reasons: dict[tuple[str, str], list[str]] = {}
    for m in results:
        if m.skipped:
            reasons.setdefault((_column(m), m.skipped), []).append(
                f"{DTYPE_NAMES[m.case.dtype]} D={m.case.head_dim} N={m.case.seq_len} {m.mode}")
    notes += [f"- {column} not run ({len(where)} cells: {', '.join(where[:4])}{', ...' if len(where) > 4 else ''})"
              f": {reason}" for (column, reason), where in reasons.items()]
    return "\n".join(lines + notes) + "\n"


def memory_table(results: Sequence[Measurement]) -> str:
    """Extra peak memory (MiB) of one fwd+bwd call at each (dtype, D, N), per provider."""
    train = [m for m in results if m.mode == "fwd+bwd" and not m.skipped]
    columns = list(dict.fromkeys(_column(m) for m in train))
    index = {(m.case.dtype, m.case.head_dim, m.case.seq_len, _column(m)): m.peak_mib for m in train}
    rows = sorted(dict.fromkeys((m.case.dtype, m.case.head_dim, m.case.seq_len) for m in train),
                  key=lambda r: (r[0] != "bfloat16", -r[1], r[2]))
    lines = ["| dtype | D | N | " + " | ".join(columns) + " |", "|---|---:|---:|" + "---:|" * len(columns)]
    for row in rows:
        values = [index.get((*row, c)) for c in columns]
        lines.append(f"| {DTYPE_NAMES[row[0]]} | {row[1]} | {row[2]} | "
                     + " | ".join("" if v is None else f"{v:.0f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def write_csv_header(path: str, env: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        f.writelines(f"# {key}: {value}\n" for key, value in env.items())
        csv.writer(f).writerow(CSV_FIELDS)


def append_csv_row(path: str, m: Measurement, floor: float) -> None:
    c = m.case
    speed = "" if m.skipped else f"{tflops(m):.2f}"
    ratio = "" if m.skipped else f"{m.median_ms / floor:.4f}"
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow([m.provider, c.pos, _column(m), m.mode, c.dtype, c.head_dim, c.seq_len, c.batch,
                                c.heads, f"{m.median_ms:.4f}", speed, ratio, f"{m.peak_mib:.1f}", m.skipped])


def write_markdown(path: str, results: Sequence[Measurement], env: dict[str, str], plan_text: str) -> None:
    with open(path, "w") as f:
        f.write(f"# GPU kernel benchmark: {env['device']}\n\n")
        f.writelines(f"- {key}: {value}\n" for key, value in env.items())
        f.write(f"\n## Throughput\n\n{summary_table(results)}\n## Extra peak memory of one fwd+bwd call (MiB)\n\n"
                f"{memory_table(results)}\n## Plan\n\n{plan_text}\n")


def plot(path: str, results: Sequence[Measurement], env: dict[str, str]) -> None:
    """TFLOP/s vs N: one panel per (dtype, D) and mode, one line per column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [m for m in results if not m.skipped]
    panels = sorted(dict.fromkeys((m.case.dtype, m.case.head_dim) for m in done),
                    key=lambda p: (p[0] != "bfloat16", -p[1]))
    if not panels:
        return
    columns = list(dict.fromkeys(_column(m) for m in done))
    fig, axes = plt.subplots(len(panels), len(MODES), figsize=(6 * len(MODES), 3.6 * len(panels)), squeeze=False)
    for row, (dtype, head_dim) in enumerate(panels):
        for col, mode in enumerate(MODES):
            ax = axes[row][col]
            for i, column in enumerate(columns):
                points = sorted((m.case.seq_len, tflops(m)) for m in done if _column(m) == column
                                and m.mode == mode and (m.case.dtype, m.case.head_dim) == (dtype, head_dim))
                if points:
                    ax.plot(*zip(*points), marker="o", color=f"C{i}", label=column,
                            linestyle="--" if column == COLUMN_NAMES[FLOOR_COLUMN] else "-")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{DTYPE_NAMES[dtype]}, D={head_dim}, {mode}")
            ax.set_xlabel("N (B = 16384 / N, H = 2048 / D)")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(5, len(handles)), frameon=False)
    fig.suptitle(f"{env['device']}, causal, torch {env['torch']}, triton {env['triton']}")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main

def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_plan(plan: Sequence[Sequence[Cell]], unavailable: dict[str, str], budget_s: float, stem: str,
             env: dict[str, str], log: Callable[[str], None]) -> tuple[list[Measurement], bool]:
    """Measure every cell in order (skipping the providers of `unavailable`, provider -> reason), writing
    stem.csv as cells finish and stem.md after each block. Cells not started within budget_s are skipped.
    Returns the measurements and whether the run was interrupted (SIGINT, or SIGTERM once main set it up)."""
    start = time.monotonic()
    plan_text = describe_plan(plan)
    total = sum(len(block) for block in plan)
    results: list[Measurement] = []
    write_csv_header(stem + ".csv", env)
    stop = ""  # why the remaining cells are skipped
    for provider, reason in unavailable.items():
        log(f"{provider}: not run, {reason}")
    for block in plan:
        for cell in block:
            elapsed = time.monotonic() - start
            if not stop and elapsed > budget_s:
                stop = f"time budget of {budget_s:.0f} s (--budget-s) spent before this cell"
                log(f"[{time.strftime('%H:%M:%S')} +{elapsed:5.0f}s] {stop}: {total - len(results)} cells left")
            try:
                m = _skipped(cell, stop) if stop else run_cell(cell, unavailable)
            except KeyboardInterrupt:
                stop = "the run was interrupted"
                m = _skipped(cell, stop)
            results.append(m)
            floor = _floors(results).get(cell.row, math.nan)
            append_csv_row(stem + ".csv", m, floor)
            where = (f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - start:5.0f}s] {len(results)}/{total} "
                     f"{DTYPE_NAMES[cell.case.dtype]} D={cell.case.head_dim} N={cell.case.seq_len} {cell.mode} "
                     f"{cell.column}")
            if not m.skipped:
                log(f"{where}: {m.median_ms:.3f} ms, {tflops(m):.0f} TFLOP/s, {m.median_ms / floor:.2f}x floor, "
                    f"{m.peak_mib:.0f} MiB")
            elif m.skipped not in (cell.skip, stop, unavailable.get(cell.provider)):
                log(f"{where}: {m.skipped}")
        write_markdown(stem + ".md", results, env, plan_text)
    return results, stop == "the run was interrupted"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate, run nothing")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="start no cell after this many seconds (the rest is reported as skipped)")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0: every planned cell of a required provider ran (or was skipped by plan or budget); 1: errors or an
    interrupted run; 2: no CUDA device."""
    args = parse_args(argv)
    plan = build_plan()
    if args.dry_run:
        print(describe_plan(plan))
        return 0
    if not torch.cuda.is_available():
        print("gpu_bench.py needs a CUDA device (torch.cuda.is_available() is False); --dry-run prints the plan",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    env = {**software_versions("cuda"),
           "timing": f"triton.testing.do_bench median (warmup {TIMING_MS['warmup_ms']} ms, rep "
                     f"{TIMING_MS['rep_ms']} ms, L2 flushed before each call), after one untimed call "
                     "(compilation, autotuning)",
           "memory": "extra peak of one call above its inputs (torch.cuda.max_memory_allocated)",
           "cells": f"causal self-attention, B = {TOKENS} // N, H = {MODEL_WIDTH} // D"}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"gpu_bench_{slug(device_name('cuda'))}")
    results, interrupted = run_plan(plan, unavailable_providers("cuda"), args.budget_s, stem, env,
                                    log=lambda msg: print(msg, flush=True))
    try:
        plot(stem + ".png", results, env)
    except Exception as err:  # noqa: BLE001  the tables matter more than the figure
        print(f"no plot: {type(err).__name__}: {err}", file=sys.stderr)
    print("\n" + summary_table(results))
    print(f"wrote {stem}.md, .csv, .png", flush=True)
    errors = [m for m in results if m.skipped.startswith("error")]
    return 1 if errors or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
