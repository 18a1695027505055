"""Measurement utilities shared by bench/ and `python -m fused_pos_attn check`.

Providers (each maps q, k, v (B, H, N, D) to out (B, H, N, D) for one position scheme):
  fused:<backend>   `fused_attention(..., backend=<backend>)` for every kernel backend usable on the device.
                    Where none is built this is `fused:reference`, the dense oracle: not a fused kernel.
                    Triton counts on CUDA only (on CPU tensors it would run in the interpreter).
  sdpa_dense_bias   what users do today: build the (1, H, N, N) ALiBi or T5 + causal bias (broadcast over the
                    batch, whose rows share their positions), or rotate q and k with RoPE into new tensors,
                    then call F.scaled_dot_product_attention (RoPE: on the floor's backend).
  sdpa_floor        SDPA with the same causal mask and no position: the cost of attention alone. On CUDA it
                    is pinned to SDPA's flash backend.
  flex_attention    torch.compile'd flex_attention with an ALiBi or relative-bias score_mod and a causal block
                    mask, where it compiles and runs on the device (skipped with the reason otherwise).

Positions: alibi, rope, rope_yarn (RoPE with YaRN(4, original_max_len=1024)), relative (T5 buckets: a
seeded (H, 32) table, max_distance 128) and none.

Timing: median wall time of repeated calls after a warmup call (CUDA events on GPU, perf_counter on CPU;
bench/gpu_bench.py times GPU calls with gpu_median_ms, triton.testing.do_bench where Triton is installed).
Modes: "fwd" (no autograd graph), "bwd" (the backward of a retained forward graph), "fwd+bwd".
Throughput: attention_flops counts the matmuls of 2 * N * N * D FLOPs each per head, two for the forward and
five for the backward (it recomputes QK^T), halved for causal masks; position work is not counted, so every
provider of a case is credited the same FLOPs and TFLOP/s ranks them as time does.
Peak memory is measured, never estimated: the extra bytes the timed calls allocate above what exists
before them (inputs; for "bwd" also the forward graph). CUDA: max_memory_allocated. CPU: each
(provider, position, N) runs in a fresh process whose peak RSS (VmHWM) is reset after the warmup.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import dataclasses
import datetime
import gc
import math
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import fused_attention
from .positions import NONE, ALiBi, PositionScheme, RelativeBias, RoPE, ResolvedPosition
from .rope_scaling import YaRN
from .reference import absolute_positions, apply_rope, position_bias, visibility
from .selfcheck import kernel_backends

POSITIONS = ("alibi", "rope", "rope_yarn", "relative", "none")
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("fused", "sdpa_dense_bias", "sdpa_floor", "flex_attention")
FLOOR = "sdpa_floor"
REFERENCE_PROVIDER = "fused:reference"
REFERENCE_NOTE = ("fused:reference is the dense oracle (reference.py, O(N^2) memory), not a fused kernel; it "
                  "stands in for fused where no kernel backend is built")
MIB = 1024 * 1024
GIB = 1024 * MIB
MATMULS = {"fwd": 2, "bwd": 5, "fwd+bwd": 7}  # N x N x D matmuls per mode (the backward recomputes QK^T)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One attention call: q, k, v of shape (batch, heads, seq_len, head_dim), self-attention (Nq = Nk)."""

    pos: str
    seq_len: int
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Measurement:
    """Median time (ms) and extra peak memory (MiB) of one provider on one case and mode; NaN if skipped."""

    provider: str
    case: Case
    mode: str
    median_ms: float
    peak_mib: float
    skipped: str = ""


def device_name(device: str) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the device part of result file names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def source_revision() -> str:
    """Short git commit of the checkout this package is imported from, '-dirty' when tracked files changed;
    'unknown' outside a git checkout (an installed wheel)."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = ["git", "-C", checkout]
        sha = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def software_versions(device: str) -> dict[str, str]:
    """Device, software versions and the date, for the header of every result file."""
    from . import __version__

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    versions = {"device": device_name(device)}
    if torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        versions["compute capability"] = f"{major}.{minor}"
        versions["CUDA (torch)"] = str(torch.version.cuda)
    versions.update({
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "fused_pos_attn": f"{__version__} ({source_revision()})",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    })
    return versions


# ---------------------------------------------------------------------------------------------- providers

def fused_backends(device: str) -> list[str]:
    """Kernel backends fused_attention can run on `device`, or ["reference"] where none is built.

    Triton on CPU tensors would only run under the interpreter, which is not a speed measurement.
    """
    on_cuda = torch.device(device).type == "cuda"
    return [name for name in kernel_backends(device) if name != "triton" or on_cuda] or ["reference"]


def provider_names(device: str, include_flex: bool = True) -> list[str]:
    """The providers to run on `device`, "fused" expanded to one "fused:<backend>" per usable backend."""
    names = [f"fused:{b}" for b in fused_backends(device)] + ["sdpa_dense_bias", FLOOR]
    return names + ["flex_attention"] if include_flex else names


def position_scheme(pos: str, heads: int) -> PositionScheme | str:
    """The scheme benchmarked under the name pos (see POSITIONS) for `heads` query heads."""
    if pos == "rope_yarn":
        return RoPE(scaling=YaRN(4.0, original_max_len=1024))
    if pos == "relative":
        return RelativeBias(torch.randn(heads, 32, generator=torch.Generator().manual_seed(0)), max_distance=128)
    return pos


def _positions(case: Case) -> tuple[ResolvedPosition, torch.Tensor]:
    """The resolved scheme of case.pos and the (B, N) absolute positions 0..N-1 of every row."""
    scheme = {"alibi": ALiBi(), "rope": RoPE()}.get(case.pos, position_scheme(case.pos, case.heads))
    position = (scheme.resolve(case.batch, case.heads, case.head_dim, case.seq_len, torch.device(case.device),
                               causal=case.causal)
                if isinstance(scheme, PositionScheme) else ResolvedPosition(NONE))
    offsets = torch.zeros(case.batch, dtype=torch.int64, device=case.device)
    return position, absolute_positions(offsets, case.seq_len)


def _fused(backend: str, case: Case) -> AttentionFn:
    pos = position_scheme(case.pos, case.heads)
    return lambda q, k, v: fused_attention(q, k, v, pos=pos, causal=case.causal, backend=backend)


def _floor_backend(device: str) -> contextlib.AbstractContextManager:
    """SDPA pinned to its flash backend on CUDA (the floor every GPU table compares with); on CPU the
    dispatcher's own choice, which is its flash kernel for unmasked calls."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _sdpa_causal(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with _floor_backend(case.device):
        return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)


def _sdpa_floor(case: Case) -> AttentionFn:
    return lambda q, k, v: _sdpa_causal(case, q, k, v)


def dense_bias_bytes(case: Case) -> int:
    """Bytes of the largest (1, H, N, N) tensor sdpa_dense_bias builds for an ALiBi / relative bias: its
    fp32 values before the cast (position math runs in fp32 for half-precision inputs, as in transformers)."""
    return case.heads * case.seq_len ** 2 * 4


def _sdpa_dense_bias(case: Case) -> AttentionFn:
    """ALiBi / relative: a (1, H, N, N) float bias with the causal mask merged in, built on every call as
    models do and broadcast over the batch (every row has positions 0..N-1). RoPE: q and k rotated into new
    tensors, then causal SDPA on the floor's backend. "none": the floor itself.
    """
    position, pos_ids = _positions(dataclasses.replace(case, batch=1))
    if case.pos in ("alibi", "relative"):
        def biased(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            bias = position_bias(pos_ids, pos_ids, position, q.dtype)
            if case.causal:
                bias = bias.masked_fill(~visibility(pos_ids, pos_ids, True, None), float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return biased
    if case.pos.startswith("rope"):
        return lambda q, k, v: _sdpa_causal(case, apply_rope(q, pos_ids, position), apply_rope(k, pos_ids, position),
                                            v)
    return _sdpa_floor(case)


def _alibi_score_mod(slopes: torch.Tensor) -> Callable:
    """flex_attention score_mod adding -slopes[b, h] * |i - j| (slopes (B, H) fp32) to the scaled score."""
    def score_mod(score, b, h, i, j):
        return score - slopes[b, h] * (i - j).abs()
    return score_mod


def _relative_score_mod(rel_bias: torch.Tensor, max_distance: int) -> Callable:
    """flex_attention score_mod adding the relative bias rel_bias[h, side, min(|i - j|, max_distance)]
    (rel_bias (H, 2, max_distance + 1), side 1 for keys after the query), as the fused kernels index it."""
    flat = rel_bias.reshape(rel_bias.shape[0], -1)

    def score_mod(score, b, h, i, j):
        rel = i - j
        return score + flat[h, torch.where(rel < 0, max_distance + 1, 0) + rel.abs().clamp(max=max_distance)]
    return score_mod


def _flex_attention(case: Case) -> AttentionFn:
    """Compiled flex_attention: ALiBi as score - slope_h * |i - j|, the relative bias as a table lookup, the
    causal mask as a block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if case.pos.startswith("rope"):
        raise NotImplementedError("a score_mod cannot rotate q and k (RoPE)")
    position, _ = _positions(case)
    block_mask = None
    if case.causal:
        block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, case.seq_len, case.seq_len,
                                       device=case.device)
    score_mod = None
    if case.pos == "alibi":
        score_mod = _alibi_score_mod(position.slopes.contiguous())
    elif case.pos == "relative":
        score_mod = _relative_score_mod(position.rel_bias.detach(), position.max_distance)
    _allow_recompiles_per_shape()
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _allow_recompiles_per_shape(limit: int = 64) -> None:
    """A plan compiles flex_attention once per shape and mode; past dynamo's recompile limit (8 by default)
    it would silently fall back to eager flex_attention, a dense and much slower path, and time that."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def build_provider(name: str, case: Case) -> AttentionFn:
    """The attention callable of provider `name` ("fused:<backend>" or one of PROVIDERS[1:]) for `case`."""
    if name.startswith("fused:"):
        return _fused(name.split(":", 1)[1], case)
    builders = {"sdpa_dense_bias": _sdpa_dense_bias, FLOOR: _sdpa_floor, "flex_attention": _flex_attention}
    if name not in builders:
        raise ValueError(f"unknown provider {name!r}; expected fused:<backend> or one of {PROVIDERS[1:]}")
    return builders[name](case)


def is_optional(name: str) -> bool:
    """Optional providers are skipped with their error as the reason; the others must run."""
    return name == "flex_attention"


# ---------------------------------------------------------------------------------------- timing, memory

def make_inputs(case: Case, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, N, D) and, when requires_grad, grad_out (B, H, N, D); standard normal, seeded."""
    gen = torch.Generator(device=case.device).manual_seed(0)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    tensors = [torch.randn(shape, generator=gen, device=case.device, dtype=case.torch_dtype) for _ in range(3)]
    for t in tensors:
        t.requires_grad_(requires_grad)
    if requires_grad:
        tensors.append(torch.randn(shape, generator=gen, device=case.device, dtype=case.torch_dtype))
    return tuple(tensors)


def make_step(fn: AttentionFn, mode: str, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    """The callable timed for `mode`. "bwd" runs one forward now and differentiates its retained graph."""
    q, k, v = inputs[:3]
    if mode == "fwd":
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(q, k, v)
        return forward
    grad_out = inputs[3]
    if mode == "bwd":
        out = fn(q, k, v)
        return lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _elapsed_ms(step: Callable[[], object], device: str) -> float:
    """Wall time of one call of step, in ms (CUDA events on GPU)."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    step()
    return (time.perf_counter() - begin) * 1e3


def gpu_median_ms(step: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median GPU time (ms) of step, warmup excluded: triton.testing.do_bench (CUDA events around each call,
    queued back to back, the L2 cache flushed before each) where Triton is installed, else time_step's
    CUDA events over about rep_ms of calls."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return time_step(step, "cuda", min_time_s=rep_ms / 1e3)[0]
    return float(do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def attention_flops(case: Case, mode: str) -> float:
    """FLOPs credited to one call of `mode` on `case`: MATMULS[mode] matmuls of 2 * N * N * D per (batch, head),
    halved under a causal mask (the FlashAttention convention; position work is not counted)."""
    if mode not in MATMULS:
        raise ValueError(f"mode must be one of {tuple(MATMULS)}, got {mode!r}")
    flops = MATMULS[mode] * 2.0 * case.batch * case.heads * case.seq_len ** 2 * case.head_dim
    return flops / 2 if case.causal else flops


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def fix_malloc_thresholds() -> None:
    """Make glibc mmap every block >= 128 KiB and unmap it on free.

    glibc otherwise raises its mmap threshold after large frees and keeps later blocks on the heap, where a
    repeated call reuses them without raising RSS: peaks measured after a warmup would then read too low.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "mallopt"):
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)


def start_peak_memory(device: str) -> Optional[int]:
    """Reset the device's peak memory counter; returns the bytes live now (None where it cannot be reset).

    CUDA: allocated bytes. CPU: resident set size, the peak (VmHWM) reset to it.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if not reset_peak_rss():
        return None
    return proc_status_kib("VmRSS") * 1024


def peak_memory_since(device: str, base: Optional[int]) -> float:
    """Peak bytes above `base` (from start_peak_memory) reached since that call; NaN without a base."""
    if base is None:
        return math.nan
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    return float(proc_status_kib("VmHWM") * 1024 - base)


def time_step(step: Callable[[], object], device: str, min_time_s: float = 0.5, max_time_s: float = 10.0,
              min_repeats: int = 3, max_repeats: int = 50) -> tuple[float, float]:
    """(median ms, extra peak bytes) of step: one warmup call (compilation, autotuning, caches), then
    repeated calls until min_repeats calls and min_time_s of measured time are done, or max_repeats calls
    or max_time_s (at least one call).

    Each call's result is dropped before the next starts, so the peak over the timed calls above what was
    live before them is the peak of one call; warmup and compile work are not counted.
    """
    _elapsed_ms(step, device)
    base = start_peak_memory(device)
    times: list[float] = []
    while not times or (len(times) < max_repeats and sum(times) < max_time_s * 1e3
                        and (len(times) < min_repeats or sum(times) < min_time_s * 1e3)):
        times.append(_elapsed_ms(step, device))
    return statistics.median(times), peak_memory_since(device, base)


def time_interleaved(steps: dict[str, Callable[[], object]], device: str, rounds: int,
                     min_time_s: float) -> dict[str, float]:
    """name -> ms: the minimum over `rounds` rounds of each step's time_step median, the steps run round robin
    within each round so that every provider sees the same machine load."""
    times = {name: math.inf for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name] = min(times[name], time_step(step, device, min_time_s=min_time_s)[0])
    return times


def measure_case(provider: str, case: Case, modes: Sequence[str], min_time_s: float = 0.5) -> list[Measurement]:
    """Time and peak memory of `provider` on `case` for each mode, in this process.

    An optional provider that fails (not importable, not compilable, mode unsupported on the device) gives
    skipped Measurements carrying the error; the other providers raise.
    """
    results = []
    fn: Optional[AttentionFn] = None
    for mode in modes:
        try:
            fn = fn or build_provider(provider, case)
            ms, peak = _measure_mode(fn, case, mode, min_time_s)
            results.append(Measurement(provider, case, mode, ms, peak / MIB))
        except Exception as err:  # noqa: BLE001  optional providers report any failure as the skip reason
            if not is_optional(provider):
                raise
            first_line = (str(err).strip().splitlines() or [""])[0]
            results.append(Measurement(provider, case, mode, math.nan, math.nan,
                                       skipped=f"{type(err).__name__}: {first_line}"[:200]))
    return results


def _measure_mode(fn: AttentionFn, case: Case, mode: str, min_time_s: float) -> tuple[float, float]:
    """(median ms, extra peak bytes) of fn in `mode`; its inputs and graph are freed on return."""
    return time_step(make_step(fn, mode, make_inputs(case, requires_grad=mode != "fwd")), case.device, min_time_s)


def _fresh_child(conn: Connection, fn: Callable[..., object], args: tuple) -> None:
    """Entry point of a fresh process: run fn(*args), send ("ok", result) or ("error", text) back."""
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as err:  # noqa: BLE001  the parent re-raises it with the child's message
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def _process_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """forkserver (the preload modules imported once in the server, each run forked fresh from it) or spawn
    elsewhere. The first call starts the server, so its preload list is the one that counts."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, *preload])
        return ctx
    return multiprocessing.get_context("spawn")


def run_in_fresh_process(fn: Callable[..., object], *args: object, preload: Sequence[str] = ()) -> object:
    """fn(*args) in a fresh process, so that its peak RSS is its own; fn and args must be picklable.

    Raises RuntimeError with the child's error (or its exit code when it died without one).
    """
    ctx = _process_context(preload)
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_fresh_child, args=(child, fn, args))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", "no result (the process died)"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}{args} failed in its subprocess (exit code "
                           f"{proc.exitcode}): {payload}")
    return payload


def _measure_case_fixed_malloc(provider: str, case: Case, modes: Sequence[str], min_time_s: float) -> list:
    """measure_case with glibc's mmap thresholds fixed first (see fix_malloc_thresholds)."""
    fix_malloc_thresholds()
    return measure_case(provider, case, modes, min_time_s)


def measure_case_subprocess(provider: str, case: Case, modes: Sequence[str],
                            min_time_s: float = 0.5) -> list[Measurement]:
    """measure_case in a fresh process, so that its peak RSS belongs to this provider and case alone."""
    return run_in_fresh_process(_measure_case_fixed_malloc, provider, case, tuple(modes), min_time_s)


# -------------------------------------------------------------------------------------------- the matrix

def plan(providers: Sequence[str], positions: Sequence[str], seq_lens: Sequence[int], modes: Sequence[str],
         max_train_seq_len: Optional[int], **case_fields) -> list[tuple[str, Case, tuple[str, ...]]]:
    """(provider, case, modes) to run, N-major so that the providers compared in one table row are measured
    close together in time. sdpa_floor ignores the position, so it runs once per N (as pos "none"), and
    sdpa_dense_bias with pos "none" would be the floor again. Backward modes stop at max_train_seq_len.
    """
    jobs = []
    for n in seq_lens:
        run_modes = tuple(m for m in modes if m == "fwd" or max_train_seq_len is None or n <= max_train_seq_len)
        for pos in positions:
            for provider in providers:
                if (provider == FLOOR and pos != positions[0]) or (provider == "sdpa_dense_bias" and pos == "none"):
                    continue
                case = Case(pos="none" if provider == FLOOR else pos, seq_len=n, **case_fields)
                if run_modes:
                    jobs.append((provider, case, run_modes))
    return jobs


def run_benchmarks(providers: Sequence[str], positions: Sequence[str], seq_lens: Sequence[int],
                   modes: Sequence[str], max_train_seq_len: Optional[int] = None, min_time_s: float = 0.5,
                   log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
                   repeats: int = 1, **case_fields) -> list[Measurement]:
    """Measure every planned job: in-process on CUDA, each job in a fresh process on CPU.

    repeats > 1 runs the whole plan that many times and reports, per (provider, case, mode), the median of
    the runs' median times and peaks: the compared providers are then measured at several moments, so a
    slow spell of a shared machine hits all of them instead of one cell.
    """
    runs: dict[tuple, list[Measurement]] = {}
    jobs = plan(providers, positions, seq_lens, modes, max_train_seq_len, **case_fields)
    for repeat in range(repeats):
        for provider, case, run_modes in jobs:
            on_cuda = torch.device(case.device).type == "cuda"
            measure = measure_case if on_cuda else measure_case_subprocess
            for m in measure(provider, case, run_modes, min_time_s):
                state = f"skipped ({m.skipped})" if m.skipped else f"{m.median_ms:.3f} ms, {m.peak_mib:.1f} MiB"
                log(f"[{repeat + 1}/{repeats}] {provider:>16} {case.pos:>9} {m.mode:>7} N={case.seq_len:<6} {state}")
                runs.setdefault((provider, case, m.mode), []).append(m)
    return [_median_measurement(ms) for ms in runs.values()]


def _median_measurement(runs: Sequence[Measurement]) -> Measurement:
    """One Measurement from repeated runs of the same job: median time and peak, skipped if any run was."""
    skipped = next((m.skipped for m in runs if m.skipped), "")
    if skipped:
        return Measurement(runs[0].provider, runs[0].case, runs[0].mode, math.nan, math.nan, skipped)
    return Measurement(runs[0].provider, runs[0].case, runs[0].mode, statistics.median(m.median_ms for m in runs),
                       statistics.median(m.peak_mib for m in runs))


def floor_ms(results: Sequence[Measurement], mode: str, seq_len: int) -> float:
    """Median ms of sdpa_floor for (mode, N), NaN if it was not measured."""
    for m in results:
        if m.provider == FLOOR and m.mode == mode and m.case.seq_len == seq_len:
            return m.median_ms
    return math.nan


def _cell(m: Optional[Measurement], floor: float) -> str:
    if m is None:
        return "—"
    if m.skipped:
        return "skipped"
    return f"{m.median_ms:.2f} ms · {m.median_ms / floor:.2f}x · {m.peak_mib:.1f} MiB"


def markdown_table(results: Sequence[Measurement]) -> str:
    """One row per (pos, mode, N), one column per provider: median ms · ratio to sdpa_floor · peak MiB.

    The sdpa_floor column repeats the position-free floor in every position's rows. Skip reasons and the
    fused:reference caveat follow the table.
    """
    providers = list(dict.fromkeys(m.provider for m in results))
    index = {(m.provider, m.case.pos, m.mode, m.case.seq_len): m for m in results}
    positions = [p for p in POSITIONS if any(m.case.pos == p for m in results if m.provider != FLOOR)]
    modes = [md for md in MODES if any(m.mode == md for m in results)]
    lines = ["| pos | mode | N | " + " | ".join(providers) + " |",
             "|---|---|---:|" + "---:|" * len(providers)]
    for pos in positions:
        for mode in modes:
            for n in sorted({m.case.seq_len for m in results if m.mode == mode}):
                row = [index.get((p, "none" if p == FLOOR else pos, mode, n)) for p in providers]
                if not any(r is not None and r.provider != FLOOR for r in row):
                    continue
                cells = [_cell(r, floor_ms(results, mode, n)) for r in row]
                lines.append(f"| {pos} | {mode} | {n} | " + " | ".join(cells) + " |")
    notes = ["", "Cells: median time · ratio to sdpa_floor (same mode and N) · extra peak memory of the call "
             "(for bwd: above the retained forward graph)."]
    if REFERENCE_PROVIDER in providers:
        notes.append(f"Note: {REFERENCE_NOTE}.")
    if "none" in positions and "sdpa_dense_bias" in providers:
        notes.append("sdpa_dense_bias with pos=none would be sdpa_floor itself (—).")
    skipped: dict[tuple[str, str], list[str]] = {}
    for m in results:
        if m.skipped:
            where = skipped.setdefault((m.provider, m.skipped), [])
            if f"{m.case.pos} {m.mode}" not in where:
                where.append(f"{m.case.pos} {m.mode}")
    notes += [f"Skipped {provider} ({', '.join(where)}): {reason}"
              for (provider, reason), where in skipped.items()]
    return "\n".join(lines + notes) + "\n"


def quick_table(device: str) -> str:
    """A small table for `python -m fused_pos_attn check`: forward, B=1, H=8, D=64, causal, N in {256, 1024},
    ALiBi and RoPE, fp32 on CPU / fp16 on CUDA. flex_attention is left out: its compile time per shape would
    dominate a quick check. Takes a few seconds per provider and N.
    """
    dtype = "float16" if torch.device(device).type == "cuda" else "float32"
    results = run_benchmarks(provider_names(device, include_flex=False), ("alibi", "rope"), (256, 1024),
                             ("fwd",), min_time_s=0.2, log=lambda msg: None, device=device, dtype=dtype)
    return markdown_table(results)


def results_stem(script: str, out_dir: str, device: str, device_label: str,
                 argv: Optional[Sequence[str]]) -> tuple[str, str]:
    """(out_dir/<script's name>_<device type>_<slug of device_label>, the command line that ran the script): where
    a benchmark script writes its result files and how it was called (argv None: sys.argv). Creates out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(script))[0]
    command = f"python bench/{name}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return os.path.join(out_dir, f"{name}_{torch.device(device).type}_{slug(device_label)}"), command


def write_results(stem: str, title: str, env: dict, command: str, table: str, fields: Sequence[str],
                  rows: Sequence[Sequence[object]]) -> None:
    """stem.md (title, the environment as a list, the command, the markdown table) and stem.csv (the environment
    as # comment lines, then fields and rows): the result files of a benchmark script."""
    with open(stem + ".md", "w") as f:
        f.write(f"# {title}\n\n")
        f.writelines(f"- {key}: {value}\n" for key, value in env.items())
        f.write(f"- command: `{command.strip()}`\n\n{table}")
    with open(stem + ".csv", "w", newline="") as f:
        f.writelines(f"# {key}: {value}\n" for key, value in env.items())
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows(rows)
