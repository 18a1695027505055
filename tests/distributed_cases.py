"""Functions run on every rank of a fused_pos_attn.distributed.rank_pool group: each builds the same full tensors from a seed on
every rank, runs the single-process oracle (fused_attention on the whole sequence) and the context-parallel call
on this rank's shard, and checks this rank's rows (and the T5 table gradient summed over the ranks)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from fused_pos_attn import ALiBi, DynamicNTK, Linear, Llama3, LongRoPE, NTK, RelativeBias, RoPE, YaRN, fused_attention
from fused_pos_attn.distributed import context_parallel_attention, gather_sequence, shard_sequence
from tolerance import GRADIENT_FACTOR, assert_close_to_reference, max_err

FP32_RELATIVE = 1e-5  # fp32 context parallel vs one process: merge and accumulation order only

ROPE_SCALINGS = {
    "rope": None, "rope_linear": Linear(2.0), "rope_ntk": NTK(2.0),
    "rope_dynamic": DynamicNTK(2.0, original_max_len=8), "rope_yarn": YaRN(4.0, original_max_len=8),
    "rope_llama3": Llama3(8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8),
    "rope_longrope": LongRoPE(short_factor=[1.0 + 0.25 * i for i in range(8)],
                              long_factor=[2.0 + i for i in range(8)], original_max_len=8, factor=4.0),
}


def position(name: str, heads: int, table: torch.Tensor | None):
    """The pos argument a case names: none, alibi, t5, rope_partial (interleaved, rotary_dim 8) or a
    ROPE_SCALINGS key."""
    if name in ("none", "alibi"):
        return name if name == "none" else ALiBi()
    if name == "t5":
        return RelativeBias(table, max_distance=12)
    if name == "rope_partial":
        return RoPE(theta=100.0, rotary_dim=8, interleaved=True)
    return RoPE(theta=100.0, scaling=ROPE_SCALINGS[name])


def _offset(value, batch: int):
    return torch.arange(batch, dtype=torch.int64) * 1000 + 7 if value == "tensor" else value


def _attention_run(attention, q, k, v, table, grad_out, grad_lse, **kwargs):
    """(out, lse, dq, dk, dv, d_table) of attention(q, k, v, pos, **kwargs) for loss <out, grad_out> +
    <lse, grad_lse>; fresh leaves so the two runs share nothing."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    table = None if table is None else table.detach().clone().requires_grad_()
    pos = position(kwargs.pop("pos"), q.shape[1], table)
    out, lse = attention(q, k, v, pos, return_lse=True, **kwargs)
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad, None if table is None else table.grad


def check_attention(rank: int, world: int, case: dict) -> float:
    """Compare one context-parallel case with fused_attention on the full sequence; returns this rank's largest
    error relative to the output scale (for the record). case: pos, causal, layout, method, and optionally
    window, heads (Hq, Hkv), offset (int or "tensor"), dtype, shard_len, head_dim, backend."""
    dtype = case.get("dtype", torch.float32)
    heads, kv_heads = case.get("heads", (4, 4))
    batch, head_dim, total = 2, case.get("head_dim", 16), world * case.get("shard_len", 6)
    gen = torch.Generator().manual_seed(1234)
    q = torch.randn(batch, heads, total, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, total, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, total, head_dim, generator=gen).to(dtype)
    grad_out = torch.randn(q.shape, generator=gen).to(dtype)
    grad_lse = torch.randn(q.shape[:3], generator=gen)
    table = torch.randn(heads, 8, generator=gen) if case["pos"] == "t5" else None
    backend = case.get("backend", "auto")
    common = dict(pos=case["pos"], causal=case["causal"], window=case.get("window"))
    offset = _offset(case.get("offset", 0), batch)
    single = _attention_run(fused_attention, q, k, v, table, grad_out, grad_lse, q_offset=offset, k_offset=offset,
                            backend=backend, **common)
    layout = case["layout"]
    shard = lambda x: shard_sequence(x, layout=layout)  # noqa: E731
    parallel = _attention_run(context_parallel_attention, shard(q), shard(k), shard(v), table, shard(grad_out),
                              shard(grad_lse), layout=layout, method=case["method"], position_offset=offset,
                              backend=backend, **common)
    if table is not None:
        dist.all_reduce(parallel[5])  # each rank's table gradient is its own queries' share
    expected = [shard(x) for x in single[:5]] + [single[5]]
    names = ("out", "lse", "dq", "dk", "dv", "d_table")
    if dtype != torch.float32:
        return _check_low_precision(case, q, k, v, table, grad_out, grad_lse, offset, backend, common, parallel,
                                    expected, names, shard)
    worst = 0.0
    for name, got, want in zip(names, parallel, expected):
        if got is None and want is None:
            continue
        finite = want[torch.isfinite(want)]
        scale = max(1.0, finite.abs().max().item())
        err = max_err(got, want) / scale
        assert got.shape == want.shape and err <= FP32_RELATIVE, \
            f"{name}: context parallel vs one process relative error {err:.2e} (shape {tuple(got.shape)})"
        worst = max(worst, err)
    return worst


def _check_low_precision(case, q, k, v, table, grad_out, grad_lse, offset, backend, common, parallel, expected,
                         names, shard) -> float:
    """DESIGN.md's rule with the one-process kernel in the same dtype as same_dtype and fp64 as the reference."""
    ref64 = _attention_run(fused_attention, q.double(), k.double(), v.double(), table, grad_out.double(),
                           grad_lse.double(), q_offset=offset, k_offset=offset, backend="cpu", **common)
    ref64 = [shard(x) for x in ref64[:5]] + [ref64[5]]
    for i, (name, got, same) in enumerate(zip(names, parallel, expected)):
        if got is None:
            continue
        factor = 2.0 if i < 2 else GRADIENT_FACTOR
        assert_close_to_reference(got, ref64[i].to(torch.float64), same, factor, name, dtype=q.dtype)
    return 0.0


def call_raises(rank: int, world: int, bad_rank: int | None, change: dict) -> str:
    """Call context_parallel_attention with a valid shard on every rank except bad_rank (or on every rank when
    bad_rank is None), whose call gets `change` (keyword overrides; "shard_len" makes its shard that long);
    return the exception's 'Type: message' this rank got (it must raise)."""
    args = dict(pos="alibi", causal=True, layout="zigzag", method="ring")
    shard_len = 6
    if bad_rank is None or rank == bad_rank:
        args.update(change)
        shard_len = args.pop("shard_len", shard_len)
    q = torch.randn(1, 2, shard_len, 8)
    try:
        context_parallel_attention(q, q, q, **args)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"rank {rank}: no exception for {change}")


def gather_round_trip(rank: int, world: int, layout: str) -> None:
    """shard_sequence then gather_sequence is the identity, and gather's gradient is the sum over ranks."""
    full = torch.arange(2 * 3 * 4 * world * 5, dtype=torch.float32).view(2, 3, 4 * world, 5)
    local = shard_sequence(full, layout=layout).clone().requires_grad_()
    gathered = gather_sequence(local, layout=layout)
    assert torch.equal(gathered, full), "gather_sequence(shard_sequence(x)) != x"
    (gathered * (rank + 1)).sum().backward()  # every rank's loss: (rank + 1) * sum -> summed gradient
    expected = torch.full_like(local, world * (world + 1) / 2)
    assert torch.equal(local.grad, expected), f"gather gradient {local.grad.flatten()[:4]} != {expected.flatten()[0]}"


def train_losses(rank: int, world: int, scheme: str, layout: str, method: str, steps: int = 20) -> float:
    """Train the tiny LM of fused_pos_attn.models for `steps` AdamW steps twice from the same initialization: on
    the whole sequence in this process, and with the sequence split over the group (each rank's parameter
    gradients summed over the ranks, as a data-parallel wrapper does). Asserts the losses agree; returns the
    largest relative difference."""
    from fused_pos_attn.distributed import ContextParallel
    from fused_pos_attn.models import ModelConfig, TransformerLM
    config = ModelConfig(scheme=scheme, d_model=32, num_layers=2, num_heads=2, train_len=8 * world)
    cp = ContextParallel(layout=layout, method=method)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 256, (2, 8 * world + 1), generator=gen) for _ in range(steps)]

    def run(parallel: bool) -> list[float]:
        torch.manual_seed(0)
        model = TransformerLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for batch in batches:
            tokens, targets = batch[:, :-1], batch[:, 1:]
            if parallel:
                tokens, targets = cp.shard(tokens, 1), cp.shard(targets, 1)
            logits = model(tokens, context_parallel=cp if parallel else None)
            # Each rank's share of the mean over all B * N tokens: the shares sum to the one-process loss.
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            loss = loss / (batch.shape[0] * (batch.shape[1] - 1))
            loss.backward()
            loss = loss.detach()
            if parallel:
                for parameter in model.parameters():
                    dist.all_reduce(parameter.grad)
                dist.all_reduce(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    single, parallel = run(False), run(True)
    worst = max(abs(a - b) / abs(a) for a, b in zip(single, parallel))
    assert worst <= 1e-5, f"losses differ by {worst:.2e} relative:\n one process {single}\n context parallel {parallel}"
    assert single[-1] < single[0], f"training did not lower the loss: {single}"
    return worst


def subgroup_call(rank: int, world: int) -> str:
    """Two context-parallel groups side by side ({0, 1} and {2, ..}): each rank calls with its own group and gets
    its rows of one-process attention over its group's sequence; a call with the other group (whose member this
    rank is not) raises a ValueError naming group, on that rank, before any communication."""
    groups = [dist.new_group([0, 1]), dist.new_group(list(range(2, world)))]  # every rank creates both
    mine, other = (groups[0], groups[1]) if rank < 2 else (groups[1], groups[0])
    gen = torch.Generator().manual_seed(7 + (rank >= 2))  # a different sequence per group
    q, k, v = (torch.randn(1, 2, 8 * dist.get_world_size(mine), 8, generator=gen) for _ in range(3))
    out = context_parallel_attention(*(shard_sequence(x, mine) for x in (q, k, v)), "alibi", causal=True, group=mine)
    expected = shard_sequence(fused_attention(q, k, v, "alibi", causal=True), mine)
    assert max_err(out, expected) <= FP32_RELATIVE * max(1.0, expected.abs().max().item())
    try:
        context_parallel_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], "alibi", causal=True, group=other)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"rank {rank}: no error for a group it is not a member of")
