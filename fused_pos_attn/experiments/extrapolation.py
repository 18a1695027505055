"""Train short, test long: the ALiBi paper's Figure 1 at small scale (`python -m fused_pos_attn extrapolate`).

One byte-level LM per position scheme is trained at L_train, then validation perplexity is measured at
L_valid in {1, 2, 4, 8, 16} x L_train on the same validation tokens (non-overlapping windows, or sliding
windows with --sliding). rope, rope_linear and rope_yarn train identically (plain RoPE), so the RoPE model
is trained once and evaluated three ways; the table says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..models import (SCHEMES, BatchSampler, ModelConfig, TransformerLM, count_parameters, load_corpus,
                      training_scheme)
from .common import (TrainLog, TrainSettings, evaluate_perplexity, markdown_table, results_header, seed_everything,
                     suffix, train, with_overrides, write_csv)

PAPER_NOTE = ("ALiBi paper (WikiText-103, 247M params, L_train=512), ppl at 512 / 1012 / 2512 / 4512 / 10512: "
              "sinusoidal 20.05 / 43.54 / 132.41 / 209.37 / 341.53; rotary 20.07 / 21.37 / 31.58 / 39.15 / 60.77; "
              "T5 bias 19.65 / 18.79 / 20.41 / 25.91 / 52.95; ALiBi 19.73 / 18.73 / 18.41 / 18.41 / 18.32.")


@dataclass(frozen=True)
class ExtrapolationConfig:
    """Everything one `extrapolate` run depends on.

    eval_tokens: predictions scored per L_valid (the same tokens at every length; rounded down to a
        multiple of the longest L_valid). sliding_stride: None for non-overlapping windows.
    """

    schemes: tuple[str, ...] = SCHEMES
    train_len: int = 128
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    steps: int = 400
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    eval_tokens: int = 65536
    sliding_stride: Optional[int] = None
    data: Optional[str] = None
    max_bytes: Optional[int] = None
    device: str = "cpu"

    @classmethod
    def for_device(cls, device: str, **overrides) -> "ExtrapolationConfig":
        """CPU defaults (all schemes in about 10 minutes on 2 cores) or larger CUDA defaults."""
        base = cls(device=device)
        if torch.device(device).type == "cuda":
            base = replace(base, train_len=512, d_model=384, num_layers=6, num_heads=6, steps=3000, batch_size=32,
                           lr=1e-3, eval_tokens=262144)
        return with_overrides(base, overrides)

    def eval_lengths(self) -> list[int]:
        return [m * self.train_len for m in self.multiples]


@dataclass
class SchemeResult:
    scheme: str
    trained_as: str
    parameters: int
    log: TrainLog
    perplexity: dict[int, float]


def run_extrapolation(cfg: ExtrapolationConfig) -> tuple[list[SchemeResult], str]:
    """Train one model per training scheme and evaluate every requested scheme at every L_valid.

    Returns the per-scheme results and a description of the corpus."""
    corpus = load_corpus(cfg.data, max_bytes=cfg.max_bytes)
    lengths = cfg.eval_lengths()
    eval_tokens = max(1, cfg.eval_tokens // max(lengths)) * max(lengths)
    trained: dict[str, tuple[TransformerLM, TrainLog]] = {}
    results = []
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.train_len, lr=cfg.lr,
                             warmup=max(1, min(30, cfg.steps // 10)), seed=cfg.seed)
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.train_len, seed=cfg.seed)
    for scheme in cfg.schemes:
        base = training_scheme(scheme)
        if base not in trained:
            seed_everything(cfg.seed)
            model = TransformerLM(ModelConfig(scheme=base, d_model=cfg.d_model, num_layers=cfg.num_layers,
                                              num_heads=cfg.num_heads, train_len=cfg.train_len)).to(cfg.device)
            log = train(model, lambda step: (*sampler.batch(step), None), settings, cfg.device, desc=f"train {base}")
            trained[base] = (model, log)
        model, log = trained[base]
        model.set_scheme(scheme)
        perplexity = {n: evaluate_perplexity(model, corpus.valid, n, eval_tokens, cfg.device,
                                             sliding_stride=cfg.sliding_stride, desc=f"eval {scheme} L={n}")
                      for n in lengths}
        model.set_scheme(base)
        results.append(SchemeResult(scheme, base, count_parameters(model), log, perplexity))
    return results, corpus.describe()


def table(results: Sequence[SchemeResult], lengths: Sequence[int]) -> tuple[list[str], list[list]]:
    headers = (["scheme", "trained as", "params", "train loss (last 20)", "train tokens/s"]
               + [f"ppl @{n}" for n in lengths])
    rows = [[r.scheme, r.trained_as, r.parameters, r.log.final_loss(), r.log.tokens_per_s(skip=2)]
            + [r.perplexity[n] for n in lengths] for r in results]
    return headers, rows


def plot(results: Sequence[SchemeResult], cfg: ExtrapolationConfig, path: Path, title: str) -> None:
    """Perplexity vs L_valid, log-x (and log-y), one line per scheme, L_train marked: Figure 1's shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = cfg.eval_lengths()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in results:
        ax.plot(lengths, [r.perplexity[n] for n in lengths], marker="o", label=r.scheme,
                linewidth=2.5 if r.scheme == "alibi" else 1.5)
    ax.axvline(cfg.train_len, color="gray", linestyle="--", linewidth=1, label=f"L_train = {cfg.train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("validation input length L_valid (tokens = bytes)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: Sequence[SchemeResult], cfg: ExtrapolationConfig, out_dir: Path, command: str,
           wall_s: float, corpus: str, write_plot: bool = True) -> tuple[str, Path]:
    """Write <out_dir>/extrapolation_<device>[_sliding].{md,csv,png}; return (markdown, md path)."""
    lengths = cfg.eval_lengths()
    headers, rows = table(results, lengths)
    name = f"extrapolation_{suffix(cfg.device)}" + ("_sliding" if cfg.sliding_stride else "")
    evaluation = (f"sliding windows of L_valid advancing by {cfg.sliding_stride}, each scoring its last "
                  f"{cfg.sliding_stride} predictions" if cfg.sliding_stride else
                  "non-overlapping windows (each starts without context)")
    eval_tokens = max(1, cfg.eval_tokens // max(lengths)) * max(lengths)
    extra = [f"model: d_model={cfg.d_model}, layers={cfg.num_layers}, heads={cfg.num_heads}, pre-norm, GELU MLP, "
             f"tied embeddings; fused_attention (causal) in every layer",
             f"training: L_train={cfg.train_len}, {cfg.steps} steps x {cfg.batch_size} sequences "
             f"({cfg.steps * cfg.batch_size * cfg.train_len / 1e6:.2f}M tokens), AdamW lr {cfg.lr}, seed {cfg.seed}",
             f"data: {corpus}",
             f"evaluation: {eval_tokens} validation predictions per L_valid, {evaluation}",
             f"wall time of the whole run: {wall_s:.0f} s"]
    md = results_header("Length extrapolation: train at L, evaluate at 1x..16x L", cfg.device, command, extra)
    md += "\n" + markdown_table(headers, rows)
    md += ("\nNotes:\n- rope, rope_linear and rope_yarn are one model (trained with plain RoPE); rope_linear divides "
           "positions by L_valid/L_train and rope_yarn applies YaRN(factor L_valid/L_train, original length "
           "L_train) when L_valid > L_train.\n- learned: positions past L_train reuse the last table row (clamp); the "
           "paper's learned baseline cannot run past L at all.\n- t5: per-layer (heads, 32) bucket tables, "
           "max_distance 128 (causal buckets).\n"
           f"- Byte tokens: {cfg.train_len} bytes of Python are roughly {cfg.train_len // 4}-{cfg.train_len // 3} BPE "
           "tokens, a much shorter context than the paper's 512 (which also warns against training ALiBi at <= 128 "
           "tokens), and the models are tiny and briefly trained.\n- " + PAPER_NOTE + "\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / f"{name}.md"
    if write_plot:
        png = out_dir / f"{name}.png"
        plot(results, cfg, png, f"Trained at L={cfg.train_len} ({cfg.steps} steps), byte-level LM on Python source; "
                                f"{'sliding' if cfg.sliding_stride else 'non-overlapping'} evaluation")
        md += f"\n![perplexity vs length]({png.name})\n"
    md_path.write_text(md)
    write_csv(out_dir / f"{name}.csv", headers, [[_csv(c) for c in row] for row in rows])
    return md, md_path


def _csv(value):
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else value
