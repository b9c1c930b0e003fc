"""The CUDA sources compile on machines without a GPU or a CUDA build of torch.

A GPU-less developer machine still has nvcc; compiling here catches a broken CUDA file before
it reaches a GPU machine. kernels/cuda/ takes raw pointers and needs only the toolkit; the glue
in csrc/*.cu also needs torch's headers (the CPU wheel ships them, less one CMake-generated file
that C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for).
"""

import glob
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")
TORCH_INCLUDE = os.path.join(os.path.dirname(torch.__file__), "include")

pytestmark = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")


def _nvcc(source, tmp_path, *extra):
    out = tmp_path / (os.path.basename(source) + ".o")
    cmd = [NVCC, "-std=c++17", "-O3", "-arch=sm_90", f"-I{ROOT}", *extra, "-c", source,
           "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    assert out.stat().st_size > 0


@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "kernels", "cuda", "*.cu"))),
                         ids=os.path.basename)
def test_kernels_compile_with_plain_nvcc(source, tmp_path):
    _nvcc(source, tmp_path)


@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))),
                         ids=os.path.basename)
def test_glue_compiles_against_torch_headers(source, tmp_path):
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    _nvcc(source, tmp_path, f"-I{TORCH_INCLUDE}",
          f"-I{os.path.join(TORCH_INCLUDE, 'torch', 'csrc', 'api', 'include')}",
          "-DZERO_EXT_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
          f"-D_GLIBCXX_USE_CXX11_ABI={abi}")
