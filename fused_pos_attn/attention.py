"""fused_attention: input validation, dispatch to a backend, and the autograd wrapper."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import backends
from .positions import PositionArg, as_position_scheme
from .reference import attention_reference
from .spec import AttentionSpec

OffsetArg = Optional[Union[int, torch.Tensor]]
MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class FusedAttentionFunction(torch.autograd.Function):
    """Autograd over a kernel backend: forward keeps (q, k, v, out, lse); backward recomputes scores.

    Both outputs are differentiable: a gradient reaching lse (B, Hq, Nq) enters the kernels' backward as
    delta = rowsum(dO * O) - dLSE, so partial attentions merged by their LSE train end to end. rel_table is
    spec.position.rel_table (the relative scheme's (Hq, num_buckets) fp32 bucket table, or None), passed as
    an input so its gradient flows back to the user's table; the kernels compute it only when it is needed.
    """

    @staticmethod
    def forward(ctx, q, k, v, rel_table, spec: AttentionSpec, backend):
        out, lse = backend.forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.backend = spec, backend
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:  # only lse was used
            grad_out = torch.zeros_like(out)
        if grad_lse is not None:
            grad_lse = grad_lse.to(lse.dtype).contiguous()
        rel_grad = ctx.needs_input_grad[3]
        dq, dk, dv, d_rel_table = ctx.backend.backward(grad_out, grad_lse, q, k, v, out, lse, ctx.spec, rel_grad)
        return dq, dk, dv, d_rel_table, None, None


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: PositionArg = "none", *,
                    causal: bool = False, scale: Optional[float] = None, window: Optional[int] = None,
                    q_offset: OffsetArg = None, k_offset: OffsetArg = None, return_lse: bool = False,
                    backend: str = "auto"):
    """Exact attention with the position scheme applied inside the kernel.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0 (GQA/MQA). Any strides.
        pos: "none" | "alibi" | "rope" or an ALiBi / RoPE / RelativeBias object.
        causal: key j visible to query i iff pk(j) <= pq(i).
        scale: multiplies q.k (default 1/sqrt(D)); position biases are not scaled.
        window: left sliding window w > 0: key visible iff pq(i) - pk(j) < w (with or without causal).
        q_offset, k_offset: int or (B,) int tensor of absolute start positions. Defaults align the last
            query with the last key: k_offset = 0 and q_offset = k_offset + Nk - Nq.
        return_lse: also return the (B, Hq, Nq) log-sum-exp of each row's scores, fp32 (fp64 for fp64
            inputs); -inf for a row with no visible key, whose output is 0. Differentiable on every backend.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".

    Returns:
        out (B, Hq, Nq, D) in q's dtype, and lse when return_lse. Differentiable in q, k, v and a
        RelativeBias table.
    """
    _check_tensors(q, k, v)
    batch, num_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scheme = as_position_scheme(pos)
    causal = _check_bool(causal, "causal")
    k_off = _offsets(k_offset, "k_offset", batch, q.device, default=0)
    q_off = _offsets(q_offset, "q_offset", batch, q.device, default=None)
    if q_off is None:
        q_off = k_off + (seq_k - seq_q)
    position = scheme.resolve(batch, num_heads, head_dim, _current_length(scheme, q_off, k_off, seq_q, seq_k),
                              q.device, causal=causal)
    spec = AttentionSpec(causal=causal, scale=_check_scale(scale, head_dim),
                         window=_check_window(window), q_offset=q_off, k_offset=k_off, position=position)
    _check_bool(return_lse, "return_lse")

    chosen = backends.select(backend, q)
    if chosen is None:  # the dense reference, differentiable through autograd
        out, lse = attention_reference(q, k, v, spec, upcast=False)
        out, lse = out.to(q.dtype), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    else:
        out, lse = FusedAttentionFunction.apply(q, k, v, position.rel_table, spec, chosen)
    return (out, lse) if return_lse else out


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, Hq, Nq, D)" if name == "q" else "(B, Hkv, Nk, D)"
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Nk, D), got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size B, got q {q.shape[0]}, k {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim D, got q {q.shape[3]}, k {k.shape[3]}")
    head_dim = q.shape[3]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"number of query heads Hq={q.shape[1]} must be a multiple of key/value heads "
                         f"Hkv={k.shape[1]}")
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"B, Hq, Nq and Nk must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def _offsets(value: OffsetArg, name: str, batch: int, device: torch.device,
             default: Optional[int]) -> Optional[torch.Tensor]:
    """int or (B,) integer tensor -> (B,) int64 on device."""
    if value is None:
        return None if default is None else torch.full((batch,), default, dtype=torch.int64, device=device)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a (B,) integer tensor, got bool")
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() == 0:
            return value.to(device=device, dtype=torch.int64).expand(batch).contiguous()
        if tuple(value.shape) != (batch,):
            raise ValueError(f"{name} must have shape (B,)=({batch},), got {tuple(value.shape)}")
        # A copy, never the caller's tensor: the offsets are saved for backward, and an in-place update of
        # the caller's tensor (a growing KV-cache length) must not change them.
        return value.to(device=device, dtype=torch.int64, copy=True).contiguous()
    raise TypeError(f"{name} must be an int or a (B,) integer tensor, got {type(value).__name__}")


def _current_length(scheme, q_off: torch.Tensor, k_off: torch.Tensor, seq_q: int, seq_k: int) -> int:
    """The call's largest absolute position + 1, max over b of max(q_off[b] + Nq, k_off[b] + Nk), for
    schemes whose parameters depend on it (RoPE with DynamicNTK). Reading the offsets is a device sync, so
    other schemes get max(Nq, Nk), which they ignore."""
    if not getattr(scheme, "length_dependent", False):
        return max(seq_q, seq_k)
    return int(torch.maximum(q_off + seq_q, k_off + seq_k).max())


def _check_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a finite float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _check_window(window: Optional[int]) -> Optional[int]:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be a positive int or None, got {type(window).__name__}")
    if window <= 0:
        raise ValueError(f"window must be a positive int or None, got {window}")
    return window


def _check_bool(value: bool, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
