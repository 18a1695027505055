"""Packed (varlen) sequences in the native CPU kernels (csrc/cpu), called at the backend level: cpu_backend.forward /
backward with a packed AttentionSpec (q (1, Hq, total_q, D), k / v (1, Hkv, total_k, D), cu_seqlens, per-sequence
offsets and ALiBi slopes), as fused_attention_varlen hands them over.

Oracles, each sequence sliced out of the packed tensors by the test itself: the same backend's dense call on each
sequence alone (fp32 / fp64: equal up to rounding), and fused_pos_attn.reference.attention_reference run per
sequence under autograd (DESIGN.md's tolerance rule, fp64 and same-dtype references; gradients from a loss on out
and lse, the relative table's included). Also: gradcheck in fp64, the op's checks of the packed arguments, and
cu_seqlens / max_seqlen that are garbage (clamped by AttentionParams::q_rows / k_rows: nothing outside the tensors
is read or written, which NaN guard rows around every tensor show).

The helpers take the backend module, so tests/test_cuda_emulated.py runs the same cases on the CUDA kernels'
emulation.
"""
import dataclasses
from typing import Optional

import pytest
import torch

from fused_pos_attn import ALiBi, RelativeBias, RoPE
from fused_pos_attn.backends import cpu_backend, native
from fused_pos_attn.positions import as_position_scheme
from fused_pos_attn.reference import attention_reference, sequence_spec
from fused_pos_attn.spec import AttentionSpec
from tolerance import assert_close_to_reference

OPS = torch.ops.fused_pos_attn
NAMES = ("out", "lse", "dq", "dk", "dv", "d_table")


@dataclasses.dataclass
class Packed:
    """A packed call: 4-D views, its spec, gradients to feed back (into out and lse), each sequence's rows, and the
    relative scheme (to rebuild its table as a leaf for the reference's gradient)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    grad_lse: torch.Tensor
    spec: AttentionSpec
    rows_q: list
    rows_k: list
    relative: Optional[RelativeBias] = None


def cumulative(lengths) -> list:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def make_packed(scheme, lengths_q, lengths_k=None, heads=2, kv_heads=1, head_dim=32, dtype=torch.float32,
                causal=True, window=None, offsets=None, layout="packed", seed=0, device="cpu") -> Packed:
    """Packed inputs as FlashAttention's varlen API takes them ((total, H, D)), viewed as the backends get them.

    scheme: a pos argument ("alibi" gets per-sequence (S, Hq) slopes, all different). layout "packed": q (total_q,
    Hq, D) and k, v slices of one (total_k, 2, Hkv, D) tensor; "qkv" (self-attention, lengths_k None): q, k, v
    slices of one (total, 3, H, D) tensor (Hq == Hkv) or of one (total, Hq + 2 Hkv, D) tensor (GQA). offsets:
    (q_offset, k_offset) lists, default bottom-right per sequence (q_offset[s] = Lk - Lq, k_offset[s] = 0). Every
    tensor on device."""
    gen = torch.Generator().manual_seed(seed)
    lengths_k = lengths_q if lengths_k is None else lengths_k
    cu_q, cu_k = cumulative(lengths_q), cumulative(lengths_k)
    total_q, total_k, num_sequences = cu_q[-1], cu_k[-1], len(lengths_q)
    if layout == "qkv":
        assert lengths_k == lengths_q
        if heads == kv_heads:
            qkv = torch.randn(total_q, 3, heads, head_dim, generator=gen).to(device, dtype)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        else:
            qkv = torch.randn(total_q, heads + 2 * kv_heads, head_dim, generator=gen).to(device, dtype)
            q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    else:
        q = torch.randn(total_q, heads, head_dim, generator=gen).to(device, dtype)
        kv = torch.randn(total_k, 2, kv_heads, head_dim, generator=gen).to(device, dtype)
        k, v = kv[:, 0], kv[:, 1]
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    grad_out = torch.randn(total_q, heads, head_dim, generator=gen).to(device, dtype).transpose(0, 1).unsqueeze(0)
    grad_lse = torch.randn(1, heads, total_q, generator=gen).to(device, torch.float64 if dtype == torch.float64
                                                                 else torch.float32)
    if offsets is None:
        offsets = ([lk - lq for lq, lk in zip(lengths_q, lengths_k)], [0] * num_sequences)
    q_offset, k_offset = (torch.tensor(o, dtype=torch.int64, device=device) for o in offsets)
    relative = None
    if scheme == "alibi":
        scheme = ALiBi(torch.rand(num_sequences, heads, generator=gen) * 0.5 + 0.05)
    elif isinstance(scheme, tuple):  # (num_buckets, max_distance): a relative table
        relative = RelativeBias(torch.randn(heads, scheme[0], generator=gen), scheme[1])
        scheme = relative
    position = as_position_scheme(scheme).resolve(num_sequences, heads, head_dim, max(max(lengths_q, default=0),
                                                                                     max(lengths_k, default=0)),
                                                  q.device, causal=causal)
    spec = AttentionSpec(causal=causal, scale=head_dim ** -0.5, window=window, q_offset=q_offset,
                         k_offset=k_offset, position=position, cu_seqlens_q=torch.tensor(cu_q, device=device),
                         cu_seqlens_k=torch.tensor(cu_k, device=device), max_seqlen_q=max(lengths_q, default=0),
                         max_seqlen_k=max(lengths_k, default=0))
    rows = [[slice(cu[s], cu[s + 1]) for s in range(num_sequences)] for cu in (cu_q, cu_k)]
    return Packed(q, k, v, grad_out, grad_lse, spec, *rows, relative=relative)


def alone(p: Packed, s: int, position=None) -> AttentionSpec:
    """The dense spec of sequence s alone (reference.sequence_spec): its offsets, its row of ALiBi slopes."""
    return sequence_spec(p.spec, s, position)


def run_packed(backend, p: Packed, rel_grad: bool = True) -> tuple:
    """(out, lse, dq, dk, dv, d_table) of one packed forward and backward (a gradient into out and lse)."""
    out, lse = backend.forward(p.q, p.k, p.v, p.spec)
    return (out, lse, *backend.backward(p.grad_out, p.grad_lse, p.q, p.k, p.v, out, lse, p.spec, rel_grad))


def run_per_sequence(backend, p: Packed, rel_grad: bool = True) -> tuple:
    """The same, from the backend's dense call on each sequence alone, in the packed layout. A sequence without
    keys has out 0, lse -inf and dq 0; one without queries has dk, dv 0."""
    out, dq = torch.zeros_like(p.q), torch.zeros_like(p.q)
    dk, dv = torch.zeros_like(p.k), torch.zeros_like(p.v)
    lse = torch.full(p.grad_lse.shape, float("-inf"), dtype=p.grad_lse.dtype, device=p.q.device)
    d_table = None
    for s, (rows_q, rows_k) in enumerate(zip(p.rows_q, p.rows_k)):
        if rows_q.stop == rows_q.start or rows_k.stop == rows_k.start:
            continue
        q, k, v = p.q[:, :, rows_q], p.k[:, :, rows_k], p.v[:, :, rows_k]
        spec = alone(p, s)
        out_s, lse_s = backend.forward(q, k, v, spec)
        dq_s, dk_s, dv_s, d_table_s = backend.backward(p.grad_out[:, :, rows_q], p.grad_lse[:, :, rows_q].contiguous(),
                                                       q, k, v, out_s, lse_s, spec, rel_grad)
        out[:, :, rows_q], lse[:, :, rows_q], dq[:, :, rows_q] = out_s, lse_s, dq_s
        dk[:, :, rows_k], dv[:, :, rows_k] = dk_s, dv_s
        if d_table_s is not None:
            d_table = d_table_s if d_table is None else d_table + d_table_s
    if rel_grad and p.relative is not None and d_table is None:
        d_table = torch.zeros(p.spec.position.rel_table.shape, device=p.q.device)
    return out, lse, dq, dk, dv, d_table


def run_reference(p: Packed, dtype: torch.dtype, upcast: bool) -> tuple:
    """attention_reference on each sequence alone (in fp64 when upcast, else in dtype) under autograd: (out, lse,
    dq, dk, dv[, d_table]) in the packed layout."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (p.q, p.k, p.v)]
    position = p.spec.position
    if p.relative is not None:  # a fresh leaf table, resolved as the packed call resolved it
        table = p.relative.table.detach().clone().requires_grad_()
        position = RelativeBias(table, p.relative.max_distance).resolve(
            len(p.rows_q), p.q.shape[1], p.q.shape[3], 1, p.q.device, causal=p.spec.causal)
        leaves.append(table)
    outs, lses = [], []
    for s, (rows_q, rows_k) in enumerate(zip(p.rows_q, p.rows_k)):
        out, lse = attention_reference(leaves[0][:, :, rows_q], leaves[1][:, :, rows_k], leaves[2][:, :, rows_k],
                                       alone(p, s, position), upcast=upcast)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    torch.autograd.backward((out, lse.masked_fill(torch.isinf(lse), 0.0)),
                            (p.grad_out.to(out.dtype), p.grad_lse.to(lse.dtype)))
    return (out, lse, *(torch.zeros_like(t) if t.grad is None else t.grad for t in leaves))


def assert_matches(got, want, tol: float, what: str = "") -> None:
    """Each result within tol of the expected value's scale; equal infinities (lse of rows without keys) equal."""
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, f"{what} {name}: expected None"
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {name}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        assert not torch.isnan(g).any(), f"{what} {name}: NaN"
        same_inf = torch.isinf(w) & (g == w)
        error = torch.where(same_inf, 0.0, (g.double() - w.double()).abs()).max().item() if g.numel() else 0.0
        finite = w[torch.isfinite(w)]
        scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        assert error <= tol * scale, f"{what} {name}: max error {error:.3g} (scale {scale:.3g})"


def check_against_reference(backend, p: Packed, dtype: torch.dtype, what: str = "") -> None:
    """The packed call against the per-sequence reference, DESIGN.md's tolerance rule (factor 2 for out and lse,
    3 for gradients)."""
    rel_grad = p.relative is not None
    got = run_packed(backend, p, rel_grad)
    ref64 = run_reference(p, torch.float64, True)
    same = run_reference(p, dtype, False)
    for i, name in enumerate(NAMES[:len(ref64)]):
        # The relative table is fp32 (its gradient is folded from distances to buckets in fp32), whatever q's dtype.
        compute = torch.float32 if name == "d_table" and dtype == torch.float64 else dtype
        assert_close_to_reference(got[i], ref64[i], same[i], 2.0 if i < 2 else 3.0, f"{name} {what}", compute)
    assert got[0].dtype == dtype and got[0].shape == p.q.shape and got[2].shape == p.q.shape
    assert got[3].shape == p.k.shape and got[4].shape == p.v.shape
    assert got[1].shape == (1, p.q.shape[1], p.q.shape[2]) and got[1].is_contiguous()
    assert (got[5] is not None) == rel_grad


# Lengths: a sequence longer than one query block (kBlockM = 128) and one key block (kBlockN = 256), empty, length
# 1, short ones. Cross: a sequence with queries and no keys, one with keys and no queries.
LENGTHS = (5, 0, 1, 300, 37)
LENGTHS_Q, LENGTHS_K = (3, 0, 140, 1, 4), (9, 5, 270, 0, 4)
RELATIVE = (16, 12)  # num_buckets, max_distance
SCHEMES = {
    "none": "none",
    "alibi": "alibi",  # per-sequence slopes
    "rope": "rope",
    "rope_partial_interleaved": RoPE(rotary_dim=12, interleaved=True),
    "relative": RELATIVE,
}


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_packed_matches_each_sequence_alone(scheme, causal, cross):
    """fp32, GQA: the packed call equals the dense call on each sequence alone (the relative table's gradient is
    the sum of the sequences')."""
    lengths = (LENGTHS_Q, LENGTHS_K) if cross else (LENGTHS,)
    p = make_packed(SCHEMES[scheme], *lengths, heads=4, kv_heads=2, causal=causal)
    got = run_packed(cpu_backend, p)
    assert_matches(got, run_per_sequence(cpu_backend, p), 1e-5, f"{scheme} causal={causal}")
    # empty_like: out and dq keep q's packed (total, H, D) layout, dk / dv k's; lse is contiguous (1, Hq, total_q).
    assert got[0].stride() == got[2].stride() == p.q.stride() and got[3].stride() == torch.empty_like(p.k).stride()


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_packed_matches_the_reference(scheme):
    """Per-sequence offsets (beyond int32 in one sequence), a window, GQA, rows without keys (sequence 3; and rows
    before a sequence's first key)."""
    offsets = ([0, 4, 3_000_000_000, 7, 2], [3, 0, 3_000_000_000 - 50, 0, 0])
    pos = RoPE(theta=10000.0 ** 8) if scheme == "rope" else SCHEMES[scheme]  # angles well conditioned at 3e9
    p = make_packed(pos, LENGTHS_Q, LENGTHS_K, heads=4, kv_heads=2, causal=True, window=40, offsets=offsets)
    check_against_reference(cpu_backend, p, torch.float32, scheme)


@pytest.mark.parametrize("scheme", ["alibi", "rope", "relative"])
def test_non_contiguous_qkv_slices(scheme):
    """q, k, v slices of one (total, 3, H, D) tensor (MHA), bidirectional; of one (total, Hq + 2 Hkv, D) tensor (GQA)
    causal: read in place, the outputs keep q's / k's layout."""
    for heads, kv_heads, causal in ((2, 2, False), (4, 1, True)):
        p = make_packed(SCHEMES[scheme], LENGTHS, heads=heads, kv_heads=kv_heads, causal=causal, window=50,
                        layout="qkv")
        assert not p.q.is_contiguous() and not p.k.is_contiguous()
        got = run_packed(cpu_backend, p)
        assert_matches(got, run_per_sequence(cpu_backend, p), 1e-5, f"{scheme} H={heads}/{kv_heads}")
        assert got[0].stride() == torch.empty_like(p.q).stride() and got[3].stride() == torch.empty_like(p.k).stride()
        check_against_reference(cpu_backend, p, torch.float32, f"{scheme} qkv H={heads}/{kv_heads}")


def test_rows_without_keys_and_keys_without_rows():
    """Sequence 3 has a query and no key: out 0, lse -inf, dq 0. Sequence 1 has keys and no query: dk = dv = 0.
    Causal rows before the first key (query offset < key offset) have no visible key either."""
    p = make_packed("alibi", LENGTHS_Q, LENGTHS_K, offsets=([0, 0, -5, 0, 0], [0] * 5))
    out, lse, dq, dk, dv, _ = run_packed(cpu_backend, p)
    no_keys = [p.rows_q[3], slice(p.rows_q[2].start, p.rows_q[2].start + 5)]
    for rows in no_keys:
        assert out[:, :, rows].abs().sum() == 0 and dq[:, :, rows].abs().sum() == 0
        assert (lse[:, :, rows] == float("-inf")).all()
    assert dk[:, :, p.rows_k[1]].abs().sum() == 0 and dv[:, :, p.rows_k[1]].abs().sum() == 0
    assert torch.isfinite(lse[:, :, p.rows_q[2].start + 5:p.rows_q[2].stop]).all()


@pytest.mark.parametrize("empty", ["keys", "queries", "sequences"])
def test_nothing_to_attend(empty):
    """No keys at all: out 0, lse -inf, dq 0 and a zero table gradient. No queries at all, or no sequence: empty
    results and zero dk, dv."""
    lengths = dict(keys=((2, 0, 5), (0, 0, 0)), queries=((0, 0, 0), (3, 0, 4)), sequences=((), ()))[empty]
    p = make_packed(RELATIVE, *lengths)
    out, lse, dq, dk, dv, d_table = run_packed(cpu_backend, p)
    assert out.shape == p.q.shape and lse.shape == (1, 2, p.q.shape[2]) and dk.shape == p.k.shape
    assert out.abs().sum() == 0 and dq.abs().sum() == 0 and (lse == float("-inf")).all()
    assert dk.abs().sum() == 0 and dv.abs().sum() == 0
    assert d_table.shape == (2, 16) and d_table.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
@pytest.mark.parametrize("scheme", ["alibi", "rope", "relative"])
def test_other_dtypes(dtype, scheme):
    """bf16 against the fp64 and bf16 references (DESIGN.md's rule), fp64 against the fp64 reference; fp64 also
    equals the dense calls on each sequence alone to rounding."""
    p = make_packed(SCHEMES[scheme], LENGTHS_Q, LENGTHS_K, heads=4, kv_heads=2, head_dim=32, dtype=dtype, window=60)
    check_against_reference(cpu_backend, p, dtype, f"{scheme} {dtype}")
    if dtype == torch.float64:  # the fp32 table gradient: the sequences' partial sums are added in another order
        got, want = run_packed(cpu_backend, p), run_per_sequence(cpu_backend, p)
        assert_matches(got[:5], want[:5], 1e-12, scheme)
        assert_matches(got[5:], want[5:], 1e-6, scheme)


class PackedAttention(torch.autograd.Function):
    """The packed CPU forward and backward as an autograd function of the packed (total, H, D) tensors."""

    @staticmethod
    def forward(ctx, q, k, v, spec):
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out, lse = cpu_backend.forward(q4, k4, v4, spec)
        ctx.save_for_backward(q4, k4, v4, out, lse)
        ctx.spec = spec
        return out[0].transpose(0, 1), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q4, k4, v4, out, lse = ctx.saved_tensors
        grads = cpu_backend.backward(grad_out.transpose(0, 1).unsqueeze(0), grad_lse.contiguous(), q4, k4, v4, out,
                                     lse, ctx.spec, False)
        return (*(g[0].transpose(0, 1) for g in grads[:3]), None)


@pytest.mark.parametrize("scheme", ["alibi", "rope_partial_interleaved"])
def test_gradcheck_fp64(scheme):
    """torch.autograd.gradcheck of out and lse in q, k, v: three sequences (lengths 3, 1, 4 on 4, 2, 5 keys; every
    row sees a key), GQA, a window, per-sequence offsets; RoPE rotates 6 of 8 dims."""
    pos = RoPE(rotary_dim=6, interleaved=True) if scheme.startswith("rope") else SCHEMES[scheme]
    p = make_packed(pos, (3, 1, 4), (4, 2, 5), heads=2, kv_heads=1, head_dim=8, dtype=torch.float64,
                    window=3, offsets=([1, 5, 2], [0, 4, 1]))
    inputs = [t[0].transpose(0, 1).detach().clone().requires_grad_() for t in (p.q, p.k, p.v)]
    assert torch.autograd.gradcheck(lambda q, k, v: PackedAttention.apply(q, k, v, p.spec), inputs)


GARBAGE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def check_garbage_cu_seqlens(backend, dtype: torch.dtype, head_dim: int, max_seqlen: str, device="cpu",
                             dq_zero_outside: bool = False) -> None:
    """cu_seqlens out of range (negative, past the total, decreasing), with max_seqlen below the real lengths
    ("truncating") or far above them ("huge"), given to a backend as they are (the public API validates them only
    where that is cheap): each sequence's rows are clamped into [0, total] (end into [start, total]) and to at most
    max_seqlen rows (AttentionParams::q_rows / k_rows). q / k / v / grad_out / out sit between NaN guard rows of one
    buffer: a read outside them would make a result NaN, a write outside them would overwrite a guard. The rows a
    sequence owns match the fp64 reference on exactly those rows (out, lse, dq, dk, dv, the relative table's
    gradient). dq_zero_outside: dq is 0 on query rows that no sequence owns (the CUDA kernels write every dq row; the
    CPU kernels leave unowned rows unwritten)."""
    heads, total_q, total_k, guard = 2, 80, 90, 8
    gen = torch.Generator().manual_seed(9)

    def guarded(total):  # (1, H, total, D) view of the middle rows of a (guard + total + guard, H, D) buffer
        buffer = torch.full((total + 2 * guard, heads, head_dim), float("nan"), dtype=dtype)
        buffer[guard:guard + total] = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
        buffer = buffer.to(device)
        return buffer, buffer[guard:guard + total].transpose(0, 1).unsqueeze(0)

    (qb, q), (kb, k), (vb, v), (gb, grad_out), (ob, out_view) = (guarded(n) for n in (80, 90, 90, 80, 80))
    # Clamped: q [0, 30) [30, 30) [30, 80) [80, 80); k [0, 20) [20, 20) [20, 90) [90, 90). Truncated to at most 40
    # query rows and 65 keys (two 64-key blocks, the second with one key): q [0, 30) and [30, 70), k [0, 20) and
    # [20, 85).
    cu_q, cu_k = [-4, 30, 30, 500, 2], [-1, 20, 20, 300, 900]
    max_q, max_k, end_q, end_k = (40, 65, 70, 85) if max_seqlen == "truncating" else (10 ** 12, 10 ** 12, 80, 90)
    offsets = torch.tensor([0, 1, 2, 3], device=device)
    table = torch.randn(heads, 8, generator=gen).to(device)
    position = RelativeBias(table, max_distance=5).resolve(4, heads, head_dim, 90, q.device, causal=True)
    spec = AttentionSpec(causal=True, scale=head_dim ** -0.5, window=None, q_offset=offsets + 50, k_offset=offsets,
                         position=position, cu_seqlens_q=torch.tensor(cu_q, device=device),
                         cu_seqlens_k=torch.tensor(cu_k, device=device), max_seqlen_q=max_q, max_seqlen_k=max_k)
    out, lse = backend.forward(q, k, v, spec)
    out_view.copy_(out)
    dq, dk, dv, d_table = backend.backward(grad_out, None, q, k, v, out_view, lse, spec, True)
    for buffer in (qb, kb, vb, gb, ob):
        assert torch.isnan(buffer[:guard]).all() and torch.isnan(buffer[-guard:]).all(), "a guard row was written"
    if dq_zero_outside:
        assert (dq[:, :, end_q:] == 0).all()
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    table64 = table.detach().cpu().clone().requires_grad_()
    position64 = RelativeBias(table64, max_distance=5).resolve(4, heads, head_dim, 90, "cpu", causal=True)
    tol, got, want = GARBAGE_TOLERANCE[dtype], [], []
    for s, rows_q, rows_k in ((0, slice(0, 30), slice(0, 20)), (2, slice(30, end_q), slice(20, end_k))):
        dense = AttentionSpec(causal=True, scale=head_dim ** -0.5, window=None, q_offset=offsets[s:s + 1].cpu() + 50,
                              k_offset=offsets[s:s + 1].cpu(), position=position64)
        out64, lse64 = attention_reference(leaves[0][:, :, rows_q], leaves[1][:, :, rows_k], leaves[2][:, :, rows_k],
                                           dense)
        (out64 * grad_out[:, :, rows_q].cpu().double()).sum().backward()
        got += [out[:, :, rows_q].cpu().double(), lse[:, :, rows_q].cpu().double()]
        want += [out64.detach(), lse64.detach()]
    got += [dq[:, :, :end_q], dk[:, :, :end_k], dv[:, :, :end_k], d_table]
    want += [leaves[0].grad[:, :, :end_q], leaves[1].grad[:, :, :end_k], leaves[2].grad[:, :, :end_k], table64.grad]
    for i, (g, w) in enumerate(zip(got, want)):
        assert_matches([g.cpu().double()], [w.double()], tol, f"result {i} ({max_seqlen})")


@pytest.mark.parametrize("max_seqlen", ["truncating", "huge"])
def test_garbage_cu_seqlens_stay_in_bounds(max_seqlen):
    check_garbage_cu_seqlens(cpu_backend, torch.float32, 64, max_seqlen)


def _op_args(p: Packed, **changes) -> dict:
    args = native.op_args(p.spec, p.q)
    args.update(changes)
    return args


@pytest.mark.parametrize("change,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 5, 5, 6, 306, 343], dtype=torch.int32)),
     r"cu_seqlens_q must be a contiguous 1-D int64 tensor \(\(S \+ 1,\) for packed sequences, \(0,\) for a dense "
     r"call\), got Int"),
    (dict(cu_seqlens_k=torch.tensor([[0, 5, 5, 6, 306, 343]])), r"cu_seqlens_k must be a contiguous 1-D int64"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 5, 6, 306, 343, 343])),
     r"cu_seqlens_q and cu_seqlens_k must have the same length \(S \+ 1 packed, 0 dense\), got 6 and 7"),
    (dict(cu_seqlens_q=torch.zeros(0, dtype=torch.int64)),
     r"cu_seqlens_q and cu_seqlens_k must have the same length"),
    (dict(q_offset=torch.zeros(4, dtype=torch.int64)),
     r"q_offset must be a contiguous \(S,\) = \(5,\) int64 tensor, got Long of shape \[4\]"),
    (dict(k_offset=torch.zeros(1, dtype=torch.int64)), r"k_offset must be a contiguous \(S,\) = \(5,\) int64"),
    (dict(slopes=torch.ones(1, 4)),
     r"slopes must be a \(S, Hq\) = \(5, 4\) float32 tensor, got Float of shape \[1, 4\]"),
    (dict(max_seqlen_q=-1), r"max_seqlen_q and max_seqlen_k must be >= 0, got -1 and 300"),
], ids=["cu_q_dtype", "cu_k_dim", "lengths_differ", "one_empty", "q_offset_length", "k_offset_length", "slopes",
        "max_seqlen_negative"])
@pytest.mark.parametrize("op", ["attention_forward", "attention_backward"])
def test_bad_packed_arguments_are_named(op, change, match):
    p = make_packed("alibi", LENGTHS, heads=4, kv_heads=2)
    out, lse = cpu_backend.forward(p.q, p.k, p.v, p.spec)
    leading = (p.q, p.k, p.v) if op == "attention_forward" else (p.grad_out, None, p.q, p.k, p.v, out, lse, False)
    with pytest.raises(RuntimeError, match=match):
        getattr(OPS, op)(*leading, **_op_args(p, **change))


def test_packed_needs_one_tensor_batch_and_dense_no_max_seqlen():
    p = make_packed("none", LENGTHS)
    q2, k2, v2 = (torch.cat([t, t]) for t in (p.q, p.k, p.v))
    with pytest.raises(RuntimeError, match=r"packed \(varlen\) q, k, v must be \(1, H, total, D\) views, got q of "
                                           r"shape \[2, 2, 343, 32\]"):
        OPS.attention_forward(q2, k2, v2, **_op_args(p))
    dense = AttentionSpec(causal=True, scale=0.25, window=None, q_offset=torch.zeros(1, dtype=torch.int64),
                          k_offset=torch.zeros(1, dtype=torch.int64), position=p.spec.position)
    with pytest.raises(RuntimeError, match=r"max_seqlen_q and max_seqlen_k must be 0 for a dense call \(empty "
                                           r"cu_seqlens\), got 0 and 3"):
        OPS.attention_forward(p.q, p.k, p.v, **dict(native.op_args(dense, p.q), max_seqlen_k=3))


def test_dense_call_passes_empty_cu_seqlens():
    """native.op_args of a dense spec: (0,) int64 cu_seqlens on q's device and max_seqlen 0; of a packed one, the
    spec's."""
    p = make_packed("none", LENGTHS)
    dense = AttentionSpec(causal=True, scale=0.25, window=None, q_offset=torch.zeros(2, dtype=torch.int64),
                          k_offset=torch.zeros(2, dtype=torch.int64), position=p.spec.position)
    args = native.op_args(dense, torch.zeros(2, 2, 3, 4))
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        assert args[name].shape == (0,) and args[name].dtype == torch.int64
    assert args["max_seqlen_q"] == args["max_seqlen_k"] == 0
    args = native.op_args(p.spec, p.q)
    assert args["cu_seqlens_q"] is p.spec.cu_seqlens_q and args["max_seqlen_k"] == 300
