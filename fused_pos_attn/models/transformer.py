"""A small decoder-only transformer LM whose attention is `fused_attention` (causal).

Pre-norm blocks (LayerNorm -> attention -> residual, LayerNorm -> GELU MLP -> residual), a final LayerNorm
and an output head tied to the token embedding. The position scheme is chosen by name (see positional.py);
every scheme has the same parameters except the `learned` table and the per-layer `t5` tables.

Shapes: tokens (B, N) int64 -> logits (B, N, vocab_size). Inside attention q, k, v are (B, H, N, D) views
of one (B, N, 3, H, D) projection (no copies: fused_attention reads any strides).

`attention="sdpa"` swaps the kernel for what users do without it: RoPE applied to q and k as new tensors,
ALiBi / T5 biases built as a dense (1, H, Nq, Nk) tensor with the causal mask merged in, then
`F.scaled_dot_product_attention`. The claims and latency experiments compare the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import fused_attention
from ..distributed import ContextParallel, context_parallel_attention
from ..positions import PositionScheme
from ..reference import apply_rope, position_bias, visibility
from .positional import ABSOLUTE_SCHEMES, AbsolutePositions, AttentionPositions, check_scheme

ATTENTION_IMPLS = ("fused", "sdpa")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and choices of a TransformerLM.

    scheme: position scheme name (positional.SCHEMES).
    train_len: the training length L_train (rows of the learned table; where the RoPE variants start
        rescaling).
    attention: "fused" (fused_attention) or "sdpa" (dense bias + F.scaled_dot_product_attention).
    backend: fused_attention's backend argument ("auto" picks the native kernels for CPU tensors).
    """

    scheme: str = "alibi"
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    train_len: int = 128
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    attention: str = "fused"
    backend: str = "auto"

    def __post_init__(self):
        check_scheme(self.scheme)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


class KVCache:
    """Key/value buffers of every layer for incremental decoding.

    keys[l], values[l]: (B, max_len, H, D); positions 0 .. length-1 are filled. The fused path stores keys
    UN-rotated (the kernel rotates q and k at their absolute positions, given length as q_offset); the
    sdpa path stores RoPE keys already rotated, as transformers does.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        shape = (batch, max_len, config.num_heads, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.length = 0

    def evict(self, sinks: int, recent: int) -> None:
        """StreamingLLM-style eviction: keep the first `sinks` and the last `recent` positions, moved together so
        that positions stay contiguous in the cache (the next token sits at sinks + recent). Exact for the fused
        path, whose keys are un-rotated: the kernel rotates them at their new positions. (The sdpa path's keys
        are cached rotated at their old positions; moving them does not re-rotate them.)"""
        if sinks < 0 or recent < 0:
            raise ValueError(f"sinks and recent must be >= 0, got {sinks} and {recent}")
        if sinks + recent >= self.length:
            return
        for buffer in self.keys + self.values:
            buffer[:, sinks:sinks + recent] = buffer[:, self.length - recent:self.length].clone()
        self.length = sinks + recent

    def fill_random(self, length: int, generator: Optional[torch.Generator] = None) -> None:
        """Pretend `length` tokens were prefilled: standard-normal keys/values (timing does not depend on them)."""
        if length > self.max_len:
            raise ValueError(f"length {length} exceeds the cache's max_len {self.max_len}")
        for buffer in self.keys + self.values:
            buffer[:, :length].normal_(generator=generator)
        self.length = length


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with the layer's position scheme applied in the kernel.

    x (B, N, d_model) -> (B, N, d_model). With a cache, x holds the N new tokens at positions
    offset .. offset + N - 1 and attends to the cache's first offset + N keys.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.positions = AttentionPositions(config.scheme, config.num_heads, config.train_len, config.rope_theta)

    def forward(self, x: torch.Tensor, offset: int = 0, context_len: Optional[int] = None,
                cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                context_parallel: Optional[ContextParallel] = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads, head_dim = self.config.num_heads, self.config.head_dim
        context_len = offset + seq if context_len is None else context_len
        q, k, v = self.qkv(x).view(batch, seq, 3, heads, head_dim).unbind(2)  # each (B, N, H, D)
        pos = self.positions.position(context_len)
        if context_parallel is not None:  # x is this rank's shard of the sequence
            cp = context_parallel
            out = context_parallel_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pos=pos,
                                             causal=True, group=cp.group, layout=cp.layout, method=cp.method,
                                             position_offset=offset, backend=self.config.backend)
        elif self.config.attention == "fused":
            k, v = self._cached(k, v, offset, cache)
            out = fused_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pos=pos, causal=True,
                                  q_offset=offset, k_offset=0, backend=self.config.backend)
        else:
            out = self._dense(q, k, v, pos, offset, context_len, cache)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, -1))

    @staticmethod
    def _cached(k: torch.Tensor, v: torch.Tensor, offset: int,
                cache: Optional[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, N, H, D) k, v at offset into the cache; return the filled (B, offset + N, H, D)."""
        if cache is None:
            return k, v
        end = offset + k.shape[1]
        cache[0][:, offset:end] = k
        cache[1][:, offset:end] = v
        return cache[0][:, :end], cache[1][:, :end]

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: PositionScheme | str, offset: int,
               context_len: int, cache: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Dense-bias + SDPA attention. q, k, v (B, N, H, D) -> (B, H, N, D)."""
        seq, device = q.shape[1], q.device
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        resolved = (pos.resolve(1, self.config.num_heads, self.config.head_dim, context_len, device, causal=True)
                    if isinstance(pos, PositionScheme) else None)
        pq = torch.arange(offset, offset + seq, device=device)[None, :]  # (1, N)
        if resolved is not None and resolved.kind == "rope":
            q, k = apply_rope(q, pq, resolved), apply_rope(k, pq, resolved)
        k, v = self._cached(k.transpose(1, 2), v, offset, cache)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        pk = torch.arange(k.shape[2], device=device)[None, :]
        bias = position_bias(pq, pk, resolved, q.dtype) if resolved is not None else None
        if seq == 1:  # one new token: every cached key is visible, no causal mask needed
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if bias is None:
            if offset == 0:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visibility(pq, pk, True, None))
        bias = bias.masked_fill(~visibility(pq, pk, True, None), float("-inf"))  # (1, H, Nq, Nk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); (B, N, d) -> (B, N, d)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.fc2 = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, offset: int = 0, context_len: Optional[int] = None,
                cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                context_parallel: Optional[ContextParallel] = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), offset, context_len, cache, context_parallel)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nn.Module):
    """Decoder-only LM: tokens (B, N) int64 -> logits (B, N, vocab_size).

    Token embeddings are initialized N(0, 1/d) and multiplied by sqrt(d) (unit-scale vectors, the scale of
    the sinusoidal encoding), as fairseq's transformer LM does; the output head reuses the embedding matrix.
    Linear layers are initialized N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 * num_layers)).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.absolute = (AbsolutePositions(config.scheme, config.d_model, config.train_len)
                         if config.scheme in ABSOLUTE_SCHEMES else None)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=self.config.d_model ** -0.5)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                residual = name.endswith("attn.proj") or name.endswith("fc2")
                std = 0.02 / math.sqrt(2 * self.config.num_layers) if residual else 0.02
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)

    def set_scheme(self, scheme: str) -> None:
        """Switch between schemes that share weights (rope, rope_linear, rope_yarn) for evaluation."""
        if self.config.scheme != scheme and {self.config.scheme, scheme} - {"rope", "rope_linear", "rope_yarn"}:
            raise ValueError(f"only the RoPE variants share weights; cannot switch {self.config.scheme} -> {scheme}")
        self.config = ModelConfig(**{**self.config.__dict__, "scheme": scheme})
        for block in self.blocks:
            block.attn.config = self.config
            block.attn.positions.scheme = scheme

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None, context_len: Optional[int] = None,
                context_parallel: Optional[ContextParallel] = None) -> torch.Tensor:
        """tokens (B, N) -> logits (B, N, V). With a cache, tokens sit at positions cache.length ...
        cache.length + N - 1 and the cache advances by N. context_len (default: last position + 1) is the
        length the RoPE variants rescale for.

        context_parallel: the sequence is split over its group's ranks: tokens (B, n) are this rank's shard
        (ContextParallel.shard of the full (B, N) batch), logits (B, n, V) its rows; attention runs
        context_parallel_attention, absolute positions are the shard's global ones, context_len defaults to N.
        Every rank's parameter gradient is then its own tokens' contribution: sum them over the ranks (as a
        data-parallel wrapper spanning them does). Not combined with a cache."""
        offset = cache.length if cache is not None else 0
        seq = tokens.shape[1]
        if cache is not None and offset + seq > cache.max_len:
            raise ValueError(f"KV cache full: {offset} + {seq} tokens exceed max_len {cache.max_len}")
        positions = torch.arange(offset, offset + seq, device=tokens.device)
        if context_parallel is not None:
            if cache is not None or self.config.attention != "fused":
                raise ValueError("context_parallel needs attention='fused' and no KV cache, got attention="
                                 f"{self.config.attention!r}{' and a cache' if cache is not None else ''}")
            positions = context_parallel.positions(seq, tokens.device)
            context_len = seq * context_parallel.world_size if context_len is None else context_len
        x = self.embed(tokens) * math.sqrt(self.config.d_model)
        if self.absolute is not None:
            x = x + self.absolute(positions)
        for i, block in enumerate(self.blocks):
            layer_cache = (cache.keys[i], cache.values[i]) if cache is not None else None
            x = block(x, offset, context_len, layer_cache, context_parallel)
        if cache is not None:
            cache.length = offset + seq
        return F.linear(self.ln_f(x), self.embed.weight)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the tied head counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
