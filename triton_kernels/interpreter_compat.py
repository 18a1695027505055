"""Triton 3.6's interpreter under NumPy >= 2.4: runtime loop bounds.

Under TRITON_INTERPRET=1 a scalar inside a kernel is a tensor holding a shape-(1,) NumPy array, and a loop
`for start_n in range(lo, hi, BLOCK_N)` with runtime bounds (every kernel here has one: FlashAttention loops
over the key or query blocks a program can see) converts lo and hi with tensor.__index__. Triton 3.6's
interpreter implements that as int(array), which NumPy 2.4 turned from a deprecation warning into
"TypeError: only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171, fixed
upstream by #9172 with int(array.squeeze()), which triton 3.9 has). The kernels are right and compile
unchanged; the interpreter's conversion is at fault. fix_loop_bounds() applies upstream's fix where the
installed interpreter still has the fault, and does nothing elsewhere (GPU launches never get here).
"""
import functools
import operator


def _index_fails(patch_tensor, scope_type) -> bool:
    """Whether the interpreter's tensor.__index__ rejects a shape-(1,) scalar (probed on a stand-in class)."""
    import numpy as np

    class Probe:
        handle = type("Handle", (), {"data": np.array([1], dtype=np.int32)})()

    scope = scope_type()
    patch_tensor(Probe, scope)
    try:
        operator.index(Probe())
        return False
    except TypeError:
        return True
    finally:
        scope.restore()


@functools.cache
def fix_loop_bounds() -> bool:
    """Make the interpreter's tensor.__index__ take shape-(1,) scalars, as upstream does; True if it was needed.

    Idempotent. The interpreter re-applies its tensor patches at every launch through _patch_lang_tensor, so the
    fix wraps that function: the interpreter's own patches, then upstream's __index__."""
    try:
        from triton.runtime import interpreter
        patch_tensor, scope_type = interpreter._patch_lang_tensor, interpreter._LangPatchScope
    except (ImportError, AttributeError):  # an interpreter without these internals: nothing to fix here
        return False
    if not _index_fails(patch_tensor, scope_type):
        return False

    def patch_tensor_with_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_index
    return True
