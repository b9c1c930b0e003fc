"""Sequence numbers, fingerprints and stall detection for every collective zero_ext issues.

zero_ext.comm.collectives asks `watch_for_group()` for the current group's CollectiveWatch,
calls `enter()` before each collective (a sequence number, a fingerprint, a ring-buffer record:
PyTorch's NCCL flight recorder is the model) and `wait()` for its completion. The hot path
touches no store: a counter, a CRC, a deque append and a walk up the stack to name the zero_ext
call that issued the collective.

Waiting is bounded. gloo's `Work.wait(timeout)` is called in slices of one heartbeat period;
after `stall_timeout_s` without completion the waiting rank reads every rank's heartbeat from
the process group's store (torchrun's TCPStore, or the harness's FileStore). A background thread
per rank publishes one every period: sequence numbers entered and completed, the collective it
waits in, where its main thread is (user code, or busy inside zero_ext), and its last few
records. From two readings the waiting rank tells apart
  * a rank whose heartbeat stopped (dead, frozen, cut off from the network),
  * ranks at the same sequence number in different collectives (mismatched control flow),
  * a rank that has not arrived and sits idle in user code, its main thread using no CPU
    (stuck, or skipped a collective); one that computes there (a rank-0-only evaluation)
    makes progress,
  * slowness: every rank in the same collective, or the late one busy inside zero_ext or
    still issuing collectives; then it keeps waiting.
On a real stall it writes ONE report under the store's abort key (first writer wins) and
raises CollectiveStallError; every other rank's heartbeat thread sees the key, and its main
thread raises the same error at its next wait slice, at its next collective, or at once when
it sits in user code (a signal to the main thread). The readings, the verdict and the report
are comm/watch_diagnosis.py's (StallDiagnosis, one per watch).

Mismatches that would not hang (units of equal size gathered in different orders) are caught
too: the shared-memory arena compares every rank's (sequence number, fingerprint) header after
each barrier, and on the gloo path each heartbeat compares a running hash of all fingerprints
so far with the next rank's.
"""

from __future__ import annotations

import array
import atexit
import collections
import json
import os
import signal
import sys
import sysconfig
import threading
import time
import traceback
import weakref
import zlib
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from zero_ext.comm.stall_error import CollectiveStallError
from zero_ext.comm.watch_diagnosis import StallDiagnosis
from zero_ext.comm.watch_inflight import InFlight
from zero_ext.comm.watch_nodes import RankHosts
from zero_ext.comm.watch_store import STORE_ERRORS as _STORE_ERRORS
from zero_ext.comm.watch_store import WatchStore

__all__ = [
    "DEFAULT_STALL_TIMEOUT_S",
    "CollectiveRecord",
    "CollectiveStallError",
    "CollectiveWatch",
    "set_stall_timeout",
    "stall_timeout",
    "watch_for_group",
]

# Detection takes the stall timeout plus a diagnosis of 3 to 6 heartbeat periods (1 s each):
# within 30 s of a failure at the default.
DEFAULT_STALL_TIMEOUT_S = 20.0
RING_SIZE = 64          # records kept per rank, newest last
_RECENT = 16            # records each heartbeat carries (what a stalled peer needs to compare)
_CHAIN_WINDOW = 4096    # running fingerprint hashes kept, indexed by sequence number
_INTERRUPT = signal.SIGUSR2
_STORE_CALL_TIMEOUT_S = 1.0  # per store call: a cut-off node's calls fail in a few seconds


@dataclass(slots=True, eq=False)
class CollectiveRecord:
    seq: int            # this process's count of zero_ext collectives, from 1
    op: str
    numel: int          # elements (the larger side of a gather/scatter); -1 for pickled objects
    dtype: str
    bucket: int | None  # the bucket layout the collective moves, when the caller says
    src: int | None     # broadcast source
    caller: str         # the zero_ext call that issued it: "inner in OuterPublicCall"
    fingerprint: int    # CRC of (op, numel, dtype, bucket, src): equal on every rank
    issued: float       # time.monotonic() at issue
    done: bool = False

    def describe(self) -> str:
        size = f"{self.numel} x {self.dtype}" if self.numel >= 0 else "pickled objects"
        extra = "".join([f", bucket {self.bucket}" if self.bucket is not None else "",
                         f", from rank {self.src}" if self.src is not None else ""])
        return f"#{self.seq} {self.op}({size}{extra}) issued by {self.caller}"


# -- naming the zero_ext call on the stack --------------------------------------------------
_ZERO_EXT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_COMM_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LIBRARY_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep
                       for k in ("stdlib", "platstdlib", "purelib", "platlib")})
_code_names: dict = {}  # code object -> (kind, name): kind "comm", "zero_ext", "library", "user"
_MAX_DEPTH = 64  # frames walked per collective: the public zero_ext call is well within them


def _code_name(code) -> tuple[str, str]:
    known = _code_names.get(code)
    if known is None:
        path = os.path.abspath(code.co_filename)
        if path.startswith(_COMM_DIR):
            kind = "comm"
        elif path.startswith(_ZERO_EXT_DIR):
            kind = "zero_ext"
        elif path.startswith(_LIBRARY_DIRS) or code.co_filename.startswith("<"):
            kind = "library"
        else:
            kind = "user"
        name = code.co_qualname
        if kind == "zero_ext" and "." not in name:  # a module-level function: say which module
            name = f"{os.path.splitext(os.path.basename(path))[0]}.{name}"
        elif kind == "user":
            name = f"{name} ({os.path.basename(path)}:{code.co_firstlineno})"
        known = _code_names[code] = (kind, name)
    return known


def issuing_call(frame) -> str:
    """The zero_ext functions on the stack from `frame` out: the innermost one and the
    outermost one (the public call the user made), e.g. "PartitionedParameters.start_gather in
    ZeroEngine.forward"."""
    inner = outer = None
    names = _code_names
    for _ in range(_MAX_DEPTH):  # on the hot path: one cached dict lookup per frame
        if frame is None:
            break
        code = frame.f_code
        kind, name = names.get(code) or _code_name(code)
        if kind == "zero_ext":
            inner = inner or name
            outer = name
        frame = frame.f_back
    if outer is None:
        return "a direct zero_ext.comm call"
    return outer if inner == outer else f"{inner} in {outer}"


def _where(frame) -> tuple[str, str]:
    """Where a thread is, for the heartbeat: ("zero_ext", call) when the innermost frame that is
    not the standard library or an installed package belongs to zero_ext (it is busy inside a
    zero_ext call, e.g. writing a checkpoint), else ("user", "function (file:line)")."""
    while frame is not None:
        kind = _code_name(frame.f_code)[0]
        if kind in ("zero_ext", "comm"):
            return "zero_ext", issuing_call(frame)
        if kind == "user":
            base = os.path.basename(frame.f_code.co_filename)
            return "user", f"{frame.f_code.co_qualname} ({base}:{frame.f_lineno})"
        frame = frame.f_back
    return "user", "outside any Python frame"


# -- configuration ---------------------------------------------------------------------------
_stall_timeout_s = DEFAULT_STALL_TIMEOUT_S


def set_stall_timeout(seconds: float) -> None:
    """Seconds without progress before a waiting rank diagnoses a stall (config key
    zero_ext.stall_timeout_s; initialize() applies it). Takes effect on the current watch."""
    global _stall_timeout_s
    if not seconds > 0:
        raise ValueError(f"zero_ext.comm: the stall timeout must be > 0 seconds, got {seconds!r}")
    _stall_timeout_s = float(seconds)
    if _watch is not None:
        _watch.set_timeout(_stall_timeout_s)


def stall_timeout() -> float:
    return _stall_timeout_s


# -- the watch -------------------------------------------------------------------------------
class CollectiveWatch:
    """Sequence numbers, the ring buffer, bounded waits and the heartbeat of one process
    group on this rank."""

    def __init__(self, group, store, rank: int, size: int, prefix: str, timeout: float,
                 bounded: bool):
        # Weakly: zero_ext must not keep a destroyed group alive (its destructor, run later
        # during interpreter teardown, can abort the process).
        self._group = weakref.ref(group)
        self.store, self.rank, self.size = store, rank, size
        self.nodes = RankHosts(rank, size, store, lambda r: self._key("hb", r))
        self.prefix = prefix
        self.bounded = bounded          # gloo: waits are bounded here (NCCL has its watchdog)
        # The debug switch: compare fingerprints before each collective outside the arena.
        self.verify = os.environ.get("ZERO_EXT_CHECK_COLLECTIVES", "0") == "1"
        self.seq = 0                    # collectives entered
        self.completed = 0              # highest sequence number waited for
        self.ring: collections.deque[CollectiveRecord] = collections.deque(maxlen=RING_SIZE)
        self.chain = 0                  # running CRC over every fingerprint so far
        self.chains = array.array("q", [0]) * _CHAIN_WINDOW
        self.waiting: CollectiveRecord | None = None
        self.waiting_since = 0.0
        self.last_done = time.monotonic()
        self.abort_report: str | None = None
        self.progress_checks = 0        # diagnoses that found only slowness (tests read it)
        self._beat = 0
        self._heartbeat_errors = 0      # heartbeat errors that were not the store's
        self._interrupt_pending = False
        self._raised = False            # the main thread raised this group's abort already
        # Unbounded backends (NCCL): the collectives in flight, bounded by the heartbeat thread
        # (comm/watch_inflight.py); probes are CUDA events on NCCL, else the Work (also where
        # the extension was built without CUDA: its first CUDA op will say so).
        from zero_ext import _C

        nccl = ("nccl" in dist.get_backend(group) and torch.cuda.is_available()
                and _C.cuda_archs_built() is not None)
        self.in_flight = InFlight(self, events=nccl,
                                  device=torch.cuda.current_device() if nccl else None)
        self._stop = threading.Event()
        self.main_ident = threading.get_ident()
        self.diagnosis = StallDiagnosis(self)  # reads this watch's state when a wait stalls
        self.set_timeout(timeout)
        try:
            self._beat_once()  # from the start: a rank that freezes at once is still named
        except _STORE_ERRORS:
            pass  # the thread's next beat tries again
        self._thread = threading.Thread(target=self._run, name="zero_ext-watch", daemon=True)
        self._thread.start()

    def belongs_to(self, group) -> bool:
        return self._group() is group

    def set_timeout(self, timeout: float) -> None:
        self.timeout = timeout
        self.period = min(1.0, timeout / 4)
        self._slice = timedelta(seconds=self.period)

    # -- hot path ------------------------------------------------------------------------------
    def _raise(self, report: str, cause: Exception | None = None):
        self.abort_report = report
        if threading.get_ident() != self.in_flight.diagnosis_ident:  # raised to the user (on
            self._raised = True          # the main thread, or an autograd thread's hook)
        raise CollectiveStallError(report) from cause

    def enter(self, op: str, numel: int, dtype, bucket: int | None = None,
              src: int | None = None) -> CollectiveRecord:
        if self.abort_report is not None:
            self._raise(self.abort_report)
        dtype = str(dtype).removeprefix("torch.")
        fingerprint = zlib.crc32(f"{op}|{numel}|{dtype}|{bucket}|{src}".encode())
        seq = self.seq + 1
        record = CollectiveRecord(seq, op, numel, dtype, bucket, src,
                                  issuing_call(sys._getframe(2)), fingerprint, time.monotonic())
        self.ring.append(record)
        self.chain = zlib.crc32(fingerprint.to_bytes(4, "little"), self.chain)
        self.chains[seq % _CHAIN_WINDOW] = self.chain
        self.seq = seq
        return record

    def done(self, record: CollectiveRecord) -> None:
        record.done = True
        self.completed = max(self.completed, record.seq)
        self.last_done = time.monotonic()

    def wait(self, work, record: CollectiveRecord) -> None:
        """Waits for `work` (a torch.distributed Work) of `record`, bounded by the stall
        timeout of no progress; raises CollectiveStallError on a stall."""
        if work is not None and not self.bounded:
            self.in_flight.wait(work, record)
        elif work is not None:
            self.waiting, self.waiting_since = record, time.monotonic()
            try:
                deadline = self.waiting_since + self.timeout
                early = None  # the diagnosis's first reading, three periods before the deadline
                while True:
                    try:
                        work.wait(self._slice)
                        break
                    except CollectiveStallError:  # raised by a signal handler (see _on_terminate)
                        raise
                    except RuntimeError as error:
                        if "timed out" not in str(error):
                            self.diagnosis.diagnose(record, None, cause=error)
                    if self.abort_report is not None:
                        self._raise(self.abort_report)
                    now = time.monotonic()
                    if early is None and now >= deadline - 3 * self.period:
                        try:
                            early = self.diagnosis.read_all()
                        except CollectiveStallError:
                            raise
                        except _STORE_ERRORS:
                            early = {}  # the diagnosis reads again, and says so if it can't
                    if now >= deadline:
                        if self.diagnosis.diagnose(record, work, first=early or None):
                            break
                        deadline, early = time.monotonic() + self.timeout, None
            finally:
                self.waiting = None
        self.done(record)

    def mismatch(self, record: CollectiveRecord, headers: list[tuple[int, int]]) -> None:
        """Other ranks' (sequence number, fingerprint) headers differ from this rank's, seen by
        the shared-memory arena or the debug switch: raises the report (see
        StallDiagnosis.mismatch)."""
        self.diagnosis.mismatch(record, headers)

    # -- the heartbeat ---------------------------------------------------------------------------
    def _key(self, *parts) -> str:
        return "/".join((self.prefix, *map(str, parts)))

    def _state(self) -> dict:
        """This rank's heartbeat payload."""
        now = time.monotonic()
        waiting = self.waiting
        if waiting is not None:
            kind, where, since = "waiting", waiting.describe(), self.waiting_since
        else:
            frame = sys._current_frames().get(self.main_ident)
            kind, where = _where(frame)
            since = self.last_done
        recent = [(r.seq, r.fingerprint, r.describe()) for r in list(self.ring)[-_RECENT:]]
        seq, completed = self.seq, self.completed
        oldest = None if self.bounded else self.in_flight.oldest(0.0)  # [seq, seconds]
        if oldest is not None:  # waited for is not completed: not past the oldest in flight
            completed = min(completed, oldest[0] - 1)
        return {"beat": self._beat, "host": self.nodes.host, "seq": seq, "completed": completed,
                "chain": [seq, self.chains[seq % _CHAIN_WINDOW]], "kind": kind,
                "where": where, "for_s": round(now - since, 1), "recent": recent,
                "now": now, "cpu": self._main_cpu_s(),
                "in_flight": oldest if oldest is not None and oldest[1] >= self.period else None}

    def _main_cpu_s(self) -> float:
        """CPU seconds the main thread has used: a rank in its own code that keeps using CPU
        (an evaluation loop, a rank-0-only export) makes progress; a stuck one (asleep,
        deadlocked, waiting for input) does not."""
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self.main_ident))
        except (AttributeError, OSError):  # no per-thread CPU clock here: never counts as busy
            return 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            if _watch is not self or not dist.is_initialized() or not self.belongs_to(
                    dist.group.WORLD):
                return
            try:
                self._beat_once()
                if self.abort_report is None and self.store.check([self._key("abort")]):
                    self._deliver(self.store.get(self._key("abort")).decode())
                elif self.abort_report is None and self.size > 1:
                    self._compare_with_next_rank()
                if not self.nodes.complete():
                    self.nodes.learn_some()
            except _STORE_ERRORS:  # a store hiccup must not kill the heartbeat
                pass
            except Exception as error:  # noqa: BLE001 - nor anything else: a dead heartbeat
                self._heartbeat_error(error)  # makes this rank look stopped to the others
            if not self.bounded:  # after the beat, and whatever the store did
                try:
                    self.in_flight.check()
                except Exception as error:  # noqa: BLE001 - as above
                    self._heartbeat_error(error)

    def _heartbeat_error(self, error: Exception) -> None:
        """An error in the heartbeat that is not the store's (a bug): said once, on stderr, and
        the heartbeat goes on."""
        if self._heartbeat_errors == 0:
            text = "".join(traceback.format_exception(error)).rstrip()
            print(f"zero_ext: the stall watch's heartbeat on rank {self.rank} met an error; it "
                  f"goes on beating, and says no more of such errors:\n{text}", file=sys.stderr,
                  flush=True)
        self._heartbeat_errors += 1

    def _beat_once(self) -> None:
        self._beat += 1
        self.store.set(self._key("hb", self.rank), json.dumps(self._state()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _deliver(self, report: str) -> None:
        """Another rank aborted: raise on this rank too (the main thread's wait loop sees
        abort_report; in user code it is interrupted by a signal)."""
        self.abort_report = report
        if self.waiting is None and _INTERRUPT in _previous_handlers:
            self._interrupt_pending = True
            signal.pthread_kill(self.main_ident, _INTERRUPT)
        if not self.bounded and not self._raised:
            self.in_flight.end_unless_raised(report)

    def _compare_with_next_rank(self) -> None:
        """The running hash of fingerprints at the next rank's latest sequence number against
        this rank's: a mismatch that did not hang (units of equal size in different orders)."""
        peer = (self.rank + 1) % self.size
        key = self._key("hb", peer)
        if not self.store.check([key]):
            return
        theirs = json.loads(self.store.get(key))
        seq, chain = theirs["chain"]
        if seq == 0 or seq > self.seq or self.seq - seq >= _CHAIN_WINDOW:
            return
        if self.chains[seq % _CHAIN_WINDOW] == chain:
            return
        # On the heartbeat thread: publish, then raise on the main thread like a peer's abort.
        self._deliver(self.diagnosis.publish(self.diagnosis.sequence_mismatch(peer, theirs)))


# -- one watch per process group -------------------------------------------------------------
_watch: CollectiveWatch | None = None
_generation = 0
_handler_installed = False
_previous_handlers: dict[int, object] = {}


def _on_interrupt(signum, frame):
    watch = _watch
    if watch is not None and watch._interrupt_pending:
        watch._interrupt_pending = False
        if not watch._raised:
            watch._raise(watch.abort_report)
        return
    previous = _previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)


def _on_terminate(signum, frame):
    """SIGTERM from the launcher (torchrun ends a node's workers when one of them failed, or
    when it lost the rendezvous store on node 0, ~10 s into a partition, before any stall
    timeout). A rank that waits in a collective raises what it knows, a rank in its own code
    the group's abort report if there is one, instead of dying silently; otherwise SIGTERM
    does what it did before."""
    watch = _watch if _watch is not None and not _watch._raised else None
    if watch is not None:
        report = watch.diagnosis.terminate_report()
        if report:
            watch._raise(report)
    previous = _previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """The signal that interrupts a main thread in user code when another rank aborted, and
    SIGTERM's report; only from the main thread, and only where no C-level handler is set."""
    global _handler_installed
    if _handler_installed or threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in ((_INTERRUPT, _on_interrupt), (signal.SIGTERM, _on_terminate)):
        previous = signal.getsignal(signum)
        if previous not in (signal.SIG_DFL, None) and not callable(previous):
            continue
        _previous_handlers[signum] = previous if callable(previous) else None
        signal.signal(signum, handler)
    _handler_installed = True


def watch_for_group() -> CollectiveWatch:
    """The watch of the current default process group, started on first use (every rank
    starts its own on its first collective or in initialize())."""
    global _watch, _generation
    group = dist.group.WORLD
    watch = _watch
    if watch is not None and watch.belongs_to(group):
        return watch
    if watch is not None:
        watch.stop()
    _generation += 1
    store = WatchStore(dist.distributed_c10d._get_default_store(), _STORE_CALL_TIMEOUT_S)
    bounded = dist.get_backend() == "gloo"
    _install_handlers()
    # torchrun's store outlives a restart of the workers: keys of an earlier attempt stay.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _watch = CollectiveWatch(group, store, dist.get_rank(), dist.get_world_size(),
                             f"zero_ext/watch/{attempt}/{_generation}", _stall_timeout_s, bounded)
    return _watch


def current_watch() -> CollectiveWatch | None:
    """The running watch, if any (for tests and reports)."""
    return _watch


@atexit.register
def _stop_at_exit() -> None:
    """The heartbeat thread must not be inside a store call when the interpreter finalizes.
    After a stall (or with a collective still pending) the process ends here, with status 1:
    finalizing would destroy the process group, whose gloo threads wait for the peer that
    stopped answering (up to the 30-minute collective timeout), and torchrun would wait too.
    The last handler to run (registered first), so zero_ext's others have run."""
    watch = _watch
    if watch is None:
        return
    watch.stop()
    if watch.abort_report is not None or watch.completed < watch.seq:
        siblings = os.environ.get("LOCAL_WORLD_SIZE", "1")
        if watch.abort_report is not None and os.environ.get("TORCHELASTIC_RUN_ID") and \
                siblings.isdigit() and int(siblings) > 1:
            # torchrun ends a node's other workers (SIGTERM) as soon as one exits: a moment
            # for them to raise the report themselves (each learns of it within a period,
            # from its heartbeat, and raises at the end of its wait's slice), not end unheard.
            time.sleep(2 * watch.period)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1)
