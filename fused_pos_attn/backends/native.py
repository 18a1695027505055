"""The native ops of the C++ extension fused_pos_attn._C: loading it safely, and calling
torch.ops.fused_pos_attn.attention_forward / attention_backward. The CPU kernels serve CPU tensors and the
CUDA C++ kernels (when built) CUDA tensors; cpu_backend and cuda_backend are thin adapters over this module.

`op_args` is the one place the ops' per-call position / masking arguments are built. They are passed by
keyword, so a name that differs from csrc's list (FPA_CALL_ARGS in csrc/include/fused_pos_attn/
attention_params.h) fails loudly instead of binding to the wrong parameter.

On x86-64 the extension is compiled with -mavx2 -mfma -mf16c (setup.py): loading it on a CPU without those
features could die with SIGILL, so the CPU is checked first and a clear ImportError names what is missing.
"""
from __future__ import annotations

import functools
import platform
from typing import Optional

import torch

from fused_pos_attn.triton_kernels.scheme_codes import SCHEME_CODES

from ..positions import fold_distance_grad
from ..spec import AttentionSpec, lse_dtype

X86_FEATURES = ("avx2", "fma", "f16c")  # the instruction sets setup.py compiles the x86 CPU kernels for
CPUINFO = "/proc/cpuinfo"


def _x86_machine() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x86-64")


def _cpuinfo_flags() -> Optional[set[str]]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where it cannot be read."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing_cpu_features() -> list[str]:
    """The entries of X86_FEATURES this CPU lacks ([] on other architectures). Linux reads /proc/cpuinfo;
    elsewhere torch's CPU capability stands in (AVX2 or better implies FMA and F16C on every such CPU)."""
    if not _x86_machine():
        return []
    flags = _cpuinfo_flags()
    if flags is not None:
        return [feature for feature in X86_FEATURES if feature not in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    return [] if capability.startswith(("AVX2", "AVX512")) else list(X86_FEATURES)


def require_cpu_features() -> None:
    """Raise ImportError naming the missing x86 features before the extension is loaded."""
    missing = missing_cpu_features()
    if missing:
        required, lacking = (", ".join(f.upper() for f in features) for features in (X86_FEATURES, missing))
        raise ImportError(
            f"fused_pos_attn's native kernels (fused_pos_attn._C) are compiled for x86-64 CPUs with {required}, "
            f"and this CPU lacks {lacking}; "
            "loading them would crash the process (illegal instruction). Use backend='reference' on this machine, "
            "or backend='triton' / 'cuda' for CUDA tensors.")


def _load_extension():
    require_cpu_features()
    import fused_pos_attn._C  # noqa: F401  registers torch.ops.fused_pos_attn.*
    return torch.ops.fused_pos_attn


OPS = _load_extension()  # torch.ops.fused_pos_attn (tests may stand in for it)
# The ops' per-call arguments after (q, k, v) in attention_forward: FPA_CALL_ARGS, read from the op's schema.
_CALL_ARG_NAMES = [a.name for a in OPS.attention_forward.default._schema.arguments[3:]]


# Fake (meta) implementations of the extension's ops, for torch.compile and FakeTensor tracing: the outputs'
# shapes, dtypes and strides as the C++ ops allocate them (out / dq / dk / dv like their inputs; lse and the
# relative gradient fp32, lse fp64 for fp64 inputs).
@torch.library.register_fake("fused_pos_attn::attention_forward")
def _forward_fake(q, k, v, *call_args, **call_kwargs):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.register_fake("fused_pos_attn::attention_backward")
def _backward_fake(grad_out, grad_lse, q, k, v, out, lse, rel_grad, *call_args, **call_kwargs):
    """d_rel_bias (Hq, 2, max_distance + 1) fp32 when the relative table needs a gradient, else (0,)."""
    call = dict(zip(_CALL_ARG_NAMES, call_args), **call_kwargs)
    table_grad = rel_grad and call["pos"] == SCHEME_CODES["relative"]
    d_rel_bias = q.new_empty((q.shape[1], 2, call["max_distance"] + 1) if table_grad else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), d_rel_bias


def built_with_cuda() -> bool:
    """True when the extension was compiled with the CUDA kernels (a CUDA toolkit and a CUDA build of torch
    at install time)."""
    return OPS.build_info() == "cpu+cuda"


def scheme_codes() -> dict[str, int]:
    """The C++ table of position-scheme codes (position.h's PosKind), name -> code."""
    names, codes = OPS.scheme_codes()
    return dict(zip(names, codes))


@functools.lru_cache(maxsize=16)
def _eager_placeholders(device: torch.device) -> dict:
    return {"slopes": torch.zeros(1, 1, device=device), "inv_freq": torch.zeros(0, device=device),
            "rel_bias": torch.zeros(0, 2, 1, device=device),
            "int64": torch.empty(0, dtype=torch.int64, device=device)}


def _placeholders(device: torch.device) -> dict:
    """The small tensors op_args passes for arguments a call does not use (never read by the kernels), made once
    per device in eager mode (a decode step would otherwise allocate four per call)."""
    return _eager_placeholders.__wrapped__(device) if torch.compiler.is_compiling() else _eager_placeholders(device)


def op_args(spec: AttentionSpec, q: torch.Tensor) -> dict:
    """The ops' per-call position / masking arguments, by name (FPA_CALL_ARGS in attention_params.h).
    Tensors a scheme does not use are small placeholders of the expected dtype on q's device. A packed
    (varlen) spec passes its cu_seqlens and max_seqlen (q, k, v then are (1, H, total, D) and the call's batch
    is the S sequences); a dense one empty (0,) int64 cu_seqlens and max_seqlen 0. seqused_k and block_table are
    empty (0,) int64 when the spec has none."""
    p = spec.position
    batch, heads = spec.num_sequences, q.shape[1]
    unused = _placeholders(q.device)
    slopes = p.slopes if p.slopes is not None else unused["slopes"].expand(batch, heads)
    inv_freq = p.inv_freq if p.inv_freq is not None else unused["inv_freq"]
    rel_bias = p.rel_bias.detach() if p.rel_bias is not None else unused["rel_bias"]
    if spec.varlen:
        cu_seqlens_q, cu_seqlens_k = spec.cu_seqlens_q, spec.cu_seqlens_k
    else:
        cu_seqlens_q = cu_seqlens_k = unused["int64"]
    return dict(q_offset=spec.q_offset, k_offset=spec.k_offset, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k, max_seqlen_q=spec.max_seqlen_q if spec.varlen else 0,
                max_seqlen_k=spec.max_seqlen_k if spec.varlen else 0, pos=SCHEME_CODES[p.kind], slopes=slopes,
                inv_freq=inv_freq, rotary_dim=p.rotary_dim, interleaved=p.interleaved,
                attention_factor=p.attention_factor, rel_bias=rel_bias, max_distance=p.max_distance,
                causal=spec.causal, window=spec.window or 0, scale=spec.scale,
                seqused_k=spec.seqused_k if spec.seqused_k is not None else unused["int64"],
                block_table=spec.block_table if spec.paged else unused["int64"], page_size=spec.page_size)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Nq, D) like q, lse (B, Hq, Nq) fp32 (fp64 for fp64 inputs); packed (spec.varlen): q
    (1, Hq, total_q, D), k / v (1, Hkv, total_k, D), lse (1, Hq, total_q)."""
    return OPS.attention_forward(q, k, v, **op_args(spec, q))


def backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, spec: AttentionSpec,
             rel_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """dq, dk, dv (like q, k, v) for grad_out (B, Hq, Nq, D) and grad_lse (B, Hq, Nq) like lse or None (zero),
    and d_rel_table (Hq, num_buckets) fp32 when the scheme is relative and rel_grad, else None (the kernels
    then skip the table-gradient work). Packed specs: the layouts of forward."""
    rel_grad = rel_grad and spec.position.kind == "relative"
    dq, dk, dv, d_rel_bias = OPS.attention_backward(grad_out, grad_lse, q, k, v, out, lse, rel_grad,
                                                    **op_args(spec, q))
    return dq, dk, dv, (fold_distance_grad(d_rel_bias, spec.position.rel_buckets, spec.position.num_buckets)
                         if rel_grad else None)
