"""Per-token latency of KV-cache decoding (`python -m fused_pos_attn latency`).

A randomly initialized TransformerLM decodes one token at a time against a KV cache already holding
`context` positions (filled with random keys/values: the time does not depend on their values, and a real
prefill of 16k tokens per configuration would dominate the run). Two attention implementations:
- fused: `fused_attention(q, k_cache, v_cache, pos, causal=True, q_offset=cache_length)`; the cache holds
  UN-rotated keys and the kernel rotates q and k (RoPE) or adds the bias (ALiBi, T5) in registers;
- sdpa: what models do without the kernel: RoPE keys rotated once and cached rotated, ALiBi / T5 bias rows
  (1, H, 1, Nk) built every step, then F.scaled_dot_product_attention.
The time is the median over decode steps of the whole model step (all layers, MLP, head).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from ..models import KVCache, ModelConfig, TransformerLM
from .common import (markdown_table, results_header, seed_everything, suffix, synchronize, tqdm, with_overrides,
                     write_csv)


@dataclass(frozen=True)
class LatencyConfig:
    schemes: tuple[str, ...] = ("nope", "alibi", "rope", "t5")
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 8
    steps: int = 20
    warmup: int = 3
    batch: int = 1
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def for_device(cls, device: str, **overrides) -> "LatencyConfig":
        base = cls(device=device)
        if torch.device(device).type == "cuda":
            base = replace(base, contexts=(1024, 4096, 16384, 65536), d_model=1024, num_layers=8, num_heads=16,
                           steps=50)
        return with_overrides(base, overrides)


@dataclass(frozen=True)
class LatencyResult:
    scheme: str
    attention: str
    context: int
    median_ms: float
    min_ms: float


@torch.no_grad()
def decode_latency(scheme: str, attention: str, context: int, cfg: LatencyConfig) -> LatencyResult:
    """Median and min ms per decoded token at a cache of `context` positions."""
    seed_everything(cfg.seed)
    config = ModelConfig(scheme=scheme, d_model=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                         train_len=context, attention=attention)
    model = TransformerLM(config).to(cfg.device).eval()
    cache = KVCache(config, cfg.batch, context + cfg.warmup + cfg.steps, device=cfg.device)
    cache.fill_random(context, torch.Generator(device=cfg.device).manual_seed(cfg.seed))
    token = torch.zeros(cfg.batch, 1, dtype=torch.int64, device=cfg.device)
    times = []
    for step in range(cfg.warmup + cfg.steps):
        synchronize(cfg.device)
        begin = time.perf_counter()
        logits = model(token, cache)
        token = logits[:, -1:].argmax(-1)
        synchronize(cfg.device)
        if step >= cfg.warmup:
            times.append((time.perf_counter() - begin) * 1e3)
    return LatencyResult(scheme, attention, context, statistics.median(times), min(times))


def run_latency(cfg: LatencyConfig) -> list[LatencyResult]:
    jobs = [(s, a, n) for n in cfg.contexts for s in cfg.schemes for a in ("fused", "sdpa")]
    return [decode_latency(s, a, n, cfg) for s, a, n in tqdm(jobs, desc="decode latency", leave=False)]


def table(results: Sequence[LatencyResult], cfg: LatencyConfig) -> tuple[list[str], list[list]]:
    """One row per (scheme, context): fused ms, sdpa ms, their ratio."""
    by_key = {(r.scheme, r.attention, r.context): r for r in results}
    headers = ["scheme", "context", "fused ms/token", "sdpa ms/token", "sdpa / fused"]
    rows = []
    for scheme in cfg.schemes:
        for n in cfg.contexts:
            fused, sdpa = by_key.get((scheme, "fused", n)), by_key.get((scheme, "sdpa", n))
            if fused and sdpa:
                rows.append([scheme, n, fused.median_ms, sdpa.median_ms, sdpa.median_ms / fused.median_ms])
    return headers, rows


def plot(results: Sequence[LatencyResult], cfg: LatencyConfig, path: Path) -> None:
    """ms per token against context (log scale), one colour per scheme: fused solid, SDPA dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for index, scheme in enumerate(cfg.schemes):
        for attention, style in (("fused", "-"), ("sdpa", "--")):
            points = sorted((r.context, r.median_ms) for r in results
                            if r.scheme == scheme and r.attention == attention)
            if points:
                ax.plot(*zip(*points), style, marker="o", markersize=3, color=f"C{index}",
                        label=f"{scheme}, {'fused_attention' if attention == 'fused' else 'SDPA'}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (cached tokens)")
    ax.set_ylabel("ms per token (median)")
    ax.set_title(f"Decode latency per token, {cfg.num_layers} layers, d {cfg.d_model}, {cfg.device}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: Sequence[LatencyResult], cfg: LatencyConfig, out_dir: Path, command: str,
           wall_s: float, write_plot: bool = True) -> tuple[str, Path]:
    """Write <out_dir>/decode_latency_<device>.{md,csv,png}; return (markdown, md path)."""
    headers, rows = table(results, cfg)
    dtype = "fp32"
    extra = [f"model: random init, d_model={cfg.d_model}, layers={cfg.num_layers}, heads={cfg.num_heads} "
             f"(head dim {cfg.d_model // cfg.num_heads}), {dtype}, batch {cfg.batch}",
             f"per configuration: cache prefilled with {'/'.join(str(c) for c in cfg.contexts)} random positions, "
             f"{cfg.warmup} warmup steps, median of {cfg.steps} decode steps (one token each, whole model)",
             "fused: fused_attention with q_offset = cache length, cache of un-rotated keys; sdpa: rotated keys "
             "cached (RoPE) or a (1, H, 1, Nk) bias row built per step (ALiBi, T5), then "
             "F.scaled_dot_product_attention; nope: both are plain attention (fused kernel vs SDPA)",
             f"wall time of the whole run: {wall_s:.0f} s"]
    md = results_header("KV-cache decode latency per token", cfg.device, command, extra)
    md += "\n" + markdown_table(headers, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"decode_latency_{suffix(cfg.device)}.md"
    path.write_text(md)
    write_csv(out_dir / f"decode_latency_{suffix(cfg.device)}.csv",
              ["scheme", "attention", "context", "median_ms", "min_ms"],
              [[r.scheme, r.attention, r.context, f"{r.median_ms:.4f}", f"{r.min_ms:.4f}"] for r in results])
    if write_plot:
        plot(results, cfg, out_dir / f"decode_latency_{suffix(cfg.device)}.png")
    return md, path
