"""The CUDA kernels' own source, run on the CPU: a GPU-free check of csrc/cuda's indexing, masking, position
math, online softmax and backward algebra against the fp64 reference (DESIGN.md tolerance rule).

tests/cuda_emulation/ compiles the kernel templates (csrc/cuda/forward_kernel.cuh, backward_kernel.cuh) as
host C++ with g++: one std::thread per CUDA thread, std::barrier for __syncthreads and for warp collectives,
and shuffles / ldmatrix / mma.sync computed from their PTX ISA definitions (emu_runtime.h). Of
csrc/cuda/mma.cuh only the bodies of the inline-PTX functions are swapped for emulated ones (EMULATED below);
its fragment address helpers, like everything else, are the shipped code. Calls go through the real Python
path: fused_attention(backend="cuda") -> backends/cuda_backend.py -> the op arguments of cpu_backend._op_args
-> the harness (standing in for torch.ops on CUDA tensors, with the launchers' grids).

Not covered: timing, cp.async's asynchrony (emulated copies complete at once), the hardware's accumulation
order inside mma, resource limits (tests/test_cuda_compile.py checks those). Skipped with a GPU (the real
kernels run in tests/test_cuda_backend.py) or without g++ / the CUDA headers.
"""
import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fused_pos_attn import RoPE, backends
from fused_pos_attn.backends import cpu_backend, cuda_backend
from test_attention_backends import Case, RelativeTable, check_case

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


def _cuda_include():
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), nvcc and str(Path(nvcc).resolve().parents[1]), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


CUDA_INCLUDE = _cuda_include()
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


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr() if t.numel() else 0)


def _output_like(t: torch.Tensor) -> torch.Tensor:
    """ops.cpp's output_like: t's layout when the kernels' paired stores allow it, else contiguous."""
    out = torch.empty_like(t)
    paired = out.stride(3) == 1 and all(s % 2 == 0 for s in out.stride()[:3])
    return out if paired else torch.empty(t.shape, dtype=t.dtype)


class EmulatedOps:
    """attention_forward / attention_backward on CPU tensors through the harness, as ops.cpp's CUDA bindings
    would run them (same op arguments, same output allocation)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def _params(self, q, k, op_args):
        (q_offset, k_offset, pos, slopes, inv_freq, rotary_dim, interleaved, attention_factor, rel_bias,
         max_distance, causal, window, scale) = op_args
        assert q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128)
        shape = (ctypes.c_int64 * 6)(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3])
        keep = [shape, (ctypes.c_int64 * 2)(*slopes.stride())]
        params = [ctypes.c_int(0 if q.dtype == torch.float16 else 1), shape, _ptr(q_offset), _ptr(k_offset),
                  ctypes.c_int(pos), _ptr(slopes), keep[1], _ptr(inv_freq), ctypes.c_int(rotary_dim),
                  ctypes.c_int(int(interleaved)), ctypes.c_double(attention_factor), _ptr(rel_bias),
                  ctypes.c_int64(max_distance), ctypes.c_int(int(causal)), ctypes.c_int64(window),
                  ctypes.c_double(scale)]
        return params, keep

    def forward(self, q, k, v, spec):
        params, keep = self._params(q, k, cpu_backend._op_args(spec, q))
        out = _output_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32)
        self.lib.emu_forward(*params, _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v), _ptr(out),
                             _strides(out), _ptr(lse))
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec):
        op_args = cpu_backend._op_args(spec, q)
        params, keep = self._params(q, k, op_args)
        relative = spec.position.kind == "relative"
        dq, dk, dv = _output_like(q), _output_like(k), _output_like(v)
        d_rel_bias = torch.full((q.shape[1], 2, op_args[9] + 1), float("nan")) if relative else torch.empty(0)
        dq_accum = torch.full(q.shape, float("nan"))  # the launcher zeroes it; NaN shows any miss
        delta = torch.full(q.shape[:3], float("nan"))
        self.lib.emu_backward(*params, _ptr(grad_out), _strides(grad_out), _ptr(q), _strides(q), _ptr(k), _strides(k),
                              _ptr(v), _strides(v), _ptr(out), _strides(out), _ptr(lse.contiguous()), _ptr(dq),
                              _strides(dq), _ptr(dk), _strides(dk), _ptr(dv), _strides(dv), _ptr(d_rel_bias),
                              _ptr(dq_accum), _ptr(delta))
        return dq, dk, dv, (d_rel_bias if relative else None)


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
    """backend="cuda" on CPU tensors: the real cuda_backend module, its op calls served by the emulation."""
    monkeypatch.setattr(backends, "_cuda_for", lambda q: cuda_backend)
    monkeypatch.setattr(cpu_backend, "forward", emulated_ops.forward)
    monkeypatch.setattr(cpu_backend, "backward", emulated_ops.backward)


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
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_kernels_match_reference(name, emulated_cuda_backend):
    case, dtype = CASES[name]
    check_case(case, dtype, "cuda")


def test_unaligned_rows_take_element_copies(emulated_ops):
    """Row strides that are not a multiple of 8 elements (and an odd base offset) switch the tile loads from
    cp.async to element copies; the forward is bit-identical to the aligned run."""
    from fused_pos_attn.positions import ResolvedPosition
    from fused_pos_attn.spec import AttentionSpec
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 67, generator=gen).half()[..., 1:65] for n in (30, 50, 50))
    offsets = torch.zeros(1, dtype=torch.int64)
    spec = AttentionSpec(causal=True, scale=0.125, window=None, q_offset=offsets + 20, k_offset=offsets,
                         position=ResolvedPosition("alibi", slopes=torch.full((1, 2), 0.25)))
    unaligned = emulated_ops.forward(q, k, v, spec)
    aligned = emulated_ops.forward(q.contiguous(), k.contiguous(), v.contiguous(), spec)
    assert q.stride(2) % 8 and all(torch.equal(a, b) for a, b in zip(unaligned, aligned))
