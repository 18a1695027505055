"""The CUDA kernels' own source, run on the CPU: a GPU-free check of csrc/cuda's indexing, masking, position
math, online softmax and backward algebra against the fp64 reference (DESIGN.md tolerance rule).

tests/cuda_emulation/ compiles the kernel templates (csrc/cuda/forward_kernel.cuh, backward_kernel.cuh) as
host C++ with g++: one std::thread per CUDA thread, std::barrier for __syncthreads and for warp collectives,
and shuffles / ldmatrix / mma.sync computed from their PTX ISA definitions (emu_runtime.h). Of
csrc/cuda/mma.cuh only the bodies of the inline-PTX functions are swapped for emulated ones (EMULATED below);
its fragment address helpers, like everything else, are the shipped code. Calls go through the real Python
path: fused_attention(backend="cuda") -> backends/cuda_backend.py -> backends/native.py (its op arguments and
the relative table's gradient fold) -> the harness, standing in for torch.ops.fused_pos_attn (native.OPS) on
CUDA tensors, with the launchers' grids. The harness reads the op arguments in csrc's FPA_CALL_ARGS order, the
order of the ops' schema.

Packed (varlen) calls run the same way (test_native_varlen's helpers build them), including cu_seqlens that are
garbage: NaN guard rows around every tensor show a read or write outside it.

Not covered: timing, cp.async's asynchrony (emulated copies complete at once), the hardware's accumulation
order inside mma, resource limits (tests/test_cuda_compile.py checks those). Skipped with a GPU (the real
kernels run in tests/test_cuda_backend.py) or without g++ / the CUDA headers.
"""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

from typing import Optional

import pytest
import torch

from fused_pos_attn import RelativeBias, RoPE, backends
from fused_pos_attn.backends import cuda_backend, native
from fused_pos_attn.positions import ResolvedPosition
from fused_pos_attn.spec import AttentionSpec
from fused_pos_attn.triton_kernels.scheme_codes import SCHEME_CODES
from test_attention_backends import Case, RelativeTable, check_case
from test_cuda_compile import cuda_include_dir
from test_native_lse_grad import check_lse_case
from test_native_varlen import check_against_reference, check_garbage_cu_seqlens, make_packed
from test_kvcache import _check as _kv_check, _inputs as _kv_inputs, _paged
from test_native_decode import SCHEMES as KV_SCHEMES

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"

# Inline-PTX functions of csrc/cuda/mma.cuh (a regex matching the start of the definition) -> emulated body.
EMULATED = {
    r"void mma_16816<__half>\(": "emu::mma<__half>(d, a, b0, b1);",
    r"void mma_16816<__nv_bfloat16>\(": "emu::mma<__nv_bfloat16>(d, a, b0, b1);",
    r"uint32_t smem_u32\(": "return 0;",
    r"void ldmatrix_x4\(": "emu::ldmatrix(r, smem_row, false);",
    r"void ldmatrix_x4_trans\(": "emu::ldmatrix(r, smem_row, true);",
    r"void cp_async_16\(": "if (src_valid) memcpy(smem, gmem, 16); else memset(smem, 0, 16);",
    r"void cp_async_commit\(": "",
    r"void cp_async_wait\(": "",
}


CUDA_INCLUDE = cuda_include_dir()
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: tests/test_cuda_backend.py runs the "
                                                         "real kernels"),
    pytest.mark.skipif(shutil.which("g++") is None or CUDA_INCLUDE is None,
                       reason="needs g++ and the CUDA headers (cuda_fp16.h)"),
]


def emulated_mma_header() -> str:
    """csrc/cuda/mma.cuh with each inline-PTX function body replaced by its emulation."""
    source = (ROOT / "csrc" / "cuda" / "mma.cuh").read_text()
    for signature, body in EMULATED.items():
        match = re.search(signature, source)
        assert match, f"{signature!r} not found in csrc/cuda/mma.cuh: update EMULATED in {__file__}"
        start = source.index("{", match.end())
        depth = 0
        for end in range(start, len(source)):
            depth += {"{": 1, "}": -1}.get(source[end], 0)
            if depth == 0:
                break
        source = source[:start] + "{ " + body + " }" + source[end + 1:]
    assert "asm" not in source, "csrc/cuda/mma.cuh has inline PTX the emulation does not cover: extend EMULATED"
    return source


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)


def _output_like(t: torch.Tensor) -> torch.Tensor:
    """ops.cpp's output_like: t's layout when the kernels' paired stores allow it, else contiguous."""
    out = torch.empty_like(t)
    paired = out.stride(3) == 1 and all(s % 2 == 0 for s in out.stride()[:3])
    return out if paired else torch.empty(t.shape, dtype=t.dtype)


class HostTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("strides", ctypes.c_int64 * 4), ("sizes", ctypes.c_int64 * 4)]


class EmuArg(ctypes.Structure):
    """One op argument for the harness (harness.cpp's EmuArg): a tensor, an int / bool, or a float."""
    _fields_ = [("tensor", HostTensor), ("integer", ctypes.c_int64), ("real", ctypes.c_double)]


# The ops' position and masking arguments in schema order (csrc's FPA_CALL_ARGS): the schema of the built op.
CALL_ARG_NAMES = [a.name for a in torch.ops.fused_pos_attn.attention_forward.default._schema.arguments[3:]]


def _emu_args(call_args: dict):
    """native.op_args' keyword arguments as the harness's EmuArg array, in schema order."""
    assert list(call_args) == CALL_ARG_NAMES, "native.op_args must match the ops' schema"
    args = (EmuArg * len(CALL_ARG_NAMES))()
    for arg, name in zip(args, CALL_ARG_NAMES):
        value = call_args[name]
        if isinstance(value, torch.Tensor):
            pad = [0] * (4 - value.dim())
            arg.tensor = HostTensor(_ptr(value), (ctypes.c_int64 * 4)(*value.stride(), *pad),
                                    (ctypes.c_int64 * 4)(*value.shape, *pad))
        elif isinstance(value, float):
            arg.real = value
        else:
            arg.integer = int(value)
    return args


class EmulatedOps:
    """attention_forward / attention_backward on CPU tensors through the harness, as ops.cpp's CUDA bindings
    would run them (same op arguments, same output allocation): a stand-in for torch.ops.fused_pos_attn.
    Decode plans as on a device of sm_count SMs, splits keeping at least min_split_keys keys (launch.h's
    kMinSplitKeys is 256: smaller here so that short test caches split); last_plan: the last forward's
    (group, splits)."""

    def __init__(self, lib: ctypes.CDLL, sm_count: int = 4, min_split_keys: int = 64):
        self.lib = lib
        self.sm_count, self.min_split_keys = sm_count, min_split_keys
        self.last_plan = None

    @staticmethod
    def _shape(q, k):
        assert q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128)
        dtype = ctypes.c_int(0 if q.dtype == torch.float16 else 1)
        return dtype, (ctypes.c_int64 * 6)(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3])

    def attention_forward(self, q, k, v, **call_args):
        out = _output_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32)
        plan = (ctypes.c_int * 2)()
        self.lib.emu_forward(*self._shape(q, k), _emu_args(call_args), _ptr(q), _strides(q), _ptr(k), _strides(k),
                             _ptr(v), _strides(v), _ptr(out), _strides(out), _ptr(lse), ctypes.c_int(self.sm_count),
                             ctypes.c_int64(self.min_split_keys), plan)
        self.last_plan = tuple(plan)
        return out, lse

    def attention_backward(self, grad_out, grad_lse, q, k, v, out, lse, rel_grad, **call_args):
        assert lse.is_contiguous() and (grad_lse is None or (grad_lse.is_contiguous() and
                                                             grad_lse.dtype == torch.float32))
        table_grad = rel_grad and call_args["pos"] == SCHEME_CODES["relative"]
        dq, dk, dv = _output_like(q), _output_like(k), _output_like(v)
        d_rel_bias = (torch.full((q.shape[1], 2, call_args["max_distance"] + 1), float("nan")) if table_grad
                      else torch.empty(0))  # NaN: the launcher zeroes it, NaN shows any miss
        dq_accum = torch.full(q.shape, float("nan"))
        delta = torch.full(q.shape[:3], float("nan"))
        self.lib.emu_backward(*self._shape(q, k), _emu_args(call_args), _ptr(grad_out), _strides(grad_out),
                              _ptr(grad_lse), _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v),
                              _ptr(out), _strides(out), _ptr(lse), _ptr(dq), _strides(dq), _ptr(dk), _strides(dk),
                              _ptr(dv), _strides(dv), _ptr(d_rel_bias), _ptr(dq_accum), _ptr(delta))
        return dq, dk, dv, d_rel_bias


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory) -> EmulatedOps:
    build = tmp_path_factory.mktemp("cuda_emulation")
    (build / "cuda").mkdir()
    (build / "cuda" / "mma.cuh").write_text(emulated_mma_header())  # found before csrc/cuda/mma.cuh
    library = build / "libfpa_emulated.so"
    cmd = ["g++", "-std=c++20", "-O1", "-w", "-fPIC", "-shared", "-include", str(EMULATION / "emu_runtime.h"),
           f"-I{build}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{CUDA_INCLUDE}",
           str(EMULATION / "harness.cpp"), "-o", str(library), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the emulation failed:\n{proc.stderr[-4000:]}"
    return EmulatedOps(ctypes.CDLL(str(library)))


@pytest.fixture
def emulated_cuda_backend(monkeypatch, emulated_ops):
    """backend="cuda" on CPU tensors: the real cuda_backend and native modules, their op calls served by the
    emulation."""
    monkeypatch.setattr(backends, "_cuda_for", lambda q: cuda_backend)
    monkeypatch.setattr(native, "OPS", emulated_ops)


OFFSETS = dict(q_offset=torch.tensor([30, 3_000_000_000]), k_offset=torch.tensor([5, 3_000_000_000 - 20]))
CASES = {
    # GQA, ALiBi, causal + left window, two query blocks and two key blocks.
    "alibi_window_gqa_fp16_d64": (Case(heads_q=4, heads_kv=2, seq_q=70, seq_k=90, head_dim=64, pos="alibi",
                                       kwargs=dict(causal=True, window=33)), torch.float16),
    # Partial interleaved RoPE, D = 128 (the backward's 32-row query tiles), bidirectional.
    "rope_partial_interleaved_bf16_d128": (Case(batch=1, heads_q=2, heads_kv=1, seq_q=40, seq_k=70, head_dim=128,
                                                pos=RoPE(rotary_dim=24, interleaved=True)), torch.bfloat16),
    # Relative table, distances past max_distance (one atomic per warp tile) and per-batch offsets past int32.
    "relative_offsets_fp16_d64": (Case(heads_q=2, heads_kv=1, seq_q=17, seq_k=100, head_dim=64,
                                       pos=RelativeTable(num_buckets=8, max_distance=5),
                                       kwargs=dict(causal=True, **OFFSETS)), torch.float16),
    # Nq > Nk with causal: rows without a visible key; a (B, N, H, D) view read in place.
    "none_empty_rows_bnhd_fp16_d64": (Case(batch=1, heads_q=2, heads_kv=2, seq_q=100, seq_k=40, head_dim=64,
                                           layout="bnhd", kwargs=dict(causal=True)), torch.float16),
    # Decode (Nq = 1) with MQA; head-dim stride 2 makes the backend copy.
    "rope_decode_mqa_strided_bf16_d64": (Case(heads_q=4, heads_kv=1, seq_q=1, seq_k=97, head_dim=64, pos="rope",
                                              layout="strided_d", kwargs=dict(causal=True)), torch.bfloat16),
    # Bidirectional relative buckets at D = 128.
    "relative_bidirectional_fp16_d128": (Case(batch=1, heads_q=2, heads_kv=1, seq_q=65, seq_k=66, head_dim=128,
                                              pos=RelativeTable()), torch.float16),
    # A table row too large for shared memory (2 * 601 entries > kMaxSharedRelEntries): the tiles' diagonal sums
    # go to the table with atomics; distances on both sides of max_distance.
    "relative_large_table_fp16_d64": (Case(batch=1, heads_q=2, heads_kv=1, seq_q=40, seq_k=150, head_dim=64,
                                           pos=RelativeTable(num_buckets=32, max_distance=600),
                                           kwargs=dict(causal=True, q_offset=640)), torch.float16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_kernels_match_reference(name, emulated_cuda_backend):
    case, dtype = CASES[name]
    check_case(case, dtype, "cuda")


LSE_CASES = {
    # Rows without a visible key (Nq > Nk, causal), whose random dLSE must change nothing; table gradient.
    "relative_empty_rows_fp16_d64": (Case(batch=1, heads_q=2, heads_kv=1, seq_q=80, seq_k=40, head_dim=64,
                                          pos=RelativeTable(num_buckets=8, max_distance=5),
                                          kwargs=dict(causal=True)), torch.float16, "out_and_lse"),
    # Only lse in the loss: grad_out is zeros, every gradient comes from dLSE.
    "rope_lse_only_bf16_d128": (Case(batch=1, heads_q=2, heads_kv=1, seq_q=40, seq_k=70, head_dim=128, pos="rope",
                                     kwargs=dict(causal=True, window=50)), torch.bfloat16, "lse_only"),
}


@pytest.mark.parametrize("name", list(LSE_CASES))
def test_emulated_backward_with_lse_gradient(name, emulated_cuda_backend):
    """The preprocess kernel's delta = rowsum(dO * O) - dLSE, through autograd against the reference."""
    case, dtype, loss = LSE_CASES[name]
    check_lse_case(case, dtype, "cuda", loss)


def test_emulated_backward_without_table_gradient_ignores_dlse_of_empty_rows(emulated_cuda_backend):
    """rel_grad=False: the kernels get no table buffer (null, so any table atomic would crash) and the backend
    returns None for it, other gradients unchanged. dLSE on rows without a visible key, even NaN, changes
    nothing (the preprocess kernel leaves it out of delta)."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 80, 64, generator=gen).half()
    k, v = (torch.randn(1, 1, 40, 64, generator=gen).half() for _ in range(2))
    table = torch.randn(2, 8, generator=gen)
    offsets = torch.zeros(1, dtype=torch.int64)
    spec = AttentionSpec(causal=True, scale=0.125, window=None, q_offset=offsets - 40, k_offset=offsets,
                         position=RelativeBias(table, max_distance=5).resolve(1, 2, 64, 80, q.device, causal=True))
    out, lse = cuda_backend.forward(q, k, v, spec)
    empty = torch.isneginf(lse)
    assert empty.any() and not empty.all()
    grad_out, grad_lse = torch.randn(q.shape, generator=gen).half(), torch.randn(lse.shape, generator=gen)
    clean = cuda_backend.backward(grad_out, grad_lse.masked_fill(empty, 0.0), q, k, v, out, lse, spec, True)
    poisoned = cuda_backend.backward(grad_out, grad_lse.masked_fill(empty, float("nan")), q, k, v, out, lse, spec,
                                     False)
    assert clean[3].shape == (2, 8) and poisoned[3] is None
    for name, a, b in zip(("dq", "dk", "dv"), poisoned, clean):
        assert not torch.isnan(a).any(), f"{name}: NaN from the dLSE of rows without keys"
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=f"{name} changed")  # dq: atomics' order


def test_emulated_table_gradient_is_deterministic(emulated_cuda_backend):
    """Per-block partial rows reduced in a fixed order: repeated runs give bit-identical table gradients
    (fp32 atomics, whose order follows thread timing, would not)."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 2, 70, 64, generator=gen).half()
    k, v = (torch.randn(2, 1, 130, 64, generator=gen).half() for _ in range(2))
    offsets = torch.zeros(2, dtype=torch.int64)
    position = RelativeBias(torch.randn(2, 16, generator=gen), max_distance=20).resolve(2, 2, 64, 130, q.device)
    spec = AttentionSpec(causal=False, scale=0.125, window=None, q_offset=offsets + 30, k_offset=offsets,
                         position=position)
    out, lse = cuda_backend.forward(q, k, v, spec)
    grad_out = torch.randn(q.shape, generator=gen).half()
    tables = [cuda_backend.backward(grad_out, None, q, k, v, out, lse, spec, True)[3] for _ in range(3)]
    assert all(torch.equal(tables[0], t) for t in tables[1:])


@pytest.mark.parametrize("seq_q,seq_k,plan", [(30, 50, (1, 1)), (2, 200, (1, 3))], ids=["prefill", "split_decode"])
def test_unaligned_rows_take_element_copies(seq_q, seq_k, plan, emulated_ops):
    """Row strides that are not a multiple of 8 elements (and an odd base offset) switch the tile loads from
    cp.async to element copies; the forward is bit-identical to the aligned run. Also for a split-KV decode of
    one head per block (MHA: group 1)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 67, generator=gen).half()[..., 1:65] for n in (seq_q, seq_k, seq_k))
    offsets = torch.zeros(1, dtype=torch.int64)
    spec = AttentionSpec(causal=True, scale=0.125, window=None, q_offset=offsets + seq_k - seq_q + 20,
                         k_offset=offsets, position=ResolvedPosition("alibi", slopes=torch.full((1, 2), 0.25)))
    unaligned = emulated_ops.attention_forward(q, k, v, **native.op_args(spec, q))
    assert emulated_ops.last_plan == plan
    aligned = emulated_ops.attention_forward(*(t.contiguous() for t in (q, k, v)), **native.op_args(spec, q))
    assert q.stride(2) % 8 and all(torch.equal(a, b) for a, b in zip(unaligned, aligned))


# Packed (varlen) sequences: q (1, Hq, total_q, D), k / v (1, Hkv, total_k, D) and cu_seqlens, through cuda_backend
# with a packed AttentionSpec (test_native_varlen's helpers), against the reference run on each sequence alone.
# Grids span the longest sequence: blocks past a shorter one's rows (or keys) exit, and the relative table's
# reduction skips their partial rows (the harness fills that workspace with NaN, so a row read but never written
# shows). Sequences: longer than one 64-row block, empty, length 1, with queries and no keys, with keys and no query.
VARLEN_CASES = {
    # Per-sequence ALiBi slopes, GQA, causal + left window, per-sequence offsets.
    "alibi_slopes_gqa_window_fp16_d64": (dict(scheme="alibi", lengths_q=(70, 0, 1, 20), lengths_k=(90, 3, 0, 20),
                                              heads=4, kv_heads=2, window=33,
                                              offsets=([20, 0, 5, 3_000_000_000], [0, 0, 0, 3_000_000_000 - 7])),
                                         torch.float16),
    # Partial interleaved RoPE at D = 128 (the backward's 32-row query tiles), bidirectional, MQA.
    "rope_partial_bidirectional_mqa_bf16_d128": (dict(scheme=RoPE(rotary_dim=24, interleaved=True),
                                                      lengths_q=(40, 1, 0, 33), lengths_k=(70, 2, 4, 33), heads=2,
                                                      kv_heads=1, head_dim=128, causal=False), torch.bfloat16),
    # The relative table's gradient from per-block partial rows, q / k / v slices of one (total, 3, H, D) tensor.
    "relative_table_qkv_fp16_d64": (dict(scheme=(8, 5), lengths_q=(3, 0, 100, 1), heads=2, kv_heads=2,
                                         layout="qkv"), torch.float16),
    # Full RoPE, causal, self-attention with GQA (one (total, Hq + 2 Hkv, D) tensor).
    "rope_causal_gqa_qkv_fp16_d64": (dict(scheme="rope", lengths_q=(66, 2, 0, 17), heads=4, kv_heads=2, layout="qkv"),
                                     torch.float16),
}


@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_emulated_varlen_matches_reference(name, emulated_cuda_backend):
    kwargs, dtype = VARLEN_CASES[name]
    kwargs = dict(kwargs)
    p = make_packed(kwargs.pop("scheme"), kwargs.pop("lengths_q"), kwargs.pop("lengths_k", None), dtype=dtype,
                    head_dim=kwargs.pop("head_dim", 64), **kwargs)
    check_against_reference(cuda_backend, p, dtype, name)


@pytest.mark.parametrize("max_seqlen", ["truncating", "huge"])
def test_emulated_varlen_garbage_cu_seqlens_stay_in_bounds(max_seqlen, emulated_cuda_backend):
    """Garbage cu_seqlens / max_seqlen (test_native_varlen.check_garbage_cu_seqlens): rows clamped into the tensors,
    grids sized by min(max_seqlen, total), nothing read or written outside the tensors, dq 0 on unowned rows."""
    check_garbage_cu_seqlens(cuda_backend, torch.float16, 64, max_seqlen, dq_zero_outside=True)


# Split-KV decoding (launch.h decode_plan; the emulation plans for a 4-SM device with 64-key splits): `group` query
# heads of one kv head share each block's tile rows (row r: query r // group of head r % group), keys split over
# blocks, partial (out, LSE) merged by attention_split_merge_kernel. Forward and backward (from the merged out / LSE)
# against the reference; each case asserts the plan it meant to exercise. Plan: (group, splits).
DECODE_CASES = {
    # One query row, GQA groups of 4, four splits of 64+ keys; ALiBi slopes per row's head.
    "alibi_group4_split4_fp16_d64": (Case(batch=1, heads_q=8, heads_kv=2, seq_q=1, seq_k=300, head_dim=64,
                                          pos="alibi", kwargs=dict(causal=True)), torch.float16, (4, 4)),
    # Five query rows x 3 heads (15 tile rows), partial interleaved RoPE rotating each row at its query's position.
    "rope_partial_rows5_group3_bf16_d128": (Case(batch=1, heads_q=6, heads_kv=2, seq_q=5, seq_k=200, head_dim=128,
                                                 pos=RoPE(rotary_dim=24, interleaved=True),
                                                 kwargs=dict(causal=True, q_offset=195)), torch.bfloat16, (3, 3)),
    # Relative table per row's head; a window that leaves whole splits without a key and (batch 1) starts off a
    # block boundary, so a split's last key block reaches into the next split's keys (each split counts its own);
    # rows that see no key at all (batch 0, q_offset -2, causal): LSE -inf and out 0 after the merge.
    "relative_window_empty_rows_mqa_fp16_d64": (Case(batch=2, heads_q=4, heads_kv=1, seq_q=3, seq_k=260,
                                                     head_dim=64, pos=RelativeTable(num_buckets=8, max_distance=20),
                                                     kwargs=dict(causal=True, window=70,
                                                                 q_offset=torch.tensor([-2, 150]))),
                                                torch.float16, (4, 4)),
    # 16 query rows x group 3 = 48 rows (a group of 6 would not fit 64); the tile's last 16 rows idle. Bidirectional.
    "none_rows16_group3_fp16_d64": (Case(batch=1, heads_q=6, heads_kv=1, seq_q=16, seq_k=150, head_dim=64,
                                         layout="bnhd"), torch.float16, (3, 2)),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_emulated_split_kv_decode_matches_reference(name, emulated_cuda_backend, emulated_ops):
    case, dtype, plan = DECODE_CASES[name]
    check_case(case, dtype, "cuda")
    assert emulated_ops.last_plan == plan


def test_emulated_decode_plan(emulated_ops):
    """launch.h decode_plan through the harness: no plan past 16 query rows; the largest GQA group whose rows fit
    64; splits for 2 blocks per SM, each keeping min_split_keys keys; none when the grid is already full."""
    offsets = torch.zeros(2, dtype=torch.int64)
    spec = AttentionSpec(causal=True, scale=0.125, window=None, q_offset=offsets, k_offset=offsets,
                         position=ResolvedPosition("none"))

    def plan(heads, seq_q, seq_k, sm_count=4):
        emulated_ops.sm_count = sm_count
        try:
            q = torch.zeros(2, heads[0], seq_q, 64, dtype=torch.float16)
            kv = torch.zeros(2, heads[1], seq_k, 64, dtype=torch.float16)
            emulated_ops.attention_forward(q, kv, kv, **native.op_args(spec, q))
        finally:
            emulated_ops.sm_count = 4
        return emulated_ops.last_plan

    assert plan((8, 2), 17, 130) == (1, 1)       # not a decode shape
    assert plan((8, 2), 16, 130) == (4, 2)       # 16 rows x 4 heads = 64; 2 blocks, 130 keys: 2 splits of 64
    assert plan((8, 1), 16, 130) == (4, 2)       # group 8 would need 128 rows
    assert plan((10, 2), 1, 64) == (5, 1)        # one split's worth of keys
    assert plan((8, 2), 1, 1000) == (4, 2)       # 4 blocks for 8: 2 splits
    assert plan((8, 2), 1, 1000, sm_count=1) == (4, 1)  # the grid already gives 2 blocks per SM


@pytest.mark.parametrize("scheme", list(KV_SCHEMES))
def test_emulated_kvcache(scheme, emulated_cuda_backend, emulated_ops):
    """fused_attention_with_kvcache(backend="cuda"): per-row cache lengths (seqused_k) 0, 16 and 150, Nq 1 and 3,
    contiguous and paged (16-row pages, random block table; and 3-row pages) caches, GQA split-KV; against the
    oracle of test_kvcache (the reference per row), paged equal to contiguous."""
    for seq_q in (1, 3):
        q, k_cache, v_cache, k_new, v_new = _kv_inputs(3, seq_q, (4, 2), 192, head_dim=64, dtype=torch.float16,
                                                       seed=seq_q)
        pos, lengths = KV_SCHEMES[scheme](4), [0, 16, 150]
        out = _kv_check(q, k_cache, v_cache, lengths, pos, "cuda", k_new=k_new, v_new=v_new)
        assert emulated_ops.last_plan[1] > 1, "the cases should split the keys"
        for page_size, num_pages in ((16, 40), (3, 200)):
            (k_pages, block_table), (v_pages, _) = _paged(k_cache, page_size, num_pages), _paged(v_cache, page_size,
                                                                                               num_pages)
            out_paged = _kv_check(q, k_pages, v_pages, lengths, pos, "cuda", block_table=block_table, k_new=k_new,
                                  v_new=v_new)
            assert torch.equal(out_paged, out), f"paged ({page_size}-row pages) != contiguous"


def test_emulated_varlen_split_kv_decode(emulated_cuda_backend, emulated_ops, monkeypatch):
    """Packed decode (at most 16 query rows per sequence) on the split path: per-sequence ALiBi slopes, GQA groups
    of 4 heads, an empty sequence, one with queries and no keys, one with keys and no query; the merge writes only
    rows a sequence owns."""
    monkeypatch.setattr(emulated_ops, "sm_count", 16)  # 8 blocks for 32: 4 splits of the 300 keys
    p = make_packed("alibi", (1, 0, 5, 3, 0), (300, 3, 0, 200, 7), heads=8, kv_heads=2, head_dim=64,
                    dtype=torch.float16, window=120)
    check_against_reference(cuda_backend, p, torch.float16, "varlen split decode")
    assert emulated_ops.last_plan == (4, 4)


def test_emulated_kvcache_bf16_d128(emulated_cuda_backend, emulated_ops):
    """KV cache at D 128 in bf16, YaRN partial interleaved RoPE, 16-row pages: a decode step (Nq 2, split) and a
    chunked prefill (Nq 20: no decode plan, the plain forward over pages)."""
    for seq_q, plan in ((2, (4, 2)), (20, (1, 1))):
        q, k_cache, v_cache, k_new, v_new = _kv_inputs(2, seq_q, (8, 2), 160, head_dim=128, dtype=torch.bfloat16,
                                                       seed=seq_q)
        (k_pages, block_table), (v_pages, _) = _paged(k_cache, 16, 24), _paged(v_cache, 16, 24)
        _kv_check(q, k_pages, v_pages, [9, 130], KV_SCHEMES["rope_yarn_partial"](8), "cuda", block_table=block_table,
                  k_new=k_new, v_new=v_new)
        assert emulated_ops.last_plan == plan
