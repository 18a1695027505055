"""The CUDA C++ kernels (csrc/cuda/*.cu) compile for sm_80 and sm_90 without a GPU, with no register spill
and shared memory within each architecture's per-block limit. Skipped where nvcc is absent.

How: every .cu file is compiled with `nvcc -c -arch=sm_XX --resource-usage`, the flags setup.py's CUDA build
uses (torch's common nvcc flags, -O3, -std=c++17) and the include paths csrc/include and csrc (csrc/cuda uses
no torch headers). From ptxas' report, per kernel instantiation: registers per thread, spill stores / loads,
stack frame (sincosf's slow-path reduction array, not a spill) and static shared memory. The kernels use
dynamic shared memory only; its size is what the launchers request, the constexprs of forward_kernel.cuh and
backward_kernel.cuh (for the dK / dV kernel the largest launch, with the relative table gradient's rows),
printed by a small host program compiled against those headers. Compiles run two at a
time. The table is printed (pytest -s); it is written to bench/results/cuda_static_check.md only when
FUSED_POS_ATTN_WRITE_RESULTS=1 (an explicit make target), so a plain test run never rewrites tracked files.
"""
import datetime
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
RESULTS = ROOT / "bench" / "results" / "cuda_static_check.md"
ARCHS = (80, 90)
SHARED_LIMIT = {80: 166912, 90: 232448}  # cudaDevAttrMaxSharedMemoryPerBlockOptin: A100, H100
THREADS = 128  # kThreads in csrc/cuda/tile.cuh
REGISTER_FILE = 65536
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS (setup.py's CUDAExtension adds them), then setup.py's own.
NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-O3", "-std=c++17",
              f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}"]
JOBS = 2

# Prints the dynamic shared memory each kernel is launched with, from the same constexprs the launchers use.
SMEM_PROBE = r"""
#include <cstdio>
#include "cuda/backward_kernel.cuh"
#include "cuda/forward_kernel.cuh"
using namespace fused_pos_attn::gpu;
template <typename T, int D> void print(const char* dtype) {
  std::printf("attention_forward_kernel %s %d %d\n", dtype, D, ForwardConfig<D>::template smem_bytes<T>());
  std::printf("attention_backward_dkdv_kernel %s %d %d\n", dtype, D,
              BackwardConfig<D>::template Layout<T>::max_bytes);
}
int main() {
  print<__half, 64>("fp16"); print<__half, 128>("fp16");
  print<__nv_bfloat16, 64>("bf16"); print<__nv_bfloat16, 128>("bf16");
}
"""


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


NVCC = _nvcc()


def cuda_include_dir() -> Optional[Path]:
    """The CUDA toolkit's include directory (with cuda_fp16.h), or None."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), nvcc and str(Path(nvcc).resolve().parents[1]), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")

_NAMES = {"__half": "fp16", "__nv_bfloat16": "bf16"}


def _kernel_label(mangled: str) -> tuple[str, str, str]:
    """(kernel, dtype, head dim) from a mangled name like ..attention_forward_kernelI6__halfLi64EE.. ("any" for
    a kernel that is not a template on them)."""
    m = re.search(r"(attention_\w+?_kernel)(?:I(?:\d+)(__half|__nv_bfloat16)(?:Li(\d+)E)?)?", mangled)
    if not m:
        return mangled, "", ""
    return m.group(1), _NAMES.get(m.group(2), "any"), m.group(3) or "any"


def parse_resource_usage(log: str) -> list[dict]:
    """One dict per kernel of a `nvcc --resource-usage` log."""
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            kernel, dtype, head_dim = _kernel_label(m.group(1))
            current = dict(kernel=kernel, dtype=dtype, head_dim=head_dim)
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s.group(1)) if s else 0
    return rows


def _compile(source: Path, arch: int, out_dir: str) -> tuple[Path, int, float, str, int]:
    cmd = [NVCC, *NVCC_FLAGS, f"-arch=sm_{arch}", "--resource-usage", "-c", str(source), "-o",
           os.path.join(out_dir, f"{source.stem}_sm{arch}.o")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, arch, time.perf_counter() - start, proc.stdout + proc.stderr, proc.returncode


def _dynamic_smem(out_dir: str) -> dict:
    probe = Path(out_dir) / "smem_probe.cu"
    probe.write_text(SMEM_PROBE)
    exe = Path(out_dir) / "smem_probe"
    subprocess.run([NVCC, *NVCC_FLAGS, str(probe), "-o", str(exe)], check=True, capture_output=True, text=True)
    sizes = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        kernel, dtype, head_dim, size = line.split()
        sizes[(kernel, dtype, head_dim)] = int(size)
    return sizes


def _nvcc_version() -> str:
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V[\d.]+", out)
    return m.group(0) if m else out.strip().splitlines()[-1]


def _table(rows: list[dict]) -> str:
    header = ("| kernel | dtype | D | arch | registers | spill stores (B) | spill loads (B) | stack (B) | "
              "static smem (B) | dynamic smem (B) |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | sm_{r['arch']} | {r['registers']} | "
                     f"{r['spill_stores']} | {r['spill_loads']} | {r['stack']} | {r['static_smem']} | "
                     f"{r['dynamic_smem']} |")
    return "\n".join(lines)


def publish(report: str, path: Path) -> None:
    """Write report to path only when FUSED_POS_ATTN_WRITE_RESULTS=1: results are committed files."""
    if os.environ.get("FUSED_POS_ATTN_WRITE_RESULTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)


def test_results_written_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "results" / "cuda_static_check.md"
    monkeypatch.delenv("FUSED_POS_ATTN_WRITE_RESULTS", raising=False)
    publish("table", path)
    assert not path.exists()
    monkeypatch.setenv("FUSED_POS_ATTN_WRITE_RESULTS", "1")
    publish("table", path)
    assert path.read_text() == "table"


@needs_nvcc
@pytest.mark.skipif(cuda_include_dir() is None, reason="CUDA headers (cuda_fp16.h) not found")
def test_cuda_bindings_compile(tmp_path):
    """csrc/ops.cpp's CUDA half (FUSED_POS_ATTN_WITH_CUDA: the CUDA ops' bindings, built only with a CUDA torch)
    compiles against this torch's headers (g++ -fsyntax-only, setup.py's C++ flags). A CPU build of torch lacks
    one generated header of c10/cuda, cuda_cmake_macros.h; a stand-in is written for it."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths
    stand_in = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*include_paths(), sysconfig.get_paths()["include"], ROOT / "csrc" / "include", ROOT / "csrc",
                cuda_include_dir(), tmp_path]  # the stand-in last: a CUDA torch's own header wins
    cmd = ["g++", "-fsyntax-only", "-std=c++17", "-w", "-DFUSED_POS_ATTN_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           *(f"-I{d}" for d in includes), str(ROOT / "csrc" / "ops.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"csrc/ops.cpp with FUSED_POS_ATTN_WITH_CUDA does not compile:\n{proc.stderr[-4000:]}"


@needs_nvcc
def test_cuda_kernels_compile_without_spills():
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources, f"no .cu files in {CUDA_DIR}"
    with tempfile.TemporaryDirectory() as out_dir:
        wall = time.perf_counter()
        with ThreadPoolExecutor(JOBS) as pool:
            results = list(pool.map(lambda job: _compile(*job, out_dir), [(s, a) for a in ARCHS for s in sources]))
        wall = time.perf_counter() - wall
        failed = [f"{s.name} sm_{a}:\n{log[-3000:]}" for s, a, _, log, rc in results if rc != 0]
        assert not failed, "nvcc failed:\n" + "\n".join(failed)
        smem = _dynamic_smem(out_dir)

    rows, seconds = [], {}
    for source, arch, elapsed, log, _ in results:
        seconds[(source.name, arch)] = elapsed
        for row in parse_resource_usage(log):
            row["arch"] = arch
            row["dynamic_smem"] = smem.get((row["kernel"], row["dtype"], row["head_dim"]), 0)
            rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["head_dim"], r["arch"]))
    problems = []
    for r in rows:
        name = f"{r['kernel']}<{r['dtype']}, {r['head_dim']}> sm_{r['arch']}"
        if r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{name}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if r["static_smem"] + r["dynamic_smem"] > SHARED_LIMIT[r["arch"]]:
            problems.append(f"{name}: {r['static_smem'] + r['dynamic_smem']} B shared memory > "
                            f"{SHARED_LIMIT[r['arch']]}")
        if r["registers"] * THREADS > REGISTER_FILE:
            problems.append(f"{name}: {r['registers']} registers x {THREADS} threads exceed the register file")

    times = ", ".join(f"{name} sm_{arch} {t:.1f} s" for (name, arch), t in sorted(seconds.items()))
    per_arch = ", ".join(f"sm_{a} {sum(t for (_, arch), t in seconds.items() if arch == a):.1f} s" for a in ARCHS)
    report = "\n".join([
        "# CUDA kernels: static check (nvcc --resource-usage)",
        "",
        "Device: compile only, no GPU. Written by tests/test_cuda_compile.py.",
        f"nvcc: {_nvcc_version()}; date: {datetime.date.today().isoformat()}; flags: "
        f"`{' '.join(f for f in NVCC_FLAGS if not f.startswith('-I'))} -arch=sm_XX`",
        f"Kernel instantiations per arch: {len(rows) // len(ARCHS)}. Compile time per file: {times}; "
        f"per arch (sum): {per_arch}; wall with {JOBS} jobs: {wall:.1f} s.",
        "Stack is the local array of sincosf's large-argument reduction, not a spill. Dynamic smem is what the "
        "launcher requests (> 48 KiB via cudaFuncAttributeMaxDynamicSharedMemorySize).",
        "",
        _table(rows),
        "",
        "Result: " + ("PASS (no spills, shared memory within limits)" if not problems else "FAIL: " +
                      "; ".join(problems)),
        "",
    ])
    print("\n" + report)
    publish(report, RESULTS)
    assert rows, "ptxas reported no kernels"
    assert not problems, "\n".join(problems)
