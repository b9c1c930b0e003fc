"""The CUDA sources compile on machines without a GPU or a CUDA build of torch.

A GPU-less developer machine still has nvcc; compiling here catches a broken CUDA file before
it reaches a GPU machine. kernels/cuda/ takes raw pointers and needs only the toolkit; the glue
in csrc/*.cu also needs torch's headers (the CPU wheel ships them, less one CMake-generated file
that C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for).
"""

import concurrent.futures
import functools
import glob
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")
TORCH_INCLUDE = os.path.join(os.path.dirname(torch.__file__), "include")

pytestmark = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")


def _compile(source, out_dir, *extra) -> str | None:
    """nvcc -c `source`; None when it compiled to a non-empty object, else the error."""
    out = os.path.join(out_dir, os.path.basename(source) + ".o")
    cmd = [NVCC, "-std=c++17", "-O3", "-arch=sm_90", f"-I{ROOT}", *extra, "-c", source,
           "-o", out]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    return None if os.path.getsize(out) > 0 else f"{' '.join(cmd)}: empty object"


def _nvcc(source, tmp_path, *extra):
    error = _compile(source, str(tmp_path), *extra)
    assert error is None, error


GLUE = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))


@functools.cache
def _glue_errors() -> dict[str, str | None]:
    """Every csrc/*.cu compiled against torch's headers. Each file alone spends ~20 s parsing
    torch's headers (8 files: 137 s of CI on 2 cores), so first all of them as one translation
    unit (~35 s); only if that fails (an error, or two files' helpers clashing there) each on
    its own, on the machine's cores, for per-file errors. (One unit would not notice a file
    missing an include that an earlier file brings; the extension's own build compiles them
    apart.)"""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    extra = (f"-I{TORCH_INCLUDE}",
             f"-I{os.path.join(TORCH_INCLUDE, 'torch', 'csrc', 'api', 'include')}",
             "-DZERO_EXT_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}")
    out_dir = tempfile.mkdtemp(prefix="zero_ext_glue_")
    try:
        unit = os.path.join(out_dir, "all_glue.cu")
        with open(unit, "w") as f:
            f.writelines(f'#include "{source}"\n' for source in GLUE)
        if _compile(unit, out_dir, *extra) is None:
            return dict.fromkeys(GLUE)
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            errors = pool.map(lambda source: _compile(source, out_dir, *extra), GLUE)
            return dict(zip(GLUE, errors, strict=True))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "kernels", "cuda", "*.cu"))),
                         ids=os.path.basename)
def test_kernels_compile_with_plain_nvcc(source, tmp_path):
    _nvcc(source, tmp_path)


@pytest.mark.parametrize("source", GLUE, ids=os.path.basename)
def test_glue_compiles_against_torch_headers(source):
    error = _glue_errors()[source]
    assert error is None, error
