"""Shared pieces of the experiments: training loop, perplexity, fresh-process runs, result files.

Peak memory is measured, never estimated (as in benchmarking.py): on CPU a run happens in a fresh process
whose peak RSS (VmHWM) is read; on CUDA torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import benchmarking
from ..benchmarking import device_name
from ..models import TransformerLM, eval_windows, sliding_windows

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a convenience; `make install` installs tqdm
    def tqdm(iterable=None, **_kwargs):  # type: ignore[no-redef]
        return _NoBar(iterable)


class _NoBar:
    """Stand-in for tqdm when it is not installed: iterates, ignores the bar calls."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix_str(self, *_args, **_kwargs):
        pass

    def update(self, *_args):
        pass

    def close(self):
        pass


# Relative on purpose: resolved against the current directory when results are written (a checkout's root gives
# its bench/results), never a path inside the package, which may be an installed, read-only site-packages.
RESULTS_DIR = Path("bench") / "results"
Batch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # inputs (B, N), targets (B, N), loss mask


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def with_overrides(config, overrides: dict):
    """config (a dataclass) with the overrides that are not None applied: command-line options left unset
    keep the device defaults."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def results_header(title: str, device: str, command: str, extra: Sequence[str] = ()) -> str:
    """Markdown header of a result file: device, torch, threads, date, the exact command, then extra lines."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {title}", "", f"- device: {device_name(device)} ({device}, {torch.get_num_threads()} threads)",
             f"- torch: {torch.__version__}, python {platform.python_version()}", f"- date: {when}"]
    if hasattr(os, "getloadavg"):
        lines.append(f"- load average at start (1 min): {os.getloadavg()[0]:.2f}")
    lines.append(f"- command: `{command}`")
    return "\n".join(lines + [f"- {line}" for line in extra]) + "\n"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows of cells (str or numbers, formatted as given) as a markdown table; numbers right-aligned."""
    def align(i: int) -> str:
        return "---:" if rows and isinstance(rows[0][i], (int, float)) else "---"
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align(i) for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}"
    return str(value)


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)


def suffix(device: str) -> str:
    """File-name suffix of the device type: 'cpu' or 'cuda'."""
    return torch.device(device).type


# ------------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainSettings:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr; gradient clipping."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float = 2e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainLog:
    """Per-step losses and wall times (s, the step alone: no batch preparation), tokens per step."""

    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    tokens_per_step: int = 0

    @property
    def wall_s(self) -> float:
        return sum(self.step_s)

    @property
    def tokens(self) -> int:
        return self.tokens_per_step * len(self.step_s)

    def tokens_per_s(self, skip: int = 0) -> float:
        """Training throughput over the steps after the first `skip` (warmup: allocator, lazy init)."""
        timed = self.step_s[skip:] if len(self.step_s) > skip else self.step_s
        return self.tokens_per_step * len(timed) / sum(timed) if timed and sum(timed) > 0 else math.nan

    def final_loss(self, last: int = 20) -> float:
        tail = self.losses[-last:]
        return sum(tail) / len(tail) if tail else math.nan


def lm_loss(model: TransformerLM, inputs: torch.Tensor, targets: torch.Tensor,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross entropy (nats) over all targets, or over those where mask (B, N) is True."""
    logits = model(inputs)
    if mask is None:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return F.cross_entropy(logits[mask], targets[mask])


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train(model: TransformerLM, next_batch: Callable[[int], Batch], settings: TrainSettings, device: str,
          desc: str = "train", on_step: Optional[Callable[[int], None]] = None) -> TrainLog:
    """Train in place for settings.steps steps; batches come from next_batch(step) (moved to device).

    on_step(step) runs after each step (the claims experiment starts its memory measurement there).
    Raises FloatingPointError on a non-finite loss.
    """
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "table" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "table" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    model.train()
    log = TrainLog()
    bar = tqdm(range(settings.steps), desc=desc, leave=False, mininterval=1.0, file=sys.stderr)
    for step in bar:
        inputs, targets, mask = (t.to(device) if t is not None else None for t in next_batch(step))
        synchronize(device)
        begin = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        loss = lm_loss(model, inputs, targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        value = loss.item()  # also synchronizes CUDA
        log.step_s.append(time.perf_counter() - begin)
        log.tokens_per_step = inputs.numel()
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}")
        log.losses.append(value)
        if step % 10 == 0:
            bar.set_postfix_str(f"loss {value:.3f}")
        if on_step is not None:
            on_step(step)
    model.eval()
    return log


@torch.no_grad()
def evaluate_perplexity(model: TransformerLM, tokens: torch.Tensor, seq_len: int, total_tokens: int, device: str,
                        batch_tokens: int = 16384, sliding_stride: Optional[int] = None,
                        desc: str = "eval") -> float:
    """Validation perplexity at input length seq_len over the first total_tokens predictions of tokens.

    Non-overlapping windows by default (each window starts without context); with sliding_stride, windows of
    seq_len tokens advance by that stride and score only their last stride predictions.
    """
    model.eval()
    nll, count = 0.0, 0
    if sliding_stride is None:
        inputs, targets = eval_windows(tokens, seq_len, total_tokens)
        per_batch = max(1, batch_tokens // seq_len)
        for start in tqdm(range(0, inputs.shape[0], per_batch), desc=desc, leave=False, file=sys.stderr):
            x, y = inputs[start:start + per_batch].to(device), targets[start:start + per_batch].to(device)
            logits = model(x)
            nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    else:
        windows = sliding_windows(tokens, seq_len, total_tokens, sliding_stride)
        groups: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        for window in windows:  # batch windows of equal length (all but the first few)
            groups.setdefault(window[0].numel(), []).append(window)
        per_batch = max(1, batch_tokens // seq_len)
        jobs = [(length, group[i:i + per_batch]) for length, group in groups.items()
                for i in range(0, len(group), per_batch)]
        for _, chunk in tqdm(jobs, desc=desc, leave=False, file=sys.stderr):
            x = torch.stack([w[0] for w in chunk]).to(device)
            y = torch.stack([w[1] for w in chunk]).to(device)
            scored = chunk[0][2]
            logits = model(x)[:, -scored:]
            nll += F.cross_entropy(logits.flatten(0, 1).float(), y[:, -scored:].flatten(), reduction="sum").item()
            count += y[:, -scored:].numel()
    return math.exp(nll / count)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------- fresh-process runs

# torch._dynamo: the optimizers' first step imports it (with sympy), ~1.5 s per fresh process otherwise.
FRESH_PROCESS_PRELOAD = ("torch", "torch._dynamo", "fused_pos_attn.backends.cpu_backend", __name__)


def run_in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh process (so its peak RSS is its own), forked from a server that has the training
    stack imported; fn and args must be picklable."""
    return benchmarking.run_in_fresh_process(fn, *args, preload=FRESH_PROCESS_PRELOAD)


def trim_heap() -> None:
    """Return the allocator's free memory to the OS (glibc malloc_trim), so that RSS is what is in use.

    Called right before a peak-RSS baseline is taken. Unlike benchmarking.fix_malloc_thresholds (every large
    block mmapped and unmapped on free), it leaves the allocator's normal behaviour, and speed, alone:
    training steps ran ~35% slower under those thresholds here.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is not None and hasattr(ctypes.CDLL(name), "malloc_trim"):
        ctypes.CDLL(name).malloc_trim(0)


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB; NaN where /proc is absent."""
    try:
        return benchmarking.proc_status_kib("VmHWM") / 1024
    except (OSError, RuntimeError):
        return math.nan