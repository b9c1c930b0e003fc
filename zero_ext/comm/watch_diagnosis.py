"""The stall watch's diagnosis: what went wrong when a collective stalls, in one report.

comm/watch.py's CollectiveWatch keeps the hot path (sequence numbers, fingerprints, bounded
waits) and the heartbeat; it holds one StallDiagnosis and calls it when a wait passes the stall
timeout or fails (`diagnose`), when the arena or the debug switch sees other ranks' headers
differ (`mismatch`), when its heartbeat finds the next rank's fingerprint chain different
(`sequence_mismatch`), and when the launcher sends SIGTERM (`terminate_report`). The diagnosis
reads every rank's heartbeat twice, three periods apart, tells a stopped rank, a mismatch, a
rank that did not arrive and mere slowness apart, and publishes the report under the store's
abort key (first writer wins), so that every rank raises the same one.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from zero_ext.comm.stall_error import CollectiveStallError
from zero_ext.comm.watch_store import STORE_ERRORS as _STORE_ERRORS

if TYPE_CHECKING:
    from zero_ext.comm.watch import CollectiveRecord, CollectiveWatch

__all__ = ["StallDiagnosis"]

_FIXES = {
    "behind": (
        "a collective zero_ext call (save_checkpoint, load_checkpoint, save_16bit_model, "
        "full_state_dict, forward/backward/step at stage 3, step at stages 1-2) ran on some "
        "ranks only, ranks ran different numbers of batches, or a rank is stuck. Make every "
        "rank make the same zero_ext calls in the same order (call save_checkpoint on every "
        "rank, not under `if rank == 0`; give every rank the same number of batches, e.g. a "
        "DistributedSampler with drop_last=True). A rank computing in its own code (using CPU) "
        "counts as progress; if one legitimately sits idle for longer (waiting for input or a "
        "file), raise zero_ext.stall_timeout_s in the config"),
    "mismatch": (
        "control flow differs across ranks: a module or block that runs on some ranks only "
        "(LayerDrop, MoE-style routing, a submodule used on one rank only), or a collective "
        "zero_ext call made on some ranks only. Run the same modules and zero_ext calls on every "
        "rank (at stage 3 every unit's forward must run on every rank: multiply a dropped "
        "block's output by 0 instead of skipping it; mark a mixture-of-experts block whose "
        "experts run only where tokens are routed as a leaf module, gathered whole: "
        "zero_ext.set_z3_leaf_modules(model, [BlockClass]) before initialize, or "
        "zero_optimization.leaf_module.classes in the config)"),
    "stopped": (
        "that rank's process died, is frozen (stopped, swapping, in a debugger) or its node lost "
        "the network. Look at that rank's log and host for the first error"),
}

# A rank in its own code counts as making progress while its main thread uses at least this
# share of one core between two heartbeat readings.
_BUSY_CPU_SHARE = 0.2


def _busy(before: dict, now: dict) -> bool:
    """Whether a rank's main thread kept working (used CPU) between two of its heartbeats."""
    elapsed = now.get("now", 0.0) - before.get("now", 0.0)
    used = now.get("cpu", 0.0) - before.get("cpu", 0.0)
    return elapsed > 0 and used >= _BUSY_CPU_SHARE * elapsed


class StallDiagnosis:
    """The readings, verdict, report and abort record of one CollectiveWatch's stalls. The
    watch owns the state (sequence numbers, heartbeats, store, timeout); this reads it and
    raises through the watch (`_raise`), so the watch remembers what it raised."""

    def __init__(self, watch: CollectiveWatch):
        self.watch = watch

    def read_all(self) -> dict[int, dict | None]:
        """Every rank's latest heartbeat (this rank's own state for itself). Failed store calls
        are retried for three periods; after that the store's error is raised."""
        watch = self.watch
        deadline = time.monotonic() + 3 * watch.period
        while True:
            try:
                states: dict[int, dict | None] = {}
                for r in range(watch.size):
                    key = watch._key("hb", r)
                    if r == watch.rank:
                        states[r] = watch._state()
                    elif watch.store.check([key]):
                        states[r] = json.loads(watch.store.get(key))
                        watch.nodes.learn(r, states[r]["host"])
                    else:
                        states[r] = None
                return states
            except CollectiveStallError:  # a signal handler's (see comm/stall_error.py)
                raise
            except _STORE_ERRORS:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(watch.period / 2)

    def unreachable_report(self, doing: str) -> str:
        return self.watch.nodes.unreachable_report(doing, self.watch.timeout, _FIXES["stopped"])

    def waiting_text(self, record: CollectiveRecord, since: float | None = None) -> str:
        """How long this rank has waited in `record`: since `since` (time.monotonic()), by
        default since the main thread's bounded wait began."""
        since = self.watch.waiting_since if since is None else since
        return f"waited {time.monotonic() - since:.1f} s in collective {record.describe()}"

    def _raise_unreachable(self, record: CollectiveRecord, cause: Exception | None,
                           since: float | None):
        self.watch._raise(self.unreachable_report(self.waiting_text(record, since)), cause)

    def _read_all_or_raise(self, record: CollectiveRecord, cause: Exception | None,
                           since: float | None) -> dict:
        """read_all, or the store itself is unreachable: raises the report that says so."""
        try:
            return self.read_all()
        except CollectiveStallError:
            raise
        except _STORE_ERRORS as error:
            self._raise_unreachable(record, cause or error, since)

    def _watch_window(self, work, cause: Exception | None):
        """Three heartbeat periods, still waiting for `work` (None: it failed with `cause`).
        Returns (completed, work, cause)."""
        period = self.watch.period
        end = time.monotonic() + 3 * period
        while time.monotonic() < end:
            if work is None:
                time.sleep(period / 2)
                continue
            try:
                work.wait(timedelta(seconds=max(end - time.monotonic(), 0.001)))
                return True, work, cause
            except CollectiveStallError:
                raise
            except RuntimeError as error:
                if "timed out" not in str(error):
                    cause, work = error, None
        return False, work, cause

    def diagnose(self, record: CollectiveRecord, work, cause: Exception | None = None,
                 first: dict | None = None, since: float | None = None) -> bool:
        """After stall_timeout_s in `record` (or a transport error): reads every rank's
        heartbeat before and after a window of three periods, still waiting for `work` (or
        compares with `first`, read three periods ago while waiting). True when the collective
        completed meanwhile; False when it is only slow; raises on a stall. `since`: when the
        wait began (default: the main thread's bounded wait; the in-flight check of an
        unbounded backend passes its own)."""
        watch = self.watch
        if watch.store.unreachable_for() >= 2 * watch.period:  # the heartbeat found it so
            self._raise_unreachable(record, cause, since)
        if first is None:
            first = self._read_all_or_raise(record, cause, since)
            completed, work, cause = self._watch_window(work, cause)
            if completed:
                return True
        if watch.abort_report is not None:
            watch._raise(watch.abort_report)
        second = self._read_all_or_raise(record, cause, since)
        if any(second[r] is None or first[r] is None or second[r]["beat"] == first[r]["beat"]
               for r in second if r != watch.rank):
            # A rank looks stopped: one more window before saying so (a heartbeat thread
            # starved of CPU for a moment must not be reported as a dead rank).
            completed, work, cause = self._watch_window(work, cause)
            if completed:
                return True
            second = self._read_all_or_raise(record, cause, since)
        verdict = self._verdict(record, first, second, since)
        if verdict is None and cause is None:
            watch.progress_checks += 1
            return False
        if verdict is None:
            headline = (f"zero_ext: collective {record.describe()} failed on rank {watch.rank}: "
                        f"{type(cause).__name__}: {cause}.")
            verdict = self.report(headline, second, "stopped")
        self._abort(verdict, cause)
        return False  # not reached

    def _verdict(self, record: CollectiveRecord, first: dict, second: dict,
                 since: float | None) -> str | None:
        """The report of a stall at `record`, or None when every rank still makes progress."""
        watch = self.watch
        s, mine = record.seq, record.fingerprint
        stopped, mismatched, behind, progressing = [], [], [], []
        for r in range(watch.size):
            if r == watch.rank:
                continue
            before, now = first[r], second[r]
            if now is None or before is None or now["beat"] == before["beat"]:
                stopped.append(r)
            elif now["seq"] >= s:
                theirs = {q: (fp, text) for q, fp, text in now["recent"]}.get(s)
                if theirs is not None and theirs[0] != mine:
                    mismatched.append((r, theirs[1]))
            elif now["seq"] != before["seq"] or now["kind"] == "zero_ext" or _busy(before, now):
                progressing.append(r)
            else:
                behind.append(r)
        waited = time.monotonic() - (watch.waiting_since if since is None else since)
        nodes = watch.nodes
        if stopped:
            headline = (f"zero_ext: {nodes.on_hosts(stopped)} stopped responding while rank "
                        f"{watch.rank} on {nodes.host} waited {waited:.1f} s in collective "
                        f"{record.describe()} (stall_timeout_s={watch.timeout:g}).")
            return self.report(headline, second, "stopped", stale=stopped)
        if mismatched:
            others = "; ".join(f"rank {r} {text}" for r, text in mismatched)
            headline = (f"zero_ext: ranks issued different collectives at #{s}: rank "
                        f"{watch.rank} {record.describe()}; {others}.")
            return self.report(headline, second, "mismatch")
        if progressing or not behind:
            return None
        headline = (f"zero_ext: {nodes.on_hosts(behind)} did not arrive at collective "
                    f"{record.describe()}; rank {watch.rank} on {nodes.host} waited {waited:.1f} "
                    f"s for them (stall_timeout_s={watch.timeout:g}).")
        return self.report(headline, second, "behind")

    def report(self, headline: str, states: dict, category: str,
               stale: list[int] = ()) -> str:
        """`headline`, one line per rank saying what it does (for ranks in `stale`: what its
        last heartbeat said), and the likely cause."""
        lines = [headline]
        for r in range(self.watch.size):
            state = states.get(r)
            if state is None:
                lines.append(f"  rank {r}: no heartbeat (it has not joined zero_ext's watch, or "
                             "cannot reach the store)")
                continue
            last = state["recent"][-1][2] if state["recent"] else "none"
            if state["kind"] == "waiting":
                doing = f"waiting in collective {state['where']} for {state['for_s']} s"
            elif state["kind"] == "zero_ext" and state.get("in_flight"):
                doing = f"inside zero_ext ({state['where']}) for {state['for_s']} s"
            elif state["kind"] == "zero_ext":
                doing = (f"busy inside zero_ext ({state['where']}), not in a collective, for "
                         f"{state['for_s']} s; last collective {last}")
            elif state.get("in_flight"):  # its main thread may be in a CUDA synchronize
                doing = (f"in user code at {state['where']} for {state['for_s']} s since its "
                         f"last collective {last}")
            else:
                doing = (f"in user code at {state['where']} for {state['for_s']} s since its "
                         f"last collective {last}, its main thread idle (not using CPU)")
            in_flight = state.get("in_flight")  # unbounded backends: NCCL's stream side
            if in_flight:
                doing += (f"; its collective #{in_flight[0]} in flight (issued, not completed) "
                          f"for {in_flight[1]} s")
            heard = "last heartbeat: " if r in stale else ""
            lines.append(f"  rank {r} on {state.get('host', '?')} (entered {state['seq']} "
                         f"collectives, completed {state['completed']}): {heard}{doing}")
        lines.append(f"Likely cause: {_FIXES[category]}.")
        return "\n".join(lines)

    def publish(self, report: str) -> str:
        """`report` as the group's one abort record: the first writer's stays and is returned."""
        watch = self.watch
        try:
            return watch.store.compare_set(watch._key("abort"), "", report).decode()
        except CollectiveStallError:
            raise
        except _STORE_ERRORS:  # this rank's own report then
            return report

    def _abort(self, report: str, cause: Exception | None = None):
        """Publishes `report` (see publish) and raises the group's abort record here."""
        self.watch._raise(self.publish(report), cause)

    def mismatch(self, record: CollectiveRecord, headers: list[tuple[int, int]]) -> None:
        """Other ranks' (sequence number, fingerprint) headers differ from this rank's (after
        the shared-memory arena's barrier, or the debug switch's exchange). Ranks that compared
        the same headers come here too: each publishes its record's description; a rank that
        does not (it is in another collective) is described from its heartbeat."""
        watch = self.watch
        watch.store.set(watch._key("desc", record.seq, watch.rank), record.describe())
        texts = {watch.rank: record.describe()}
        end = time.monotonic() + 3 * watch.period
        while time.monotonic() < end and len(texts) < watch.size:
            for r in range(watch.size):
                key = watch._key("desc", record.seq, r)
                if r not in texts and watch.store.check([key]):
                    texts[r] = watch.store.get(key).decode()
            time.sleep(watch.period / 8)
        if len(texts) < watch.size:
            for r, state in self.read_all().items():
                if r not in texts:
                    texts[r] = (f"{state['where']} ({state['kind']})" if state is not None
                                else f"#{headers[r][0]} (no heartbeat)")
        calls = "; ".join(f"rank {r} {texts[r]}" for r in range(watch.size))
        headline = (f"zero_ext: ranks issued different collectives at the same point "
                    f"(seen by rank {watch.rank} comparing fingerprints at #{record.seq}): "
                    f"{calls}.")
        self._abort(f"{headline}\nLikely cause: {_FIXES['mismatch']}.")

    def sequence_mismatch(self, peer: int, theirs: dict) -> str:
        """The report of the heartbeat's finding that `peer`'s running hash of fingerprints
        (its heartbeat `theirs`) differs from this rank's at its latest sequence number: the
        first collective in both rings that differs, or that the difference is older."""
        watch = self.watch
        seq = theirs["chain"][0]
        mine = {s: (fp, text) for s, fp, text in
                ((r.seq, r.fingerprint, r.describe()) for r in list(watch.ring))}
        first = next(((s, fp, text) for s, fp, text in theirs["recent"]
                      if s in mine and mine[s][0] != fp), None)
        if first is None:
            headline = (f"zero_ext: ranks {watch.rank} and {peer} issued different sequences of "
                        f"collectives before #{seq} (the first difference is older than the "
                        f"last {watch.ring.maxlen} records).")
        else:
            s, _, text = first
            headline = (f"zero_ext: ranks issued different collectives at #{s}: rank "
                        f"{watch.rank} {mine[s][1]}; rank {peer} {text}.")
        states = {watch.rank: watch._state(), peer: theirs}
        return self.report(headline, states, "mismatch")

    def terminate_report(self) -> str | None:
        """What this rank raises on SIGTERM from its launcher: the group's abort report, else,
        waiting in a collective (under NCCL: with one in flight), that the store is unreachable
        or that it was waiting; None when it knows of no stall (see watch._on_terminate)."""
        watch = self.watch
        report, record, since = watch.abort_report, watch.waiting, watch.waiting_since
        if record is None and not watch.bounded:  # NCCL: the oldest collective in flight
            record, since = watch.in_flight.unfinished(2 * watch.period) or (None, since)
        doing = "" if record is None else (
            f"{self.waiting_text(record, since)} when it was sent SIGTERM (by its launcher: "
            "torchrun ends a node's workers when one failed or when it lost its store)")
        if report is None and record is not None and watch.store.unreachable_for() > 0:
            report = self.unreachable_report(doing)
        if report is None and watch.store.unreachable_for() == 0:
            try:  # another rank's report that the heartbeat has not fetched yet
                if watch.store.check([watch._key("abort")]):
                    report = watch.store.get(watch._key("abort")).decode()
            except _STORE_ERRORS:
                pass
        if report is None and record is not None:
            report = (f"zero_ext: rank {watch.rank} on {watch.nodes.host} {doing}; the store still "
                      f"answered.\nLikely cause: {_FIXES['stopped']}.")
        return report
