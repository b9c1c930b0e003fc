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


GLUE = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
KERNELS = sorted(glob.glob(os.path.join(ROOT, "kernels", "cuda", "*.cu")))


def _glue_flags() -> tuple[str, ...]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (f"-I{TORCH_INCLUDE}",
            f"-I{os.path.join(TORCH_INCLUDE, 'torch', 'csrc', 'api', 'include')}",
            "-DZERO_EXT_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}")


@functools.cache
def _errors() -> dict[str, str | None]:
    """Every kernels/cuda/*.cu compiled with plain nvcc and every csrc/*.cu against torch's
    headers, the compilers run side by side on the machine's cores. Each glue file alone spends
    ~20 s parsing torch's headers (8 files: 137 s of CI on 2 cores), so the glue is first one
    translation unit (~30 s); only if that fails (an error, or two files' helpers clashing
    there) each file on its own, for per-file errors. (One unit would not notice a file
    missing an include that an earlier file brings; the extension's own build compiles them
    apart.)"""
    out_dir = tempfile.mkdtemp(prefix="zero_ext_cuda_sources_")
    try:
        unit = os.path.join(out_dir, "all_glue.cu")
        with open(unit, "w") as f:
            f.writelines(f'#include "{source}"\n' for source in GLUE)
        jobs = [(unit, _glue_flags())] + [(source, ()) for source in KERNELS]
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            done = list(pool.map(lambda job: _compile(job[0], out_dir, *job[1]), jobs))
            errors = dict(zip(KERNELS, done[1:], strict=True))
            if done[0] is None:
                return errors | dict.fromkeys(GLUE)
            glue = pool.map(lambda source: _compile(source, out_dir, *_glue_flags()), GLUE)
            return errors | dict(zip(GLUE, glue, strict=True))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


@pytest.mark.parametrize("source", KERNELS, ids=os.path.basename)
def test_kernels_compile_with_plain_nvcc(source):
    error = _errors()[source]
    assert error is None, error


@pytest.mark.parametrize("source", GLUE, ids=os.path.basename)
def test_glue_compiles_against_torch_headers(source):
    error = _errors()[source]
    assert error is None, error
