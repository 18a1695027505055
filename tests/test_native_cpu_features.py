"""An x86-64 CPU without the features the extension is compiled for (-mavx2 -mfma -mf16c) gets a clear
ImportError naming them when the native backend loads, before fused_pos_attn._C is loaded (which could die
with SIGILL). CPUs are simulated by monkeypatching what fused_pos_attn/backends/native.py reads."""
import io
import subprocess
import sys
import textwrap

import pytest

from fused_pos_attn.backends import native

FULL = "flags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2\n"
NO_AVX2 = "flags\t\t: fpu sse sse2 avx fma f16c\n"


def _cpu(monkeypatch, machine: str, cpuinfo: str) -> None:
    monkeypatch.setattr(native.platform, "machine", lambda: machine)
    monkeypatch.setattr(native, "_cpuinfo_flags",
                        lambda: set(cpuinfo.split(":", 1)[1].split()) if cpuinfo else None)


@pytest.mark.parametrize("cpuinfo,missing", [(FULL, []), (NO_AVX2, ["avx2"]),
                                             ("flags : fpu sse sse2\n", ["avx2", "fma", "f16c"])])
def test_missing_features_from_cpuinfo(monkeypatch, cpuinfo, missing):
    _cpu(monkeypatch, "x86_64", cpuinfo)
    assert native.missing_cpu_features() == missing


def test_error_names_the_missing_feature(monkeypatch):
    _cpu(monkeypatch, "x86_64", NO_AVX2)
    with pytest.raises(ImportError, match=r"compiled for x86-64 CPUs with AVX2, FMA, F16C, and this CPU lacks AVX2; "
                                          r"loading them would crash the process \(illegal instruction\)\. Use "
                                          r"backend='reference'"):
        native.require_cpu_features()


def test_other_architectures_are_not_checked(monkeypatch):
    _cpu(monkeypatch, "aarch64", "flags : fp asimd\n")
    native.require_cpu_features()


@pytest.mark.parametrize("capability,missing", [("AVX512", []), ("AVX2", []), ("DEFAULT", ["avx2", "fma", "f16c"])])
def test_without_cpuinfo_torch_capability_decides(monkeypatch, capability, missing):
    _cpu(monkeypatch, "AMD64", "")
    monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert native.missing_cpu_features() == missing


def test_reading_cpuinfo(monkeypatch):
    monkeypatch.setattr("builtins.open", lambda path: io.StringIO("processor : 0\n" + NO_AVX2))
    assert {"avx", "fma", "f16c"} <= native._cpuinfo_flags() and "avx2" not in native._cpuinfo_flags()


def test_check_runs_before_the_extension_loads():
    """In a fresh process whose /proc/cpuinfo lacks avx2, the CPU backend's import raises the ImportError and
    fused_pos_attn._C is never loaded."""
    script = textwrap.dedent(f"""
        import builtins, io, platform, sys
        real_open = builtins.open
        builtins.open = lambda path, *a, **k: (io.StringIO({NO_AVX2!r}) if path == "/proc/cpuinfo"
                                               else real_open(path, *a, **k))
        platform.machine = lambda: "x86_64"
        try:
            import fused_pos_attn.backends.cpu_backend
        except ImportError as e:
            assert "lacks AVX2" in str(e), e
            assert "fused_pos_attn._C" not in sys.modules
            print("REFUSED")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "REFUSED", proc.stdout + proc.stderr
