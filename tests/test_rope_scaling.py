"""RoPE context-extension scalings against Hugging Face transformers, RoPE.from_hf, and the scalings
end-to-end through fused_attention (cpu and triton backends against the reference).

transformers' `modeling_rope_utils.ROPE_INIT_FUNCTIONS` is the oracle (POSITIONS.md): inv_freq must agree
to fp32 rounding (they compute in fp32, we in fp64 rounded once: a few ulp apart) and the attention
factor exactly.
"""
import math

import pytest
import torch

from fused_pos_attn import NTK, DynamicNTK, Linear, Llama3, RoPE, YaRN, fused_attention
from test_attention_backends import HAS_TRITON, Case, check_case

transformers = pytest.importorskip("transformers")
from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

FP32_RTOL = 1e-6  # ~8 ulp; observed <= 3e-7
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))


def hf_frequencies(config, seq_len=None):
    """(inv_freq, attention factor) from transformers for a config, as its rotary embedding computes them."""
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default" and "default" not in ROPE_INIT_FUNCTIONS:  # transformers >= 5: on the model
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def llama_config(rope_type, theta, dim, max_pos=4096, partial=None, **params):
    extra = {} if partial is None else {"partial_rotary_factor": partial}
    return LlamaConfig(head_dim=dim, hidden_size=4 * dim, num_attention_heads=4, max_position_embeddings=max_pos,
                       rope_parameters={"rope_type": rope_type, "rope_theta": theta, **params, **extra})


def assert_matches_hf(ours, hf):
    (inv_freq, factor), (hf_inv_freq, hf_factor) = ours, hf
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == hf_inv_freq.shape
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), rtol=FP32_RTOL, atol=0)
    assert factor == pytest.approx(float(hf_factor), rel=1e-12)


@pytest.mark.parametrize("theta", [1e4, 5e5])
@pytest.mark.parametrize("dim", [16, 64, 128])
@pytest.mark.parametrize("factor", [0.5, 2.0, 8.0])
def test_linear_matches_hf(theta, dim, factor):
    hf = hf_frequencies(llama_config("linear", theta, dim, factor=factor))
    assert_matches_hf(RoPE(theta, scaling=Linear(factor)).frequencies(dim, 100), hf)


@pytest.mark.parametrize("theta,dim", [(1e4, 32), (1e6, 128), (5e5, 64)])
@pytest.mark.parametrize("factor", [2.0, 4.0])
@pytest.mark.parametrize("original,seq_len", [(2048, 100), (2048, 2048), (2048, 2049), (2048, 10000), (64, 1000)],
                         ids=["below", "at", "just_above", "above", "far_above"])
def test_dynamic_ntk_matches_hf(theta, dim, factor, original, seq_len):
    """transformers' dynamic type uses max_position_embeddings as the original length."""
    hf = hf_frequencies(llama_config("dynamic", theta, dim, max_pos=original, factor=factor), seq_len=seq_len)
    ours = RoPE(theta, scaling=DynamicNTK(factor, original)).frequencies(dim, seq_len)
    assert_matches_hf(ours, hf)
    unscaled = RoPE(theta).frequencies(dim, seq_len)[0]
    if seq_len <= original:
        torch.testing.assert_close(ours[0], unscaled, rtol=0, atol=0)
    else:
        assert not torch.allclose(ours[0], unscaled)


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("dim", [16, 128])
def test_static_ntk_matches_hf_dynamic_at_fixed_length(factor, dim):
    """theta * s^(r/(r-2)) is transformers' dynamic type with factor 1 at seq_len = s * max_position_embeddings."""
    hf = hf_frequencies(llama_config("dynamic", 1e4, dim, max_pos=1024, factor=1.0), seq_len=factor * 1024)
    assert_matches_hf(RoPE(1e4, scaling=NTK(factor)).frequencies(dim, 5), hf)


YARN_CASES = {  # (theta, dim, factor, original, extra YaRN kwargs)
    "small": (1e4, 16, 4.0, 64, {}),
    "llama2_8k": (1e4, 128, 2.0, 4096, {}),
    "qwen2.5_128k": (1e6, 128, 4.0, 32768, {}),
    "deepseek_40x": (1e4, 64, 40.0, 4096, {}),
    "betas": (5e5, 64, 16.0, 1024, {"beta_fast": 16, "beta_slow": 2}),
    "factor_below_1": (1e4, 64, 0.5, 4096, {}),
    "no_truncate": (1.5e5, 64, 32.0, 4096, {"truncate": False}),
    "tiny_original": (1e4, 32, 8.0, 4, {}),  # correction dims below 0: transformers' one-sided clamps
    "huge_original": (100.0, 16, 8.0, 10 ** 9, {}),  # correction dims above r - 1
}


@pytest.mark.parametrize("name", list(YARN_CASES))
def test_yarn_matches_hf(name):
    theta, dim, factor, original, extra = YARN_CASES[name]
    config = llama_config("yarn", theta, dim, max_pos=original * 2, factor=factor,
                          original_max_position_embeddings=original, **extra)
    assert_matches_hf(RoPE(theta, scaling=YaRN(factor, original, **extra)).frequencies(dim, 7), hf_frequencies(config))


@pytest.mark.parametrize("attention_factor", [0.5, 1.3])
def test_yarn_mscale_is_the_attention_factor(attention_factor):
    config = llama_config("yarn", 1e4, 64, max_pos=8192, factor=4.0, original_max_position_embeddings=2048,
                          attention_factor=attention_factor)
    ours = RoPE(1e4, scaling=YaRN(4.0, 2048, mscale=attention_factor)).frequencies(64, 7)
    assert_matches_hf(ours, hf_frequencies(config))
    assert ours[1] == attention_factor
    assert YaRN(4.0, 2048).frequencies(1e4, 64, 7)[1] == pytest.approx(0.1 * math.log(4.0) + 1)
    assert YaRN(1.0, 2048).frequencies(1e4, 64, 7)[1] == 1.0
    # RoPE's own attention_factor multiplies the scaling's
    assert RoPE(1e4, attention_factor=2.0, scaling=YaRN(4.0, 2048)).frequencies(64, 7)[1] == \
        pytest.approx(2.0 * (0.1 * math.log(4.0) + 1))


LLAMA3_CASES = {  # (theta, dim, factor, low_freq_factor, high_freq_factor, original)
    "llama3.1": (5e5, 128, 8.0, 1.0, 4.0, 8192),
    "llama3.2": (5e5, 64, 32.0, 1.0, 4.0, 8192),
    "small": (1e4, 32, 4.0, 2.0, 8.0, 1024),
    "all_bands": (1e4, 32, 8.0, 1.0, 4.0, 32),
}


@pytest.mark.parametrize("name", list(LLAMA3_CASES))
def test_llama3_matches_hf(name):
    theta, dim, factor, low, high, original = LLAMA3_CASES[name]
    config = llama_config("llama3", theta, dim, max_pos=original * 16, factor=factor, low_freq_factor=low,
                          high_freq_factor=high, original_max_position_embeddings=original)
    ours = RoPE(theta, scaling=Llama3(factor, low, high, original)).frequencies(dim, 7)
    assert_matches_hf(ours, hf_frequencies(config))


@pytest.mark.parametrize("theta,dim", [(1e4, 16), (5e5, 128)])
def test_default_matches_hf(theta, dim):
    assert_matches_hf(RoPE(theta).frequencies(dim, 7), hf_frequencies(llama_config("default", theta, dim)))


def test_partial_rotary_matches_hf():
    config = llama_config("yarn", 1e4, 64, max_pos=8192, partial=0.5, factor=4.0, original_max_position_embeddings=2048)
    rope = RoPE.from_hf(config)
    assert rope.rotary_dim == 32
    assert_matches_hf(rope.frequencies(32, 7), hf_frequencies(config))


# ---------------------------------------------------------------------------------------------- from_hf

def from_hf_matches(config, seq_len=7):
    rope = RoPE.from_hf(config)
    dim = rope.rotary_dim
    resolved = rope.resolve(1, 2, dim, seq_len, torch.device("cpu"))
    assert resolved.rotary_dim == dim and not resolved.interleaved
    hf = hf_frequencies(config, seq_len=seq_len)
    assert_matches_hf((resolved.inv_freq, resolved.attention_factor), hf)
    return rope


def test_from_hf_llama31():
    config = LlamaConfig(rope_theta=5e5, max_position_embeddings=131072, hidden_size=4096, num_attention_heads=32,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    rope = from_hf_matches(config)
    assert rope.theta == 5e5 and rope.rotary_dim == 128
    assert rope.scaling == Llama3(8.0, 1.0, 4.0, 8192)


def test_from_hf_qwen2_yarn():
    config = Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                         max_position_embeddings=131072,
                         rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    rope = from_hf_matches(config)
    assert rope.rotary_dim == 128 and rope.scaling == YaRN(4.0, 32768)


def test_from_hf_mistral_default():
    config = MistralConfig(rope_theta=1e6, head_dim=128)
    rope = from_hf_matches(config)
    assert rope.theta == 1e6 and rope.rotary_dim == 128 and rope.scaling is None


@pytest.mark.parametrize("seq_len", [100, 9000])
def test_from_hf_dynamic_and_linear(seq_len):
    dynamic = LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=4096,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert RoPE.from_hf(dynamic).scaling == DynamicNTK(2.0, 4096)
    from_hf_matches(dynamic, seq_len)
    linear = LlamaConfig(hidden_size=512, num_attention_heads=8, rope_scaling={"type": "linear", "factor": 4.0})
    from_hf_matches(linear, seq_len)


def test_from_hf_yarn_deepseek_mscale():
    """mscale / mscale_all_dim fold into YaRN's attention factor exactly as transformers computes it."""
    config = LlamaConfig(head_dim=64, hidden_size=256, num_attention_heads=4, max_position_embeddings=163840,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "mscale": 0.707,
                                          "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                                          "original_max_position_embeddings": 4096})
    rope = from_hf_matches(config)
    assert rope.scaling.mscale != pytest.approx(0.1 * math.log(40.0) + 1)


def test_from_hf_yarn_factor_from_lengths():
    """A null factor is max_position_embeddings / original_max_position_embeddings, as in transformers."""
    config = {"rope_theta": 1e4, "head_dim": 32, "max_position_embeddings": 16384,
              "rope_parameters": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}}
    assert RoPE.from_hf(config).scaling == YaRN(4.0, 4096)


def test_from_hf_dicts_old_and_new():
    old = {"rope_theta": 5e5, "hidden_size": 256, "num_attention_heads": 4, "partial_rotary_factor": 0.25,
           "rope_scaling": {"type": "linear", "factor": 2.0}}
    rope = RoPE.from_hf(old)
    assert (rope.theta, rope.rotary_dim, rope.scaling) == (5e5, 16, Linear(2.0))
    new = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}).to_dict()
    rope = RoPE.from_hf(new)
    assert (rope.theta, rope.rotary_dim, rope.scaling) == (5e5, 64, Llama3(8.0, 1.0, 4.0, 1024))
    plain = RoPE.from_hf({"head_dim": 64, "rope_scaling": None})
    assert (plain.theta, plain.rotary_dim, plain.scaling) == (10000.0, 64, None)


@pytest.mark.parametrize("config,error,match", [
    ({"head_dim": 64, "rope_scaling": {"rope_type": "mrope", "mrope_section": [8, 12, 12]}}, ValueError,
     "unsupported rope_type 'mrope'"),
    ({"head_dim": 64, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}}, ValueError,
     r"keys \['low_freq_factor'\] are not understood for rope_type 'linear'"),
    ({"head_dim": 64, "max_position_embeddings": 8192, "rope_parameters": {"rope_type": "longrope",
                                                                              "short_factor": [1.0] * 32}}, ValueError,
     r"rope_type 'longrope' needs rope_parameters\['long_factor'\]"),
    ({"head_dim": 64, "rotary_dim": 80}, ValueError, "must be a positive even int <= head_dim 64"),
    ({"head_dim": 64, "rope_parameters": {"rope_type": "linear"}}, ValueError,
     r"rope_type 'linear' needs rope_parameters\['factor'\]"),
    ({"head_dim": 64, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, ValueError,
     "rope_type 'dynamic' needs config max_position_embeddings"),
    ({"head_dim": 64, "rope_parameters": {"full_attention": {"rope_type": "default"},
                                          "sliding_attention": {"rope_type": "default"}}}, ValueError,
     "per-layer rope_parameters"),
    ({"rope_theta": 1e4}, ValueError, "needs head_dim, or hidden_size and num_attention_heads"),
    ({"head_dim": 64, "partial_rotary_factor": 0.3}, ValueError, r"rotary dim 19 \(config rotary_dim, or int\(head_dim \* partial_rotary_factor\) = int\(64 \* 0.3\)\) must be a "
     "positive even"),
    ({"head_dim": 64, "rope_scaling": "yarn"}, TypeError, "rope_scaling must be a dict"),
    ({"head_dim": 64, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                          "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}},
     ValueError, "low_freq_factor must be less than high_freq_factor"),
])
def test_from_hf_errors(config, error, match):
    with pytest.raises(error, match=match):
        RoPE.from_hf(config)


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("make,error,match", [
    (lambda: Linear(0), ValueError, r"Linear factor must be a finite number > 0, got 0"),
    (lambda: Linear(-2.0), ValueError, r"Linear factor must be a finite number > 0, got -2.0"),
    (lambda: Linear(float("nan")), ValueError, r"Linear factor must be a finite number > 0, got nan"),
    (lambda: Linear(float("inf")), ValueError, r"Linear factor must be a finite number > 0, got inf"),
    (lambda: Linear("2"), TypeError, r"Linear factor must be a finite number > 0, got str"),
    (lambda: Linear(True), TypeError, r"Linear factor must be a finite number > 0, got bool"),
    (lambda: NTK(0.0), ValueError, r"NTK factor must be a finite number > 0"),
    (lambda: DynamicNTK(0.0, 2048), ValueError, r"DynamicNTK factor must be a finite number > 0"),
    (lambda: DynamicNTK(2.0), TypeError, r"original_max_len"),
    (lambda: DynamicNTK(2.0, None), TypeError, r"DynamicNTK original_max_len must be a positive int, got NoneType"),
    (lambda: DynamicNTK(2.0, 0), ValueError, r"DynamicNTK original_max_len must be a positive int, got 0"),
    (lambda: DynamicNTK(2.0, 2048.0), TypeError, r"DynamicNTK original_max_len must be a positive int, got float"),
    (lambda: YaRN(float("nan"), 4096), ValueError, r"YaRN factor must be a finite number > 0, got nan"),
    (lambda: YaRN(4.0, -1), ValueError, r"YaRN original_max_len must be a positive int, got -1"),
    (lambda: YaRN(4.0, 4096, beta_fast=0), ValueError, r"YaRN beta_fast must be a finite number > 0, got 0"),
    (lambda: YaRN(4.0, 4096, beta_slow=-1), ValueError, r"YaRN beta_slow must be a finite number > 0, got -1"),
    (lambda: YaRN(4.0, 4096, beta_fast=1, beta_slow=32), ValueError,
     r"YaRN beta_fast must be greater than beta_slow, got beta_fast=1, beta_slow=32"),
    (lambda: YaRN(4.0, 4096, beta_fast=2, beta_slow=2), ValueError, r"beta_fast must be greater than beta_slow"),
    (lambda: YaRN(4.0, 4096, mscale=0.0), ValueError, r"YaRN mscale must be a finite number > 0, got 0.0"),
    (lambda: YaRN(4.0, 4096, mscale="1"), TypeError, r"YaRN mscale must be a finite number > 0, got str"),
    (lambda: YaRN(4.0, 4096, truncate=1), TypeError, r"YaRN truncate must be a bool, got int"),
    (lambda: Llama3(0, 1.0, 4.0, 8192), ValueError, r"Llama3 factor must be a finite number > 0, got 0"),
    (lambda: Llama3(8.0, 0.0, 4.0, 8192), ValueError, r"Llama3 low_freq_factor must be a finite number > 0"),
    (lambda: Llama3(8.0, 1.0, float("inf"), 8192), ValueError, r"Llama3 high_freq_factor must be a finite number"),
    (lambda: Llama3(8.0, 4.0, 1.0, 8192), ValueError,
     r"Llama3 low_freq_factor must be less than high_freq_factor, got low_freq_factor=4.0, high_freq_factor=1.0"),
    (lambda: Llama3(8.0, 2.0, 2.0, 8192), ValueError, r"low_freq_factor must be less than high_freq_factor"),
    (lambda: Llama3(8.0, 1.0, 4.0, None), TypeError, r"Llama3 original_max_len must be a positive int, got NoneType"),
    (lambda: Llama3(8.0, 1.0, 4.0, 0), ValueError, r"Llama3 original_max_len must be a positive int, got 0"),
    (lambda: RoPE(scaling=2.0), TypeError,
     r"RoPE scaling must be None or a Linear, NTK, DynamicNTK, YaRN, Llama3 or LongRoPE object, got float"),
    (lambda: RoPE(inv_freq=torch.ones(8), scaling=Linear(2.0)), ValueError,
     r"RoPE takes inv_freq or scaling, not both"),
    (lambda: RoPE(rotary_dim=2, scaling=NTK(2.0)).frequencies(2, 10), ValueError,
     r"NTK scaling needs rotary_dim >= 4 \(theta is raised to r/\(r-2\)\), got 2"),
    (lambda: RoPE(rotary_dim=2, scaling=DynamicNTK(2.0, 8)).frequencies(2, 10), ValueError,
     r"DynamicNTK scaling needs rotary_dim >= 4"),
])
def test_bad_parameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_scaling_rejects_rotary_dim_2_through_fused_attention():
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="NTK scaling needs rotary_dim >= 4"):
        fused_attention(q, q, q, RoPE(rotary_dim=2, scaling=NTK(2.0)), backend="reference")


# ---------------------------------------------------------------------------------------------- end to end

SCALINGS = {
    "linear": RoPE(scaling=Linear(2.0)),
    "ntk": RoPE(scaling=NTK(4.0)),
    "dynamic_above": RoPE(scaling=DynamicNTK(4.0, 16)),  # call length 40 > 16: recomputed
    "yarn": RoPE(theta=500.0, scaling=YaRN(8.0, 64, beta_fast=8, beta_slow=1)),
    "yarn_mscale_partial": RoPE(rotary_dim=8, scaling=YaRN(4.0, 16, mscale=1.5)),
    "llama3": RoPE(scaling=Llama3(8.0, 1.0, 4.0, 32)),
    "llama3_interleaved": RoPE(theta=5e5, interleaved=True, scaling=Llama3(8.0, 1.0, 4.0, 16)),
}


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("backend", [TRITON, "cpu"])
def test_scalings_end_to_end(name, backend):
    check_case(Case(batch=2, heads_q=2, heads_kv=2, seq_q=40, seq_k=40, head_dim=32, pos=SCALINGS[name],
                    kwargs=dict(causal=True)), torch.float32, backend)


@pytest.mark.parametrize("backend", [TRITON, "cpu"])
def test_dynamic_ntk_offsets_end_to_end(backend):
    """Per-batch offsets push the current length (max over b of max(q_off + Nq, k_off + Nk) = 50) past L."""
    kwargs = dict(causal=True, q_offset=torch.tensor([3, 42]), k_offset=torch.tensor([0, 30]))
    check_case(Case(batch=2, heads_q=2, heads_kv=1, seq_q=8, seq_k=20, head_dim=16,
                    pos=RoPE(scaling=DynamicNTK(4.0, 16)), kwargs=kwargs), torch.float32, backend)


def dynamic_reference(q, k, v, pos, **kwargs):
    return fused_attention(q, k, v, pos, backend="reference", **kwargs)


def test_dynamic_ntk_uses_current_length():
    """The reference with DynamicNTK equals the reference with the frequencies of the true current length,
    and differs from plain RoPE once that length exceeds original_max_len."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen, dtype=torch.float64) for n in (8, 20, 20))
    dynamic = RoPE(scaling=DynamicNTK(4.0, 16))
    kwargs = dict(causal=True, q_offset=torch.tensor([3, 42]), k_offset=torch.tensor([0, 30]))
    out = dynamic_reference(q, k, v, dynamic, **kwargs)
    at_50 = RoPE(inv_freq=DynamicNTK(4.0, 16).frequencies(10000.0, 16, 50)[0])
    torch.testing.assert_close(out, dynamic_reference(q, k, v, at_50, **kwargs), rtol=0, atol=0)
    assert (out - dynamic_reference(q, k, v, RoPE(), **kwargs)).abs().max() > 1e-3
    at_20 = RoPE(inv_freq=DynamicNTK(4.0, 16).frequencies(10000.0, 16, 20)[0])
    assert (out - dynamic_reference(q, k, v, at_20, **kwargs)).abs().max() > 1e-3
    # default offsets: current length Nk = 20 > 16
    torch.testing.assert_close(dynamic_reference(q, k, v, dynamic, causal=True),
                               dynamic_reference(q, k, v, at_20, causal=True), rtol=0, atol=0)
    # within the original length DynamicNTK is plain RoPE
    short = dict(causal=True, q_offset=2, k_offset=0)
    torch.testing.assert_close(dynamic_reference(q[:, :, :4], k[:, :, :6], v[:, :, :6], dynamic, **short),
                               dynamic_reference(q[:, :, :4], k[:, :, :6], v[:, :, :6], RoPE(), **short),
                               rtol=0, atol=0)


@pytest.mark.parametrize("seq_len", [100, 4096, 4097, 20000], ids=["short", "at_original", "just_long", "long"])
@pytest.mark.parametrize("attention_factor", [None, 1.3])
def test_longrope_matches_hf(seq_len, attention_factor):
    """Phi-3's longrope: short factors up to the original length, long ones past it, transformers' attention factor."""
    gen = torch.Generator().manual_seed(0)
    short, long = (1 + 3 * torch.rand(16, generator=gen, dtype=torch.float64) for _ in range(2))
    params = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": short.tolist(), "long_factor": long.tolist()}
    if attention_factor is not None:
        params["attention_factor"] = attention_factor
    config = Phi3Config(hidden_size=128, num_attention_heads=4, max_position_embeddings=131072,
                        original_max_position_embeddings=4096, rope_parameters=params)
    rope = RoPE.from_hf(config)
    assert rope.rotary_dim == 32 and rope.length_dependent
    assert_matches_hf(rope.frequencies(32, seq_len), hf_frequencies(config, seq_len=seq_len))


def test_from_hf_gptj_partial_interleaved():
    """GPT-J: rotary_dim of the head's leading dims, rotate-every-two pairs; GPT-NeoX: partial, rotate-half."""
    gptj = RoPE.from_hf(GPTJConfig(n_embd=256, n_head=4, rotary_dim=16))
    assert (gptj.rotary_dim, gptj.interleaved, gptj.theta, gptj.scaling) == (16, True, 10000.0, None)
    whole = RoPE.from_hf({"model_type": "gptj", "n_embd": 256, "n_head": 4, "rotary_dim": None})  # config.json
    assert (whole.rotary_dim, whole.interleaved) == (64, True)
    neox = RoPE.from_hf(GPTNeoXConfig(hidden_size=256, num_attention_heads=4))
    assert (neox.rotary_dim, neox.interleaved) == (16, False)  # partial_rotary_factor 0.25
    pythia = RoPE.from_hf({"model_type": "gpt_neox", "hidden_size": 256, "num_attention_heads": 4, "rotary_pct": 0.5,
                           "rotary_emb_base": 5e5})  # a config.json from before transformers 5
    assert (pythia.rotary_dim, pythia.theta) == (32, 5e5)
