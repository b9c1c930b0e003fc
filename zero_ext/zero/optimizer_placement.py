"""Where the engine's optimizer state lives and steps: the sharded AdamW (zero/optimizer.py)
with each bucket's state on the device or, under offload_optimizer, on the host
(zero/offload.py), or at stage 0 the user's torch optimizer on the whole, replicated
parameters.

- `OptimizerPlacement`: builds the optimizer (or adopts the replicated one) and the host side
  of offload_optimizer, knows which buckets step on the host and which of those may step
  behind the next forward, and applies one update to all of them.
- `host_memory_plan`: what offload will put in host memory, for the check that refuses a run
  before the first host buffer is allocated.

ZeroEngine (engine.py) decides whether and how much to step (the norm, the overflow skip,
clipping); this module applies the update it decided on. The engine exposes the pieces under
their public names (`engine.optimizer`, `engine.offload`, `engine.replicated_optimizer`),
which the checkpoint code reads.
"""

from __future__ import annotations

import torch

from zero_ext import ops
from zero_ext.config import ZeroOptimizationConfig
from zero_ext.zero import offload
from zero_ext.zero.buckets import GradientBuckets
from zero_ext.zero.client_optimizer import state_bytes_per_element
from zero_ext.zero.hpz import secondary_numel
from zero_ext.zero.optimizer import ShardState, ZeroOptimizer
from zero_ext.zero.params import PartitionedParameters
from zero_ext.zero.partition import BucketLayout
from zero_ext.zero.placement import OffloadPlacement

__all__ = ["OptimizerPlacement", "host_memory_plan"]


def host_memory_plan(placed: OffloadPlacement, layouts: list[BucketLayout],
                     unit_indices: set[int], *, dtype: torch.dtype, grad_dtype: torch.dtype,
                     hpz_partition_size: int,
                     frozen_layouts: list[BucketLayout] = (),
                     client: torch.optim.Optimizer | None = None) -> offload.HostMemoryPlan:
    """What the allocations will put in host memory (the rules of offload.host_state_bytes,
    which the estimator shares): the host-stepped buckets' optimizer state (AdamW's, or the
    user's `client` optimizer's, as wide per element as it keeps in each group), and the unit
    shards (offload_param; stage 3's frozen ones too) with hpZ's secondary copies beside
    them."""
    plan = offload.HostMemoryPlan(local_ranks=offload.local_ranks(), pinned=placed.pin_memory)
    state_bytes = None
    if client is not None and placed.optimizer:
        widths = state_bytes_per_element(client)
        state_bytes = {f"{type(client).__name__} state": round(sum(
            layouts[i].shard_numel * widths[layouts[i].group] for i in placed.host_stepped))}
    unit_layouts = [layout for layout in layouts if layout.index in unit_indices]
    frozen_layouts = list(frozen_layouts)
    for kind, nbytes in offload.host_state_bytes(
            shard_numel=sum(layouts[i].shard_numel for i in placed.host_stepped),
            unit_shard_numel=sum(layout.shard_numel for layout in unit_layouts)
            + secondary_numel(unit_layouts, hpz_partition_size),
            frozen_shard_numel=sum(layout.shard_numel for layout in frozen_layouts)
            + secondary_numel(frozen_layouts, hpz_partition_size),
            dtype=dtype, grad_dtype=grad_dtype, offload_optimizer=placed.optimizer,
            offload_param=placed.param, state_bytes=state_bytes).items():
        plan.add(kind, nbytes)
    return plan


class OptimizerPlacement:
    """The engine's optimizer and where its state lives.

    `replicated`: the user's torch optimizer (stage 0), adopted as it is; otherwise the sharded
    AdamW, or the user's other optimizer (`client`, zero/client_optimizer.py), over `weights` (per bucket, the model-dtype elements this rank updates) with
    `param_groups` and `defaults`. `placed` says which buckets' state lives on the host
    (offload_optimizer, its ratio) and whether the stage-3 units' shards (`unit_indices`) do
    (offload_param): a bucket whose weights and state live apart gets its state where it
    steps and the result copied to the weights. `partitioned` holds the units (None below
    stage 3)."""

    def __init__(self, param_groups: list[dict], layouts: list[BucketLayout],
                 weights: list[torch.Tensor], *, defaults: dict | None,
                 replicated: torch.optim.Optimizer | None, compresses_momentum: bool,
                 client: torch.optim.Optimizer | None,
                 placed: OffloadPlacement, unit_indices: set[int],
                 partitioned: PartitionedParameters | None, zero: ZeroOptimizationConfig,
                 grad_dtype: torch.dtype, device: torch.device, rank: int):
        if (replicated or client) is not None and compresses_momentum:
            raise ValueError(
                f"zero_ext.initialize: zero_ext.compression.gradients.compress_momentum sends "
                f"Adam's momentum in place of the gradient, which zero_ext's AdamW steps with; "
                f"the {type(replicated or client).__name__} given (run as it is: not "
                f"zero_ext's AdamW, or with amsgrad) would apply a momentum of its own on top. "
                "Configure \"optimizer\": {\"type\": \"AdamW\"} (or pass an AdamW without "
                "amsgrad) instead, or set compress_momentum false")
        self.replicated = replicated
        self.host_stepped = placed.host_stepped
        self._state_on_host, self._pin = placed.optimizer, zero.offload_optimizer.pin_memory
        self._device = device
        weights_on_host = unit_indices if placed.param else set()
        self.optimizer = replicated or ZeroOptimizer(
            param_groups, layouts, weights, defaults=defaults, state_buffer=self._state_buffer,
            staged=lambda layout: (layout.index in self.host_stepped) != (
                layout.index in weights_on_host), stage_16bit=placed.optimizer,
            client=client, rank=rank)
        self.offload: offload.OptimizerOffload | None = None
        # Stage-3 unit buckets stepped on the host after the global norm: their step may run
        # behind the next forward, since their weights are read only through the gathers,
        # which wait for it (OptimizerOffload.step, PartitionedParameters.before_read).
        self.deferrable: frozenset[int] = frozenset()
        if placed.optimizer:
            self._build_offload(zero, grad_dtype, rank, partitioned if placed.param else None)
            if partitioned is not None:
                self.deferrable = frozenset(unit_indices & self.host_stepped)
                partitioned.before_read = self.offload.ready
        self._partitioned = partitioned

    def _state_buffer(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer for the optimizer state of a shard whose weights live elsewhere than
        its state: host state for device weights under offload_optimizer (offload_param and a
        ratio below 1 never meet), device state for host weights under offload_param alone."""
        if self._state_on_host:
            return offload.host_buffer(like.numel(), dtype, self._pin)
        return torch.empty(like.numel(), dtype=dtype, device=self._device)

    def _build_offload(self, zero: ZeroOptimizationConfig, grad_dtype: torch.dtype, rank: int,
                       host_units: PartitionedParameters | None) -> None:
        """The host side: CPU AdamW threads, gradient copies out, weight copies in (waiting,
        before writing a host unit shard, for its uploads: `host_units`)."""
        threads = offload.cpu_step_threads(zero.offload_optimizer.cpuadam_cores_perc)
        if torch.get_num_threads() < threads:  # raise torchrun's 1, never lower a choice
            torch.set_num_threads(threads)
            if rank == 0:
                print(f"[zero_ext] offload: the CPU AdamW step runs on {threads} threads "
                      f"per rank (cpuadam_cores_perc "
                      f"{zero.offload_optimizer.cpuadam_cores_perc:g})", flush=True)
        self.offload = offload.OptimizerOffload(
            self.optimizer, [s for s in self.optimizer.shards
                             if s.layout.index in self.host_stepped],
            grad_dtype, self._device, pin=self._pin,
            before_host_write=host_units.wait_host_reads if host_units is not None else None)

    def apply(self, grads: list[torch.Tensor] | None, factor: float,
              buckets: GradientBuckets) -> None:
        """The update itself, the gradients times `factor` (the loss scale's inverse, times the
        clipping coefficient), wherever each shard's optimizer state lives: `grads` are the
        reduced ones in bucket order, None under offload (its host copies, and `buckets`' for
        the device-stepped rest)."""
        if self.replicated is not None:
            self._replicated_step(grads, factor, buckets)
        elif self.offload is None:
            self.optimizer.sharded_step(grads, _scale_on(factor, self.optimizer.shards))
        else:
            # Under offload_optimizer.ratio the device's buckets step first: their kernels
            # are queued at once and run while the host steps the rest.
            on_device = [s for s in self.optimizer.shards
                         if s.layout.index not in self.host_stepped]
            if on_device:
                self.optimizer.sharded_step(
                    buckets.reduced_grads(only={s.layout.index for s in on_device}),
                    _scale_on(factor, on_device), only=on_device)
            self.offload.step(_scale_on(factor, self.offload.shards), defer=self.deferrable)
            if self.deferrable:
                self._partitioned.steps_deferred(self.deferrable)
            # Deferred shards step on the worker after the LR scheduler's step, which checks
            # that the optimizer stepped first: it has, as far as the schedule is concerned.
            self.optimizer._opt_called = True

    def _replicated_step(self, grads: list[torch.Tensor], factor: float,
                         buckets: GradientBuckets) -> None:
        """Stage 0 with the user's optimizer: the all-reduced buckets go back out to each
        parameter's .grad (one copy-out launch per bucket), scaled, and the optimizer steps."""
        for bucket, grad in zip(buckets.buckets, grads):
            for param in bucket.params:
                param.grad = torch.empty_like(param)
            ops.unflatten_from(grad, [p.grad for p in bucket.params], bucket.offsets)
        if factor != 1.0:
            torch._foreach_mul_([p.grad for b in buckets.buckets for p in b.params], factor)
        self.replicated.step()


def _scale_on(factor: float, shards: list[ShardState]) -> torch.Tensor | None:
    """The gradient factor (loss scale and clipping) as a tensor where these shards' fp32
    master weights live, or None when it is 1."""
    if factor == 1.0:
        return None
    return torch.tensor(factor, dtype=torch.float32, device=shards[0].master.device)
