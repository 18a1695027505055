"""bf16 / fp16 tests catch position bugs (issue 9, section 2).

A kernel run at positions off by one (q_offset one more than the reference's, as a kernel that indexed its
rows from the wrong origin would compute) must be rejected by tests/tolerance.py's rule, and the correct
run accepted. Before the same-dtype reference did its position math and softmax in fp32, its own error at
these positions (RoPE angles rounded to 4 radians in bf16 near position 1000, inf in fp16 past 65504; ALiBi
scores of a few hundred rounded to 2-4 in bf16) made the rule accept such runs. Where the same-dtype
reference is still loose (large q.k rounded by a bf16 matmul) the rule's cap rejects them.
Forward only: out and lse carry the position; the gradients use the same positions.
"""
from dataclasses import dataclass

import pytest
import torch

from fused_pos_attn import RelativeBias, RoPE, fused_attention
from tolerance import assert_close_to_reference

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton's interpreter computes tl.dot on bfloat16 tiles wrongly (see test_attention_backends), so Triton
# runs here in float16 only; its bfloat16 runs need a GPU.
RUNS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("triton", torch.float16, id="triton-fp16",
                 marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")),
]
HEADS, SEQ_Q, SEQ_K, HEAD_DIM = 4, 32, 48, 32


def relative_bias() -> RelativeBias:
    return RelativeBias(torch.randn(HEADS, 32, generator=torch.Generator().manual_seed(1)))


@dataclass(frozen=True)
class PositionCase:
    """A call at far positions; the broken run puts every query one position later (q_offset + 1).
    gain multiplies q and k (sharper attention, larger scores)."""

    pos: object
    q_offset: int
    k_offset: int
    causal: bool = False
    gain: float = 1.0

    def kwargs(self, shift: int = 0) -> dict:
        return dict(causal=self.causal, q_offset=self.q_offset + shift, k_offset=self.k_offset)


CASES = {
    # RoPE logits depend on pq - pk only: queries 16..47 positions after the first key
    "rope_near_4000": PositionCase("rope", 4016, 4000),
    "rope_past_fp16_max": PositionCase("rope", 70016, 70000),
    # a chunk after a 48-key cache: every key is visible to every query, so only the rotation moves
    "rope_causal_after_cache": PositionCase("rope", 1064, 1000, causal=True),
    "rope_partial_interleaved": PositionCase(RoPE(rotary_dim=16, interleaved=True), 2016, 2000),
    # queries between keys: a shift moves weight from the keys on one side to those on the other
    "alibi_keys_on_both_sides": PositionCase("alibi", 1000, 990),
    # every key ~3000 before the queries: biases of -750..-12 per head; the output is shift-invariant here
    # (a constant per row), the LSE moves by the slope
    "alibi_far_keys": PositionCase("alibi", 3000, 0),
    # scores up to ~100: the bf16 reference's q.k rounding alone is ~0.3 of the output, so 2x its error
    # would accept the shift (0.26); the cap does not
    "alibi_sharp_attention": PositionCase("alibi", 1000, 990, gain=6.0),
    "relative_t5": PositionCase(relative_bias(), 1000, 990),
}


def inputs(dtype: torch.dtype, gain: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (1, HEADS, SEQ_Q, HEAD_DIM), k and v (1, HEADS, SEQ_K, HEAD_DIM) in dtype; q and k times gain."""
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(1, HEADS, SEQ_Q, HEAD_DIM, generator=gen) * gain).to(dtype)
    k = (torch.randn(1, HEADS, SEQ_K, HEAD_DIM, generator=gen) * gain).to(dtype)
    v = torch.randn(1, HEADS, SEQ_K, HEAD_DIM, generator=gen).to(dtype)
    return q, k, v


def rule_violations(got: tuple, ref64: tuple, same: tuple, dtype: torch.dtype) -> list[str]:
    """The tolerance rule's messages for each of (out, lse) it rejects; empty when it accepts both."""
    violations = []
    for name, g, want, same_dtype in zip(("out", "lse"), got, ref64, same):
        try:
            assert_close_to_reference(g, want, same_dtype, 2.0, name, dtype)
        except AssertionError as error:
            violations.append(str(error))
    return violations


@pytest.mark.parametrize("backend, dtype", RUNS)
@pytest.mark.parametrize("case", list(CASES))
def test_positions_off_by_one_are_rejected(backend, dtype, case):
    spec = CASES[case]
    q, k, v = inputs(dtype, spec.gain)
    ref64 = fused_attention(q.double(), k.double(), v.double(), spec.pos, return_lse=True, backend="reference",
                            **spec.kwargs())
    same = fused_attention(q, k, v, spec.pos, return_lse=True, backend="reference", **spec.kwargs())
    correct = fused_attention(q, k, v, spec.pos, return_lse=True, backend=backend, **spec.kwargs())
    assert not rule_violations(correct, ref64, same, dtype)
    broken = fused_attention(q, k, v, spec.pos, return_lse=True, backend=backend, **spec.kwargs(shift=1))
    assert rule_violations(broken, ref64, same, dtype), f"{backend} {dtype}: positions off by one were accepted"
