"""RoPE context-extension scalings: each maps (theta, rotary_dim r, seq_len) to (inv_freq, attention factor).

Every scaling only changes the (r/2,) inverse-frequency vector and a scalar that multiplies cos and sin
(../shared/POSITIONS.md, "RoPE"), so the kernels are the same for all of them. The math follows Hugging Face
transformers' `modeling_rope_utils` (rope types linear, dynamic, yarn, llama3, longrope), the oracle of the tests;
it is evaluated in fp64 on the host and rounded once to fp32.

    RoPE(theta=5e5, scaling=Llama3(8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192))
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _check_number(value, name: str, owner: str, positive: bool = True) -> float:
    """A finite real number (not a bool), > 0 when positive; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner} {name} must be a finite number > 0, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{owner} {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_length(value, name: str, owner: str) -> int:
    """A positive int (a training length in tokens)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner} {name} must be a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{owner} {name} must be a positive int, got {value!r}")
    return value


def _base_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    """theta^(-2i/r), i = 0..r/2-1, fp64."""
    return float(theta) ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def _ntk_exponent(rotary_dim: int, owner: str) -> float:
    """r / (r - 2), the NTK-aware base exponent; undefined for r = 2."""
    if rotary_dim <= 2:
        raise ValueError(f"{owner} scaling needs rotary_dim >= 4 (theta is raised to r/(r-2)), got {rotary_dim}")
    return rotary_dim / (rotary_dim - 2)


class RopeScaling:
    """Base class of the RoPE scalings.

    `frequencies(theta, rotary_dim, seq_len)` returns (inv_freq (rotary_dim/2,) fp32 on CPU, attention
    factor). `length_dependent` is True when the result depends on seq_len (then fused_attention passes the
    call's current length, which costs a host read of tensor offsets).
    """

    length_dependent = False

    def frequencies(self, theta: float, rotary_dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Linear(RopeScaling):
    """Position interpolation (transformers rope_type "linear"): inv_freq /= factor.

    Args:
        factor: s > 0; positions are effectively divided by s.
    """

    def __init__(self, factor: float):
        self.factor = _check_number(factor, "factor", "Linear")

    def frequencies(self, theta, rotary_dim, seq_len):
        return (_base_inv_freq(theta, rotary_dim) / self.factor).to(torch.float32), 1.0


class NTK(RopeScaling):
    """Static NTK-aware scaling: theta' = theta * factor^(r/(r-2)). Needs rotary_dim >= 4.

    transformers has no static rope type for it; it equals their "dynamic" type evaluated at one fixed
    length (factor 1, seq_len = factor * max_position_embeddings).

    Args:
        factor: s > 0.
    """

    def __init__(self, factor: float):
        self.factor = _check_number(factor, "factor", "NTK")

    def frequencies(self, theta, rotary_dim, seq_len):
        scaled_theta = theta * self.factor ** _ntk_exponent(rotary_dim, "NTK")
        return _base_inv_freq(scaled_theta, rotary_dim).to(torch.float32), 1.0


class DynamicNTK(RopeScaling):
    """Dynamic NTK scaling (transformers rope_type "dynamic"), recomputed from the call's length.

    theta' = theta * ((s*l/L) - (s-1))^(r/(r-2)) with l = max(current length, L): at or below the original
    length L the frequencies are the unscaled ones. Needs rotary_dim >= 4.

    The current length of a fused_attention call is its largest absolute position + 1, taken over the
    whole batch: max over b of max(q_offset[b] + Nq, k_offset[b] + Nk) (with the default offsets, Nk).
    One inv_freq serves every batch row, like transformers' max(position_ids) + 1. transformers caches the
    largest length seen so far; here each call uses its own length, and since fused_attention rotates the
    (un-rotated) cached keys in-kernel with the call's frequencies, q and k always agree.

    Args:
        factor: s > 0.
        original_max_len: L > 0, the training length (transformers: config.max_position_embeddings).
    """

    length_dependent = True

    def __init__(self, factor: float, original_max_len: int):
        self.factor = _check_number(factor, "factor", "DynamicNTK")
        self.original_max_len = _check_length(original_max_len, "original_max_len", "DynamicNTK")

    def frequencies(self, theta, rotary_dim, seq_len):
        length = max(int(seq_len), self.original_max_len)
        s, L = self.factor, self.original_max_len
        scaled_theta = theta * ((s * length / L) - (s - 1)) ** _ntk_exponent(rotary_dim, "DynamicNTK")
        return _base_inv_freq(scaled_theta, rotary_dim).to(torch.float32), 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-factor formula 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class YaRN(RopeScaling):
    """YaRN (transformers rope_type "yarn"): per-frequency blend of interpolation and extrapolation.

    dim(b) = r*ln(L/(2*pi*b)) / (2*ln theta); low = floor(dim(beta_fast)), high = ceil(dim(beta_slow))
    (no floor/ceil when truncate=False), then low = max(low, 0) and high = min(high, r - 1) exactly as
    transformers clamps them (high += 0.001 when they meet); ramp_i = clamp((i - low)/(high - low), 0, 1);
    inv_freq_i = theta^(-2i/r) * (ramp_i / s + 1 - ramp_i).

    Args:
        factor: s > 0, the context-extension factor.
        original_max_len: L > 0, the training length.
        beta_fast, beta_slow: rotation counts bounding the ramp (> 0, beta_fast > beta_slow).
        mscale: the attention factor multiplied into cos and sin (logits scale by its square), i.e.
            transformers' `attention_factor`. None means 0.1*ln(s) + 1 (1 for s <= 1), transformers'
            default. transformers' separate coefficients `mscale` and `mscale_all_dim` (DeepSeek) are not
            arguments here: RoPE.from_hf folds them into this value as
            yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim), as transformers does.
        truncate: floor/ceil the ramp bounds (default, the paper); transformers' `truncate` key.
    """

    def __init__(self, factor: float, original_max_len: int, beta_fast: float = 32, beta_slow: float = 1,
                 mscale: Optional[float] = None, truncate: bool = True):
        self.factor = _check_number(factor, "factor", "YaRN")
        self.original_max_len = _check_length(original_max_len, "original_max_len", "YaRN")
        self.beta_fast = _check_number(beta_fast, "beta_fast", "YaRN")
        self.beta_slow = _check_number(beta_slow, "beta_slow", "YaRN")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"YaRN beta_fast must be greater than beta_slow, got beta_fast={beta_fast!r}, "
                             f"beta_slow={beta_slow!r}")
        self.mscale = None if mscale is None else _check_number(mscale, "mscale", "YaRN")
        if not isinstance(truncate, bool):
            raise TypeError(f"YaRN truncate must be a bool, got {type(truncate).__name__}")
        self.truncate = truncate

    def attention_factor(self) -> float:
        return yarn_mscale(self.factor) if self.mscale is None else self.mscale

    def frequencies(self, theta, rotary_dim, seq_len):
        r, L = rotary_dim, self.original_max_len

        def correction_dim(rotations: float) -> float:
            return r * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, r - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = ((torch.arange(r // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        base = _base_inv_freq(theta, r)
        inv_freq = base / self.factor * ramp + base * (1 - ramp)
        return inv_freq.to(torch.float32), self.attention_factor()


class Llama3(RopeScaling):
    """Llama 3.1 scaling (transformers rope_type "llama3"); Llama 3.1: Llama3(8, 1, 4, 8192), theta 5e5.

    wavelen_i = 2*pi/inv_freq_i; wavelen > L/low_freq_factor: inv_freq/s; wavelen < L/high_freq_factor:
    unchanged; otherwise smooth = (L/wavelen - a)/(b - a) and inv_freq = (1-smooth)*inv_freq/s + smooth*inv_freq.

    Args:
        factor: s > 0.
        low_freq_factor, high_freq_factor: a < b, both > 0.
        original_max_len: L > 0, the training length.
    """

    def __init__(self, factor: float, low_freq_factor: float, high_freq_factor: float, original_max_len: int):
        self.factor = _check_number(factor, "factor", "Llama3")
        self.low_freq_factor = _check_number(low_freq_factor, "low_freq_factor", "Llama3")
        self.high_freq_factor = _check_number(high_freq_factor, "high_freq_factor", "Llama3")
        if self.low_freq_factor >= self.high_freq_factor:
            raise ValueError(f"Llama3 low_freq_factor must be less than high_freq_factor, got "
                             f"low_freq_factor={low_freq_factor!r}, high_freq_factor={high_freq_factor!r}")
        self.original_max_len = _check_length(original_max_len, "original_max_len", "Llama3")

    def frequencies(self, theta, rotary_dim, seq_len):
        s, a, b, L = self.factor, self.low_freq_factor, self.high_freq_factor, self.original_max_len
        inv_freq = _base_inv_freq(theta, rotary_dim)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((L / wavelen - a) / (b - a)).clamp(0, 1)
        smooth = torch.where(wavelen > L / a, 0.0, torch.where(wavelen < L / b, 1.0, smooth))
        inv_freq = (1 - smooth) * inv_freq / s + smooth * inv_freq
        return inv_freq.to(torch.float32), 1.0


class LongRoPE(RopeScaling):
    """LongRoPE (Phi-3; transformers rope_type "longrope"): per-frequency rescaled frequencies,
    inv_freq_i = theta^(-2i/r) / ext_i, with ext = long_factor when the call's current length (largest position
    + 1) exceeds original_max_len and short_factor otherwise; cos and sin are multiplied by attention_factor,
    by default sqrt(1 + ln(factor) / ln(original_max_len)) (1 for factor <= 1), transformers' default.

    The switch is transformers' per-call rule. Hugging Face's cache keeps each key rotated with the factors of the
    call that wrote it (Phi-3's generate re-runs the prompt when it crosses the original length, so as not to mix
    them); fused_attention's cache holds un-rotated keys and every call rotates all of its keys with its own
    factors, so after the switch the cached keys use the long factors too, exactly as a fresh forward over the
    whole sequence does.

    Args:
        short_factor, long_factor: r/2 positive numbers each (a sequence or 1-D tensor).
        original_max_len: the pretraining length L (transformers' original_max_position_embeddings).
        factor: the context-extension factor s, used only for the default attention factor (transformers:
            the `factor` key, else max_position_embeddings / original_max_position_embeddings).
        attention_factor: None for the default above, else the factor itself.
    """

    length_dependent = True

    def __init__(self, short_factor, long_factor, original_max_len: int, factor: float = 1.0,
                 attention_factor: Optional[float] = None):
        self.short_factor = _check_factors(short_factor, "short_factor")
        self.long_factor = _check_factors(long_factor, "long_factor")
        if len(self.short_factor) != len(self.long_factor):
            raise ValueError(f"LongRoPE short_factor and long_factor must have the same length (rotary_dim / 2), got "
                             f"{len(self.short_factor)} and {len(self.long_factor)}")
        self.original_max_len = _check_length(original_max_len, "original_max_len", "LongRoPE")
        self.factor = _check_number(factor, "factor", "LongRoPE")
        self.attention_factor = (None if attention_factor is None
                                 else _check_number(attention_factor, "attention_factor", "LongRoPE"))

    def frequencies(self, theta, rotary_dim, seq_len):
        factors = self.long_factor if seq_len > self.original_max_len else self.short_factor
        if len(factors) != rotary_dim // 2:
            raise ValueError(f"LongRoPE factors have {len(factors)} entries, but rotary_dim {rotary_dim} needs "
                             f"rotary_dim / 2 = {rotary_dim // 2}")
        inv_freq = _base_inv_freq(theta, rotary_dim) / torch.tensor(factors, dtype=torch.float64)
        if self.attention_factor is not None:
            scale = self.attention_factor
        elif self.factor <= 1.0:
            scale = 1.0
        else:
            scale = math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_len))
        return inv_freq.to(torch.float32), scale


def _check_factors(values, name: str) -> tuple:
    """A non-empty sequence (or 1-D tensor) of finite numbers > 0, as a tuple of floats."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
        raise TypeError(f"LongRoPE {name} must be a non-empty sequence of numbers, got {values!r}")
    return tuple(_check_number(value, name, "LongRoPE") for value in values)
