"""Packed-sequence benchmark: one fused_attention_varlen call over S documents against what users do today.

    python bench/varlen.py                          # default plan on the default device, writes results
    python bench/varlen.py --docs 16 --min-len 64 --max-len 2048 --pos alibi rope --modes fwd fwd+bwd
    python bench/varlen.py --quick                  # small plan, table on stdout only

Providers, all causal self-attention within each document, RoPE positions restarting per document:
  packed      fused_attention_varlen over the packed (total, H, D) tensors (backend auto).
  per_doc     a Python loop of fused_attention, one call per document, outputs concatenated: its time is the
              sum of the per-document calls' kernel time plus their launch overhead.
  padded      copy the documents into a right-padded (S, H, max_len, D) batch, one fused_attention call, then
              gather the real rows back (padding keys sit after every real query, so causal masking hides them).
  sdpa_mask   F.scaled_dot_product_attention over the packed rows as one (1, H, total, D) sequence with a
              dense (1, H, total, total) block-diagonal mask: the ALiBi bias with -inf across documents, or
              the boolean block-causal mask after rotating q and k by their in-document positions. Skipped
              when the dense mask would exceed --max-dense-gib.
Timing: providers interleaved in one process (round robin over --rounds rounds, each a median of repeated
calls), the minimum over rounds reported. Peak memory: each (provider, mode) once more in a fresh process,
the peak above what exists before its timed calls (inputs and, for fwd+bwd, nothing else), as bench/kernels.py.
Writes bench/results/varlen_<device>_<model>.{md,csv}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from fused_pos_attn import ALiBi, RoPE, fused_attention, fused_attention_varlen
from fused_pos_attn.benchmarking import (GIB, MIB, fix_malloc_thresholds, results_stem, run_in_fresh_process,
                                         software_versions, time_interleaved, time_step, write_results)
from fused_pos_attn.positions import ALIBI_KIND
from fused_pos_attn.reference import apply_rope

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROVIDERS = ("packed", "per_doc", "padded", "sdpa_mask")
MODES = ("fwd", "fwd+bwd")
CSV_FIELDS = ("device", "provider", "pos", "mode", "docs", "total_tokens", "max_len", "heads", "head_dim", "dtype",
              "ms", "ratio_to_per_doc", "peak_mib", "skipped")


@dataclass(frozen=True)
class Plan:
    """Documents (their lengths), heads, head dim, dtype and device of one benchmark."""

    lengths: tuple
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    max_dense_bytes: int = 4 * GIB  # sdpa_mask is skipped above this mask size

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, *self.lengths], device=self.device).cumsum(0).to(torch.int32)

    def dense_mask_bytes(self) -> int:
        return self.heads * self.total ** 2 * 4


def document_lengths(docs: int, min_len: int, max_len: int, seed: int) -> tuple:
    """docs lengths drawn log-uniformly in [min_len, max_len] (seeded), the extremes included."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.empty(docs).uniform_(math.log(min_len), math.log(max_len), generator=gen)).round()
    lengths = [int(n) for n in draws]
    lengths[0], lengths[-1] = min_len, max_len
    return tuple(lengths)


def scheme(pos: str):
    return {"alibi": ALiBi(), "rope": RoPE()}[pos]


def in_document_positions(plan: Plan) -> torch.Tensor:
    """(1, total) position of each packed row inside its document."""
    return torch.cat([torch.arange(n, device=plan.device) for n in plan.lengths])[None]


def document_ids(plan: Plan) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(plan.lengths), device=plan.device),
                                   torch.tensor(plan.lengths, device=plan.device))


def build_provider(name: str, plan: Plan, pos: str) -> Callable:
    """(q, k, v) packed (total, H, D) -> out (total, H, D)."""
    cu, longest, lengths = plan.cu_seqlens(), max(plan.lengths), plan.lengths
    if name == "packed":
        return lambda q, k, v: fused_attention_varlen(q, k, v, cu, cu, longest, longest, scheme(pos), causal=True)
    if name == "per_doc":
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

        def per_doc(q, k, v):
            outs = [fused_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), scheme(pos), causal=True)
                    for a, b in bounds]
            return torch.cat([o[0].transpose(0, 1) for o in outs])
        return per_doc
    if name == "padded":
        batch_index = document_ids(plan)
        row_index = in_document_positions(plan)[0]

        def padded(q, k, v):
            def pad(t):
                out = t.new_zeros(len(lengths), longest, *t.shape[1:])
                out[batch_index, row_index] = t
                return out.transpose(1, 2)  # (S, H, max_len, D)
            out = fused_attention(pad(q), pad(k), pad(v), scheme(pos), causal=True)
            return out.transpose(1, 2)[batch_index, row_index]
        return padded
    if name == "sdpa_mask":
        if plan.dense_mask_bytes() > plan.max_dense_bytes:
            raise MemoryError(f"the dense (1, H, total, total) mask would be {plan.dense_mask_bytes() / GIB:.1f} GiB")
        positions, docs = in_document_positions(plan), document_ids(plan)
        resolved = scheme(pos).resolve(1, plan.heads, plan.head_dim, longest, torch.device(plan.device), causal=True)

        def sdpa_mask(q, k, v):
            visible = (docs[:, None] == docs[None, :]) & (positions[0][:, None] >= positions[0][None, :])
            q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
            if resolved.kind == ALIBI_KIND:
                distance = (positions[0][:, None] - positions[0][None, :]).abs().float()
                mask = (-resolved.slopes[0][:, None, None] * distance).masked_fill(~visible, float("-inf"))[None]
                out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask.to(q.dtype))
            else:
                out = F.scaled_dot_product_attention(apply_rope(q4, positions, resolved),
                                                     apply_rope(k4, positions, resolved), v4, attn_mask=visible)
            return out[0].transpose(0, 1)
        return sdpa_mask
    raise ValueError(f"unknown provider {name!r}")


def make_inputs(plan: Plan, requires_grad: bool) -> tuple:
    gen = torch.Generator().manual_seed(0)
    shape = (plan.total, plan.heads, plan.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=gen).to(plan.device, getattr(torch, plan.dtype)) for _ in range(4))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v)) + (grad,)


def make_step(fn: Callable, mode: str, inputs: tuple) -> Callable:
    q, k, v, grad = inputs
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return fn(q, k, v)
        return forward
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)


def peak_mib(name: str, plan: Plan, pos: str, mode: str) -> float:
    """Extra peak memory (MiB) of one provider and mode, measured in this (fresh) process."""
    fix_malloc_thresholds()
    step = make_step(build_provider(name, plan, pos), mode, make_inputs(plan, mode != "fwd"))
    return time_step(step, plan.device, min_time_s=0.0, min_repeats=1, max_repeats=1)[1] / MIB


def run(plan: Plan, positions: Sequence[str], modes: Sequence[str], providers: Sequence[str], rounds: int,
        min_time: float, memory: bool) -> list[dict]:
    rows = []
    for pos in positions:
        for mode in modes:
            steps, skipped = {}, {}
            for name in providers:
                try:
                    steps[name] = make_step(build_provider(name, plan, pos), mode, make_inputs(plan, mode != "fwd"))
                except MemoryError as err:
                    skipped[name] = str(err)
            times = time_interleaved(steps, plan.device, rounds, min_time)
            for name in providers:
                peak = math.nan
                if memory and name in steps and plan.device == "cpu":
                    peak = run_in_fresh_process(peak_mib, name, plan, pos, mode, preload=["fused_pos_attn"])
                elif name in steps:
                    peak = peak_mib(name, plan, pos, mode)
                rows.append(dict(provider=name, pos=pos, mode=mode, ms=times.get(name, math.nan), peak_mib=peak,
                                 skipped=skipped.get(name, "")))
            per_doc = next((r["ms"] for r in rows if r["provider"] == "per_doc" and r["pos"] == pos
                            and r["mode"] == mode), math.nan)
            for r in rows:
                if r["pos"] == pos and r["mode"] == mode:
                    r["ratio_to_per_doc"] = r["ms"] / per_doc
            print(f"{pos} {mode}: " + ", ".join(f"{r['provider']} {r['ms']:.1f} ms" for r in rows
                                                 if r["pos"] == pos and r["mode"] == mode), file=sys.stderr)
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| pos | mode | provider | ms | x per_doc | extra peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['pos']} | {r['mode']} | {r['provider']} | skipped: {r['skipped']} | | |")
        else:
            lines.append(f"| {r['pos']} | {r['mode']} | {r['provider']} | {r['ms']:.1f} | {r['ratio_to_per_doc']:.2f} "
                         f"| {r['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--pos", nargs="+", choices=("alibi", "rope"), default=["alibi", "rope"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per measurement")
    parser.add_argument("--max-dense-gib", type=float, default=4.0, help="skip sdpa_mask above this mask size")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--quick", action="store_true", help="4 documents of 32..256, one round, no files")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.min_len, args.max_len, args.rounds, args.min_time = 4, 32, 256, 1, 0.05
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    plan = Plan(document_lengths(args.docs, args.min_len, args.max_len, args.seed), args.heads, args.head_dim,
                args.dtype, args.device, int(args.max_dense_gib * GIB))
    env = {**software_versions(args.device), "threads": str(torch.get_num_threads()),
           "load average before the run (1 min)": f"{os.getloadavg()[0]:.2f}",
           "config": f"{len(plan.lengths)} documents, {plan.total} tokens, lengths {list(plan.lengths)}, "
                     f"H={plan.heads} D={plan.head_dim} {plan.dtype}, causal",
           "timing": f"providers interleaved, min over {args.rounds} rounds of a median over >= {args.min_time} s"}
    rows = run(plan, args.pos, args.modes, args.providers, args.rounds, args.min_time, not args.no_memory)
    table = markdown_table(rows)
    print(table)
    if args.quick:
        return
    stem, command = results_stem(__file__, args.out_dir, args.device, env["device"], argv)
    write_results(stem, f"Packed sequences: {env['device']}", env, command, table, CSV_FIELDS,
                  [[env["device"], r["provider"], r["pos"], r["mode"], len(plan.lengths), plan.total, max(plan.lengths),
                    plan.heads, plan.head_dim, plan.dtype, f"{r['ms']:.3f}", f"{r['ratio_to_per_doc']:.3f}",
                    f"{r['peak_mib']:.1f}", r["skipped"]] for r in rows])
    print(f"wrote {stem}.md, .csv", file=sys.stderr)


if __name__ == "__main__":
    main()
