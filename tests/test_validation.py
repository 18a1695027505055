"""Bad input gets a clear exception naming the argument and what was expected; valid edge input passes.

Every message is checked with `pytest.raises(match=...)`. Accepted-input checks use backend="reference".
"""
import math
import re

import pytest
import torch

from fused_pos_attn import ALiBi, RoPE, fused_attention
from fused_pos_attn.attention import MAX_HEAD_DIM

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 3, 5, 8


def qkv(dtype=torch.float32, b=B, hq=HQ, hkv=HKV, nq=NQ, nk=NK, d=D):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


def _tuple_pattern(t):
    return re.escape(str(tuple(t)))


def _dtype_pattern(dtype):
    return re.escape(str(dtype))


def call(q, k, v, pos="none", **kw):
    kw.setdefault("backend", "reference")
    return fused_attention(q, k, v, pos, **kw)


# ---------------------------------------------------------------- q, k, v


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [[[1.0]], 1.0, None])
def test_not_a_tensor(which, bad):
    args = dict(zip("qkv", qkv()))
    args[which] = bad
    with pytest.raises(TypeError, match=rf"^{which} must be a torch\.Tensor, got {type(bad).__name__}"):
        call(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("shape", [(4, 3, 8), (2, 4, 3, 8, 1), ()])
def test_wrong_rank(which, shape):
    args = dict(zip("qkv", qkv()))
    args[which] = torch.randn(shape)
    layout = r"\(B, Hq, Nq, D\)" if which == "q" else r"\(B, Hkv, Nk, D\)"
    with pytest.raises(ValueError, match=rf"^{which} must be 4-D {layout}, got shape {_tuple_pattern(shape)}"):
        call(args["q"], args["k"], args["v"])


def test_mismatched_batch():
    q, _, _ = qkv(b=2)
    _, k, v = qkv(b=3)
    with pytest.raises(ValueError, match=r"q and k must have the same batch size B, got q 2, k 3"):
        call(q, k, v)


def test_mismatched_head_dim():
    q, _, _ = qkv(d=8)
    _, k, v = qkv(d=16)
    with pytest.raises(ValueError, match=r"q and k must have the same head dim D, got q 8, k 16"):
        call(q, k, v)


@pytest.mark.parametrize("v_shape", [(B, HKV, NK + 1, D), (B, HKV, NK, D + 1), (B, HKV + 1, NK, D)])
def test_k_v_shape_mismatch(v_shape):
    q, k, _ = qkv()
    v = torch.randn(v_shape)
    with pytest.raises(ValueError, match=r"k and v must have the same shape \(B, Hkv, Nk, D\), got k "
                                         + _tuple_pattern(tuple(k.shape)) + ", v " + _tuple_pattern(v_shape)):
        call(q, k, v)


@pytest.mark.parametrize("hq, hkv", [(3, 2), (4, 3), (1, 2), (4, 0)])
def test_heads_not_divisible(hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match=rf"query heads Hq={hq} must be a multiple of key/value heads Hkv={hkv}"):
        call(q, k, v)


def test_mismatched_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q, k, v must share a dtype, got q torch\.float32, k torch\.float16, "
                                        r"v torch\.float32"):
        call(q, k.half(), v)


def test_mismatched_devices():
    q, k, v = qkv()
    try:
        k_meta = k.to("meta")
    except Exception:  # pragma: no cover - meta device missing in this torch build
        pytest.skip("cannot build a tensor on a second device")
    with pytest.raises(ValueError, match=r"q, k, v must be on one device, got q cpu, k meta, v cpu"):
        call(q, k_meta, v)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_unsupported_dtype(dtype, which):
    args = dict(zip("qkv", qkv()))
    args[which] = torch.zeros(args[which].shape, dtype=dtype)
    with pytest.raises(TypeError, match=rf"^{which} must be float16, bfloat16, float32 or float64, got "
                                        rf"{_dtype_pattern(dtype)}"):
        call(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("d", [MAX_HEAD_DIM + 1, 512])
def test_head_dim_too_large(d):
    q, k, v = qkv(d=d, nq=1, nk=1)
    with pytest.raises(ValueError, match=rf"head dim D must be in \[1, {MAX_HEAD_DIM}\], got {d}"):
        call(q, k, v)


def test_head_dim_zero():
    q, k, v = qkv(d=0)
    with pytest.raises(ValueError, match=rf"head dim D must be in \[1, {MAX_HEAD_DIM}\], got 0"):
        call(q, k, v)


def test_head_dim_max_accepted():
    q, k, v = qkv(d=MAX_HEAD_DIM, nq=1, nk=2, b=1)
    assert call(q, k, v).shape == q.shape


@pytest.mark.parametrize("shape_kw", [dict(nq=0), dict(nk=0), dict(b=0), dict(hq=0)])
def test_empty_dims(shape_kw):
    q, k, v = qkv(**shape_kw)
    with pytest.raises(ValueError, match=r"B, Hq, Nq and Nk must be >= 1, got q \(.*\), k \(.*\)"):
        call(q, k, v)


# ---------------------------------------------------------------- offsets


@pytest.mark.parametrize("name", ["q_offset", "k_offset"])
def test_offset_float_tensor(name):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"{name} must be an integer tensor, got torch\.float32"):
        call(q, k, v, **{name: torch.zeros(B)})


@pytest.mark.parametrize("name", ["q_offset", "k_offset"])
def test_offset_bool_tensor(name):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"{name} must be an integer tensor, got torch\.bool"):
        call(q, k, v, **{name: torch.zeros(B, dtype=torch.bool)})


@pytest.mark.parametrize("name", ["q_offset", "k_offset"])
def test_offset_python_bool(name):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"{name} must be an int or a \(B,\) integer tensor, got bool"):
        call(q, k, v, **{name: True})


@pytest.mark.parametrize("name", ["q_offset", "k_offset"])
@pytest.mark.parametrize("shape", [(B + 1,), (1,), (B, 1), (1, B)])
def test_offset_wrong_shape(name, shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"{name} must have shape \(B,\)=\({B},\), got {_tuple_pattern(shape)}"):
        call(q, k, v, **{name: torch.zeros(shape, dtype=torch.int64)})


@pytest.mark.parametrize("name", ["q_offset", "k_offset"])
@pytest.mark.parametrize("bad", [[0, 1], "0", 1.5, (0, 1)])
def test_offset_wrong_type(name, bad):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"{name} must be an int or a \(B,\) integer tensor, "
                                        rf"got {type(bad).__name__}"):
        call(q, k, v, **{name: bad})


def test_offsets_accepted_forms_agree():
    q, k, v = qkv()
    ref = call(q, k, v, "alibi", causal=True, q_offset=7, k_offset=3)
    for q_off, k_off in [(torch.tensor(7), torch.tensor(3)),
                         (torch.tensor([7, 7], dtype=torch.int32), torch.tensor([3, 3], dtype=torch.int32)),
                         (torch.tensor([7, 7]), 3)]:
        out = call(q, k, v, "alibi", causal=True, q_offset=q_off, k_offset=k_off)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_offsets_int32_per_batch_used_per_batch():
    q, k, v = qkv()
    offs = torch.tensor([0, 4], dtype=torch.int32)
    out = call(q, k, v, "alibi", causal=True, q_offset=offs + 2, k_offset=offs)
    for b in range(B):
        one = call(q[b:b + 1], k[b:b + 1], v[b:b + 1], "alibi", causal=True, q_offset=int(offs[b]) + 2,
                   k_offset=int(offs[b]))
        torch.testing.assert_close(out[b:b + 1], one, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- scalars


@pytest.mark.parametrize("window", [0, -1, -100])
def test_window_not_positive(window):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"window must be a positive int or None, got {window}"):
        call(q, k, v, window=window)


@pytest.mark.parametrize("window", [2.0, "3", True, torch.tensor(2)])
def test_window_not_int(window):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"window must be a positive int or None, got {type(window).__name__}"):
        call(q, k, v, window=window)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_scale_not_finite(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"scale must be a finite float or None, got {scale!r}"):
        call(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, [0.5], torch.tensor(0.5)])
def test_scale_wrong_type(scale):
    q, k, v = qkv()
    with pytest.raises((TypeError, ValueError), match=r"scale must be a finite float or None, got "):
        call(q, k, v, scale=scale)


def test_scale_int_accepted():
    q, k, v = qkv()
    torch.testing.assert_close(call(q, k, v, scale=1), call(q, k, v, scale=1.0), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["causal", "return_lse"])
@pytest.mark.parametrize("bad", [1, 0, "True", None])
def test_flags_not_bool(name, bad):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"{name} must be a bool, got {type(bad).__name__}"):
        call(q, k, v, **{name: bad})


# ---------------------------------------------------------------- pos, backend


@pytest.mark.parametrize("pos", ["ALiBi", "rotary", "", "t5"])
def test_unknown_pos_string(pos):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"pos must be one of \['alibi', 'none', 'rope'\] or a position "
                                         rf"object, got {pos!r}"):
        call(q, k, v, pos)


@pytest.mark.parametrize("pos", [None, 1, ALiBi, torch.ones(HQ)])
def test_pos_wrong_type(pos):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"pos must be a str or a position object \(ALiBi, RoPE, RelativeBias\), "
                                        rf"got {type(pos).__name__}"):
        call(q, k, v, pos)


@pytest.mark.parametrize("backend", ["flash", "Triton", "", None])
def test_unknown_backend(backend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cuda', 'cpu', "
                                         rf"'reference'\), got {backend!r}"):
        call(q, k, v, backend=backend)


def test_cuda_backend_not_built():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend='cuda' \(the CUDA C\+\+ kernels\) is not built .*use "
                                         r"backend='triton' or 'auto' for CUDA tensors"):
        call(q, k, v, backend="cuda")


def test_cpu_backend_needs_cpu_tensors():
    q, k, v = (t.to("meta") for t in qkv())
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors, got device meta"):
        call(q, k, v, backend="cpu")


def test_triton_float64():
    q, k, v = qkv(torch.float64)
    with pytest.raises(TypeError, match=r"backend='triton' supports float16, bfloat16 and float32; got float64 "
                                        r"\(use backend='cpu' or 'reference' for float64\)"):
        call(q, k, v, backend="triton")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(got device cpu\), or "
                                         r"TRITON_INTERPRET=1"):
        call(q, k, v, backend="triton")


# ---------------------------------------------------------------- ALiBi slopes


def _slopes_shape_msg(shape):
    return (rf"ALiBi slopes must have shape \(Hq,\)=\({HQ},\) or \(B, Hq\)=\({B}, {HQ}\), "
            rf"got {_tuple_pattern(shape)}")


@pytest.mark.parametrize("shape", [(HQ + 1,), (HQ - 1,), (B + 1, HQ), (B, HQ + 1), (1, HQ)])
def test_alibi_slopes_wrong_shape_at_call(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=_slopes_shape_msg(shape)):
        call(q, k, v, ALiBi(torch.full(shape, 0.5)))


@pytest.mark.parametrize("shape", [(B, HQ, 1), (), (1, 1, HQ)])
def test_alibi_slopes_wrong_rank(shape):
    with pytest.raises(ValueError, match=rf"ALiBi slopes must have shape \(Hq,\) or \(B, Hq\), "
                                         rf"got {_tuple_pattern(shape)}"):
        ALiBi(torch.full(shape, 0.5))


@pytest.mark.parametrize("slopes", [[0.5, 0.25], 0.5, (0.5,)])
def test_alibi_slopes_not_tensor(slopes):
    with pytest.raises(TypeError, match=rf"ALiBi slopes must be a torch\.Tensor or None, got {type(slopes).__name__}"):
        ALiBi(slopes)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_alibi_slopes_integer_dtype(dtype):
    with pytest.raises(TypeError, match=rf"ALiBi slopes must be a floating-point tensor, "
                                        rf"got {_dtype_pattern(dtype)}"):
        ALiBi(torch.ones(HQ, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(HQ,), (B, HQ)])
def test_alibi_slopes_other_dtype_converted(dtype, shape):
    q, k, v = qkv()
    # values exactly representable in fp16 and bf16, so conversion is lossless
    slopes32 = (2.0 ** -torch.arange(1, 1 + math.prod(shape), dtype=torch.float32)).reshape(shape)
    out = call(q, k, v, ALiBi(slopes32.to(dtype)), causal=True)
    ref = call(q, k, v, ALiBi(slopes32), causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    resolved = ALiBi(slopes32.to(dtype)).resolve(B, HQ, D, NK, torch.device("cpu"))
    assert resolved.slopes.dtype == torch.float32


# ---------------------------------------------------------------- RoPE parameters


@pytest.mark.parametrize("rotary_dim", [3, 7, 0, -2, 2.0, True])
def test_rope_rotary_dim_bad(rotary_dim):
    with pytest.raises(ValueError, match=rf"RoPE rotary_dim must be a positive even int or None, "
                                         rf"got {rotary_dim!r}"):
        RoPE(rotary_dim=rotary_dim)


@pytest.mark.parametrize("rotary_dim", [D + 2, 2 * D])
def test_rope_rotary_dim_larger_than_head_dim(rotary_dim):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"RoPE rotary_dim must be <= head dim D={D}, got rotary_dim = {rotary_dim}"):
        call(q, k, v, RoPE(rotary_dim=rotary_dim))


def test_rope_inv_freq_implies_rotary_dim_larger_than_head_dim():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"RoPE rotary_dim must be <= head dim D={D}, "
                                         rf"got 2 \* len\(inv_freq\) = {D + 2}"):
        call(q, k, v, RoPE(inv_freq=torch.ones(D // 2 + 1)))


@pytest.mark.parametrize("theta", [1.0, 0.5, 0, -10000.0, math.inf, math.nan, "10000"])
def test_rope_theta_bad(theta):
    with pytest.raises(ValueError, match=rf"RoPE theta must be a finite number > 1, got {theta!r}"):
        RoPE(theta=theta)


@pytest.mark.parametrize("factor", [0, 0.0, -1.0, math.inf, math.nan, "1"])
def test_rope_attention_factor_bad(factor):
    with pytest.raises(ValueError, match=rf"RoPE attention_factor must be a finite number > 0, got {factor!r}"):
        RoPE(attention_factor=factor)


@pytest.mark.parametrize("length", [1, 3, 5])
def test_rope_inv_freq_wrong_length(length):
    with pytest.raises(ValueError, match=rf"RoPE inv_freq must have length rotary_dim // 2 = 2, got {length}"):
        RoPE(rotary_dim=4, inv_freq=torch.ones(length))


@pytest.mark.parametrize("inv_freq", [torch.ones(2, 2), torch.ones(2, dtype=torch.int64), [1.0, 0.1],
                                      torch.ones(0)])
def test_rope_inv_freq_bad(inv_freq):
    with pytest.raises(ValueError, match=r"RoPE inv_freq must be a 1-D floating-point tensor of length "
                                         r"rotary_dim // 2"):
        RoPE(inv_freq=inv_freq)


def test_rope_partial_and_explicit_inv_freq_accepted():
    q, k, v = qkv()
    assert call(q, k, v, RoPE(rotary_dim=4)).shape == q.shape
    assert call(q, k, v, RoPE(inv_freq=torch.ones(2, dtype=torch.float64))).shape == q.shape


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_alibi_slopes_rejected(bad):
    with pytest.raises(ValueError, match=r"ALiBi slopes must be finite"):
        ALiBi(torch.tensor([0.5, bad]))


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_rope_inv_freq_rejected(bad):
    with pytest.raises(ValueError, match=r"RoPE inv_freq must be finite"):
        RoPE(inv_freq=torch.tensor([1.0, bad]))
