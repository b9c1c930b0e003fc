"""What each rank runs in the stall tests: misuse that used to hang (or silently exchange
garbage) for the 30-minute collective timeout, each now ending within seconds with the same
CollectiveStallError (or, for differing settings, ValueError) on every rank.

Every case returns this rank's outcome {"error": class name or None, "message", "seconds"} and
the group is restarted after it (dist_harness.restart_group), since a stalled collective may
still be pending in gloo.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time

import torch
from torch import nn

import zero_ext
from zero_ext import comm
from zero_ext.checkpoint import files

from dist_harness import restart_group

STALL_TIMEOUT_S = 1.5
WATCH_SETTINGS = {"zero_ext": {"stall_timeout_s": STALL_TIMEOUT_S}}  # the old-code demo empties it
DIM, BATCH = 8, 4


class Blocks(nn.Module):
    """Three blocks of equal size (stage-3 units of equal numel) and a head; `skip` and `aux`
    make the forward differ across ranks as LayerDrop and rank-dependent routing do."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(3))
        self.aux = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 1)

    def forward(self, x, skip: int | None = None, use_aux: bool = False):
        for i, block in enumerate(self.blocks):
            if i != skip:
                x = torch.tanh(block(x))
        if use_aux:
            x = x + self.aux(x)
        return self.head(x).pow(2).mean()


def config(stage: int, **top) -> dict:
    return {"train_micro_batch_size_per_gpu": BATCH, "steps_per_print": 10**6,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            **WATCH_SETTINGS, **top}


def engine_for(stage: int, **top):
    torch.manual_seed(0)
    engine, _, _, _ = zero_ext.initialize(model=Blocks(), config=config(stage, **top))
    return engine


def train_step(engine, step: int = 0, **forward) -> None:
    gen = torch.Generator().manual_seed(100 * step + comm.rank())
    engine.backward(engine(torch.randn(BATCH, DIM, generator=gen), **forward))
    engine.step()


# -- the cases -------------------------------------------------------------------------------
def save_checkpoint_on_rank0_only():
    engine = engine_for(2)
    train_step(engine)
    if comm.rank() == 0:
        engine.save_checkpoint(tempfile.mkdtemp())
    else:
        train_step(engine, 1)


def load_checkpoint_on_rank0_only():
    engine = engine_for(1)
    train_step(engine)
    path = comm.all_gather_object(tempfile.mkdtemp())[0]
    engine.save_checkpoint(path)
    if comm.rank() == 0:
        engine.load_checkpoint(path)
    else:
        train_step(engine, 1)


def save_16bit_model_on_rank0_only():
    engine = engine_for(3)
    train_step(engine)
    if comm.rank() == 0:
        engine.save_16bit_model(tempfile.mkdtemp())
    else:
        train_step(engine, 1)


def uneven_batches_then_save():
    engine = engine_for(2)
    for step in range(3 if comm.rank() == 0 else 2):
        train_step(engine, step)
    engine.save_checkpoint(comm.all_gather_object(tempfile.mkdtemp())[0])


def stage3_block_skipped_on_one_rank():
    """LayerDrop on rank 1: it gathers block 2 where rank 0 gathers block 1, units of equal
    size: without fingerprints this exchanges garbage without hanging."""
    engine = engine_for(3)
    for step in range(2):
        train_step(engine, step, skip=1 if comm.rank() == 1 else None)


def submodule_used_on_one_rank():
    engine = engine_for(3)
    for step in range(2):
        train_step(engine, step, use_aux=comm.rank() == 0)


def stuck_in_user_code():
    """Rank 1 sits in its own loop after backward while rank 0 waits in step()."""
    engine = engine_for(2)
    train_step(engine)
    gen = torch.Generator().manual_seed(7)
    engine.backward(engine(torch.randn(BATCH, DIM, generator=gen)))
    if comm.rank() == 1:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # interrupted by the other rank's abort
            time.sleep(0.05)
        return
    engine.step()


def busy_in_user_code_progresses():
    """Rank 1 computes in its own code (a rank-0-only evaluation, say) for 2.5 stall timeouts
    after backward while rank 0 waits in step(): its main thread keeps using CPU, so rank 0
    diagnoses, finds progress, and keeps waiting."""
    engine = engine_for(2)
    train_step(engine)
    gen = torch.Generator().manual_seed(7)
    engine.backward(engine(torch.randn(BATCH, DIM, generator=gen)))
    started = time.monotonic()
    if comm.rank() == 1:
        total = 0
        while time.monotonic() < started + 2.5 * STALL_TIMEOUT_S:
            total += sum(range(1000))
    engine.step()
    return {"seconds": time.monotonic() - started,
            "progress_checks": comm.current_watch().progress_checks}


def accumulation_differs():
    engine_for(2, gradient_accumulation_steps=1 + comm.rank())


def lr_differs():
    torch.manual_seed(0)
    model = Blocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 * (1 + comm.rank()))
    zero_ext.initialize(model=model, optimizer=optimizer, config=config(2))


def frozen_rank():
    """Rank 1 stops itself (SIGSTOP: its heartbeat stops too) while rank 0 waits in a
    collective; rank 0 resumes it after raising, and rank 1 then raises the same report."""
    engine = engine_for(2)
    train_step(engine)
    pids = comm.all_gather_object(os.getpid())
    if comm.rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
        comm.barrier()
        return
    try:
        engine.save_checkpoint(tempfile.mkdtemp())
    finally:
        os.kill(pids[1], signal.SIGCONT)


class SlowToPickle:
    """An object whose pickling (inside all_gather_object, after the collective was entered)
    takes `seconds`: a rank that has joined a collective and is slow in it, as with a large
    object or a large checkpoint exchange."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __reduce__(self):
        time.sleep(self.seconds)
        return (str, ("slow",))


def slow_collective_progresses():
    """Rank 1 takes over twice the stall timeout inside a collective every rank has joined: the
    waiting rank diagnoses, finds everyone at the same collective, and keeps waiting."""
    started = time.monotonic()
    values = comm.all_gather_object(SlowToPickle(2.2 * STALL_TIMEOUT_S) if comm.rank() == 1
                                    else "fast")
    return {"seconds": time.monotonic() - started, "values": values,
            "progress_checks": comm.current_watch().progress_checks}


def heartbeat_error_keeps_beating():
    """Rank 1's heartbeat thread meets an error that is not the store's (a bug in it, say), once;
    then rank 1 is slow inside a collective for over twice the stall timeout. Its heartbeat
    must go on: rank 0 finds progress, where a dead heartbeat would read as a stopped rank."""
    comm.barrier()  # the group's watch runs from here
    watch = comm.current_watch()
    failed = []
    if comm.rank() == 1:
        state = watch._state

        def failing_once() -> dict:
            if not failed:
                failed.append(True)
                raise TypeError("a bug in the heartbeat's payload")
            return state()

        watch._state = failing_once
        deadline = time.monotonic() + 10 * watch.period
        while not failed and time.monotonic() < deadline:  # until the heartbeat met it
            time.sleep(watch.period / 4)
    started = time.monotonic()
    values = comm.all_gather_object(SlowToPickle(2.2 * STALL_TIMEOUT_S) if comm.rank() == 1
                                    else "fast")
    return {"seconds": time.monotonic() - started, "values": values, "failed": failed,
            "errors": watch._heartbeat_errors, "progress_checks": watch.progress_checks}


def long_checkpoint_write_progresses():
    """Rank 1 writes its checkpoint shard for 2.5 stall timeouts (its hashing thread slowed,
    as a large shard on a slow disk is) while rank 0 waits for it in the save's next
    collective. Rank 1's heartbeats keep beating and say it is busy inside zero_ext: rank 0
    diagnoses, finds progress, and keeps waiting."""
    engine = engine_for(2)
    train_step(engine)
    path = comm.all_gather_object(tempfile.mkdtemp())[0]
    hash_pieces = files._sha256
    slow = [2.5 * STALL_TIMEOUT_S] if comm.rank() == 1 else []

    def slow_once(pieces):
        if slow:
            time.sleep(slow.pop())
        return hash_pieces(pieces)

    files._sha256 = slow_once
    started = time.monotonic()
    try:
        engine.save_checkpoint(path)
    finally:
        files._sha256 = hash_pieces
    return {"seconds": time.monotonic() - started,
            "progress_checks": comm.current_watch().progress_checks}


def equal_size_collectives_differ():
    """Without the debug switch, on gloo's own path: the ranks all-reduce different buckets of
    equal size, which completes with mixed data and never hangs; the heartbeats' running hashes
    of fingerprints disagree within a period or two, and every rank raises."""
    os.environ["ZERO_EXT_CHECK_COLLECTIVES"] = "0"  # read when the group's watch starts
    tensor = torch.zeros(64)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        comm.all_reduce(tensor, bucket=comm.rank())
        time.sleep(0.01)


def gathers_of_different_sizes():
    """Without the debug switch, on gloo's paired all-gather (zero_ext/comm/pairs.py): the
    ranks gather different sizes. Each posts the tag of its own size, so nothing meets (with
    one tag gloo met a message longer than the buffer posted for it and aborted the process),
    and the watch names both collectives."""
    from zero_ext.comm import pairs

    os.environ["ZERO_EXT_CHECK_COLLECTIVES"] = "0"  # read when the group's watch starts
    numel = pairs.MIN_PAIRED_BYTES // 4 * (comm.rank() + 1)
    comm.all_gather(torch.empty(2 * numel), torch.ones(numel))


def sigterm_inside_a_store_call():
    """The launcher's SIGTERM lands while the main thread is inside one of the watch's store
    calls (a diagnosis reading the heartbeats over a failing link, where it spends seconds):
    the report the SIGTERM handler raises reaches the caller. Before, the call's retry took it
    for the store's RuntimeError and swallowed it; the rank went on, marked as having raised,
    and the launcher's next SIGTERM ended it without a word."""
    comm.barrier()  # the group's watch runs from here
    watch = comm.current_watch()
    record = watch.enter("all_reduce", 4, torch.float32)
    watch.waiting, watch.waiting_since = record, time.monotonic()
    delivered = []

    class FailingStore:
        def __getattr__(self, name):
            def call(*args):
                if not delivered and threading.current_thread() is threading.main_thread():
                    delivered.append(name)
                    signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns
                raise RuntimeError("the store did not answer (stall_cases)")
            return call

    watch.store._connected = FailingStore
    try:
        watch.diagnosis.read_all()
    finally:
        del watch.store._connected
        watch.waiting = None


STALLS = [save_checkpoint_on_rank0_only, load_checkpoint_on_rank0_only,
          save_16bit_model_on_rank0_only, uneven_batches_then_save,
          stage3_block_skipped_on_one_rank, submodule_used_on_one_rank, stuck_in_user_code,
          busy_in_user_code_progresses, accumulation_differs, lr_differs, frozen_rank,
          slow_collective_progresses, heartbeat_error_keeps_beating,
          long_checkpoint_write_progresses, equal_size_collectives_differ,
          gathers_of_different_sizes, sigterm_inside_a_store_call]


def run_case(case) -> dict:
    started = time.monotonic()
    try:
        value = case()
        outcome = {"error": None, "message": "", "value": value}
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        outcome = {"error": type(error).__name__, "message": str(error), "value": None}
    outcome["seconds"] = time.monotonic() - started
    return outcome


def run_cases(names: list[str], gloo_variants: list[str]) -> dict:
    """Each named case on this rank, then the ones in `gloo_variants` again with the
    shared-memory transport off (the gloo path's checks), restarting the group after each."""
    comm.set_stall_timeout(STALL_TIMEOUT_S)
    cases = {case.__name__: case for case in STALLS}
    out = {}
    for transport, selected in (("shm", names), ("gloo", gloo_variants)):
        os.environ["ZERO_EXT_CPU_SHM"] = "1" if transport == "shm" else "0"
        # On gloo's own path the switch checks fingerprints before each collective: without
        # it, ranks meeting in collectives of different sizes abort inside gloo.
        os.environ["ZERO_EXT_CHECK_COLLECTIVES"] = "1" if transport == "gloo" else "0"
        for name in selected:
            restart_group()
            out[(transport, name)] = run_case(cases[name])
    restart_group()
    return out
