"""Inference with positions in-kernel: a KV cache of UN-rotated keys, prefill, then decode token by token
(or in chunks: Nq < Nk) with per-row cache lengths as q_offset, must equal one causal call over the whole
sequence. B=2 rows with different prompt lengths share one right-padded cache."""
import pytest
import torch

from fused_pos_attn import ALiBi, Llama3, RoPE, YaRN, fused_attention
from test_attention_backends import HAS_TRITON
from tolerance import assert_close_to_reference

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCHEMES = {
    "rope": RoPE(theta=5e5),
    "rope_yarn": RoPE(scaling=YaRN(4.0, original_max_len=8)),
    "rope_llama3_partial_interleaved": RoPE(rotary_dim=8, interleaved=True, scaling=Llama3(8.0, 1.0, 4.0, 16)),
    "alibi": ALiBi(),
}


def append_and_attend(q, k, v, k_cache, v_cache, lens, pos, backend):
    """One cached attention step (README example): write this step's k, v (B, Hkv, C, D) at positions
    lens[b] .. lens[b] + C - 1 of each row's cache, then attend q (B, Hq, C, D) to the cache.

    The cache holds un-rotated keys: the kernel rotates them (and q) at their absolute positions. Key j is
    visible to row b's query i iff j <= lens[b] + i, so cache slots past a row's length are masked."""
    batch, _, chunk, _ = q.shape
    rows = torch.arange(batch, device=q.device)[:, None]
    slots = lens.to(q.device)[:, None] + torch.arange(chunk, device=q.device)  # (B, C)
    k_cache[rows, :, slots] = k.transpose(1, 2)  # indexed view is (B, C, Hkv, D)
    v_cache[rows, :, slots] = v.transpose(1, 2)
    n = int(lens.max()) + chunk
    return fused_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], pos, causal=True,
                           q_offset=lens, k_offset=0, backend=backend)


def run_cached(q, k, v, prompt_lens, chunk, pos, backend):
    """Prefill right-padded prompts in one call, then the rest `chunk` tokens per row per step.

    q (B, Hq, T, D), k, v (B, Hkv, T, D): row b's sequence is its first prompt_lens[b] + S positions.
    Returns per-row outputs (Hq, prompt_lens[b] + S, D)."""
    batch, heads_kv, _, dim = k.shape
    steps = q.shape[2] - max(prompt_lens)  # tokens after the prompt, the same count for every row
    padded = max(prompt_lens)
    k_cache = torch.randn(batch, heads_kv, q.shape[2] + 8, dim, dtype=k.dtype, device=k.device) * 100
    v_cache = torch.randn_like(k_cache) * 100  # garbage past each row's length must stay masked

    def row_slice(t, starts, length):  # (B, H, length, D): row b's positions starts[b] ...
        return torch.stack([t[b, :, s:s + length] for b, s in enumerate(starts)])

    # prefill: the padded prompt; the pad (another row's tokens or garbage) sits past each row's length
    garbage = [torch.randn(t.shape[0], t.shape[1], padded, dim, dtype=t.dtype, device=t.device) * 100
               for t in (q, k, v)]
    qp, kp, vp = (torch.where(torch.arange(padded, device=q.device)[None, None, :, None]
                              < torch.tensor(prompt_lens, device=q.device)[:, None, None, None], t[:, :, :padded], g)
                  for t, g in zip((q, k, v), garbage))
    lens = torch.zeros(batch, dtype=torch.int64)
    out = append_and_attend(qp, kp, vp, k_cache, v_cache, lens, pos, backend)
    outputs = [[out[b, :, :p]] for b, p in enumerate(prompt_lens)]
    lens = torch.tensor(prompt_lens)
    for _ in range(0, steps, chunk):
        starts = lens.tolist()
        out = append_and_attend(row_slice(q, starts, chunk), row_slice(k, starts, chunk), row_slice(v, starts, chunk),
                                k_cache, v_cache, lens, pos, backend)
        for b in range(batch):
            outputs[b].append(out[b])
        lens = lens + chunk
    return [torch.cat(o, dim=1) for o in outputs]


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("chunk", [1, 3], ids=["decode", "chunked"])
@pytest.mark.parametrize("backend", [TRITON, "cpu"])
def test_cached_steps_equal_full_sequence(scheme, chunk, backend):
    device = "cpu" if backend == "cpu" else DEVICE
    gen = torch.Generator().manual_seed(0)
    batch, heads_q, heads_kv, dim, prompt_lens, steps = 2, 4, 2, 16, [7, 3], 6
    total = max(prompt_lens) + steps  # row b uses its first prompt_lens[b] + steps positions
    q = torch.randn(batch, heads_q, total, dim, generator=gen).to(device)
    k, v = (torch.randn(batch, heads_kv, total, dim, generator=gen).to(device) for _ in range(2))
    pos = SCHEMES[scheme]
    rows = run_cached(q, k, v, prompt_lens, chunk, pos, backend)
    full64 = fused_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), pos, causal=True,
                             backend="reference")
    full32 = fused_attention(q.cpu(), k.cpu(), v.cpu(), pos, causal=True, backend="reference")
    for b, out in enumerate(rows):
        length = prompt_lens[b] + steps
        assert out.shape == (heads_q, length, dim)
        assert_close_to_reference(out.cpu(), full64[b, :, :length], full32[b, :, :length], 2.0,
                                  f"row {b} {scheme} chunk={chunk} {backend}")


@pytest.mark.parametrize("backend", ["reference", TRITON, "cpu"])
def test_chunked_prefill_from_empty_cache(backend):
    """Nq < Nk: each chunk of the prompt attends to the cache so far, q_offset = tokens already cached."""
    device = "cpu" if backend in ("cpu", "reference") else DEVICE
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 15, 16, generator=gen).to(device) for _ in range(3))
    pos = RoPE(theta=100.0)
    k_cache, v_cache = torch.zeros_like(k), torch.zeros_like(v)
    chunks = []
    for start in range(0, 15, 5):
        lens = torch.full((2,), start)
        chunks.append(append_and_attend(q[:, :, start:start + 5], k[:, :, start:start + 5], v[:, :, start:start + 5],
                                        k_cache, v_cache, lens, pos, backend))
    out = torch.cat(chunks, dim=2).cpu()
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    full64 = fused_attention(q.double(), k.double(), v.double(), pos, causal=True, backend="reference")
    full32 = fused_attention(q, k, v, pos, causal=True, backend="reference")
    assert_close_to_reference(out, full64, full32, 2.0, f"chunked prefill {backend}")
    # the same chunks without offsets (bottom-right default: q_offset = Nk - Nq) agree as well
    q, k, v = (t.to(device) for t in (q, k, v))
    default = fused_attention(q[:, :, 5:10], k[:, :, :10], v[:, :, :10], pos, causal=True, backend=backend)
    assert_close_to_reference(default.cpu(), full64[:, :, 5:10], full32[:, :, 5:10], 2.0, "default offsets")


def _rotated_sdpa(q, k, v, q_pos, k_pos, inv_freq, attention_factor=1.0):
    """The outside construction a model without the kernel uses: rotate q and k (rotate-half, cos and sin times
    attention_factor) at the given positions with these frequencies, then F.scaled_dot_product_attention (every
    key visible)."""
    def rotate(x, positions):
        angle = positions.double()[:, None] * inv_freq.double()[None, :]  # (N, D / 2)
        cos, sin = (torch.cat([f(angle) * attention_factor] * 2, -1) for f in (torch.cos, torch.sin))
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin
    return torch.nn.functional.scaled_dot_product_attention(rotate(q, q_pos), rotate(k, k_pos), v)


@pytest.mark.parametrize("backend", ["cpu", TRITON])
@pytest.mark.parametrize("scheme", ["rope", "alibi"])
def test_streaming_eviction_keeps_the_cache_untouched(scheme, backend):
    """StreamingLLM-style decoding: keep 4 "sink" tokens and the most recent window, evict the middle, and keep
    positions contiguous inside the cache (the next token sits at the cache's new length). With un-rotated keys
    the eviction is the only change to the cache: the kept keys are moved, never re-rotated, and every later
    decode step equals attention over those keys at their new positions (a pre-rotated cache would hold them
    rotated at their old positions)."""
    device = "cpu" if backend == "cpu" else DEVICE
    gen = torch.Generator().manual_seed(3)
    sinks, recent, steps = 4, 12, 5
    k_cache, v_cache = (torch.randn(1, 2, 40, 32, generator=gen).double().to(device) for _ in range(2))
    length = 40  # a full cache: evict down to sinks + recent
    kept = torch.cat((torch.arange(sinks), torch.arange(length - recent, length)))
    before = k_cache[:, :, kept].clone()
    k_cache[:, :, :sinks + recent] = k_cache[:, :, kept].clone()  # the eviction: move the kept slots together
    v_cache[:, :, :sinks + recent] = v_cache[:, :, kept].clone()
    length = sinks + recent
    assert torch.equal(k_cache[:, :, :length], before)  # moved bit for bit: no re-rotation
    pos = RoPE(theta=100.0) if scheme == "rope" else ALiBi()
    for _ in range(steps):
        q, k_new, v_new = (torch.randn(1, heads, 1, 32, generator=gen).double().to(device) for heads in (4, 2, 2))
        k_cache[:, :, length:length + 1], v_cache[:, :, length:length + 1] = k_new, v_new
        length += 1
        out = fused_attention(q.float(), k_cache[:, :, :length].float(), v_cache[:, :, :length].float(), pos,
                              causal=True, q_offset=length - 1, backend=backend)
        keys, values = (t[:, :, :length].cpu().repeat_interleave(2, 1) for t in (k_cache, v_cache))
        if scheme == "rope":
            inv_freq = pos.resolve(1, 4, 32, length, torch.device("cpu")).inv_freq
            expected = _rotated_sdpa(q.cpu(), keys, values, torch.tensor([length - 1]), torch.arange(length), inv_freq)
        else:
            expected = fused_attention(q.cpu(), k_cache[:, :, :length].cpu(), v_cache[:, :, :length].cpu(), pos,
                                       causal=True, q_offset=length - 1, backend="reference")
        assert (out.cpu().double() - expected).abs().max() < 1e-4, f"{scheme} step at length {length}"


def _switching_rope(kind: str, original: int, dim: int):
    """(our RoPE, transformers config) of a length-dependent scaling: dynamic NTK or Phi-3's longrope (short factors
    up to the original length, long ones past it)."""
    from transformers import LlamaConfig, Phi3Config
    if kind == "dynamic":
        config = LlamaConfig(head_dim=dim, hidden_size=4 * dim, num_attention_heads=4,
                             max_position_embeddings=original,
                             rope_parameters={"rope_type": "dynamic", "rope_theta": 100.0, "factor": 2.0})
    else:
        gen = torch.Generator().manual_seed(6)
        short, long = (1 + 3 * torch.rand(dim // 2, generator=gen, dtype=torch.float64) for _ in range(2))
        config = Phi3Config(hidden_size=4 * dim, num_attention_heads=4, max_position_embeddings=64,
                            original_max_position_embeddings=original,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 100.0,
                                             "short_factor": short.tolist(), "long_factor": long.tolist()})
    return RoPE.from_hf(config), config


@pytest.mark.parametrize("backend", ["cpu", TRITON])
@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_length_dependent_rope_rotates_cached_keys_with_the_current_frequencies(kind, backend):
    """Decoding past DynamicNTK's or LongRoPE's original length changes the frequencies (every step, or once);
    the kernel rotates every cached (un-rotated) key with the current step's: transformers' inv_freq and
    attention factor at that length (Hugging Face instead keeps each key rotated with the frequencies of the call
    that cached it)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    device = "cpu" if backend == "cpu" else DEVICE
    gen = torch.Generator().manual_seed(4)
    original, dim = 16, 32
    pos, config = _switching_rope(kind, original, dim)
    k_cache, v_cache = (torch.randn(1, 4, 30, dim, generator=gen) for _ in range(2))
    seen = []
    for length in range(original - 1, 30):  # crosses the original length
        q = torch.randn(1, 4, 1, dim, generator=gen)
        out = fused_attention(q.to(device), k_cache[:, :, :length].to(device), v_cache[:, :, :length].to(device), pos,
                              causal=True, q_offset=length - 1, backend=backend).cpu()
        inv_freq, factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu", seq_len=length)
        expected = _rotated_sdpa(q.double(), k_cache[:, :, :length].double(), v_cache[:, :, :length].double(),
                                 torch.tensor([length - 1]), torch.arange(length), inv_freq, float(factor))
        assert (out.double() - expected).abs().max() < 1e-4, f"{kind} at length {length}"
        seen.append(inv_freq)
    assert not torch.equal(seen[0], seen[-1])  # the frequencies did switch
