"""Triton kernels for fused position-aware attention (installed as fused_pos_attn.triton_kernels).

Only @triton.jit code and its launchers live here; this package never imports fused_pos_attn. The
launchers load lazily, so `fused_pos_attn.triton_kernels.scheme_codes` imports where Triton is absent.
"""
__all__ = ["KernelCall", "KernelPosition", "MAX_GRAD_BUCKETS", "attention_forward", "attention_backward"]


def __getattr__(name: str):
    if name in __all__:
        from . import launch
        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
