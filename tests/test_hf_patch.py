"""fused_pos_attn.hf.patch against Hugging Face transformers' own eager models: small random configs built in code
(no downloads), the same weights in an eager model and a patched copy.

For each architecture: logits on a right-padded, a left-padded and a packed batch (documents packed into one row,
position ids restarting, against the eager model run on each document alone); the gradients of every parameter in
a training step on a padded batch; greedy generate() of 20 new tokens, batched with left padding, token for
token (sampled generation with a fixed seed too); nothing of size N x N allocated inside a patched attention module.
Plus torch.compile of the patched Llama forward without a graph break, and the errors of patch().
fp32 throughout: DESIGN.md's rule for fp32 against an outside oracle, max |patched - eager| <= 1e-4 * max(1,
max |eager|).
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import fused_pos_attn.hf as fpa_hf  # noqa: E402
from allocations import AllocationRecorder, numel  # noqa: E402

VOCAB, N = 97, 24


def _configs():
    from transformers import (BloomConfig, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, MptConfig,
                              Phi3Config, Qwen2Config, Qwen3Config, T5Config)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.4, 2.9, 3.5],
                "long_factor": [1.0, 1.5, 2.2, 3.0, 4.1, 5.5, 7.0, 9.0]}
    return {
        "llama": LlamaConfig(num_key_value_heads=2, **common),
        "mistral": MistralConfig(num_key_value_heads=2, sliding_window=7, **common),
        "qwen2": Qwen2Config(num_key_value_heads=1, **common),
        "qwen3": Qwen3Config(num_key_value_heads=2, head_dim=16, **common),
        # longrope: the original length 32 is crossed during generation (prompt 24 + 20 new tokens)
        "phi3": Phi3Config(num_key_value_heads=2, original_max_position_embeddings=32, rope_parameters=longrope,
                           pad_token_id=0, **{**common, "max_position_embeddings": 128}),
        "gpt_neox": GPTNeoXConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5}, **common),
        "gptj": GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256),
        "bloom": BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
        # 6 heads, not a power of two: MPT's slopes interleave
        "mpt": MptConfig(vocab_size=VOCAB, d_model=96, n_layers=2, n_heads=6, max_seq_len=256, expansion_ratio=2),
        "t5": T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                       decoder_start_token_id=0, pad_token_id=0),
    }


ARCHITECTURES = list(fpa_hf.SUPPORTED)


def _models(arch: str, seed: int = 0):
    """(eager model, patched model) with equal random weights, fp32, eval mode."""
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration
    config = _configs()[arch]
    torch.manual_seed(seed)
    build = T5ForConditionalGeneration if arch == "t5" else AutoModelForCausalLM.from_config
    eager = build(copy.deepcopy(config)).eval()
    eager.set_attn_implementation("eager")
    patched = build(copy.deepcopy(config)).eval()
    patched.load_state_dict(eager.state_dict())
    assert fpa_hf.patch(patched) is patched
    return eager, patched


def _assert_close(got: torch.Tensor, want: torch.Tensor):
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-4 * scale, f"max diff {(got - want).abs().max().item():.3e}"


def _batch(padding: str, seed: int = 1):
    """input_ids (3, N) and the (3, N) mask: rows with 0, 5 and 11 padding tokens on the given side."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, N), generator=gen)
    mask = torch.ones(3, N, dtype=torch.long)
    for row, pads in enumerate((0, 5, 11)):
        if pads:
            if padding == "left":
                mask[row, :pads] = 0
            else:
                mask[row, N - pads:] = 0
    return ids, mask


def _logits(model, arch, ids, mask, **kwargs):
    if arch == "t5":  # the padded batch is the encoder's input; the decoder reads a shifted copy of the ids
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :N // 2], **kwargs).logits
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padded_logits_equal_eager(arch, padding):
    eager, patched = _models(arch)
    ids, mask = _batch(padding)
    with torch.no_grad():
        want, got = _logits(eager, arch, ids, mask), _logits(patched, arch, ids, mask)
    real = mask.bool() if arch != "t5" else torch.ones(want.shape[:2], dtype=torch.bool)
    _assert_close(got[real], want[real])


PACKED_DOCS = (5, 11, 8)  # three documents packed into one row of N = 24 tokens
# Architectures whose forward takes position_ids (so packed documents can restart them); BLOOM and MPT take none,
# T5 is an encoder-decoder: they are not packed this way.
PACKABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "gptj")


@pytest.mark.parametrize("arch", PACKABLE)
def test_packed_documents_equal_each_document_alone(arch):
    """One row of packed documents with position ids restarting per document (no mask): each document's logits
    equal the eager model's on that document alone."""
    eager, patched = _models(arch)
    ids, _ = _batch("right")
    ids = ids[:1]
    position_ids = torch.cat([torch.arange(n) for n in PACKED_DOCS]).unsqueeze(0)
    with torch.no_grad():
        got = patched(input_ids=ids, position_ids=position_ids).logits[0]
        starts = [0, *torch.tensor(PACKED_DOCS).cumsum(0).tolist()]
        want = torch.cat([eager(input_ids=ids[:, a:b]).logits[0] for a, b in zip(starts[:-1], starts[1:])])
    _assert_close(got, want)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_step_gradients_equal_eager(arch):
    """loss.backward() on a right-padded batch (labels -100 on padding): every parameter's gradient equals eager's,
    the T5 relative-attention tables' included."""
    eager, patched = _models(arch)
    ids, mask = _batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (eager, patched):
        model.train()
        if arch == "t5":
            loss = model(input_ids=ids, attention_mask=mask, labels=labels[:, :N // 2].contiguous()).loss
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    if arch == "t5":
        assert any("relative_attention_bias" in name for name in grads[1])
    for name in grads[0]:
        _assert_close(grads[1][name], grads[0][name])


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_generate_with_left_padding_equals_eager(arch, sample):
    """generate() with the default dynamic cache (un-rotated keys in the patched model), 20 new tokens, a batch of
    three prompts left-padded by 0 / 5 / 11 tokens (T5: the encoder's input right-padded)."""
    eager, patched = _models(arch)
    ids, mask = _batch("right" if arch == "t5" else "left")
    outputs = []
    for model in (eager, patched):
        torch.manual_seed(123)
        outputs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=sample,
                                      top_k=0 if sample else None, pad_token_id=0, eos_token_id=None))
    assert outputs[0].shape == outputs[1].shape
    assert torch.equal(outputs[0], outputs[1]), f"first difference at {(outputs[0] != outputs[1]).nonzero()[:1]}"


def _attention_allocations(model, arch: str, seq: int, padded: bool) -> list:
    """Shapes of the tensors allocated while model's attention modules run one forward over 2 rows of seq tokens."""
    ids = torch.randint(1, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seq))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :seq // 3] = 0
    recorder = AllocationRecorder()

    def start(*_):  # hooks that return None leave the module's inputs and outputs alone
        recorder.__enter__()

    def stop(*_):
        recorder.__exit__(None, None, None)

    hooks = [hook for module in model.modules() if type(module).__name__.endswith("Attention")
             for hook in (module.register_forward_pre_hook(start), module.register_forward_hook(stop))]
    try:
        with torch.no_grad():
            if arch == "t5":
                model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids)
            else:
                model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert recorder.shapes, "no allocation was recorded inside the attention modules"
    return recorder.shapes


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_n_by_n_tensor_inside_patched_attention(arch, padded):
    """What a patched attention module allocates grows linearly in N: its largest allocation at N = 256 is at most
    2.5x (not 4x) that at N = 128, so no (.., N, N) score, bias or mask is formed (the eager model's grows 4x:
    test_allocation_check_catches_the_eager_model)."""
    _, patched = _models(arch)
    largest = [max(numel(shape) for shape in _attention_allocations(patched, arch, seq, padded)) for seq in (128, 256)]
    assert largest[1] <= 2.5 * largest[0], f"largest allocation {largest[0]} at N=128, {largest[1]} at N=256"


def test_allocation_check_catches_the_eager_model():
    eager, _ = _models("bloom")
    largest = [max(numel(shape) for shape in _attention_allocations(eager, "bloom", seq, False)) for seq in (128, 256)]
    assert largest[1] >= 3.5 * largest[0]


def test_compiled_patched_llama_has_no_graph_break():
    """torch.compile(fullgraph=True) of the patched Llama's forward (an unpadded batch): traced in one graph, the
    custom op inside, logits equal to eager."""
    import torch._dynamo
    _, patched = _models("llama")
    ids = torch.randint(1, VOCAB, (2, N))
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        _assert_close(compiled(input_ids=ids).logits, patched(input_ids=ids).logits)


def test_patch_rejects_unsupported_models_and_unsupported_uses():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    with pytest.raises(ValueError, match="supports model types llama, mistral, .* t5; got 'gpt2'"):
        fpa_hf.patch(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, attention_dropout=0.1)
    model = fpa_hf.patch(LlamaForCausalLM(config))
    ids = torch.randint(1, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="attention dropout 0.1 in training"):
        model.train()(input_ids=ids)
    with pytest.raises(ValueError, match="output_attentions is not available"):
        model.eval()(input_ids=ids, output_attentions=True)


def test_package_does_not_import_transformers():
    """transformers is a test dependency: importing fused_pos_attn (and its hf module) does not import it."""
    import subprocess
    import sys
    code = "import sys, fused_pos_attn, fused_pos_attn.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
