"""The kernel backends a CPU-or-GPU test runs on: Triton (through the interpreter without CUDA, set by
conftest.py) and the native CPU kernels. Import `backend` (a parametrized fixture) and `device_of`."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))


@pytest.fixture(params=[TRITON, "cpu"])
def backend(request) -> str:
    return request.param


def device_of(backend: str) -> str:
    """Where the backend's tensors live: CPU for the native kernels, else CUDA when there is one."""
    return "cpu" if backend == "cpu" else DEVICE
