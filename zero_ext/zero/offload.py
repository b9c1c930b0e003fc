"""CPU offload: optimizer state (and stage-3 parameter shards) in host memory.

The engine uses this module when zero_optimization.offload_optimizer or offload_param says
device "cpu". It budgets host memory before anything is allocated (HostMemoryPlan,
check_host_memory), allocates (pinned) host buffers, and runs the optimizer on the host
(OptimizerOffload):

  backward   GradientBuckets reports each bucket's final gradient shard (its norm already
             taken on the device); its device-to-host copy starts at once on a side stream (an
             event marks its end), while autograd goes on with earlier layers, and the device
             shard is freed once the copy is done
  CPU step   zero_ext::adamw_step_ on the host shard: fp32 master and moments updated, the
             model-dtype weights written in the same pass into the pinned host gradient
             buffer just consumed (a separate staging buffer when gradients are fp32)
  upload     staging buffer -> the model's slice on the device, non_blocking on an upload
             stream; the engine's stream waits for it before the all-gather or next forward,
             and the next step's gradient copy into the same buffer waits for it too

No shard steps before the step's all-rank decision: the global norm (is every gradient
finite? the clipping factor) needs every gradient first, and a step taken before it could not
be undone when the decision is to raise or skip (a NaN batch would leave NaN masters on every
rank). So the copies overlap backward, the engine sums the norms the buckets took on the device
(the same reduction as without offload), and then the shards are stepped one at a time in
bucket order, each upload overlapping the next shard's CPU step. Stage-3 unit shards, whose
weights are read only through their gathers, are instead left stepping on a worker thread
behind the next forward; each gather waits for its unit (ready()).

Under offload_optimizer.ratio < 1 (DeepSpeed's Twin-Flow) only the first buckets, those backward
finishes first (host_stepped_buckets), go through the host; the engine steps the rest where
their gradients already are, on the device, before the host's steps.

On a machine without CUDA the "device" is CPU memory too: the same copies run synchronously,
pinning is skipped, and the logic is the same.

`OptimizerOffload.timings()` says where the time went since it was last asked (the engine's
`wall_clock_breakdown` report asks every `steps_per_print` steps): seconds of gradient copies
out, CPU AdamW and uploads, and how much of the CPU step ran before backward ended (hidden)
or after (exposed). "Backward ended" is when the last gradient shard reached the host, which
needs no device sync to observe: the engine waits for that copy anyway at the start of
engine.step(). On CUDA the copies are timed with events on their own streams (read when they
have completed), the CPU step with the host clock.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from zero_ext.zero.optimizer import ShardState, ZeroOptimizer

__all__ = ["HostMemoryPlan", "OffloadTimings", "OptimizerOffload", "available_host_memory",
           "check_host_memory", "cpu_step_threads", "host_buffer", "host_state_bytes",
           "host_stepped_buckets", "local_ranks"]


def host_buffer(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialized 1-D host tensor; page-locked when asked and CUDA exists (pinning
    needs the CUDA driver, and buys nothing without a GPU to copy to).

    Pinned buffers are locked in place on exactly their own pages (cudaHostRegister), not
    taken from torch's pinned allocator, which rounds every request up to a power of two: a
    Llama-2-7B decoder layer's fp32 shard (0.81 GB) would take 1.07 GB, a third more host
    memory than the budget counted."""
    if not (pin and torch.cuda.is_available()) or numel == 0:
        return torch.empty(numel, dtype=dtype)
    return _page_locked(numel, dtype)


def _page_locked(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """`numel` elements on whole pages of their own (inside one larger allocation, so no page
    is shared with another allocation's registration), registered with the CUDA driver for
    asynchronous copies; unregistered when the returned tensor is collected."""
    page = mmap.PAGESIZE
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    span = -(-nbytes // page) * page
    raw = torch.empty(span + page, dtype=torch.uint8)
    skip = -raw.data_ptr() % page
    pages = raw[skip:skip + span]
    cudart = torch.cuda.cudart()
    # Portable: pinned for every device's context, not only the one current now.
    error = int(cudart.cudaHostRegister(pages.data_ptr(), span, _HOST_REGISTER_PORTABLE))
    if error != 0:
        raise RuntimeError(
            f"zero_ext offload: page-locking {_gib(span)} of host memory failed (cudaError "
            f"{error}); the system may limit locked memory (ulimit -l). Set pin_memory false "
            "in offload_optimizer / offload_param to use pageable buffers")
    out = pages[:nbytes].view(dtype)
    weakref.finalize(out, _release_pages, cudart, pages.data_ptr(), torch.cuda.current_device())
    return out


_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable


def _release_pages(cudart, ptr: int, device: int) -> None:
    """Before a page-locked buffer's memory goes: no copy may still be reading or writing it
    (torch's pinned allocator guards its own blocks with events; nothing guards these), then
    the pages are unregistered (best effort: an error code, not an exception). `device`: the
    training device, current when the buffer was made (the finalizer may run on any thread,
    whose current device may be another)."""
    try:
        torch.cuda.synchronize(device)
    except RuntimeError:  # CUDA already torn down at interpreter exit
        pass
    cudart.cudaHostUnregister(ptr)


@dataclass
class HostMemoryPlan:
    """Host bytes the offload configuration will allocate, per kind, for one rank."""

    per_rank: dict[str, int] = field(default_factory=dict)
    local_ranks: int = 1        # ranks on this node (LOCAL_WORLD_SIZE), each allocating as much
    pinned: bool = False

    def add(self, kind: str, nbytes: int) -> None:
        self.per_rank[kind] = self.per_rank.get(kind, 0) + nbytes

    @property
    def rank_bytes(self) -> int:
        return sum(self.per_rank.values())

    @property
    def node_bytes(self) -> int:
        return self.rank_bytes * self.local_ranks


def host_state_bytes(*, shard_numel: int, unit_shard_numel: int, dtype: torch.dtype,
                     grad_dtype: torch.dtype, offload_optimizer: bool,
                     offload_param: bool, frozen_shard_numel: int = 0,
                     state_bytes: dict[str, int] | None = None) -> dict[str, int]:
    """Host bytes one rank's offloaded state takes, per kind, from the elements of its shards
    (`unit_shard_numel` of them in stage-3 units; `frozen_shard_numel` more, of stage 3's
    frozen parameters, which have no optimizer state): the rules the allocations follow,
    shared by the engine's budget check and the estimator.

    offload_param keeps unit shards on the host. offload_optimizer keeps the fp32 master (unless
    it is an fp32 unit shard already there), the optimizer's state (`state_bytes`, by kind;
    None: AdamW's two fp32 moments), a host copy of each reduced gradient
    shard, and for a 16-bit model an upload buffer of the new weights (unless they are written
    straight into a host unit shard, or staged in the gradient copy, which has their dtype when
    the gradients are not accumulated in fp32)."""
    width = torch.empty((), dtype=dtype, device="meta").element_size()
    grad_width = torch.empty((), dtype=grad_dtype, device="meta").element_size()
    fp32 = dtype == torch.float32
    on_host_units = unit_shard_numel if offload_param else 0
    out = {"params": width * (on_host_units + (frozen_shard_numel if offload_param else 0))}
    if offload_optimizer:
        out.update(master=4 * (shard_numel - (on_host_units if fp32 else 0)),
                   **({"exp_avg": 4 * shard_numel, "exp_avg_sq": 4 * shard_numel}
                      if state_bytes is None else state_bytes),
                   offload_buffers=grad_width * shard_numel + (
                       0 if fp32 or grad_dtype == dtype
                       else width * (shard_numel - on_host_units)))
    return out


def host_stepped_buckets(shard_numels: list[int], ratio: float) -> int:
    """How many buckets, counted from the first (the first backward finishes), keep their
    optimizer state on the host under offload_optimizer.ratio: the count whose elements come
    closest to `ratio` of all (the larger count on a tie), and at least one. The engine and the
    estimator both split by it."""
    if ratio >= 1.0 or not shard_numels:
        return len(shard_numels)
    target = ratio * sum(shard_numels)
    best, best_gap, cumulative = 1, abs(shard_numels[0] - target), shard_numels[0]
    for count in range(2, len(shard_numels) + 1):
        cumulative += shard_numels[count - 1]
        gap = abs(cumulative - target)
        if gap <= best_gap:
            best, best_gap = count, gap
    return best


def cpu_step_threads(cores_perc: float) -> int:
    """Threads for the CPU AdamW step: `cores_perc` of the cores this process may run on,
    shared among the node's ranks (at least one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, int(cores / local_ranks() * cores_perc))


def local_ranks() -> int:
    """Processes on this node that will each allocate their own host state: torchrun's
    LOCAL_WORLD_SIZE, DeepSpeed's launcher's LOCAL_SIZE, else the ranks the group's detected
    topology places on this node (hostnames: an MPI launcher's processes)."""
    from zero_ext.comm.topology import known_topology

    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(int(os.environ[name]), 1)
    topology = known_topology()
    return len(topology.ranks_on(topology.node)) if topology is not None else 1


def available_host_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or psutil's
    figure where /proc/meminfo does not exist."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not a dependency on Linux, where /proc/meminfo answers

    return psutil.virtual_memory().available


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def check_host_memory(plan: HostMemoryPlan, available: int | None = None) -> None:
    """Raises MemoryError, before anything is allocated, when the node's ranks together would
    need more host memory than is available, instead of meeting the kernel's OOM killer
    half-way through allocating."""
    available = available_host_memory() if available is None else available
    if plan.node_bytes <= available:
        return
    kinds = ", ".join(f"{kind} {_gib(n)}" for kind, n in plan.per_rank.items() if n)
    fixes = ["spread the model over more ranks (more nodes): every rank holds 1/N of it",
             f"run fewer ranks per node (now {plan.local_ranks})"]
    if plan.pinned:
        fixes.append("set pin_memory false (page-locked memory cannot be swapped or shared)")
    fixes.append("use zero_optimization.stage 3 if you are not (it shards the parameters too), "
                 "or turn off offload_param / offload_optimizer to keep that state on the GPU")
    raise MemoryError(
        f"zero_ext offload: host memory is short. Each rank needs {_gib(plan.rank_bytes)} of "
        f"host memory ({kinds}); {plan.local_ranks} ranks on this node need "
        f"{_gib(plan.node_bytes)}, but {_gib(available)} is available (MemAvailable). "
        "Fixes: " + "; ".join(fixes))


@dataclass
class OffloadTimings:
    """Where an OptimizerOffload's time went over some steps (seconds, summed over shards)."""

    steps: int = 0              # engine.step() calls at an accumulation boundary
    shards_stepped: int = 0     # CPU AdamW calls, one per shard per step not skipped
    grad_copy_s: float = 0.0    # device -> host copies of the reduced gradient shards
    cpu_step_s: float = 0.0     # CPU AdamW (hidden + deferred + exposed)
    cpu_step_hidden_s: float = 0.0    # ... of it while backward was still running (none
    #                                     since shards wait for the step's decision; kept for
    #                                     comparing with figures of earlier versions)
    cpu_step_deferred_s: float = 0.0  # ... of it after engine.step() returned (next forward)
    cpu_step_exposed_s: float = 0.0   # ... of it in between, inside engine.step()
    upload_s: float = 0.0       # host -> device copies of the updated weights

    @property
    def hidden_fraction(self) -> float:
        """The share of the CPU step that ran behind compute: the rest of backward, or the
        next forward."""
        hidden = self.cpu_step_hidden_s + self.cpu_step_deferred_s
        return hidden / self.cpu_step_s if self.cpu_step_s else 0.0

    def __str__(self) -> str:
        return (f"grad copy-out {1e3 * self.grad_copy_s:.1f}ms  cpu step "
                f"{1e3 * self.cpu_step_s:.1f}ms ({100 * self.hidden_fraction:.0f}% hidden)  "
                f"upload {1e3 * self.upload_s:.1f}ms")


class _CopyClock:
    """Durations of copies on a side stream: an event pair per copy, read once both have
    completed, so timing adds no synchronization (CPU: the host clock around the copy)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.seconds = 0.0

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True, blocking=True)
        event.record()
        return event

    def stop(self, start) -> torch.cuda.Event | None:
        """Ends the span begun by `start`; on CUDA returns its end event (recorded on the
        current stream, where the copy was queued)."""
        if not self.cuda:
            self.seconds += time.perf_counter() - start
            return None
        # Blocking: the host waits on these (the copy's end is also its completion event), and
        # should sleep rather than spin a core the CPU optimizer step could use.
        end = torch.cuda.Event(enable_timing=True, blocking=True)
        end.record()
        self.pending.append((start, end))
        return end

    def collect(self, wait: bool = False) -> float:
        """Seconds of the spans completed so far (all of them with `wait`: a sync)."""
        still = []
        for start, end in self.pending:
            if wait:
                end.synchronize()
            if end.query():
                self.seconds += start.elapsed_time(end) / 1e3
            else:
                still.append((start, end))
        self.pending = still
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class OptimizerOffload:
    """The host side of offload_optimizer: gradient copies out, CPU AdamW, weight copies in.

    `shards` are the optimizer's shards whose state is in host memory (all of them, or under
    offload_optimizer.ratio the first buckets'), in bucket order; `shards[i]` steps with
    `host_grads[i]`. The other buckets' gradients stay on the device for the engine to step
    there. Shards whose `model_weights` is set (the model's slice on the device) get the
    result uploaded.
    `before_host_write(layout_index)` is called before a shard's host weights are written, so
    an in-flight upload of a stage-3 host shard (offload_param) finishes reading it first.
    """

    def __init__(self, optimizer: ZeroOptimizer, shards: list[ShardState],
                 grad_dtype: torch.dtype, device: torch.device, *, pin: bool,
                 before_host_write: Callable[[int], None] | None = None):
        self.optimizer = optimizer
        self.shards = shards
        # Bucket (layout) index -> position in `shards`.
        self._position = {shard.layout.index: i for i, shard in enumerate(shards)}
        self.device = device
        self._before_host_write = before_host_write
        # A shard whose new 16-bit weights go back through a host staging buffer of the
        # gradient's dtype receives its gradient in that buffer: the CPU step reads each
        # gradient element before writing the weight at the same position, and the next
        # gradient copy waits for the upload (2 bytes per parameter less host memory).
        self.host_grads = [
            s.weights_16bit if s.model_weights is not None and s.weights_16bit is not None
            and s.weights_16bit.dtype == grad_dtype
            else host_buffer(s.layout.shard_numel, grad_dtype, pin) for s in self.shards]
        n = len(self.shards)
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)
            self._upload_stream = torch.cuda.Stream(device)
        self._copied: list[torch.cuda.Event | None] = [None] * n    # D2H done
        self._uploaded: list[torch.cuda.Event | None] = [None] * n  # H2D done
        # Device gradients are kept alive until their copy has read them (no record_stream).
        self._in_copy: list[torch.Tensor | None] = [None] * n
        self._arrived = [False] * n
        # Timing (see timings()): the host-clock spans of this step's CPU AdamW calls, and
        # the host time the last gradient shard was seen on the host (backward's end).
        self._lock = threading.Lock()
        self._copy_clock, self._upload_clock = _CopyClock(self._cuda), _CopyClock(self._cuda)
        self._cpu_spans: list[tuple[float, float]] = []
        self._last_arrival: int | None = None
        self._backward_end: float | None = None
        self._step_returned: float | None = None
        self._totals = OffloadTimings()
        # Steps left running after engine.step() returned, by position (see step()).
        self._deferred: dict[int, Future] = {}
        # Deferred steps run here (its thread starts on first use).
        # On CUDA its thread works on the training device: a new thread's current device is
        # device 0, where its first CUDA call (an event's synchronize) would make a context.
        on_device = {"initializer": torch.cuda.set_device, "initargs": (device,)} \
            if self._cuda else {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="zero_ext-offload", **on_device)
        weakref.finalize(self, self._worker.shutdown, False)

    # -- gradients out -----------------------------------------------------------------------
    def grad_ready(self, bucket: int, grad: torch.Tensor) -> bool:
        """GradientBuckets' on_final: bucket `bucket`'s gradient shard for this step is final.
        Takes it (True) when the bucket steps on the host: the device copy is held only until
        its copy to the host is done, so the device does not keep a gradient shard until the
        step. A bucket stepped on the device keeps its gradient (False)."""
        index = self._position.get(bucket)
        if index is None:
            return False
        host = self.host_grads[index]
        if all(self._arrived[:index]) and all(self._arrived[index + 1:]):
            self._last_arrival = index
        if self._cuda:
            self._drop_copied()
            # The copy stream waits for what produced the gradient (reduce-scatter, fp32
            # accumulation) on the stream backward runs on.
            self._copy_stream.wait_stream(torch.cuda.current_stream(grad.device))
            if self._uploaded[index] is not None and host is self.shards[index].weights_16bit:
                # The buffer is also last step's upload source: let that upload finish.
                self._copy_stream.wait_event(self._uploaded[index])
            with torch.cuda.stream(self._copy_stream):
                start = self._copy_clock.start()
                host.copy_(grad, non_blocking=True)
                event = self._copy_clock.stop(start)
            self._in_copy[index], self._copied[index] = grad, event
        else:
            start = self._copy_clock.start()
            host.copy_(grad)
            self._copy_clock.stop(start)
            if index == self._last_arrival:
                self._backward_end = time.perf_counter()
        self._arrived[index] = True
        return True

    def _drop_copied(self) -> None:
        """Lets go of the device gradients whose copy to the host has completed: their memory
        goes back to the compute stream's pool while backward still runs, instead of every
        reduced shard of the step staying on the device until engine.step()."""
        for index, grad in enumerate(self._in_copy):
            if grad is not None and self._copied[index].query():
                self._in_copy[index] = None

    def _wait_copy(self, index: int) -> None:
        event = self._copied[index]
        if event is not None:
            event.synchronize()
            self._in_copy[index] = None
            if index == self._last_arrival:
                # Both threads may wait for the last copy; the earlier sighting is the closer
                # bound on when it completed.
                seen = time.perf_counter()
                with self._lock:
                    if self._backward_end is None or seen < self._backward_end:
                        self._backward_end = seen

    def wait_for_gradients(self) -> None:
        """Until every shard's gradient is on the host."""
        if not all(self._arrived):
            raise RuntimeError("zero_ext: no reduced gradients: engine.step() at an "
                               "accumulation boundary needs engine.backward() first")
        for index in range(len(self.shards)):
            self._wait_copy(index)

    def before_host_write(self, bucket: int) -> torch.Tensor | None:
        """Before bucket `bucket`'s host buffers are written from outside a step: its last
        upload has finished reading them and its gradient copy writing them. Its host gradient,
        as host_grad() (which may share the 16-bit staging buffer)."""
        index = self._position.get(bucket)
        if index is None:
            return None
        if self._uploaded[index] is not None:
            self._uploaded[index].synchronize()
        return self.host_grad(bucket)

    def host_grad(self, bucket: int) -> torch.Tensor | None:
        """Bucket `bucket`'s reduced gradient on the host, its copy waited for, where the step
        will read it; None for a bucket stepped on the device or not yet arrived."""
        index = self._position.get(bucket)
        if index is None or not self._arrived[index]:
            return None
        self._wait_copy(index)
        return self.host_grads[index]

    # -- the CPU step and weights in ---------------------------------------------------------
    def step(self, inv_scale: torch.Tensor | None, defer: Collection[int] = ()) -> None:
        """Steps every shard, in bucket order, once the engine's all-rank decision allows it;
        each upload overlaps the next shard's CPU step.

        The buckets in `defer` (those whose weights are read only through ready(): stage-3
        units) are stepped on the worker instead, last bucket first, which is the order the
        next forward needs them in; engine.step() returns without waiting for them, so their
        CPU step runs behind the next forward. The hyperparameters are read now: the LR
        scheduler moves on before they run."""
        later = [i for i, shard in enumerate(self.shards) if shard.layout.index in defer]
        for index in sorted(set(range(len(self.shards))) - set(later)):
            self._step_shard(index, inv_scale)
        groups = [dict(group) for group in self.optimizer.param_groups]
        for index in reversed(later):
            self._deferred[index] = self._worker.submit(self._step_shard, index, inv_scale,
                                                        groups)

    def ready(self, bucket: int) -> None:
        """Waits until bucket `bucket`'s weights are up to date for the device: for its
        deferred step, if one is left; once done, the current stream is ordered after its
        upload. (Whether to wait is PartitionedParameters' decision, the same on every rank,
        never whether the step happens to be done.)"""
        index = self._position.get(bucket)
        future = self._deferred.get(index) if index is not None else None
        if future is None:
            return
        try:
            future.result()  # re-raises what failed in the worker
        finally:
            del self._deferred[index]
            if self._cuda and self._uploaded[index] is not None:
                torch.cuda.current_stream(self.device).wait_event(self._uploaded[index])
            if not self._deferred:
                self._complete()

    def settle(self) -> None:
        """Waits for every deferred step (anything that reads or writes the optimizer's state or
        the weights other than through ready() calls this first)."""
        for index in sorted(self._deferred, reverse=True):
            self.ready(self.shards[index].layout.index)

    def _step_shard(self, index: int, inv_scale: torch.Tensor | None,
                    groups: list[dict] | None = None) -> None:
        self._wait_copy(index)
        shard = self.shards[index]
        if self._uploaded[index] is not None:
            # The previous step's upload may still be reading the staging buffer.
            self._uploaded[index].synchronize()
            self._uploaded[index] = None
        if self._before_host_write is not None and shard.model_weights is None:
            self._before_host_write(shard.layout.index)
        start = time.perf_counter()
        self.optimizer.sharded_step([self.host_grads[index]], inv_scale, only=[shard],
                                    copy_out=False, groups=groups)
        with self._lock:
            self._cpu_spans.append((start, time.perf_counter()))
        if shard.model_weights is None:
            return
        if not self._cuda:
            start = self._upload_clock.start()
            shard.model_weights.copy_(shard.updated_weights)
            self._upload_clock.stop(start)
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self._upload_stream):
            # The copy stream waited for backward's stream when this gradient was ready:
            # every kernel reading these weights in this backward was queued before that.
            self._upload_stream.wait_event(self._copied[index])
            start = self._upload_clock.start()
            shard.model_weights.copy_(shard.updated_weights, non_blocking=True)
            event = self._upload_clock.stop(start)
        self._uploaded[index] = event

    def finish(self) -> None:
        """End of engine.step(): every CPU step done but the deferred ones, and the engine's
        stream ordered after those shards' uploads (the all-gather and the next forward read
        the model's slices); ready() does the same for each deferred shard."""
        self._step_returned = time.perf_counter()
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            for index, event in enumerate(self._uploaded):
                if event is not None and index not in self._deferred:
                    stream.wait_event(event)
        if not self._deferred:
            self._complete()

    def _complete(self) -> None:
        """Every shard of the step is done: the next step may begin."""
        self._arrived = [False] * len(self.shards)
        self._account_step()

    def _account_step(self) -> None:
        """Adds this step's CPU AdamW spans to the totals, split at backward's end and at
        engine.step()'s return."""
        end, returned = self._backward_end, self._step_returned
        totals = self._totals
        totals.steps += 1
        # Completed copies are read every step, so the event pairs do not pile up.
        totals.grad_copy_s += self._copy_clock.collect()
        totals.upload_s += self._upload_clock.collect()
        with self._lock:
            spans, self._cpu_spans = self._cpu_spans, []
        for start, stop in spans:
            hidden = max(0.0, min(stop, end) - start) if end is not None else 0.0
            deferred = max(0.0, stop - max(start, returned)) if returned is not None else 0.0
            totals.shards_stepped += 1
            totals.cpu_step_s += stop - start
            totals.cpu_step_hidden_s += hidden
            totals.cpu_step_deferred_s += deferred
            totals.cpu_step_exposed_s += (stop - start) - hidden - deferred
        self._backward_end, self._last_arrival, self._step_returned = None, None, None

    def timings(self, reset: bool = True) -> OffloadTimings:
        """Where the time went since the last reset (this waits for any deferred step, and on
        CUDA for the uploads in flight, to read their events: call it between steps)."""
        self.settle()
        totals = self._totals
        totals.grad_copy_s += self._copy_clock.collect(wait=True)
        totals.upload_s += self._upload_clock.collect(wait=True)
        if reset:
            self._totals = OffloadTimings()
        else:
            totals = dataclasses.replace(totals)
        return totals

    def host_nbytes(self) -> int:
        """Host gradient copies and 16-bit staging buffers (a shared one counted once)."""
        buffers = {t.data_ptr(): t.numel() * t.element_size() for t in self.host_grads}
        buffers.update({s.weights_16bit.data_ptr(): s.weights_16bit.numel()
                        * s.weights_16bit.element_size() for s in self.shards
                        if s.model_weights is not None and s.weights_16bit is not None})
        return sum(buffers.values())
