#!/usr/bin/env bash
# make gpu-check: the one command to run first on a CUDA machine. It needs no network and installs nothing
# from an index: it uses the python, torch, triton and nvcc already there (written for the GPU machines this
# project gets: Python 3.12, torch 2.11 + CUDA 13, triton 3.6, nvcc 13, pytest-xdist, which spreads the tests'
# Triton compilation over the CPU cores). The stage times below are estimates: no GPU has run this yet.
#
# What you see, with the time each stage should take on one H100 / H200 and a 16-core host:
#   [hh:mm:ss +  0s] preflight: python, torch, triton, nvcc, GPU name and compute capability    ~5-10 s
#   [hh:mm:ss + 10s] build: pip install --no-build-isolation --no-deps --no-index -e . with the
#                    CUDA C++ kernels for this GPU's arch only (FUSED_POS_ATTN_CUDA_ARCHS=90 on
#                    sm_90); output in gpu_build_<device>.log, "build: ok (cpu+cuda)"             ~1-2 min
#                    If the CUDA build fails, its last lines are shown, the package is built
#                    without CUDA (FUSED_POS_ATTN_CUDA=0) so the Triton part still runs, and
#                    the check ends FAILED.
#   [hh:mm:ss +100s] tests: pytest -m gpu over tests/ (tests/test_gpu.py, the CUDA C++ backend
#                    tests, the large-shape and 16k-memory tests), one progress line every
#                    20 s ("tests: 312 passed, 0 failed, 2 skipped so far"), then pytest's
#                    summary of failures and skips; full log in gpu_tests_<device>.log   ~2.5-3.5 min
#   [hh:mm:ss +300s] check: python -m fused_pos_attn check --no-bench, a PASS/FAIL table per
#                    kernel backend (triton, cuda) and position scheme                             ~20 s
#   [hh:mm:ss +320s] varlen: bench/varlen.py --device cuda: 16 packed documents of 64..2048 tokens,
#                    bf16, ALiBi and RoPE, fwd and fwd+bwd, against per-document calls, padding
#                    and SDPA with a dense block-diagonal mask (time and peak memory)              ~30 s
#   [hh:mm:ss +350s] hf: bench/hf_models.py --device cuda: a training step of a Llama-style and a
#                    BLOOM-style transformers model (2 layers) patched by fused_pos_attn.hf against
#                    the same model on eager and SDPA attention, N = 1k..4k, bf16 (skipped with a
#                    note when transformers is not installed)                                       ~30 s
#   [hh:mm:ss +380s] decode: bench/decode.py --device cuda: one-token decode over 4k and 32k keys, bf16,
#                    RoPE / ALiBi / none, MHA and GQA 8 / 2: the split-KV Triton forward (contiguous and
#                    paged cache) against SDPA over a pre-rotated cache, with the K/V read rate in
#                    TB/s (H200: 4.8 TB/s peak); the table is in the log                              ~20 s
#   [hh:mm:ss +380s] bench: bench/gpu_bench.py, one line per measured cell ("bf16 D=128 N=4096
#                    fwd triton ALiBi: 0.812 ms, 338 TFLOP/s, 0.97x floor, 2 MiB"), then one
#                    summary table (TFLOP/s and time ratio to SDPA flash per cell)          ~2-2.5 min
#   the stage table (ok / FAILED / TIMEOUT, seconds), the result files, and "gpu-check: PASSED" or
#   "gpu-check: FAILED (...)".
# Every stage is limited so that the whole run ends within GPU_CHECK_BUDGET_S (default 460 s, under 8 min):
# the tests get what the build left minus 90 s, the benchmark what is left after the check, and it starts no
# cell after its budget (later cells are reported as skipped; the plan runs bf16 first). Only a build that
# runs into its own 4-minute cap (and then a retry) can push the total past the budget.
#
# Results, in bench/results (GPU_CHECK_RESULTS_DIR), <device> from torch.cuda.get_device_name (nvidia-h100-...):
#   gpu_check_<device>.md (stage table, versions, failures), gpu_check_<device>.log (all of the above),
#   gpu_build_<device>.log, gpu_tests_<device>.log, gpu_tests_<device>.xml (JUnit),
#   gpu_bench_<device>.md / .csv / .png, varlen_cuda_<device>.md / .csv, hf_models_cuda_<device>.md / .csv,
#   decode_cuda_<device>.md / .csv (its table also in the log, which comes back through $OUT). Each is
#   written as its stage ends (the CSV cell by cell); when $OUT is set they are also copied there after every
#   stage (8 files at most: all but the JUnit XML and the CSVs, whose numbers the .md files have).
# Exit status: 0 every stage passed; 1 a stage failed or timed out; 2 no CUDA device: a dry run that prints
# the commands and the benchmark plan and builds, tests and measures nothing (also with GPU_CHECK_DRY_RUN=1).
# Knobs: PY (interpreter; default the first of python3, python that imports torch), GPU_CHECK_BUDGET_S,
# GPU_CHECK_WORKERS (pytest-xdist workers, default min(cores, 12)), GPU_CHECK_RESULTS_DIR, GPU_CHECK_DRY_RUN.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1
T0=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
RESULTS=${GPU_CHECK_RESULTS_DIR:-bench/results}
CORES=$(nproc 2>/dev/null || echo 4)
WORKERS=${GPU_CHECK_WORKERS:-$(( CORES < 12 ? CORES : 12 ))}
TESTS_MAX_S=330      # the tests' own cap; they get less when the build was slow
TESTS_LEAVE_S=90     # left for the check and the benchmark when the tests start
CHECK_MAX_S=60
VARLEN_MAX_S=45
HF_MAX_S=40
DECODE_MAX_S=30
BENCH_MIN_S=60
BUILD_MAX_S=240
MAIN_LOG=/dev/null   # set once the device is known
STAGES=()            # "stage|status|seconds|details"
FAILED=()

say() { printf '[%s +%3ds] %s\n' "$(date +%H:%M:%S)" $(( SECONDS - T0 )) "$*" | tee -a "$MAIN_LOG"; }
left() { echo $(( BUDGET_S - (SECONDS - T0) )); }
clamp() { local v=$1 lo=$2 hi=$3; (( v < lo )) && v=$lo; (( v > hi )) && v=$hi; echo "$v"; }
quoted() { local IFS=' '; echo "$*"; }  # a command line, for the log

# ---------------------------------------------------------------------------------------------- preflight
# Shell assignments from python: versions, CUDA availability, the GPU's name, arch and file-name slug, and
# whether the pytest plugins are there. Prints nothing where torch cannot be imported.
probe() {
    "$1" - <<'EOF' 2>/dev/null
import importlib.metadata, importlib.util, re, shlex
import torch
info = {"TORCH": f"{torch.__version__} (CUDA {torch.version.cuda})", "TRITON": "not installed", "HAS_CUDA": "0",
        "NO_CUDA_WHY": f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)",
        "HAS_XDIST": str(int(importlib.util.find_spec("xdist") is not None)), "XDIST_DIST": "load",
        "HAS_TIMEOUT_PLUGIN": str(int(importlib.util.find_spec("pytest_timeout") is not None))}
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    info.update(HAS_CUDA="1", NO_CUDA_WHY="", GPU_NAME=name, ARCH=f"{major}{minor}",
                GPU_COUNT=str(torch.cuda.device_count()),
                SLUG=re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))  # = fused_pos_attn.benchmarking.slug
try:
    import triton
    info["TRITON"] = triton.__version__
except Exception:  # noqa: BLE001
    pass
try:  # worksteal (3.2+) hands each worker a contiguous run of tests: neighbours share Triton compilations
    if tuple(int(x) for x in importlib.metadata.version("pytest-xdist").split(".")[:2]) >= (3, 2):
        info["XDIST_DIST"] = "worksteal"
except Exception:  # noqa: BLE001
    pass
for key, value in info.items():
    print(f"{key}={shlex.quote(value)}")
EOF
}
TORCH="not importable"; TRITON="not installed"; HAS_CUDA=0; GPU_NAME=""; ARCH=""; GPU_COUNT=0; SLUG=""
HAS_XDIST=0; XDIST_DIST=load; HAS_TIMEOUT_PLUGIN=0
NO_CUDA_WHY="no python among ${PY:-} python3 python can import torch"
for candidate in ${PY:-} python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && assignments=$(probe "$candidate") && [[ -n "$assignments" ]]; then
        eval "$assignments"
        PY=$candidate
        break
    fi
done
PY=${PY:-python3}
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 && "$HAS_CUDA" == 1 ]]; then
    HAS_CUDA=0
    NO_CUDA_WHY="GPU_CHECK_DRY_RUN=1"
fi
NVCC=$(command -v nvcc 2>/dev/null || true)
if [[ -z "$NVCC" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; fi
NVCC_VERSION="not found"
if [[ -n "$NVCC" ]]; then NVCC_VERSION=$("$NVCC" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo unknown); fi

# ---------------------------------------------------------------------------------------------- commands
set_build_cmd() {  # BUILD_CMD with ($1 = 1) or without ($1 = 0) the CUDA C++ kernels, for this GPU's arch only
    BUILD_CMD=(env FUSED_POS_ATTN_CUDA="$1" FUSED_POS_ATTN_CUDA_ARCHS="${ARCH:-<cc>}"
               MAX_JOBS="$CORES" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
}
set_build_cmd 1
TEST_LOG="$RESULTS/gpu_tests_${SLUG:-<device>}.log"
TEST_XML="$RESULTS/gpu_tests_${SLUG:-<device>}.xml"
TEST_CMD=("$PY" -m pytest -m gpu tests -v -rfEs --durations=25 --junitxml="$TEST_XML")
if [[ "$HAS_XDIST" == 1 ]]; then TEST_CMD+=(-n "$WORKERS" --dist "$XDIST_DIST"); fi
if [[ "$HAS_TIMEOUT_PLUGIN" == 1 ]]; then TEST_CMD+=(--timeout=240); fi
CHECK_CMD=("$PY" -m fused_pos_attn check --no-bench)
BENCH_CMD=("$PY" bench/gpu_bench.py --out-dir "$RESULTS")
VARLEN_CMD=("$PY" bench/varlen.py --device cuda --rounds 2 --min-time 0.1 --out-dir "$RESULTS")
HF_CMD=("$PY" bench/hf_models.py --device cuda --rounds 1 --min-time 0.2 --out-dir "$RESULTS")
DECODE_CMD=("$PY" bench/decode.py --device cuda --rounds 2 --calls 10 --q-rows 1 --keys 4096 32768 --out-dir "$RESULTS")

# ---------------------------------------------------------------------------------------------- dry run
if [[ "$HAS_CUDA" != 1 ]]; then
    echo "gpu-check DRY RUN: $NO_CUDA_WHY."
    echo "Nothing is built, tested or measured here. On a CUDA machine (python $PY, torch $TORCH, triton $TRITON,"
    echo "nvcc $NVCC_VERSION here) \`make gpu-check\` runs, within GPU_CHECK_BUDGET_S=$BUDGET_S s:"
    echo "  1. build:  $(quoted "${BUILD_CMD[@]}")"
    echo "             (<cc>: the GPU's compute capability, e.g. 90 on an H100; if the build fails, the same with"
    echo "             FUSED_POS_ATTN_CUDA=0, so that the Triton part still runs)"
    echo "  2. tests:  $(quoted "${TEST_CMD[@]}") > $TEST_LOG"
    [[ "$HAS_XDIST" == 1 ]] || echo "             (pytest-xdist is not installed here: without it the tests run on one core)"
    echo "  3. check:  $(quoted "${CHECK_CMD[@]}")"
    echo "  4. varlen: $(quoted "${VARLEN_CMD[@]}")"
    echo "  5. hf:     $(quoted "${HF_CMD[@]}") (when transformers is installed)"
    echo "  6. decode: $(quoted "${DECODE_CMD[@]}")"
    echo "  7. bench:  $(quoted "${BENCH_CMD[@]}") --budget-s <seconds left>"
    echo "The benchmark plan (bench/gpu_bench.py --dry-run):"
    "$PY" bench/gpu_bench.py --dry-run || echo "(the plan could not be built: is fused_pos_attn importable by $PY?)"
    echo
    echo "gpu-check: no CUDA device ($NO_CUDA_WHY): this was a dry run, exit status 2."
    echo "Run \`make gpu-check\` on a machine with an NVIDIA GPU (sm_80 or newer) to build, test and benchmark."
    exit 2
fi

# ---------------------------------------------------------------------------------------------- stages
mkdir -p "$RESULTS"
MAIN_LOG="$RESULTS/gpu_check_${SLUG}.log"
BUILD_LOG="$RESULTS/gpu_build_${SLUG}.log"
SUMMARY="$RESULTS/gpu_check_${SLUG}.md"
: > "$MAIN_LOG"
rm -f "$BUILD_LOG" "$TEST_LOG" "$TEST_XML" "$RESULTS"/gpu_bench_"$SLUG".* "$RESULTS"/varlen_cuda_"$SLUG".* \
      "$RESULTS"/hf_models_cuda_"$SLUG".* "$RESULTS"/decode_cuda_"$SLUG".*  # no stale results

publish() {  # copy this run's result files to $OUT (the device tool's return folder) when it is set
    [[ -n "${OUT:-}" && -d "${OUT:-}" ]] || return 0
    local f
    for f in "$RESULTS"/gpu_check_"$SLUG".* "$RESULTS"/gpu_build_"$SLUG".log "$TEST_LOG" \
             "$RESULTS"/gpu_bench_"$SLUG".md "$RESULTS"/gpu_bench_"$SLUG".png "$RESULTS"/varlen_cuda_"$SLUG".md \
             "$RESULTS"/hf_models_cuda_"$SLUG".md; do
        [[ -f "$f" ]] && cp -f "$f" "$OUT/"
    done
    return 0
}

write_summary() {  # $1: overall result line
    {
        echo "# make gpu-check: $GPU_NAME"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "- GPU: $GPU_NAME (sm_$ARCH, $GPU_COUNT visible), driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
        echo "- python $("$PY" -c 'import platform; print(platform.python_version())') ($PY), torch $TORCH, triton $TRITON, nvcc $NVCC_VERSION"
        echo "- host: $CORES cores; pytest-xdist workers: $([[ $HAS_XDIST == 1 ]] && echo "$WORKERS" || echo "none (not installed)")"
        echo
        echo "| stage | status | seconds | details |"
        echo "|---|---|---:|---|"
        local row
        for row in "${STAGES[@]}"; do echo "| ${row//|/ | } |"; done
        echo
        echo "$1"
        if [[ -f "$TEST_LOG" ]] && grep -q "^FAILED\|^ERROR" "$TEST_LOG"; then
            echo
            echo "## Failed tests (first 40; full log: $(basename "$TEST_LOG"))"
            echo
            echo '```'
            grep "^FAILED\|^ERROR" "$TEST_LOG" | head -40
            echo '```'
        fi
    } > "$SUMMARY"
}

record() {  # stage, status, started-at seconds, details
    local elapsed=$(( SECONDS - $3 ))
    STAGES+=("$1|$2|$elapsed|$4")
    [[ "$2" == ok || "$2" == skipped ]] || FAILED+=("$1")
    say "$1: $2 in ${elapsed} s${4:+ ($4)}"
    write_summary "(running)"
    publish
}

status_of() {  # exit code of a `timeout` command -> ok / TIMEOUT / FAILED (rc N)
    case "$1" in
        0) echo ok ;;
        124|137) echo TIMEOUT ;;
        *) echo "FAILED (rc $1)" ;;
    esac
}

trap 'say "gpu-check: interrupted"; write_summary "gpu-check: INTERRUPTED after $(( SECONDS - T0 )) s"; publish; exit 130' INT TERM
say "preflight: python $PY, torch $TORCH, triton $TRITON, nvcc $NVCC_VERSION ($NVCC)"
say "preflight: GPU $GPU_NAME, compute capability sm_$ARCH, $GPU_COUNT visible, $CORES CPU cores; budget $BUDGET_S s"

# 1. build: the CUDA C++ kernels for this arch only; on failure without them, so the Triton part still runs.
start=$SECONDS
say "build: $(quoted "${BUILD_CMD[@]}") > $BUILD_LOG"
timeout --foreground "$BUILD_MAX_S" "${BUILD_CMD[@]}" > "$BUILD_LOG" 2>&1
rc=$?
BUILD_INFO=$("$PY" -c "import torch, fused_pos_attn._C; print(torch.ops.fused_pos_attn.build_info())" 2>&1 | tail -1)
if [[ $rc == 0 && "$BUILD_INFO" == "cpu+cuda" ]]; then
    record build ok "$start" "extension $BUILD_INFO, sm_$ARCH; $(basename "$BUILD_LOG")"
else
    say "build: the CUDA C++ build failed ($(status_of $rc), build_info: $BUILD_INFO); its last lines:"
    tail -n 25 "$BUILD_LOG" | sed 's/^/    /' | tee -a "$MAIN_LOG"
    set_build_cmd 0
    say "build: again without the CUDA C++ kernels, so that the Triton part runs: $(quoted "${BUILD_CMD[@]}")"
    echo "===== retry without the CUDA C++ kernels =====" >> "$BUILD_LOG"
    timeout --foreground "$(clamp $(( $(left) - 200 )) 60 180)" "${BUILD_CMD[@]}" >> "$BUILD_LOG" 2>&1
    retry=$?
    record build "FAILED: CUDA C++ $(status_of $rc)" "$start" \
        "retry without CUDA C++: $(status_of $retry); backend='cuda' tests skip; $(basename "$BUILD_LOG")"
fi

# 2. tests: pytest -m gpu (SIGINT at the limit: pytest still prints its summary), a progress line every 20 s.
count() { grep -c " $1 " "$TEST_LOG" 2>/dev/null; }  # pytest -v marks each test " PASSED " etc.
start=$SECONDS
limit=$(clamp $(( $(left) - TESTS_LEAVE_S )) 60 "$TESTS_MAX_S")
say "tests: $(quoted "${TEST_CMD[@]}") > $TEST_LOG (limit $limit s)"
[[ "$HAS_XDIST" == 1 ]] || say "tests: pytest-xdist is not installed, so the tests run on one core and may hit the limit"
: > "$TEST_LOG"
( ticks=0; while sleep 1; do  # one-second sleeps: once killed, nothing of it outlives the stage by more
    (( ++ticks % 20 )) || say "tests: $(count PASSED) passed, $(count FAILED) failed, $(count ERROR) errors, $(count SKIPPED) skipped so far"
done ) &
progress=$!
timeout --foreground --signal=INT --kill-after=30 "$limit" "${TEST_CMD[@]}" > "$TEST_LOG" 2>&1
rc=$?
kill "$progress" 2>/dev/null
wait "$progress" 2>/dev/null
sed -n '/short test summary info/,$p' "$TEST_LOG" | head -60 | tee -a "$MAIN_LOG"
totals=$(tail -n 1 "$TEST_LOG" | tr -d '=' | sed 's/^ *//; s/ *$//')
if [[ $rc == 124 || $rc == 137 ]]; then totals="stopped at the $limit s limit after $(count PASSED) passed, $(count FAILED) failed"; fi
record tests "$(status_of $rc)" "$start" "$totals; $(basename "$TEST_LOG")"

# 3. the self-check, every kernel backend built here (its Triton kernels are cached by the tests).
start=$SECONDS
limit=$(clamp $(( $(left) - BENCH_MIN_S )) 20 "$CHECK_MAX_S")
say "check: $(quoted "${CHECK_CMD[@]}") (limit $limit s)"
timeout --foreground "$limit" "${CHECK_CMD[@]}" 2>&1 | tee -a "$MAIN_LOG"
rc=${PIPESTATUS[0]}
record check "$(status_of "$rc")" "$start" "python -m fused_pos_attn check"

# A benchmark stage capped at min(what the final benchmark leaves, its own cap): $1 name, $2 cap in seconds,
# $3 the result files for the stage table, then the command.
capped_stage() {
    local name=$1 cap=$2 files=$3 stage_start=$SECONDS stage_limit
    shift 3
    stage_limit=$(clamp $(( $(left) - BENCH_MIN_S )) 15 "$cap")
    say "$name: $(quoted "$@") (limit $stage_limit s)"
    timeout --foreground --kill-after=10 "$stage_limit" "$@" 2>&1 | tee -a "$MAIN_LOG"
    record "$name" "$(status_of "${PIPESTATUS[0]}")" "$stage_start" "$files"
}

# 4. packed sequences (bench/varlen.py): its table reports what it measured.
capped_stage varlen "$VARLEN_MAX_S" "varlen_cuda_$SLUG.md, .csv" "${VARLEN_CMD[@]}"

# 5. Hugging Face models patched by fused_pos_attn.hf (bench/hf_models.py); only where transformers is.
if "$PY" -c "import transformers" 2>/dev/null; then
    capped_stage hf "$HF_MAX_S" "hf_models_cuda_$SLUG.md, .csv" "${HF_CMD[@]}"
else
    say "hf: skipped (transformers is not installed for $PY)"
    record hf skipped "$SECONDS" "transformers is not installed"
fi

# 6. split-KV decode (bench/decode.py): its table (with the K/V read rate) goes to the log.
capped_stage decode "$DECODE_MAX_S" "decode_cuda_$SLUG.md, .csv" "${DECODE_CMD[@]}"

# 7. the benchmark plan, with what is left of the budget.
start=$SECONDS
limit=$(( $(left) > BENCH_MIN_S ? $(left) : BENCH_MIN_S ))
say "bench: $(quoted "${BENCH_CMD[@]}") --budget-s $(( limit - 25 )) (limit $limit s)"
timeout --foreground --kill-after=15 "$limit" "${BENCH_CMD[@]}" --budget-s $(( limit - 25 )) 2>&1 | tee -a "$MAIN_LOG"
rc=${PIPESTATUS[0]}
record bench "$(status_of "$rc")" "$start" "gpu_bench_$SLUG.md, .csv, .png"

if (( ${#FAILED[@]} )); then
    result="gpu-check: FAILED (${FAILED[*]}) in $(( SECONDS - T0 )) s"
else
    result="gpu-check: PASSED in $(( SECONDS - T0 )) s"
fi
write_summary "$result"
outputs=("$RESULTS"/gpu_*_"$SLUG".*)
say "results: ${outputs[*]}"
sed -n '/^| stage/,/^$/p' "$SUMMARY" | tee -a "$MAIN_LOG"
say "$result"
publish
(( ${#FAILED[@]} )) && exit 1
exit 0
