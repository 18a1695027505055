"""Triton kernels for fused position-aware attention (installed as fused_pos_attn.triton_kernels).

Only @triton.jit code and its launchers live here; this package never imports fused_pos_attn.
"""
from .launch import KernelPosition, attention_backward, attention_forward

__all__ = ["KernelPosition", "attention_forward", "attention_backward"]
