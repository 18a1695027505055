"""Host-side resolution of position schemes: per-device caches (no per-call host-to-device copy, so a CUDA
call can be captured in a graph) and the fold of a distance-table gradient onto the T5 bucket table."""
import pytest
import torch

from fused_pos_attn import ALiBi, RelativeBias, RoPE, YaRN
from fused_pos_attn.positions import fold_distance_grad

CPU = torch.device("cpu")


def test_position_vectors_are_copied_once_per_device():
    """Resolving the same scheme twice returns the same device tensors: no per-call host-to-device copy."""
    device = CPU
    for scheme in (ALiBi(), ALiBi(torch.rand(4, dtype=torch.float64)), RoPE(), RoPE(scaling=YaRN(4.0, 64)),
                   RoPE(inv_freq=torch.rand(8, dtype=torch.float64))):
        first, second = (scheme.resolve(2, 4, 16, 32, device) for _ in range(2))
        for name in ("slopes", "inv_freq"):
            a, b = getattr(first, name), getattr(second, name)
            if a is not None:
                assert a.data_ptr() == b.data_ptr(), f"{scheme!r}: {name} rebuilt per call"
    table = torch.randn(4, 32)
    first, second = (RelativeBias(table).resolve(2, 4, 16, 32, device, causal=True) for _ in range(2))
    assert first.rel_buckets is second.rel_buckets


def test_user_vectors_follow_in_place_updates():
    slopes = torch.rand(4, dtype=torch.float64)
    scheme = ALiBi(slopes)
    before = scheme.resolve(1, 4, 16, 32, torch.device("cpu")).slopes.clone()
    slopes.mul_(2)
    after = scheme.resolve(1, 4, 16, 32, torch.device("cpu")).slopes
    torch.testing.assert_close(after, 2 * before)


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 5), (32, 50), (16, 1 << 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_distance_gradient_folds_onto_bucket_table(num_buckets, max_distance, causal):
    """fold_distance_grad sums each bucket's distance entries: the chain rule through
    rel_bias = table[:, rel_buckets], checked against autograd of that gather in fp64."""
    table = torch.randn(3, num_buckets, dtype=torch.float64, requires_grad=True)
    resolved = RelativeBias(table, max_distance=max_distance).resolve(1, 3, 16, 64, CPU, causal=causal)
    grad = torch.randn(3, 2, max_distance + 1, dtype=torch.float64)
    (expected,) = torch.autograd.grad(table[:, resolved.rel_buckets.long()], table, grad)
    folded = fold_distance_grad(grad, resolved.rel_buckets, num_buckets)
    assert folded.dtype == torch.float32 and folded.shape == (3, num_buckets)
    torch.testing.assert_close(folded.double(), expected, rtol=1e-6, atol=1e-5)


def test_bucket_map_matches_the_folded_bias():
    table = torch.randn(4, 32)
    resolved = RelativeBias(table, max_distance=40).resolve(2, 4, 16, 64, CPU, causal=False)
    assert resolved.rel_buckets.dtype == torch.int32 and resolved.rel_buckets.shape == (2, 41)
    assert resolved.num_buckets == 32 and not resolved.rel_bias.requires_grad
    torch.testing.assert_close(resolved.rel_bias, table[:, resolved.rel_buckets.long()], rtol=0, atol=0)
