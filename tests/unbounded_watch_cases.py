"""Stalls under an unbounded backend (NCCL's semantics) on two gloo ranks, and how each rank's
process ends.

    python tests/unbounded_watch_cases.py [--backend nccl] SCENARIO ...   # a JSON line each

NCCL's Work.wait() does not block the host (it orders the CUDA stream), so the stall watch
cannot bound it; it lists each collective in flight and its heartbeat thread diagnoses the
oldest one that has not completed within the stall timeout (comm/watch_inflight.py).
Here the watch is switched to that path (`bounded = False`) on gloo, whose Work is then the
completion probe; with --backend nccl (a GPU: both ranks on GPU 0, each its own NCCL host over
loopback sockets) it is NCCL's own path, with CUDA events as the probes. Rank 1 skips the optimizer step's collectives; rank 0 enters them.
Scenarios:
  blocked    rank 0's wait blocks inside gloo (as a CUDA synchronize behind the stalled
             collective would): no signal handler can run there, so the process must end
             itself with the report; rank 1 sits idle in its own code and raises it (and then
             stays, as NCCL would not see it gone).
  host_free  rank 0's wait for an all-reduce returns at once, as NCCL's does, and rank 0
             goes on into its own code: both ranks raise the same report.
  sigterm    as host_free, but rank 0 is sent SIGTERM (torchrun's, when a peer failed) 0.9 s
             later, before the stall timeout: it raises that it was waiting in its collective
             in flight; rank 1 is then killed here.
  frozen     rank 1 stops itself (SIGSTOP): rank 0 names it as stopped and ends.
  busy       rank 1 computes in its own code for 4 stall timeouts before the step: progress,
             not a stall; both ranks finish the step and print PROGRESS_CHECKS <diagnoses
             that found only slowness>.
A rank that raises CollectiveStallError writes "RAISED: <report>" on stderr and leaves (status
1, from the watch's exit handler; in "blocked" rank 1 stays until killed).
The parent forks the two ranks (torch and zero_ext imported once) and prints, per scenario,
each rank's exit code (-9: killed here once rank 0 ended; "timeout": still running after
JOB_TIMEOUT_S), the seconds until it ended, and the end of its stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time

import torch

import zero_ext
from zero_ext import comm

import engine_cases  # the tests' model and batches (this script's directory is on sys.path)

STALL_TIMEOUT_S = 1.5
BACKEND = "gloo"  # --backend
JOB_TIMEOUT_S = 60.0


def _idle(seconds: float) -> None:
    """A rank idle in its own code (interrupted by the group's abort)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


def _rank_main(scenario: str, rank: int) -> None:
    model = engine_cases.build_model()
    cfg = engine_cases.config(2, "fp32", 1, 2)
    cfg["zero_ext"] = {"stall_timeout_s": STALL_TIMEOUT_S}
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg)
    watch = comm.current_watch()
    watch.bounded = False  # NCCL's path: the in-flight list, bounded by the heartbeat thread
    assert watch.in_flight.events == (BACKEND == "nccl")
    engine_cases.train_steps(engine, 1)
    tokens, targets = engine_cases.global_batch(1, 2, 1)
    engine.backward(engine_cases.run(engine, tokens[0, rank], targets[0, rank]))
    if scenario == "busy":  # rank 1 computes in its own code for 4 stall timeouts (a diagnosis
        # finds it busy before it arrives, with seconds to spare on a loaded machine)
        end = time.monotonic() + (4 * STALL_TIMEOUT_S if rank == 1 else 0)
        total = 0
        while time.monotonic() < end:
            total += sum(range(1000))
        engine.step()
        print(f"PROGRESS_CHECKS {watch.progress_checks}", file=sys.stderr, flush=True)
        return
    if rank == 1:
        if scenario == "frozen":
            os.kill(os.getpid(), signal.SIGSTOP)
        try:
            _idle(JOB_TIMEOUT_S)
        except comm.CollectiveStallError as error:
            if scenario != "blocked":
                raise
            # Kept alive: its exit would close rank 0's gloo pairs and end rank 0's wait
            # with an error, which NCCL would not do.
            print(f"RAISED: {error}", file=sys.stderr, flush=True)
            time.sleep(JOB_TIMEOUT_S)
        return
    if scenario in ("host_free", "sigterm"):  # the wait returns at once, as NCCL's does
        watch.in_flight.wait = lambda work, record: watch.in_flight.add(record, work)
        comm.all_reduce(torch.ones(8, device=engine.device))  # rank 1 never joins
        if scenario == "sigterm":  # what torchrun sends when a peer failed, here before the
            time.sleep(0.6 * STALL_TIMEOUT_S)  # stall timeout (an event counts as in flight
            os.kill(os.getpid(), signal.SIGTERM)  # after 2 heartbeat periods: 0.75 s)
        _idle(JOB_TIMEOUT_S)
        return
    engine.step()


def _rank(scenario: str, rank: int, store_path: str, stderr_path: str) -> None:
    """The forked rank: its stderr into `stderr_path`; never returns. The group's store is a
    file, as torchrun's lives in its agent: it outlives a rank that ends first."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE="2",
                      ZERO_EXT_CPU_SHM="0")  # gloo's own collectives: their Work is the probe
    err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    if BACKEND == "nccl":  # one GPU: a host of its own per rank, reached over loopback sockets
        os.environ.update(LOCAL_RANK="0", NCCL_HOSTID=f"zero_ext-watch-rank{rank}",
                          NCCL_IB_DISABLE="1")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        torch.cuda.set_device(0)
    torch.distributed.init_process_group(BACKEND, init_method=f"file://{store_path}", rank=rank,
                                         world_size=2)
    try:
        _rank_main(scenario, rank)
    except comm.CollectiveStallError as error:
        print(f"RAISED: {error}", file=sys.stderr, flush=True)
    sys.exit(0)  # the interpreter's normal exit: atexit handlers, finalization


class Job:
    """One scenario's two forked ranks, polled until both ended."""

    def __init__(self, scenario: str):
        # Not a context manager: a forked rank's exit unwinds through this frame too.
        self.scenario = scenario
        self.tmp = tempfile.mkdtemp()
        self.paths = [os.path.join(self.tmp, f"rank{r}.err") for r in range(2)]
        self.pids = []
        self.started = time.monotonic()
        for rank in range(2):
            pid = os.fork()
            if pid == 0:
                _rank(scenario, rank, os.path.join(self.tmp, "store"), self.paths[rank])
            self.pids.append(pid)
        self.codes: dict[int, int | str] = {}
        self.seconds: dict[int, float] = {}

    def poll(self) -> bool:
        """Collects what ended; True once both ranks have."""
        codes, seconds, pids, started = self.codes, self.seconds, self.pids, self.started
        for r, pid in enumerate(pids):
            if r not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[r] = os.waitstatus_to_exitcode(status)
                    seconds[r] = round(time.monotonic() - started, 1)
        # Frozen, or kept alive (7 s more, past the grace of an exit it must not take):
        # nothing else ends rank 1.
        if (self.scenario in ("frozen", "blocked", "sigterm") and 0 in codes
                and 1 not in codes and time.monotonic() > started + seconds[0] + (
                    7 if self.scenario == "blocked" else 0)):
            os.kill(pids[1], signal.SIGKILL)
        if time.monotonic() > started + JOB_TIMEOUT_S:  # a hang is reported as "timeout"
            for r, pid in enumerate(pids):
                if r not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    codes[r] = "timeout"
        return len(codes) == 2

    def result(self) -> dict:
        stderr = []
        for path in self.paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                stderr.append(f.read()[-6000:])
        shutil.rmtree(self.tmp, ignore_errors=True)
        return {"scenario": self.scenario, "exits": [self.codes[0], self.codes[1]],
                "seconds": [self.seconds.get(0), self.seconds.get(1)], "stderr": stderr}


def run(scenarios: list[str], parallel: bool):
    """Yields each scenario's result as it ends; `parallel`: the ranks of every scenario but
    "busy" at once (what they measure is stall timeouts, not CPU time), then "busy" alone (its
    busy rank must get the CPU time that tells progress), else one scenario after another."""
    side_by_side = [s for s in scenarios if s != "busy"] if parallel else []
    pending = [Job(scenario) for scenario in side_by_side]
    while pending:
        for job in [job for job in pending if job.poll()]:
            pending.remove(job)
            yield job.result()
        time.sleep(0.02)
    for scenario in [s for s in scenarios if s not in side_by_side]:
        job = Job(scenario)
        while not job.poll():
            time.sleep(0.02)
        yield job.result()


if __name__ == "__main__":
    torch.set_num_threads(1)
    names = sys.argv[1:]
    if names[:1] == ["--backend"]:
        BACKEND, names = names[1], names[2:]
    # On gloo the scenarios run side by side (~30 s instead of ~55 s); on one GPU in turn.
    for result in run(names, parallel=BACKEND == "gloo"):
        print(json.dumps(result), flush=True)
