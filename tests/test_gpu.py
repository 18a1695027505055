"""Both GPU kernel backends, backend="triton" and backend="cuda" (the CUDA C++ kernels), against the dense fp64
reference with tests/tolerance.py's rule, at the shapes and uses a GPU run meets first. Marker `gpu`: skipped
without CUDA; `make gpu-check` runs them (with `pytest -m gpu`).

Covered: forward and backward of every scheme (relative with its table's gradient) at N = 1k-4k in fp16 and
bf16, D 64 and 128 (and D 80 for Triton, whose tiles pad it); partial interleaved RoPE and YaRN; causal with a
window under GQA; non-causal under MQA; the gradient of the returned lse, with rows that see no key; N = 16384
forward + backward in bounded extra memory; CUDA graph capture of a forward and of a training step; torch.compile
(Inductor with CUDA graphs) of a training step; bitwise-deterministic relative table gradients.

Compile budget (estimated: 2-3 minutes on an H100 with make gpu-check's xdist workers). On a GPU
every new Triton specialization compiles each autotune config of the kernels it launches (forward 2-3, dK/dV
1-2, dQ 3; ~2 s each), and Triton specializes on the dtype, the constexprs (head dim, scheme, rotary layout,
causal, window) and on every int argument's divisibility by 16 and equality to 1: the head count, the GQA group,
N. So the large cases share one shape family with bench/gpu_bench.py (MHA, 16 heads, N a multiple of 16, causal,
no window), and Triton runs ALiBi and RoPE at every (dtype, D) but none and relative only at TRITON_FULL: about
21 Triton specializations (~150 compiles; the 16k memory test's are shared with test_no_dense_buffers.py), the
benchmark's reused from Triton's disk cache. The CUDA C++ kernels compile at install time, so their matrix is
complete.
"""
import gc
from dataclasses import replace
from typing import Callable

import pytest
import torch

from fused_pos_attn import RelativeBias, RoPE, YaRN, fused_attention
from fused_pos_attn.benchmarking import peak_memory_since, start_peak_memory
from test_attention_backends import Case, RelativeTable, make_input, position_for
from tolerance import assert_close_to_reference

pytestmark = pytest.mark.gpu


def _cuda_kernels_built() -> bool:
    try:
        from fused_pos_attn.backends import cuda_backend
        return cuda_backend.built_with_cuda()
    except (ImportError, RuntimeError):
        return False


try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_kernels_built(),
                                                     reason="the extension was built without the CUDA C++ kernels"))
BACKENDS = [TRITON, CUDA]

SCHEMES = {"none": "none", "alibi": "alibi", "rope": "rope",
           "rope_yarn": RoPE(scaling=YaRN(4.0, original_max_len=1024)),
           "rope_partial_interleaved": RoPE(rotary_dim=64, interleaved=True),
           "relative": RelativeTable(num_buckets=32, max_distance=128)}  # T5's defaults
HEADS = 16  # divisible by 16, as bench/gpu_bench.py's 2048 / D heads: one Triton specialization for both
LARGE_SEQ = {(torch.float16, 64): 2048, (torch.float16, 128): 1024, (torch.bfloat16, 64): 1024,
             (torch.bfloat16, 128): 2048}
TRITON_FULL = {(torch.float16, 64), (torch.bfloat16, 128)}  # where Triton also runs "none" and "relative"
OUTPUT_NAMES = ("out", "lse", "dq", "dk", "dv", "d_table")


@pytest.fixture(autouse=True)
def _release_cached_memory():
    """Return each test's cached blocks to the driver: under xdist every worker holds a CUDA context, and the
    fp64 references of the large cases cache several GiB each."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def causal_case(scheme: str, head_dim: int, seq: int, heads_kv: int = HEADS, **kwargs) -> Case:
    """Causal self-attention with HEADS query heads and 2048 // seq (at least 1) batch rows."""
    return Case(batch=max(1, 2048 // seq), heads_q=HEADS, heads_kv=heads_kv, seq_q=seq, seq_k=seq,
                head_dim=head_dim, pos=SCHEMES[scheme], kwargs=dict(causal=True, **kwargs))


def run_with_grads(inputs: tuple, case: Case, backend: str, dtype: torch.dtype, lse_grad: bool) -> tuple:
    """(out, lse, dq, dk, dv[, d_table]) of fused_attention on inputs (q, k, v, grad_out, grad_lse) cast to dtype;
    the backward seeds out with grad_out and, when lse_grad, lse with grad_lse (B, Hq, Nq)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs[:3]]
    pos = position_for(case.pos, case.heads_q)
    if isinstance(pos, RelativeBias):
        leaves.append(pos.table)
    out, lse = fused_attention(*leaves[:3], pos, return_lse=True, backend=backend, **case.kwargs)
    grad_out, grad_lse = inputs[3], inputs[4]
    seeded = [(out, grad_out.to(out.dtype))] + ([(lse, grad_lse.to(lse.dtype))] if lse_grad else [])
    torch.autograd.backward([t for t, _ in seeded], [g for _, g in seeded])
    return (out, lse, *(t.grad for t in leaves))


def check_against_reference(case: Case, dtype: torch.dtype, backend: str, lse_grad: bool = False, seed: int = 0,
                            device: str = "cuda") -> None:
    """Outputs and gradients of `backend` within tolerance.py's bound of the fp64 reference, the bound set by
    the same-dtype reference's error (2x for out / lse, 3x for gradients)."""
    gen = torch.Generator().manual_seed(seed)
    q = make_input((case.batch, case.heads_q, case.seq_q, case.head_dim), dtype, case.layout, gen, device)
    k, v = (make_input((case.batch, case.heads_kv, case.seq_k, case.head_dim), dtype, case.layout, gen, device)
            for _ in range(2))
    grads = (torch.randn(q.shape, generator=gen).to(device), torch.randn(q.shape[:3], generator=gen).to(device))
    inputs = (q, k, v, *grads)
    fused = run_with_grads(inputs, case, backend, dtype, lse_grad)
    ref64 = run_with_grads(inputs, case, "reference", torch.float64, lse_grad)
    same = run_with_grads(inputs, case, "reference", dtype, lse_grad)
    for i, name in enumerate(OUTPUT_NAMES[:len(fused)]):
        assert_close_to_reference(fused[i], ref64[i], same[i], 2.0 if i < 2 else 3.0,
                                  f"{name} backend={backend} {case}", dtype)


def large_cases() -> list:
    cases = []
    for backend in BACKENDS:
        for (dtype, head_dim), seq in LARGE_SEQ.items():
            for scheme in ("none", "alibi", "rope", "relative"):
                if backend.values[0] == "triton" and scheme in ("none", "relative") and (dtype, head_dim) not in \
                        TRITON_FULL:
                    continue
                cases.append(pytest.param(backend.values[0], dtype, head_dim, scheme, seq, marks=backend.marks,
                                          id=f"{backend.values[0]}-{str(dtype)[6:]}-D{head_dim}-{scheme}-N{seq}"))
    return cases


@pytest.mark.parametrize("backend, dtype, head_dim, scheme, seq", large_cases())
def test_schemes_at_large_shapes(backend, dtype, head_dim, scheme, seq):
    """N = 1k / 2k: many key blocks per row (the online softmax's rescaling, causal block skipping), ALiBi
    biases of several hundred, RoPE angles past 1000 radians; the relative table's gradient from every block."""
    check_against_reference(causal_case(scheme, head_dim, seq), dtype, backend)


@pytest.mark.parametrize("scheme", ["alibi", "rope"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence(backend, scheme):
    """N = 4096, bf16, D = 64 (one batch row: the fp64 reference holds 2 GiB per score-sized tensor)."""
    check_against_reference(causal_case(scheme, 64, 4096), torch.bfloat16, backend)


@pytest.mark.parametrize("scheme", ["rope_partial_interleaved", "rope_yarn"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_variants(backend, scheme):
    """GPT-J style interleaved pairs on half of D = 128 (the other half passes through), and YaRN's scaled
    frequencies and attention factor at positions past its original length."""
    check_against_reference(causal_case(scheme, 128, 2048), torch.bfloat16, backend)


@pytest.mark.parametrize("scheme", ["alibi", "rope"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_window_with_grouped_query_heads(backend, scheme):
    """Causal with a 256-key window: key blocks skipped on both sides; 4 query heads per K/V head."""
    check_against_reference(causal_case(scheme, 64, 2048, heads_kv=4, window=256), torch.float16, backend)


@pytest.mark.parametrize("scheme", ["none", "relative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_causal_single_kv_head(backend, scheme):
    """Non-causal (bidirectional T5 buckets) with one K/V head for all 16 query heads."""
    case = replace(causal_case(scheme, 128, 1024, heads_kv=1), kwargs=dict(causal=False))
    check_against_reference(case, torch.float16, backend)


@pytest.mark.parametrize("scheme", ["alibi", "rope"])
def test_odd_head_dim_triton(scheme):
    """D = 80: Triton pads the tiles to 128 columns and masks the rest (the CUDA C++ kernels take 64 and 128)."""
    check_against_reference(causal_case(scheme, 80, 1024), torch.bfloat16, "triton")


@pytest.mark.parametrize("scheme", ["alibi", "rope"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient(backend, scheme):
    """A gradient through the returned lse enters the backward (delta = rowsum(dO * O) - dLSE). Nq = Nk + 16
    with causal bottom-right alignment leaves the first 16 rows without a visible key: their dLSE must not
    matter (no NaN, zero gradients from them)."""
    case = replace(causal_case(scheme, 64, 1024), seq_q=1040)
    check_against_reference(case, torch.float16, backend, lse_grad=True)


def extra_peak_bytes(backend: str, pos: str, seq: int = 16384, heads: int = 8, head_dim: int = 64) -> float:
    """Peak bytes one fp16 causal forward + backward allocates beyond out, dq, dk and dv, after a warmup call."""
    q, k, v = (torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def forward_backward() -> None:
        fused_attention(q, k, v, pos, causal=True, backend=backend).backward(grad)
        for t in (q, k, v):
            t.grad = None

    forward_backward()  # autotuning, lazily built tables
    base = start_peak_memory("cuda")
    fused_attention(q, k, v, pos, causal=True, backend=backend).backward(grad)
    return peak_memory_since("cuda", base) - 4 * q.numel() * q.element_size()


@pytest.mark.parametrize("pos", ["alibi", "rope"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_peak_memory_at_16k(backend, pos):
    """N = 16384, B = 1, H = 8, D = 64: nothing of size N x N (a dense fp32 bias alone would be 8 GiB); the
    CUDA C++ dQ accumulator (fp32, 32 MiB) fits the 64 MiB allowance."""
    extra = extra_peak_bytes(backend, pos)
    assert extra < 64 * 2 ** 20, f"extra peak memory {extra / 2 ** 20:.1f} MiB (backend={backend}, pos={pos})"


def capture_graph(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm fn up on a side stream (autotuning, cached tables), then capture one call into a CUDA graph.
    Returns the graph and fn's outputs, which each replay rewrites."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


@pytest.mark.parametrize("scheme", ["none", "alibi", "rope", "rope_yarn", "relative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_of_forward(backend, scheme):
    """A forward captured in a CUDA graph (no host sync, no host-to-device copy per call), replayed on new
    inputs, equals an eager call on them bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    pos = SCHEMES[scheme]
    if isinstance(pos, RelativeTable):
        pos = RelativeBias(torch.randn(HEADS, pos.num_buckets, device="cuda", generator=gen), pos.max_distance)

    def forward() -> tuple:
        return fused_attention(q, k, v, pos, causal=True, return_lse=True, backend=backend)

    with torch.no_grad():
        graph, (out, lse) = capture_graph(forward)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device="cuda", dtype=t.dtype, generator=gen))
        graph.replay()
        expected_out, expected_lse = forward()
    torch.cuda.synchronize()
    assert torch.equal(out, expected_out), f"replayed out differs by {(out - expected_out).abs().max().item():.3e}"
    assert torch.equal(lse, expected_lse), f"replayed lse differs by {(lse - expected_lse).abs().max().item():.3e}"


@pytest.mark.parametrize("scheme", ["alibi", "rope", "relative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_of_training_step(backend, scheme):
    """Forward and backward (dq, dk, dv and the relative table's gradient) captured in one CUDA graph, replayed on
    new inputs, equal an eager step on them bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, HEADS, 1024, 64, device="cuda", dtype=torch.float16, generator=gen)
                         for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    pos = SCHEMES[scheme]
    if isinstance(pos, RelativeTable):
        table = torch.randn(HEADS, pos.num_buckets, device="cuda", generator=gen, requires_grad=True)
        pos, leaves = RelativeBias(table, pos.max_distance), leaves + [table]

    def step() -> tuple:
        out = fused_attention(q, k, v, pos, causal=True, backend=backend)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    graph, outputs = capture_graph(step)
    with torch.no_grad():
        for t in (q, k, v, grad_out):
            t.copy_(torch.randn(t.shape, device="cuda", dtype=t.dtype, generator=gen))
    graph.replay()
    expected = step()
    torch.cuda.synchronize()
    for name, got, want in zip(("out", "dq", "dk", "dv", "d_table"), outputs, expected):
        assert torch.equal(got, want), f"replayed {name} differs by {(got - want).abs().max().item():.3e}"


@pytest.mark.parametrize("scheme", ["alibi", "rope_partial_interleaved", "relative"])
def test_torch_compile_training_step_on_cuda(scheme):
    """torch.compile(fullgraph=True, mode="reduce-overhead": Inductor with CUDA graphs) of a forward + backward
    through the Triton kernels equals the eager step."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=gen,
                           requires_grad=True) for _ in range(3))
    pos, leaves = SCHEMES[scheme], [q, k, v]
    if isinstance(pos, RelativeTable):
        table = torch.randn(HEADS, pos.num_buckets, device="cuda", generator=gen, requires_grad=True)
        pos, leaves = RelativeBias(table, pos.max_distance), leaves + [table]

    def forward(q, k, v):
        return fused_attention(q, k, v, pos, causal=True, return_lse=True)

    def step(attention) -> list:
        out, lse = attention(q, k, v)
        grads = torch.autograd.grad((out.float() ** 2).sum() + lse.sum(), leaves)
        return [t.detach().clone() for t in (out, lse, *grads)]  # CUDA-graph outputs are rewritten by later runs

    compiled = torch.compile(forward, fullgraph=True, mode="reduce-overhead")  # backward compiled by AOTAutograd
    for _ in range(3):  # warm-up runs, then a run from the recorded CUDA graphs
        got = step(compiled)
    expected = step(forward)
    for name, got_value, want in zip(("out", "lse", "dq", "dk", "dv", "d_table"), got, expected):
        torch.testing.assert_close(got_value, want, rtol=1e-5, atol=1e-5, msg=name)


def relative_table_gradient(backend: str, seed: int = 0) -> torch.Tensor:
    """d_table of one fp16 causal forward + backward with T5's 32 buckets, max distance 128, N = 2048."""
    case = causal_case("relative", 64, 2048)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (make_input((case.batch, HEADS, case.seq_q, 64), torch.float16, "contiguous", gen, "cuda")
                         for _ in range(4))
    return run_with_grads((q, k, v, grad_out, None), case, backend, torch.float16, lse_grad=False)[5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_table_gradient_is_deterministic(backend):
    """Two identical calls give bitwise equal table gradients: no floating-point atomics whose order varies."""
    first, second = relative_table_gradient(backend), relative_table_gradient(backend)
    assert torch.equal(first, second), f"table gradients differ by {(first - second).abs().max().item():.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["alibi", "rope", "relative"])
@pytest.mark.parametrize("seq_q", [1, 4])
def test_split_kv_decode_at_serving_shapes(scheme, seq_q, backend):
    """Decode steps through the split-KV forwards (Triton's launch.decode_plan, CUDA C++'s launch.h decode_plan:
    GQA groups of 4 heads per program / block, keys split across the SMs, partials merged): Nq 1 and 4 over 8192
    keys, Hq 32 / Hkv 8, D 128, bf16; forward and backward against the fp64 reference."""
    case = Case(batch=2, heads_q=32, heads_kv=8, seq_q=seq_q, seq_k=8192, head_dim=128, pos=SCHEMES[scheme],
                kwargs=dict(causal=True))
    check_against_reference(case, torch.bfloat16, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [16, 256])
def test_paged_kvcache_decode(page_size, backend):
    """fused_attention_with_kvcache on the GPU: pages of 16 and 256 rows, rows of 1000 and 7000 cached tokens, 2
    new tokens written in place; RoPE, bf16; against the reference row by row (tests/test_kvcache.py's oracle)."""
    from test_kvcache import _check, _inputs, _paged
    q, k_cache, v_cache, k_new, v_new = _inputs(2, 2, (32, 8), 8192, head_dim=128, dtype=torch.bfloat16,
                                                device="cuda")
    num_pages = 2 * 8192 // page_size + 3
    (k_pages, block_table), (v_pages, _) = _paged(k_cache, page_size, num_pages), _paged(v_cache, page_size,
                                                                                          num_pages)
    _check(q, k_pages, v_pages, [1000, 7000], RoPE(), backend, block_table=block_table, k_new=k_new, v_new=v_new)
