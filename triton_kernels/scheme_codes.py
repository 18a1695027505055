"""The position-scheme codes, the one Python table of them (pure Python: importable without Triton).

The Triton kernels take the code as their POS constexpr, the C++ ops as their `pos` argument; C++ has the
same table as `enum class PosKind` in csrc/include/fused_pos_attn/position.h, and
tests/test_scheme_codes.py checks that the two agree.
"""
SCHEME_CODES = {"none": 0, "alibi": 1, "rope": 2, "relative": 3}
SCHEME_NAMES = {code: name for name, code in SCHEME_CODES.items()}
