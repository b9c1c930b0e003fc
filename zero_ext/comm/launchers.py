"""Where a process sits in its job when torchrun did not start it: MPI's and Slurm's variables.

DeepSpeed's `init_distributed(auto_mpi_discovery=True)` asks mpi4py for the rank and world size
when torchrun's variables are absent, and its MPI and Slurm runners (`deepspeed --launcher
openmpi|mpich|impi|mvapich|slurm`) start processes that way. Read without mpi4py here, from the
variables each launcher sets; without them, N processes would each start a one-rank group and
train N unrelated copies of the model, writing the same checkpoints.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["Launched", "fill_from_launcher", "launched_by"]


class Launched(NamedTuple):
    launcher: str
    rank: int
    world_size: int
    local_rank: int | None
    local_size: int | None


_SRUN = "Slurm's srun"
# An interactive shell that `srun -n8 --pty bash` opened keeps the step's variables, which then
# describe the step, not a python started from that shell.
_SRUN_SHELL = (". In a shell that `srun --pty` opened, these variables describe the srun step, "
               "not this process: start the ranks with torchrun or srun from there")

# launcher, rank, world size, local rank, ranks on this node. Slurm's are srun's step
# variables (a batch script's one process has SLURM_NTASKS of the whole allocation).
_LAUNCHERS = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH / Intel MPI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    (_SRUN, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
     "SLURM_STEP_TASKS_PER_NODE"),
)


def _int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def launched_by() -> Launched | None:
    """The MPI or Slurm launcher that started this process as one of several, or None."""
    for launcher, rank, size, local_rank, local_size in _LAUNCHERS:
        if _int(rank) is not None and (_int(size) or 0) > 1:
            return Launched(launcher, _int(rank), _int(size), _int(local_rank),
                            _int(local_size))
    return None


def fill_from_launcher(hint: str) -> str | None:
    """Sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from the launcher's variables
    where they are unset (a value already set must agree), so the group torchrun's variables
    describe is the launcher's. MASTER_ADDR and MASTER_PORT must come from the job (DeepSpeed's
    MPI runners export them): where they are missing, a RuntimeError says what to set. Returns
    the launcher's name, or None when none started this process as one of several."""
    launched = launched_by()
    if launched is None:
        return None
    wanted = {"RANK": launched.rank, "WORLD_SIZE": launched.world_size,
              "LOCAL_RANK": launched.local_rank, "LOCAL_WORLD_SIZE": launched.local_size}
    for name, value in wanted.items():
        if value is not None and os.environ.get(name, str(value)) != str(value):
            raise RuntimeError(
                f"zero_ext: {name}={os.environ[name]} but {launched.launcher} started this "
                f"process with {name.lower().replace('_', ' ')} {value}; unset {name} or make "
                "it agree")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"zero_ext: {launched.launcher} started this process as rank {launched.rank} of "
            f"{launched.world_size}, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not set, so the ranks cannot find each other (without them each would train "
            "alone). Export MASTER_ADDR=<the first node's address> and MASTER_PORT=<a free "
            f"port> to every rank (deepspeed's MPI launchers do), or {hint}"
            f"{_SRUN_SHELL if launched.launcher == _SRUN else ''}")
    for name, value in wanted.items():
        if value is not None:
            os.environ.setdefault(name, str(value))
    return launched.launcher
