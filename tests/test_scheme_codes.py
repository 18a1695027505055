"""The position-scheme codes have one table per language, and they agree: Python's
fused_pos_attn.triton_kernels.scheme_codes (used by the Triton launchers and the native op arguments), C++'s
PosKind (csrc/include/fused_pos_attn/position.h, read through the op scheme_codes), and the POS_* constexprs of
the Triton position helpers."""
import pytest

from fused_pos_attn.backends import native
from fused_pos_attn.positions import ALIBI_KIND, NONE, RELATIVE_KIND, ROPE_KIND
from fused_pos_attn.triton_kernels.scheme_codes import SCHEME_CODES, SCHEME_NAMES


def test_cpp_and_python_tables_agree():
    assert native.scheme_codes() == SCHEME_CODES


def test_python_table_is_a_bijection_over_the_scheme_kinds():
    assert set(SCHEME_CODES) == {NONE, ALIBI_KIND, ROPE_KIND, RELATIVE_KIND}
    assert {code: name for name, code in SCHEME_CODES.items()} == SCHEME_NAMES
    assert len(SCHEME_NAMES) == len(SCHEME_CODES)


def test_triton_constants_agree():
    pytest.importorskip("triton")
    from fused_pos_attn.triton_kernels import position
    assert {name: getattr(position, f"POS_{name.upper()}").value for name in SCHEME_CODES} == SCHEME_CODES
