"""backend="auto" on CUDA tensors, on CPU: a stand-in q that claims to be a CUDA tensor drives the selection
logic without a GPU."""
import sys
from types import SimpleNamespace

import pytest
import torch

from fused_pos_attn import backends
from fused_pos_attn.backends import cuda_backend


def _cuda_like_q(dtype=torch.float16, head_dim=64):
    return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 2, 8, head_dim), device=torch.device("cuda", 0))


def test_auto_without_triton_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.setattr(cuda_backend, "built_with_cuda", lambda: False)
    with pytest.raises(ImportError, match=r"backend='auto' on CUDA tensors needs Triton.*pip install 'triton>=3.6'"):
        backends.select("auto", _cuda_like_q())


def test_auto_without_triton_uses_built_cuda_kernels_when_they_cover_the_call(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(cuda_backend, "built_with_cuda", lambda: True)
    assert backends.select("auto", _cuda_like_q()) is cuda_backend
    with pytest.raises(ImportError, match=r"head dim in \(64, 128\) only; got torch.float32, head dim 80"):
        backends.select("auto", _cuda_like_q(torch.float32, 80))
