"""`python -m zero_ext.env`: what this installation was built with and can use.

Paste its output into bug reports. It reports torch and CUDA versions, which kernels were
compiled (CPU instruction sets, CUDA architectures) and which one this CPU runs, OpenMP
threads, which torch.distributed backends are available, and the versions of the libraries
zero_ext integrates with (read from the installed packages' metadata: none of them is
imported, so the report stays quick and works even where one of them is broken).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch


def collect() -> dict[str, str]:
    """The report as ordered name -> value pairs."""
    import torch.distributed as dist

    import zero_ext
    from zero_ext import _C

    has_op = torch._C._dispatch_has_kernel_for_dispatch_key
    info = {
        "zero_ext": f"{zero_ext.__version__} ({os.path.dirname(zero_ext.__file__)})",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda),
        "CPU kernels built": _C.cpu_isas_built(),
        "CPU kernel in use": f"{_C.cpu_isa_selected()} (torch: "
                             f"{torch.backends.cpu.get_cpu_capability()})",
        "CPU threads": str(torch.get_num_threads()),
        "CUDA kernels built": _C.cuda_archs_built() or "no (CPU-only build)",
        "ops (CPU kernel)": ", ".join(_ops_with_kernel("CPU", has_op)),
    }
    if _C.cuda_archs_built():
        info["ops (CUDA kernel)"] = ", ".join(_ops_with_kernel("CUDA", has_op))
        info["GPUs visible"] = _gpus()
    info["distributed"] = str(dist.is_available())
    if dist.is_available():
        info["gloo"] = str(dist.is_gloo_available())
        info["NCCL"] = str(dist.is_nccl_available()) + (
            f" (version {'.'.join(map(str, torch.cuda.nccl.version()))})"
            if dist.is_nccl_available() else "")
    info.update(integration_versions())
    return info


# The libraries zero_ext.integrations works with, and the ones their users mix in: one line
# each. Lightning ships as `lightning` and as the older `pytorch_lightning`; DeepSpeed is named
# because a script moving from it may still import it.
INTEGRATIONS = ("transformers", "accelerate", "trl", "peft", "lightning", "pytorch_lightning",
                "bitsandbytes", "deepspeed")


def integration_versions(names=INTEGRATIONS) -> dict[str, str]:
    """{distribution name: installed version, or "not installed"}, from package metadata
    alone (importing transformers or lightning to ask would take seconds)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _ops_with_kernel(key: str, has_op) -> list[str]:
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("zero_ext::"))
    return [n.split("::")[1] for n in names if has_op(n, key)] or ["none"]


def _gpus() -> str:
    if not torch.cuda.is_available():
        return "none"
    names = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        names.append(f"{i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return "; ".join(names)


def main() -> None:
    info = collect()
    width = max(map(len, info))
    for name, value in info.items():
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
