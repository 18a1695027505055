"""Packed (varlen) sequences in the Triton kernels: the same four kernels with VARLEN addressing, called through
the Triton backend with a packed AttentionSpec (q (1, Hq, total_q, D), k / v (1, Hkv, total_k, D), cu_seqlens).

Oracle: the same backend's dense call on each sequence alone (and, once, the dense reference), for out, lse, dq,
dk, dv with a gradient into lse, and the relative table's gradient (the sum of the sequences'). Sequences of
length 0 and 1, longer than a 16 x 16 tile, with no keys (out 0, lse -inf, zero gradients) and with no queries
(zero dk, dv); every scheme, causal or not, windows, GQA, non-contiguous packed views; each block shape of the
shipped GPU configs; and cu_seqlens / max_seqlen that are garbage, which must never make a kernel read or write
outside its tensors.

Out-of-bounds accesses: under the interpreter every load and store goes through two functions of Triton's
interpreter module (_interpreter.load / store); the checked_launches fixture routes them through a check that each
address a kernel touches (where its mask is on) lies inside one of the tensors passed to that launch, and fails
the launch before the access otherwise (so nothing segfaults). test_bounds_check_catches_an_out_of_bounds_read
shows it does. The fixture also fills the launchers' output buffers with NaN, so a row no kernel writes shows.

Runs under TRITON_INTERPRET=1 without CUDA (tests/conftest.py); the shapes are small.
"""
import dataclasses
import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fused_pos_attn import ALiBi, RelativeBias, RoPE  # noqa: E402
from fused_pos_attn.backends import triton_backend  # noqa: E402
from fused_pos_attn.positions import as_position_scheme  # noqa: E402
from fused_pos_attn.reference import attention_reference  # noqa: E402
from fused_pos_attn.spec import AttentionSpec  # noqa: E402
from fused_pos_attn.triton_kernels import configs, launch  # noqa: E402
from fused_pos_attn.triton_kernels.scheme_codes import SCHEME_CODES  # noqa: E402
from test_native_varlen import Packed, alone, make_packed, run_per_sequence  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIM = 16


# ------------------------------------------------------------------------------------------- bounds checking

def _span(t: torch.Tensor):
    """[first byte, end byte) of the elements of t (strides are never negative in torch), or None if empty."""
    if t.numel() == 0:
        return None
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _CheckedMemory:
    """Stands in for the interpreter's _interpreter module: load / store check their addresses first."""

    def __init__(self, real):
        self.real, self.spans, self.kernel = real, None, None

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _check(self, kind, ptrs, mask, itemsize):
        if self.spans is None:
            return
        ptrs = np.asarray(ptrs)
        addresses = ptrs[np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)].astype(np.uint64).ravel()
        starts, ends = self.spans
        i = np.searchsorted(starts, addresses, side="right") - 1
        inside = (i >= 0) & (addresses + np.uint64(itemsize) <= ends[np.maximum(i, 0)])
        if not inside.all():
            raise AssertionError(f"{self.kernel}: {kind} of {int((~inside).sum())} of {addresses.size} elements "
                                 f"outside every tensor of the launch")

    def load(self, ptrs, mask, other, dtype):
        self._check("load", ptrs, mask, np.dtype(dtype).itemsize)
        return self.real.load(ptrs, mask, other, dtype)

    def store(self, ptrs, value, mask):
        self._check("store", ptrs, mask, np.asarray(value).dtype.itemsize)
        return self.real.store(ptrs, value, mask)


@pytest.fixture
def checked_launches(monkeypatch):
    """Every kernel launch in the test checks each address it loads or stores against its tensor arguments; and
    the floating-point buffers the launchers allocate with torch.empty / empty_like start as NaN, so an output row
    that no kernel writes shows as NaN instead of whatever memory held."""
    if not INTERPRETING:
        pytest.skip("the bounds check hooks the interpreter")
    for name in ("empty", "empty_like"):
        def poisoned(*args, _allocate=getattr(torch, name), **kwargs):
            t = _allocate(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        monkeypatch.setattr(launch.torch, name, poisoned)
    from triton.runtime import interpreter
    memory = _CheckedMemory(interpreter._interpreter)
    monkeypatch.setattr(interpreter, "_interpreter", memory)
    real_call = interpreter.GridExecutor.__call__

    def checked_call(self, *args, **kwargs):
        spans = sorted(s for s in map(_span, [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)])
                       if s is not None)
        merged = []  # the union of the spans (views of one buffer overlap) as sorted disjoint intervals
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        memory.spans = (np.array([s for s, _ in merged], dtype=np.uint64),
                        np.array([e for _, e in merged], dtype=np.uint64))
        memory.kernel = getattr(self.fn, "__name__", "kernel")
        try:
            return real_call(self, *args, **kwargs)
        finally:
            memory.spans = None

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", checked_call)
    return memory


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < 4)


def test_bounds_check_catches_an_out_of_bounds_read(checked_launches):
    """The check passes in-bounds accesses and fails the launch on the first element past a tensor's end (here
    a row of a buffer whose neighbour rows exist, so nothing would crash without it)."""
    buffer = torch.arange(32, dtype=torch.float32, device=DEVICE).view(4, 8)
    x, y = buffer[1, :4], torch.zeros(4, device=DEVICE)
    _copy_kernel[(1,)](x, y, 4, BLOCK=8)
    assert y.tolist() == [8.0, 9.0, 10.0, 11.0]
    with pytest.raises(Exception, match="load of 1 of 5 elements outside every tensor"):
        _copy_kernel[(1,)](x, y, 5, BLOCK=8)


# --------------------------------------------------------------------------------------------- packed inputs

def _packed(scheme, lengths_q, lengths_k=None, heads=2, kv_heads=1, causal=True, window=None, offsets=None,
            seed=0) -> Packed:
    """test_native_varlen.make_packed on the Triton device, at HEAD_DIM: self-attention (lengths_k None) as head
    slices of one qkv tensor, otherwise q packed and k, v slices of one (total_k, 2, Hkv, D) tensor."""
    return make_packed(scheme, lengths_q, lengths_k, heads, kv_heads, HEAD_DIM, causal=causal, window=window,
                       offsets=offsets, layout="qkv" if lengths_k is None else "packed", seed=seed, device=DEVICE)


def _run_packed(p: Packed, rel_grad: bool):
    out, lse = triton_backend.forward(p.q, p.k, p.v, p.spec)
    return (out, lse, *triton_backend.backward(p.grad_out, p.grad_lse, p.q, p.k, p.v, out, lse, p.spec, rel_grad))


NAMES = ("out", "lse", "dq", "dk", "dv", "d_table")


def _assert_matches(got, want, what=""):
    """fp32: within 1e-5 of the expected value's scale; equal infinities (lse of rows without keys) equal."""
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None or not g.abs().sum(), f"{what} {name}"
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {name}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        assert not torch.isnan(g).any(), f"{what} {name}: NaN"
        same_inf = torch.isinf(w) & (g == w)
        error = torch.where(same_inf, 0.0, (g - w).abs()).max().item() if g.numel() else 0.0
        scale = max(1.0, w[torch.isfinite(w)].abs().max().item()) if torch.isfinite(w).any() else 1.0
        assert error <= 1e-5 * scale, f"{what} {name}: max error {error:.3g} (scale {scale:.3g})"


def _relative(heads=2, num_buckets=16, max_distance=12, bidirectional=None) -> RelativeBias:
    table = torch.randn(heads, num_buckets, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    return RelativeBias(table, max_distance, bidirectional)


def _slopes(num_sequences, heads=2) -> ALiBi:
    """Per-sequence (S, Hq) slopes, all different."""
    return ALiBi(torch.rand(num_sequences, heads, generator=torch.Generator().manual_seed(6)).to(DEVICE) + 0.05)


# Self-attention lengths: empty, length 1, longer than a 16 x 16 tile (two blocks), and short ones.
LENGTHS = [5, 0, 1, 20, 3]
# Cross lengths: a sequence with queries and no keys, one with keys and no queries, one of 33 queries on 18 keys.
LENGTHS_Q, LENGTHS_K = [3, 0, 33, 1, 4], [9, 5, 18, 0, 4]

CASES = {
    "none_causal_mha": lambda: _packed(as_position_scheme("none"), LENGTHS, heads=2, kv_heads=2),
    "none_cross_window": lambda: _packed(as_position_scheme("none"), LENGTHS_Q, LENGTHS_K, causal=False, window=7),
    "alibi_slopes_per_sequence": lambda: _packed(_slopes(5), LENGTHS_Q, LENGTHS_K, causal=False),
    "alibi_causal_window_offsets": lambda: _packed(_slopes(5), LENGTHS, window=6,
                                                   offsets=([0, 4, 2, 30, 1], [3, 0, 0, 25, 0])),
    "rope_partial_interleaved": lambda: _packed(RoPE(rotary_dim=8, interleaved=True), LENGTHS_Q, LENGTHS_K),
    "rope_full_noncausal_gqa": lambda: _packed(RoPE(), LENGTHS, heads=4, kv_heads=2, causal=False, window=9),
    "relative_causal": lambda: _packed(_relative(), LENGTHS_Q, LENGTHS_K),
    "relative_bidirectional_window": lambda: _packed(_relative(), LENGTHS, causal=False, window=8,
                                                     offsets=([7, 0, 3, 1, 40], [0, 2, 0, 5, 0])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_matches_each_sequence_alone(case, checked_launches):
    p = CASES[case]()
    rel_grad = p.spec.position.kind == "relative"
    got = _run_packed(p, rel_grad)
    assert got[1].shape == (1, p.q.shape[1], p.q.shape[2]) and got[1].is_contiguous()
    for name, t in zip(("out", "dq", "dk", "dv"), (got[0], got[2], got[3], got[4])):  # empty_like: (total, H, D) order
        assert t[0].transpose(0, 1).is_contiguous(), f"{name} strides {t.stride()}"
    _assert_matches(got, run_per_sequence(triton_backend, p, rel_grad), case)
    if rel_grad:
        assert got[5].shape == p.spec.position.rel_table.shape and got[5].abs().sum() > 0


def test_rows_without_keys_and_keys_without_rows(checked_launches):
    """Sequence 3 has a query and no key: out 0, lse -inf, dq 0. Sequence 1 has keys and no query: dk = dv = 0.
    Causal rows before the first key (query offset < key offset) have no visible key either."""
    p = _packed(as_position_scheme("none"), LENGTHS_Q, LENGTHS_K, offsets=([0, 0, -5, 0, 0], [0] * 5))
    out, lse, dq, dk, dv, _ = _run_packed(p, False)
    no_keys = [p.rows_q[3]] + [slice(p.rows_q[2].start, p.rows_q[2].start + 5)]  # sequence 2's first 5 rows see no key
    for rows in no_keys:
        assert out[:, :, rows].abs().sum() == 0 and dq[:, :, rows].abs().sum() == 0
        assert torch.isinf(lse[:, :, rows]).all() and (lse[:, :, rows] < 0).all()
    assert dk[:, :, p.rows_k[1]].abs().sum() == 0 and dv[:, :, p.rows_k[1]].abs().sum() == 0
    assert torch.isfinite(lse[:, :, p.rows_q[2].start + 5:p.rows_q[2].stop]).all()


@pytest.mark.parametrize("empty", ["keys", "queries"])
def test_every_sequence_empty(empty, checked_launches):
    """No keys at all (max_seqlen_k 0, total_k 0): out 0, lse -inf, dq 0, a zero table gradient, and no dK/dV launch
    (its grid is empty). No queries at all: empty results, nothing launched."""
    lengths = dict(keys=([2, 0, 5], [0, 0, 0]), queries=([0, 0, 0], [3, 0, 4]))[empty]
    p = _packed(_relative(), *lengths)
    out, lse, dq, dk, dv, d_table = _run_packed(p, True)
    assert out.abs().sum() == 0 and dq.abs().sum() == 0 and (lse == float("-inf")).all()
    assert dk.shape == p.k.shape and dk.abs().sum() == 0 and dv.abs().sum() == 0
    assert d_table.shape == (2, 16) and d_table.abs().sum() == 0


def test_packed_matches_the_reference(checked_launches):
    """The dense fp64 reference on each sequence alone, through autograd (the relative table included)."""
    p = _packed(_relative(), LENGTHS_Q, LENGTHS_K, causal=True, window=12)
    got = _run_packed(p, True)
    table = p.spec.position.rel_table.detach().double().requires_grad_()
    outs, lses, leaves = [], [], [t.detach().double().requires_grad_() for t in (p.q, p.k, p.v)]
    for s, (rows_q, rows_k) in enumerate(zip(p.rows_q, p.rows_k)):
        spec = alone(p, s)
        spec = dataclasses.replace(spec, position=dataclasses.replace(spec.position, rel_table=table))
        out, lse = attention_reference(leaves[0][:, :, rows_q], leaves[1][:, :, rows_k], leaves[2][:, :, rows_k], spec)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    torch.autograd.backward((out, lse.masked_fill(torch.isinf(lse), 0.0)), (p.grad_out.double(), p.grad_lse.double()))
    want = (out, lse, *(t.grad for t in leaves), table.grad)
    _assert_matches(got, [w.float() for w in want], "reference")


# ----------------------------------------------------------------------------------------- GPU tile shapes

def _gpu_tile_shapes() -> list:
    """Every (BLOCK_M, BLOCK_N) of the shipped autotune configs, over head-dim buckets and schemes."""
    shapes = set()
    for config_fn in (configs.forward_configs, configs.backward_dkdv_configs, configs.backward_dq_configs):
        for block_d in configs.HEAD_DIM_BUCKETS:
            for pos in SCHEME_CODES:
                shapes |= {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in config_fn(block_d, pos)}
    return sorted(shapes)


@pytest.mark.parametrize("block_m,block_n", _gpu_tile_shapes())
def test_packed_at_gpu_tile_shapes(monkeypatch, block_m, block_n, checked_launches):
    """Each GPU tile on sequences that start mid-tile, end mid-tile and span several tiles (causal block skipping,
    window bounds and the table gradient's partial rows per key block, which depend on the tile)."""
    monkeypatch.setattr(launch, "INTERPRETER_CONFIG", triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}))
    p = _packed(_relative(heads=4), [1, 0, 140, 37], [19, 6, 150, 0], heads=4, kv_heads=2, window=80,
                offsets=([18, 0, 60, 0], [0, 0, 50, 0]))
    _assert_matches(_run_packed(p, True), run_per_sequence(triton_backend, p, True), f"M{block_m} N{block_n}")


# ----------------------------------------------------------------------------------------- garbage cu_seqlens

GARBAGE = {  # (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) on total_q = 12, total_k = 10
    "decreasing_past_total_negative": ([0, 9, 4, 100, -5, 7], [-3, 2, 50, 1, 6, 1000], 4, 5),
    "huge_values_large_max_seqlen": ([2 ** 40, -2 ** 40, 3, 12, 13, 2 ** 62], [5, 5, 0, 10, 11, -1], 40, 40),
    "valid_bounds_but_longer_than_max_seqlen": ([0, 12, 12, 12, 12, 12], [0, 10, 10, 10, 10, 10], 3, 2),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_cu_seqlens_stay_in_bounds(case, checked_launches):
    """Unvalidated cu_seqlens (on CUDA with max_seqlen given the caller does not check them): whatever they hold,
    no kernel reads or writes outside its tensors, forward and backward (dLSE and the table gradient included)."""
    cu_q, cu_k, max_q, max_k = GARBAGE[case]
    p = _packed(_relative(), [3, 3, 3, 3, 0], [2, 2, 2, 2, 2], causal=False)
    spec = dataclasses.replace(p.spec, cu_seqlens_q=torch.tensor(cu_q, device=DEVICE),
                               cu_seqlens_k=torch.tensor(cu_k, device=DEVICE), max_seqlen_q=max_q, max_seqlen_k=max_k)
    out, lse = triton_backend.forward(p.q, p.k, p.v, spec)
    dq, dk, dv, d_table = triton_backend.backward(p.grad_out, p.grad_lse, p.q, p.k, p.v, out, lse, spec, True)
    assert d_table.shape == (2, 16)


def test_at_most_max_seqlen_rows_and_keys(checked_launches):
    """max_seqlen_q / max_seqlen_k bound what is processed of a sequence, consistently in every kernel: a sequence
    longer than them is attended as its first max_seqlen_q queries over its first max_seqlen_k keys, and the rest of
    its rows are not written (here still NaN)."""
    p = _packed(ALiBi(), [12], [10], causal=False)
    spec = dataclasses.replace(p.spec, max_seqlen_q=3, max_seqlen_k=2)
    out, lse = triton_backend.forward(p.q, p.k, p.v, spec)
    dq, dk, dv, _ = triton_backend.backward(p.grad_out, p.grad_lse, p.q, p.k, p.v, out, lse, spec, False)
    first_rows = alone(p, 0)
    out_3, lse_3 = triton_backend.forward(p.q[:, :, :3], p.k[:, :, :2], p.v[:, :, :2], first_rows)
    want = (out_3, lse_3, *triton_backend.backward(p.grad_out[:, :, :3], p.grad_lse[:, :, :3].contiguous(),
                                                   p.q[:, :, :3], p.k[:, :, :2], p.v[:, :, :2], out_3, lse_3, first_rows,
                                                   False))
    _assert_matches((out[:, :, :3], lse[:, :, :3], dq[:, :, :3], dk[:, :, :2], dv[:, :, :2]), want, "first rows")
    for name, rest in (("out", out[:, :, 3:]), ("lse", lse[:, :, 3:]), ("dq", dq[:, :, 3:]), ("dk", dk[:, :, 2:]),
                       ("dv", dv[:, :, 2:])):
        assert torch.isnan(rest).all(), f"{name}: rows past max_seqlen written"
