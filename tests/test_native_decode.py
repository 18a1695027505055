"""The native CPU decode path (csrc/cpu/attention_decode.cpp: <= 16 query rows per sequence): GQA groups
scored together, keys split across threads when B x Hkv is below the thread count, RoPE key tables cached
across calls. Against the dense fp64 reference, for every scheme, with the split taken and not."""
import pytest
import torch

from fused_pos_attn import ALiBi, RelativeBias, RoPE, YaRN, fused_attention
from tolerance import assert_close_to_reference, max_err

SCHEMES = {
    "none": lambda heads: "none",
    "alibi": lambda heads: ALiBi(),
    "rope": lambda heads: RoPE(theta=1e4),
    "rope_yarn_partial": lambda heads: RoPE(theta=1e4, rotary_dim=16, interleaved=True,
                                            scaling=YaRN(4.0, original_max_len=512)),
    "t5": lambda heads: RelativeBias(torch.randn(heads, 16, generator=torch.Generator().manual_seed(3)),
                                     max_distance=300),
}


def _check(q, k, v, pos, threads, **kwargs):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = fused_attention(q, k, v, pos, backend="cpu", return_lse=True, **kwargs)
    finally:
        torch.set_num_threads(previous)
    ref, ref_lse = fused_attention(q.double(), k.double(), v.double(), pos, backend="reference", return_lse=True,
                                   **kwargs)
    scale = max(1.0, ref.abs().max().item())
    assert max_err(out, ref) <= 2e-5 * scale, f"out error {max_err(out, ref):.2e}"
    finite = ref_lse[torch.isfinite(ref_lse)]
    assert max_err(lse, ref_lse) <= 2e-5 * max([1.0] + finite.abs().tolist()), f"lse error {max_err(lse, ref_lse):.2e}"


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("threads,heads", [(1, (4, 4)), (2, (4, 1)), (4, (8, 2))])
def test_decode_matches_reference(scheme, threads, heads):
    """Nq 1 and 5 over 2600 keys, B = 1: with 2 and 4 threads the keys split into one task per thread."""
    hq, hkv = heads
    gen = torch.Generator().manual_seed(0)
    for nq in (1, 5):
        q = torch.randn(1, hq, nq, 32, generator=gen)
        k, v = (torch.randn(1, hkv, 2600, 32, generator=gen) for _ in range(2))
        _check(q, k, v, SCHEMES[scheme](hq), threads, causal=True)


@pytest.mark.parametrize("scheme", ["alibi", "rope", "t5"])
def test_decode_window_offsets_and_rows_without_keys(scheme):
    """A window, per-batch offsets (one past the cached RoPE positions, 2^17), queries before every key
    (empty rows: out 0, lse -inf), non-causal, 16 query rows (the path's limit), strided inputs."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 16, 4, 64, generator=gen).transpose(1, 2)  # (B, H, Nq, D) view of (B, Nq, H, D)
    k, v = (torch.randn(2, 3000, 2, 64, generator=gen).transpose(1, 2) for _ in range(2))
    offsets = torch.tensor([0, (1 << 17) - 1500])
    _check(q, k, v, SCHEMES[scheme](4), 2, causal=True, window=700, q_offset=offsets + 2990, k_offset=offsets)
    _check(q, k, v, SCHEMES[scheme](4), 2, causal=False, q_offset=offsets + 2990, k_offset=offsets)
    _check(q, k, v, SCHEMES[scheme](4), 2, causal=True, q_offset=offsets - 20, k_offset=offsets)  # no key visible


def test_rope_table_cache_grows_and_is_keyed_by_frequencies():
    """Calls at growing positions and with other frequencies reuse or rebuild the cached tables correctly."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 1, 32, generator=gen)
    for theta, length in [(1e4, 100), (1e4, 5000), (5e5, 5000), (1e4, 20000), (1e4, 300)]:
        k, v = (torch.randn(1, 2, length, 32, generator=gen) for _ in range(2))
        _check(q, k, v, RoPE(theta=theta), 2, causal=True)


def test_decode_bf16_within_the_rule():
    """bf16 inputs (a split over 2 threads, GQA 4): DESIGN.md's rule against the fp64 reference."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 8, 3, 64, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 2500, 64, generator=gen).bfloat16() for _ in range(2))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = fused_attention(q, k, v, RoPE(), causal=True, backend="cpu")
    finally:
        torch.set_num_threads(previous)
    ref64 = fused_attention(q.double(), k.double(), v.double(), RoPE(), causal=True, backend="reference")
    same_dtype = fused_attention(q, k, v, RoPE(), causal=True, backend="reference")
    assert_close_to_reference(out, ref64, same_dtype, 2.0, "out")
