"""The package installs the way pip users expect, and declares what it is tested with.

- The sdist (`python -m build --sdist`) holds every file the extension build needs (csrc headers, .cu sources)
  and every module; installed into a fresh venv (`pip install --no-build-isolation --no-deps`, which compiles
  the CPU extension: a few minutes on 2 cores) it imports from outside the checkout and each CPU scheme agrees
  with the dense reference.
- One version string (fused_pos_attn.__version__, read by pyproject.toml); the running torch / Triton lie in
  the declared ranges.
- setup.py's nvcc -gencode list: SASS for every arch in FUSED_POS_ATTN_CUDA_ARCHS, PTX for the highest.
- The experiments write under the current directory by default, never into the package.
- No torch API newer than 2.11: every torch name the code uses is in a list checked against torch 2.11 (see
  TORCH_API_IN_2_11).
"""
import ast
import email.parser
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

import fused_pos_attn

ROOT = Path(__file__).resolve().parents[1]
# Checkout (and sdist) directory of each package -> where it installs (pyproject.toml's package-dir).
INSTALLED_AS = {"fused_pos_attn": "fused_pos_attn", "triton_kernels": "fused_pos_attn/triton_kernels"}


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """Runs cmd; on failure the assertion shows the end of its output."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _env_outside_checkout(**extra: str) -> dict:
    """This environment without PYTHONPATH (so nothing points back into the checkout), plus extra."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **extra}


def _source_files(directory: Path) -> list[Path]:
    """Files under directory that a checkout holds (no caches, no build outputs), relative to it."""
    return sorted(p.relative_to(directory) for p in directory.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".o", ".pyc"))


def _checkout_modules() -> set[str]:
    """Every .py file of the package's source directories, relative to the checkout ('triton_kernels/x.py')."""
    return {f"{directory}/{rel.as_posix()}" for directory in INSTALLED_AS
            for rel in _source_files(ROOT / directory) if rel.suffix == ".py"}


# ---------------------------------------------------------------------------------------------------- sdist

# Build outputs and caches of a checkout. A stale fused_pos_attn.egg-info/SOURCES.txt in particular would add
# the files it lists to the sdist and hide a MANIFEST.in that misses them.
NOT_SOURCES = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o", ".*")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist built from a clean copy of the checkout, as from a fresh clone."""
    work = tmp_path_factory.mktemp("sdist")
    shutil.copytree(ROOT, work / "checkout", ignore=NOT_SOURCES)
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", work, work / "checkout"], cwd=work)
    (archive,) = work.glob("fused_pos_attn-*.tar.gz")
    return archive


def _sdist_members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    prefix = names[0].split("/")[0]
    return {name[len(prefix) + 1:] for name in names if "/" in name}


def test_sdist_holds_every_source_file(sdist):
    members = _sdist_members(sdist)
    csrc = {f"csrc/{rel}" for rel in _source_files(ROOT / "csrc")}
    assert any(name.endswith(".cuh") for name in csrc) and any(name.endswith(".cu") for name in csrc)
    missing = sorted((csrc | _checkout_modules() | {"setup.py", "pyproject.toml", "README.md"}) - members)
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in, or pyproject.toml's packages)"


def test_sdist_version_is_the_package_version(sdist):
    with tarfile.open(sdist) as tar:
        (info,) = [m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
        metadata = email.parser.Parser().parsestr(tar.extractfile(info).read().decode())
    assert metadata["Version"] == fused_pos_attn.__version__
    assert sdist.name == f"fused_pos_attn-{fused_pos_attn.__version__}.tar.gz"


@pytest.fixture(scope="module")
def sdist_venv(sdist, tmp_path_factory) -> Path:
    """A fresh venv with the sdist installed; it sees this interpreter's packages (torch, setuptools, ninja,
    pip) through a .pth file, which, unlike --system-site-packages, also works when this interpreter is itself
    a venv (make test-compat). Returns the venv's python."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (purelib / "_parent_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # FUSED_POS_ATTN_CUDA=0: the CPU extension is what this test runs; nvcc would add minutes per arch.
    _run([python, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", "--no-deps", sdist],
         cwd=venv, env=_env_outside_checkout(MAX_JOBS="2", FUSED_POS_ATTN_CUDA="0"))
    return python


SCHEME_CHECK = textwrap.dedent("""
    import importlib.metadata, json, sys, torch
    import fused_pos_attn
    from fused_pos_attn import RelativeBias, fused_attention
    from fused_pos_attn.triton_kernels.scheme_codes import SCHEME_CODES

    torch.manual_seed(0)
    q = torch.randn(1, 4, 33, 32)      # (B, Hq, Nq, D)
    k = torch.randn(1, 2, 40, 32)      # (B, Hkv, Nk, D): GQA, Nq != Nk
    v = torch.randn(1, 2, 40, 32)
    schemes = {"none": "none", "alibi": "alibi", "rope": "rope",
               "relative": RelativeBias(torch.randn(4, 32), max_distance=64)}
    errors = {}
    for name, pos in schemes.items():
        out = fused_attention(q, k, v, pos, causal=True, backend="cpu")
        ref = fused_attention(q.double(), k.double(), v.double(), pos, causal=True, backend="reference")
        errors[name] = (out.double() - ref).abs().max().item()
    print(json.dumps({"file": fused_pos_attn.__file__, "prefix": sys.prefix, "errors": errors,
                      "schemes": sorted(SCHEME_CODES), "version": fused_pos_attn.__version__,
                      "metadata_version": importlib.metadata.version("fused_pos_attn")}))
""")


def test_sdist_installs_and_runs_each_cpu_scheme(sdist_venv, tmp_path):
    done = _run([sdist_venv, "-c", SCHEME_CHECK], cwd=tmp_path, env=_env_outside_checkout())
    report = json.loads(done.stdout.splitlines()[-1])
    assert Path(report["file"]).is_relative_to(report["prefix"]), "imported the checkout, not the installed copy"
    assert report["version"] == report["metadata_version"] == fused_pos_attn.__version__
    assert set(report["errors"]) == set(report["schemes"]) == {"none", "alibi", "rope", "relative"}
    assert all(err < 1e-5 for err in report["errors"].values()), report["errors"]  # fp32 vs fp64 reference


def test_sdist_installs_every_module_and_the_extension(sdist, sdist_venv, tmp_path):
    where = "import fused_pos_attn, os; print(os.path.dirname(fused_pos_attn.__file__))"
    package_dir = Path(_run([sdist_venv, "-c", where], cwd=tmp_path, env=_env_outside_checkout()).stdout.strip())
    installed = {f"fused_pos_attn/{p.relative_to(package_dir)}" for p in package_dir.rglob("*.py")
                 if "__pycache__" not in p.parts}
    # the sdist's modules (test_sdist_holds_every_source_file compares those with the checkout)
    expected = {f"{INSTALLED_AS[name.split('/')[0]]}/{name.split('/', 1)[1]}" for name in _sdist_members(sdist)
                if name.split("/")[0] in INSTALLED_AS and name.endswith(".py")}
    assert not expected - installed, f"not installed: {sorted(expected - installed)}"
    assert list(package_dir.glob("_C*.so")), "the C++ extension was not built into the package"


# -------------------------------------------------------------------------------------- declared versions

def _declared(requirement_name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    (found,) = [Requirement(r) for r in specs if Requirement(r).name == requirement_name]
    return found


def test_running_versions_are_declared():
    """The suite runs on versions the package declares: torch 2.11-2.13, Triton 3.6-3.9. A newer torch or
    Triton here means testing it and widening the range in pyproject.toml (and README.md)."""
    triton = pytest.importorskip("triton")
    for name, version in (("torch", str(torch.__version__)), ("triton", triton.__version__)):
        release = Version(version).base_version  # 2.11.0+cu130 -> 2.11.0
        assert _declared(name).specifier.contains(release), f"{name} {version} is outside {_declared(name)}"


def test_version_is_single_sourced():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fused_pos_attn.__version__"}
    assert "version" not in _setup_module().setup_arguments()  # setup.py passes no version of its own


# ------------------------------------------------------------------------------------------- CUDA gencode

def _setup_module():
    """setup.py imported as a module: its setup() call runs only as __main__."""
    spec = importlib.util.spec_from_file_location("fused_pos_attn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sass(arch: str) -> str:
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def _ptx(arch: str) -> str:
    return f"-gencode=arch=compute_{arch},code=compute_{arch}"


@pytest.mark.parametrize("archs, expected", [
    ("80;90", [_sass("80"), _sass("90"), _ptx("90")]),
    ("90", [_sass("90"), _ptx("90")]),  # gpu_check.sh: the local GPU only
    ("90;80;90; ", [_sass("80"), _sass("90"), _ptx("90")]),
    ("100;90", [_sass("90"), _sass("100"), _ptx("100")]),  # numeric order, not string order
    ("80;90a", [_sass("80"), _sass("90a"), _ptx("80")]),  # arch-specific 90a has no forward-compatible PTX
])
def test_cuda_gencode_embeds_ptx_for_the_highest_arch(archs, expected):
    assert _setup_module().cuda_gencode_flags(archs) == expected


def test_default_cuda_archs_get_ptx():
    setup = _setup_module()
    assert setup.cuda_gencode_flags(setup.DEFAULT_CUDA_ARCHS)[-1] == _ptx("90")


@pytest.mark.parametrize("archs", ["", ";", "sm_80", "8.0", "80;x"])
def test_cuda_gencode_rejects_bad_archs(archs):
    with pytest.raises(ValueError, match="FUSED_POS_ATTN_CUDA_ARCHS"):
        _setup_module().cuda_gencode_flags(archs)


# ------------------------------------------------------------------------------------ experiment outputs

def test_experiments_write_under_the_current_directory(tmp_path, monkeypatch):
    from fused_pos_attn.__main__ import main

    package_dir = Path(fused_pos_attn.__file__).parent

    def package_files() -> dict:
        return {p: p.stat().st_mtime_ns for p in package_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    before = package_files()
    monkeypatch.chdir(tmp_path)
    assert main(["latency", "--schemes", "alibi", "--contexts", "16", "--d-model", "16", "--layers", "1",
                 "--heads", "2", "--steps", "1", "--warmup", "1"]) == 0  # no --out-dir
    assert (tmp_path / "bench" / "results" / "decode_latency_cpu.csv").stat().st_size > 0
    assert package_files() == before, "an experiment wrote into the package directory"


# ----------------------------------------------------------------------------------- torch API <= 2.11

# Every torch name (attribute chain from `torch` or a torch import) the package, tests, benchmarks and setup.py
# use, each checked to exist in torch 2.11 (torch 2.11 cannot be installed here: only 2.13 has a CPU wheel). A
# name that is in torch <= 2.0 (pytorch's 2.0 sources and docs) and still in 2.13 (here) is in 2.11; the newer
# ones were checked in the versioned docs: torch.nn.attention.flex_attention (2.5 docs), sdpa_kernel / SDPBackend
# (2.3 docs), torch.backends.cpu.get_cpu_capability (docs of releases before 2.5), torch.library.custom_op /
# register_fake / opcheck (2.4 docs), torch.compiler.is_compiling (2.3 docs). Private names (torch._dynamo,
# torch.utils._python_dispatch, torch.utils._pytree) are in the 2.0 sources; benchmarking.py reads
# torch._dynamo.config's recompile limit under both its names. Keyword arguments were checked by hand:
# all are in 2.1 or older (SDPA's scale= came in 2.1); include_paths() is called without arguments, as every
# release allows.
# A name missing here fails test_torch_api_is_in_2_11: check it exists in torch 2.11 (docs.pytorch.org/docs/2.11
# or the v2.11.0 sources), then add it.
TORCH_API_IN_2_11 = frozenset("""
torch torch.Generator torch.Tensor torch.__version__ torch._dynamo torch._dynamo.config torch.all torch.allclose
torch.arange torch.as_tensor torch.autograd torch.autograd.Function torch.autograd.backward torch.autograd.grad
torch.autograd.gradcheck torch.backends torch.backends.cpu torch.backends.cpu.get_cpu_capability torch.bfloat16
torch.bool torch.cat torch.compile torch.complex torch.complex64 torch.cos torch.cuda torch.cuda.CUDAGraph
torch.cuda.Event torch.cuda.OutOfMemoryError torch.cuda.Stream torch.cuda.current_device torch.cuda.current_stream
torch.cuda.device torch.cuda.device_count torch.cuda.empty_cache torch.cuda.get_device_capability
torch.cuda.get_device_name torch.cuda.get_device_properties torch.cuda.graph torch.cuda.is_available
torch.cuda.max_memory_allocated torch.cuda.memory_allocated torch.cuda.reset_peak_memory_stats torch.cuda.set_device
torch.cuda.stream torch.cuda.synchronize torch.device torch.dtype torch.empty torch.empty_like torch.equal torch.exp
torch.eye torch.finfo torch.float16 torch.float32 torch.float64 torch.frombuffer torch.full torch.full_like
torch.get_num_threads torch.int32 torch.int64 torch.int8 torch.isfinite torch.isinf torch.isnan torch.isneginf
torch.linspace torch.log torch.logaddexp torch.logsumexp torch.manual_seed torch.matmul torch.maximum torch.nn
torch.nn.Embedding torch.nn.LayerNorm torch.nn.Linear torch.nn.Module torch.nn.ModuleList torch.nn.Parameter
torch.nn.attention torch.nn.attention.SDPBackend torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION
torch.nn.attention.SDPBackend.FLASH_ATTENTION torch.nn.attention.SDPBackend.MATH torch.nn.attention.flex_attention
torch.nn.attention.flex_attention.create_block_mask torch.nn.attention.flex_attention.flex_attention
torch.nn.attention.sdpa_kernel torch.nn.functional torch.nn.functional.cross_entropy torch.nn.functional.gelu
torch.nn.functional.linear torch.nn.functional.one_hot torch.nn.functional.pad
torch.nn.functional.scaled_dot_product_attention torch.nn.functional.softmax torch.nn.init torch.nn.init.normal_
torch.nn.init.zeros_ torch.nn.utils torch.nn.utils.clip_grad_norm_ torch.no_grad torch.nonzero torch.ones
torch.ones_like torch.ops torch.optim torch.optim.AdamW torch.polar torch.rand torch.randint torch.randn
torch.randn_like torch.repeat_interleave torch.set_num_threads torch.sin torch.softmax torch.stack torch.tensor torch.testing
torch.testing.assert_close torch.uint8 torch.utils torch.utils._python_dispatch.TorchDispatchMode
torch.utils._python_dispatch._disable_current_modes torch.utils._pytree torch.utils._pytree.tree_leaves
torch.utils.cpp_extension.BuildExtension torch.utils.cpp_extension.BuildExtension.with_options
torch.utils.cpp_extension.CUDAExtension torch.utils.cpp_extension.CUDA_HOME torch.utils.cpp_extension.CppExtension
torch.utils.cpp_extension.include_paths torch.version torch.version.cuda torch.view_as_complex torch.view_as_real
torch.where torch.zeros torch.zeros_like torch.aminmax torch.randperm torch.argsort
torch.SymInt torch._dynamo.explain torch._dynamo.mark_dynamic torch._dynamo.reset torch._dynamo.testing
torch._dynamo.testing.CompileCounterWithBackend torch.compiler torch.compiler.is_compiling torch.library
torch.library.custom_op torch.library.opcheck torch.library.register_fake torch.searchsorted torch.long torch.pow
torch.distributed torch.distributed.GroupMember torch.distributed.GroupMember.NON_GROUP_MEMBER
torch.distributed.P2POp torch.distributed.ProcessGroup torch.distributed.ReduceOp
torch.distributed.ReduceOp.MAX torch.distributed.all_gather_into_tensor torch.distributed.all_gather_object
torch.distributed.all_reduce torch.distributed.barrier torch.distributed.batch_isend_irecv
torch.distributed.destroy_process_group torch.distributed.get_backend torch.distributed.get_global_rank
torch.distributed.get_process_group_ranks torch.distributed.get_rank torch.distributed.get_world_size
torch.distributed.group torch.distributed.group.WORLD torch.distributed.init_process_group torch.distributed.irecv
torch.distributed.is_available torch.distributed.is_initialized torch.distributed.isend torch.distributed.new_group
torch.distributed.reduce_scatter_tensor torch.is_grad_enabled
""".split())
# torch.distributed: all in torch 2.5's distributed_c10d.__all__ and still in 2.13 (all_gather_into_tensor and
# reduce_scatter_tensor deprecated there for all_gather_single / reduce_scatter_single, which 2.11 lacks: the
# package takes the new name where it exists, by getattr).

# torch.Tensor methods and properties the code uses or is likely to (any `.name` that is a Tensor attribute), all in
# torch <= 2.0 except itemsize (2.1).
TENSOR_API_IN_2_11 = frozenset("""
abs abs_ absolute add add_ addcmul_ addmm all allclose amax amin any argmax argmin backward bfloat16 bitwise_and
broadcast_to diff ravel uniform_ index_copy put aminmax as_strided index_put_ argsort
bitwise_or bmm bool byte ceil char chunk clamp clamp_ clamp_min clone contiguous copy_ cos cpu cuda cummax cumprod
cumsum data data_ptr detach device diag diagonal dim div div_ dot double dtype element_size eq equal exp exp2 exp_
expand expand_as fill_ flatten flip float float_power floor fmod frac gather ge grad grad_fn gt half imag index
index_add_ index_copy_ index_fill_ index_select int is_complex is_contiguous is_cuda is_floating_point is_leaf
is_nonzero is_pinned is_set_to isclose isfinite isinf isnan isneginf item itemsize kthvalue layout le lerp log log2
logaddexp logcumsumexp logical_and logical_not logical_or logsumexp long lt masked_fill masked_fill_ masked_scatter_
matmul max maximum mean median min minimum mm mode moveaxis movedim mul mul_ name narrow narrow_copy nbytes ne neg
new_empty new_full new_ones new_tensor new_zeros nonzero norm normal_ numel numpy permute pin_memory pow prod real
record_stream register_hook relu remainder repeat repeat_interleave requires_grad requires_grad_ reshape reshape_as
retain_grad roll round rsqrt scatter_ scatter_add_ select shape short sigmoid sign sin size softmax sort split sqrt
sqrt_ square squeeze squeeze_ storage_offset stride sub sub_ sum swapaxes t tanh to tolist topk transpose tril tril_
triu triu_ trunc type type_as unbind unflatten unique unsqueeze unsqueeze_ untyped_storage values _version view
view_as where zero_
""".split())

SCANNED = ("fused_pos_attn", "triton_kernels", "tests", "bench", "setup.py")


def _torch_aliases(tree: ast.AST) -> dict:
    """Local name -> dotted torch path, from `import torch[.x] [as y]` and `from torch[.x] import y [as z]`."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    aliases[a.asname or "torch"] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _torch_names(tree: ast.AST) -> set[str]:
    """Dotted torch names a module uses: imports, and attribute chains rooted at a torch alias. Custom ops
    (torch.ops.<namespace>.<op>) count as torch.ops."""
    aliases = _torch_aliases(tree)
    names = set(aliases.values())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, base = [], node
            while isinstance(base, ast.Attribute):
                parts.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                names.add(".".join([aliases[base.id], *reversed(parts)]))
    return {"torch.ops" if n.startswith("torch.ops.") else n for n in names}


def _scanned_trees() -> list[ast.AST]:
    files = [p for entry in SCANNED
             for p in ([ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py"))]
    return [ast.parse(p.read_text(), filename=str(p)) for p in files if "__pycache__" not in p.parts]


def test_torch_api_is_in_2_11():
    trees = _scanned_trees()
    names = set().union(*(_torch_names(t) for t in trees))
    unverified = sorted(names - TORCH_API_IN_2_11)
    assert not unverified, f"torch names not yet checked against torch 2.11 (see TORCH_API_IN_2_11): {unverified}"
    attributes = {n.attr for t in trees for n in ast.walk(t) if isinstance(n, ast.Attribute)}
    tensor_api = {a for a in attributes if not a.startswith("__") and hasattr(torch.Tensor, a)}
    unverified = sorted(tensor_api - TENSOR_API_IN_2_11)
    assert not unverified, f"Tensor methods not yet checked against torch 2.11 (see TENSOR_API_IN_2_11): {unverified}"
