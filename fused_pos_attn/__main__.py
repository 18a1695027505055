"""Command line: `python -m fused_pos_attn check [--device cpu|cuda] [--no-bench]`."""
from __future__ import annotations

import argparse
import os
import sys

import torch

# Without CUDA the Triton kernels can still be checked on CPU tensors through Triton's interpreter,
# which must be chosen before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def check(args: argparse.Namespace) -> int:
    from . import __version__
    from .selfcheck import format_results, run_self_check

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"fused_pos_attn {__version__}, torch {torch.__version__}, device {device} ({where})")
    if device == "cpu":
        print("CPU: backend='auto' runs the native C++ kernels; the Triton kernels are also checked, through "
              "Triton's interpreter (a correctness check, not a speed one).")
    results = run_self_check(device)
    if not results:
        print("no kernel backend can run on this device (is triton installed?)")
    else:
        print("\nCorrectness (causal, GQA, Nq=19, Nk=37, D=32; forward and backward vs fp64 reference):")
        print(format_results(results))
    if not args.no_bench:
        from .benchmarking import quick_table

        print("\nSpeed and peak memory (forward, B=1, H=8, D=64, causal):")
        print(quick_table(device))
    return 0 if results and all(r.passed for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_pos_attn")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="correctness self-check and a small speed/memory table")
    check_parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    check_parser.add_argument("--no-bench", action="store_true", help="skip the speed/memory table")
    check_parser.set_defaults(run=check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
