"""Hugging Face transformers models on the fused kernels in one line:

    import fused_pos_attn.hf
    model = AutoModelForCausalLM.from_config(config)      # or from_pretrained
    fused_pos_attn.hf.patch(model)                         # in place; returns model

Supported model types: SUPPORTED. The position scheme runs inside the kernel:
- RoPE models (Llama, Mistral, Qwen2, Qwen3, Phi-3 with longrope, GPT-NeoX partial rotary, GPT-J interleaved partial
  rotary): the model's own rotation is bypassed, so its KV cache stores un-rotated keys, and the kernel rotates q
  and k at the positions the model computes (its position_ids / cache position), with RoPE.from_hf(config).
  DynamicNTK and LongRoPE then apply the call's frequencies to cached keys too (Hugging Face keeps each cached
  key rotated with the frequencies of the call that wrote it).
- ALiBi (BLOOM, MPT): the model's slopes; no (B, H, N) bias tensor reaches the kernel.
- T5 relative buckets: the table of each stack's layer 0 (relative_attention_bias) serves every layer through the
  kernel, and its gradient flows back to it; no (B, H, N, N) position_bias is built.

Padding: the model is switched to the attention implementation "fused_pos_attn" (registered with transformers'
AttentionInterface and AttentionMaskInterface), whose mask is the 2-D padding mask (or None), as for
flash-attention. A padded batch (left or right) is unpadded to fused_attention_varlen, each row a sequence whose
positions continue from its first real token's position id; a batch of one row whose position ids restart
(packed documents, no padding mask, no cache) runs each document as its own sequence, or uses the
cu_seq_lens_q / cu_seq_lens_k / max_length_q / max_length_k keyword arguments when the data collator gives them
(DataCollatorWithFlattening(return_flash_attn_kwargs=True)). Unpadding and detecting packed documents read the
mask / position ids on the host (as transformers' flash-attention path does): under torch.compile they are graph
breaks; an unpadded batch is not (fused_attention with (B,) offsets from position_ids[:, 0]).

Not supported (a clear error, never a silent difference): attention dropout during training (the kernels have
none: set the config's attention dropout to 0), output_attentions, model types outside SUPPORTED. This module
imports transformers lazily: `import fused_pos_attn` never does.
"""
from __future__ import annotations

import functools
import math
import sys
import types
from typing import Optional

import torch
import torch.nn.functional as F

from .attention import fused_attention
from .positions import ALiBi, RelativeBias, RoPE
from .varlen import fused_attention_varlen

IMPLEMENTATION = "fused_pos_attn"  # the attn_implementation name registered with transformers
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "gptj", "bloom", "mpt", "t5")
# Model types whose attention modules call transformers' attention interface after apply_rotary_pos_emb.
_INTERFACE_ROPE_MODELS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox")


class _Unrotated:
    """What the patched rotary-embedding modules return instead of (cos, sin): apply_rotary_pos_emb then leaves
    q and k as they are (the kernel rotates them)."""

    def __repr__(self) -> str:
        return "fused_pos_attn.hf.UNROTATED"


UNROTATED = _Unrotated()


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Run model's attention on fused_pos_attn's kernels, in place; returns model.

    model: a transformers PreTrainedModel of a type in SUPPORTED (base model or any head on it).
    Raises ValueError for other model types, listing the supported ones.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"fused_pos_attn.hf.patch supports model types {', '.join(SUPPORTED)}; got "
                         f"{model_type!r} ({type(model).__name__})")
    _register()
    if model_type in _INTERFACE_ROPE_MODELS:
        _patch_interface_rope(model, RoPE.from_hf(config))
    elif model_type == "gptj":
        _patch_forwards(model, "GPTJAttention", _gptj_forward, position=RoPE.from_hf(config))
    elif model_type == "bloom":
        _patch_forwards(model, "BloomAttention", _bloom_forward, position=ALiBi())
    elif model_type == "mpt":
        _patch_forwards(model, "MptAttention", _mpt_forward, position=ALiBi(_mpt_slopes(config)))
    else:
        _patch_t5(model)
    _set_implementation(model)
    return model


# ----------------------------------------------------------------------------------------------------
# The attention call shared by every model type.

def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor],
           position, *, causal: bool, scale: float, window: Optional[int] = None,
           position_ids: Optional[torch.Tensor] = None, dropout: float = 0.0, packed: Optional[dict] = None,
           cross: bool = False, owner: str = "attention") -> torch.Tensor:
    """Attention as transformers hands it to an attention function, on the fused kernels.

    query (B, Hq, Nq, D); key, value (B, Hkv, Nk, D), the whole cache (un-rotated keys); attention_mask None or the
    (B, Nk) padding mask (True / 1 = token; a (B, 0) mask: nothing padded); position_ids None or (B or 1, Nq)
    positions of the queries (None: the queries are the last Nq of Nk positions 0..Nk-1); packed: cu_seq_lens_q /
    cu_seq_lens_k / max_length_q / max_length_k of packed documents, or None; cross: cross-attention (the mask
    covers the keys only, every query is real). Returns (B, Nq, Hq, D); query rows that are padding get 0.
    """
    if dropout:
        raise ValueError(f"fused_pos_attn.hf: {owner} has attention dropout {dropout} in training, which the fused "
                         f"kernels do not implement; set the config's attention dropout to 0")
    batch, heads, seq_q, _ = query.shape
    seq_k = key.shape[2]
    call = dict(causal=causal, scale=scale, window=window)
    if attention_mask is not None and attention_mask.shape[-1] > 0:  # (B, 0): nothing padded (MPT)
        return _attend_padded(query, key, value, attention_mask.bool(), position, position_ids, call, cross)
    if packed is not None and packed.get("cu_seq_lens_q") is not None:
        return _attend_packed(query, key, value, position, position_ids, call, packed)
    if batch == 1 and seq_q == seq_k > 1 and position_ids is not None and _restarts(position_ids[0]):
        return _attend_packed(query, key, value, position, position_ids, call, None)
    q_offset = None if position_ids is None else position_ids[:, 0].expand(batch)
    k_offset = None if q_offset is None else q_offset + (seq_q - seq_k)
    out = fused_attention(query, key, value, position, q_offset=q_offset, k_offset=k_offset, **call)
    return out.transpose(1, 2)


def _restarts(positions: torch.Tensor) -> bool:
    """Whether (N,) position ids restart somewhere (packed documents). Reads them on the host."""
    return bool((positions[1:] != positions[:-1] + 1).any())


def _attend_padded(query, key, value, mask, position, position_ids, call, cross) -> torch.Tensor:
    """Unpad rows to packed sequences (transformers' flash-attention rule: in self-attention the queries are the last
    Nq of the Nk mask columns), run fused_attention_varlen, scatter back."""
    batch, heads, seq_q, head_dim = query.shape
    seq_k = key.shape[2]
    if mask.shape != (batch, seq_k):
        raise ValueError(f"fused_pos_attn.hf: the padding mask must be (B, Nk) = ({batch}, {seq_k}), got "
                         f"{tuple(mask.shape)}")
    q_mask = torch.ones_like(mask[:, :1]).expand(batch, seq_q) if cross else mask[:, seq_k - seq_q:]
    len_q, len_k = q_mask.sum(1), mask.sum(1)
    cu_q, cu_k = (F.pad(lengths.cumsum(0), (1, 0)) for lengths in (len_q, len_k))
    rows_q = q_mask.flatten().nonzero().squeeze(1)
    rows_k = mask.flatten().nonzero().squeeze(1)
    q = query.transpose(1, 2).reshape(batch * seq_q, heads, head_dim).index_select(0, rows_q)
    k, v = (t.transpose(1, 2).reshape(batch * seq_k, t.shape[1], head_dim).index_select(0, rows_k)
            for t in (key, value))
    if position_ids is None:  # the real keys at 0.. len_k - 1, the queries bottom-right (fused_attention's default)
        q_offset = len_k - len_q
    else:  # each row's first real query sits at its position id
        first = q_mask.int().argmax(1, keepdim=True)
        q_offset = position_ids.expand(batch, seq_q).gather(1, first).squeeze(1)
    out = fused_attention_varlen(q, k, v, cu_q, cu_k, seq_q, seq_k, position, q_offset=q_offset,
                                 k_offset=q_offset + len_q - len_k, **call)
    full = out.new_zeros(batch * seq_q, heads, head_dim).index_copy(0, rows_q, out)
    return full.view(batch, seq_q, heads, head_dim)


def _attend_packed(query, key, value, position, position_ids, call, packed) -> torch.Tensor:
    """One row of packed documents (no padding, no cache): each document is a sequence of its own."""
    seq = query.shape[2]
    if packed is not None:
        cu_q, cu_k = packed["cu_seq_lens_q"], packed["cu_seq_lens_k"]
        max_q, max_k = int(packed.get("max_length_q") or seq), int(packed.get("max_length_k") or seq)
    else:
        positions = position_ids[0]
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[1:] = positions[1:] != positions[:-1] + 1
        cu_q = cu_k = torch.cat((starts.nonzero().squeeze(1), positions.new_tensor([seq])))
        max_q = max_k = seq
    q_offset = None if position_ids is None else position_ids[0, cu_q[:-1].clamp(max=seq - 1).long()]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, D) views
    out = fused_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, position, q_offset=q_offset,
                                 k_offset=q_offset, **call)
    return out.unsqueeze(0)


# ----------------------------------------------------------------------------------------------------
# Registration with transformers.

def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(IMPLEMENTATION, _interface_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _padding_mask)


def _padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: Optional[torch.Tensor] = None, config=None, **kwargs):
    """The mask the model hands its attention modules: the (B, Nk) padding mask, or None when nothing is padded
    (transformers' flash-attention rule). MPT's model calls .to(torch.bool) on it unconditionally, so MPT gets a
    (B, 0) mask for "nothing padded" instead of None (attend reads both the same way)."""
    from transformers.masking_utils import flash_attention_mask
    mask = flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask)
    if mask is None and getattr(config, "model_type", None) == "mpt":
        return torch.ones(batch_size, 0, dtype=torch.bool)
    return mask


def _set_implementation(model: torch.nn.Module) -> None:
    """Switch the configs of model and its submodules to IMPLEMENTATION, so that masks reach the attention as 2-D
    padding masks. Set directly: transformers' set_attn_implementation refuses models whose attention does not
    go through AttentionInterface (GPT-J, BLOOM, MPT), whose forwards patch() replaces."""
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        config._attn_implementation = IMPLEMENTATION


def _interface_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                         position_ids: Optional[torch.Tensor] = None, output_attentions: bool = False, **kwargs):
    """transformers' attention-function signature: (output (B, Nq, Hq, D), None)."""
    if output_attentions:
        raise ValueError("fused_pos_attn.hf: output_attentions is not available (no attention matrix is formed)")
    position = getattr(module, "fused_pos_attn_position", None)
    if position is None:
        raise ValueError(f"fused_pos_attn.hf: {type(module).__name__} was not patched by fused_pos_attn.hf.patch; "
                         f"attn_implementation={IMPLEMENTATION!r} is only for patched models")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = attend(query, key, value, attention_mask, position, causal=getattr(module, "is_causal", True),
                 scale=scale, window=sliding_window, position_ids=position_ids, dropout=dropout, packed=kwargs,
                 owner=type(module).__name__)
    return out, None


# ----------------------------------------------------------------------------------------------------
# Model families.

def _modules(model: torch.nn.Module, class_suffix: str) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith(class_suffix)]


def _patch_interface_rope(model: torch.nn.Module, rope: RoPE) -> None:
    """Llama-like models: their rotary-embedding modules return UNROTATED, their modeling module's
    apply_rotary_pos_emb passes UNROTATED through, and every attention module carries the RoPE."""
    for rotary in _modules(model, "RotaryEmbedding"):
        rotary.forward = types.MethodType(lambda self, x, position_ids=None, *args, **kw: (UNROTATED, UNROTATED),
                                          rotary)
    attentions = _modules(model, "Attention")
    for attention in attentions:
        attention.fused_pos_attn_position = rope
    for module_name in {type(attention).__module__ for attention in attentions}:
        modeling = sys.modules[module_name]
        original = modeling.apply_rotary_pos_emb
        if not getattr(original, "passes_unrotated", False):
            modeling.apply_rotary_pos_emb = _passing_unrotated(original)


def _passing_unrotated(apply_rotary_pos_emb):
    """apply_rotary_pos_emb that returns q and k untouched when given UNROTATED (patched models) and rotates
    them as before otherwise (every other model of the same type in the process)."""
    def apply(q, k, cos, sin, *args, **kwargs):
        if cos is UNROTATED:
            return q, k
        return apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs)
    apply.passes_unrotated = True
    return apply


def _patch_forwards(model: torch.nn.Module, class_name: str, forward, position) -> None:
    """Give every attention module of class class_name (or a subclass, e.g. GPT-J's flash-attention one) forward
    and the position scheme."""
    for attention in model.modules():
        if any(cls.__name__ == class_name for cls in type(attention).__mro__):
            attention.fused_pos_attn_position = position
            attention.forward = types.MethodType(forward, attention)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * D) -> (B, heads, N, D) view."""
    return t.view(*t.shape[:2], heads, -1).transpose(1, 2)


def _gptj_forward(self, hidden_states, layer_past=None, attention_mask=None, position_ids=None, use_cache=False,
                  output_attentions=False, **kwargs):
    """GPTJAttention.forward with RoPE (rotary_dim leading dims, interleaved) in the kernel."""
    if output_attentions:
        raise ValueError("fused_pos_attn.hf: output_attentions is not available (no attention matrix is formed)")
    heads = self.num_attention_heads
    query, key, value = (_heads(proj(hidden_states), heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    out = attend(query, key, value, attention_mask, self.fused_pos_attn_position, causal=True,
                 scale=1.0 / math.sqrt(self.head_dim), position_ids=position_ids,
                 dropout=self.attn_dropout.p if self.training else 0.0, owner="GPTJAttention")
    return self.resid_dropout(self.out_proj(out.reshape(*hidden_states.shape[:2], -1))), None


def _bloom_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):
    """BloomAttention.forward with ALiBi in the kernel (the model's (B * H, 1, Nk) alibi tensor is not read)."""
    from transformers.models.bloom.modeling_bloom import dropout_add
    if output_attentions:
        raise ValueError("fused_pos_attn.hf: output_attentions is not available (no attention matrix is formed)")
    batch, seq, _ = hidden_states.shape
    fused_qkv = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3, self.head_dim)
    query, key, value = (fused_qkv[..., i, :].transpose(1, 2) for i in range(3))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    out = attend(query, key, value, attention_mask, self.fused_pos_attn_position, causal=True,
                 scale=self.inv_norm_factor, dropout=self.attention_dropout.p if self.training else 0.0,
                 owner="BloomAttention")
    output = self.dense(out.reshape(batch, seq, -1))
    return dropout_add(output, residual, self.hidden_dropout, self.training), None


def _mpt_forward(self, hidden_states, position_bias=None, past_key_values=None, attention_mask=None, **kwargs):
    """MptAttention.forward with ALiBi in the kernel (the model's (H, 1, max_seq_len) bias is not read)."""
    batch, seq = hidden_states.shape[:2]
    mixed_qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed_qkv = mixed_qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (_heads(t, self.n_heads) for t in mixed_qkv.chunk(3, dim=2))
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    out = attend(query, key, value, attention_mask, self.fused_pos_attn_position, causal=True,
                 scale=self.softmax_scale, dropout=self.attn_dropout_p if self.training else 0.0,
                 owner="MptAttention")
    return self.out_proj(out.reshape(batch, seq, -1)), None


def _mpt_slopes(config) -> torch.Tensor:
    """MPT's ALiBi slopes (modeling_mpt.build_mpt_alibi_tensor): 2^(-alibi_bias_max * h / n'), h = 1..n' with n' the
    next power of two of the head count, odd entries first when the head count is not a power of two."""
    heads, bias_max = config.n_heads, config.attn_config.alibi_bias_max
    padded = 2 ** math.ceil(math.log2(heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, padded + 1, dtype=torch.float32) * (bias_max / padded))
    if padded != heads:
        slopes = torch.cat((slopes[1::2], slopes[::2]))[:heads]
    return slopes


def _patch_t5(model: torch.nn.Module) -> None:
    """T5: every attention module gets a forward that runs the kernel. Self-attention reads its stack's layer-0
    table (decoder: causal, one-sided buckets; encoder: bidirectional), through a function rather than a module
    attribute (which would register layer 0 as a child of every layer); cross-attention has no position scheme."""
    for stack in _modules(model, "Stack"):
        first = stack.block[0].layer[0].SelfAttention
        for block in stack.block:
            block.layer[0].SelfAttention.fused_pos_attn_position = functools.partial(_t5_relative_bias, first)
    for attention in _modules(model, "T5Attention"):
        attention.forward = types.MethodType(_t5_forward, attention)


def _t5_relative_bias(first: torch.nn.Module) -> RelativeBias:
    """The RelativeBias of a T5 stack's layer-0 self-attention: its (num_buckets, H) embedding as the (H,
    num_buckets) table (a view, so the gradient reaches the embedding)."""
    return RelativeBias(first.relative_attention_bias.weight.t(), max_distance=first.relative_attention_max_distance,
                        bidirectional=not first.is_decoder)


def _t5_forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, past_key_values=None,
                output_attentions=False, **kwargs):
    """T5Attention.forward on the kernel; returns (output, position_bias placeholder, None). The placeholder (an
    empty tensor) is what the stack hands the next layers in place of a (B, H, Nq, Nk) bias."""
    from transformers.cache_utils import EncoderDecoderCache
    if output_attentions:
        raise ValueError("fused_pos_attn.hf: output_attentions is not available (no attention matrix is formed)")
    is_cross = key_value_states is not None
    query = _heads(self.q(hidden_states), self.n_heads)
    cache = past_key_values
    updated = False
    if isinstance(past_key_values, EncoderDecoderCache):
        updated = past_key_values.is_updated.get(self.layer_idx)
        cache = past_key_values.cross_attention_cache if is_cross else past_key_values.self_attention_cache
    if is_cross and cache is not None and updated:
        key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
    else:
        source = key_value_states if is_cross else hidden_states
        key, value = _heads(self.k(source), self.n_heads), _heads(self.v(source), self.n_heads)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            if is_cross and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[self.layer_idx] = True
    position = "none" if is_cross else self.fused_pos_attn_position()
    causal = self.is_decoder and not is_cross
    out = attend(query, key, value, mask, position, causal=causal, scale=1.0,
                 dropout=self.dropout if self.training else 0.0, cross=is_cross, owner="T5Attention")
    output = self.o(out.reshape(*hidden_states.shape[:2], -1))
    return output, hidden_states.new_empty(0), None
