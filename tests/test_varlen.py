"""fused_attention_varlen (packed sequences) on every kernel backend, against an independent oracle: a Python
loop of the dense reference fused_attention(..., backend="reference") over the sequences, each sequence's
rows sliced out of the packed tensors by the test itself (DESIGN.md tolerance rule, fp64 and same-dtype).

Triton runs under the interpreter without CUDA (small shapes); the CUDA C++ kernels are checked through their
CPU emulation in test_cuda_emulated.py.
"""
from dataclasses import dataclass, field, replace
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocations import AllocationRecorder, hide_interpreter_copies, numel
from fused_pos_attn import ALiBi, DynamicNTK, RelativeBias, RoPE, YaRN, fused_attention, fused_attention_varlen
from kernel_backends import DEVICE, HAS_TRITON, backend, device_of  # noqa: F401  (backend: a fixture)
from tolerance import assert_close_to_reference


@dataclass
class Packed:
    """A packed call: per-sequence query and key lengths, heads, head dim, pos, keyword arguments and how
    q / k / v are laid out ("contiguous", or "qkv": slices of one (total, 3, H, D) tensor, self-attention)."""

    lens_q: tuple = (5, 0, 1, 37, 12)
    lens_k: Optional[tuple] = None  # None: same as lens_q
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 16
    pos: object = "none"  # a pos argument, or a (num_buckets, max_distance, bidirectional) relative table spec
    kwargs: dict = field(default_factory=dict)
    layout: str = "contiguous"

    @property
    def keys(self) -> tuple:
        return self.lens_q if self.lens_k is None else self.lens_k


def cumulative(lengths: tuple, device: str) -> torch.Tensor:
    return torch.tensor([0] + list(lengths), dtype=torch.int32, device=device).cumsum(0).to(torch.int32)


def make_inputs(case: Packed, dtype: torch.dtype, device: str, gen: torch.Generator):
    total_q, total_k = sum(case.lens_q), sum(case.keys)
    if case.layout == "qkv":
        assert total_q == total_k and case.heads_q == case.heads_kv
        qkv = torch.randn(total_q, 3, case.heads_q, case.head_dim, generator=gen).to(device, dtype)
        q, k, v = qkv.unbind(1)
    else:
        q = torch.randn(total_q, case.heads_q, case.head_dim, generator=gen).to(device, dtype)
        k, v = (torch.randn(total_k, case.heads_kv, case.head_dim, generator=gen).to(device, dtype) for _ in "kv")
    return q, k, v, torch.randn(q.shape, generator=gen).to(device)


def build_pos(pos, heads: int):
    """A relative table spec becomes a RelativeBias with a fresh seeded leaf table (one per run)."""
    if isinstance(pos, tuple):
        num_buckets, max_distance, bidirectional = pos
        table = torch.randn(heads, num_buckets, generator=torch.Generator().manual_seed(heads))
        return RelativeBias(table.requires_grad_(), max_distance, bidirectional)
    return pos


def leaves_of(q, k, v, pos, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    return leaves + ([pos.table] if isinstance(pos, RelativeBias) else [])


def run_packed(q, k, v, grad_out, case: Packed, backend: str, dtype: torch.dtype) -> list:
    """[out, lse, dq, dk, dv(, d_table)] of one fused_attention_varlen call."""
    pos = build_pos(case.pos, case.heads_q)
    leaves = leaves_of(q, k, v, pos, dtype)
    cu_q, cu_k = cumulative(case.lens_q, q.device.type), cumulative(case.keys, q.device.type)
    out, lse = fused_attention_varlen(*leaves[:3], cu_q, cu_k, max(case.lens_q), max(case.keys), pos,
                                      return_lse=True, backend=backend, **case.kwargs)
    out.backward(grad_out.to(out.dtype))
    return [out, lse] + [t.grad for t in leaves]


def _for_sequence(value, s: int):
    """A per-sequence argument (an (S,) tensor, (S, Hq) ALiBi slopes) as the dense call of sequence s takes it."""
    if isinstance(value, torch.Tensor):
        return int(value[s])
    if isinstance(value, ALiBi) and value.slopes is not None and value.slopes.dim() == 2:
        return ALiBi(value.slopes[s])
    return value


def run_loop(q, k, v, grad_out, case: Packed, dtype: torch.dtype) -> list:
    """The oracle: each sequence alone through the dense reference, its rows sliced from the packed tensors.
    A sequence without queries contributes nothing; one without keys gives out 0, lse -inf and no gradient."""
    pos = build_pos(case.pos, case.heads_q)
    leaves = leaves_of(q, k, v, pos, dtype)
    outs, lses = [], []
    start_q = start_k = 0
    for s, (len_q, len_k) in enumerate(zip(case.lens_q, case.keys)):
        rows_q, rows_k = slice(start_q, start_q + len_q), slice(start_k, start_k + len_k)
        start_q, start_k = start_q + len_q, start_k + len_k
        if len_q == 0:
            continue
        if len_k == 0:
            outs.append(torch.zeros(len_q, case.heads_q, case.head_dim, dtype=dtype, device=q.device))
            lses.append(torch.full((case.heads_q, len_q), float("-inf"), dtype=torch.float64, device=q.device))
            continue
        kwargs = {name: _for_sequence(value, s) for name, value in case.kwargs.items()}
        dense = [t[rows].transpose(0, 1).unsqueeze(0) for t, rows in zip(leaves[:3], (rows_q, rows_k, rows_k))]
        out, lse = fused_attention(*dense, _for_sequence(pos, s), return_lse=True, backend="reference", **kwargs)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].double())
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    if out.requires_grad:
        out.backward(grad_out.to(out.dtype))
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return [out, lse] + grads


NAMES = ("out", "lse", "dq", "dk", "dv", "d_table")


def check(case: Packed, backend: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
    q, k, v, grad_out = make_inputs(case, dtype, device_of(backend), torch.Generator().manual_seed(seed))
    fused = run_packed(q, k, v, grad_out, case, backend, dtype)
    ref64 = run_loop(q, k, v, grad_out, case, torch.float64)
    same = run_loop(q, k, v, grad_out, case, dtype)
    assert fused[0].shape == q.shape and fused[0].is_contiguous()
    assert fused[1].shape == (case.heads_q, q.shape[0])
    assert fused[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for i, (got, want, same_dtype) in enumerate(zip(fused, ref64, same)):
        # the T5 table is fp32 whatever q's dtype, and so is its gradient: fp32 rounding for fp64 inputs
        compute = torch.float32 if NAMES[i] == "d_table" and dtype == torch.float64 else dtype
        assert_close_to_reference(got, want.to(got.device), same_dtype.to(got.device), 2.0 if i < 2 else 3.0,
                                  f"{NAMES[i]} {case}", compute)


SCHEMES = {
    "none": "none",
    "alibi": "alibi",
    "alibi_per_sequence_slopes": ALiBi(torch.rand(5, 4, generator=torch.Generator().manual_seed(3)) * 0.5),
    "alibi_head_slopes": ALiBi(torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "rope_yarn": RoPE(theta=10000.0, scaling=YaRN(4.0, original_max_len=16)),
    "rope_partial_interleaved": RoPE(rotary_dim=8, interleaved=True),
    "relative": (16, 12, None),  # T5 buckets, table gradient; bidirectional unless causal
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("causal", [False, True])
def test_schemes_against_per_sequence_loop(scheme, causal, backend):
    """Five sequences (lengths 5, 0, 1, 37, 12: an empty one, a single row, one longer than two 16-row
    interpreter blocks): forward, LSE and every gradient including the T5 table's."""
    check(Packed(pos=SCHEMES[scheme], kwargs=dict(causal=causal)), backend)


@pytest.mark.parametrize("scheme", ["alibi", "rope_partial_interleaved", "relative"])
@pytest.mark.parametrize("causal", [False, True])
def test_window_and_unequal_lengths(scheme, causal, backend):
    """Nq != Nk per sequence (bottom-right alignment per sequence), a sequence with queries but no keys (out
    0, lse -inf), one with keys but no queries, and a sliding window."""
    check(Packed(lens_q=(3, 1, 0, 20, 9), lens_k=(10, 0, 4, 20, 30), pos=SCHEMES[scheme],
                 kwargs=dict(causal=causal, window=6)), backend)


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (4, 1)], ids=["mha", "mqa"])
def test_head_groups(heads_q, heads_kv, backend):
    check(Packed(heads_q=heads_q, heads_kv=heads_kv, pos="rope", kwargs=dict(causal=True)), backend)


@pytest.mark.parametrize("scheme", ["alibi", "rope_yarn", "relative"])
def test_per_sequence_offsets(scheme, backend):
    """Explicit (S,) offsets: query row i of sequence s at q_offset[s] + i (a continued document, a shard of a
    long one, positions past int32)."""
    kwargs = dict(causal=True, q_offset=torch.tensor([7, 0, 3_000_000_000, 40, 2]),
                  k_offset=torch.tensor([0, 5, 3_000_000_000 - 30, 3, 0]))
    pos = SCHEMES[scheme]
    if scheme.startswith("rope"):  # small angles keep fp32 RoPE well conditioned at 3e9
        pos = RoPE(theta=10000.0 ** 8)
    check(Packed(lens_q=(4, 6, 9, 20, 1), lens_k=(11, 6, 30, 57, 3), pos=pos, kwargs=kwargs), backend)


@pytest.mark.parametrize("scheme", ["alibi", "rope", "relative"])
def test_packed_qkv_slices(scheme, backend):
    """q, k, v as slices of one (total, 3, H, D) tensor: strided rows, read in place."""
    check(Packed(heads_q=2, heads_kv=2, pos=SCHEMES.get(scheme, scheme), kwargs=dict(causal=True), layout="qkv"),
          backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["alibi", "rope", "relative"])
def test_low_precision(dtype, scheme, backend):
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton interpreter's tl.dot is wrong for bfloat16 (see test_attention_backends.py)")
    check(Packed(head_dim=32, pos=SCHEMES.get(scheme, scheme), kwargs=dict(causal=True)), backend, dtype)


def test_cpu_sequences_longer_than_a_tile():
    """The native CPU kernels tile 128 queries x 256 keys: sequences crossing several tiles, fp32 and fp64."""
    case = Packed(lens_q=(300, 2, 129), lens_k=(300, 520, 129), heads_q=2, heads_kv=1, head_dim=32,
                  pos=SCHEMES["rope_partial_interleaved"], kwargs=dict(causal=True, window=200))
    check(case, "cpu")
    check(replace(case, pos=SCHEMES["relative"]), "cpu", torch.float64)


def test_cpu_gradcheck():
    gen = torch.Generator().manual_seed(1)
    cu_q, cu_k = cumulative((3, 0, 4), "cpu"), cumulative((5, 2, 4), "cpu")
    q = torch.randn(7, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(11, 1, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in "kv")
    table = torch.randn(2, 8, generator=gen, dtype=torch.float64).float().requires_grad_()
    pos = RelativeBias(table, max_distance=6)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fused_attention_varlen(q, k, v, cu_q, cu_k, pos=pos, causal=True, window=3, backend="cpu"),
        (q, k, v))


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lens=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=4),
       heads_kv=st.integers(1, 2), group=st.integers(1, 2), scheme=st.sampled_from(list(SCHEMES)),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 8)), seed=st.integers(0, 2 ** 16))
def test_property_random_cu_seqlens(backend, lens, heads_kv, group, scheme, causal, window, seed):
    lens_q, lens_k = zip(*lens)
    if sum(lens_q) == 0:
        lens_q = (1,) + lens_q[1:]
    pos = SCHEMES[scheme]
    if scheme == "alibi_per_sequence_slopes":
        pos = ALiBi(torch.rand(len(lens), heads_kv * group, generator=torch.Generator().manual_seed(seed)))
    elif scheme == "alibi_head_slopes":
        pos = ALiBi(torch.rand(heads_kv * group, generator=torch.Generator().manual_seed(seed)))
    check(Packed(lens_q=lens_q, lens_k=lens_k, heads_q=heads_kv * group, heads_kv=heads_kv, head_dim=8, pos=pos,
                 kwargs=dict(causal=causal, window=window)), backend, seed=seed)


def test_documents_do_not_see_each_other(backend):
    """Perturbing document 1 of three changes nothing in documents 0 and 2: neither their outputs nor the
    gradients of their rows (bit for bit), for every scheme with a bias or a rotation."""
    device = device_of(backend)
    lens = (9, 14, 20)
    cu = cumulative(lens, device)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(lens), 2, 16, generator=gen).to(device) for _ in "qkv")
    grad_out = torch.randn(q.shape, generator=gen).to(device)
    others = torch.cat([torch.arange(0, 9), torch.arange(23, 43)]).to(device)
    for pos in ("alibi", "rope", SCHEMES["relative"]):
        results = []
        for bump in (0.0, 3.0):
            leaves = [t.clone() for t in (q, k, v)]
            for t in leaves:
                t[9:23] += bump
            leaves = [t.requires_grad_() for t in leaves]
            out = fused_attention_varlen(*leaves, cu, cu, pos=build_pos(pos, 2), causal=False, backend=backend)
            out.backward(grad_out)
            results.append([out.detach()[others]] + [t.grad[others] for t in leaves])
        changed = [(results[0][i] != results[1][i]).any().item() for i in range(4)]
        assert not any(changed), f"{pos}: out/dq/dk/dv of other documents changed: {changed}"


def test_rope_restarts_per_document(backend):
    """Three documents packed with default offsets give each document exactly what it gets alone (RoPE
    positions restart at 0): the README's example."""
    device = device_of(backend)
    lens = (5, 11, 7)
    gen = torch.Generator().manual_seed(6)
    docs = [[torch.randn(n, 4, 16, generator=gen).to(device) for _ in "qkv"] for n in lens]
    q, k, v = (torch.cat(parts) for parts in zip(*docs))
    cu = cumulative(lens, device)
    out = fused_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), pos="rope", causal=True, backend=backend)
    alone = [fused_attention(*(t.transpose(0, 1)[None] for t in doc), pos="rope", causal=True, backend=backend)
             for doc in docs]
    torch.testing.assert_close(out, torch.cat([a[0].transpose(0, 1) for a in alone]), atol=1e-5, rtol=1e-5)


def test_dynamic_ntk_uses_the_longest_sequence(backend):
    """DynamicNTK's frequencies follow the call's largest position + 1 (max over sequences, as Hugging Face
    computes it over a packed batch): the longest document gets what it gets alone."""
    device = device_of(backend)
    lens = (6, 40)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(sum(lens), 2, 16, generator=gen).to(device) for _ in "qkv")
    pos = RoPE(scaling=DynamicNTK(2.0, original_max_len=16))
    cu = cumulative(lens, device)
    out = fused_attention_varlen(q, k, v, cu, cu, pos=pos, causal=True, backend=backend)
    alone = fused_attention(*(t[6:].transpose(0, 1)[None] for t in (q, k, v)), pos=pos, causal=True, backend=backend)
    torch.testing.assert_close(out[6:], alone[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["alibi_per_sequence_slopes", "rope_yarn", "relative"])
def test_reference_backend_matches_loop(scheme):
    check(Packed(pos=SCHEMES[scheme], kwargs=dict(causal=True, window=5)), "reference")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_packed_call_allocates_nothing_score_sized(monkeypatch):
    """Forward + backward of a packed call allocate nothing of total_q x total_k or max_seqlen_q x
    max_seqlen_k per sequence (the Triton path; the CPU kernels' buffers are per thread tile)."""
    hide_interpreter_copies(monkeypatch)
    lens = (40, 3, 64, 21)
    total, longest, heads, dim = sum(lens), max(lens), 1, 16
    cu = cumulative(lens, DEVICE)
    q, k, v = (torch.randn(total, heads, dim, device=DEVICE, requires_grad=True) for _ in "qkv")
    for backend in ("triton", "reference"):
        with AllocationRecorder() as recorder:
            fused_attention_varlen(q, k, v, cu, cu, pos="alibi", causal=True, backend=backend).sum().backward()
        largest = max(numel(s) for s in recorder.shapes)
        if backend == "reference":  # positive control: the dense oracle does build score-sized tensors
            assert largest >= longest * longest
        else:
            assert largest < longest * longest, recorder.shapes
            assert len([s for s in recorder.shapes if numel(s) >= total * dim]) == 4, recorder.shapes


# --- bad input: each raises a named error before any kernel runs -------------------------------------------

def _args(**override):
    q, k = torch.randn(10, 4, 16), torch.randn(12, 2, 16)
    args = dict(q=q, k=k, v=k.clone(), cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32))
    args.update(override)
    return args


BAD_INPUTS = [
    (dict(q=torch.randn(1, 10, 4, 16)), ValueError, "q must be 3-D"),
    (dict(cu_seqlens_q=[0, 4, 10]), TypeError, "cu_seqlens_q must be a"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 4.0, 10.0])), TypeError, "cu_seqlens_q must be an int32 or int64"),
    (dict(cu_seqlens_k=torch.tensor([[0, 5, 12]])), ValueError, r"cu_seqlens_k must have shape \(S \+ 1,\)"),
    (dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32)), ValueError, "S >= 1"),
    (dict(cu_seqlens_q=torch.tensor([0, 10], dtype=torch.int32)), ValueError, "same length S"),
    (dict(cu_seqlens_q=torch.tensor([1, 4, 10])), ValueError, "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 10], device="meta")), ValueError, "cu_seqlens_q must be on q's device"),
    (dict(cu_seqlens_k=torch.tensor([0, 7, 5, 12]), cu_seqlens_q=torch.tensor([0, 4, 4, 10])), ValueError,
     "cu_seqlens_k must be non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9])), ValueError, r"last entry must equal total_q = q.shape\[0\] = 10"),
    (dict(max_seqlen_q=5), ValueError, "max_seqlen_q=5 is smaller than the longest sequence"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0"),
    (dict(max_seqlen_k=7.0), TypeError, "max_seqlen_k must be a Python int"),
    (dict(max_seqlen_q=torch.tensor(6)), TypeError, "max_seqlen_q must be a Python int"),
    (dict(q_offset=torch.tensor([1, 2, 3])), ValueError, r"q_offset must have shape \(S,\)=\(2,\)"),
    (dict(k_offset=1.5), TypeError, r"k_offset must be an int or a \(S,\) integer tensor"),
    (dict(pos=ALiBi(torch.rand(3, 4))), ValueError, "ALiBi slopes must have shape"),
    (dict(k=torch.randn(12, 3, 16), v=torch.randn(12, 3, 16)), ValueError, "multiple of key/value heads"),
    (dict(v=torch.randn(11, 2, 16)), ValueError, "k and v must have the same shape"),
    (dict(q=torch.randn(10, 4, 16, dtype=torch.float64)), TypeError, "q, k, v must share a dtype"),
]


@pytest.mark.parametrize("override,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_raises_named_error(override, error, message):
    with pytest.raises(error, match=message):
        fused_attention_varlen(**_args(**override), backend="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scheme", ["alibi_per_sequence_slopes", "rope_yarn", "relative"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_packed_documents(backend_name, head_dim, scheme, dtype):
    """On a GPU (make gpu-check): documents of 1 to 1500 tokens, GQA, both GPU backends, half precision."""
    from fused_pos_attn.backends import cuda_backend
    if backend_name == "cuda" and not cuda_backend.built_with_cuda():
        pytest.skip("the CUDA C++ kernels are not built")
    check(Packed(lens_q=(1, 700, 0, 1500, 33), heads_q=4, heads_kv=2, head_dim=head_dim, pos=SCHEMES[scheme],
                 kwargs=dict(causal=True)), backend_name, dtype)
