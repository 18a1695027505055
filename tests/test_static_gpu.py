"""Static GPU check (`make static-check`): every shipped autotune config compiles for sm_80 and sm_90
without a GPU, with no register spills and shared memory within the architecture's per-block limit.

How: each (kernel, config, head dim, scheme, arch) is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options={num_warps, num_stages})`,
with the argument types and specialisations a real launch on contiguous fp16 tensors gets from Triton's
JIT: pointers 16-byte aligned, last-dim strides (and the slopes' head stride) equal to 1, hence
constexpr, the other strides divisible by 16, integer sizes plain i32.

What is measured, and from where:
- registers per thread: the REG field of `cuobjdump --dump-resource-usage` on the cubin Triton produced
  (the artifact that would be loaded; cuobjdump ships in Triton's wheel).
- spill bytes: "N bytes spill stores, M bytes spill loads" from the `ptxas -v` log of Triton's own ptxas
  run (TRITON_DUMP_PTXAS_LOG=1; TRITON_ALWAYS_COMPILE=1 so a cache hit never hides the log). This is the
  ptxas that builds the cubin, with Triton's flags (e.g. --regAllocOptLevel=2; ptxas-blackwell for
  sm_90), so it reports exactly what ships; a second ptxas run with our own flags could differ. The
  cubin's STACK is listed for information only and is not a spill measure: RoPE kernels carry a 32 B
  stack frame with no spill at all (the local array of libdevice sinf/cosf's large-argument reduction).
- shared memory: `metadata.shared`, the dynamic shared memory Triton requests at launch, against the
  opt-in per-block maximum (sm_80 166912 B = 163 KiB, sm_90 232448 B = 227 KiB), the same comparison
  Triton's launcher makes before raising OutOfResources.
A spill is any nonzero spill store or load; the register ceiling is 255 per thread (and the block's
registers must fit the 64K register file).

Coverage. One cold compile takes 1-6 s on the 2-core dev machine (rope the slowest; a config that spills
can take minutes in ptxas); the default matrix keeps `make static-check` well under 5 minutes:
- default (184 compiles, about 180 s on an idle machine, 320 s on a busy one): every config of the three
  attention kernels (and the preprocess kernel) x HEAD_DIM = BLOCK_D in 64/128/256 x pos none / alibi /
  rope with full rotary / rope with partial rotary (rotary_dim = D / 2: pass-through tile and second dot)
  / relative x sm_80/sm_90, fp16.
- STATIC_CHECK_FULL=1 (438 compiles, about 460 s): adds HEAD_DIM 32 and 80 (non-power-of-two,
  padded to BLOCK_D 128) and bf16 for the forward; writes bench/results/static_check_full.md. Run it
  after changing a kernel or a config list: HEAD_DIM 80 with full rotary once spilled in a dK/dV config
  that was clean at 128 (M16 N32 on sm_90), so the default matrix does not stand in for it.
Always CAUSAL=True, HAS_WINDOW=False, INTERLEAVED=False (rope), DOT_PRECISION "tf32" (fp16/bf16).

tests/conftest.py sets TRITON_INTERPRET=1 without CUDA, under which @triton.jit yields interpreter
functions that triton.compile cannot take; the compiles therefore run in spawned worker processes whose
environment has TRITON_INTERPRET removed before the kernels are imported. Workers: STATIC_CHECK_JOBS,
default the CPU count. The table is printed (run pytest with -s) and written to
bench/results/static_check.md (static_check_full.md for the full matrix).
"""
import contextlib
import datetime
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

pytestmark = pytest.mark.static

SHARED_LIMIT = {80: 166912, 90: 232448}  # cudaDevAttrMaxSharedMemoryPerBlockOptin: A100, H100
MAX_REGS = 255
REGISTER_FILE = 65536
ARCHS = (80, 90)
POS_NAMES = {0: "none", 1: "alibi", 2: "rope", 3: "relative"}
PREPROCESS_BLOCK_M = 64  # launch.py launches the preprocess kernel with this fixed tile, default warps/stages
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"  # static_check.md, static_check_full.md

# Kernel name -> (module, config-list function name or None for the fixed-config preprocess kernel).
KERNELS = {
    "_attn_fwd_kernel": ("forward", "forward_configs"),
    "_attn_bwd_dkdv_kernel": ("backward", "backward_dkdv_configs"),
    "_attn_bwd_dq_kernel": ("backward", "backward_dq_configs"),
    "_attn_bwd_preprocess_kernel": ("backward", None),
}
FP32_POINTERS = {"Lse", "Delta", "Slopes", "InvFreq", "RelBias", "DRelBias"}
I64_POINTERS = {"QOffset", "KOffset"}
FP32_SCALARS = {"sm_scale", "attention_factor"}
UNIT_STRIDES = {"stride_sh"}  # slopes (B, Hq) contiguous; every stride_*d is a head-dim stride
UNALIGNED_STRIDES = {"stride_sb", "stride_rh"}  # Hq and 2 * (max_distance + 1): any value


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
            get_ptxas(arch).path
        cuobjdump = knobs.nvidia.cuobjdump.path
    except (RuntimeError, AttributeError) as e:
        return f"ptxas / cuobjdump not found in Triton's nvidia backend: {e}"
    return triton, cuobjdump


# ----------------------------------------------------------------------------------------------------
# Worker side (spawned processes; TRITON_INTERPRET removed before any kernel is imported).

def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def _kernel(name):
    import importlib
    module, _ = KERNELS[name]
    return getattr(importlib.import_module(f"fused_pos_attn.triton_kernels.{module}"), name)


def _signature(fn, dtype: str, constexprs: dict):
    """Signature, constexprs and attrs as Triton's JIT builds them for contiguous, aligned tensors."""
    signature, constexprs, attrs = {}, dict(constexprs), {}
    aligned = [["tt.divisibility", 16]]
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name in FP32_POINTERS:
            signature[name], attrs[(i,)] = "*fp32", aligned
        elif name in I64_POINTERS:
            signature[name], attrs[(i,)] = "*i64", aligned
        elif name[0].isupper():  # Q, K, V, Out, DOut, DQ, DK, DV
            signature[name], attrs[(i,)] = f"*{dtype}", aligned
        elif name.startswith("stride_") and (name.endswith("d") or name in UNIT_STRIDES):
            signature[name], constexprs[name] = "constexpr", 1  # the JIT specialises ints equal to 1
        elif name.startswith("stride_"):
            signature[name] = "i32"
            if name not in UNALIGNED_STRIDES:
                attrs[(i,)] = aligned
        elif name in FP32_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    unknown = set(constexprs) - set(fn.arg_names)
    unset = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    assert not unknown and not unset, f"{fn.__name__}: unknown constexprs {unknown}, constexprs not set {unset}"
    return signature, constexprs, attrs


def _compile_one(job: dict) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(job["kernel"])
    constexprs = dict(HEAD_DIM=job["head_dim"], BLOCK_D=job["block_d"], BLOCK_M=job["block_m"])
    if job["kernel"] != "_attn_bwd_preprocess_kernel":
        from fused_pos_attn.triton_kernels.launch import KernelPosition, _tile_widths
        kind = POS_NAMES[job["pos"]]
        position = KernelPosition(kind, None, None, job["rotary_dim"] or 0, False, 1.0)
        constexprs.update(POS=job["pos"], CAUSAL=True, HAS_WINDOW=False, INTERLEAVED=False,
                          DOT_PRECISION="ieee" if job["dtype"] == "fp32" else "tf32", BLOCK_N=job["block_n"],
                          **_tile_widths(position, job["head_dim"]))
    signature, constexprs, attrs = _signature(fn, job["dtype"], constexprs)
    options = {"num_warps": job["num_warps"]}
    for name in ("num_stages", "maxnreg"):
        if job[name] is not None:
            options[name] = job[name]
    result = dict(job)
    start = time.perf_counter()
    log = io.StringIO()
    try:
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


# ----------------------------------------------------------------------------------------------------
# Driver side.

def _config_shapes(kernel: str, block_d: int, pos):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg) of every config launch.py autotunes kernel over for
    block_d and scheme pos (some schemes have their own lists: config_fn(block_d, scheme name))."""
    import importlib
    _, config_fn = KERNELS[kernel]
    if config_fn is None:
        return [(PREPROCESS_BLOCK_M, None, 4, None, None)]
    configs = getattr(importlib.import_module("fused_pos_attn.triton_kernels.configs"), config_fn)(block_d,
                                                                                                  POS_NAMES[pos])
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, getattr(c, "maxnreg", None))
            for c in configs]


def _jobs(head_dims, schemes, dtypes_for, archs=ARCHS) -> list:
    """schemes: (POS code, rotary_dim as a fraction of the head dim or None) pairs."""
    from fused_pos_attn.triton_kernels.configs import block_d_for
    jobs = []
    for kernel in KERNELS:
        for head_dim in head_dims:
            block_d = block_d_for(head_dim)
            for dtype in dtypes_for(kernel):
                for pos, rotary in (schemes if kernel != "_attn_bwd_preprocess_kernel" else ((None, None),)):
                    for block_m, block_n, num_warps, num_stages, maxnreg in _config_shapes(kernel, block_d, pos):
                        for arch in archs:
                            jobs.append(dict(kernel=kernel, dtype=dtype, head_dim=head_dim, block_d=block_d,
                                             pos=pos, rotary_dim=int(head_dim * rotary) if rotary else None,
                                             arch=arch, block_m=block_m, block_n=block_n, num_warps=num_warps,
                                             num_stages=num_stages, maxnreg=maxnreg))
    return jobs


NONE, ALIBI, ROPE, ROPE_HALF, RELATIVE = (0, None), (1, None), (2, 1.0), (2, 0.5), (3, None)  # ROPE_HALF: r = D/2


def _full_matrix() -> list:
    return _jobs((32, 64, 80, 128, 256), (NONE, ALIBI, ROPE, ROPE_HALF, RELATIVE),
                 lambda kernel: ("fp16", "bf16") if kernel == "_attn_fwd_kernel" else ("fp16",))


def _default_matrix() -> list:
    """fp16, HEAD_DIM = BLOCK_D in 64/128/256, none/alibi/full and half rotary rope/relative, both archs."""
    return _jobs((64, 128, 256), (NONE, ALIBI, ROPE, ROPE_HALF, RELATIVE), lambda kernel: ("fp16",))


def _worker_loop(conn) -> None:
    """A compile worker: takes jobs from conn until it gets None, sends back one result per job."""
    _init_worker()
    while (job := conn.recv()) is not None:
        conn.send(_compile_one(job))


def _run(jobs: list) -> list:
    """Compile jobs on STATIC_CHECK_JOBS spawned workers. A worker that dies mid-compile (a crash in the
    compiler, or a kill) costs only its job: that job is retried once on a fresh worker, then reported."""
    context = multiprocessing.get_context("spawn")
    # Biggest tiles first so the slowest compiles do not end up alone at the tail.
    todo = sorted(jobs, key=lambda j: -(j["block_d"] * (j["block_m"] + (j["block_n"] or 0)) * (1 + (j["pos"] == 2))))
    todo = [(job, 0) for job in todo]  # (job, times its worker died on it)
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


def _label(r: dict) -> str:
    pos = "-" if r["pos"] is None else POS_NAMES[r["pos"]]
    if r["rotary_dim"] is not None and r["rotary_dim"] != r["head_dim"]:
        pos += f" (rotary {r['rotary_dim']})"
    config = f"M{r['block_m']}" + (f" N{r['block_n']}" if r["block_n"] else "") + f" w{r['num_warps']}"
    config += f" s{r['num_stages']}" if r["num_stages"] is not None else ""
    config += f" maxnreg {r['maxnreg']}" if r["maxnreg"] is not None else ""
    return (f"{r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['block_d']} | {pos} | sm_{r['arch']} | {config}")


def _table(results: list) -> str:
    lines = ["| kernel | dtype | HEAD_DIM | BLOCK_D | pos | arch | config | regs | spill st/ld B | stack B "
             "| shared B | compile s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def key(r):
        return (list(KERNELS).index(r["kernel"]), r["dtype"], r["block_d"], r["head_dim"], r["pos"] or 0,
                -(r["rotary_dim"] or 0), r["arch"], -r["block_m"], -(r["block_n"] or 0), -r["num_warps"])

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
        parts = [f"max regs {max(r['regs'] for r in rs)}",
                 f"configs with spills {sum(1 for r in rs if r['spill_stores'] or r['spill_loads'])}"]
        for arch in ARCHS:
            shared = [r["shared"] for r in rs if r["arch"] == arch]
            if shared:
                parts.append(f"max shared sm_{arch} {max(shared)} B (limit {SHARED_LIMIT[arch]})")
        lines.append(f"- {kernel}: " + ", ".join(parts))
    return "\n".join(lines)


def test_every_config_compiles_without_spills_within_shared_limits():
    tools = _tools()
    if isinstance(tools, str):
        pytest.skip(tools)
    triton, _ = tools
    from triton import knobs

    full = os.environ.get("STATIC_CHECK_FULL", "0") == "1"
    jobs = _full_matrix() if full else _default_matrix()
    start = time.perf_counter()
    results = _run(jobs)
    elapsed = time.perf_counter() - start

    table, summary = _table(results), _summary(results)
    header = (f"triton {triton.__version__}, ptxas {knobs.nvidia.ptxas.version} (sm_80) / "
              f"{knobs.nvidia.ptxas_blackwell.version} (sm_90), {datetime.date.today().isoformat()}; "
              f"{'full' if full else 'default'} matrix, {len(results)} compiles in {elapsed:.0f} s")
    print(f"\n{header}\n\n{table}\n\n{summary}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    limits = (f"Limits: no spills, <= {MAX_REGS} registers/thread, shared <= {SHARED_LIMIT[80]} B (sm_80), "
              f"{SHARED_LIMIT[90]} B (sm_90).")
    (RESULTS / f"static_check{'_full' if full else ''}.md").write_text(
        f"# Static GPU check (tests/test_static_gpu.py)\n\n{header}\n\n{limits}\n\n{summary}\n\n{table}\n")

    offenders = [f"{_label(r)}: {'; '.join(_offences(r))}" for r in results if _offences(r)]
    assert not offenders, f"{len(offenders)} of {len(results)} compiles fail the static check:\n" + "\n".join(offenders)
