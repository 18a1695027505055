"""Static GPU check (`make static-check`): every shipped autotune config compiles for sm_80 and sm_90
without a GPU, with no register spills and shared memory within the architecture's per-block limit.

How: each (kernel, config, head dim, variant, arch) is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options={num_warps, num_stages})`,
with the argument types and specialisations a real launch on contiguous tensors gets from Triton's JIT:
pointers 16-byte aligned, head-dim strides (and the slopes' head stride) equal to 1, hence constexpr, the
other row / head / batch strides divisible by 16, integer sizes plain i32. Every kernel parameter must be
listed in POINTER_TYPES, SCALAR_TYPES, STRIDE_KINDS or the constexpr values (_constexpr_values): a new
parameter fails the check with its name instead of being guessed at.

What is measured, and from where:
- registers per thread: the REG field of `cuobjdump --dump-resource-usage` on the cubin Triton produced
  (the artifact that would be loaded; cuobjdump ships in Triton's wheel).
- spill bytes: "N bytes spill stores, M bytes spill loads" from the `ptxas -v` log of Triton's own ptxas
  run (TRITON_DUMP_PTXAS_LOG=1; TRITON_ALWAYS_COMPILE=1 so a cache hit never hides the log). This is the
  ptxas that builds the cubin, with Triton's flags (Triton 3.9: ptxas-blackwell for sm_90, 3.6: the same
  ptxas for both archs), so it reports exactly what ships; a second ptxas run with our own flags could
  differ. The cubin's STACK is listed for information only and is not a spill measure: RoPE kernels carry
  a 32 B stack frame with no spill at all (the local array of libdevice sinf/cosf's large-argument
  reduction).
- shared memory: `metadata.shared`, the dynamic shared memory Triton requests at launch, against the
  opt-in per-block maximum (sm_80 166912 B = 163 KiB, sm_90 232448 B = 227 KiB), the same comparison
  Triton's launcher makes before raising OutOfResources.
A spill is any nonzero spill store or load; the register ceiling is 255 per thread (and the block's
registers must fit the 64K register file).

Coverage. A variant is a scheme with its register-relevant switches: dtype, causal, sliding window, RoPE
rotary fraction and pair layout, relative-table gradient, packed (varlen) layout. Variant fields a kernel has
no constexpr for collapse (the preprocess kernel only sees dtype and head dim), so no compile is repeated. One cold compile
takes 1-6 s on the 2-core dev machine (RoPE the slowest; a config that spills can take minutes in ptxas).
- default (`make static-check`): every config of every kernel x HEAD_DIM = BLOCK_D in 64/128/256 x both
  archs, for
  * BASE_VARIANTS: fp16, causal, no window: none / alibi / rope (full rotary) / rope (rotary D/2: the
    pass-through tile and its second dot) / relative (with the table gradient);
  * DEFAULT_EXTRA_VARIANTS, bf16, each turning on what the base leaves off: relative non-causal (a T5
    encoder: bucket gather over both sides), and rope with rotary D/4 interleaved under a sliding window
    (GPT-J / NeoX-style partial rotary: the pass tile is padded from 3D/4 up to D, the widest q/k tiles
    any scheme has; contiguous pair loads; the window's masks and loop bounds); then, fp16 causal, the packed
    (varlen) layout of rope with rotary D/2 and of relative with the table gradient and dLSE: per-sequence
    starts and lengths read from cu_seqlens, clamped, and an early exit, in every kernel.
  Non-causal / window / bf16 / varlen only add masks, bounds, conversions and addressing, so they are crossed
  with the schemes whose tiles are largest rather than with all five.
- STATIC_CHECK_FULL=1 (`make static-check-full`): HEAD_DIM 32/64/80/128/256 (80 is padded to BLOCK_D
  128) x the base schemes plus rope D/4, each in FULL_PROFILES: fp16 causal (rotate-half), bf16
  non-causal (interleaved, relative without the table gradient), bf16 causal with a window in the packed
  (varlen) layout (rotate-half). Run it after changing a kernel or a config list: HEAD_DIM 80 with full rotary once spilled in a
  dK/dV config that was clean at 128 (M16 N32 on sm_90), so the default matrix does not stand in for it.
Compile counts and wall times are in bench/results/static_check*.md.

tests/conftest.py sets TRITON_INTERPRET=1 without CUDA, under which @triton.jit yields interpreter
functions that triton.compile cannot take; the compiles therefore run in spawned worker processes whose
environment has TRITON_INTERPRET removed before the kernels are imported. Workers: STATIC_CHECK_JOBS,
default the CPU count. The table is printed (run pytest with -s); with FUSED_POS_ATTN_WRITE_RESULTS=1
(the make targets set it) it is also written to bench/results/static_check.md (static_check_full.md for
the full matrix), with a `_triton<major.minor>` suffix under any Triton other than the Makefile's
TRITON_PIN (e.g. static_check_triton3.6.md from `make test-compat`'s venv).
"""
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import io
import multiprocessing
import multiprocessing.connection
import os
import re
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from fused_pos_attn.triton_kernels.scheme_codes import SCHEME_CODES

pytestmark = pytest.mark.static

SHARED_LIMIT = {80: 166912, 90: 232448}  # cudaDevAttrMaxSharedMemoryPerBlockOptin: A100, H100
MAX_REGS = 255
REGISTER_FILE = 65536
ARCHS = (80, 90)
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"  # static_check[_full][_triton<version>].md

# Kernel name -> (module, config-list function name or None for the fixed-config preprocess and merge kernels).
KERNELS = {
    "_attn_fwd_kernel": ("forward", "forward_configs"),
    "_attn_bwd_dkdv_kernel": ("backward", "backward_dkdv_configs"),
    "_attn_bwd_dq_kernel": ("backward", "backward_dq_configs"),
    "_attn_bwd_preprocess_kernel": ("backward", None),
    "_attn_split_merge_kernel": ("forward", None),
}

# Every runtime parameter of every kernel, by kind. INPUT: the q / k / v dtype of the variant.
INPUT = "input"
POINTER_TYPES = {
    **{name: INPUT for name in ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")},
    "Lse": "fp32", "Delta": "fp32",      # (B, Hq, Nq)
    "DLse": "fp32",                      # (B, Hq, Nq) gradient of the returned LSE
    "QOffset": "i64", "KOffset": "i64",  # (B,) absolute position of row 0
    "Slopes": "fp32",                    # (B, Hq) ALiBi
    "InvFreq": "fp32",                   # (rotary_dim / 2,) RoPE
    "RelBias": "fp32",                   # (Hq, 2, max_distance + 1) relative bias by distance
    "RelBuckets": "i32",                 # (2, max_distance + 1) T5 bucket of each RelBias entry
    "DRelTable": "fp32",                 # (key blocks, B, Hq, num_buckets) per-program bucket-gradient partials
    "CuSeqlensQ": "i64", "CuSeqlensK": "i64",  # (S + 1,) packed layout's sequence starts (VARLEN)
    "SeqUsedK": "i64",                   # (B,) a KV cache's key count per batch (SEQUSED)
    "BlockTable": "i64",                 # (B, max_pages) a paged cache's page ids (PAGED)
    "OutPartial": "fp32", "LsePartial": "fp32",  # split-KV partial results (SPLIT, the merge kernel)
}
SCALAR_TYPES = {
    **{name: "i32" for name in ("num_heads", "num_kv_groups", "seq_len_q", "seq_len_k", "window", "max_distance",
                                "num_buckets", "len_bucket_q", "len_bucket_k", "max_seqlen_q", "max_seqlen_k",
                                "page_size", "max_pages", "num_splits")},
    "sm_scale": "fp32", "attention_factor": "fp32",
}
# Stride name -> how a launch on contiguous tensors specialises it: "unit" (== 1: constexpr), "aligned"
# (divisible by 16: tt.divisibility), "any" (no specialisation, e.g. Hq or 2 * (max_distance + 1)).
STRIDE_KINDS = {
    **{f"stride_{t}{dim}": "unit" if dim == "d" else "aligned"
       for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv") for dim in "bhnd"},  # (B, H, N, D) tensors
    "stride_sb": "any", "stride_sh": "unit",  # slopes (B, Hq)
    "stride_rh": "any",                       # rel_bias (Hq, 2, max_distance + 1)
    **{f"stride_p{dim}": "unit" if dim == "d" else "aligned" for dim in "bhnd"},  # the merge's OutPartial
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launch flavour. rotary: rotary_dim / HEAD_DIM (rope only); rel_grad: the relative table needs a
    gradient (relative only), compiled for the largest table the launcher takes (launch.MAX_GRAD_BUCKETS
    buckets: the only thing the bucket count changes is the size of that register accumulator); dlse: a
    gradient flows into the returned LSE; varlen: the packed layout (VARLEN: rows found through cu_seqlens);
    paged: a paged KV cache with per-batch key counts (SEQUSED and PAGED; the forward kernel only);
    decode_rows: a split-KV decode forward (launch.decode_plan: GQA groups of 2 heads, keys split) with tiles of
    that many rows (decode_configs), 0 for the ordinary forward.
    Fields that do not apply to the scheme are normalised away by for_scheme."""
    scheme: str
    dtype: str = "fp16"
    causal: bool = True
    window: bool = False
    rotary: float = 1.0
    interleaved: bool = False
    rel_grad: bool = True
    dlse: bool = False
    varlen: bool = False
    paged: bool = False
    decode_rows: int = 0

    def for_scheme(self) -> "Variant":
        rope, relative = self.scheme == "rope", self.scheme == "relative"
        return dataclasses.replace(self, rotary=self.rotary if rope else 1.0, interleaved=self.interleaved and rope,
                                   rel_grad=self.rel_grad and relative)


BASE_VARIANTS = (Variant("none"), Variant("alibi"), Variant("rope"), Variant("rope", rotary=0.5), Variant("relative"))
DEFAULT_EXTRA_VARIANTS = (
    Variant("relative", dtype="bf16", causal=False, dlse=True),
    Variant("rope", dtype="bf16", window=True, rotary=0.25, interleaved=True, dlse=True),
    Variant("rope", rotary=0.5, varlen=True),
    Variant("relative", varlen=True, dlse=True),
    Variant("rope", paged=True),
    Variant("alibi", dtype="bf16", window=True, paged=True),
    *(Variant(scheme, decode_rows=16) for scheme in ("none", "alibi", "rope", "relative")),
    Variant("rope", rotary=0.5, decode_rows=16),
    Variant("rope", dtype="bf16", window=True, rotary=0.5, interleaved=True, paged=True, decode_rows=16),
)
DEFAULT_HEAD_DIMS = (64, 128, 256)
FULL_SCHEMES = BASE_VARIANTS + (Variant("rope", rotary=0.25),)
FULL_PROFILES = (dict(), dict(dtype="bf16", causal=False, interleaved=True, rel_grad=False, dlse=True),
                 dict(dtype="bf16", window=True, varlen=True))
FULL_HEAD_DIMS = (32, 64, 80, 128, 256)


def _tools():
    """(triton module, cuobjdump path) or a skip reason string."""
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"triton with its nvidia backend is not importable: {e}"
    try:
        for arch in ARCHS:
            get_ptxas(arch).path  # Triton 3.9: ptxas-blackwell for sm_90; 3.6: ptxas for both
        cuobjdump = knobs.nvidia.cuobjdump.path
    except (RuntimeError, AttributeError) as e:
        return f"ptxas / cuobjdump not found in Triton's nvidia backend: {e}"
    return triton, cuobjdump


def _kernel(name):
    module, _ = KERNELS[name]
    return getattr(importlib.import_module(f"fused_pos_attn.triton_kernels.{module}"), name)


def _parameters(fn) -> list:
    """(name, is_constexpr) of a @triton.jit kernel's parameters, from its Python function (works on the
    JIT's and the interpreter's wrappers alike)."""
    import triton.language as tl
    return [(p.name, p.annotation is tl.constexpr or p.annotation == "tl.constexpr")
            for p in inspect.signature(fn.fn).parameters.values()]


def _constexpr_values(kernel: str, head_dim: int, variant: Variant) -> dict:
    """The constexprs (but BLOCK_M / BLOCK_N) that launch.kernel_arguments, the one builder of kernel
    arguments, gives kernel for a launch of the variant. Built on meta tensors: only shapes, dtypes and
    which tensors a launch passes matter."""
    import torch
    from fused_pos_attn.triton_kernels.launch import DecodePlan, KernelCall, KernelPosition, kernel_arguments
    batch, heads, kv_heads, seq = 2, 4, 2, 256
    from fused_pos_attn.triton_kernels.launch import MAX_GRAD_BUCKETS
    rotary_dim = int(head_dim * variant.rotary) if variant.scheme == "rope" else 0
    buckets = MAX_GRAD_BUCKETS if variant.scheme == "relative" else 0
    position = KernelPosition(kind=variant.scheme, slopes=None, inv_freq=None, rotary_dim=rotary_dim,
                              interleaved=variant.interleaved, attention_factor=1.0, max_distance=128,
                              num_buckets=buckets)
    offsets = torch.zeros(batch, dtype=torch.int64, device="meta")
    packed = {}
    if variant.varlen:  # the batch's sequences packed along N: (1, H, batch * seq, D) and (batch + 1,) cu_seqlens
        cu_seqlens = torch.empty(batch + 1, dtype=torch.int64, device="meta")
        packed = dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=seq, max_seqlen_k=seq)
    if variant.paged:  # the batch's keys in pages of 16 rows: k / v (1, Hkv, batch * seq, D)
        packed = dict(seqused_k=offsets, block_table=torch.empty(batch, seq // 16, dtype=torch.int64, device="meta"),
                      page_size=16)
    call = KernelCall(q_offset=offsets, k_offset=offsets, position=position, scale=head_dim ** -0.5,
                      causal=variant.causal, window=64 if variant.window else None, **packed)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[variant.dtype]
    layout = (1, batch * seq) if variant.varlen else (batch, seq)  # (tensor batch, N)
    kv_layout = (1, batch * seq) if variant.varlen or variant.paged else layout
    rows = torch.empty(layout[0], heads, layout[1], head_dim, dtype=dtype, device="meta")
    kv_rows = torch.empty(kv_layout[0], kv_heads, kv_layout[1], head_dim, dtype=dtype, device="meta")
    stats = torch.empty(layout[0], heads, layout[1], dtype=torch.float32, device="meta")
    tensors = dict(Q=rows, K=kv_rows, V=kv_rows, Out=rows, DOut=rows, DQ=rows, DK=kv_rows, DV=kv_rows, Lse=stats,
                   Delta=stats)
    if variant.dlse:
        tensors["DLse"] = stats
    if variant.rel_grad:
        tensors["DRelTable"] = torch.empty(seq // 16, batch, heads, buckets, device="meta")
    if kernel == "_attn_split_merge_kernel":  # 4 splits' partials of every head
        tensors.update(OutPartial=torch.empty(layout[0], 4 * heads, layout[1], head_dim, device="meta"),
                       LsePartial=torch.empty(layout[0], 4 * heads, layout[1], device="meta"))
    plan = DecodePlan(group=heads // kv_heads, splits=4, block_m=variant.decode_rows) if variant.decode_rows else None
    fn = _kernel(kernel)
    arguments = kernel_arguments(fn, call, plan, **tensors)
    return {name: arguments[name] for name, is_constexpr in _parameters(fn) if is_constexpr and name in arguments}


def _signature(fn, job: dict):
    """Signature, constexprs and attrs as Triton's JIT builds them for the job's launch on contiguous,
    aligned tensors (job["constexprs"]: the launch's constexpr values). Raises ValueError naming every
    parameter that has no entry in the tables above (or, for a constexpr, no value)."""
    signature, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    unknown = []
    for i, (name, is_constexpr) in enumerate(_parameters(fn)):
        if is_constexpr:
            if name in job["constexprs"]:
                signature[name], constexprs[name] = "constexpr", job["constexprs"][name]
            else:
                unknown.append(f"constexpr {name}")
        elif name in POINTER_TYPES:
            element = job["variant"].dtype if POINTER_TYPES[name] == INPUT else POINTER_TYPES[name]
            signature[name], attrs[(i,)] = f"*{element}", aligned
        elif name in SCALAR_TYPES:
            signature[name] = SCALAR_TYPES[name]
        elif STRIDE_KINDS.get(name) == "unit":
            signature[name], constexprs[name] = "constexpr", 1  # the JIT specialises ints equal to 1
        elif name in STRIDE_KINDS:
            signature[name] = "i32"
            if STRIDE_KINDS[name] == "aligned":
                attrs[(i,)] = aligned
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{fn.__name__}: the static check does not know parameter(s) {', '.join(unknown)}: add "
                         f"each to POINTER_TYPES / SCALAR_TYPES / STRIDE_KINDS in tests/test_static_gpu.py (a "
                         f"constexpr gets its value from launch.kernel_arguments)")
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------------------------------
# Worker side (spawned processes; TRITON_INTERPRET removed before any kernel is imported).

def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def _compile_one(job: dict) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(job["kernel"])
    result = dict(job)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        signature, constexprs, attrs = _signature(fn, job)
        options = {"num_warps": job["num_warps"]}
        for name in ("num_stages", "maxnreg"):
            if job[name] is not None:
                options[name] = job[name]
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", job["arch"], 32), options=options)
    except Exception as e:  # noqa: BLE001  a config that does not compile is an offender, not a crash
        result.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                      seconds=time.perf_counter() - start)
        return result
    result["seconds"] = time.perf_counter() - start
    result["shared"] = compiled.metadata.shared

    ptxas_log = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if spills is None:
        result["error"] = "no ptxas -v spill line in Triton's ptxas log"
        return result
    result["spill_stores"], result["spill_loads"] = int(spills.group(1)), int(spills.group(2))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    if regs is None or stack is None:
        result["error"] = f"cannot parse cuobjdump output: {usage!r}"
        return result
    result["regs"], result["stack"] = int(regs.group(1)), int(stack.group(1))
    return result


def _worker_loop(conn) -> None:
    """A compile worker: takes jobs from conn until it gets None, sends back one result per job."""
    _init_worker()
    while (job := conn.recv()) is not None:
        conn.send(_compile_one(job))


# ----------------------------------------------------------------------------------------------------
# Driver side.

def _config_shapes(kernel: str, block_d: int, variant: Variant) -> list:
    """(BLOCK_M, BLOCK_N or None, num_warps, num_stages, maxnreg) of every config launch.py launches kernel with
    for block_d and the variant: configs.py's autotune list (config_fn(block_d, scheme name), or decode_configs
    for a decode forward), or the preprocess / merge kernel's one fixed config."""
    from fused_pos_attn.triton_kernels import configs, launch
    _, config_fn = KERNELS[kernel]
    fixed = {"_attn_bwd_preprocess_kernel": launch.PREPROCESS_CONFIG, "_attn_split_merge_kernel": launch.MERGE_CONFIG}
    if config_fn is None:
        found = [fixed[kernel]]
    elif kernel == "_attn_fwd_kernel" and variant.decode_rows:
        found = configs.decode_configs(block_d, variant.scheme, variant.decode_rows)
    else:
        found = getattr(configs, config_fn)(block_d, variant.scheme)
    return [(c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N"), c.num_warps, c.num_stages, getattr(c, "maxnreg", None))
            for c in found]


def _jobs(head_dims, variants, archs=ARCHS) -> list:
    """One job per (kernel, head dim, variant, config, arch), minus repeats of the same compile (variant
    fields a kernel has no constexpr for make no new compile: the preprocess kernel sees only the dtype,
    head dim and dLSE)."""
    from fused_pos_attn.triton_kernels.configs import block_d_for
    jobs, seen = [], set()
    for kernel in KERNELS:
        for head_dim in head_dims:
            block_d = block_d_for(head_dim)
            for variant in dict.fromkeys(v.for_scheme() for v in variants):
                values = _constexpr_values(kernel, head_dim, variant)
                for block_m, block_n, num_warps, num_stages, maxnreg in _config_shapes(kernel, block_d, variant):
                    constexprs = dict(values, BLOCK_M=block_m, **({"BLOCK_N": block_n} if block_n else {}))
                    for arch in archs:
                        key = (kernel, variant.dtype, arch, num_warps, num_stages, maxnreg,
                               tuple(sorted(constexprs.items())))
                        if key not in seen:
                            seen.add(key)
                            jobs.append(dict(kernel=kernel, variant=variant, head_dim=head_dim, block_d=block_d,
                                             arch=arch, block_m=block_m, block_n=block_n, num_warps=num_warps,
                                             num_stages=num_stages, maxnreg=maxnreg, constexprs=constexprs))
    return jobs


def _default_matrix() -> list:
    return _jobs(DEFAULT_HEAD_DIMS, BASE_VARIANTS + DEFAULT_EXTRA_VARIANTS)


def _full_matrix() -> list:
    """A superset of the default matrix."""
    return _jobs(FULL_HEAD_DIMS, [dataclasses.replace(v, **profile) for profile in FULL_PROFILES for v in FULL_SCHEMES]
                 + list(DEFAULT_EXTRA_VARIANTS))


def _cost(job: dict) -> int:
    """Rough relative compile time: tile area, doubled for RoPE (its sin/cos and rotation code)."""
    return job["block_d"] * (job["block_m"] + (job["block_n"] or 0)) * (1 + (job["variant"].scheme == "rope"))


def _run(jobs: list) -> list:
    """Compile jobs on STATIC_CHECK_JOBS spawned workers. A worker that dies mid-compile (a crash in the
    compiler, or a kill) costs only its job: that job is retried once on a fresh worker, then reported."""
    context = multiprocessing.get_context("spawn")
    # Biggest tiles first so the slowest compiles do not end up alone at the tail.
    todo = [(job, 0) for job in sorted(jobs, key=lambda j: -_cost(j))]  # (job, times its worker died on it)
    results, idle, busy = [], [], {}

    def start_worker():
        conn, child_conn = context.Pipe()
        process = context.Process(target=_worker_loop, args=(child_conn,), daemon=True)
        process.start()
        child_conn.close()
        return conn, process

    saved = os.environ.pop("TRITON_INTERPRET", None)  # inherited by the spawned workers
    finished = False
    try:
        workers = int(os.environ.get("STATIC_CHECK_JOBS", os.cpu_count() or 2))
        idle = [start_worker() for _ in range(max(1, min(workers, len(todo))))]
        while todo or busy:
            while idle and todo:
                (conn, process), (job, deaths) = idle.pop(), todo.pop(0)
                conn.send(job)
                busy[conn] = (process, job, deaths)
            for conn in multiprocessing.connection.wait(list(busy)):
                process, job, deaths = busy.pop(conn)
                try:
                    results.append(conn.recv())
                    idle.append((conn, process))
                    continue
                except (EOFError, OSError):
                    process.join()
                if deaths == 0:
                    todo.insert(0, (job, 1))
                else:
                    results.append(dict(job, seconds=0.0, error=f"compile worker died twice on this config "
                                                                f"(exit code {process.exitcode})"))
                idle.append(start_worker())
        for conn, _ in idle:
            conn.send(None)
        finished = True
    finally:
        for process in [process for _, process in idle] + [process for process, _, _ in busy.values()]:
            if finished:
                process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return results


def _offences(r: dict) -> list:
    if "error" in r:
        return [r["error"]]
    found = []
    if r["spill_stores"] or r["spill_loads"]:
        found.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
    if r["regs"] > MAX_REGS or r["regs"] * 32 * r["num_warps"] > REGISTER_FILE:
        found.append(f"{r['regs']} registers x {32 * r['num_warps']} threads")
    if r["shared"] > SHARED_LIMIT[r["arch"]]:
        found.append(f"shared {r['shared']} B > {SHARED_LIMIT[r['arch']]} B")
    return found


def _scheme_label(r: dict) -> str:
    """e.g. "rope (rotary 16, interleaved)", "relative (no table grad)"; for the preprocess kernel "dLSE" or "-"."""
    if r["kernel"] == "_attn_bwd_preprocess_kernel":
        return "dLSE" if r["variant"].dlse else "-"
    if r["kernel"] == "_attn_split_merge_kernel":
        return "-"
    variant, details = r["variant"], []
    if variant.scheme == "rope" and variant.rotary != 1.0:
        details.append(f"rotary {int(r['head_dim'] * variant.rotary)}")
    if variant.interleaved:
        details.append("interleaved")
    if variant.scheme == "relative" and r["kernel"] == "_attn_bwd_dkdv_kernel":
        details.append("table grad" if variant.rel_grad else "no table grad")
    return variant.scheme + (f" ({', '.join(details)})" if details else "")


def _mask_label(r: dict) -> str:
    variant = r["variant"]
    packed = (["varlen"] if variant.varlen else []) + (["paged"] if variant.paged else []) + (
        [f"decode {variant.decode_rows} rows"] if variant.decode_rows and r["kernel"] == "_attn_fwd_kernel" else [])
    if r["kernel"] in ("_attn_bwd_preprocess_kernel", "_attn_split_merge_kernel"):
        return ", ".join(packed) or "-"
    return ", ".join(["causal" if variant.causal else "non-causal"] + (["window"] if variant.window else []) + packed)


def _label(r: dict) -> str:
    config = f"M{r['block_m']}" + (f" N{r['block_n']}" if r["block_n"] else "") + f" w{r['num_warps']}"
    config += f" s{r['num_stages']}" if r["num_stages"] is not None else ""
    config += f" maxnreg {r['maxnreg']}" if r["maxnreg"] is not None else ""
    return (f"{r['kernel']} | {r['variant'].dtype} | {r['head_dim']} | {r['block_d']} | {_scheme_label(r)} | "
            f"{_mask_label(r)} | sm_{r['arch']} | {config}")


def _table(results: list) -> str:
    lines = ["| kernel | dtype | HEAD_DIM | BLOCK_D | pos | mask | arch | config | regs | spill st/ld B | stack B "
             "| shared B | compile s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def key(r):
        v = r["variant"]
        return (list(KERNELS).index(r["kernel"]), v.dtype, r["block_d"], r["head_dim"], SCHEME_CODES[v.scheme],
                -v.rotary, v.interleaved, not v.rel_grad, v.dlse, not v.causal, v.window, v.varlen, r["arch"],
                -r["block_m"],
                -(r["block_n"] or 0), -r["num_warps"], r["num_stages"] or 0)

    for r in sorted(results, key=key):
        status = "; ".join(_offences(r)) or "ok"
        if "error" in r:
            lines.append(f"| {_label(r)} | - | - | - | - | {r['seconds']:.1f} | {status} |")
        else:
            lines.append(f"| {_label(r)} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} | "
                         f"{r['shared']} | {r['seconds']:.1f} | {status} |")
    return "\n".join(lines)


def _summary(results: list) -> str:
    lines = []
    for kernel in KERNELS:
        rs = [r for r in results if r["kernel"] == kernel and "error" not in r]
        if not rs:
            continue
        parts = [f"{len(rs)} compiles", f"max regs {max(r['regs'] for r in rs)}",
                 f"configs with spills {sum(1 for r in rs if r['spill_stores'] or r['spill_loads'])}"]
        for arch in ARCHS:
            shared = [r["shared"] for r in rs if r["arch"] == arch]
            if shared:
                parts.append(f"max shared sm_{arch} {max(shared)} B (limit {SHARED_LIMIT[arch]})")
        lines.append(f"- {kernel}: " + ", ".join(parts))
    return "\n".join(lines)


def _results_path(triton_version: str, full: bool) -> Path:
    """static_check[_full].md for the Makefile's TRITON_PIN, with a _triton<major.minor> suffix otherwise."""
    pin = re.search(r"^TRITON_PIN\s*:?=\s*triton==(\d+\.\d+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert pin, "Makefile has no TRITON_PIN := triton==X.Y line: the static check names its results after it"
    version = ".".join(triton_version.split(".")[:2])
    suffix = "" if version == pin.group(1) else f"_triton{version}"
    return RESULTS / f"static_check{'_full' if full else ''}{suffix}.md"


def _header(triton, full: bool, count: int, elapsed: float) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = " / ".join(f"{get_ptxas(arch).version} (sm_{arch})" for arch in ARCHS)
    workers = os.environ.get("STATIC_CHECK_JOBS", os.cpu_count() or 2)
    return (f"triton {triton.__version__}, ptxas {ptxas}, {datetime.date.today().isoformat()}; "
            f"{'full' if full else 'default'} matrix, {count} compiles in {elapsed:.0f} s on {workers} workers")


def test_every_kernel_parameter_is_known():
    """Every parameter of every kernel has a type, and every constexpr a value, for every job of both
    matrices (no compile: this catches a new kernel parameter in a second, with its name)."""
    pytest.importorskip("triton")
    for job in _full_matrix() + _default_matrix():
        _signature(_kernel(job["kernel"]), job)


def test_unknown_parameter_is_named():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def kernel_with_new_arguments(Q, NewTable, stride_qn, HEAD_DIM: tl.constexpr, NEW_FLAG: tl.constexpr):
        pass

    job = dict(_default_matrix()[0], constexprs=dict(HEAD_DIM=64))
    with pytest.raises(ValueError, match=r"kernel_with_new_arguments: .* NewTable") as raised:
        _signature(kernel_with_new_arguments, job)
    assert "constexpr NEW_FLAG" in str(raised.value) and "stride_qn" not in str(raised.value)


def test_default_matrix_covers_every_variant_switch():
    """Item 1.5 of issue 9: non-causal, window, interleaved RoPE, partial rotary and bf16 (and the base's
    fp16, causal, rotate-half, full rotary) each reach every attention kernel at every default head dim, as
    does the packed layout (issue 10); the relative table gradient is compiled for the largest table the
    launcher takes; paged caches, split-KV decode tiles and their merge kernel reach the forward (issue 13)."""
    pytest.importorskip("triton")
    switches = {"non-causal": lambda v: not v.causal, "causal": lambda v: v.causal, "window": lambda v: v.window,
                "interleaved": lambda v: v.interleaved,
                "rotate-half": lambda v: v.scheme == "rope" and not v.interleaved,
                "partial rotary": lambda v: v.scheme == "rope" and v.rotary < 1,
                "full rotary": lambda v: v.scheme == "rope" and v.rotary == 1,
                "bf16": lambda v: v.dtype == "bf16", "fp16": lambda v: v.dtype == "fp16",
                "varlen": lambda v: v.varlen, "dense": lambda v: not v.varlen}
    from fused_pos_attn.triton_kernels.launch import MAX_GRAD_BUCKETS
    jobs = _default_matrix()
    assert any(j["constexprs"].get("NUM_BUCKETS_BLOCK") == MAX_GRAD_BUCKETS for j in jobs), \
        "no default job has the largest bucket table the launcher takes"
    for kernel in [k for k, (_, config_fn) in KERNELS.items() if config_fn is not None]:
        for head_dim in DEFAULT_HEAD_DIMS:
            variants = [j["variant"] for j in jobs if j["kernel"] == kernel and j["head_dim"] == head_dim]
            missing = [switch for switch, on in switches.items() if not any(map(on, variants))]
            assert not missing, f"{kernel} HEAD_DIM {head_dim}: no job with {', '.join(missing)}"
    # The forward's KV-cache and decode paths (issue 13): paged caches, every scheme in a split-KV decode tile, and
    # the merge kernel, at every default head dim.
    for head_dim in DEFAULT_HEAD_DIMS:
        forward = [j for j in jobs if j["kernel"] == "_attn_fwd_kernel" and j["head_dim"] == head_dim]
        assert any(j["constexprs"]["PAGED"] for j in forward), f"HEAD_DIM {head_dim}: no paged forward"
        decoded = {j["variant"].scheme for j in forward if j["constexprs"]["SPLIT"] and j["constexprs"]["GROUP"] > 1}
        assert decoded == {"none", "alibi", "rope", "relative"}, f"HEAD_DIM {head_dim}: decode only for {decoded}"
        assert any(j["kernel"] == "_attn_split_merge_kernel" and j["head_dim"] == head_dim for j in jobs)


def test_every_config_compiles_without_spills_within_shared_limits():
    tools = _tools()
    if isinstance(tools, str):
        pytest.skip(tools)
    triton, _ = tools

    full = os.environ.get("STATIC_CHECK_FULL", "0") == "1"
    jobs = _full_matrix() if full else _default_matrix()
    start = time.perf_counter()
    results = _run(jobs)
    elapsed = time.perf_counter() - start

    header, table, summary = _header(triton, full, len(results), elapsed), _table(results), _summary(results)
    print(f"\n{header}\n\n{table}\n\n{summary}")
    if os.environ.get("FUSED_POS_ATTN_WRITE_RESULTS") == "1":
        limits = (f"Limits: no spills, <= {MAX_REGS} registers/thread, shared <= {SHARED_LIMIT[80]} B (sm_80), "
                  f"{SHARED_LIMIT[90]} B (sm_90).")
        path = _results_path(triton.__version__, full)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Static GPU check (tests/test_static_gpu.py)\n\n{header}\n\n{limits}\n\n{summary}\n\n"
                        f"{table}\n")

    offenders = [f"{_label(r)}: {'; '.join(_offences(r))}" for r in results if _offences(r)]
    assert not offenders, f"{len(offenders)} of {len(results)} compiles fail the static check:\n" + "\n".join(offenders)
