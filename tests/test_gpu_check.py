"""`make gpu-check` (bench/gpu_check.sh) where there is no GPU: its dry run, its stages driven by a stub
interpreter, the benchmark plan and report writers of bench/gpu_bench.py, and tests/test_gpu.py's reference
comparison run on the CPU backend. A few seconds; nothing here needs CUDA or writes into bench/results.
"""
import csv
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fused_pos_attn import benchmarking
from fused_pos_attn.benchmarking import FLOOR, Case, Measurement, attention_flops, build_provider

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))
import gpu_bench  # noqa: E402  bench/ is not a package

CELLS = [cell for block in gpu_bench.build_plan() for cell in block]


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """bash bench/gpu_check.sh from another directory, results into tmp_path/results, no $OUT unless given."""
    environment = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_DRY_RUN", "PY")}
    environment.update(GPU_CHECK_RESULTS_DIR=str(tmp_path / "results"), **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=environment, capture_output=True, text=True,
                          timeout=300)


# --------------------------------------------------------------------------------------------- the script

def test_script_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_without_cuda_says_what_it_would_run_and_fails(tmp_path):
    """CUDA hidden (as on this machine): the commands and the plan are printed, exit status 2, no files."""
    result = run_script(tmp_path, CUDA_VISIBLE_DEVICES="")
    out = result.stdout
    assert result.returncode == 2, out + result.stderr
    assert out.startswith("gpu-check DRY RUN: ") and "sees no CUDA device" in out
    assert "Nothing is built, tested or measured here" in out
    assert "FUSED_POS_ATTN_CUDA=1 FUSED_POS_ATTN_CUDA_ARCHS=<cc>" in out
    assert "-m pip install --no-build-isolation --no-deps --no-index -e ." in out
    assert "-m pytest -m gpu tests -v" in out and "-m fused_pos_attn check --no-bench" in out
    assert "bench/gpu_bench.py --out-dir" in out and "bench/decode.py --device cuda --rounds 2" in out
    assert f"{len(CELLS)} cells, {sum(not c.skip for c in CELLS)} measured" in out  # the plan, from gpu_bench
    assert out.rstrip().endswith("to build, test and benchmark.")
    assert "gpu-check: no CUDA device (" in out and "this was a dry run, exit status 2." in out
    assert not (tmp_path / "results").exists()


STUB_PYTHON = r"""#!/usr/bin/env bash
# A stand-in interpreter: answers gpu_check.sh's probe as an H200 machine would, fakes the stages.
case "$1" in
    -) cat >/dev/null
       printf '%s\n' "TORCH='2.11.0 (CUDA 13.0)'" TRITON=3.6.0 HAS_CUDA=1 NO_CUDA_WHY="''" "GPU_NAME='NVIDIA H200'" \
           ARCH=90 GPU_COUNT=1 SLUG=nvidia-h200 HAS_XDIST=1 HAS_TIMEOUT_PLUGIN=0 ;;
    -c) case "$2" in *build_info*) [[ "$FUSED_POS_ATTN_CUDA_BUILT" == 1 ]] && echo cpu+cuda || echo cpu ;;
                    "import transformers") [[ "$STUB_TRANSFORMERS" == 1 ]] ;;
                    *) echo 3.12.3 ;; esac ;;
    -m) case "$2" in
            pip) echo "pip $* (FUSED_POS_ATTN_CUDA=$FUSED_POS_ATTN_CUDA ARCHS=$FUSED_POS_ATTN_CUDA_ARCHS)"
                 [[ "$FUSED_POS_ATTN_CUDA" == 0 || "$STUB_CUDA_BUILD" == ok ]] ;;
            pytest) echo "[gw0] [ 50%] PASSED tests/test_gpu.py::test_a"
                    echo "[gw1] [100%] FAILED tests/test_gpu.py::test_b"
                    echo "=========================== short test summary info ============================"
                    echo "FAILED tests/test_gpu.py::test_b - AssertionError: boom"
                    echo "========================= 1 failed, 1 passed in 2.00s =========================="
                    exit 1 ;;
            fused_pos_attn) echo "| cuda | alibi | float16 | 1e-3 | 1e-3 | 2e-02 | PASS |" ;;
        esac ;;
    bench/gpu_bench.py) dir=$(sed -n 's/.*--out-dir \([^ ]*\).*/\1/p' <<< "$*")
                        for ext in md csv png; do echo "$ext" > "$dir/gpu_bench_nvidia-h200.$ext"; done
                        echo "| bf16 | 128 | fwd | 1024 | 300 | 310 (0.97x) |" ;;
    bench/varlen.py) dir=$(sed -n 's/.*--out-dir \([^ ]*\).*/\1/p' <<< "$*")
                     for ext in md csv; do echo "$ext" > "$dir/varlen_cuda_nvidia-h200.$ext"; done
                     echo "| alibi | fwd | packed | 1.0 | 0.90 | 12 |" ;;
    bench/hf_models.py) dir=$(sed -n 's/.*--out-dir \([^ ]*\).*/\1/p' <<< "$*")
                        for ext in md csv; do echo "$ext" > "$dir/hf_models_cuda_nvidia-h200.$ext"; done
                        echo "| llama | 1024 | fused | 12 | 0.80 | 40 |" ;;
    bench/decode.py) dir=$(sed -n 's/.*--out-dir \([^ ]*\).*/\1/p' <<< "$*")
                     for ext in md csv; do echo "$ext" > "$dir/decode_cuda_nvidia-h200.$ext"; done
                     echo "| rope | 8 / 2 | 1 | 32768 | 0.020 | 0.021 | 0.030 | 0.67 | 0.70 | 3.400 |" ;;
esac
"""


def stub_python(tmp_path: Path) -> Path:
    stub = tmp_path / "stub_python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    return stub


def test_stages_with_a_stub_interpreter(tmp_path):
    """The CUDA path's control flow: build for sm_90 with --no-index, tests (a failure), check, varlen, bench;
    the stage table, exit status 1 naming the failed stage, and the result files copied to $OUT (8 at most)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_script(tmp_path, PY=str(stub_python(tmp_path)), OUT=str(out_dir), STUB_CUDA_BUILD="ok",
                        FUSED_POS_ATTN_CUDA_BUILT="1", STUB_TRANSFORMERS="1")
    log = result.stdout
    assert result.returncode == 1, log + result.stderr
    build_log = (tmp_path / "results" / "gpu_build_nvidia-h200.log").read_text()
    assert "install --no-build-isolation --no-deps --no-index -e . (FUSED_POS_ATTN_CUDA=1 ARCHS=90)" in build_log
    summary = (tmp_path / "results" / "gpu_check_nvidia-h200.md").read_text()
    assert "| build | ok |" in summary and "| tests | FAILED (rc 1) |" in summary
    assert "1 failed, 1 passed in 2.00s" in summary and "FAILED tests/test_gpu.py::test_b - AssertionError" in summary
    assert "| check | ok |" in summary and "| varlen | ok |" in summary and "| bench | ok |" in summary
    assert "| hf | ok |" in summary and "| llama | 1024 | fused |" in log
    assert "| decode | ok |" in summary and "| rope | 8 / 2 | 1 | 32768 |" in log
    assert "--device cuda --rounds 2" in log and "| alibi | fwd | packed |" in log
    assert "gpu-check: FAILED (tests)" in summary and "gpu-check: FAILED (tests)" in log
    assert "FAILED tests/test_gpu.py::test_b" in log  # pytest's summary is shown, its full log kept
    returned = sorted(p.name for p in out_dir.iterdir())
    assert returned == sorted(["gpu_bench_nvidia-h200.md", "gpu_bench_nvidia-h200.png", "gpu_build_nvidia-h200.log",
                               "gpu_check_nvidia-h200.log", "gpu_check_nvidia-h200.md", "gpu_tests_nvidia-h200.log",
                               "varlen_cuda_nvidia-h200.md", "hf_models_cuda_nvidia-h200.md"])
    assert len(returned) <= 8  # what the device tool brings back


def test_failed_cuda_build_is_loud_and_the_triton_part_still_runs(tmp_path):
    result = run_script(tmp_path, PY=str(stub_python(tmp_path)), STUB_CUDA_BUILD="fails")
    assert result.returncode == 1
    assert "build: the CUDA C++ build failed (FAILED (rc 1), build_info: cpu)" in result.stdout
    build_log = (tmp_path / "results" / "gpu_build_nvidia-h200.log").read_text()
    assert "(FUSED_POS_ATTN_CUDA=0 ARCHS=90)" in build_log  # the retry without the CUDA C++ kernels
    summary = (tmp_path / "results" / "gpu_check_nvidia-h200.md").read_text()
    assert "| build | FAILED: CUDA C++ FAILED (rc 1) |" in summary and "| bench | ok |" in summary
    assert "| hf | skipped |" in summary  # no transformers there: noted, not a failure
    assert "gpu-check: FAILED (build tests)" in summary


# ---------------------------------------------------------------------------------------------- the plan

def test_plan_cells_build_without_cuda():
    """Every cell is causal, 16k tokens, width 2048; the plan spans fp16 / bf16, D 64 / 128, N 1k-16k, fwd and
    fwd+bwd, with every provider the issue names; each row has its floor; every provider builds."""
    assert all(c.case.causal and c.case.device == "cuda" and c.mode in gpu_bench.MODES for c in CELLS)
    assert all(c.case.batch * c.case.seq_len == 16384 and c.case.heads * c.case.head_dim == 2048 for c in CELLS)
    assert {c.case.dtype for c in CELLS} == {"float16", "bfloat16"}
    assert {c.case.head_dim for c in CELLS} == {64, 128}
    assert {c.case.seq_len for c in CELLS} == {1024, 2048, 4096, 8192, 16384}
    for dtype in ("float16", "bfloat16"):
        for head_dim in (64, 128):
            block = [c for c in CELLS if (c.case.dtype, c.case.head_dim) == (dtype, head_dim)]
            assert {c.case.seq_len for c in block} >= {1024, 16384} and {c.mode for c in block} == set(gpu_bench.MODES)
    assert {(c.provider, c.case.pos) for c in CELLS} == {
        (FLOOR, "none"), ("fused:triton", "alibi"), ("fused:triton", "rope"), ("fused:cuda", "alibi"),
        ("fused:cuda", "rope"), ("fused:triton", "none"), ("fused:cuda", "none"), ("sdpa_dense_bias", "alibi"),
        ("sdpa_dense_bias", "rope"), ("flex_attention", "alibi")}
    floors = {c.row for c in CELLS if c.provider == FLOOR}
    assert {c.row for c in CELLS} == floors
    for provider, pos in {(c.provider, c.case.pos) for c in CELLS}:
        assert callable(build_provider(provider, Case(pos=pos, seq_len=64, batch=1, heads=2, device="cpu")))


def test_dense_bias_is_skipped_where_it_would_exceed_the_limit():
    dense = [c for c in CELLS if c.provider == "sdpa_dense_bias" and c.case.pos == "alibi"]
    for cell in dense:
        too_big = benchmarking.dense_bias_bytes(cell.case) > gpu_bench.DENSE_BIAS_LIMIT
        assert bool(cell.skip) == too_big and (not too_big or "GiB (> 4 GiB limit)" in cell.skip)
    skipped = {(c.case.head_dim, c.case.seq_len) for c in dense if c.skip}
    assert skipped == {(64, 8192), (64, 16384), (128, 16384)}
    assert not any(c.skip for c in CELLS if c.provider != "sdpa_dense_bias")


def test_plan_estimate_fits_the_benchmark_stage():
    assert 60 < gpu_bench.estimate_seconds(gpu_bench.build_plan()) < 180


def test_attention_flops():
    case = Case(pos="alibi", seq_len=1024, batch=2, heads=16, head_dim=128, causal=False)
    assert attention_flops(case, "fwd") == 4 * 2 * 16 * 1024 ** 2 * 128
    assert attention_flops(replace(case, causal=True), "fwd") == attention_flops(case, "fwd") / 2
    assert attention_flops(case, "fwd+bwd") == 3.5 * attention_flops(case, "fwd")
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_flops(case, "backward")


# ------------------------------------------------------------------------------------------------ reports

def synthetic_results() -> list[Measurement]:
    """The plan's cells with made-up times: floor 1 ms, fused 0.9 ms, the others 2 ms; one fused error."""
    results = []
    for cell in CELLS:
        if cell.skip:
            results.append(Measurement(cell.provider, cell.case, cell.mode, math.nan, math.nan, cell.skip))
        elif cell.provider == "fused:cuda" and cell.case.seq_len == 2048:
            results.append(Measurement(cell.provider, cell.case, cell.mode, math.nan, math.nan,
                                       "error: RuntimeError: CUDA error: an illegal memory access"))
        else:
            ms = {FLOOR: 1.0, "fused:triton": 0.9}.get(cell.provider, 2.0)
            results.append(Measurement(cell.provider, cell.case, cell.mode, ms, 12.0))
    return results


def test_summary_table_reports_tflops_ratios_and_skips():
    table = gpu_bench.summary_table(synthetic_results())
    lines = table.splitlines()
    assert lines[0].startswith("| dtype | D | mode | N | SDPA flash (floor) | triton ALiBi | triton RoPE |")
    case = gpu_bench.plan_case("alibi", "bfloat16", 128, 1024)
    floor_tflops = attention_flops(case, "fwd") / 1e-3 / 1e12
    assert f"| bf16 | 128 | fwd | 1024 | {floor_tflops:.0f} | {floor_tflops / 0.9:.0f} (0.90x) |" in table
    assert "| error |" in table and "illegal memory access" in table
    assert "ALiBi bias + SDPA not run (" in table and "GiB (> 4 GiB limit)" in table
    rows = [line for line in lines if line.startswith("| bf16") or line.startswith("| fp16")]
    assert len(rows) == len({c.row for c in CELLS})


def test_report_files_from_synthetic_results(tmp_path):
    results = synthetic_results()
    stem = str(tmp_path / "gpu_bench_test")
    env = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0"}
    gpu_bench.write_csv_header(stem + ".csv", env)
    for m in results:
        gpu_bench.append_csv_row(stem + ".csv", m, 1.0)
    gpu_bench.write_markdown(stem + ".md", results, env, gpu_bench.describe_plan(gpu_bench.build_plan()))
    with open(stem + ".csv") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert len(rows) == len(results) and rows[0]["provider"] == FLOOR and rows[0]["ratio_to_floor"] == "1.0000"
    markdown = Path(stem + ".md").read_text()
    assert markdown.startswith("# GPU kernel benchmark: NVIDIA H200") and "## Extra peak memory" in markdown
    pytest.importorskip("matplotlib")
    gpu_bench.plot(stem + ".png", results, env)
    assert Path(stem + ".png").stat().st_size > 10_000


def test_run_plan_skips_unavailable_providers_and_stops_at_the_budget(tmp_path):
    """No CUDA needed: a spent budget skips every cell, yet the CSV and markdown are written in full."""
    plan = gpu_bench.build_plan()[:1]
    messages = []
    results, interrupted = gpu_bench.run_plan(plan, {"fused:cuda": "not built"}, -1.0, str(tmp_path / "run"),
                                              {"device": "test"}, messages.append)
    assert not interrupted and len(results) == len(plan[0])
    assert all(m.skipped.startswith("time budget of -1 s") or m.skipped == c.skip for m, c in zip(results, plan[0]))
    assert messages[0] == "fused:cuda: not run, not built" and "cells left" in messages[1]
    assert len((tmp_path / "run.csv").read_text().splitlines()) == len(plan[0]) + 2  # env comment + header
    assert (tmp_path / "run.md").exists()


# ------------------------------------------------------------------------------ test_gpu.py's helpers on CPU

def small(case: Case) -> Case:
    """A CPU-sized copy of a GPU case: GQA 4:2, Nq = 72 > Nk = 64, so causal rows 0-7 see no key."""
    return replace(case, batch=2, heads_q=4, heads_kv=2, seq_q=72, seq_k=64)


@pytest.mark.parametrize("scheme", ["none", "alibi", "rope", "rope_yarn", "rope_partial_interleaved", "relative"])
def test_gpu_reference_check_on_the_cpu_backend(scheme):
    """test_gpu.check_against_reference as the GPU tests use it, on small CPU cases (fp32, dLSE included)."""
    import test_gpu

    case = small(test_gpu.causal_case(scheme, 128 if scheme == "rope_partial_interleaved" else 64, 1024))
    test_gpu.check_against_reference(case, torch.float32, "cpu", lse_grad=True, device="cpu")


def test_gpu_reference_check_catches_an_ignored_lse_gradient(monkeypatch):
    """The dLSE comparison has teeth: a backend that drops grad_lse fails it."""
    import test_gpu
    from fused_pos_attn.backends import cpu_backend

    backward = cpu_backend.backward
    monkeypatch.setattr(cpu_backend, "backward", lambda grad_out, grad_lse, *rest: backward(grad_out, None, *rest))
    case = small(test_gpu.causal_case("alibi", 64, 64))
    test_gpu.check_against_reference(case, torch.float32, "cpu", device="cpu")  # no dLSE: still passes
    with pytest.raises(AssertionError, match="dq backend=cpu"):
        test_gpu.check_against_reference(case, torch.float32, "cpu", lse_grad=True, device="cpu")


def test_decode_bench_rows_with_and_without_the_cuda_provider(monkeypatch):
    """bench/decode.py's run / table / CSV cells: a row without the CUDA C++ provider shows "-", one with it (as
    on a GPU with the CUDA kernels built) its time; both through the same code as a real run (tiny sizes, CPU)."""
    import decode  # bench/decode.py

    args = decode.parse_args(["--device", "cpu", "--pos", "rope", "--kv-heads", "2", "--q-rows", "1", "--keys",
                              "64", "--rounds", "1", "--calls", "1"])
    plain = decode.run(args)[0]
    real_providers = decode.providers

    def with_cuda(*a):
        steps = real_providers(*a)
        steps["cuda"] = steps["fused"]  # stands in for backend="cuda"
        return steps

    monkeypatch.setattr(decode, "providers", with_cuda)
    both = decode.run(args)[0]
    table = decode.markdown_table([plain, both], torch.float32)
    lines = table.splitlines()
    assert lines[2].endswith("| - | - |") and not lines[3].endswith("| - | - |")
    assert both["cuda"] > 0 and decode.kv_tb_s(both, torch.float32, "cuda") > 0
