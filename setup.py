"""Build fused_pos_attn and its C++ extension fused_pos_attn._C.

The CPU sources always build. CUDA sources (csrc/cuda/*.cu) build when a CUDA toolkit and a CUDA build of
torch are present, for the archs in FUSED_POS_ATTN_CUDA_ARCHS (default "80;90").
Switches: FUSED_POS_ATTN_CUDA=auto|1|0 (1 forces the CUDA build and fails without a toolkit, 0 skips it).
Install with `pip install --no-build-isolation -e .` so the installed torch is used.
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("FUSED_POS_ATTN_CUDA", "auto").lower()
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if mode in ("1", "true", "on"):
        if not available:
            raise RuntimeError("FUSED_POS_ATTN_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
        return True
    if mode in ("0", "false", "off"):
        return False
    return available


def _extension():
    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]  # noqa: E731  setuptools wants relative paths
    sources = rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) +
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
    cuda_sources = rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
    if cuda_sources and _want_cuda():
        archs = os.environ.get("FUSED_POS_ATTN_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        return CUDAExtension("fused_pos_attn._C", sources + cuda_sources, include_dirs=include_dirs,
                             define_macros=[("FUSED_POS_ATTN_WITH_CUDA", None)],
                             extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", *gencode]},
                             extra_link_args=link_flags)
    return CppExtension("fused_pos_attn._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(
    name="fused_pos_attn",
    version="0.1.0",
    description="FlashAttention-style attention with ALiBi / RoPE / relative positions fused into the kernel",
    packages=["fused_pos_attn", "fused_pos_attn.backends", "fused_pos_attn.models", "fused_pos_attn.experiments",
              "fused_pos_attn.triton_kernels"],
    package_dir={"fused_pos_attn.triton_kernels": "triton_kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.3"],
        "test": ["pytest", "hypothesis", "transformers>=5.0"],  # transformers: oracle of the RoPE/ALiBi tests
        "bench": ["pytest-benchmark", "matplotlib", "psutil"],
        "experiments": ["matplotlib", "tqdm"],  # python -m fused_pos_attn extrapolate | claims | passkey | latency
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
