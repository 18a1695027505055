"""Build the C++ extension fused_pos_attn._C (metadata, packages and version live in pyproject.toml).

The CPU sources always build. CUDA sources (csrc/cuda/*.cu) build when a CUDA toolkit and a CUDA build of
torch are present, for the archs in FUSED_POS_ATTN_CUDA_ARCHS (default "80;90"): SASS for each, plus PTX for
the highest so that newer GPUs can JIT-compile the kernels.
Switches: FUSED_POS_ATTN_CUDA=auto|1|0 (1 forces the CUDA build and fails without a toolkit, 0 skips it).

The extension links against the torch it is built with, so it must be built against the torch it will run
with: install torch first, then `pip install --no-build-isolation .` (an isolated build would download
another torch). Without torch, only the commands that need no compiler work (sdist, egg_info).
"""
import glob
import os
import platform
import re

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "fused_pos_attn._C"
DEFAULT_CUDA_ARCHS = "80;90"


def cuda_gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags for a ';'-separated list of compute capabilities such as "80;90" or "90a".

    Each arch gets SASS (code=sm_XX); the highest plain arch also gets PTX (code=compute_XX), which the driver
    JIT-compiles on GPUs newer than every listed arch. Arch-specific targets ("90a") have no forward-compatible
    PTX, so they get SASS only. Raises ValueError on an empty list or an entry that is not digits with an
    optional 'a' suffix.
    """
    entries = [a.strip() for a in archs.split(";") if a.strip()]
    if not entries:
        raise ValueError(f"FUSED_POS_ATTN_CUDA_ARCHS={archs!r} names no arch; expected e.g. '80;90'")
    for entry in entries:
        if not re.fullmatch(r"\d{2,3}a?", entry):
            raise ValueError(f"FUSED_POS_ATTN_CUDA_ARCHS entry {entry!r} is not a compute capability like "
                             "'80', '90' or '90a'")
    unique = sorted(set(entries), key=lambda a: (int(a.rstrip("a")), a))
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in unique]
    plain = [a for a in unique if a.isdigit()]
    if plain:
        flags.append(f"-gencode=arch=compute_{plain[-1]},code=compute_{plain[-1]}")
    return flags


def _want_cuda(torch) -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("FUSED_POS_ATTN_CUDA", "auto").lower()
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if mode in ("1", "true", "on"):
        if not available:
            raise RuntimeError("FUSED_POS_ATTN_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
        return True
    if mode in ("0", "false", "off"):
        return False
    return available


def _relative(paths: list[str]) -> list[str]:
    return [os.path.relpath(p, ROOT) for p in paths]  # setuptools wants paths relative to setup.py


def _torch_extension(torch) -> Extension:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = _relative(sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) +
                               glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # -fopenmp: at::parallel_for is an OpenMP region compiled into this extension; without the flag it runs
    # serially. The OpenMP runtime it links (libgomp.so.1) resolves to the one torch has already loaded, so
    # torch.set_num_threads governs it.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec picks its AVX2 kernels only under CPU_CAPABILITY_AVX2; AVX2 + FMA + F16C is the x86 baseline here.
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    cuda_sources = _relative(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
    if cuda_sources and _want_cuda(torch):
        gencode = cuda_gencode_flags(os.environ.get("FUSED_POS_ATTN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
        return CUDAExtension(EXTENSION_NAME, sources + cuda_sources, include_dirs=include_dirs,
                             define_macros=[("FUSED_POS_ATTN_WITH_CUDA", None)],
                             extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", *gencode]},
                             extra_link_args=link_flags)
    return CppExtension(EXTENSION_NAME, sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


class _TorchMissing(build_ext):
    """Stands in for torch's BuildExtension when torch cannot be imported: fails at build time with the fix."""

    def run(self):
        raise RuntimeError("fused_pos_attn compiles its C++ extension against the installed torch, and torch "
                           "is not importable here. Install torch (2.11 to 2.13) first, then build without "
                           "isolation: `pip install --no-build-isolation fused_pos_attn-<version>.tar.gz` "
                           "(or `-e .` in a checkout).")


def setup_arguments() -> dict:
    """ext_modules and cmdclass for setup(): torch's build when torch imports, else a placeholder extension
    (keeps sdist and metadata commands working, and the wheel platform-specific) whose build fails clearly."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {"ext_modules": [Extension(EXTENSION_NAME, sources=[])], "cmdclass": {"build_ext": _TorchMissing}}
    return {"ext_modules": [_torch_extension(torch)],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import cuda_gencode_flags from it
    setup(**setup_arguments())
