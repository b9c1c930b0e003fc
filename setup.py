"""Builds zero_ext._C: op schemas, CPU kernels and, where a CUDA toolkit exists, CUDA kernels.

    pip install --no-build-isolation .            # or -e . for development

Environment switches:
    ZERO_EXT_CUDA=0 / 1     force the CUDA kernels off / on (default: on when torch was built
                            with CUDA and a toolkit is found, whether or not a GPU is present)
    ZERO_EXT_DEBUG=1        -O0 -g instead of -O3
    ZERO_EXT_CPU_ISAS=...   which CPU kernel variants to compile: "all" (the default), "host"
                            (DEFAULT plus the best one this machine runs, e.g. AVX512: a
                            quicker build for the machine it runs on) or a comma list such
                            as AVX512 (DEFAULT is always built: it is every kernel's fallback)
    MAX_JOBS=N              parallel compile jobs (ninja)

CPU kernels in kernels/cpu/ are compiled once per instruction set (portable baseline, AVX2,
AVX-512), each into its own namespace, and zero_ext picks one at run time with ATen's own
detection (ATEN_CPU_CAPABILITY=default|avx2|avx512 forces one). No -march=native anywhere.
"""

import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# The instruction sets each kernels/cpu/*.cpp is compiled for, with the flags ATen uses for them.
# CPU_CAPABILITY names the at::vec inline namespace, so the variants never share a symbol.
CPU_ISA_FLAGS = {"DEFAULT": []}
if platform.machine() in ("x86_64", "AMD64"):
    CPU_ISA_FLAGS["AVX2"] = ["-mavx2", "-mfma", "-mf16c"]
    CPU_ISA_FLAGS["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]


def _selected_cpu_isas(choice: str) -> dict[str, list[str]]:
    """CPU_ISA_FLAGS narrowed to ZERO_EXT_CPU_ISAS. A build for one machine (the GPU check's,
    benchmarks/gpu_check.sh) needs only the variant that machine runs; csrc/cpu_isa.cpp never
    selects a variant that was not compiled, and DEFAULT always is (it is every dispatch's
    fallback)."""
    choice = choice.strip()
    if choice.lower() in ("", "all"):
        return dict(CPU_ISA_FLAGS)
    if choice.lower() == "host":
        wanted = {torch.backends.cpu.get_cpu_capability()}
    else:
        wanted = {name.strip().upper() for name in choice.split(",") if name.strip()}
        unknown = sorted(wanted - set(CPU_ISA_FLAGS))
        if unknown:
            raise RuntimeError(
                f"zero_ext setup: ZERO_EXT_CPU_ISAS={choice!r} names {', '.join(unknown)}, which "
                f"this machine cannot compile; choose from all, host, {', '.join(CPU_ISA_FLAGS)}")
    return {isa: flags for isa, flags in CPU_ISA_FLAGS.items() if isa == "DEFAULT" or isa in wanted}


CPU_ISA_FLAGS = _selected_cpu_isas(os.environ.get("ZERO_EXT_CPU_ISAS", "all"))


# No fused multiply-add contraction: every ISA variant then rounds each operation as ATen's
# reference ops do, and the SIMD body and scalar tail give bitwise-identical results.
CPU_KERNEL_FLAGS = ["-ffp-contract=off"]


def _want_cuda() -> bool:
    switch = os.environ.get("ZERO_EXT_CUDA", "").strip().lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if switch in ("0", "off", "false", "no"):
        return False
    if switch in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError(
                "ZERO_EXT_CUDA=1 asks for the CUDA kernels, but "
                + ("this torch is a CPU-only build (torch.version.cuda is None)"
                   if torch.version.cuda is None else "no CUDA toolkit was found (set CUDA_HOME)")
                + "; install a CUDA build of torch and the toolkit, or unset ZERO_EXT_CUDA."
            )
        return True
    if switch:
        raise RuntimeError(f"ZERO_EXT_CUDA={switch!r}: expected 0 or 1 (or leave it unset)")
    return available


def _cuda_arch_list() -> str:
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        return arch
    # torch compiles for the archs it was built for when the variable is unset; name them here
    # so `python -m zero_ext.env` can report what this build targets.
    archs = [a.split("_")[1] for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    return ";".join(f"{a[:-1]}.{a[-1]}" for a in archs) or "torch default"


class BuildWithCpuVariants(BuildExtension):
    """Compiles each kernels/cpu/*.cpp once per instruction set before linking zero_ext._C."""

    def build_extension(self, ext):
        cxx_flags = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) \
            else list(ext.extra_compile_args)
        sources = sorted(glob.glob(os.path.join(ROOT, "kernels", "cpu", "*.cpp")))
        for isa, isa_flags in CPU_ISA_FLAGS.items():
            out_dir = os.path.join(self.build_temp, f"cpu_{isa.lower()}")
            os.makedirs(out_dir, exist_ok=True)
            objects = self.compiler.compile(
                sources,
                output_dir=out_dir,
                include_dirs=ext.include_dirs,
                extra_postargs=cxx_flags + isa_flags + CPU_KERNEL_FLAGS
                + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"],
            )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def _extension():
    with_cuda = _want_cuda()
    debug = os.environ.get("ZERO_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    isas = ",".join(CPU_ISA_FLAGS)
    defines = [f'-DZERO_EXT_CPU_ISAS="{isas}"']
    defines += [f"-DZERO_EXT_HAVE_{isa}" for isa in CPU_ISA_FLAGS]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = opt + ["-fopenmp", "-std=c++17"] + defines
    kwargs = dict(
        name="zero_ext._C",
        include_dirs=[ROOT],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        arch = _cuda_arch_list()
        cxx += ["-DZERO_EXT_WITH_CUDA", f'-DZERO_EXT_CUDA_ARCHS="{arch}"']
        nvcc = opt + ["-std=c++17", "-lineinfo", "-DZERO_EXT_WITH_CUDA"]
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        sources += sorted(glob.glob(os.path.join("kernels", "cuda", "*.cu")))
        print(f"zero_ext: building CPU kernels ({isas}) and CUDA kernels (archs {arch})")
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             **kwargs)
    print(f"zero_ext: building CPU kernels ({isas}); CUDA kernels not built")
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildWithCpuVariants},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
