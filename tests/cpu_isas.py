"""Runs a script once under each CPU kernel variant that zero_ext compiled and this CPU supports.

    runs = run_under_each_isa(script, inputs, tmp_path)   # {"DEFAULT": ..., "AVX2": ..., ...}

Each run is a fresh Python process with ATEN_CPU_CAPABILITY forcing the variant, since the choice
is made once per process. Used by test_adamw_ops.py and test_bucket_ops.py to check that every
variant gives the same results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import zero_ext


def supported_compiled_isas() -> list[str]:
    """The variants zero_ext was built with (DEFAULT, AVX2, AVX512) that this CPU can run."""
    capability = torch.backends.cpu.get_cpu_capability()
    supported = {"DEFAULT": True, "AVX2": capability in ("AVX2", "AVX512"),
                 "AVX512": capability == "AVX512"}
    return [isa for isa in zero_ext._C.cpu_isas_built().split(",") if supported.get(isa, False)]


def run_under_each_isa(script: str, inputs, tmp_path: Path) -> dict[str, dict]:
    """What `script` saved under each of supported_compiled_isas(), by variant.

    `inputs` is saved once with torch.save; the script runs as `python -c script INPUTS OUT`, so
    it reads them from sys.argv[1] and must torch.save a dict to sys.argv[2] whose "isa" is
    zero_ext._C.cpu_isa_selected(), checked here to be the variant asked for.
    """
    inputs_path = tmp_path / "inputs.pt"
    torch.save(inputs, inputs_path)
    runs = {}
    for isa in supported_compiled_isas():
        out_path = tmp_path / f"{isa}.pt"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": isa.lower()}
        subprocess.run([sys.executable, "-c", script, str(inputs_path), str(out_path)], env=env,
                       check=True)
        run = torch.load(out_path)
        assert run["isa"] == isa, f"ATEN_CPU_CAPABILITY={isa.lower()} ran the {run['isa']} kernels"
        runs[isa] = run
    return runs
