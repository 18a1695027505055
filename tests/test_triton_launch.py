"""The Triton launchers' plumbing: every kernel parameter gets exactly one value, by name, from the one
argument builder; launches happen under q's CUDA device; autotuning trial launches leave no trace in the
results (the bucket-table gradient's partial rows included).

Runs under TRITON_INTERPRET=1 without CUDA (tests/conftest.py); the shapes are tiny.
"""
import contextlib

import pytest
import torch

triton = pytest.importorskip("triton")

from fused_pos_attn import ALiBi, RelativeBias, RoPE  # noqa: E402
from fused_pos_attn.backends import triton_backend  # noqa: E402
from fused_pos_attn.positions import as_position_scheme  # noqa: E402
from fused_pos_attn.spec import AttentionSpec  # noqa: E402
from fused_pos_attn.triton_kernels import launch  # noqa: E402
from fused_pos_attn.triton_kernels.scheme_codes import SCHEME_CODES  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS = (launch._attn_fwd_kernel, launch._attn_bwd_preprocess_kernel, launch._attn_bwd_dkdv_kernel,
           launch._attn_bwd_dq_kernel)
LAUNCH_OPTIONS = set(triton.Config({}).all_kwargs())  # num_warps, num_stages, ...: a config's, not parameters


def _spec(pos, batch=2, heads=4, seq_q=9, seq_k=21, head_dim=16, causal=True, window=None) -> AttentionSpec:
    offsets = torch.arange(batch, dtype=torch.int64, device=DEVICE) * 3
    position = pos.resolve(batch, heads, head_dim, seq_k, DEVICE, causal=causal)
    return AttentionSpec(causal=causal, scale=head_dim ** -0.5, window=window, q_offset=offsets + seq_k - seq_q,
                         k_offset=offsets, position=position)


def _inputs(batch=2, heads=4, kv_heads=2, seq_q=9, seq_k=21, head_dim=16, seed=0):
    """q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) views of (B, Nk, Hkv, D) tensors, grad_out like q, grad_lse."""
    gen = torch.Generator().manual_seed(seed)
    q, grad_out = (torch.randn(batch, heads, seq_q, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(batch, seq_k, kv_heads, head_dim, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(2))
    return q, k, v, grad_out, torch.randn(batch, heads, seq_q, generator=gen).to(DEVICE)


def _relative(num_buckets=16, max_distance=12, heads=4) -> RelativeBias:
    return RelativeBias(torch.randn(heads, num_buckets, generator=torch.Generator().manual_seed(7)).to(DEVICE),
                        max_distance)


class _Recorder:
    """Stands in for a kernel in launch.py: records each launch's keyword arguments, then launches the kernel."""

    def __init__(self, kernel, launches: list, check=None):
        self.kernel, self.launches, self.check = kernel, launches, check
        self.arg_names, self.__name__ = kernel.arg_names, kernel.__name__

    def __getitem__(self, grid):
        def launch_with(**kwargs):
            if self.check is not None:
                self.check(self.kernel)
            self.launches.append((self.kernel, kwargs))
            return self.kernel[grid](**kwargs)
        return launch_with


def _record_launches(monkeypatch, check=None) -> list:
    launches = []
    for kernel in KERNELS:
        monkeypatch.setattr(launch, kernel.__name__, _Recorder(kernel, launches, check))
    return launches


def _run_forward_backward(spec, grad_lse=True, rel_grad=True, seq_q=9, seq_k=21):
    """The Triton backend's backward (dq, dk, dv, d_table) after its forward, on _inputs of these lengths."""
    q, k, v, grad_out, dlse = _inputs(seq_q=seq_q, seq_k=seq_k)
    out, lse = triton_backend.forward(q, k, v, spec)
    return triton_backend.backward(grad_out, dlse if grad_lse else None, q, k, v, out, lse, spec, rel_grad)


def _call(name: str):
    """(position scheme, AttentionSpec options) of a named test call."""
    return {"none": (as_position_scheme("none"), {}), "alibi_window": (ALiBi(), dict(window=5)),
            "rope_partial": (RoPE(rotary_dim=8), dict(causal=False)), "relative": (_relative(), {})}[name]


# The tensor each stride prefix names, and the dims its strides are named by.
STRIDED = {"q": ("Q", "bhnd"), "k": ("K", "bhnd"), "v": ("V", "bhnd"), "o": ("Out", "bhnd"),
           "do": ("DOut", "bhnd"), "dq": ("DQ", "bhnd"), "dk": ("DK", "bhnd"), "dv": ("DV", "bhnd"),
           "s": ("Slopes", "bh"), "r": ("RelBias", "h")}


@pytest.mark.parametrize("call", ["none", "alibi_window", "rope_partial", "relative"])
def test_every_kernel_parameter_gets_exactly_one_value(monkeypatch, call):
    """Each launch passes each kernel parameter once, by name (launch options aside), and the values are the
    ones their names say: tensors by identity, strides of the tensor their prefix names, the scheme's code."""
    scheme, options = _call(call)
    spec = _spec(scheme, **options)
    launches = _record_launches(monkeypatch)
    _run_forward_backward(spec)
    assert {kernel for kernel, _ in launches} == set(KERNELS)
    for kernel, kwargs in launches:
        params = set(kernel.arg_names)
        assert params <= set(kwargs), f"{kernel.__name__}: no value for {params - set(kwargs)}"
        assert set(kwargs) - params <= LAUNCH_OPTIONS, f"{kernel.__name__}: extra {set(kwargs) - params}"
        for name in (p for p in params if p.startswith("stride_")):
            tensor, dims = STRIDED[name[len("stride_"):-1]]
            assert kwargs[name] == kwargs[tensor].stride(dims.index(name[-1])), (kernel.__name__, name)
        if "POS" in params:
            assert kwargs["POS"] == SCHEME_CODES[spec.position.kind]
            assert kwargs["QOffset"] is spec.q_offset and kwargs["KOffset"] is spec.k_offset
            assert kwargs["CAUSAL"] == spec.causal and kwargs["HAS_WINDOW"] == (spec.window is not None)
        if spec.position.kind == "relative":
            for name, tensor in (("RelBias", spec.position.rel_bias), ("RelBuckets", spec.position.rel_buckets)):
                assert kwargs.get(name, tensor) is tensor, (kernel.__name__, name)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_builder_names_every_parameter(kernel):
    """kernel_arguments returns exactly the kernel's parameters but the config's BLOCK_M / BLOCK_N."""
    q, k, v, grad_out, dlse = _inputs()
    spec = _spec(_relative())
    call = triton_backend._kernel_call(spec)
    tensors = dict(Q=q, K=k, V=v, Out=q, Lse=dlse, DOut=grad_out, Delta=dlse, DQ=q, DK=k, DV=v, DLse=dlse,
                   DRelTable=torch.zeros(2, 2, 4, 16, device=DEVICE))
    kwargs = launch.kernel_arguments(kernel, call, **tensors)
    assert set(kwargs) == set(kernel.arg_names) - set(launch.TUNED)
    assert kwargs.get("REL_GRAD", True) and kwargs.get("HAS_DLSE", True)


def test_builder_refuses_a_parameter_it_has_no_value_for():
    @triton.jit
    def _kernel(Q, stride_qn, new_scalar, BLOCK_M: triton.language.constexpr):
        pass

    q, k, *_ = _inputs()
    with pytest.raises(TypeError, match=r"_kernel's parameters \['new_scalar'\]"):
        launch.kernel_arguments(_kernel, triton_backend._kernel_call(_spec(_relative())), Q=q, K=k)


def test_flags_off_means_placeholders_and_no_table_work(monkeypatch):
    """Without grad_lse and rel_grad the kernels get HAS_DLSE / REL_GRAD False and never see a real buffer."""
    launches = _record_launches(monkeypatch)
    dq, dk, dv, d_table = _run_forward_backward(_spec(_relative()), grad_lse=False, rel_grad=False)
    assert d_table is None
    for kernel, kwargs in launches:
        assert not kwargs.get("HAS_DLSE", False) and not kwargs.get("REL_GRAD", False), kernel.__name__
        for buffer in ("DLse", "DRelTable"):
            assert kwargs.get(buffer, torch.zeros(1)).numel() == 1, (kernel.__name__, buffer)


def test_packed_call_arguments_and_grids(monkeypatch):
    """A packed spec turns VARLEN on in every kernel, with the spec's cu_seqlens (by identity) and max_seqlen; the
    grids, the relative table's partial rows and the autotune length buckets follow the longest sequence and the
    sequence count, while seq_len_q / seq_len_k are the packed totals. A dense call passes VARLEN off and int64
    placeholders for cu_seqlens."""
    grids = []

    class GridRecorder(_Recorder):
        def __getitem__(self, grid):
            grids.append((self.kernel, grid))
            return super().__getitem__(grid)

    launches = []
    for kernel in KERNELS:
        monkeypatch.setattr(launch, kernel.__name__, GridRecorder(kernel, launches))
    lengths_q, lengths_k = [3, 0, 20], [5, 7, 1]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], device=DEVICE) for n in (lengths_q, lengths_k))
    q, grad_out = (torch.randn(1, 4, 23, 16, device=DEVICE) for _ in range(2))
    k, v = (torch.randn(1, 2, 13, 16, device=DEVICE) for _ in range(2))
    dense = _spec(_relative(), batch=3)
    spec = AttentionSpec(causal=True, scale=0.25, window=None, q_offset=dense.q_offset, k_offset=dense.k_offset,
                         position=dense.position, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20, max_seqlen_k=7)
    out, lse = triton_backend.forward(q, k, v, spec)
    triton_backend.backward(grad_out, None, q, k, v, out, lse, spec, True)
    assert lse.shape == (1, 4, 23)
    block = launch.INTERPRETER_CONFIG.kwargs["BLOCK_M"] if DEVICE.type == "cpu" else None
    for kernel, kwargs in launches:
        assert kwargs["VARLEN"] is True and kwargs["CuSeqlensQ"] is cu_q, kernel.__name__
        assert kwargs["seq_len_q"] == 23 and kwargs["max_seqlen_q"] == 20, kernel.__name__
        if "CuSeqlensK" in kwargs:
            assert kwargs["CuSeqlensK"] is cu_k and kwargs["seq_len_k"] == 13 and kwargs["max_seqlen_k"] == 7
            assert kwargs["len_bucket_q"] == 32 and kwargs["len_bucket_k"] == 8
        if kernel is launch._attn_bwd_dkdv_kernel:
            assert kwargs["DRelTable"].shape[1:] == (3, 4, 16)
    if block is not None:  # the interpreter's one config: grids as (blocks of the longest sequence, S * heads)
        preprocess_block = launch.PREPROCESS_CONFIG.kwargs["BLOCK_M"]
        assert [(kernel.__name__, grid) for kernel, grid in grids] == [
            ("_attn_fwd_kernel", (triton.cdiv(20, block), 3 * 4, 1)),  # no key split: 20 query rows
            ("_attn_bwd_preprocess_kernel", (triton.cdiv(20, preprocess_block), 3 * 4)),
            ("_attn_bwd_dkdv_kernel", (triton.cdiv(7, block), 3 * 2)),
            ("_attn_bwd_dq_kernel", (triton.cdiv(20, block), 3 * 4))]
    assert "VARLEN" in launch._TUNE_KEY

    launches.clear()
    _run_forward_backward(_spec(_relative()))
    for kernel, kwargs in launches:
        assert kwargs["VARLEN"] is False and kwargs["CuSeqlensQ"].dtype == torch.int64, kernel.__name__
        assert kwargs["CuSeqlensQ"].numel() == 1 and kwargs["max_seqlen_q"] == kwargs["seq_len_q"], kernel.__name__


# ------------------------------------------------------------------------------------------------ CUDA device

def test_device_context_is_q_device_for_cuda_and_nothing_for_cpu():
    guard = launch._device_context(torch.device("cuda", 1))  # built without touching CUDA
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch._device_context(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_inside_q_device_context(monkeypatch):
    """attention_forward / attention_backward enter the device context of q's device before any kernel launch."""
    entered = []

    @contextlib.contextmanager
    def recording_context(device):
        entered.append(device)
        yield
        entered.append(None)

    def inside_context(kernel):
        assert entered and entered[-1] is not None, f"{kernel.__name__} launched outside the device context"

    monkeypatch.setattr(launch, "_device_context", recording_context)
    launches = _record_launches(monkeypatch, check=inside_context)
    _run_forward_backward(_spec(_relative()))
    assert len(launches) == 4 and entered == [DEVICE, None] * 2


# ------------------------------------------------------------------------------------------------- autotuning

def test_autotune_trial_launches_leave_no_trace(monkeypatch):
    """Autotuned launches (two configs, the second chosen) give bit-for-bit what one launch of the chosen
    config gives: trial launches add nothing to any output, the bucket-table gradient's partial buffer (whose
    rows depend on BLOCK_N) included. The autotuner is Triton's own; only its timer is replaced (it runs the
    kernel twice per config, as warm-up and measurement do) and the config lists are two tiny tiles."""
    small, chosen = (triton.Config({"BLOCK_M": 16, "BLOCK_N": n}, num_warps=4, num_stages=1) for n in (16, 32))

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        fake_bench.time -= 1.0  # each config measured is faster than the previous: the last one wins
        return [fake_bench.time] * 3
    fake_bench.time = 100.0

    lengths = dict(seq_q=37, seq_k=45)
    spec = _spec(_relative(), **lengths)
    real_configs, real_autotune = launch._configs, triton.autotune
    monkeypatch.setattr(launch, "INTERPRETER_CONFIG", chosen)
    expected = _run_forward_backward(spec, **lengths)
    monkeypatch.setattr(launch, "_configs", lambda kernel, block_d, pos, decode_block_m=None: real_configs(
        kernel, block_d, pos, decode_block_m) if kernel is launch._attn_bwd_preprocess_kernel else [small, chosen])
    monkeypatch.setattr(triton, "autotune", lambda *args, **kwargs: real_autotune(*args, do_bench=fake_bench, **kwargs))
    launch._autotuned.cache_clear()
    try:
        tuned = _run_forward_backward(spec, **lengths)
        assert launch._autotuned(launch._attn_bwd_dkdv_kernel, 16, "relative", None).best_config is chosen
    finally:
        launch._autotuned.cache_clear()
    for name, got, want in zip(("dq", "dk", "dv", "d_table"), tuned, expected):
        assert torch.equal(got, want), name


# ------------------------------------------------------------------------------------------------ interpreter

@triton.jit
def _loop_sum_kernel(Bounds, Out, BLOCK: triton.language.constexpr):
    """Out[0] = sum of i over range(lo, hi, BLOCK) with runtime bounds (Bounds = [lo, hi]), like every kernel's
    key / query block loop."""
    total = 0
    for i in range(triton.language.load(Bounds), triton.language.load(Bounds + 1), BLOCK):
        total += i
    triton.language.store(Out, total)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_runtime_loop_bounds_run_under_the_interpreter():
    """Triton 3.6's interpreter with NumPy >= 2.4 rejects tensor loop bounds (triton-lang/triton#9171);
    fix_loop_bounds (applied by the launchers) makes them work there and changes nothing elsewhere."""
    from fused_pos_attn.triton_kernels.interpreter_compat import fix_loop_bounds
    fix_loop_bounds()
    out = torch.zeros(1, dtype=torch.int32)
    _loop_sum_kernel[(1,)](torch.tensor([3, 40], dtype=torch.int32), out, BLOCK=16)
    assert out.item() == 3 + 19 + 35
