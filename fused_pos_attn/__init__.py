"""fused_pos_attn: FlashAttention-style attention with ALiBi / RoPE applied inside the kernel."""
from .attention import fused_attention
from .positions import ALiBi, RoPE, alibi_slopes

__all__ = ["fused_attention", "ALiBi", "RoPE", "alibi_slopes"]
__version__ = "0.1.0"
