# Every target installs what it needs first. torch is pinned because an unpinned or ranged torch pulls a
# multi-GB CUDA build on machines without one; on a GPU machine install the CUDA torch first and it is kept.
PY ?= python
PIP := $(PY) -m pip install -q
TORCH_PIN := torch==2.13.0
TRITON_PIN := triton==3.9.0
PY_DEPS := ninja numpy pytest hypothesis pytest-benchmark matplotlib psutil tqdm transformers==5.23.0
DEPS_STAMP := build/.deps
BUILD_STAMP := build/.installed
EXT_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h \
               csrc/include/fused_pos_attn/*.h)

.PHONY: install demo test static-check bench

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
	$(PY) -m pytest -q tests

static-check: install
	$(PY) -m pytest -q -s -m static tests/test_static_gpu.py

bench: install
	$(PY) bench/kernels.py
	$(PY) -m pytest -q bench --benchmark-only
