"""The PyTorch 2 custom ops every kernel backend runs through, so that torch.compile traces fused_attention and
fused_attention_varlen as single graph nodes (no graph break), forward and backward:

    fused_pos_attn::fused_attention(q, k, v, <spec>, str backend) -> (Tensor out, Tensor lse)
    fused_pos_attn::fused_attention_backward(grad_out, grad_lse?, q, k, v, out, lse, bool rel_grad, <spec>,
                                             str backend) -> (dq, dk, dv, d_rel_table)

<spec> is an AttentionSpec flattened field by field (its ResolvedPosition's fields in place of `position`), so
the schema follows the dataclasses: a new per-call field is a new dataclass field, nothing here. Each op has a
fake (meta) implementation giving the outputs' shapes, dtypes and strides from the inputs alone, and
fused_attention's gradient is registered with torch.library.register_autograd (d_rel_table is the gradient of
the relative scheme's (Hq, num_buckets) table, an empty (0,) tensor when rel_grad is False).

The ops dispatch on `backend` ("cpu", "cuda", "triton") to the backend modules: the CPU and CUDA C++ kernels are
the extension's TORCH_LIBRARY ops (fused_pos_attn::attention_forward / attention_backward, which have fake
implementations too), the Triton kernels their Python launchers. The Triton launch stays inside this opaque op
rather than going through torch.library.triton_op: its config choice (autotuning per scheme and head dim, the
packed layout's grids) is host logic Inductor would otherwise re-trace, and one op keeps every backend, the Triton
interpreter on CPU tensors included, on the same traced path. Inductor schedules the op as an extern kernel; it
fuses nothing into it (as with FlashAttention's own op).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Optional

import torch

from . import backends
from .positions import ResolvedPosition
from .spec import AttentionSpec, lse_dtype

NAMESPACE = "fused_pos_attn"
# A spec field's Python type -> its type in the op schema (ints are SymInt: symbolic under dynamic shapes).
_SCHEMA_TYPES = {bool: "bool", float: "float", int: "SymInt", str: "str", torch.Tensor: "Tensor",
                 Optional[int]: "SymInt?", Optional[torch.Tensor]: "Tensor?"}
_POSITION_FIELDS = [f.name for f in dataclasses.fields(ResolvedPosition)]


def _spec_fields() -> list[tuple[str, str]]:
    """(name, schema type) of the flattened spec: AttentionSpec's fields in order, ResolvedPosition's where
    `position` stands."""
    spec_hints, position_hints = typing.get_type_hints(AttentionSpec), typing.get_type_hints(ResolvedPosition)
    fields = []
    for name in (f.name for f in dataclasses.fields(AttentionSpec)):
        if name == "position":
            fields += [(field, _SCHEMA_TYPES[position_hints[field]]) for field in _POSITION_FIELDS]
        else:
            fields.append((name, _SCHEMA_TYPES[spec_hints[name]]))
    return fields


SPEC_FIELDS = _spec_fields()
_SPEC_SCHEMA = ", ".join(f"{kind} {name}" for name, kind in SPEC_FIELDS)
_TENSOR_FIELDS = [i for i, (_, kind) in enumerate(SPEC_FIELDS) if kind.startswith("Tensor")]
_REL_TABLE = [name for name, _ in SPEC_FIELDS].index("rel_table")


def flatten(spec: AttentionSpec) -> list:
    """spec as the ops' <spec> arguments, in SPEC_FIELDS order."""
    return [getattr(spec.position if name in _POSITION_FIELDS else spec, name) for name, _ in SPEC_FIELDS]


def unflatten(args) -> AttentionSpec:
    """The AttentionSpec of the ops' <spec> arguments (inverse of flatten)."""
    values = dict(zip((name for name, _ in SPEC_FIELDS), args))
    position = ResolvedPosition(**{name: values.pop(name) for name in _POSITION_FIELDS})
    return AttentionSpec(position=position, **values)


@torch.library.custom_op(f"{NAMESPACE}::fused_attention", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, {_SPEC_SCHEMA}, str backend) -> (Tensor, Tensor)")
def _forward_op(q, k, v, *spec_and_backend):
    *spec, backend = spec_and_backend
    return backends.by_name(backend).forward(q, k, v, unflatten(spec))


@_forward_op.register_fake
def _forward_fake(q, k, v, *spec_and_backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.custom_op(f"{NAMESPACE}::fused_attention_backward", mutates_args=(),
                         schema=f"(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
                                f"Tensor lse, bool rel_grad, {_SPEC_SCHEMA}, str backend) -> "
                                f"(Tensor, Tensor, Tensor, Tensor)")
def _backward_op(grad_out, grad_lse, q, k, v, out, lse, rel_grad, *spec_and_backend):
    *spec, backend = spec_and_backend
    dq, dk, dv, d_rel_table = backends.by_name(backend).backward(grad_out, grad_lse, q, k, v, out, lse,
                                                                 unflatten(spec), rel_grad)
    return dq, dk, dv, (d_rel_table if rel_grad else q.new_empty(0, dtype=torch.float32))


@_backward_op.register_fake
def _backward_fake(grad_out, grad_lse, q, k, v, out, lse, rel_grad, *spec_and_backend):
    rel_table = spec_and_backend[_REL_TABLE]
    d_rel_table = (rel_table.new_empty(rel_table.shape, dtype=torch.float32) if rel_grad
                   else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), d_rel_table


def _setup_context(ctx, inputs, output):
    q, k, v, *spec_and_backend = inputs
    ctx.save_for_backward(q, k, v, *output, *(spec_and_backend[i] for i in _TENSOR_FIELDS))
    ctx.spec_and_backend = [None if i in _TENSOR_FIELDS else value for i, value in enumerate(spec_and_backend)]
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros


def _backward(ctx, grad_out, grad_lse):
    """Both outputs are differentiable: a gradient reaching lse enters the kernels as delta = rowsum(dO * O) - dLSE,
    so partial attentions merged by their LSE train end to end. The table gradient is computed only when the
    relative scheme's table requires it."""
    q, k, v, out, lse, *spec_tensors = ctx.saved_tensors
    spec_and_backend = list(ctx.spec_and_backend)
    for i, tensor in zip(_TENSOR_FIELDS, spec_tensors):
        spec_and_backend[i] = tensor
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    if grad_lse is not None:
        grad_lse = grad_lse.to(lse.dtype).contiguous()
    rel_grad = ctx.needs_input_grad[3 + _REL_TABLE]
    dq, dk, dv, d_rel_table = _backward_op(grad_out, grad_lse, q, k, v, out, lse, rel_grad, *spec_and_backend)
    grads = [None] * len(spec_and_backend)
    grads[_REL_TABLE] = d_rel_table if rel_grad else None
    return dq, dk, dv, *grads


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def fused_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out like q and lse (B, Hq, Nq) fp32 (fp64 for fp64) from the kernel backend named backend ("cpu", "cuda",
    "triton"); differentiable in q, k, v, lse's inputs and spec.position.rel_table."""
    return _forward_op(q, k, v, *flatten(spec), backend)
