"""StreamingLLM-style generation on an un-rotated KV cache: a bounded cache (4 "sink" tokens + a recent window)
decodes without end, positions contiguous inside the cache, and the kept keys are never re-rotated: the kernel
applies RoPE at each key's current cache position on every step.

    python examples/streaming_llm.py                      # a random tiny LM, 300 tokens through a 64-slot cache
"""
import argparse

import torch

from fused_pos_attn.models import KVCache, ModelConfig, TransformerLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--cache", type=int, default=64, help="cache slots")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--scheme", default="rope", choices=("rope", "alibi", "t5", "nope"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ModelConfig(scheme=args.scheme, d_model=64, num_layers=2, num_heads=4, train_len=args.cache)
    model = TransformerLM(config).eval()
    cache = KVCache(config, batch=1, max_len=args.cache)
    token = torch.zeros(1, 1, dtype=torch.int64)
    evictions = 0
    with torch.no_grad():
        for _ in range(args.tokens):
            if cache.length == cache.max_len:  # full: keep the sinks and the most recent half
                cache.evict(args.sinks, cache.max_len // 2)
                evictions += 1
            token = model(token, cache)[:, -1:].argmax(-1)
    print(f"{args.tokens} tokens decoded through a {args.cache}-slot cache ({evictions} evictions, "
          f"{cache.length} slots in use at the end); keys moved, never re-rotated")


if __name__ == "__main__":
    main()
