"""The ALiBi paper's efficiency claim at small scale (`python -m fused_pos_attn claims`).

Paper (1.3B model): ALiBi trained at L = 1024 reaches 8.92 ppl at 2048 against sinusoidal trained at
2048: 9.01, using 26.2 GB vs 29.3 GB of memory (about 11% less) and training about 11% faster.

Here: ALiBi trained at L vs sinusoidal trained at 2L for the same number of tokens (half the batch at 2L),
both with fused_attention; reported: training tokens/s, peak memory (a fresh process per run: its peak RSS
on CPU; max_memory_allocated on CUDA), validation perplexity at 2L. Then the kernel-level part: the same
models trained a few steps with fused_attention vs a dense bias + F.scaled_dot_product_attention.
"""
from __future__ import annotations

import gc
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..models import BatchSampler, ModelConfig, TransformerLM, load_corpus
from .common import (TrainSettings, evaluate_perplexity, markdown_table, peak_rss_mib, results_header,
                     run_in_fresh_process, seed_everything, suffix, train, trim_heap, with_overrides, write_csv)

MIB = 1024 * 1024
WARMUP_STEPS = 5  # steps left out of tokens/s


@dataclass(frozen=True)
class RunSpec:
    """One training run in its own process. eval_len: validation length for perplexity (None: skip)."""

    name: str
    scheme: str
    train_len: int
    batch_size: int
    steps: int
    attention: str = "fused"
    eval_len: Optional[int] = None
    eval_tokens: int = 32768
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"
    data: Optional[str] = None
    max_bytes: Optional[int] = None
    threads: int = 0


@dataclass(frozen=True)
class RunResult:
    """Throughput (tokens/s after the first WARMUP_STEPS steps, 2 in runs of <= 10 steps); memory in MiB
    over the steps after the first: the process's peak (CPU: peak RSS, all of torch's libraries included;
    CUDA: max allocated), and that peak minus what was live after the first step (model, optimizer state,
    data, thread pools), i.e. what a training step needs; final train loss; perplexity at eval_len."""

    spec: RunSpec
    tokens: int
    wall_s: float
    tokens_per_s: float
    peak_total_mib: float
    peak_extra_mib: float
    final_loss: float
    perplexity: float


def training_run(spec: RunSpec, for_memory: bool = False) -> RunResult:
    """Train (and evaluate) one model; meant to run in a fresh process (run_in_fresh_process).

    for_memory: fix glibc's malloc thresholds first (benchmarking.fix_malloc_thresholds: blocks >= 128 KiB
    are mmapped and unmapped on free), so that RSS follows the memory in use; it slows steps (~35% here),
    so speed is measured in a process without it.
    """
    if for_memory and torch.device(spec.device).type == "cpu":
        from ..benchmarking import fix_malloc_thresholds

        fix_malloc_thresholds()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    corpus = load_corpus(spec.data, max_bytes=spec.max_bytes)
    seed_everything(spec.seed)
    model = TransformerLM(ModelConfig(scheme=spec.scheme, d_model=spec.d_model, num_layers=spec.num_layers,
                                      num_heads=spec.num_heads, train_len=spec.train_len,
                                      attention=spec.attention)).to(spec.device)
    sampler = BatchSampler(corpus.train, spec.batch_size, spec.train_len, seed=spec.seed)
    settings = TrainSettings(steps=spec.steps, batch_size=spec.batch_size, seq_len=spec.train_len, lr=spec.lr,
                             warmup=max(1, min(30, spec.steps // 10)), seed=spec.seed)
    cuda = torch.device(spec.device).type == "cuda"
    base: dict[str, Optional[float]] = {}

    def start_memory(step: int) -> None:
        """After the first step: one-time costs (thread pools, kernel libraries, optimizer state) are then
        in the baseline, and the peak above it is what a training step itself needs."""
        if step != 0:
            return
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base["bytes"] = torch.cuda.memory_allocated()
        else:
            from ..benchmarking import start_peak_memory

            gc.collect()
            trim_heap()
            base["bytes"] = start_peak_memory("cpu")  # RSS now; VmHWM reset to it

    desc = f"{spec.name}: {spec.scheme} {spec.attention} L={spec.train_len}"
    log = train(model, lambda step: (*sampler.batch(step), None), settings, spec.device, desc=desc,
                on_step=start_memory)
    start = base.get("bytes")
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        total, extra = peak / MIB, (peak - start) / MIB
    else:
        total = peak_rss_mib()
        extra = total - start / MIB if start is not None and spec.steps > 1 else math.nan
    perplexity = math.nan
    if spec.eval_len is not None:
        perplexity = evaluate_perplexity(model, corpus.valid, spec.eval_len, spec.eval_tokens, spec.device,
                                         desc=f"eval {spec.name} L={spec.eval_len}")
    skip = WARMUP_STEPS if spec.steps > 2 * WARMUP_STEPS else 2  # first steps: allocator and page-fault warmup
    return RunResult(spec, log.tokens, log.wall_s, log.tokens_per_s(skip=skip), total, extra, log.final_loss(),
                     perplexity)


MEMORY_STEPS = 5


def measure(spec: RunSpec) -> RunResult:
    """CUDA: training_run in this process (max_memory_allocated). CPU: two fresh processes, one for speed,
    loss and perplexity (the default allocator), one for memory (the first MEMORY_STEPS steps under
    fix_malloc_thresholds; its peak RSS is that process's own)."""
    if torch.device(spec.device).type == "cuda":
        return training_run(spec)
    timed = run_in_fresh_process(training_run, spec, False)
    memory = run_in_fresh_process(training_run, replace(spec, steps=min(spec.steps, MEMORY_STEPS), eval_len=None),
                                  True)
    return replace(timed, peak_total_mib=memory.peak_total_mib, peak_extra_mib=memory.peak_extra_mib)


@dataclass(frozen=True)
class ClaimsConfig:
    """train_len: L (ALiBi's length; sinusoidal trains at 2L with half the batch). kernel_steps: steps of each
    kernel-level run; kernel_multiples: the lengths (x L) of the kernel-level comparison."""

    train_len: int = 128
    batch_size: int = 16
    steps: int = 400
    kernel_steps: int = 30
    kernel_multiples: tuple[int, ...] = (1, 8)
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    lr: float = 2e-3
    seed: int = 0
    eval_tokens: int = 32768
    data: Optional[str] = None
    max_bytes: Optional[int] = None
    device: str = "cpu"

    @classmethod
    def for_device(cls, device: str, **overrides) -> "ClaimsConfig":
        base = cls(device=device)
        if torch.device(device).type == "cuda":
            base = replace(base, train_len=512, d_model=384, num_layers=6, num_heads=6, steps=3000, batch_size=32,
                           lr=1e-3, eval_tokens=262144)
        return with_overrides(base, overrides)

    def spec(self, name: str, scheme: str, train_len: int, batch_size: int, steps: int, attention: str = "fused",
             eval_len: Optional[int] = None) -> RunSpec:
        return RunSpec(name=name, scheme=scheme, train_len=train_len, batch_size=batch_size, steps=steps,
                       attention=attention, eval_len=eval_len, eval_tokens=self.eval_tokens, d_model=self.d_model,
                       num_layers=self.num_layers, num_heads=self.num_heads, lr=self.lr, seed=self.seed,
                       device=self.device, data=self.data, max_bytes=self.max_bytes, threads=torch.get_num_threads())


def run_claims(cfg: ClaimsConfig) -> tuple[list[RunResult], list[RunResult]]:
    """(the 11% experiment: [ALiBi @L, sinusoidal @2L], kernel-level runs)."""
    length = cfg.train_len
    if cfg.batch_size % 2:
        raise ValueError(f"batch_size must be even (sinusoidal trains at 2L with half of it), got {cfg.batch_size}")
    main = [measure(cfg.spec("alibi@L", "alibi", length, cfg.batch_size, cfg.steps, eval_len=2 * length)),
            measure(cfg.spec("sinusoidal@2L", "sinusoidal", 2 * length, cfg.batch_size // 2, cfg.steps,
                             eval_len=2 * length))]
    kernel = []
    tokens_per_step = cfg.batch_size * length
    for multiple in cfg.kernel_multiples:
        n = multiple * length
        batch = max(1, tokens_per_step // n)
        for attention in ("fused", "sdpa"):
            name = "alibi@L" if multiple == 1 else f"alibi@{multiple}L"
            kernel.append(measure(cfg.spec(name, "alibi", n, batch, cfg.kernel_steps, attention)))
    for attention in ("fused", "sdpa"):
        kernel.append(measure(cfg.spec("sinusoidal@2L", "sinusoidal", 2 * length, cfg.batch_size // 2,
                                       cfg.kernel_steps, attention)))
    return main, kernel


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def tables(main: Sequence[RunResult], kernel: Sequence[RunResult], device: str) -> str:
    memory = "process peak RSS MiB" if torch.device(device).type == "cpu" else "max allocated MiB"
    headers = ["run", "train len", "batch", "steps", "tokens", "train tokens/s", f"{memory} (during training)",
               "step peak above live MiB", "train loss (last 20)", "val ppl @2L"]
    rows = [[r.spec.name, r.spec.train_len, r.spec.batch_size, r.spec.steps, r.tokens, r.tokens_per_s,
             r.peak_total_mib, r.peak_extra_mib, r.final_loss, r.perplexity] for r in main]
    alibi, sinusoidal = main
    rows.append(["ratio alibi / sinusoidal", "0.5", "2", "1", _ratio(alibi.tokens, sinusoidal.tokens),
                 _ratio(alibi.tokens_per_s, sinusoidal.tokens_per_s),
                 _ratio(alibi.peak_total_mib, sinusoidal.peak_total_mib),
                 _ratio(alibi.peak_extra_mib, sinusoidal.peak_extra_mib), "", _ratio(alibi.perplexity,
                                                                                     sinusoidal.perplexity)])
    rows.append(["paper, 1.3B: alibi@1024 / sinusoidal@2048", "0.5", "", "", "same", "~1.11 (11% faster)",
                 "26.2 / 29.3 GB = 0.89", "", "", "8.92 / 9.01 = 0.99"])
    md = "## ALiBi at L vs sinusoidal at 2L, same tokens (both fused_attention)\n\n" + markdown_table(headers, rows)
    headers = ["model", "attention", "train len", "batch", "train tokens/s", f"{memory} (during training)",
               "step peak above live MiB", "tokens/s vs fused", "step peak vs fused"]
    rows = []
    for r in kernel:
        fused = next(f for f in kernel if f.spec.name == r.spec.name and f.spec.attention == "fused")
        label = "fused_attention" if r.spec.attention == "fused" else (
            "dense bias + SDPA" if r.spec.scheme == "alibi" else "SDPA (is_causal)")
        rows.append([r.spec.name, label, r.spec.train_len, r.spec.batch_size, r.tokens_per_s, r.peak_total_mib,
                     r.peak_extra_mib, _ratio(r.tokens_per_s, fused.tokens_per_s),
                     _ratio(r.peak_extra_mib, fused.peak_extra_mib)])
    md += (f"\n## Kernel level: the same model, fused_attention vs SDPA ({kernel[0].spec.steps if kernel else 0} "
           f"training steps each, same tokens per step)\n\n" + markdown_table(headers, rows))
    return md


NOTES = """
Notes:
- Both models of the first table run fused_attention, which never materializes an N x N score matrix, so
  the memory of a step depends on the tokens per step (equal here), not on L; the paper's 26.2 vs 29.3 GB
  came from attention matrices that grow with L^2. The time difference is what is left: attention FLOPs per
  token grow with N.
- The second table is where a dense bias costs: it is (1, H, N, N) per layer, built and kept for backward.
- Short runs on a shared 2-core machine: tokens/s ratios move by several percent between runs.
"""


def report(main: Sequence[RunResult], kernel: Sequence[RunResult], cfg: ClaimsConfig, out_dir: Path, command: str,
           wall_s: float) -> tuple[str, Path]:
    """Write <out_dir>/claims_<device>.{md,csv}; return (markdown, md path)."""
    where = ("each run in fresh processes: one trains (tokens/s, loss, perplexity); another runs its first "
             f"{MEMORY_STEPS} steps with glibc's mmap thresholds fixed (benchmarking.fix_malloc_thresholds, so freed "
             "blocks leave RSS) for memory: its peak RSS over steps 2..5 (VmHWM reset after step 1), and that peak "
             "minus the RSS live after step 1 (model, AdamW state, data, torch's libraries and thread pools), "
             "i.e. what a training step itself needs"
             if torch.device(cfg.device).type == "cpu" else
             "memory = torch.cuda.max_memory_allocated over the steps after the first, and that minus what was "
             "allocated after step 1")
    extra = [f"model: d_model={cfg.d_model}, layers={cfg.num_layers}, heads={cfg.num_heads}, byte-level, "
             f"AdamW lr {cfg.lr}, seed {cfg.seed}", where,
             f"tokens/s: tokens / wall time of the training steps after the first {WARMUP_STEPS} (forward, backward, "
             "optimizer step; batch preparation excluded)",
             f"val ppl @2L: {cfg.eval_tokens // (2 * cfg.train_len) * 2 * cfg.train_len} validation predictions, "
             "non-overlapping windows of 2L", f"wall time of the whole run: {wall_s:.0f} s"]
    md = results_header("The ALiBi paper's efficiency claim at small scale", cfg.device, command, extra)
    md += "\n" + tables(main, kernel, cfg.device) + NOTES
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"claims_{suffix(cfg.device)}.md"
    path.write_text(md)
    fields = list(asdict(main[0].spec)) + ["tokens", "wall_s", "tokens_per_s", "peak_total_mib", "peak_extra_mib",
                                            "final_loss", "perplexity"]
    rows = [[*asdict(r.spec).values(), r.tokens, f"{r.wall_s:.3f}", f"{r.tokens_per_s:.1f}",
             f"{r.peak_total_mib:.1f}", f"{r.peak_extra_mib:.1f}", f"{r.final_loss:.4f}", f"{r.perplexity:.4f}"]
            for r in list(main) + list(kernel)]
    write_csv(out_dir / f"claims_{suffix(cfg.device)}.csv", fields, rows)
    return md, path
