"""64-bit addressing in the Triton kernels: a KV cache past 4 GiB.

A (B, N, H, D) fp16 cache with H * D = 8192 viewed as (B, H, N, D) puts row 262144 at element offset 2^31:
row * stride_n overflows int32 there. The check allocates such a cache with torch.empty (pages never touched
stay unallocated, so it costs a few MiB), writes only the rows it uses, and runs forward and backward of a
small-window query at the cache's end (keys past row 262144) against the dense fp64 reference on the
touched slice. The queries and dO are rows 0, 65536, ..., 262144 of the same storage, so their row offsets
reach 2^31 too. With int32 offsets the interpreter reads outside the cache and crashes (a segmentation
fault), so the check runs in a subprocess and the test reports its exit status and output.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

NUM_ROWS = 262144 + 64  # cache rows: (NUM_ROWS - 1) * 8192 elements * 2 bytes > 4 GiB
HEADS, HEAD_DIM = 512, 16  # H * D = 8192 elements per row
WINDOW, TOUCHED = 24, 32  # the queries see the last WINDOW + 4 keys; the last TOUCHED rows are written
ROW_STEP = 65536  # query rows 0, 65536, ..., 262144 of the storage


def _large_cache_check() -> None:
    """Forward and backward on the > 4 GiB cache views against the reference; raises AssertionError."""
    import triton

    from fused_pos_attn import RoPE, fused_attention
    from fused_pos_attn.backends import triton_backend
    from fused_pos_attn.spec import AttentionSpec
    from fused_pos_attn.triton_kernels import launch
    from tolerance import assert_close_to_reference

    # Wide key blocks: the dK/dV kernel runs a program per key block of the whole cache, one per 16 rows with
    # the default interpreter tile would take minutes in numpy; the addressing under test is the same.
    launch.INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 1024})

    gen = torch.Generator().manual_seed(0)
    cache = torch.empty(1, NUM_ROWS, HEADS, HEAD_DIM, dtype=torch.float16)
    cache[:, -TOUCHED:, :2] = torch.randn(1, TOUCHED, 2, HEAD_DIM, generator=gen).half()
    cache[:, ::ROW_STEP, 2:6] = torch.randn(1, len(range(0, NUM_ROWS, ROW_STEP)), 4, HEAD_DIM, generator=gen).half()
    k, v = cache[:, :, 0:1].transpose(1, 2), cache[:, :, 1:2].transpose(1, 2)  # (1, 1, NUM_ROWS, D), GQA below
    q, grad_out = cache[:, ::ROW_STEP, 2:4].transpose(1, 2), cache[:, ::ROW_STEP, 4:6].transpose(1, 2)  # (1, 2, 5, D)
    assert k.stride(2) * (NUM_ROWS - 1) >= 2 ** 31 and q.stride(2) * (q.shape[2] - 1) >= 2 ** 31
    seq_q = q.shape[2]
    q_offset, k_offset = NUM_ROWS - seq_q, NUM_ROWS - TOUCHED  # queries at the cache's last positions
    grad_lse = torch.randn(1, 2, seq_q, generator=gen)

    position = RoPE().resolve(1, 2, HEAD_DIM, NUM_ROWS, torch.device("cpu"), causal=True)
    spec = AttentionSpec(causal=True, scale=HEAD_DIM ** -0.5, window=WINDOW,
                         q_offset=torch.tensor([q_offset]), k_offset=torch.tensor([0]), position=position)
    out, lse = triton_backend.forward(q, k, v, spec)
    dq, dk, dv, _ = triton_backend.backward(grad_out, grad_lse, q, k, v, out, lse, spec, False)
    assert dk[:, :, :-TOUCHED].abs().max() == 0 and dv[:, :, :-TOUCHED].abs().max() == 0  # keys no query sees

    def reference(dtype):
        leaves = [t.detach().to(dtype).contiguous().requires_grad_() for t in
                  (q, k[:, :, -TOUCHED:], v[:, :, -TOUCHED:])]
        ref_out, ref_lse = fused_attention(*leaves, RoPE(), causal=True, window=WINDOW, q_offset=q_offset,
                                           k_offset=k_offset, return_lse=True, backend="reference")
        torch.autograd.backward((ref_out, ref_lse), (grad_out.to(dtype), grad_lse.to(ref_lse.dtype)))
        return ref_out, ref_lse, *(t.grad for t in leaves)

    ref64, same = reference(torch.float64), reference(torch.float16)
    got = (out, lse, dq, dk[:, :, -TOUCHED:], dv[:, :, -TOUCHED:])
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        assert_close_to_reference(got[i], ref64[i], same[i], 2.0 if i < 2 else 3.0, name, torch.float16)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kv_cache_past_4_gib_forward_and_backward():
    """Under the interpreter on CPU tensors, also on a machine with a GPU."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"exit status {result.returncode} (-11: segmentation fault)\n"
                                    f"{result.stdout[-3000:]}{result.stderr[-3000:]}")


if __name__ == "__main__":
    _large_cache_check()
