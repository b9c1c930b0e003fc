"""Runs a function on N local processes joined in a gloo group; fails together, never hangs.

    results = run_group(world_size, fn, *args)   # fn(*args) runs on every rank

Each rank is a fresh `spawn`ed Python process (so nothing leaks between groups) joined through
a file store in a temporary directory. `fn` must be importable (a module-level function). The
value each rank returns comes back in rank order. If any rank raises, the others are killed at
once and the parent raises one error holding every failing rank's traceback; if the group is
still running after `timeout` seconds, all ranks are killed and the parent says which were
still running. Before killing a rank that is still running, the parent has it write every
thread's Python stack (faulthandler, on SIGUSR1) and puts them in the error: a rank that hung
or froze shows where. Process start-up (importing torch) dominates on small machines, so
callers run many cases inside one group rather than one group per case; a case that leaves
collectives pending (a stall test) calls `restart_group()` on every rank to continue in a fresh
group.
"""

from __future__ import annotations

import faulthandler
import io
import os
import queue
import signal
import tempfile
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

_GROUP_TIMEOUT = timedelta(seconds=120)
_restarts = {"init_file": None, "count": 0, "retired": []}
_STACKS_SIGNAL = signal.SIGUSR1  # the parent asks a rank it is about to kill for its stacks
_stacks_file = None  # kept open for faulthandler


def restart_group() -> None:
    """Collective: aborts this process's gloo group (a stalled collective may still be pending
    in it) and joins a fresh one through a new file store, so the next case starts clean. The
    old group object is kept: freeing a gloo group with a collective pending blocks until its
    timeout (its destructor joins the worker threads)."""
    import torch
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    _restarts["retired"].append(dist.group.WORLD)
    dist.group.WORLD._get_backend(torch.device("cpu")).abort()
    dist.destroy_process_group()
    _restarts["count"] += 1
    dist.init_process_group("gloo", init_method=f"file://{_restarts['init_file']}."
                            f"{_restarts['count']}", rank=rank, world_size=world_size,
                            timeout=_GROUP_TIMEOUT)


def _stacks_path(init_file: str, rank: int) -> str:
    return f"{init_file}.stacks.{rank}"


def _worker(rank, world_size, init_file, fn, args, results):
    global _stacks_file
    _restarts["init_file"] = init_file
    # Open for the life of the process: faulthandler writes to it on the signal.
    _stacks_file = open(_stacks_path(init_file, rank), "w")  # noqa: SIM115
    faulthandler.register(_STACKS_SIGNAL, file=_stacks_file, all_threads=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=_GROUP_TIMEOUT)
        try:
            value = fn(*args)
        finally:
            dist.destroy_process_group()
        # As bytes: torch's pickler would share tensors through file descriptors that die
        # with this process.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # report everything, including assertion failures in fn
        results.put((rank, False, traceback.format_exc()))


def _stacks_of(procs, ranks: list[int], init_file: str) -> dict[int, str]:
    """Every thread's Python stack of each rank in `ranks` (still running when the group
    failed), written by the rank itself on SIGUSR1: what each wrote within 2 s, once its file
    stopped growing."""
    for r in ranks:
        try:
            os.kill(procs[r].pid, _STACKS_SIGNAL)
        except OSError:
            pass
    sizes: dict[int, int] = {}
    stacks: dict[int, str] = {}
    deadline = time.monotonic() + 2.0
    while len(stacks) < len(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
        for r in ranks:
            try:
                size = os.path.getsize(_stacks_path(init_file, r))
            except OSError:
                continue
            if size and sizes.get(r) == size and r not in stacks:
                with open(_stacks_path(init_file, r)) as f:
                    stacks[r] = f.read()
            sizes[r] = size
    return stacks


def run_group(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, results),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        values, errors = {}, {}
        timed_out = False
        deadline = time.monotonic() + timeout
        try:
            while len(values) + len(errors) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                try:
                    rank, ok, value = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                            and r not in values and r not in errors]
                    for r in dead:
                        errors[r] = f"rank {r} exited with code {procs[r].exitcode}"
                    if errors:
                        break
                    continue
                (values if ok else errors)[rank] = value
                if errors:
                    break  # the others may be blocked in a collective: stop them
        finally:
            running = [r for r, p in enumerate(procs)  # not those exiting after reporting
                       if p.is_alive() and r not in values and r not in errors]
            stacks = _stacks_of(procs, running, init_file) if errors or timed_out else {}
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
        dumps = "".join(f"\n--- rank {r} was still running; its threads' stacks ---\n{st}"
                        for r, st in sorted(stacks.items()))
        if timed_out:
            raise TimeoutError(f"distributed group of {world_size} timed out after {timeout:.0f}s; "
                               f"ranks still running: {running}{dumps}")
        if errors:
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            text += dumps
            raise RuntimeError(f"distributed group of {world_size} failed:\n{text}")
        import torch

        return [torch.load(io.BytesIO(values[r]), weights_only=False) for r in range(world_size)]
