"""Recording what a call allocates: every tensor a torch op returns in new storage (shared by the tests that
check no score-sized or rotated-copy buffer is ever allocated)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor a torch op returns in new storage (views are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        self.shapes += [tuple(t.shape) for t in outputs if isinstance(t, torch.Tensor)
                        and t.untyped_storage().data_ptr() not in input_storages]
        return result


def numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def hide_interpreter_copies(monkeypatch) -> None:
    """Under TRITON_INTERPRET=1 the interpreter copies each kernel argument with torch ops; those copies
    are the interpreter's, not the package's, so recording pauses while a kernel runs."""
    if DEVICE == "cuda":
        return
    from triton.runtime import interpreter

    run_grid = interpreter.GridExecutor.__call__

    def run_unrecorded(self, *args, **kwargs):
        with _disable_current_modes():
            return run_grid(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", run_unrecorded)
