# Every target installs what it needs first. torch is pinned because an unpinned or ranged torch pulls a
# multi-GB CUDA build on machines without one; on a GPU machine install the CUDA torch first and it is kept.
# The pins are the CI environment; pyproject.toml declares the supported ranges (torch 2.11-2.13, triton 3.6-3.9).
PY ?= python
PIP := $(PY) -m pip install -q
TORCH_PIN := torch==2.13.0
TRITON_PIN := triton==3.9.0
COMPAT_TRITON_PIN := triton==3.6.0
# setuptools 70.1+ builds wheels without the `wheel` package; build: tests/test_packaging.py builds the sdist.
PY_DEPS := 'setuptools>=70.1' ninja numpy pytest hypothesis pytest-benchmark matplotlib tqdm transformers==5.23.0 build
DEPS_STAMP := build/.deps
BUILD_STAMP := build/.installed
EXT_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu \
               csrc/cuda/*.cuh csrc/cuda/*.h csrc/include/fused_pos_attn/*.h)
# What `make test` / `make test-compat` run, e.g. make test-compat TESTS="tests/test_alibi_hf.py -k slopes"
TESTS ?= tests

# The oldest supported Triton (the GPU machines' 3.6) with the CPU torch, in its own venv.
COMPAT_VENV := build/venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_DEPS_STAMP := $(COMPAT_VENV)/.deps
COMPAT_BUILD_STAMP := $(COMPAT_VENV)/.installed

# Tests write result files (bench/results/*.md) only when this is set: `make test` leaves tracked files alone.
WRITE_RESULTS := FUSED_POS_ATTN_WRITE_RESULTS=1

.PHONY: install demo test test-compat static-check static-check-full cuda-check gpu-check sdist bench

# Python dependencies: reinstalled when this file (their pins) changes.
$(DEPS_STAMP): Makefile
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) $(TORCH_PIN)
	@$(PY) -c "import triton" 2>/dev/null || $(PIP) $(TRITON_PIN)
	$(PIP) $(PY_DEPS)
	@mkdir -p build && touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	MAX_JOBS=2 $(PIP) --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

install: $(BUILD_STAMP)

demo: install
	$(PY) -m fused_pos_attn check

test: install
	$(PY) -m pytest -q $(TESTS)

# Both interpreters are the same Python with the same torch, so the in-place extension either one builds
# serves both.
$(COMPAT_DEPS_STAMP): Makefile
	@test -x $(COMPAT_PY) || $(PY) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q $(TORCH_PIN) $(COMPAT_TRITON_PIN) $(PY_DEPS)
	@touch $@

$(COMPAT_BUILD_STAMP): $(COMPAT_DEPS_STAMP) $(EXT_SOURCES)
	MAX_JOBS=2 $(COMPAT_PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

test-compat: $(COMPAT_BUILD_STAMP)
	$(COMPAT_PY) -m pytest -q $(TESTS)

# Rewrites bench/results/static_check.md (static_check_full.md).
static-check: install
	$(WRITE_RESULTS) $(PY) -m pytest -q -s -m static tests/test_static_gpu.py

static-check-full: install
	$(WRITE_RESULTS) STATIC_CHECK_FULL=1 $(PY) -m pytest -q -s -m static tests/test_static_gpu.py

# nvcc compile of csrc/cuda for sm_80/sm_90 without a GPU; rewrites bench/results/cuda_static_check.md.
cuda-check: $(DEPS_STAMP)
	$(WRITE_RESULTS) $(PY) -m pytest -q -s tests/test_cuda_compile.py

# On a CUDA machine with no network: uses the torch / triton / nvcc already there, installs nothing from an
# index. The script picks its interpreter itself unless PY is given (make gpu-check PY=python3.12).
gpu-check:
	$(if $(filter command line environment,$(origin PY)),PY=$(PY) )bash bench/gpu_check.sh

# dist/fused_pos_attn-<version>.tar.gz. A stale egg-info's SOURCES.txt would add the files it lists: start clean.
sdist: $(DEPS_STAMP)
	rm -rf fused_pos_attn.egg-info
	$(PY) -m build --sdist --no-isolation --outdir dist .

bench: install
	$(PY) bench/kernels.py
	$(PY) bench/hf_models.py
	$(PY) -m pytest -q bench --benchmark-only
