"""The CUDA C++ backend (csrc/cuda, backend="cuda") against the dense fp64 reference, with DESIGN.md's
tolerance rule (tests/tolerance.py), forward and backward, including the relative table's gradient.

GPU tests (marker `gpu`) need a CUDA device and an extension built with the CUDA kernels; the selection
tests at the end run everywhere. The cases reuse the backend matrix's machinery (test_attention_backends).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_pos_attn import ALiBi, RoPE, backends, fused_attention
from fused_pos_attn.backends import cpu_backend, cuda_backend, native
from fused_pos_attn.positions import ResolvedPosition
from fused_pos_attn.spec import AttentionSpec
from test_attention_backends import SCHEMES, Case, RelativeTable, check_case
from test_native_lse_grad import check_lse_case
from test_native_varlen import check_against_reference, check_garbage_cu_seqlens, make_packed

BUILT_WITH_CUDA = native.built_with_cuda()
LOW_PRECISION = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]
CUDA_SCHEMES = dict(SCHEMES, rope_partial_64=RoPE(rotary_dim=64, theta=500.0),
                    relative_far=RelativeTable(num_buckets=8, max_distance=5))


def gpu_test(fn):
    """Marker `gpu` (skipped without a CUDA device) and skipped when the CUDA kernels were not built."""
    fn = pytest.mark.skipif(not BUILT_WITH_CUDA, reason="extension built without the CUDA kernels")(fn)
    return pytest.mark.gpu(fn)


@gpu_test
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scheme", list(CUDA_SCHEMES))
def test_schemes(scheme, causal, dtype, head_dim):
    """Every scheme (rotate-half / interleaved / partial RoPE, relative with distances past max_distance)."""
    check_case(Case(seq_q=97, seq_k=130, head_dim=head_dim, pos=CUDA_SCHEMES[scheme], kwargs=dict(causal=causal)),
               dtype, "cuda")


@gpu_test
@pytest.mark.parametrize("window", [1, 33, 300])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scheme", ["none", "alibi", "rope", "relative"])
def test_sliding_window(scheme, causal, window):
    check_case(Case(seq_q=200, seq_k=255, head_dim=64, pos=SCHEMES[scheme],
                    kwargs=dict(causal=causal, window=window)), torch.float16, "cuda")


@gpu_test
@pytest.mark.parametrize("heads_q,heads_kv", [(8, 8), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("scheme", ["alibi", "rope", "relative"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_grouped_query(heads_q, heads_kv, scheme, head_dim):
    check_case(Case(heads_q=heads_q, heads_kv=heads_kv, seq_q=70, seq_k=140, head_dim=head_dim,
                    pos=SCHEMES[scheme], kwargs=dict(causal=True)), torch.bfloat16, "cuda")


@gpu_test
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1025), (1, 17), (3, 257), (300, 100), (255, 255), (1025, 1025)],
                         ids=["decode", "decode_short", "chunk", "nq_gt_nk", "square_255", "square_1025"])
@pytest.mark.parametrize("scheme", ["none", "alibi", "rope_partial_interleaved", "relative"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_sequence_lengths(seq_q, seq_k, scheme, head_dim):
    """Nq > Nk with causal leaves the first rows without a visible key (zeros, LSE -inf, zero gradients)."""
    check_case(Case(batch=1, heads_q=2, heads_kv=1, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
                    pos=SCHEMES[scheme], kwargs=dict(causal=True)), torch.float16, "cuda")


@gpu_test
@pytest.mark.parametrize("scheme", ["alibi", "rope", "rope_interleaved", "relative"])
@pytest.mark.parametrize("window", [None, 9])
def test_per_batch_offsets(scheme, window):
    """KV cache of different lengths, a shard with global positions, positions beyond int32."""
    kwargs = dict(causal=True, window=window, q_offset=torch.tensor([30, 3_000_000_000]),
                  k_offset=torch.tensor([5, 3_000_000_000 - 20]))
    pos = SCHEMES[scheme]
    if scheme.startswith("rope"):  # keep RoPE angles well conditioned at 3e9 in fp32
        pos = RoPE(theta=10000.0 ** 8, interleaved=scheme == "rope_interleaved")
    check_case(Case(seq_q=17, seq_k=100, head_dim=64, pos=pos, kwargs=kwargs), torch.float16, "cuda")


@gpu_test
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp16", "bf16"])
def test_alibi_per_batch_slopes_scale_and_non_causal(dtype):
    slopes = torch.rand(2, 4, generator=torch.Generator().manual_seed(1)) * 0.5
    check_case(Case(seq_q=65, seq_k=129, head_dim=128, pos=ALiBi(slopes), kwargs=dict(scale=0.3)), dtype, "cuda")


@gpu_test
@pytest.mark.parametrize("layout", ["bnhd", "strided_d"])
@pytest.mark.parametrize("scheme", ["alibi", "rope", "relative"])
def test_non_contiguous_inputs(layout, scheme):
    """bnhd: read in place (16-byte copies); strided_d: copied to unit head-dim stride by the backend."""
    check_case(Case(seq_q=70, seq_k=90, head_dim=64, layout=layout, pos=SCHEMES[scheme], kwargs=dict(causal=True)),
               torch.float16, "cuda")


@gpu_test
@pytest.mark.parametrize("scheme", ["none", "rope", "relative"])
def test_unaligned_rows_use_element_copies(scheme):
    """Row strides that are not a multiple of 8 elements (and an odd base offset) take the kernels' element-wise
    tile copies instead of cp.async; results must not change."""
    gen = torch.Generator().manual_seed(3)

    def unaligned(h, n):
        return torch.randn(2, h, n, 64 + 3, generator=gen).to("cuda", torch.float16)[..., 1:65]

    q, k, v = unaligned(4, 50), unaligned(2, 70), unaligned(2, 70)
    assert q.stride(-1) == 1 and q.stride(2) % 8 != 0
    grad_out = torch.randn(q.shape, generator=gen).to("cuda")
    results = {}
    for name, tensors in (("unaligned", (q, k, v)), ("contiguous", tuple(t.contiguous() for t in (q, k, v)))):
        leaves = [t.detach().clone().requires_grad_() if name == "contiguous" else t.detach().requires_grad_()
                  for t in tensors]
        pos = SCHEMES[scheme].build(4) if isinstance(SCHEMES[scheme], RelativeTable) else SCHEMES[scheme]
        out, lse = fused_attention(*leaves, pos, causal=True, return_lse=True, backend="cuda")
        out.backward(grad_out.to(out.dtype))
        results[name] = (out, lse, *(t.grad for t in leaves))
    # Same math in the same order, so bit-identical; dq sums key blocks with atomics (any order): 1 ulp.
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), results["unaligned"], results["contiguous"]):
        torch.testing.assert_close(a, b, rtol=2e-3 if name == "dq" else 0, atol=1e-5 if name == "dq" else 0)


@gpu_test
def test_bnhd_view_is_not_copied_and_output_keeps_layout():
    x = torch.randn(1, 19, 2, 64, device="cuda", dtype=torch.float16).transpose(1, 2)
    out = fused_attention(x, x, x, "rope", causal=True, backend="cuda")
    assert out.stride() == x.stride()


@gpu_test
@pytest.mark.parametrize("scheme", ["alibi", "relative"])
def test_rows_without_visible_key_are_zero_with_neg_inf_lse(scheme):
    q = torch.randn(1, 2, 80, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    pos = SCHEMES[scheme].build(2) if scheme == "relative" else scheme
    out, lse = fused_attention(q, k, k, pos, causal=True, return_lse=True, backend="cuda")
    assert torch.all(out[:, :, :64] == 0) and torch.all(torch.isneginf(lse[:, :, :64]))
    assert torch.isfinite(lse[:, :, 64:]).all() and not torch.isnan(out).any()
    out.float().sum().backward()
    assert torch.all(q.grad[:, :, :64] == 0) and not torch.isnan(q.grad).any() and not torch.isnan(k.grad).any()


@gpu_test
def test_relative_table_gradient_of_the_op():
    """attention_backward's d_rel_bias (Hq, 2, max_distance + 1) equals autograd through a dense bias built
    from the same distance table."""
    gen = torch.Generator().manual_seed(5)
    b, h, n, d, max_distance = 2, 4, 150, 64, 9
    q, k, v, grad_out = (torch.randn(b, h, n, d, generator=gen).to("cuda", torch.float16) for _ in range(4))
    rel_bias = torch.randn(h, 2, max_distance + 1, generator=gen).cuda()
    offsets = torch.zeros(b, dtype=torch.int64, device="cuda")
    spec = AttentionSpec(causal=True, scale=d ** -0.5, window=None, q_offset=offsets, k_offset=offsets,
                         position=ResolvedPosition("relative", rel_bias=rel_bias, max_distance=max_distance))
    args = native.op_args(spec, q)
    out, lse = torch.ops.fused_pos_attn.attention_forward(q, k, v, **args)
    d_rel = torch.ops.fused_pos_attn.attention_backward(grad_out, None, q, k, v, out, lse, True, **args)[3]
    no_table = torch.ops.fused_pos_attn.attention_backward(grad_out, None, q, k, v, out, lse, False, **args)[3]
    assert no_table.numel() == 0

    table = rel_bias.double().requires_grad_()
    rel = torch.arange(n, device="cuda")[:, None] - torch.arange(n, device="cuda")[None, :]  # pq - pk
    index = (rel < 0).long() * (max_distance + 1) + rel.abs().clamp(max=max_distance)
    bias = table.reshape(h, -1)[:, index]  # (h, n, n)
    scores = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5 + bias
    scores = scores.masked_fill(rel < 0, float("-inf"))
    ref_out = torch.softmax(scores, dim=-1) @ v.double()
    ref_out.backward(grad_out.double())
    assert d_rel.shape == (h, 2, max_distance + 1) and d_rel.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=5e-3, rtol=0)
    torch.testing.assert_close(d_rel.double(), table.grad, atol=2e-2 * max(1.0, table.grad.abs().max().item()),
                               rtol=0)


@gpu_test
@pytest.mark.parametrize("loss", ["out_and_lse", "lse_only"])
@pytest.mark.parametrize("scheme", ["alibi", "rope", "relative"])
def test_lse_gradient(scheme, loss):
    """A gradient through lse (delta = rowsum(dO * O) - dLSE), with rows that see no key (Nq > Nk, causal)."""
    check_lse_case(Case(batch=2, heads_q=4, heads_kv=2, seq_q=150, seq_k=97, head_dim=64, pos=SCHEMES[scheme],
                        kwargs=dict(causal=True)), torch.float16, "cuda", loss)


@gpu_test
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 2), heads_kv=st.integers(1, 2), group=st.integers(1, 3), seq_q=st.integers(1, 200),
       seq_k=st.integers(1, 200), head_dim=st.sampled_from(HEAD_DIMS), scheme=st.sampled_from(list(CUDA_SCHEMES)),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 70)), bf16=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_property_random_shapes(batch, heads_kv, group, seq_q, seq_k, head_dim, scheme, causal, window, bf16, seed):
    check_case(Case(batch=batch, heads_q=heads_kv * group, heads_kv=heads_kv, seq_q=seq_q, seq_k=seq_k,
                    head_dim=head_dim, pos=CUDA_SCHEMES[scheme], kwargs=dict(causal=causal, window=window)),
               torch.bfloat16 if bf16 else torch.float16, "cuda", seed)


@gpu_test
def test_unsupported_inputs_raise_before_any_kernel():
    q = torch.randn(1, 2, 8, 80, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"backend='cuda' supports head dim D in \(64, 128\), got head dim D=80"):
        fused_attention(q, q, q, backend="cuda")
    q = torch.randn(1, 2, 8, 64, device="cuda")
    with pytest.raises(TypeError, match=r"backend='cuda' supports float16 and bfloat16; got torch.float32"):
        fused_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cuda' needs CUDA tensors, got device cpu"):
        fused_attention(*(torch.randn(1, 2, 8, 64, dtype=torch.float16),) * 3, backend="cuda")


# Packed (varlen) sequences (test_native_varlen's helpers; the same cases run on the kernels' CPU emulation in
# test_cuda_emulated.py): sequences longer than one block, empty, length 1, queries without keys and keys without
# queries, per-sequence offsets and ALiBi slopes, against the reference on each sequence alone.
VARLEN_SCHEMES = dict(none="none", alibi="alibi", rope="rope",
                      rope_partial_interleaved=RoPE(rotary_dim=24, interleaved=True), relative=(8, 5))


@gpu_test
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scheme", list(VARLEN_SCHEMES))
def test_varlen(scheme, causal, dtype, head_dim):
    p = make_packed(VARLEN_SCHEMES[scheme], (70, 0, 1, 300, 129, 5), (90, 3, 0, 300, 129, 17), heads=4, kv_heads=2,
                    head_dim=head_dim, dtype=dtype, causal=causal, window=200 if causal else None, device="cuda")
    check_against_reference(cuda_backend, p, dtype, f"{scheme} causal={causal}")


@gpu_test
@pytest.mark.parametrize("layout", ["qkv", "packed"])
def test_varlen_self_attention_layouts(layout):
    """q / k / v slices of one (total, Hq + 2 Hkv, D) tensor, or separate packed tensors; relative table gradient."""
    p = make_packed((16, 12), (64, 1, 0, 257), heads=4, kv_heads=2, head_dim=64, dtype=torch.float16, layout=layout,
                    device="cuda")
    check_against_reference(cuda_backend, p, torch.float16, layout)


@gpu_test
@pytest.mark.parametrize("max_seqlen", ["truncating", "huge"])
def test_varlen_garbage_cu_seqlens_stay_in_bounds(max_seqlen):
    check_garbage_cu_seqlens(cuda_backend, torch.float16, 64, max_seqlen, device="cuda", dq_zero_outside=True)


# ---------------------------------------------------------------------------------------- selection, everywhere

def test_auto_never_selects_the_cuda_kernels():
    q = torch.randn(1, 2, 8, 64)
    assert backends.select("auto", q) is cpu_backend
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        from fused_pos_attn.backends import triton_backend
        assert backends.select("auto", q.to("cuda", torch.float16)) is triton_backend


@pytest.mark.skipif(BUILT_WITH_CUDA, reason="the extension has the CUDA kernels")
def test_cuda_backend_not_built_message():
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"backend='cuda' \(the CUDA C\+\+ kernels\) is not built in this "
                                         r"installation .*use backend='triton' or 'auto' for CUDA tensors"):
        backends.select("cuda", q)


@pytest.mark.parametrize("layout", ["strided_d", "bnhd"])
def test_cuda_backend_copies_only_non_unit_head_dim_stride(layout, monkeypatch):
    """The backend hands tensors with unit head-dim stride to the op unchanged and copies the others."""
    from fused_pos_attn.backends import cuda_backend
    seen = {}
    monkeypatch.setattr(native, "forward", lambda q, k, v, spec: seen.update(q=q, k=k, v=v))
    x = torch.randn(1, 3, 2, 128)
    x = x[..., ::2] if layout == "strided_d" else x.transpose(1, 2)
    cuda_backend.forward(x, x, x, spec=None)
    assert seen["q"].stride(-1) == 1
    assert (seen["q"].data_ptr() == x.data_ptr()) == (layout == "bnhd")
