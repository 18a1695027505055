"""Byte-level corpus for the length-generalization experiments: no downloads, deterministic everywhere.

Default corpus: the running interpreter's standard-library .py files (`sysconfig.get_paths()["stdlib"]`,
site-packages and dist-packages left out), ~30 MB on CPython 3.11. Any text file or folder can be passed
instead. Tokens are bytes (vocabulary 256).

Split: by file. A file is validation when the first 8 hex digits of sha1(relative path) mod 1000 fall below
valid_fraction * 1000, so the split depends only on the paths (not on the order of a directory listing or
on the machine). A single file is split by position instead: its last valid_fraction of bytes.
Files are concatenated in sorted relative-path order, each followed by a newline.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

VOCAB_SIZE = 256
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class ByteCorpus:
    """train, valid: 1-D uint8 token streams. files: (train files, validation files); source: where from."""

    train: torch.Tensor
    valid: torch.Tensor
    files: tuple[int, int]
    source: str

    def describe(self) -> str:
        return (f"{self.source}: {self.files[0]} train files ({self.train.numel() / 1e6:.1f} MB), "
                f"{self.files[1]} validation files ({self.valid.numel() / 1e6:.2f} MB), byte tokens")


def stdlib_root() -> Path:
    """The interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative_path: str, valid_fraction: float) -> bool:
    """Whether a file belongs to the validation split: a hash of its relative path (POSIX form)."""
    digest = hashlib.sha1(relative_path.replace(os.sep, "/").encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 1000 < round(valid_fraction * 1000)


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as handle:
        return b"\0" not in handle.read(8192)


def corpus_files(root: Path, suffix: Optional[str]) -> list[Path]:
    """Files under root (sorted by relative path), skipping site-/dist-packages and caches; only names ending
    in suffix when given, else every file without a NUL byte in its first 8 KiB."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if (name.endswith(suffix) if suffix else _looks_like_text(path)) and path.is_file():
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(path: Optional[str | Path] = None, valid_fraction: float = 0.05,
                max_bytes: Optional[int] = None) -> ByteCorpus:
    """Load and split a byte corpus.

    path: None for the standard library's .py files, a folder (every text file under it), or one file.
    valid_fraction: share of files (or of a single file's bytes) held out, in (0, 1).
    max_bytes: optional cap on each split's size (the first max_bytes of each), for quick runs.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
    root = stdlib_root() if path is None else Path(path)
    if not root.exists():
        raise FileNotFoundError(f"corpus path {root} does not exist")
    if root.is_file():
        data = root.read_bytes()
        cut = int(len(data) * (1 - valid_fraction))
        train, valid, files, source = data[:cut], data[cut:], (1, 1), f"file {root}"
    else:
        parts: dict[bool, list[bytes]] = {False: [], True: []}
        for file in corpus_files(root, ".py" if path is None else None):
            parts[is_validation(file.relative_to(root).as_posix(), valid_fraction)].append(file.read_bytes() + b"\n")
        train, valid = b"".join(parts[False]), b"".join(parts[True])
        files = (len(parts[False]), len(parts[True]))
        source = f"standard library {root}" if path is None else f"folder {root}"
    if max_bytes is not None:
        train, valid = train[:max_bytes], valid[:max_bytes]
    if len(train) < 2 or len(valid) < 2:
        raise ValueError(f"corpus {root} is too small to split: {len(train)} train / {len(valid)} validation bytes")
    as_tensor = lambda raw: torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # noqa: E731
    return ByteCorpus(as_tensor(train), as_tensor(valid), files, source)


class BatchSampler:
    """Deterministic random training windows: batch(step) depends only on (seed, step).

    Returns inputs and targets (B, N) int64, targets shifted by one token.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"token stream of {tokens.numel()} is shorter than seq_len + 2 = {seq_len + 2}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,), generator=gen)
        windows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, seq_len: int, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows over the first total_tokens predictions of a stream: (W, seq_len) inputs and
    targets, W = total_tokens // seq_len. Every length scores the same tokens when total_tokens is a multiple
    of all lengths (each window starts with no context, as in the ALiBi paper's non-overlapping evaluation)."""
    count = total_tokens // seq_len
    if count < 1 or count * seq_len + 1 > tokens.numel():
        raise ValueError(f"need {count * seq_len + 1} >= {seq_len + 1} tokens for {count} windows of {seq_len}; "
                         f"the stream has {tokens.numel()}")
    stream = tokens[: count * seq_len + 1].long()
    return stream[:-1].view(count, seq_len), stream[1:].view(count, seq_len)


def sliding_windows(tokens: torch.Tensor, seq_len: int, total_tokens: int,
                    stride: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Sliding-window evaluation: windows of up to seq_len tokens ending every `stride` tokens; each scores
    only its last `stride` predictions, which therefore see at least seq_len - stride tokens of context
    (fewer only at the stream's start). Returns (inputs (n,), targets (n,), scored) per window; together they
    score the first total_tokens // stride * stride predictions once each."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    total = total_tokens // stride * stride
    if total + 1 > tokens.numel() or total == 0:
        raise ValueError(f"need {total + 1} tokens for sliding evaluation, the stream has {tokens.numel()}")
    stream = tokens[: total + 1].long()
    windows = []
    for end in range(stride, total + 1, stride):
        start = max(0, end - seq_len)
        windows.append((stream[start:end], stream[start + 1:end + 1], stride))
    return windows
