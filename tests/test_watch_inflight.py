"""comm/watch_inflight.py's bookkeeping on NCCL's path, in one process: the CUDA probes
(zero_ext._C.cuda_probe_record / cuda_probes_completed, csrc/probes_cuda.cu) replaced by a
recording fake with the same contract, the Works by fakes, the watch by the few fields it reads.
The whole path over gloo processes is tests/test_stall.py's; over NCCL, gpu_check's nccl_stall.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import zero_ext._C

from zero_ext.comm.watch import CollectiveRecord
from zero_ext.comm.watch_inflight import InFlight, _Retirement


class FakeProbes:
    """Events by handle: record takes one from the pool or a new one; completed counts the
    leading completed handles and returns them to the pool, as the C++ does."""

    def __init__(self):
        self.done: dict[int, bool] = {}
        self.pool: list[int] = []
        self.devices: list[int] = []
        self.next = 1000

    def record(self, device: int) -> int:
        self.devices.append(device)
        if self.pool:
            handle = self.pool.pop()
        else:
            handle, self.next = self.next, self.next + 8
        self.done[handle] = False
        return handle

    def completed(self, device: int, handles: list[int]) -> int:
        count = 0
        for handle in handles:
            if not self.done[handle]:
                break
            count += 1
        self.pool += handles[:count]
        return count


class FakeWork:
    def __init__(self, in_flight: InFlight | None = None):
        self.in_flight, self.finished, self.listed_before_wait = in_flight, False, None

    def wait(self):
        if self.in_flight is not None:  # the entry is listed while the wait runs
            self.listed_before_wait = self.in_flight.entries[-1][1] is self

    def is_completed(self) -> bool:
        return self.finished


class FakeWatch:
    def __init__(self, timeout: float = 10.0):
        self.timeout, self.abort_report, self.diagnoses = timeout, None, []
        self.diagnosis = self
        self.errors: list[Exception] = []

    def _heartbeat_error(self, error: Exception) -> None:
        self.errors.append(error)

    def diagnose(self, record, work, since=None):  # as StallDiagnosis.diagnose: slow
        self.diagnoses.append((record.seq, since))
        return False


def _record(seq: int) -> CollectiveRecord:
    return CollectiveRecord(seq, "all_reduce", 4, "float32", None, None, "test", 0, 0.0)


@pytest.fixture
def probes(monkeypatch):
    fake = FakeProbes()
    monkeypatch.setattr(zero_ext._C, "cuda_probe_record", fake.record, raising=False)
    monkeypatch.setattr(zero_ext._C, "cuda_probes_completed", fake.completed, raising=False)
    return fake


def test_an_entry_is_listed_before_the_wait_and_keeps_an_event_not_the_work(probes):
    in_flight = InFlight(FakeWatch(), events=True, device=3)
    work = FakeWork(in_flight)
    in_flight.wait(work, _record(1))
    assert work.listed_before_wait  # a barrier's wait blocks the host: it is listed first
    entry = in_flight.entries[0]
    assert entry[1] == 1000 and probes.devices == [3]  # the Work is dropped for the event
    assert entry[0].seq == 1 and entry[3] is False


def test_retire_drops_the_completed_prefix_and_pools_its_events(probes):
    in_flight = InFlight(FakeWatch(), events=True, device=0)
    for seq in (1, 2, 3):
        in_flight.wait(FakeWork(), _record(seq))
    handles = [entry[1] for entry in in_flight.entries]
    entries = list(in_flight.entries)
    probes.done[handles[0]] = probes.done[handles[2]] = True  # the 3rd done, the 2nd not yet
    in_flight.retire()
    assert [e[0].seq for e in in_flight.entries] == [2, 3]
    assert entries[0][3] and not entries[1][3] and not entries[2][3]
    assert probes.pool == [handles[0]]
    probes.done[handles[1]] = True
    in_flight.retire()
    assert not in_flight.entries and all(e[3] for e in entries)
    in_flight.wait(FakeWork(), _record(4))  # a pooled event is reused
    assert in_flight.entries[0][1] in handles


def test_every_completed_entry_is_retired_however_many_came_in_one_period(probes):
    in_flight = InFlight(FakeWatch(), events=True, device=0)
    for seq in range(1, 1001):  # stage 3 issues hundreds of collectives a second
        in_flight.wait(FakeWork(), _record(seq))
    for handle in probes.done:
        probes.done[handle] = True
    in_flight.retire()
    assert not in_flight.entries and len(probes.pool) == 1000


def test_on_nccl_an_entry_still_holding_its_work_waits_for_its_event(probes):
    # The main thread is in the entry's wait (a barrier blocks the host): whatever the Work
    # says, the entry stays until its event is recorded and completes, so the event recorded
    # then cannot be left outside the pool, nor a probe be read half replaced.
    in_flight = InFlight(FakeWatch(), events=True, device=0)
    in_flight.wait(FakeWork(), _record(1))
    work = FakeWork()
    work.finished = True
    entry = in_flight.add(_record(2), work)
    probes.done[in_flight.entries[0][1]] = True
    in_flight.retire()
    assert list(in_flight.entries) == [entry] and not entry[3]
    entry[1] = probes.record(0)
    probes.done[entry[1]] = True
    in_flight.retire()
    assert not in_flight.entries and entry[3] and probes.pool == [entry[1]]  # reused, once


def test_an_entry_without_a_probe_is_not_waited_for(probes, monkeypatch):
    # Recorded inside a CUDA graph capture the C++ gives no probe (0): nothing to watch.
    monkeypatch.setattr(zero_ext._C, "cuda_probe_record", lambda device: 0, raising=False)
    in_flight = InFlight(FakeWatch(), events=True, device=0)
    in_flight.wait(FakeWork(), _record(1))
    assert in_flight.entries[0][1] is None
    in_flight.retire()
    assert not in_flight.entries


def test_a_wait_that_failed_leaves_nothing_to_wait_for(probes):
    class FailingWork(FakeWork):
        def wait(self):
            raise RuntimeError("NCCL error: remote process exited")

    in_flight = InFlight(FakeWatch(), events=True, device=0)
    with pytest.raises(RuntimeError, match="NCCL error"):
        in_flight.wait(FailingWork(), _record(1))
    in_flight.wait(FakeWork(), _record(2))
    probes.done[in_flight.entries[1][1]] = True
    in_flight.retire()  # the failed one holds no Work that the later ones would wait behind
    assert not in_flight.entries


def test_a_failing_probe_query_is_reported_and_the_stall_check_goes_on(probes, monkeypatch):
    watch = FakeWatch(timeout=0.2)
    in_flight = InFlight(watch, events=True, device=0)
    in_flight.wait(FakeWork(), _record(7))

    def failing(device, handles):
        raise RuntimeError("zero_ext: stall-watch probe: query failed: an illegal access")

    monkeypatch.setattr(zero_ext._C, "cuda_probes_completed", failing, raising=False)
    in_flight.entries[0][2] -= 1.0
    in_flight.check()
    deadline = time.monotonic() + 5
    while in_flight.diagnosis_ident is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [str(e) for e in watch.errors] == [
        "zero_ext: stall-watch probe: query failed: an illegal access"]
    assert [seq for seq, _ in watch.diagnoses] == [7]
    assert len(in_flight.entries) == 1 and probes.pool == []


def test_a_work_still_waited_for_is_retired_by_its_own_completion(probes):
    # Other backends' entries hold their Work (no event).
    in_flight = InFlight(FakeWatch(), events=False, device=None)
    works = [FakeWork(), FakeWork()]
    for seq, work in enumerate(works, 1):
        in_flight.wait(work, _record(seq))
    works[1].finished = True
    in_flight.retire()
    assert len(in_flight.entries) == 2  # in order: the first has not completed
    works[0].finished = True
    in_flight.retire()
    assert not in_flight.entries


def test_retirement_is_per_entry_not_by_sequence_number(probes):
    # Handles are waited in another order than issued (a prefetch waited late): #12 retired
    # says nothing of #11.
    in_flight = InFlight(FakeWatch(), events=True, device=0)
    in_flight.wait(FakeWork(), _record(12))
    in_flight.wait(FakeWork(), _record(11))
    first, second = list(in_flight.entries)
    probes.done[first[1]] = True
    in_flight.retire()
    with pytest.raises(RuntimeError, match="timed out"):
        _Retirement(second).wait(timedelta(seconds=0.1))
    assert _Retirement(first).wait(timedelta(seconds=0.1))


def test_a_diagnosis_starts_after_the_stall_timeout_once_and_again_after_another(probes):
    watch = FakeWatch(timeout=0.3)
    in_flight = InFlight(watch, events=True, device=0)
    in_flight.wait(FakeWork(), _record(5))
    in_flight.check()
    assert not watch.diagnoses  # younger than the timeout
    in_flight.entries[0][2] -= 0.5
    in_flight.check()
    in_flight.check()  # one at a time
    deadline = time.monotonic() + 5
    while in_flight.diagnosis_ident is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [seq for seq, _ in watch.diagnoses] == [5]
    assert watch.diagnoses[0][1] == in_flight.entries[0][2]  # since the wait began
    in_flight.check()  # found only slow: not again before another timeout
    assert len(watch.diagnoses) == 1
    in_flight.next_diagnosis = 0.0
    in_flight.check()
    while in_flight.diagnosis_ident is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(watch.diagnoses) == 2
    watch.abort_report = "reported"  # after a report nothing more is diagnosed
    in_flight.next_diagnosis = 0.0
    in_flight.check()
    assert in_flight.diagnosis_ident is None and len(watch.diagnoses) == 2


def test_unfinished_names_the_oldest_collective_known_not_to_have_completed(probes):
    # For SIGTERM's report, from the main thread: nothing is retired or queried there.
    in_flight = InFlight(FakeWatch(), events=False, device=None)
    done, open_ = FakeWork(), FakeWork()
    done.finished = True
    in_flight.wait(done, _record(1))
    in_flight.wait(open_, _record(2))
    assert in_flight.unfinished(1.0)[0].seq == 2  # a Work says whether it completed
    open_.finished = True
    assert in_flight.unfinished(1.0) is None
    events = InFlight(FakeWatch(), events=True, device=0)
    events.wait(FakeWork(), _record(3))
    assert events.unfinished(1.0) is None  # an event: only once listed for min_age
    events.entries[0][2] -= 1.5
    record, since = events.unfinished(1.0)
    assert record.seq == 3 and since == events.entries[0][2]
