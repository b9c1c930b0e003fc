"""Runs short two-rank jobs many times and reports how each rank's process ended.

    python tests/exit_cases.py SCENARIO RUNS     # prints one JSON line: {"exits": [[rc0, rc1], ...]}

Used by tests/test_misuse.py to check that no rank ends in SIGABRT ("terminate called without
an active exception") once its work is done, whatever the work ended with. torch and zero_ext
are imported once; each job's two ranks are forked from this process (no thread or process
group exists in it yet), so a job costs what its training costs, not an interpreter start.
A rank's exit code is its process's: 0, 1 for a Python error, -6 for SIGABRT; "timeout"
when the job had not ended after JOB_TIMEOUT_S (its ranks are then killed).

Scenarios (each rank runs, then leaves through the interpreter's normal exit):
  train        a few steps at stage 2 with offload_optimizer, without destroy_process_group()
  raise        as train, but rank 1 raises in its second forward (rank 0 is then left waiting
               in a collective until rank 1's exit ends it)
  mixed        rank 0 at stage 2, rank 1 at stage 3: refused at initialize, then exit
  destroyed    as train, then destroy_process_group() (as examples/train_gpt.py ends) while
               the engine still holds the group, and a last collective that the gloo worker
               finishes while the main thread holds the GIL: the worker's release of its
               tensors waits for the GIL until the interpreter exits (made certain here with a
               long switch interval; in a plain run, ~1 exit in 10)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import torch

import zero_ext

import engine_cases  # the tests' model and batches (this script's directory is on sys.path)

JOB_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(scenario: str, rank: int) -> None:
    stage = 3 if scenario == "mixed" and rank == 1 else 2
    model = engine_cases.build_model()
    # Offload's worker thread is joined at exit, which would hand the GIL over in time.
    offload = {} if scenario == "destroyed" else {"offload_optimizer": {"device": "cpu"}}
    cfg = engine_cases.config(stage, "fp32", 1, 2, clip=0.0, **offload)
    # The mixed job's ranks never meet; the raise job's rank 0 waits for the stall to end it.
    cfg["zero_ext"] = {"stall_timeout_s": 2 if scenario == "raise" else 5}
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg)
    for step in range(3):
        tokens, targets = engine_cases.global_batch(step, 2, 1)
        if scenario == "raise" and rank == 1 and step == 1:
            raise RuntimeError("raised in forward on purpose")
        engine.backward(engine_cases.run(engine, tokens[0, rank], targets[0, rank]))
        engine.step()
    if scenario == "destroyed":
        group = torch.distributed.group.WORLD
        torch.distributed.destroy_process_group()
        time.sleep(1.2)  # the stall watch's heartbeat sees the group gone and ends
        sys.setswitchinterval(30.0)  # the main thread keeps the GIL while it runs Python
        if rank == 1:
            time.sleep(0.2)  # rank 0's collective finishes later, while it runs Python
        group.allgather([[torch.empty(1000) for _ in range(2)]], [torch.ones(1000)])
        # Long enough that rank 1's part arrives inside the loop on a loaded machine too (at
        # 0.5 s it once came after rank 0's exit: a collective still running at exit, which
        # no exit handler can finish, not the race this scenario is about).
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            pass


def _job(scenario: str) -> list[int]:
    port = _free_port()
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                              WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            _rank_main(scenario, rank)
            sys.exit(0)  # the interpreter's normal exit: atexit handlers, finalization
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:  # a hang is reported as "timeout", not waited out
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    codes[pid] = "timeout"
        time.sleep(0.01)
    return [codes[pid] for pid in pids]


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, runs = sys.argv[1], int(sys.argv[2])
    print(json.dumps({"scenario": scenario, "exits": [_job(scenario) for _ in range(runs)]}))
