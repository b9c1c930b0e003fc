"""The stall watch for unbounded backends (NCCL): collectives in flight, bounded from the side.

NCCL's Work.wait() orders the current CUDA stream after the collective and returns at once:
the host blocks later (a synchronize, a copy to the host) or never, so comm/watch.py cannot
bound the wait itself. Instead each collective the main thread waits for is listed here with a
completion probe: a CUDA event recorded after the wait (zero_ext._C.cuda_probe_record: pooled,
and queried without the GIL in thread-local capture mode, csrc/probes_cuda.cu); other
unbounded backends' Work is its own probe. An entry is listed before its wait, as a barrier's
blocks the host. The heartbeat thread retires completed entries every period; when the oldest
has not completed within the stall timeout of its wait, a diagnosis thread (the heartbeat must
keep beating meanwhile, or other ranks would take this rank for stopped) runs the watch's
StallDiagnosis, with completion seen as retirement. A stall's report reaches the main thread as
any peer's abort does; a main thread blocked outside Python (a CUDA synchronize behind the
stalled collective) cannot raise it, so after a grace the process ends with the report on
stderr and status 1, as NCCL's watchdog would end it after the process group's timeout.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zero_ext.comm.watch import CollectiveRecord, CollectiveWatch

__all__ = ["EXIT_GRACE_S", "InFlight"]

EXIT_GRACE_S = 5.0   # after a stall report: the main thread's time to raise it


class InFlight:
    """One watch's collectives in flight (unbounded backends). `events`: probes are CUDA events
    on `device` (NCCL); else the Work itself."""

    def __init__(self, watch: CollectiveWatch, events: bool, device: int | None):
        self.watch = watch
        self.events, self.device = events, device
        # [record, probe, since, retired], oldest first: the main thread appends, the
        # heartbeat thread pops from the left (a deque does both safely) and marks retired.
        # The probe: a Work (while its wait runs, or on other backends), then on NCCL an event
        # handle, or None where none could be recorded (inside a CUDA graph capture).
        self.entries: collections.deque[list] = collections.deque()
        self.diagnosis_ident: int | None = None  # the diagnosis thread while one runs
        self.next_diagnosis = 0.0
        self._exit_lock = threading.Lock()
        self._exit_armed = False

    # -- the main thread -----------------------------------------------------------------------
    def add(self, record: CollectiveRecord, probe) -> list:
        """Lists `record` as in flight from now, with `probe`; returns its entry."""
        entry = [record, probe, time.monotonic(), False]
        self.entries.append(entry)
        return entry

    def wait(self, work, record: CollectiveRecord) -> None:
        entry = self.add(record, work)  # before the wait: a barrier's blocks the host
        try:
            work.wait()
            probe = work
            if self.events:  # the Work would keep the collective's tensors alive until retired
                from zero_ext import _C

                probe = _C.cuda_probe_record(self.device) or None
        except BaseException:
            entry[1] = None  # failed: nothing to wait for (the error is the caller's), and the
            raise            # entries after it must not wait behind it
        entry[1] = probe

    # -- the heartbeat thread ------------------------------------------------------------------
    def oldest(self, min_age: float) -> list | None:
        """[sequence number, seconds] of the oldest collective in flight for at least min_age
        seconds, for the heartbeat; None when there is none."""
        try:
            record, _, since, _ = self.entries[0]
        except IndexError:
            return None
        age = time.monotonic() - since
        return [record.seq, round(age, 1)] if age >= min_age else None

    def unfinished(self, min_age: float) -> tuple[CollectiveRecord, float] | None:
        """(record, since) of the oldest collective known not to have completed, from any
        thread (without retiring anything): a Work that says so, or an event listed for at
        least min_age (the heartbeat retires completed events each period); None if none."""
        now = time.monotonic()
        for record, probe, since, _ in list(self.entries):
            if isinstance(probe, int):
                return (record, since) if now - since >= min_age else None
            if probe is not None and not probe.is_completed():
                return record, since
        return None

    def retire(self) -> None:
        """Drops the entries that completed, oldest first, up to the first that has not."""
        from zero_ext import _C

        probes = [entry[1] for entry in list(self.entries)]  # each read once; the list made
        i = 0                                                # in one step under the GIL
        while i < len(probes):
            probe = probes[i]
            if isinstance(probe, int):
                end = i
                while end < len(probes) and isinstance(probes[end], int):
                    end += 1
                counted = _C.cuda_probes_completed(self.device, probes[i:end])
                self._drop(counted)  # their events are back in the pool: drop them at once
                i += counted
                if i < end:
                    return
            elif probe is None or (not self.events and probe.is_completed()):
                self._drop(1)  # None: no probe (recorded inside a graph capture)
                i += 1
            else:  # not completed; on NCCL its wait is under way (the event comes next)
                return

    def _drop(self, count: int) -> None:
        for _ in range(count):
            self.entries.popleft()[3] = True

    def check(self) -> None:
        """Each heartbeat: retires what completed; when the oldest entry has waited past the
        stall timeout, diagnoses it on a thread of its own (a failed retirement, said once, does
        not stop that)."""
        watch = self.watch
        try:
            self.retire()
        except Exception as error:  # noqa: BLE001 - e.g. a CUDA error from a probe's query
            watch._heartbeat_error(error)
        try:
            entry = self.entries[0]
        except IndexError:
            return
        since = entry[2]
        now = time.monotonic()
        if (self.diagnosis_ident is not None or watch.abort_report is not None
                or now - since < watch.timeout or now < self.next_diagnosis):
            return
        self.diagnosis_ident = -1  # taken: the thread sets its own
        threading.Thread(target=self._diagnose, args=(entry,), name="zero_ext-watch-diagnosis",
                         daemon=True).start()

    def _diagnose(self, entry: list) -> None:
        from zero_ext.comm.watch import CollectiveStallError

        watch = self.watch
        record, since = entry[0], entry[2]
        self.diagnosis_ident = threading.get_ident()
        try:
            if not watch.diagnosis.diagnose(record, _Retirement(entry), since=since):
                self.next_diagnosis = time.monotonic() + watch.timeout  # only slow
        except CollectiveStallError as error:  # published; now the main thread raises it
            watch._deliver(str(error))
        except Exception as error:  # noqa: BLE001 - a bug here must not kill the watch
            watch._heartbeat_error(error)
            self.next_diagnosis = time.monotonic() + watch.timeout
        finally:
            self.diagnosis_ident = None

    # -- after a stall report ------------------------------------------------------------------
    def end_unless_raised(self, report: str) -> None:
        """Once per watch: gives the main thread EXIT_GRACE_S to raise `report` (at once where
        it runs Python: the signal, or its next collective), then ends the process with it."""
        with self._exit_lock:
            if self._exit_armed:
                return
            self._exit_armed = True
        threading.Thread(target=self._end_unless_raised, args=(report,),
                         name="zero_ext-watch-exit", daemon=True).start()

    def _end_unless_raised(self, report: str) -> None:
        from zero_ext.comm.watch import CollectiveStallError, _where

        watch = self.watch
        deadline = time.monotonic() + EXIT_GRACE_S
        while time.monotonic() < deadline:
            if watch._raised:
                return
            time.sleep(0.05)
        frame = sys._current_frames().get(watch.main_ident)
        at = _where(frame)[1] if frame is not None else "an unknown place"
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        print(f"zero_ext: rank {watch.rank}'s main thread did not raise this stall report within "
              f"{EXIT_GRACE_S:g} s (it is at {at}, blocked outside Python: a CUDA synchronize "
              f"behind the stalled collective, or a long call into C++); ending the process "
              f"with status 1.\n{CollectiveStallError.__name__}: {report}",
              file=sys.stderr, flush=True)
        os._exit(1)


class _Retirement:
    """An entry in flight as the diagnosis waits for it: wait(timeout) returns True once the
    heartbeat retired it as completed, or raises "timed out"."""

    def __init__(self, entry: list):
        self.entry = entry

    def wait(self, timeout: timedelta) -> bool:
        end = time.monotonic() + timeout.total_seconds()
        while not self.entry[3]:
            if time.monotonic() >= end:
                raise RuntimeError("zero_ext: the collective in flight timed out")
            time.sleep(0.05)
        return True
