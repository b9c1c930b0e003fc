"""Launching the tests' multi-rank scripts: torchrun (or another launcher) on this host's CPU,
bounded in time, with the output of a failure in the test's message."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

# One thread per rank (two ranks share the machine's cores); no tokenizer thread pools.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], timeout: float, *, env: dict | None = None, unset: tuple = (),
           cwd: str | None = None) -> subprocess.CompletedProcess:
    """Runs `cmd` (environment: this one, QUIET_ENV, `env`, less `unset`); fails the test with
    its output when it fails or runs past `timeout` seconds."""
    full_env = {**os.environ, **QUIET_ENV, **(env or {})}
    for name in unset:
        full_env.pop(name, None)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                env=full_env, cwd=cwd, check=False)
    except subprocess.TimeoutExpired as error:
        err = error.stderr or ""
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        pytest.fail(f"{' '.join(cmd)} ran past {timeout}s:\n{err[-3000:]}")
    assert result.returncode == 0, (f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n"
                                    f"{result.stderr[-6000:]}")
    return result


def torchrun(args: list[str], timeout: float, *, nproc: int = 2,
             **kwargs) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=<nproc> <args>` on a free local port (see launch())."""
    return launch([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args],
                  timeout, **kwargs)
