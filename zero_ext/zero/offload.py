"""CPU offload: optimizer state (and stage-3 parameter shards) in host memory.

The engine uses this module when zero_optimization.offload_optimizer or offload_param says
device "cpu". It budgets host memory before anything is allocated (HostMemoryPlan,
check_host_memory), allocates (pinned) host buffers, and runs the optimizer on the host
(OptimizerOffload):

  backward   GradientBuckets reports each bucket's final gradient shard; its device-to-host
             copy starts at once on a side stream (an event marks its end), while autograd
             goes on with earlier layers
  CPU step   zero_ext::adamw_step_ on the host shard: fp32 master and moments updated, the
             model-dtype weights written in the same pass into a pinned staging buffer
  upload     staging buffer -> the model's slice on the device, non_blocking on an upload
             stream; the engine's stream waits for it before the all-gather or next forward

When nothing global decides the step (no gradient clipping, no fp16 overflow check), a worker
thread steps each shard as soon as its gradient has reached the host, overlapping the CPU step
with the rest of backward and the remaining copies. Otherwise the global norm needs every
gradient first: the copies still overlap backward, the engine takes the norm from the
device's copies (the same reduction as without offload), and then the shards are stepped one
at a time in bucket order, each upload overlapping the next shard's CPU step.

On a machine without CUDA the "device" is CPU memory too: the same copies run synchronously,
pinning is skipped, and the logic is the same.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from zero_ext.zero.optimizer import ShardState, ZeroOptimizer

__all__ = ["HostMemoryPlan", "OptimizerOffload", "available_host_memory", "check_host_memory",
           "host_buffer"]


def host_buffer(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialized 1-D host tensor; page-locked when asked and CUDA exists (pinning
    needs the CUDA driver, and buys nothing without a GPU to copy to)."""
    return torch.empty(numel, dtype=dtype, pin_memory=pin and torch.cuda.is_available())


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
                     offload_param: bool) -> dict[str, int]:
    """Host bytes one rank's offloaded state takes, per kind, from the elements of its shards
    (`unit_shard_numel` of them in stage-3 units): the rules the allocations follow, shared by
    the engine's budget check and the estimator.

    offload_param keeps unit shards on the host. offload_optimizer keeps the fp32 master (unless
    it is an fp32 unit shard already there), both moments, a host copy of each reduced gradient
    shard, and for a 16-bit model an upload buffer of the new weights (unless they are written
    straight into a host unit shard)."""
    width = torch.empty((), dtype=dtype, device="meta").element_size()
    grad_width = torch.empty((), dtype=grad_dtype, device="meta").element_size()
    fp32 = dtype == torch.float32
    on_host_units = unit_shard_numel if offload_param else 0
    out = {"params": width * on_host_units}
    if offload_optimizer:
        out.update(master=4 * (shard_numel - (on_host_units if fp32 else 0)),
                   exp_avg=4 * shard_numel, exp_avg_sq=4 * shard_numel,
                   offload_buffers=grad_width * shard_numel
                   + (0 if fp32 else width * (shard_numel - on_host_units)))
    return out


def local_ranks() -> int:
    """Processes on this node that will each allocate their own host state (torchrun sets
    LOCAL_WORLD_SIZE)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


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


class OptimizerOffload:
    """The host side of offload_optimizer: gradient copies out, CPU AdamW, weight copies in.

    `optimizer.shards[i]` (state in host memory) steps with `host_grads[i]`; shards whose
    `model_weights` is set (the model's slice on the device) get the result uploaded.
    `before_host_write(layout_index)` is called before a shard's host weights are written, so
    an in-flight upload of a stage-3 host shard (offload_param) finishes reading it first.
    """

    def __init__(self, optimizer: ZeroOptimizer, grad_dtype: torch.dtype, device: torch.device,
                 *, pin: bool, step_on_arrival: bool,
                 before_host_write: Callable[[int], None] | None = None):
        self.optimizer = optimizer
        self.shards: list[ShardState] = optimizer.shards
        self.device = device
        self.step_on_arrival = step_on_arrival
        self._before_host_write = before_host_write
        self.host_grads = [host_buffer(s.layout.shard_numel, grad_dtype, pin)
                           for s in self.shards]
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
        self._stepped = [False] * n
        self._futures: list[Future] = []
        self._worker = None
        if step_on_arrival:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="zero_ext-offload")
            weakref.finalize(self, self._worker.shutdown, False)

    # -- gradients out -----------------------------------------------------------------------
    def grad_ready(self, index: int, grad: torch.Tensor) -> None:
        """GradientBuckets' on_final: bucket `index`'s gradient shard for this step is final."""
        host = self.host_grads[index]
        if self._cuda:
            # The copy stream waits for what produced the gradient (reduce-scatter, fp32
            # accumulation) on the stream backward runs on.
            self._copy_stream.wait_stream(torch.cuda.current_stream(grad.device))
            with torch.cuda.stream(self._copy_stream):
                host.copy_(grad, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self._in_copy[index], self._copied[index] = grad, event
        else:
            host.copy_(grad)
        self._arrived[index] = True
        if self._worker is not None:
            self._futures.append(self._worker.submit(self._step_shard, index, None))

    def _wait_copy(self, index: int) -> None:
        event = self._copied[index]
        if event is not None:
            event.synchronize()
            self._in_copy[index] = None

    def wait_for_gradients(self) -> None:
        """Until every shard's gradient is on the host and every arrival step has finished."""
        self._drain()
        missing = [i for i, arrived in enumerate(self._arrived) if not arrived]
        if missing:
            raise RuntimeError("zero_ext: no reduced gradients: engine.step() at an "
                               "accumulation boundary needs engine.backward() first")
        for index in range(len(self.shards)):
            self._wait_copy(index)

    # -- the CPU step and weights in ---------------------------------------------------------
    def step(self, inv_scale: torch.Tensor | None) -> None:
        """Steps every shard not stepped on arrival, in bucket order; each upload overlaps the
        next shard's CPU step."""
        for index in range(len(self.shards)):
            if not self._stepped[index]:
                self._step_shard(index, inv_scale)

    def _step_shard(self, index: int, inv_scale: torch.Tensor | None) -> None:
        self._wait_copy(index)
        shard = self.shards[index]
        if self._uploaded[index] is not None:
            # The previous step's upload may still be reading the staging buffer.
            self._uploaded[index].synchronize()
            self._uploaded[index] = None
        if self._before_host_write is not None and shard.model_weights is None:
            self._before_host_write(shard.layout.index)
        self.optimizer.sharded_step([self.host_grads[index]], inv_scale, only=[shard],
                                    copy_out=False)
        self._stepped[index] = True
        if shard.model_weights is None:
            return
        if not self._cuda:
            shard.model_weights.copy_(shard.updated_weights)
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self._upload_stream):
            # The copy stream waited for backward's stream when this gradient was ready:
            # every kernel reading these weights in this backward was queued before that.
            self._upload_stream.wait_event(self._copied[index])
            shard.model_weights.copy_(shard.updated_weights, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._uploaded[index] = event

    def finish(self) -> None:
        """End of engine.step(): all CPU steps done, and the engine's stream ordered after every
        upload (the all-gather and the next forward read the model's slices)."""
        self._drain()
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            for event in self._uploaded:
                if event is not None:
                    stream.wait_event(event)
        self._arrived = [False] * len(self.shards)
        self._stepped = [False] * len(self.shards)

    def _drain(self) -> None:
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()  # re-raises what failed in the worker

    def host_nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.host_grads)
