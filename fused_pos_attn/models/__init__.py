"""Small decoder-only LMs for the length-generalization experiments (`python -m fused_pos_attn extrapolate`).

    from fused_pos_attn.models import ModelConfig, TransformerLM, load_corpus
    model = TransformerLM(ModelConfig(scheme="alibi", d_model=128, num_layers=4, num_heads=4, train_len=128))
    logits = model(tokens)            # tokens (B, N) int64 -> (B, N, 256)
"""
from .data import VOCAB_SIZE, BatchSampler, ByteCorpus, eval_windows, load_corpus, sliding_windows
from .positional import (ABSOLUTE_SCHEMES, ROPE_SCHEMES, SCHEMES, AbsolutePositions, AttentionPositions,
                         extra_parameters, sinusoidal_table, training_scheme)
from .transformer import ATTENTION_IMPLS, KVCache, ModelConfig, TransformerLM, count_parameters

__all__ = ["VOCAB_SIZE", "BatchSampler", "ByteCorpus", "eval_windows", "load_corpus", "sliding_windows",
           "ABSOLUTE_SCHEMES", "ROPE_SCHEMES", "SCHEMES", "AbsolutePositions", "AttentionPositions",
           "extra_parameters", "sinusoidal_table", "training_scheme", "ATTENTION_IMPLS", "KVCache", "ModelConfig",
           "TransformerLM", "count_parameters"]
