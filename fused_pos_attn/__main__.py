"""Command line of fused_pos_attn.

    python -m fused_pos_attn check [--device cpu|cuda] [--no-bench]   correctness self-check (every kernel
                                                                      backend built here) + speed table
    python -m fused_pos_attn extrapolate [--schemes ...] [--sliding]  train short, test long (ALiBi Figure 1)
    python -m fused_pos_attn claims                                   ALiBi@L vs sinusoidal@2L, fused vs SDPA
    python -m fused_pos_attn passkey                                  passkey retrieval by depth and length
    python -m fused_pos_attn latency                                  KV-cache decode latency, fused vs SDPA

The experiments write markdown + CSV (+ PNG) to bench/results/ (--out-dir to change) and print the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

import torch

# Without CUDA the Triton kernels can still be checked on CPU tensors through Triton's interpreter,
# which must be chosen before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def check(args: argparse.Namespace) -> int:
    from . import __version__
    from .selfcheck import SHAPE_NOTE, format_results, kernel_backends, run_self_check

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"fused_pos_attn {__version__}, torch {torch.__version__}, device {device} ({where})")
    if device == "cpu":
        print("CPU: backend='auto' runs the native C++ kernels; the Triton kernels are also checked, through "
              "Triton's interpreter (a correctness check, not a speed one).")
    elif "cuda" not in kernel_backends(device):
        print("CUDA: the CUDA C++ kernels (backend='cuda') are not built in this installation; reinstall with a "
              "CUDA toolkit (FUSED_POS_ATTN_CUDA=1 makes a failed CUDA build an error) to check them too.")
    results = run_self_check(device)
    if not results:
        print("no kernel backend can run on this device (is triton installed?)")
    else:
        print(f"\nCorrectness ({SHAPE_NOTE}; forward and backward vs fp64 reference):")
        print(format_results(results))
    if not args.no_bench:
        from .benchmarking import quick_table

        print("\nSpeed and peak memory (forward, B=1, H=8, D=64, causal):")
        print(quick_table(device))
    return 0 if results and all(r.passed for r in results) else 1


def _experiment_device(args: argparse.Namespace) -> str:
    from .experiments.common import default_device

    return args.device or default_device()


def _finish(name: str, begin: float, markdown: str, path) -> int:
    print(markdown)
    print(f"{name}: wrote {path} (and siblings) in {time.perf_counter() - begin:.0f} s", file=sys.stderr)
    return 0


def extrapolate(args: argparse.Namespace) -> int:
    from .experiments.extrapolation import ExtrapolationConfig, report, run_extrapolation

    cfg = ExtrapolationConfig.for_device(
        _experiment_device(args), schemes=_tuple(args.schemes), train_len=args.train_len, steps=args.steps,
        batch_size=args.batch_size, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads, lr=args.lr,
        seed=args.seed, multiples=_tuple(args.multiples), eval_tokens=args.eval_tokens, data=args.data,
        max_bytes=args.max_bytes)
    if args.sliding:
        cfg = dataclasses.replace(cfg, sliding_stride=args.stride or cfg.train_len)
    begin = time.perf_counter()
    results, corpus = run_extrapolation(cfg)
    markdown, path = report(results, cfg, Path(args.out_dir), args.command_line, time.perf_counter() - begin, corpus,
                            write_plot=not args.no_plot)
    return _finish("extrapolate", begin, markdown, path)


def claims(args: argparse.Namespace) -> int:
    from .experiments.claims import ClaimsConfig, report, run_claims

    cfg = ClaimsConfig.for_device(
        _experiment_device(args), train_len=args.train_len, steps=args.steps, batch_size=args.batch_size,
        kernel_steps=args.kernel_steps, kernel_multiples=_tuple(args.kernel_multiples), d_model=args.d_model,
        num_layers=args.layers, num_heads=args.heads, lr=args.lr, seed=args.seed, eval_tokens=args.eval_tokens,
        data=args.data, max_bytes=args.max_bytes)
    begin = time.perf_counter()
    main_runs, kernel_runs = run_claims(cfg)
    markdown, path = report(main_runs, kernel_runs, cfg, Path(args.out_dir), args.command_line,
                            time.perf_counter() - begin)
    return _finish("claims", begin, markdown, path)


def passkey(args: argparse.Namespace) -> int:
    from .experiments.passkey import PasskeyConfig, report, run_passkey

    cfg = PasskeyConfig.for_device(
        _experiment_device(args), schemes=_tuple(args.schemes), train_len=args.train_len, steps=args.steps,
        batch_size=args.batch_size, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads, lr=args.lr,
        seed=args.seed, multiples=_tuple(args.multiples), depths=_tuple(args.depths), key_len=args.key_len,
        trials=args.trials)
    begin = time.perf_counter()
    results = run_passkey(cfg)
    markdown, path = report(results, cfg, Path(args.out_dir), args.command_line, time.perf_counter() - begin,
                            write_plot=not args.no_plot)
    return _finish("passkey", begin, markdown, path)


def latency(args: argparse.Namespace) -> int:
    from .experiments.latency import LatencyConfig, report, run_latency

    cfg = LatencyConfig.for_device(
        _experiment_device(args), schemes=_tuple(args.schemes), contexts=_tuple(args.contexts), d_model=args.d_model,
        num_layers=args.layers, num_heads=args.heads, steps=args.steps, warmup=args.warmup, seed=args.seed)
    begin = time.perf_counter()
    results = run_latency(cfg)
    markdown, path = report(results, cfg, Path(args.out_dir), args.command_line, time.perf_counter() - begin)
    return _finish("latency", begin, markdown, path)


def _tuple(values):
    return tuple(values) if values is not None else None


def _add_common(parser: argparse.ArgumentParser, schemes: bool = True) -> None:
    from .experiments.common import RESULTS_DIR
    from .models import SCHEMES

    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the result files go (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    if schemes:
        parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=None, help="default: all")
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training (latency: decode) steps")


def _add_training(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-len", type=int, default=None, help="L_train (CPU default 128; passkey 64)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fused_pos_attn")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="correctness self-check and a small speed/memory table")
    check_parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    check_parser.add_argument("--no-bench", action="store_true", help="skip the speed/memory table")
    check_parser.set_defaults(run=check)

    ext = commands.add_parser("extrapolate", help="train one LM per position scheme at L, perplexity at 1x..16x L")
    _add_common(ext)
    _add_training(ext)
    ext.add_argument("--multiples", nargs="+", type=int, default=None, help="L_valid / L_train (default 1 2 4 8 16)")
    ext.add_argument("--eval-tokens", type=int, default=None, help="validation predictions scored per length")
    ext.add_argument("--sliding", action="store_true", help="sliding-window evaluation instead of non-overlapping")
    ext.add_argument("--stride", type=int, default=None, help="sliding stride (default L_train)")
    ext.add_argument("--data", default=None, help="a text file or folder (default: the Python standard library)")
    ext.add_argument("--max-bytes", type=int, default=None, help="cap each split at this many bytes")
    ext.add_argument("--no-plot", action="store_true")
    ext.set_defaults(run=extrapolate)

    cl = commands.add_parser("claims", help="ALiBi at L vs sinusoidal at 2L (speed, memory, ppl); fused vs SDPA")
    _add_common(cl, schemes=False)
    _add_training(cl)
    cl.add_argument("--kernel-steps", type=int, default=None, help="training steps of each kernel-level run")
    cl.add_argument("--kernel-multiples", nargs="+", type=int, default=None,
                    help="lengths (x L) of the kernel-level comparison (default 1 8)")
    cl.add_argument("--eval-tokens", type=int, default=None)
    cl.add_argument("--data", default=None)
    cl.add_argument("--max-bytes", type=int, default=None)
    cl.set_defaults(run=claims)

    pk = commands.add_parser("passkey", help="passkey retrieval accuracy by depth and length, one model per scheme")
    _add_common(pk)
    _add_training(pk)
    pk.add_argument("--multiples", nargs="+", type=int, default=None, help="lengths / L_train (default 1 2 4 8 16)")
    pk.add_argument("--depths", nargs="+", type=float, default=None, help="key depths in [0, 1]")
    pk.add_argument("--key-len", type=int, default=None, help="digits in the key (1-4, default 2)")
    pk.add_argument("--trials", type=int, default=None, help="sequences per (length, depth) cell")
    pk.add_argument("--no-plot", action="store_true")
    pk.set_defaults(run=passkey)

    lat = commands.add_parser("latency", help="per-token KV-cache decode latency, fused_attention vs dense bias + SDPA")
    _add_common(lat)
    lat.add_argument("--contexts", nargs="+", type=int, default=None, help="cache lengths (default 1k..16k)")
    lat.add_argument("--warmup", type=int, default=None)
    lat.set_defaults(run=latency)

    args = parser.parse_args(argv)
    args.command_line = "python -m fused_pos_attn " + " ".join(shlex.quote(a) for a in argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
