"""Split-KV decoding in the Triton forward (launch.decode_plan): calls with at most 16 query rows per batch /
sequence run GROUP query heads of a GQA group per program (tile rows = query rows x heads) with the keys split
across programs (SPLIT), the partial (out, LSE) merged by _attn_split_merge_kernel. Under TRITON_INTERPRET=1
without CUDA (tests/conftest.py), where the plan splits keys into runs of >= 32 so that small calls take it.
Each output is checked against the dense fp64 reference, and each launch is checked to have taken the path."""
import pytest
import torch

triton = pytest.importorskip("triton")

from fused_pos_attn import ALiBi, fused_attention, fused_attention_varlen  # noqa: E402
from fused_pos_attn.triton_kernels import launch  # noqa: E402
from test_native_decode import SCHEMES  # noqa: E402
from tolerance import assert_close_to_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def launches(monkeypatch) -> list:
    """(kernel name, GROUP, SPLIT, num_splits) of every forward-side launch."""
    recorded, real_launch = [], launch._launch

    def recording_launch(kernel, grid, call, plan=None, **tensors):
        args = launch.kernel_arguments(kernel, call, plan, **tensors)
        recorded.append((kernel.__name__, args.get("GROUP"), args.get("SPLIT"), args.get("num_splits")))
        return real_launch(kernel, grid, call, plan, **tensors)

    monkeypatch.setattr(launch, "_launch", recording_launch)
    return recorded


def _check(q, k, v, pos, **kwargs):
    """Triton's out and lse against the fp64 reference (tolerance rule, fp32 inputs)."""
    out, lse = fused_attention(q, k, v, pos, backend="triton", return_lse=True, **kwargs)
    ref, ref_lse = fused_attention(q.double(), k.double(), v.double(), pos, backend="reference", return_lse=True,
                                   **kwargs)
    same, same_lse = fused_attention(q, k, v, pos, backend="reference", return_lse=True, **kwargs)
    assert_close_to_reference(out.cpu(), ref.cpu(), same.cpu(), 2.0, "out")
    assert_close_to_reference(lse.cpu(), ref_lse.cpu(), same_lse.cpu(), 2.0, "lse", q.dtype)


def _inputs(batch, heads, kv_heads, seq_q, seq_k, head_dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=gen).transpose(1, 2)  # (B, Hq, Nq, D) view
    k, v = (torch.randn(batch, seq_k, kv_heads, head_dim, generator=gen).transpose(1, 2) for _ in range(2))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("heads", [(4, 2), (8, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_split_kv_decode_matches_reference(scheme, heads, launches):
    """Nq 1 and 3 over 100 keys, B = 1: a GQA group's heads in one program (all 2 or 8 of them for Nq 1; for Nq 3
    as many as fit 16 tile rows: 2, 4), keys split, partials merged."""
    hq, hkv = heads
    for seq_q in (1, 3):
        q, k, v = _inputs(1, hq, hkv, seq_q, 100, seed=seq_q)
        _check(q, k, v, SCHEMES[scheme](hq), causal=True)
    forward = [entry for entry in launches if entry[0] == "_attn_fwd_kernel"]
    groups = [group for _, group, _, _ in forward]
    assert all(split for _, _, split, _ in forward) and groups == [hq // hkv, min(hq // hkv, 4)], forward
    assert launches.count(("_attn_split_merge_kernel", None, None, forward[0][3])) >= 1


@pytest.mark.parametrize("heads,seq_q", [((6, 2), 5), ((16, 1), 16), ((4, 2), 16)])
def test_groups_that_do_not_fill_the_tile(heads, seq_q, launches):
    """A group of 3 heads x 5 rows (15 of 16 tile rows used), 16 heads x 16 rows and 2 heads x 16 rows (one head
    per program: 16 rows fill the tile); a window and per-batch offsets, some rows with no visible key (out 0,
    lse -inf)."""
    hq, hkv = heads
    q, k, v = _inputs(2, hq, hkv, seq_q, 90, seed=1)
    offsets = torch.tensor([0, 40], device=DEVICE)
    _check(q, k, v, ALiBi(), causal=True, window=30, q_offset=offsets + 70, k_offset=offsets)
    _check(q, k, v, ALiBi(), causal=True, q_offset=offsets - 3, k_offset=offsets)  # early rows see no key
    plan = launch.decode_plan(q, k, launch.KernelCall(q_offset=offsets, k_offset=offsets, position=None, scale=1.0,
                                                      causal=True, window=None))
    assert plan.group * seq_q <= launch.MAX_DECODE_TILE_ROWS and (hq // hkv) % plan.group == 0


def test_decode_plan_choices():
    """Decode shapes only (Nq <= 16); the largest GQA group that fits 16 tile rows; splits bounded by the keys."""
    offsets = torch.zeros(1, dtype=torch.int64)
    call = launch.KernelCall(q_offset=offsets, k_offset=offsets, position=None, scale=1.0, causal=True, window=None)
    q, k, _ = _inputs(1, 8, 2, 1, 1000)
    plan = launch.decode_plan(q, k, call)
    assert (plan.group, plan.block_m) == (4, 16) and plan.splits == launch.INTERPRETER_PROGRAMS // 2
    q, k, _ = _inputs(1, 8, 2, 1, 40)
    assert launch.decode_plan(q, k, call).splits == 1  # 40 keys: one split of >= 32
    q, k, _ = _inputs(1, 8, 2, 17, 1000)
    assert launch.decode_plan(q, k, call) is None


def test_varlen_decode(launches):
    """Packed sequences with 1-2 query rows each (a batched decode step of unequal contexts) take the plan."""
    gen = torch.Generator().manual_seed(3)
    lengths_q, lengths_k = [1, 2, 1], [70, 5, 0]
    q = torch.randn(sum(lengths_q), 4, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(sum(lengths_k), 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], device=DEVICE) for n in (lengths_q, lengths_k))
    out, lse = fused_attention_varlen(q, k, v, cu_q, cu_k, pos="rope", causal=True, backend="triton",
                                      return_lse=True)
    ref, ref_lse = fused_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, pos="rope", causal=True,
                                          backend="reference", return_lse=True)
    same, same_lse = fused_attention_varlen(q, k, v, cu_q, cu_k, pos="rope", causal=True, backend="reference",
                                            return_lse=True)
    assert_close_to_reference(out.cpu(), ref.cpu(), same.cpu(), 2.0, "out")
    assert_close_to_reference(lse.cpu(), ref_lse.cpu(), same_lse.cpu(), 2.0, "lse", torch.float32)
    assert ("_attn_fwd_kernel", 2, True, launches[0][3]) in launches


def test_decode_forward_then_backward():
    """Gradients after a split-KV forward (the backward reads its merged out and LSE) match the reference."""
    q, k, v = _inputs(2, 4, 2, 2, 80, seed=4)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grads = torch.autograd.grad(fused_attention(q, k, v, "rope", causal=True, backend="triton").sum(), (q, k, v))
    ref = torch.autograd.grad(fused_attention(q, k, v, "rope", causal=True, backend="reference").sum(), (q, k, v))
    for name, got, want in zip("qkv", grads, ref):
        assert (got - want).abs().max().item() < 1e-5, name
