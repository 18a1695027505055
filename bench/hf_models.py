"""Hugging Face models on the fused kernels: a training step of a patched model against the same model on
transformers' eager and SDPA attention.

    python bench/hf_models.py                              # default plan on the default device, writes results
    python bench/hf_models.py --models llama --seq-lens 1024 2048 --rounds 2
    python bench/hf_models.py --quick                      # small plan, table on stdout only

Models (random weights, built in code): "llama", a Llama-style decoder (RoPE, GQA 8 query / 2 key-value heads,
D = 64), and "bloom", a BLOOM-style decoder (ALiBi, 8 heads, D = 64); hidden 512, 2 layers, vocab 1024.
Providers: "eager" and "sdpa" (transformers' attention implementations; BLOOM has eager only) and "fused"
(fused_pos_attn.hf.patch); the baseline of the ratio column is sdpa where the model has it, else eager. One
step: forward over a (batch, N) batch without padding, the language-model loss, backward. Timing: providers interleaved in one process (round robin over --rounds rounds,
each a median of repeated steps), the minimum over rounds reported; peak memory: each provider once more in a
fresh process (CPU) or after a reset of the allocator's peak (CUDA), the peak above what exists before the step
(the model, its gradients from the warm-up step, the batch). Writes bench/results/hf_models_<device>.{md,csv}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import torch

from fused_pos_attn.benchmarking import (MIB, fix_malloc_thresholds, results_stem, run_in_fresh_process,
                                         software_versions, time_interleaved, time_step, write_results)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODELS = ("llama", "bloom")
PROVIDERS = ("eager", "sdpa", "fused")
CSV_FIELDS = ("device", "model", "provider", "seq_len", "batch", "dtype", "ms", "ratio_to_baseline", "peak_mib")


def build_model(name: str, provider: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The benchmark's model `name` with attention `provider`, in training mode (dropout 0)."""
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024,
                                             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                             max_position_embeddings=16384))
    else:
        model = BloomForCausalLM(BloomConfig(vocab_size=1024, hidden_size=512, n_layer=2, n_head=8))
    model = model.to(device=device, dtype=dtype).train()
    if provider == "fused":
        import fused_pos_attn.hf
        return fused_pos_attn.hf.patch(model)
    model.set_attn_implementation(provider)
    if model.config._attn_implementation != provider:
        raise NotImplementedError(f"{type(model).__name__} has no {provider!r} attention in transformers")
    return model


def make_step(model: torch.nn.Module, seq_len: int, batch: int, device: str):
    """One training step (forward, loss, backward; gradients set to None first) on a fixed random batch."""
    ids = torch.randint(0, 1024, (batch, seq_len), generator=torch.Generator().manual_seed(1)).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()
    return step


def peak_mib(name: str, provider: str, seq_len: int, batch: int, device: str, dtype: str) -> float:
    """Extra peak memory (MiB) of one step, measured in this (fresh, on CPU) process."""
    fix_malloc_thresholds()
    model = build_model(name, provider, device, getattr(torch, dtype))
    return time_step(make_step(model, seq_len, batch, device), device, min_time_s=0.0, min_repeats=1,
                     max_repeats=1)[1] / MIB


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    dtype = getattr(torch, args.dtype)
    for name in args.models:
        models = {}
        for provider in args.providers:
            try:
                models[provider] = build_model(name, provider, args.device, dtype)
            except NotImplementedError as missing:  # BLOOM: eager attention only
                print(f"{name}: {provider} skipped: {missing}", file=sys.stderr)
        for seq_len in args.seq_lens:
            steps = {provider: make_step(model, seq_len, args.batch, args.device) for provider, model in models.items()}
            times = time_interleaved(steps, args.device, args.rounds, args.min_time)
            for provider in models:
                peak = math.nan
                if not args.no_memory:
                    call = (peak_mib, name, provider, seq_len, args.batch, args.device, args.dtype)
                    peak = (run_in_fresh_process(*call, preload=["fused_pos_attn"]) if args.device == "cpu"
                            else call[0](*call[1:]))
                rows.append(dict(model=name, provider=provider, seq_len=seq_len, ms=times[provider], peak_mib=peak))
            baseline = times.get("sdpa", times.get("eager", math.nan))  # BLOOM has no SDPA path
            for r in rows[-len(models):]:
                r["ratio"] = r["ms"] / baseline
            print(f"{name} N={seq_len}: " + ", ".join(f"{r['provider']} {r['ms']:.0f} ms"
                                                     for r in rows[-len(models):]), file=sys.stderr)
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| model | N | provider | step ms | x baseline | extra peak MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['seq_len']} | {r['provider']} | {r['ms']:.0f} | {r['ratio']:.2f} | "
              f"{r['peak_mib']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed steps per measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--quick", action="store_true", help="N = 128 and 256, one round, no files")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.rounds, args.min_time = [128, 256], 1, 0.05
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    import transformers
    env = {**software_versions(args.device), "transformers": transformers.__version__,
           "threads": str(torch.get_num_threads()),
           "load average before the run (1 min)": f"{os.getloadavg()[0]:.2f}",
           "config": f"hidden 512, 2 layers, 8 query heads (Llama: 2 key-value heads), D 64, vocab 1024, batch "
                     f"{args.batch}, {args.dtype}, training step (forward + loss + backward), no padding",
           "timing": f"providers interleaved, min over {args.rounds} rounds of a median over >= {args.min_time} s",
           "baseline": "x baseline: time / the sdpa time (eager for BLOOM: no SDPA attention in transformers)"}
    rows = run(args)
    table = markdown_table(rows)
    print(table)
    if args.quick:
        return
    stem, command = results_stem(__file__, args.out_dir, args.device, env["device"], argv)
    write_results(stem, f"Hugging Face models, training step: {env['device']}", env, command, table, CSV_FIELDS,
                  [[env["device"], r["model"], r["provider"], r["seq_len"], args.batch, args.dtype, f"{r['ms']:.1f}",
                    f"{r['ratio']:.3f}", f"{r['peak_mib']:.1f}"] for r in rows])
    print(f"wrote {stem}.md, .csv", file=sys.stderr)


if __name__ == "__main__":
    main()
