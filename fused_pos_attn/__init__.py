"""fused_pos_attn: FlashAttention-style attention with ALiBi / RoPE / T5 relative bias applied inside the kernel."""
from .attention import fused_attention
from .positions import ALiBi, RelativeBias, RoPE, alibi_slopes
from .rope_scaling import NTK, DynamicNTK, Linear, Llama3, LongRoPE, YaRN
from .kvcache import fused_attention_with_kvcache
from .varlen import fused_attention_varlen

__all__ = ["fused_attention", "fused_attention_varlen", "fused_attention_with_kvcache", "ALiBi", "RoPE", "RelativeBias",
           "alibi_slopes", "Linear", "NTK", "DynamicNTK", "YaRN", "Llama3", "LongRoPE"]
__version__ = "0.1.0"  # the one version string: pyproject.toml reads it (setuptools dynamic version)
