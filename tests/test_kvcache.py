"""fused_attention_with_kvcache: contiguous and paged caches, per-row lengths, new tokens written in place.

The oracle is the dense fp64 reference run row by row on that row's keys alone (cache rows [0, cache_seqlens[b])
then the new tokens), at the cache's positions (query i at cache_seqlens[b] + i): it shares no code with the
KV-cache path (no seqused_k, no pages). The paged call is also compared with the contiguous call on the same
keys laid out in pages, and the cache is checked to change at the new tokens' slots only.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_pos_attn import ALiBi, RoPE, fused_attention, fused_attention_with_kvcache
from kernel_backends import backend, device_of  # noqa: F401  (backend: a parametrized fixture)
from test_native_decode import SCHEMES
from tolerance import assert_close_to_reference, max_err


def _row_keys(cache: torch.Tensor, block_table, b: int, length: int) -> torch.Tensor:
    """Row b's first `length` logical cache rows (length, Hkv, D), read from a contiguous or paged cache."""
    if block_table is None:
        return cache[b, :length]
    return torch.cat([cache[page] for page in block_table[b].tolist()])[:length]


def _oracle(q, k_cache, v_cache, lengths, pos, block_table=None, k_new=None, v_new=None, dtype=torch.float64,
            **kwargs):
    """(out (B, Nq, Hq, D), lse (B, Hq, Nq)) of the dense reference in dtype, row by row, from the cache as it
    was before the call (k_new / v_new appended after each row's cache_seqlens, or already in the cache)."""
    seq_q = q.shape[1]
    outs, lses = [], []
    for b, length in enumerate(lengths):
        if k_new is None:
            keys, values = (_row_keys(c, block_table, b, length + seq_q) for c in (k_cache, v_cache))
        else:
            keys = torch.cat([_row_keys(k_cache, block_table, b, length), k_new[b]])
            values = torch.cat([_row_keys(v_cache, block_table, b, length), v_new[b]])
        out, lse = fused_attention(*(t[None].transpose(1, 2).to(dtype) for t in (q[b], keys, values)), pos,
                                   q_offset=length, k_offset=0, backend="reference", return_lse=True, **kwargs)
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _check(q, k_cache, v_cache, lengths, pos, backend, block_table=None, k_new=None, v_new=None, **kwargs):
    """Run the call on copies of the cache and check it against the oracle (tolerance rule); returns out."""
    kwargs.setdefault("causal", True)  # the KV-cache call's default; fused_attention's is False
    ref64, ref_lse64 = _oracle(q, k_cache, v_cache, lengths, pos, block_table, k_new, v_new, **kwargs)
    same, same_lse = _oracle(q, k_cache, v_cache, lengths, pos, block_table, k_new, v_new, dtype=q.dtype, **kwargs)
    k_run, v_run = k_cache.clone(), v_cache.clone()
    out, lse = fused_attention_with_kvcache(q, k_run, v_run, torch.tensor(lengths, device=q.device), pos,
                                            block_table=block_table, k_new=k_new, v_new=v_new, return_lse=True,
                                            backend=backend, **kwargs)
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close_to_reference(out.cpu(), ref64.cpu(), same.cpu(), 2.0, "out", q.dtype)
    assert_close_to_reference(lse.cpu(), ref_lse64.cpu(), same_lse.cpu(), 2.0, "lse", q.dtype)
    return out


def _inputs(batch, seq_q, heads, max_len, head_dim=32, dtype=torch.float32, device="cpu", seed=0):
    """q (B, Nq, Hq, D), a contiguous cache (B, max_len, Hkv, D) x 2, and new keys / values (B, Nq, Hkv, D)."""
    hq, hkv = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, hq, head_dim, generator=gen)
    k_cache, v_cache = (torch.randn(batch, max_len, hkv, head_dim, generator=gen) for _ in range(2))
    k_new, v_new = (torch.randn(batch, seq_q, hkv, head_dim, generator=gen) for _ in range(2))
    return (t.to(device=device, dtype=dtype) for t in (q, k_cache, v_cache, k_new, v_new))


def _paged(cache: torch.Tensor, page_size: int, num_pages: int, seed: int = 0):
    """A contiguous cache (B, max_len, Hkv, D) laid out in num_pages random pages of page_size rows: (pages,
    block_table (B, max_len / page_size) int32). Unused pages hold noise."""
    batch, max_len, hkv, head_dim = cache.shape
    per_row = max_len // page_size
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_pages, generator=gen)[:batch * per_row]
    pages = torch.randn(num_pages, page_size, hkv, head_dim, generator=gen).to(cache)
    pages[order] = cache.reshape(batch * per_row, page_size, hkv, head_dim)
    return pages, order.view(batch, per_row).to(device=cache.device, dtype=torch.int32)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
def test_kvcache_matches_reference(scheme, heads, backend):  # noqa: F811
    """Per-row lengths 0, 16 (a page boundary) and 37; Nq 1 and 5; contiguous and paged (page size 16) caches
    give the oracle's output, and the same output as each other."""
    device = device_of(backend)
    for seq_q in (1, 5):
        q, k_cache, v_cache, k_new, v_new = _inputs(3, seq_q, heads, 48, device=device, seed=seq_q)
        pos = SCHEMES[scheme](heads[0])
        lengths = [0, 16, 37]
        out = _check(q, k_cache, v_cache, lengths, pos, backend, k_new=k_new, v_new=v_new)
        k_pages, block_table = _paged(k_cache, 16, 13)
        v_pages, _ = _paged(v_cache, 16, 13)
        out_paged = _check(q, k_pages, v_pages, lengths, pos, backend, block_table=block_table, k_new=k_new,
                           v_new=v_new)
        assert max_err(out_paged, out) <= 1e-6, f"paged != contiguous: {max_err(out_paged, out):.2e}"


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("causal,window", [(True, 7), (False, None), (False, 9)])
def test_kvcache_window_and_non_causal(paged, causal, window, backend):  # noqa: F811
    """A left window (keys far behind dropped) and non-causal calls (the new tokens see each other both ways;
    cache rows past cache_seqlens + Nq stay out), new tokens already in the cache (k_new None)."""
    q, k_cache, v_cache, _, _ = _inputs(2, 4, (4, 2), 32, device=device_of(backend), seed=5)
    block_table = None
    if paged:
        (k_cache, block_table), (v_cache, _) = _paged(k_cache, 8, 9), _paged(v_cache, 8, 9)
    _check(q, k_cache, v_cache, [3, 20], ALiBi(), backend, block_table=block_table, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kvcache_half_precision_cpu(dtype):
    """fp16 / bf16 on the native kernels, paged, RoPE and ALiBi, within the tolerance rule."""
    q, k_cache, v_cache, k_new, v_new = _inputs(2, 3, (8, 2), 64, head_dim=64, dtype=dtype, seed=2)
    (k_pages, block_table), (v_pages, _) = _paged(k_cache, 16, 10), _paged(v_cache, 16, 10)
    for pos in (RoPE(theta=1e4), ALiBi()):
        _check(q, k_pages, v_pages, [30, 61], pos, "cpu", block_table=block_table, k_new=k_new, v_new=v_new)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_chunked_prefill(backend_name, paged):
    """Nq = 40 new tokens (more rows than the decode paths take: the CPU's paged call in query chunks, the
    contiguous one through the general forward with per-row key counts; Triton's prefill-shaped grid)."""
    if backend_name == "triton":
        pytest.importorskip("triton")
    q, k_cache, v_cache, k_new, v_new = _inputs(2, 40, (4, 2), 96, device=device_of(backend_name), seed=4)
    block_table = None
    if paged:
        (k_cache, block_table), (v_cache, _) = _paged(k_cache, 16, 14), _paged(v_cache, 16, 14)
    _check(q, k_cache, v_cache, [0, 50], RoPE(theta=1e4), backend_name, block_table=block_table, k_new=k_new,
           v_new=v_new)


def test_float64_contiguous_cache_cpu():
    """fp64 (the CPU's general forward, which reads per-row key counts) on a contiguous cache, Nq 1 and 3."""
    for seq_q in (1, 3):
        q, k_cache, v_cache, k_new, v_new = _inputs(2, seq_q, (4, 2), 40, dtype=torch.float64, seed=9)
        _check(q, k_cache, v_cache, [0, 30], ALiBi(), "cpu", k_new=k_new, v_new=v_new)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_new_tokens_land_in_their_slots_only(paged):
    """k_new / v_new are written at rows cache_seqlens[b] + i of each row (through the block table when paged);
    every other cache entry keeps its value."""
    q, k_cache, v_cache, k_new, v_new = _inputs(3, 4, (4, 2), 32, seed=6)
    lengths = [0, 13, 28]
    block_table = None
    if paged:
        (k_cache, block_table), (v_cache, _) = _paged(k_cache, 8, 15), _paged(v_cache, 8, 15)
    k_run, v_run = k_cache.clone(), v_cache.clone()
    fused_attention_with_kvcache(q, k_run, v_run, torch.tensor(lengths), "rope", block_table=block_table,
                                 k_new=k_new, v_new=v_new, backend="cpu")
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    for b, length in enumerate(lengths):
        for i in range(q.shape[1]):
            row = length + i
            slot = (b, row) if not paged else (int(block_table[b, row // 8]), row % 8)
            k_expect[slot], v_expect[slot] = k_new[b, i], v_new[b, i]
    assert torch.equal(k_run, k_expect) and torch.equal(v_run, v_expect)


@settings(max_examples=25, deadline=None)
@given(page_size=st.sampled_from([1, 3, 16, 32, 64, 80]), seq_q=st.integers(1, 16), data=st.data())
def test_paged_any_page_size_and_lengths(page_size, seq_q, data):
    """Any page size (FlashAttention needs multiples of 256), random lengths (0 and page ends included) and
    random block tables, on the native kernels with the key split across 2 threads: pages below 64 rows gathered
    row by row, larger ones read in page-long runs."""
    pages_per_row = max(1, -(-(64 + seq_q) // page_size))
    capacity = pages_per_row * page_size
    lengths = data.draw(st.lists(st.sampled_from([0, min(page_size, capacity - seq_q), capacity - seq_q])
                                 | st.integers(0, capacity - seq_q),
                                 min_size=1, max_size=3))
    q, k_cache, v_cache, k_new, v_new = _inputs(len(lengths), seq_q, (4, 2), capacity, seed=seq_q)
    (k_pages, block_table), (v_pages, _) = (_paged(c, page_size, len(lengths) * pages_per_row + 2, seed=page_size)
                                            for c in (k_cache, v_cache))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(q, k_pages, v_pages, lengths, ALiBi(), "cpu", block_table=block_table, k_new=k_new, v_new=v_new)
    finally:
        torch.set_num_threads(previous)


def test_output_carries_no_gradient():
    """Forward only: a q that requires grad gives an output outside the autograd graph (nothing to backprop)."""
    q, k_cache, v_cache, _, _ = _inputs(1, 2, (2, 2), 16)
    out = fused_attention_with_kvcache(q.requires_grad_(), k_cache, v_cache, 5, "alibi", backend="cpu")
    assert not out.requires_grad


def _bad_calls():
    """(kwargs overriding a valid paged call, exception, message): each must raise before the cache changes."""
    gen = torch.Generator().manual_seed(7)
    k_new = torch.randn(2, 3, 2, 16, generator=gen)
    return [
        (dict(block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)), ValueError,
         r"block_table entries must be page indices in \[0, num_pages=4\), got 9"),
        (dict(block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)), ValueError, "got -1"),
        (dict(block_table=torch.tensor([[0.0, 1.0], [2.0, 3.0]])), TypeError, "block_table must be an int32 or int64"),
        (dict(block_table=torch.tensor([[0, 1]], dtype=torch.int32)), ValueError, r"block_table must have shape"),
        (dict(cache_seqlens=torch.tensor([0, 14])), ValueError, r"cache too short: cache_seqlens 14 \+ Nq 3"),
        (dict(cache_seqlens=torch.tensor([0, -1])), ValueError, "cache_seqlens must be >= 0"),
        (dict(cache_seqlens=torch.tensor([1.0, 2.0])), TypeError, "cache_seqlens must be an integer tensor"),
        (dict(cache_seqlens=torch.tensor([1, 2, 3])), ValueError, r"cache_seqlens must have shape \(B,\)"),
        (dict(v_new=None), ValueError, "k_new and v_new must be given together"),
        (dict(k_new=k_new[:, :2]), ValueError, r"k_new must have shape \(B, Nq, Hkv, D\)"),
        (dict(k_new=k_new.half()), ValueError, "k_new must have q's dtype"),
        (dict(window=0), ValueError, "window must be a positive int"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(pos="sinusoidal"), ValueError, "pos"),
    ]


@pytest.mark.parametrize("override,error,message", _bad_calls())
def test_bad_input_raises_before_any_write(override, error, message):
    """Every invalid argument raises a clear error naming it, and the cache is left as it was."""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 3, 4, 16, generator=gen)
    k_pages, v_pages = (torch.randn(4, 8, 2, 16, generator=gen) for _ in range(2))
    args = dict(cache_seqlens=torch.tensor([2, 10]), pos="rope", block_table=torch.tensor([[0, 1], [2, 3]]),
                k_new=torch.randn(2, 3, 2, 16, generator=gen), v_new=torch.randn(2, 3, 2, 16, generator=gen),
                causal=True, window=None)
    args.update(override)
    k_before, v_before = k_pages.clone(), v_pages.clone()
    with pytest.raises(error, match=message):
        fused_attention_with_kvcache(q, k_pages, v_pages, args.pop("cache_seqlens"), args.pop("pos"), **args,
                                     backend="cpu")
    assert torch.equal(k_pages, k_before) and torch.equal(v_pages, v_before)


def test_bad_cache_layouts():
    """Caches of the wrong rank, batch or head count, and pages whose rows are not consecutive."""
    q = torch.randn(2, 1, 4, 16)
    with pytest.raises(ValueError, match=r"k_cache must be 4-D"):
        fused_attention_with_kvcache(q, torch.randn(2, 8, 16), torch.randn(2, 8, 16), 0)
    with pytest.raises(ValueError, match=r"k_cache must have q's batch size B=2"):
        fused_attention_with_kvcache(q, torch.randn(3, 8, 2, 16), torch.randn(3, 8, 2, 16), 0)
    with pytest.raises(ValueError, match=r"multiple of key/value heads"):
        fused_attention_with_kvcache(q, torch.randn(2, 8, 3, 16), torch.randn(2, 8, 3, 16), 0)
    pages = torch.randn(8, 4, 2, 16).transpose(0, 1)  # (4 pages, 8 rows): rows of a page are not consecutive
    with pytest.raises(ValueError, match=r"pages must hold their rows consecutively"):
        fused_attention_with_kvcache(q, pages, pages, 0, block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"paged caches take float16, bfloat16 or float32"):
        fused_attention_with_kvcache(q.double(), pages.double().contiguous(), pages.double().contiguous(), 0,
                                     block_table=torch.zeros(2, 1, dtype=torch.int32), backend="cpu")


def test_under_torch_compile():
    """A compiled decode step (graph breaks where cache_seqlens / block_table are read back for the checks) gives
    the eager step's output and leaves the cache as the eager step does."""
    q, k_cache, v_cache, k_new, v_new = _inputs(2, 1, (4, 2), 32, seed=10)
    (k_pages, block_table), (v_pages, _) = _paged(k_cache, 8, 9), _paged(v_cache, 8, 9)
    lengths = torch.tensor([3, 20])

    def step(q, k_pages, v_pages, k_new, v_new):
        return fused_attention_with_kvcache(q, k_pages, v_pages, lengths, "rope", block_table=block_table,
                                            k_new=k_new, v_new=v_new, backend="cpu")

    k_eager, v_eager, k_compiled, v_compiled = k_pages.clone(), v_pages.clone(), k_pages.clone(), v_pages.clone()
    eager = step(q, k_eager, v_eager, k_new, v_new)
    compiled = torch.compile(step)(q, k_compiled, v_compiled, k_new, v_new)
    assert torch.equal(compiled, eager)
    assert torch.equal(k_compiled, k_eager) and torch.equal(v_compiled, v_eager)
