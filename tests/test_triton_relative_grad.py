"""The Triton backend's T5 bucket-table gradient: per-bucket register sums in the dK/dV kernel, one partial row
per (key block, batch, query head), summed by the launcher. Against the dense fp64 reference (DESIGN.md
tolerance rule) at the interpreter tile and at each dK/dV tile shape the GPU configs use, bit-for-bit
deterministic, skipped when the table needs no gradient, and refused past the register limit.

Runs under TRITON_INTERPRET=1 without CUDA (tests/conftest.py); shapes stay small.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from fused_pos_attn import RelativeBias, fused_attention  # noqa: E402
from fused_pos_attn.backends import triton_backend  # noqa: E402
from fused_pos_attn.spec import AttentionSpec  # noqa: E402
from fused_pos_attn.triton_kernels import MAX_GRAD_BUCKETS, launch  # noqa: E402
from tolerance import assert_close_to_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _table_grads(backend, dtype, heads=2, kv_heads=1, seq_q=23, seq_k=40, num_buckets=16, max_distance=12,
                 bidirectional=None, seed=0, **kwargs):
    """(dq, dk, dv, d_table) of sum(out * g) through fused_attention with a RelativeBias table of Hq rows."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq_q, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, seq_k, 16, generator=gen) for _ in range(2))
    g = torch.randn(q.shape, generator=gen)
    table = torch.randn(heads, num_buckets, generator=gen).requires_grad_()
    device = "cpu" if backend == "reference" else DEVICE
    leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    out = fused_attention(*leaves, RelativeBias(table, max_distance, bidirectional), backend=backend, **kwargs)
    (out * g.to(device, out.dtype)).sum().backward()
    return (*(t.grad for t in leaves), table.grad)


def _check(dtype=torch.float32, **case):
    fused = _table_grads("triton", dtype, **case)
    ref64, same = _table_grads("reference", torch.float64, **case), _table_grads("reference", dtype, **case)
    for name, got, want, same_dtype in zip(("dq", "dk", "dv", "d_table"), fused, ref64, same):
        assert_close_to_reference(got.cpu(), want, same_dtype, 3.0, f"{name} {case}", dtype)


CASES = {
    "bidirectional": dict(),
    "causal_buckets": dict(causal=True, num_buckets=8, max_distance=5, bidirectional=False),
    "causal_bidirectional_window": dict(causal=True, bidirectional=True, window=9),
    "offsets_gqa4": dict(heads=4, kv_heads=1, q_offset=torch.tensor([30, 2]), k_offset=torch.tensor([0, 25])),
    "far_beyond_max_distance": dict(q_offset=500, k_offset=0, max_distance=20, num_buckets=32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_table_gradient_matches_reference(case):
    _check(**CASES[case])


def test_table_gradient_fp16():
    _check(torch.float16, causal=True)


@pytest.mark.parametrize("block_m,block_n", [(64, 16), (32, 32), (16, 32)])  # the dK/dV configs' tiles
def test_table_gradient_at_gpu_tile_shapes(monkeypatch, block_m, block_n):
    """Tiles whose distance range spans many buckets, one bucket, and both sides of rel = 0, at each tile the
    dK/dV kernel is autotuned over on a GPU (the skew and diagonal count change with it)."""
    monkeypatch.setattr(launch, "INTERPRETER_CONFIG", triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}))
    _check(seq_q=40, seq_k=70, q_offset=5, k_offset=0, max_distance=40, num_buckets=32)


def _backend_call(rel_grad, num_buckets=16):
    gen = torch.Generator().manual_seed(3)
    q, grad_out = (torch.randn(1, 2, 37, 16, generator=gen).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(1, 2, 45, 16, generator=gen).to(DEVICE) for _ in range(2))
    position = RelativeBias(torch.randn(2, num_buckets, generator=gen), max_distance=num_buckets).resolve(
        1, 2, 16, 45, torch.device(DEVICE))
    spec = AttentionSpec(causal=False, scale=0.25, window=None, q_offset=torch.tensor([8], device=DEVICE),
                         k_offset=torch.tensor([0], device=DEVICE), position=position)
    out, lse = triton_backend.forward(q, k, v, spec)
    return triton_backend.backward(grad_out, None, q, k, v, out, lse, spec, rel_grad)


def test_table_gradient_is_deterministic():
    first, second = _backend_call(True), _backend_call(True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[3].shape == (2, 16) and first[3].dtype == torch.float32 and first[3].abs().sum() > 0


def test_no_table_gradient_when_not_needed():
    """rel_grad False: no table gradient and the other gradients bit-for-bit those of the rel_grad run (the kernels'
    table work is off: test_triton_launch checks REL_GRAD is False and no partial buffer is passed)."""
    with_table, without = _backend_call(True), _backend_call(False)
    assert without[3] is None
    assert all(torch.equal(a, b) for a, b in zip(with_table[:3], without[:3]))


def test_too_many_buckets_for_the_gradient_is_refused():
    with pytest.raises(ValueError, match=rf"num_buckets=256 .*num_buckets <= {MAX_GRAD_BUCKETS}"):
        _backend_call(True, num_buckets=256)
    assert _backend_call(False, num_buckets=256)[3] is None  # without a table gradient any bucket count runs
