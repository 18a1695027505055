"""pytest-benchmark view of the kernel timings: provider x pos x mode at one small N.

Run with `make bench` (python -m pytest bench/ --benchmark-only); never part of `make test`. The same
providers and steps as bench/kernels.py; each forward output is also checked against the fp64 reference,
since timing a wrong result is worthless. Memory is not measured here (see bench/kernels.py).
"""
import pytest
import torch

from fused_pos_attn import fused_attention
from fused_pos_attn.benchmarking import (MODES, POSITIONS, build_provider, is_optional, make_inputs, make_step,
                                         plan, position_scheme, provider_names)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "float16" if DEVICE == "cuda" else "float32"
SEQ_LEN = 512
TOLERANCE = {"float16": 2e-3, "float32": 1e-4}  # max abs error vs fp64, outputs of scale ~1

JOBS = [(provider, case, mode)
        for provider, case, modes in plan(provider_names(DEVICE), POSITIONS, (SEQ_LEN,), MODES, None,
                                          device=DEVICE, dtype=DTYPE)
        for mode in modes]


@pytest.mark.parametrize("provider, case, mode", JOBS,
                         ids=[f"{p}-{c.pos}-{m}-N{c.seq_len}" for p, c, m in JOBS])
def test_kernel(benchmark, provider, case, mode):
    benchmark.group = f"{case.pos} {mode} N={case.seq_len}"
    inputs = make_inputs(case, requires_grad=mode != "fwd")
    try:
        fn = build_provider(provider, case)
        step = make_step(fn, mode, inputs)
        step()  # compiles / autotunes outside the measured rounds
    except Exception as err:  # noqa: BLE001  optional providers are skipped with their error
        if not is_optional(provider):
            raise
        pytest.skip(f"{provider}: {type(err).__name__}: {err}")
    result = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    if mode == "fwd":
        q, k, v = (t.double() for t in inputs[:3])
        expected = fused_attention(q, k, v, pos=position_scheme(case.pos, case.heads), causal=case.causal,
                                   backend="reference")
        torch.testing.assert_close(result.double(), expected, atol=TOLERANCE[case.dtype], rtol=0)
