"""The length-generalization models (fused_pos_attn.models): position modules, the LM, its KV cache, the data."""
import math

import pytest
import torch

from fused_pos_attn import RelativeBias, RoPE
from fused_pos_attn.models import (SCHEMES, AbsolutePositions, AttentionPositions, BatchSampler, KVCache, ModelConfig,
                                   TransformerLM, count_parameters, eval_windows, extra_parameters, load_corpus,
                                   sinusoidal_table, sliding_windows, training_scheme)
from fused_pos_attn.models.data import corpus_files, is_validation, stdlib_root
from fused_pos_attn.rope_scaling import Linear, YaRN

TINY = dict(d_model=32, num_layers=2, num_heads=4, train_len=16)


def tiny_model(scheme: str, **overrides) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(scheme=scheme, **{**TINY, **overrides}))


# ------------------------------------------------------------------------------------------ positions

def test_sinusoidal_table_shape_and_values():
    table = sinusoidal_table(torch.arange(5), 6)
    assert table.shape == (5, 6) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert table[3, 0].item() == pytest.approx(math.sin(3.0))
    assert table[3, 3].item() == pytest.approx(math.cos(3.0 / 10000 ** (2 / 6)), rel=1e-6)
    assert sinusoidal_table(torch.arange(4), 7).shape == (4, 7)  # odd widths drop the last cosine


def test_absolute_positions_shapes_and_learned_clamp():
    sinusoidal = AbsolutePositions("sinusoidal", 8, train_len=4)
    assert sinusoidal(torch.arange(10)).shape == (10, 8) and not list(sinusoidal.parameters())
    learned = AbsolutePositions("learned", 8, train_len=4)
    assert learned.table.shape == (4, 8)
    out = learned(torch.arange(7))
    assert out.shape == (7, 8)
    assert torch.equal(out[4:], learned.table[3].expand(3, 8))  # past L_train: the last row


def test_attention_positions_pos_arguments():
    L = 16
    assert AttentionPositions("nope", 4, L).position(64) == "none"
    assert AttentionPositions("sinusoidal", 4, L).position(64) == "none"
    assert AttentionPositions("alibi", 4, L).position(64).__class__.__name__ == "ALiBi"
    rope = AttentionPositions("rope", 4, L).position(64)
    assert isinstance(rope, RoPE) and rope.scaling is None
    linear = AttentionPositions("rope_linear", 4, L)
    assert linear.position(L).scaling is None  # no rescaling at or below the training length
    assert linear.position(4 * L).scaling == Linear(4.0)
    yarn = AttentionPositions("rope_yarn", 4, L)
    assert yarn.position(L // 2).scaling is None
    assert yarn.position(8 * L).scaling == YaRN(8.0, original_max_len=L)
    t5 = AttentionPositions("t5", 4, L)
    pos = t5.position(64)
    assert isinstance(pos, RelativeBias) and pos.table is t5.table and t5.table.shape == (4, 32)
    assert pos.max_distance == 128 and pos.bidirectional is False
    with pytest.raises(ValueError, match="position scheme must be one of"):
        AttentionPositions("xpos", 4, L)


def test_training_scheme_groups_rope_variants():
    assert [training_scheme(s) for s in ("rope", "rope_linear", "rope_yarn", "alibi")] == ["rope"] * 3 + ["alibi"]


# ------------------------------------------------------------------------------------------- the model

@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_shapes_every_scheme(scheme):
    model = tiny_model(scheme)
    tokens = torch.randint(0, 256, (2, 40))  # longer than train_len: every scheme must still run
    logits = model(tokens)
    assert logits.shape == (2, 40, 256) and torch.isfinite(logits).all()


def test_equal_parameter_counts_except_position_tables():
    counts = {s: count_parameters(tiny_model(s)) for s in SCHEMES}
    base = counts["nope"]
    for scheme, count in counts.items():
        extra = extra_parameters(scheme, TINY["d_model"], TINY["num_heads"], TINY["num_layers"], TINY["train_len"])
        assert count - extra == base, scheme
    assert counts["learned"] - base == 16 * 32 and counts["t5"] - base == 2 * 4 * 32


@pytest.mark.parametrize("scheme", ["nope", "sinusoidal", "learned", "rope", "rope_yarn", "alibi", "t5"])
def test_fused_and_dense_sdpa_attention_agree(scheme):
    fused = tiny_model(scheme)
    dense = tiny_model(scheme, attention="sdpa")
    dense.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))  # 3x train_len
    torch.testing.assert_close(fused(tokens), dense(tokens), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("attention", ["fused", "sdpa"])
@pytest.mark.parametrize("scheme", ["sinusoidal", "learned", "rope", "alibi", "t5"])
def test_kv_cache_decoding_equals_full_forward(scheme, attention):
    model = tiny_model(scheme, attention=attention)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    cache = KVCache(model.config, batch=2, max_len=24)
    steps = [model(tokens[:, :10], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(10, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(tokens[:, :1], cache)


def test_t5_tables_get_gradients_and_learned_table_too():
    for scheme, name in (("t5", "blocks.0.attn.positions.table"), ("learned", "absolute.table")):
        model = tiny_model(scheme)
        model(torch.randint(0, 256, (2, 20))).logsumexp(-1).sum().backward()
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_set_scheme_only_between_rope_variants():
    model = tiny_model("rope")
    model.set_scheme("rope_yarn")
    assert all(b.attn.positions.scheme == "rope_yarn" for b in model.blocks)
    long = torch.randint(0, 256, (1, 64))
    yarn_logits = model(long)
    model.set_scheme("rope")
    assert not torch.allclose(yarn_logits, model(long))  # YaRN changes frequencies past train_len
    with pytest.raises(ValueError, match="only the RoPE variants"):
        model.set_scheme("alibi")


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        ModelConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig(attention="flash")


# ---------------------------------------------------------------------------------------------- data

def _write_tree(root, count=40):
    for i in range(count):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}\n" * 20)
    (root / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped


def test_split_is_deterministic_and_by_file(tmp_path):
    _write_tree(tmp_path)
    first, second = load_corpus(tmp_path, valid_fraction=0.2), load_corpus(tmp_path, valid_fraction=0.2)
    assert torch.equal(first.train, second.train) and torch.equal(first.valid, second.valid)
    files = corpus_files(tmp_path, None)
    assert len(files) == 40 and all(f.suffix == ".py" for f in files)
    valid = [f for f in files if is_validation(f.relative_to(tmp_path).as_posix(), 0.2)]
    assert first.files == (40 - len(valid), len(valid)) and 0 < len(valid) < 40
    valid_text = bytes(first.valid.tolist()).decode()
    for f in files:  # each file lands whole in exactly one split
        in_valid = f in valid
        assert (f.read_text() in valid_text) == in_valid
    # the split depends on the path only, not on the folder it sits in or the listing order
    assert is_validation("pkg1/mod4.py", 0.2) == is_validation("pkg1/mod4.py", 0.2)


def test_single_file_split_and_errors(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(bytes(range(256)) * 4)
    corpus = load_corpus(path, valid_fraction=0.25)
    assert corpus.train.numel() == 768 and corpus.valid.numel() == 256 and corpus.train.dtype == torch.uint8
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="valid_fraction"):
        load_corpus(path, valid_fraction=1.5)


def test_stdlib_corpus_is_the_default():
    files = corpus_files(stdlib_root(), ".py")
    assert len(files) > 100 and not any("site-packages" in f.parts for f in files)
    corpus = load_corpus(max_bytes=4096)
    assert corpus.train.numel() == 4096 and corpus.valid.numel() == 4096 and "standard library" in corpus.source


def test_batches_are_deterministic_from_the_seed():
    tokens = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = BatchSampler(tokens, 4, 32, seed=1), BatchSampler(tokens, 4, 32, seed=1)
    x, y = a.batch(7)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert torch.equal(x, b.batch(7)[0]) and not torch.equal(x, a.batch(8)[0])
    assert not torch.equal(x, BatchSampler(tokens, 4, 32, seed=2).batch(7)[0])


def test_eval_windows_and_sliding_windows_score_the_same_tokens():
    tokens = torch.arange(200, dtype=torch.uint8)
    x, y = eval_windows(tokens, 16, 64)
    assert x.shape == (4, 16) and torch.equal(x.flatten(), torch.arange(64))
    assert torch.equal(y.flatten(), torch.arange(1, 65))
    windows = sliding_windows(tokens, 32, 64, stride=8)
    scored = torch.cat([t[-s:] for _, t, s in windows])
    assert torch.equal(scored, torch.arange(1, 65))
    assert all(i.numel() == min(32, 8 * (n + 1)) for n, (i, _, _) in enumerate(windows))
    with pytest.raises(ValueError):
        eval_windows(tokens, 16, 1000)


def test_kv_cache_evict_keeps_sinks_and_recent_contiguous():
    config = ModelConfig(scheme="rope", d_model=16, num_layers=2, num_heads=2, train_len=16)
    cache = KVCache(config, batch=1, max_len=12)
    cache.fill_random(10, torch.Generator().manual_seed(0))
    before = [buffer.clone() for buffer in cache.keys + cache.values]
    cache.evict(2, 3)
    assert cache.length == 5
    for old, new in zip(before, cache.keys + cache.values):
        assert torch.equal(new[:, :2], old[:, :2]) and torch.equal(new[:, 2:5], old[:, 7:10])
    cache.evict(2, 3)  # nothing past sinks + recent: unchanged
    assert cache.length == 5
    with pytest.raises(ValueError, match="sinks and recent must be >= 0"):
        cache.evict(-1, 3)


def test_streaming_example_runs():
    """examples/streaming_llm.py: generation through a bounded cache with evictions."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "streaming_llm.py"
    done = subprocess.run([sys.executable, str(script), "--tokens", "80", "--cache", "32"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "80 tokens decoded through a 32-slot cache (4 evictions" in done.stdout, done.stdout
