"""fused_attention: input validation, dispatch to a backend, and the autograd wrapper."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import backends
from .ops import fused_attention_op
from .positions import PositionArg, as_position_scheme
from .reference import attention_reference
from .spec import AttentionSpec, lse_dtype

OffsetArg = Optional[Union[int, torch.Tensor]]
MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    check_qkv(q, k, v)
    batch, num_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scheme = as_position_scheme(pos)
    causal = check_bool(causal, "causal")
    k_off = check_offsets(k_offset, "k_offset", batch, q.device, default=0)
    q_off = check_offsets(q_offset, "q_offset", batch, q.device, default=None)
    if q_off is None:
        q_off = k_off + (seq_k - seq_q)
    if is_int(k_offset, True) and is_int(q_offset, True):  # the length without reading a tensor
        k_start = k_offset or 0
        length = current_length(scheme, k_start + seq_k - seq_q if q_offset is None else q_offset, k_start, seq_q,
                                seq_k, fallback=max(seq_q, seq_k))
    else:
        length = current_length(scheme, q_off, k_off, seq_q, seq_k, fallback=max(seq_q, seq_k))
    position = scheme.resolve(batch, num_heads, head_dim, length, q.device, causal=causal)
    spec = AttentionSpec(causal=causal, scale=check_scale(scale, head_dim),
                         window=check_window(window), q_offset=q_off, k_offset=k_off, position=position)
    return attend(q, k, v, spec, backend, return_lse)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, backend: str,
           return_lse: bool):
    """Run a validated call on the chosen backend (q, k, v 4-D in spec's layout): out, and lse when
    return_lse. The dense reference is differentiable through autograd, kernel backends through the custom op
    fused_pos_attn::fused_attention (ops.py), which torch.compile traces as one node."""
    check_bool(return_lse, "return_lse")
    chosen = backends.select(backend, q)
    if chosen is None:
        out, lse = attention_reference(q, k, v, spec, upcast=False)
        out, lse = out.to(q.dtype), lse.to(lse_dtype(q.dtype))
    elif _needs_op(q, k, v, spec):
        out, lse = fused_attention_op(q, k, v, spec, chosen.NAME)
    else:  # eager inference: the custom op's dispatch (autograd, dynamo guards) would cost more than a decode step
        out, lse = chosen.forward(q, k, v, spec)
    return (out, lse) if return_lse else out


def _needs_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> bool:
    """Whether a kernel call must go through the custom op: under torch.compile (which traces it as one node) or
    when autograd records it. Otherwise the backend runs directly, the same kernel without ~50 us of dispatch."""
    if torch.compiler.is_compiling():
        return True
    table = spec.position.rel_table
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, table))


def check_tensor_types(tensors: dict, layouts: dict) -> None:
    """Each named tensor is a torch.Tensor of as many dims as its layout's first parenthesized group names, with a
    float dtype; the first three (q, k, v in that order, whatever their names) share a dtype and a device, and k's
    shape is v's. layouts: name -> its layout text, e.g. "(B, Hq, Nq, D)" (the dims are counted from it)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        ndim = layouts[name].split(")")[0].count(",") + 1
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layouts[name]}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    (q_name, q), (k_name, k), (v_name, v) = list(tensors.items())[:3]
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{q_name}, {k_name}, {v_name} must share a dtype, got {q_name} {q.dtype}, {k_name} {k.dtype}, "
                        f"{v_name} {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{q_name}, {k_name}, {v_name} must be on one device, got {q_name} {q.device}, {k_name} "
                         f"{k.device}, {v_name} {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} and {v_name} must have the same shape {layouts[k_name]}, got {k_name} "
                         f"{tuple(k.shape)}, {v_name} {tuple(v.shape)}")


def check_heads(num_heads: int, num_kv_heads: int, head_dim: int, kv_head_dim: int) -> None:
    """Head counts and head dims shared by both layouts."""
    if head_dim != kv_head_dim:
        raise ValueError(f"q and k must have the same head dim D, got q {head_dim}, k {kv_head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"number of query heads Hq={num_heads} must be a multiple of key/value heads "
                         f"Hkv={num_kv_heads}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_tensor_types(dict(q=q, k=k, v=v), dict(q="(B, Hq, Nq, D)", k="(B, Hkv, Nk, D)", v="(B, Hkv, Nk, D)"))
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size B, got q {q.shape[0]}, k {k.shape[0]}")
    check_heads(q.shape[1], k.shape[1], q.shape[3], k.shape[3])
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"B, Hq, Nq and Nk must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def check_offsets(value: OffsetArg, name: str, batch: int, device: torch.device,
                  default: Optional[int], batch_name: str = "B") -> Optional[torch.Tensor]:
    """int or (batch,) integer tensor -> (batch,) int64 on device; batch_name names the batch dim in errors
    ("B" for fused_attention, "S" for the sequences of fused_attention_varlen)."""
    expected = f"an int or a ({batch_name},) integer tensor"
    if value is None:
        return None if default is None else torch.full((batch,), default, dtype=torch.int64, device=device)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {expected}, got bool")
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() == 0:
            return value.to(device=device, dtype=torch.int64).expand(batch).contiguous()
        if tuple(value.shape) != (batch,):
            raise ValueError(f"{name} must have shape ({batch_name},)=({batch},), got {tuple(value.shape)}")
        # A copy, never the caller's tensor: the offsets are saved for backward, and an in-place update of
        # the caller's tensor (a growing KV-cache length) must not change them.
        return value.to(device=device, dtype=torch.int64, copy=True).contiguous()
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def is_int(value, none_ok: bool = False) -> bool:
    """A Python int (torch.SymInt under torch.compile's dynamic shapes), not a bool; or None when none_ok."""
    return (value is None and none_ok) or (isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool))


def current_length(scheme, q_off: Union[int, torch.Tensor], k_off: Union[int, torch.Tensor],
                   len_q: Union[int, torch.Tensor], len_k: Union[int, torch.Tensor], fallback: int) -> int:
    """The call's largest absolute position + 1, max over b of max(q_off[b] + len_q[b], k_off[b] + len_k[b])
    (offsets and lengths: ints, or per-sequence tensors), for schemes whose parameters depend on it (RoPE with
    DynamicNTK). Other schemes get `fallback`, which they ignore. From ints it is Python arithmetic (symbolic
    under torch.compile's dynamic shapes: no graph break, no compilation per length); from tensors it is read
    back: a device sync, and under torch.compile a graph break (the frequencies depend on the value)."""
    if not getattr(scheme, "length_dependent", False):
        return fallback
    if all(is_int(value) for value in (q_off, k_off, len_q, len_k)):
        return max(q_off + len_q, k_off + len_k)
    return int(torch.maximum(q_off + len_q, k_off + len_k).max())


def check_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a finite float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def check_window(window: Optional[int]) -> Optional[int]:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be a positive int or None, got {type(window).__name__}")
    if window <= 0:
        raise ValueError(f"window must be a positive int or None, got {window}")
    return window


def check_bool(value: bool, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
