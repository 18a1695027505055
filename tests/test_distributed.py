"""Context parallelism (fused_pos_attn.distributed) on gloo process groups of 2 and 4 spawned CPU processes, against
one-process fused_attention on the full sequence: out, LSE, dq / dk / dv and the T5 table gradient (summed over
the ranks) for each scheme, layout, method, causal or not, windows, GQA / MQA, position offsets and dtypes; a
tiny LM trained with its sequence split over 2 ranks; bad input raising on every rank."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

import distributed_cases
from fused_pos_attn.distributed.layout import global_to_rank_major, rank_chunks, rank_major_to_global, shard
from fused_pos_attn.distributed.rank_pool import RankPool
from fused_pos_attn.distributed.ring import RingPlan

_POOLS: dict[int, RankPool] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_pools():
    yield
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def on_ranks(world: int, fn, *args) -> list:
    """fn(rank, world, *args) on each rank of a gloo group of `world` processes (started once per module)."""
    if world not in _POOLS:
        _POOLS[world] = RankPool(world)
    return _POOLS[world].run(fn, *args)


SCHEMES = ("none", "alibi", "rope", "t5")
MATRIX = [dict(pos=pos, layout=layout, method=method, causal=causal) for pos, layout, method, causal
          in itertools.product(SCHEMES, ("contiguous", "zigzag"), ("ring", "allgather"), (True, False))]


def _id(case: dict) -> str:
    return "-".join(f"{value}" if key in ("pos", "layout", "method") else f"{key}={value}"
                    for key, value in case.items())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", MATRIX, ids=_id)
def test_matches_one_process(world, case):
    on_ranks(world, distributed_cases.check_attention, case)


EXTRA = (
    # Windows: the ring stops early (causal) or not (keys after the query stay visible when not causal).
    [dict(pos=pos, layout=layout, method=method, causal=causal, window=window)
     for pos, layout, method, causal, window in itertools.product(("alibi", "t5"), ("contiguous", "zigzag"),
                                                                  ("ring", "allgather"), (True, False), (2, 7))]
    # GQA and MQA: K/V shards travel with Hkv heads.
    + [dict(pos=pos, layout="zigzag", method=method, causal=True, heads=heads)
       for pos, method, heads in itertools.product(("rope", "t5"), ("ring", "allgather"), ((4, 2), (4, 1)))]
    # Positions of token 0 after a prefix: an int and per-batch values.
    + [dict(pos=pos, layout=layout, method="ring", causal=True, offset=offset)
       for pos, layout, offset in itertools.product(("alibi", "rope_yarn", "t5"), ("contiguous", "zigzag"),
                                                    (37, "tensor"))]
    # Every RoPE scaling (DynamicNTK's frequencies follow the global length N, not the shard's).
    + [dict(pos=pos, layout="zigzag", method=method, causal=causal)
       for pos, method, causal in itertools.product(
           ("rope_linear", "rope_ntk", "rope_dynamic", "rope_yarn", "rope_llama3", "rope_longrope", "rope_partial"),
           ("ring", "allgather"), (True, False))]
    # Head dims the kernels pad, longer shards.
    + [dict(pos="alibi", layout="zigzag", method="ring", causal=True, head_dim=80, shard_len=34),
       dict(pos="t5", layout="contiguous", method="ring", causal=False, head_dim=32, shard_len=17)]
)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", EXTRA, ids=_id)
def test_matches_one_process_variants(world, case):
    on_ranks(world, distributed_cases.check_attention, case)


LOW_PRECISION = [dict(pos=pos, layout="zigzag", method=method, causal=True, dtype=dtype)
                 for pos, method, dtype in itertools.product(("alibi", "rope", "t5"), ("ring", "allgather"),
                                                             (torch.bfloat16, torch.float16))]


@pytest.mark.parametrize("case", LOW_PRECISION, ids=_id)
def test_low_precision(case):
    """bf16 / fp16 inputs: merged in fp32, within DESIGN.md's rule of the one-process kernel's own error."""
    on_ranks(2, distributed_cases.check_attention, case)


@pytest.mark.parametrize("case", [dict(pos="alibi", layout="zigzag", method="ring", causal=True, backend="triton"),
                                  dict(pos="t5", layout="contiguous", method="allgather", causal=False,
                                       backend="triton", window=5)], ids=_id)
def test_triton_backend(case):
    """The Triton kernels (through the interpreter on CPU) under both methods."""
    on_ranks(2, distributed_cases.check_attention, case)


@pytest.mark.parametrize("scheme,layout,method", [("alibi", "zigzag", "ring"), ("rope", "zigzag", "ring"),
                                                  ("t5", "zigzag", "ring"), ("learned", "zigzag", "ring"),
                                                  ("t5", "contiguous", "allgather")])
def test_training_matches_one_process(scheme, layout, method):
    """20 AdamW steps of the tiny LM with the sequence over 2 ranks give the one-process losses."""
    on_ranks(2, distributed_cases.train_losses, scheme, layout, method)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 4])
def test_gather_inverts_shard(world, layout):
    on_ranks(world, distributed_cases.gather_round_trip, layout)


BAD_INPUT = [
    # (rank whose call is bad or None for all, its overrides, the text every rank's error must contain)
    (1, dict(shard_len=5), "must be even for layout 'zigzag'"),
    (0, dict(shard_len=8), "the ranks' shapes differ"),
    (1, dict(causal=False), "the ranks' arguments differ"),
    (0, dict(position_offset=3), "the ranks' position_offset differ"),
    (None, dict(layout="striped"), "layout must be one of"),
    (None, dict(method="alltoall"), "method must be one of"),
    (1, dict(backend="reference"), "backend='reference' is not supported"),
    (0, dict(position_offset=1.5), "position_offset must be an int or a (B,) integer tensor"),
    (None, dict(group="world"), "group must be a torch.distributed ProcessGroup or None"),
]


@pytest.mark.parametrize("bad_rank,change,message", BAD_INPUT, ids=[str(c[1]) for c in BAD_INPUT])
def test_bad_input_raises_on_every_rank(bad_rank, change, message):
    errors = on_ranks(2, distributed_cases.call_raises, bad_rank, change)
    for rank, error in enumerate(errors):
        assert message in error, f"rank {rank}: {error}"


def test_groups_side_by_side_and_a_group_without_this_rank():
    for rank, error in enumerate(on_ranks(4, distributed_cases.subgroup_call)):
        assert error.startswith("group: this process (global rank") and "is not a member" in error, (rank, error)


# Without processes: the plan's skipping and the layouts' bookkeeping.

def test_zigzag_balances_causal_work_and_skips_invisible_pairs():
    """Causal zigzag over P ranks: every rank computes 2P + 1 of its 4P chunk pairs (the P(2P + 1) visible ones of
    the 2P x 2P chunk grid's lower triangle, shared equally); contiguous gives rank r r + 1 pairs."""
    for world in (2, 4, 8):
        for rank in range(world):
            zigzag = RingPlan.build(None, rank, world, "zigzag", 8, causal=True, window=None)
            assert sum(map(len, zigzag.steps)) == 2 * world + 1
            contiguous = RingPlan.build(None, rank, world, "contiguous", 8, causal=True, window=None)
            assert sum(map(len, contiguous.steps)) == rank + 1
        assert zigzag.shifts == world - 1


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_window_stops_the_ring(layout):
    """A causal window w reaches w - 1 positions back: with contiguous shards of n tokens the ring needs
    ceil((w - 1) / n) shifts; without causal masking keys after the query stay visible and every shift runs."""
    world, shard_len = 8, 16
    for window in (1, 2, 16, 17, 33, 1000):
        plan = RingPlan.build(None, 0, world, layout, shard_len, causal=True, window=window)
        if layout == "contiguous":
            assert plan.shifts == min(world - 1, -(-(window - 1) // shard_len)), window
        # Every visible pair is computed: compare with brute force over positions.
        for rank in range(world):
            plan = RingPlan.build(None, rank, world, layout, shard_len, causal=True, window=window)
            computed = {(qc.global_start, kc.global_start) for pairs in plan.steps for qc, kc in pairs}
            for t in range(world):
                for qc in rank_chunks(layout, world, rank, shard_len):
                    for kc in rank_chunks(layout, world, (rank - t) % world, shard_len):
                        visible = any(0 <= i - j < window for i in range(qc.global_start, qc.global_end)
                                      for j in range(kc.global_start, kc.global_end))
                        assert visible == ((qc.global_start, kc.global_start) in computed), (window, rank, t)
    assert RingPlan.build(None, 0, world, layout, shard_len, causal=False, window=2).shifts == world - 1


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_layout_round_trip(layout):
    world = 4
    x = torch.arange(2 * world * 6).view(1, 2 * world * 6, 1)
    shards = [shard(x, layout, world, rank, 1) for rank in range(world)]
    rank_major = torch.cat(shards, 1).transpose(0, 1)
    assert torch.equal(rank_major_to_global(rank_major, layout, world).transpose(0, 1), x)
    assert torch.equal(global_to_rank_major(x.transpose(0, 1), layout, world), rank_major)
    if layout == "zigzag":
        assert shards[1].flatten().tolist() == list(range(6, 12)) + list(range(36, 42))  # chunks 1 and 2P - 2


def test_torchrun_example(tmp_path):
    """The README's torchrun command (examples/context_parallel.py) runs on CPUs and agrees with one device."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(root, "examples", "context_parallel.py"), "--seq-len", "512"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "max |context parallel - one device|" in line]
    assert len(lines) == 3, done.stdout
    for line in lines:
        assert float(line.rsplit("= ", 1)[1]) < 1e-4, line
