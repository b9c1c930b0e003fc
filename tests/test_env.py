"""`python -m zero_ext.env`: the integration libraries' versions, read without importing them."""

import importlib.metadata
import subprocess
import sys

from zero_ext.env import INTEGRATIONS, integration_versions


def _installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def test_env_lists_each_integration_with_its_version_without_importing_it():
    # One process runs the report and then says which of the libraries it had imported.
    code = ("import sys, runpy; sys.argv = ['zero_ext.env']; "
            "runpy.run_module('zero_ext.env', run_name='__main__'); "
            f"print('imported:', sorted(set({list(INTEGRATIONS)!r}) & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    lines = dict(line.split(None, 1) for line in out.splitlines()
                 if line.split(None, 1)[0] in INTEGRATIONS)
    for name in ("transformers", "accelerate", "trl", "peft", "lightning", "deepspeed"):
        assert lines[name].strip() == _installed(name), (name, out)
    assert out.splitlines()[-1] == "imported: []", out


def test_a_missing_library_reads_not_installed():
    assert integration_versions(("zero-ext-no-such-library", "torch")) == {
        "zero-ext-no-such-library": "not installed", "torch": _installed("torch")}
