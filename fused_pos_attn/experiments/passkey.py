"""Synthetic passkey retrieval (`python -m fused_pos_attn passkey`).

A sequence of random filler tokens hides a key block [KEY, d_1, ..., d_k] at some depth; it ends with
[QUERY, d_1, ..., d_k] and the model must emit the key digits after QUERY (teacher-forced: the loss and the
accuracy are on the k digit predictions only). Digit slot s uses its own 10 tokens, so finding d_s is a
one-hop content lookup: the task measures whether attention still reaches the key at a given distance and
length, not whether the model can build an induction circuit.

Token ids: filler 0..199, slot s digits 200 + 10 s .. 209 + 10 s (k <= 4), KEY 250, QUERY 251.
Depth 0 puts the key block at the start (farthest from the query), depth 1 right before the query.
One small model per scheme is trained at L_train with uniform random depths, then accuracy (all k digits
right, argmax) is measured on a grid of depths x lengths 1x..16x L_train.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..models import SCHEMES, ModelConfig, TransformerLM, training_scheme
from .common import (TrainLog, TrainSettings, markdown_table, results_header, seed_everything, suffix, tqdm, train,
                     with_overrides, write_csv)

FILLER_TOKENS, DIGIT_BASE, KEY, QUERY = 200, 200, 250, 251


@dataclass(frozen=True)
class PasskeyTask:
    key_len: int = 2

    def __post_init__(self):
        if not 1 <= self.key_len <= 4:
            raise ValueError(f"key_len must be in [1, 4], got {self.key_len}")

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator,
              depth: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs, targets (B, seq_len) int64 and the loss mask (B, seq_len) bool (the k digit predictions).

        depth in [0, 1] places every key block at round(depth * last start); None draws starts uniformly.
        """
        k = self.key_len
        query_at = seq_len - k  # index of QUERY in the full sequence of seq_len + 1 tokens
        last_start = query_at - (k + 1)
        if last_start < 0:
            raise ValueError(f"seq_len {seq_len} is too short for a key of {k} digits (needs >= {2 * k + 1})")
        seq = torch.randint(0, FILLER_TOKENS, (batch_size, seq_len + 1), generator=generator)
        digits = torch.randint(0, 10, (batch_size, k), generator=generator) + DIGIT_BASE + 10 * torch.arange(k)
        if depth is None:
            starts = torch.randint(0, last_start + 1, (batch_size,), generator=generator)
        else:
            starts = torch.full((batch_size,), round(depth * last_start))
        rows = torch.arange(batch_size)
        seq[rows, starts] = KEY
        for s in range(k):
            seq[rows, starts + 1 + s] = digits[:, s]
        seq[:, query_at] = QUERY
        seq[:, query_at + 1:] = digits
        mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        mask[:, query_at:] = True  # targets query_at .. seq_len - 1 are d_1 .. d_k
        return seq[:, :-1], seq[:, 1:], mask


@dataclass(frozen=True)
class PasskeyConfig:
    schemes: tuple[str, ...] = SCHEMES
    train_len: int = 64
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    key_len: int = 2
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    trials: int = 50
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def for_device(cls, device: str, **overrides) -> "PasskeyConfig":
        base = cls(device=device)
        if torch.device(device).type == "cuda":
            base = replace(base, train_len=256, d_model=128, num_layers=4, steps=2000, trials=100)
        return with_overrides(base, overrides)

    def lengths(self) -> list[int]:
        return [m * self.train_len for m in self.multiples]


@dataclass
class PasskeyResult:
    scheme: str
    log: TrainLog
    accuracy: dict[tuple[int, float], float]  # (length, depth) -> fraction of trials with every digit right


@torch.no_grad()
def accuracy(model: TransformerLM, task: PasskeyTask, seq_len: int, depth: float, trials: int, seed: int,
             device: str) -> float:
    """Fraction of `trials` sequences whose k key digits are all predicted (argmax) right."""
    gen = torch.Generator().manual_seed(seed)
    inputs, targets, mask = task.batch(trials, seq_len, gen, depth)
    logits = model(inputs.to(device))[:, -task.key_len:]
    correct = (logits.argmax(-1).cpu() == targets[:, -task.key_len:]).all(dim=-1)
    return correct.float().mean().item()


def run_passkey(cfg: PasskeyConfig) -> list[PasskeyResult]:
    task = PasskeyTask(cfg.key_len)
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.train_len, lr=cfg.lr,
                             warmup=max(1, min(30, cfg.steps // 10)), weight_decay=0.0, seed=cfg.seed)

    def next_batch(step: int):
        return task.batch(cfg.batch_size, cfg.train_len, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))

    trained: dict[str, tuple[TransformerLM, TrainLog]] = {}
    results = []
    for scheme in cfg.schemes:
        base = training_scheme(scheme)
        if base not in trained:
            seed_everything(cfg.seed)
            model = TransformerLM(ModelConfig(scheme=base, d_model=cfg.d_model, num_layers=cfg.num_layers,
                                              num_heads=cfg.num_heads, train_len=cfg.train_len)).to(cfg.device)
            trained[base] = (model, train(model, next_batch, settings, cfg.device, desc=f"passkey train {base}"))
        model, log = trained[base]
        model.set_scheme(scheme)
        grid = [(n, d) for n in cfg.lengths() for d in cfg.depths]
        acc = {}
        for i, (n, d) in enumerate(tqdm(grid, desc=f"passkey eval {scheme}", leave=False)):
            acc[(n, d)] = accuracy(model, task, n, d, cfg.trials, seed=10_000 + cfg.seed * 1000 + i, device=cfg.device)
        model.set_scheme(base)
        results.append(PasskeyResult(scheme, log, acc))
    return results


def plot(results: Sequence[PasskeyResult], cfg: PasskeyConfig, path: Path) -> None:
    """One heat-map panel per scheme: rows = key depth, columns = total length, colour = accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(results))
    rows = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows), squeeze=False, layout="constrained")
    lengths, depths = cfg.lengths(), list(cfg.depths)
    image = None
    for index, (ax, r) in enumerate(zip(axes.flat, results)):
        grid = [[r.accuracy[(n, d)] for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for yi, row in enumerate(grid):
            for xi, value in enumerate(row):
                ax.text(xi, yi, f"{value:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(r.scheme, fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        if index // cols == rows - 1 or index + cols >= len(results):
            ax.set_xlabel("total length", fontsize=7)
        if index % cols == 0:
            ax.set_ylabel("key depth (0 = start)", fontsize=7)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="retrieval accuracy")
    fig.suptitle(f"Passkey retrieval, trained at L={cfg.train_len} ({cfg.steps} steps), "
                 f"{cfg.trials} trials per cell", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(results: Sequence[PasskeyResult], cfg: PasskeyConfig) -> tuple[list[str], list[list]]:
    """Per scheme: final train loss, then accuracy averaged over depths at each length."""
    lengths = cfg.lengths()
    headers = ["scheme", "train loss (last 20)"] + [f"acc @{n}" for n in lengths]
    rows = [[r.scheme, r.log.final_loss()]
            + [sum(r.accuracy[(n, d)] for d in cfg.depths) / len(cfg.depths) for n in lengths] for r in results]
    return headers, rows


def report(results: Sequence[PasskeyResult], cfg: PasskeyConfig, out_dir: Path, command: str,
           wall_s: float, write_plot: bool = True) -> tuple[str, Path]:
    """Write <out_dir>/passkey_<device>.{md,csv,png}; return (markdown, md path)."""
    name = f"passkey_{suffix(cfg.device)}"
    headers, rows = summary_table(results, cfg)
    extra = [f"model: d_model={cfg.d_model}, layers={cfg.num_layers}, heads={cfg.num_heads}; trained at "
             f"L={cfg.train_len}, {cfg.steps} steps x {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}",
             f"task: key of {cfg.key_len} digits (10 values per slot) after a KEY marker at a random depth in random "
             f"filler (200 token ids); QUERY at the end; accuracy = all digits right (chance {10 ** -cfg.key_len:g})",
             f"grid: depths {list(cfg.depths)} x lengths {cfg.lengths()}, {cfg.trials} trials per cell",
             f"wall time of the whole run: {wall_s:.0f} s"]
    md = results_header("Passkey retrieval: train at L, test at 1x..16x L", cfg.device, command, extra)
    md += "\n### Accuracy averaged over depths\n\n" + markdown_table(headers, rows)
    depth_headers = ["scheme", "length"] + [f"depth {d:g}" for d in cfg.depths]
    depth_rows = [[r.scheme, n] + [r.accuracy[(n, d)] for d in cfg.depths] for r in results for n in cfg.lengths()]
    md += "\n### By depth (0 = key at the start, farthest from the query)\n\n" + markdown_table(depth_headers,
                                                                                                 depth_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_plot:
        png = out_dir / f"{name}.png"
        plot(results, cfg, png)
        md += f"\n![passkey heat maps]({png.name})\n"
    path = out_dir / f"{name}.md"
    path.write_text(md)
    write_csv(out_dir / f"{name}.csv", ["scheme", "length", "depth", "accuracy", "trials"],
              [[r.scheme, n, d, f"{r.accuracy[(n, d)]:.4f}", cfg.trials] for r in results
               for n in cfg.lengths() for d in cfg.depths])
    return md, path
