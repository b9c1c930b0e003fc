"""ZeroEngine: forward, backward, step, accumulation, clipping, loss scaling; ZeRO stages 0-3.

zero_ext.initialize() builds one from the user's model and config. The engine takes every
rank's replica of the model (zero/replicas.py: the same model, rank 0's values, its device and
dtype), lays its trainable parameters out in flat buckets (zero/placement.py decides where
everything goes, zero/partition.py pads) so that they become views of those buffers
(zero/persistent.py), or, at stage 3, shards of them (zero/params.py), installs the gradient
hooks (zero/buckets.py) and creates the optimizer with its state where it steps
(zero/optimizer_placement.py: the sharded AdamW of zero/optimizer.py, its host side under
offload). A training step is

    loss = engine(batch)       # the user's forward
    engine.backward(loss)      # 1/accumulation (and the fp16 loss scale); reduces as it goes
    engine.step()              # at the accumulation boundary: norm, clip, AdamW, all-gather

Every decision that must agree across ranks (skip on overflow, the clipping factor) is derived
from values all ranks hold after a collective, so all ranks decide the same
(zero/agreement.py). What the run shows and what the engine holds (the report line, training
metrics, memory_breakdown) is counted in zero/reporting.py.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from zero_ext import arguments, checkpointing, comm, elastic
from zero_ext.checkpoint.registered import RegisteredStates
from zero_ext.config import ZeroConfig
from zero_ext.engine_api import DeepSpeedEngineAPI
from zero_ext.loss_scaler import DynamicLossScaler, loss_scaler_for
from zero_ext.monitor_events import EventWriters
from zero_ext.progress import TrainingMonitor
from zero_ext.zero import (
    offload,
    optimizer_placement,
    placement,
    precision,
    replicas,
    reporting,
    stepping,
)
from zero_ext.zero.agreement import StepAgreement, backward_count_error
from zero_ext.zero.buckets import GradientBuckets, reduced_grad_dtype
from zero_ext.zero.client_optimizer import check_client_optimizer, runs_as
from zero_ext.zero.compression import GradientCompression
from zero_ext.zero.construction import outside_init
from zero_ext.zero.leaves import leaf_parameters
from zero_ext.zero.offload_states import OffloadedStates
from zero_ext.zero.params import PartitionedParameters, materialize
from zero_ext.zero.persistent import PersistentParameters

__all__ = ["DynamicLossScaler", "ZeroEngine"]


class ZeroEngine(DeepSpeedEngineAPI, nn.Module):
    """The training engine for stages 0-3. Built by zero_ext.initialize()."""

    def __init__(self, model: nn.Module, config: ZeroConfig, param_groups: list[dict],
                 optimizer_defaults: dict | None,
                 replicated_optimizer: torch.optim.Optimizer | None = None,
                 client_optimizer: torch.optim.Optimizer | None = None):
        super().__init__()
        _destroy_earlier_engine(model)
        self.config = config
        self.rank, self.world_size = comm.rank(), comm.world_size()
        self.batch = config.resolve_batch(self.world_size)
        self.stage = config.zero_optimization.stage
        self.module = model
        self._init_step_state()
        self._offloaded_states = OffloadedStates()  # offload_states() until reload_states()
        self.model_dtype = config.mixed_precision or torch.float32
        self.device = replicas.training_device()
        self.built_under_init = replicas.place_model(model, self.device,
                                                     config.mixed_precision, self.stage)
        self.comm_dtype = config.comm_dtype or self.model_dtype
        self._timers = reporting.PhaseTimers(config.wall_clock_breakdown, self.device)
        self.checkpoint_states = RegisteredStates()  # saved with every checkpoint
        self._periodic_checkpoints = elastic.periodic_checkpoints(self)

        named = list(model.named_parameters())
        replicas.check_same_structure(named)
        self._params, group_of = placement.group_parameters(named, param_groups, self.rank)
        layout = placement.lay_out(model, self._params, group_of, stage=self.stage,
                                   zero=config.zero_optimization, world_size=self.world_size,
                                   dtype=self.model_dtype)
        if self.stage == 3 and self.rank == 0:
            placement.warn_packed_kept_whole(model, self.model_dtype)
        if self.built_under_init:
            # Everything but the units' parameters is allocated now, whole; the units follow
            # one at a time as PartitionedParameters shards them.
            materialize(model, list(model.modules()), layout.unit_param_ids(self._params),
                        self.device, self.model_dtype)
        # After materialize: an Init model's buffers are then on the training device (built on
        # the CPU, they would go to NCCL, which refuses CPU tensors).
        precision.place_buffers(model, config, self.rank)
        replicas.broadcast_from_rank0(model)
        self.layouts, self.persistent_layouts = layout.layouts, layout.persistent_layouts
        # Stage 3's buckets of frozen parameters (no gradients, no optimizer state), and the
        # parameters their slots index (counting on from self._params).
        self.frozen_layouts, self._frozen_params = layout.frozen_layouts, layout.frozen_params
        self._build_persistent()
        self._tag_parameters()
        self._place_offload(layout, client_optimizer)
        self._build_communication(layout)
        self._build_optimizer(param_groups, optimizer_defaults, replicated_optimizer,
                              client_optimizer, layout.unit_indices)
        self._build_gradients()
        self.loss_scaler: DynamicLossScaler | None = loss_scaler_for(config, self.rank)
        if self.replicated_optimizer is None:
            self.optimizer.loss_scaler = self.loss_scaler  # its DeepSpeed attributes read it
        self.lr_scheduler = None
        bucketed = {id(param): slot.numel for param, _, slot in self.bucket_slots()}
        self.monitor = TrainingMonitor(
            rank=self.rank, world_size=self.world_size, device=self.device,
            trainable_params=sum(layout.used_numel for layout in self.layouts),
            model_params=sum(_weights_in(p, bucketed.get(id(p), p.numel()))
                             for p in model.parameters()),
            samples_per_micro_step=self.batch.train_micro_batch_size_per_gpu * self.world_size)
        self.monitor.events = EventWriters(config.tensorboard, config.csv_monitor, self.rank)

    def __getattr__(self, name: str):
        """Attributes the engine does not have come from the user's model, as DeepSpeed's
        engine forwards them (`engine.config` stays the engine's own)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or not hasattr(module, name):
                raise AttributeError(
                    f"'{type(self).__name__}' object has no attribute '{name}', and neither "
                    f"has its module ({type(module).__name__})") from None
            return getattr(module, name)

    # -- setup ------------------------------------------------------------------------------
    def _init_step_state(self) -> None:
        """The step counters and the accumulation window's state."""
        self.global_steps = self.micro_steps = self.skipped_steps = 0
        self._step_applied = False  # was_step_applied()
        # set_gradient_accumulation_boundary's value while set (None: the count decides).
        self._boundary_override: bool | None = None
        self._window_micro = 0  # micro-steps of the current accumulation window so far
        self._global_grad_norm: float | None = None
        self._last_loss: torch.Tensor | None = None
        # engine.backward() calls since the last engine.step(): the engine expects exactly one.
        self._backwards_since_step = 0
        # (global steps, global samples) when set_train_batch_size last changed the batch
        self._samples_anchor = (0, 0)
        # Inside engine.no_sync(): backwards there are not counted, their gradients wait in
        # .grad (or the fp32 windows) for the window's last backward.
        self._no_sync = False

    def _tag_parameters(self) -> None:
        """For GatheredParameters: each parameter in a bucket (trained, or frozen and
        partitioned at stage 3) knows its engine and bucket; the others (frozen, or in no
        optimizer group), whole on every rank, know their engine as `_zero_ext_whole` (a
        modifier rank's changes to them are broadcast)."""
        engine_ref = weakref.ref(self)
        tagged = set()
        for param, layout, _ in self.bucket_slots():
            param._zero_ext_engine, param._zero_ext_layout = engine_ref, layout.index
            param.__dict__.pop("_zero_ext_whole", None)  # an earlier engine's
            tagged.add(id(param))
        for param in self.module.parameters():
            if id(param) not in tagged:
                param._zero_ext_whole = engine_ref
                for earlier in ("_zero_ext_engine", "_zero_ext_layout"):
                    param.__dict__.pop(earlier, None)

    def bucket_slots(self):
        """(parameter, its bucket, its slot) for every parameter in a bucket: the trained
        ones, and stage 3's partitioned frozen ones (engine.frozen_layouts)."""
        every = self._params + self._frozen_params
        for layout in self.layouts + self.frozen_layouts:
            for slot in layout.slots:
                yield every[slot.param_index], layout, slot

    def _place_offload(self, layout: placement.ParameterLayout,
                       client_optimizer: torch.optim.Optimizer | None) -> None:
        placed = placement.place_offload(self.config.zero_optimization, layout, rank=self.rank,
                                         cuda=torch.cuda.is_available())
        self._offload_placement = placed
        self.offload_optimizer, self.offload_param = placed.optimizer, placed.param
        self.pin_memory = placed.pin_memory
        if self.offload_optimizer or self.offload_param:
            # Refused here, before any host buffer exists, rather than by the OOM killer.
            self._host_memory_plan = optimizer_placement.host_memory_plan(
                placed, self.layouts, layout.unit_indices, frozen_layouts=self.frozen_layouts,
                dtype=self.model_dtype, grad_dtype=self._grad_dtype(),
                hpz_partition_size=self.config.zero_optimization.zero_hpz_partition_size,
                client=client_optimizer)
            offload.check_host_memory(self._host_memory_plan)

    def _build_persistent(self) -> None:
        """The buckets kept whole (zero/persistent.py): their flat buffers, which the model's
        parameters become views of, and the all-gathers after each step (two hops across
        nodes when asked and the nodes allow)."""
        zero = self.config.zero_optimization
        self._persistent = PersistentParameters(
            self.persistent_layouts, self._params, rank=self.rank, world_size=self.world_size,
            sharded=self.stage >= 1, dtype=self.model_dtype, device=self.device,
            allgather_bucket_size=zero.allgather_bucket_size,
            hierarchical=zero.hierarchical_allgather)
        self.flat_params = self._persistent.flats  # their public name (checkpoints read it)

    def _build_communication(self, layout: placement.ParameterLayout) -> None:
        """Compressed communication's policy and state (zero/compression.py), and at stage 3
        the partitioned units with their gather hooks (zero/params.py)."""
        zero = self.config.zero_optimization
        self.compression = GradientCompression(self.config.compression(), self.layouts,
                                               stage=self.stage, device=self.device)
        self.partitioned = None
        if layout.unit_plan:
            self.partitioned = PartitionedParameters(
                layout.unit_plan, self._params + self._frozen_params, rank=self.rank,
                dtype=self.model_dtype, device=self.device,
                prefetch_numel=zero.stage3_prefetch_bucket_size,
                max_live_numel=zero.stage3_max_live_parameters,
                max_reuse_numel=zero.stage3_max_reuse_distance, root=self.module,
                offload=self.offload_param, pin=zero.offload_param.pin_memory,
                hpz_partition_size=zero.zero_hpz_partition_size,
                hierarchical=zero.hierarchical_allgather,
                compute_gather=self.compression.weight_gather(zero.hierarchical_allgather))
            _sync_generation(self.module)

    def _build_optimizer(self, param_groups: list[dict], optimizer_defaults: dict | None,
                         replicated_optimizer: torch.optim.Optimizer | None,
                         client_optimizer: torch.optim.Optimizer | None,
                         unit_indices: set[int]) -> None:
        """Stage 0 may run any torch optimizer on the whole, replicated parameters; otherwise
        the sharded AdamW (or the user's `client_optimizer` on fp32 shards) over the elements
        this rank updates, with its host-stepped buckets under offload_optimizer
        (zero/optimizer_placement.py)."""
        weights = [self._persistent.to_update(layout.index)
                   if self._persistent.owns(layout.index)
                   else self.partitioned.shard(layout.index) for layout in self.layouts]
        self._optimizers = optimizer_placement.OptimizerPlacement(
            param_groups, self.layouts, weights, defaults=optimizer_defaults,
            replicated=replicated_optimizer, client=client_optimizer,
            compresses_momentum=self.compression.compresses_momentum,
            placed=self._offload_placement, unit_indices=unit_indices,
            partitioned=self.partitioned, zero=self.config.zero_optimization,
            grad_dtype=self._grad_dtype(), device=self.device, rank=self.rank)
        # Their public names: the checkpoint code, reporting and tests read them here.
        self.replicated_optimizer = replicated_optimizer
        self.optimizer, self.offload = self._optimizers.optimizer, self._optimizers.offload
        if replicated_optimizer is None:
            self.optimizer.engine = weakref.ref(self)  # its offload_states() is the engine's
        self._deferrable = self._optimizers.deferrable

    def _build_gradients(self) -> None:
        """The gradient buckets (hooks, reductions as they fill; stage 3's reduced shards go to
        the partitioned units, offload's to the host copies) and the step's agreement, which
        drops them when the ranks disagree."""
        self.grad_buckets = GradientBuckets(
            self.layouts, self._params, stage=self.stage, comm_dtype=self.comm_dtype,
            accumulation_steps=self.batch.gradient_accumulation_steps,
            fp32_accumulation=self.config.fp32_accumulation,
            overlap_comm=self.config.zero_optimization.overlap,
            on_reduced=self.partitioned.layout_reduced if self.partitioned else None,
            on_final=self.offload.grad_ready if self.offload else None,
            compression=self.compression if self.compression.compresses_gradients else None)
        self.grad_buckets.watch_first_use(self.module)
        if self.partitioned is not None:  # weakly: the buckets hold the units already
            reduce_now = weakref.WeakMethod(self.grad_buckets.reduce_now)
            self.partitioned.on_backward_over = lambda indices: reduce_now()(indices)
            self.grad_buckets.hold_for_leaves({
                layout.index for unit in self.partitioned.units if unit.leaf
                for layout in unit.layouts if layout.group >= 0})
        if self.stage == 3:  # whether partitioned or kept whole, as DeepSpeed zero-fills them
            self.grad_buckets.count_as_zero(leaf_parameters(self.module))
        self._agreement = StepAgreement(world_size=self.world_size, rank=self.rank,
                                        device=self.device, on_disagree=self.grad_buckets.clear)

    def _grad_dtype(self) -> torch.dtype:
        """The reduced gradient's dtype (the host copies' under offload_optimizer)."""
        return reduced_grad_dtype(
            self.stage, self.batch.gradient_accumulation_steps, self.comm_dtype)

    # -- training ---------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self._offloaded_states.check("a forward", needs=("lp_params",))
        if torch.is_grad_enabled():  # training forwards only: evaluation is not throughput
            self.monitor.forward(args, kwargs)
        segments = checkpointing.counters.segments
        if self.partitioned is not None:
            # Whether this forward trains, read here: a reentrant checkpoint runs its part of
            # the model without autograd, and that part is still the training step's.
            self.partitioned.begin_forward(training=torch.is_grad_enabled())
        try:
            return self._forward(args, kwargs)
        finally:
            if self.partitioned is not None:
                self.partitioned.end_forward()
            if checkpointing.counters.segments != segments or (
                    not self.monitor.recompute and self._hf_checkpointing()):
                self.monitor.recompute = True  # backward recomputes checkpointed forwards

    def _hf_checkpointing(self) -> bool:
        """Whether transformers' gradient checkpointing is on (its layers recompute their
        forward in backward): it sets `gradient_checkpointing` on the modules that declare
        it, found once, so a forward reads a few flags rather than walking the model."""
        if not hasattr(self, "_checkpointing_modules"):
            self._checkpointing_modules = [m for m in self.module.modules()
                                           if "gradient_checkpointing" in m.__dict__]
        return any(m.gradient_checkpointing is True for m in self._checkpointing_modules)

    def _forward(self, args, kwargs):
        if self.config.fp16.auto_cast:  # DeepSpeed casts the positional inputs only
            args = _cast_floating_to_half(args)
        with self._timers.time("forward"):
            # Stage 3: a partitioned parameter used outside its unit is gathered (or named in
            # an error) by its released placeholder itself (params.py, _ReleasedParameter).
            return self.module(*args, **kwargs)

    def compile(self, backend="inductor", compile_kwargs: dict | None = None, schedule=None,
                compiled_autograd_enabled: bool = False) -> None:
        """torch.compile's the user's model in place (`module.compile(backend=...,
        **compile_kwargs)`), as DeepSpeed's engine.compile does; the engine's own step, hooks
        and collectives stay eager. Once per engine: a second call does nothing. DeepCompile's
        `schedule` and compiled autograd are DeepSpeed's and not implemented here."""
        if schedule is not None:
            raise ValueError("zero_ext: engine.compile(schedule=...) is DeepCompile's pass "
                             "schedule, which zero_ext does not implement; call "
                             "engine.compile() without it (the model is torch.compile'd)")
        if compiled_autograd_enabled:
            raise ValueError("zero_ext: engine.compile(compiled_autograd_enabled=True) is not "
                             "supported: backward runs eagerly, through the engine's gradient "
                             "hooks; compile without it (the forward and its backward graph "
                             "are still compiled)")
        if self.is_compiled:
            return
        kwargs = dict(compile_kwargs or {})
        if "backend" in kwargs and self.rank == 0:
            warnings.warn("zero_ext: engine.compile: the `backend` in compile_kwargs is "
                          "overridden by the backend argument", stacklevel=2)
        kwargs["backend"] = backend
        self.module.compile(**kwargs)
        self._compiled = True

    @property
    def is_compiled(self) -> bool:
        """Whether engine.compile() compiled the model."""
        return self.__dict__.get("_compiled", False)

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next micro-step ends an accumulation window: the value given to
        set_gradient_accumulation_boundary while one is set, else every
        gradient_accumulation_steps micro-steps."""
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.batch.gradient_accumulation_steps == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        """From now on, whether each micro-step ends the accumulation window, as DeepSpeed's
        engine: True makes the next backward reduce as the window's last and its step() step
        (a data loader's short last window), False keeps the window open past
        gradient_accumulation_steps; it holds until set again. None (zero_ext's) hands the
        choice back to the count, windows starting again at multiples of
        gradient_accumulation_steps. backward still divides by gradient_accumulation_steps
        unless told scale_wrt_gas=False: for a window of k micro-steps, scale the loss."""
        self._boundary_override = None if is_boundary is None else bool(is_boundary)

    @contextlib.contextmanager
    def window_ending_here(self, ends: bool = True):
        """For trainers that own the accumulation window: when `ends`, the engine's window ends
        at this micro-step even if short (an epoch's last), once; the count decides again
        after (set_gradient_accumulation_boundary's True, then None)."""
        short = ends and not self.is_gradient_accumulation_boundary()
        if short:
            self.set_gradient_accumulation_boundary(True)
        try:
            yield
        finally:
            if short:
                self.set_gradient_accumulation_boundary(None)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False,
                 scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backpropagates `loss` / gradient_accumulation_steps (`loss` itself with
        scale_wrt_gas False; times the fp16 loss scale) and reduces gradients as buckets fill.
        DeepSpeed's signature and return value: that loss before the loss scale (detached),
        which DeepSpeed scripts log."""
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"zero_ext: engine.backward expects the loss tensor, got "
                f"{type(loss).__name__}; pass the loss itself, e.g. outputs[\"loss\"] for a "
                "dict or outputs.loss for a transformers ModelOutput")
        if loss.dim() != 0:
            raise ValueError(f"zero_ext: engine.backward expects a scalar loss, got shape "
                             f"{tuple(loss.shape)}; reduce it (e.g. .mean()) first")
        self._check_alive()
        self._offloaded_states.check("engine.backward()")
        if self._no_sync and self.grad_buckets.reduced():
            raise RuntimeError(
                "zero_ext: engine.backward() inside engine.no_sync() after the backward that "
                "ended this accumulation window and reduced its gradients: this one's would "
                "never be reduced. Call engine.step() first; the next window's backwards may "
                "run inside no_sync")
        self._settle_step()  # the step's gradient buffers are about to be reused
        self._last_loss = loss.detach()
        scaled = loss.float()
        if scale_wrt_gas:
            scaled = scaled / self.batch.gradient_accumulation_steps
        if self.loss_scaler is not None:
            scaled = scaled * self.loss_scaler.scale
        micro_index = self._window_micro
        self.compression.begin_backward(
            self.global_steps, self.loss_scaler.scale if self.loss_scaler is not None else 1.0)
        if micro_index == 0 and self.compression.freezes_variance_at(self.global_steps):
            stepping.freeze_variance(self)
        reduces = self.is_gradient_accumulation_boundary() and not self._no_sync
        with self._timers.time("backward"):
            self.grad_buckets.begin_backward(reduces, micro_index)
            if self.partitioned is not None:
                self.partitioned.begin_backward()
            try:
                scaled.backward(retain_graph=retain_graph)
            finally:
                with self._timers.time("reduce"):
                    self.grad_buckets.end_backward()
                if self.partitioned is not None:
                    self.partitioned.end_backward(retain_graph=bool(retain_graph))
        returned = self._last_loss / self.batch.gradient_accumulation_steps if scale_wrt_gas \
            else self._last_loss
        if self._no_sync:
            return returned
        self._backwards_since_step += 1
        if self.stage == 0 and reduces:
            # Stage 0's step has no collective of its own (the buckets were all-reduced whole),
            # and one added there would pair with a backward's all-reduce on a rank that
            # skipped step(): the agreement rides on every boundary backward instead.
            self._agreement.agree(self.global_steps, self._backwards_since_step,
                                  detached=self.detached_parameters)
        return returned

    def detached_parameters(self) -> list[str]:
        """The names of the parameters kept whole that `param.data = tensor` took out of their
        flat buffer since initialize (checked at each step's agreement)."""
        left = {id(p) for p in self._persistent.detached()} if self._persistent else set()
        return [n for n, p in self.module.named_parameters() if id(p) in left] if left else []

    def step(self, lr_kwargs: dict | None = None) -> None:
        """At an accumulation boundary: global norm, overflow check, clip, AdamW, all-gather,
        then the LR schedule's step (given `lr_kwargs`, as DeepSpeed's engine passes them;
        not after a skipped step). Between boundaries only counts the micro-step. Expects
        exactly one engine.backward() since the last step() (one backward per micro-step, as
        DeepSpeed's engine does)."""
        self._check_alive()
        self._offloaded_states.check("engine.step()")
        stepping.check_lr_kwargs(self.lr_scheduler, lr_kwargs)
        if self._no_sync:
            raise RuntimeError(
                "zero_ext: engine.step() inside engine.no_sync(): the gradients there are not "
                "reduced yet. Leave the context, run the window's last engine.backward() "
                "outside it (it reduces them with its own), then call engine.step()")
        self._settle_step()
        boundary = self.is_gradient_accumulation_boundary()
        if not boundary and self.grad_buckets.reduced():
            # The backward ended the window (and reduced it); the step would leave that
            # gradient for the next boundary to overwrite. Deterministic on every rank;
            # nothing is consumed, so setting the boundary and stepping again completes it.
            raise RuntimeError(
                "zero_ext: engine.step() is not at an accumulation boundary, but the backward "
                "before it was and reduced the window's gradients: the boundary changed between "
                "them (set_gradient_accumulation_boundary or window_ending_here). Set it before "
                "the backward and keep it until step() returns")
        # Backwards under no_sync with no reducing one after them leave a count of 0 at a
        # boundary, which the step refuses (dropping their gradients).
        backwards, self._backwards_since_step = self._backwards_since_step, 0
        if not boundary and backwards != 1:
            # No collective between boundaries to agree in; a loop that does this does it on
            # every rank (two backwards per step(), PyTorch's accumulation style).
            raise RuntimeError(backward_count_error({self.rank: backwards}))
        self.micro_steps += 1
        self._window_micro = 0 if boundary else self._window_micro + 1
        if boundary and self._boundary_override is not None:
            # Windows start at multiples of the accumulation steps (checkpoints rely on it).
            accumulation = self.batch.gradient_accumulation_steps
            self.micro_steps = -(-self.micro_steps // accumulation) * accumulation
        self.monitor.micro_step()
        self._step_applied = False
        if not boundary:
            return
        if self.partitioned is not None:
            # The step rewrites the shards: a unit still gathered now would go into the next
            # forward with the weights of before it.
            self.partitioned.release_all()
        with self._timers.time("step"):
            self._step_applied = stepping.boundary_step(self, backwards, lr_kwargs)
        self.global_steps += 1
        reporting.after_step(self)  # the bar, every steps_per_print steps the report line
        if self._periodic_checkpoints is not None:
            self._periodic_checkpoints.after_step()

    # -- GatheredParameters -----------------------------------------------------------------
    def hold_layouts(self, layout_indices: set[int]) -> list:
        """Gathers and holds the stage-3 units holding these buckets (GatheredParameters)."""
        self._offloaded_states.check("GatheredParameters", needs=("lp_params",))
        if self.partitioned is None:
            return []
        return self.partitioned.hold(layout_indices)

    @torch.no_grad()
    def scatter_modified(self, layout_indices: set[int], modifier_rank: int) -> None:
        """After GatheredParameters: rank `modifier_rank`'s values of these buckets become every
        rank's, in the model's tensors, the shards and the fp32 master weights."""
        for index in sorted(layout_indices):  # the same order on every rank
            if self._persistent.owns(index):
                self._persistent.broadcast(index, src=modifier_rank)
            else:
                self.partitioned.broadcast_layout(index, src=modifier_rank)
            if self.replicated_optimizer is None and index < len(self.layouts):  # not frozen
                self.optimizer.refresh_master(index)

    def unhold_layouts(self, held: list) -> None:
        if held:
            self.partitioned.unhold(held)

    # -- reporting (zero/reporting.py) ------------------------------------------------------
    def get_global_grad_norm(self) -> float | None:
        """The global gradient norm of the last boundary step (before clipping), or None."""
        return self._global_grad_norm

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def log_externally(self) -> None:
        """A trainer (HF, Lightning, accelerate) shows the run's output: from now on this
        engine draws no progress bar and prints no `steps_per_print` report line; the trainer
        logs `training_metrics()` instead."""
        self.monitor.external = True
        self.monitor.bar = False

    def training_metrics(self) -> dict[str, float]:
        """Collective (every rank, at the same point: it gathers the peak memory of each).
        The figures since the previous call or report line, keyed for a trainer's logger and
        the same on every rank: zero_ext/samples_per_s, tokens_per_s and tflops_per_rank
        (when token ids were counted), peak_memory_gib (the largest rank's) and
        peak_memory_gib_rank<r>, loss_scale (fp16), skipped_steps, grad_norm (last step)."""
        return reporting.training_metrics(self)

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes held on this rank now: model parameters (flat buffers), gradients, and
        optimizer state (fp32 master weights that do not alias the model, moments), wherever
        they live; under offload_optimizer also "offload_buffers". memory_by_location() splits
        the total into host and device."""
        return reporting.memory_breakdown(self)

    def memory_by_location(self) -> dict[str, int]:
        """memory_breakdown()'s total split by where it lives: "host" (what offload_optimizer
        and offload_param put in host memory, and offload_states() moved there) and "device"
        (the rest; on a machine without a GPU both are CPU memory)."""
        return reporting.memory_by_location(self)

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag=None, client_state=None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> str:
        """Collective. Writes every rank's shard of the training state to `<save_dir>/<tag>/`
        (tag defaults to `global_step<N>`) and points `<save_dir>/latest` at it once complete.
        `client_state` (plain data: see zero_ext/checkpoint/data_only.py) comes back from
        load_checkpoint. Returns the checkpoint's path. See zero_ext/checkpoint/format.py."""
        from zero_ext.checkpoint.engine_state import save_checkpoint
        self._offloaded_states.check("engine.save_checkpoint()")
        self._settle_step()
        return save_checkpoint(self, save_dir, tag, client_state, save_latest,
                               exclude_frozen_parameters)

    def register_checkpoint_state(self, name: str, obj) -> None:
        """Every later checkpoint saves `obj.state_dict()` (plain data) under `name`, and
        load_checkpoint restores it with `obj.load_state_dict()` (a state loaded before `obj`
        was registered is applied now). ElasticSampler registers its data position here."""
        self.checkpoint_states.register(name, obj)

    def load_checkpoint(self, load_dir: str, tag=None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False,
                        custom_load_fn=None):
        """Collective. Loads the checkpoint `tag` (default: the one `<load_dir>/latest` names),
        saved at any world size and stage, after verifying its manifest and checksums.
        Returns (checkpoint path, client_state), or (None, None) when there is none.
        DeepSpeed's signature: load_module_strict False lets buffers and frozen parameters the
        checkpoint lacks keep the model's values and passes over what it has beyond the model
        (every trainable parameter the model has must be there: its optimizer state is);
        custom_load_fn is refused (there is no module state_dict to hand it)."""
        from zero_ext.checkpoint.loading import load_checkpoint
        if custom_load_fn is not None:
            raise ValueError(
                "zero_ext: load_checkpoint(custom_load_fn=...) is not supported: a zero_ext "
                "checkpoint is shards, with no module state_dict to hand the function. Load "
                "the checkpoint, then change the weights (zero_ext.utils.safe_set_full_fp32_param"
                "), or load full weights with engine.load_weights")
        self._offloaded_states.check("engine.load_checkpoint()")
        self._settle_step()
        return load_checkpoint(self, load_dir, tag, load_optimizer_states,
                               load_lr_scheduler_states, load_module_only,
                               strict=load_module_strict)

    def load_weights(self, path: str, strict: bool = True) -> list[str]:
        """Collective. Loads full model weights from safetensors (a file, or a directory that
        transformers' save_pretrained, save_16bit_model or zero_ext.consolidate wrote) into the
        parameters and fp32 master weights, each rank reading only its own shards' elements:
        with a model built under zero_ext.Init, no process ever holds the whole model. Returns
        the file's tensors the model did not take (refused unless strict=False)."""
        from zero_ext.checkpoint.pretrained import load_weights
        self._offloaded_states.check("engine.load_weights()")
        self._settle_step()
        return load_weights(self, path, strict)

    def save_16bit_model(self, save_dir: str, save_filename: str = "model.safetensors",
                         exclude_frozen_parameters: bool = False, *,
                         writes: bool | None = None) -> str:
        """Collective. The full model weights in the model's dtype, written by rank 0 alone as
        one safetensors file (with config.json for a transformers model, so
        `from_pretrained(save_dir)` loads it), gathering one stage-3 unit at a time. Returns
        the file's path. `writes` (zero_ext's): whether this rank writes it, for nodes that
        do not share storage (the HF Trainer's save_on_each_node: each node's first rank);
        default rank 0 alone, as DeepSpeed."""
        from zero_ext.checkpoint.consolidate import save_engine_model
        self._offloaded_states.check("engine.save_16bit_model()")
        self._settle_step()
        return save_engine_model(self, os.path.join(save_dir, save_filename),
                                 exclude_frozen_parameters,
                                 self.rank == 0 if writes is None else writes)

    @torch.no_grad()
    def _sync_weights_from_master(self) -> None:
        """The model's weights re-derived from the fp32 master weights after they were loaded:
        16-bit copies of this rank's shards, then the all-gather that spreads them."""
        if self.replicated_optimizer is None:
            self.optimizer.write_model_weights()
        if self.partitioned is not None:  # between a forward and its backward too
            self.partitioned.weights_changed()
        if self.stage >= 1:
            self._persistent.all_gather()

    def _settle_step(self) -> None:
        """Waits for the CPU steps left running behind the forward (see _deferrable): what
        follows reads or writes optimizer state or weights other than through a gather."""
        if self.offload is not None:
            self.offload.settle()

    def full_state_dict(self, only_rank: int | None = None) -> dict[str, torch.Tensor]:
        """The complete model state dict as CPU tensors, on every rank, or with `only_rank` on
        that rank alone (the others take part and get {}: one host copy of the model, not one
        per rank). Collective at stage 3, which gathers one unit at a time; at stages 0-2
        every rank holds whole parameters."""
        self._offloaded_states.check("engine.full_state_dict()")
        self._settle_step()
        keep = only_rank is None or only_rank == self.rank
        gathered = self.partitioned.full_values(keep) if self.partitioned is not None else {}
        if not keep:
            return {}
        copies: dict[int, torch.Tensor] = {}  # a tied weight is one tensor under its names

        def value(tensor: torch.Tensor) -> torch.Tensor:
            if tensor in gathered:
                return gathered[tensor]
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.detach().to("cpu", copy=True)
            return copies[id(tensor)]

        return {k: value(v) for k, v in self.module.state_dict(keep_vars=True).items()}


def _destroy_earlier_engine(model: nn.Module) -> None:
    """A model another live engine wraps (initialize run again on it, as a notebook cell run
    twice does): that engine is destroyed first (engine.destroy(): its hooks removed, its
    backward and step refused from then on), with a warning; its hooks would otherwise fire
    in this engine's backward. Stage 3's partitioned parameters are made whole again first
    (collective, one unit gathered at a time), as the model was before that engine; one built
    under zero_ext.Init, which may not fit whole, is refused instead."""
    for param in model.parameters():
        for attribute in ("_zero_ext_engine", "_zero_ext_whole"):
            reference = param.__dict__.get(attribute)
            earlier = reference() if reference is not None else None
            if earlier is None:
                continue
            destroyed = bool(earlier.__dict__.get("_destroyed"))
            partitioned = earlier.partitioned is not None and \
                not earlier.partitioned.__dict__.get("_made_whole")
            if partitioned and earlier.built_under_init:
                raise RuntimeError(
                    "zero_ext.initialize: this model was wrapped by a stage-3 zero_ext engine "
                    "and built under zero_ext.Init, so its parameters exist only as that "
                    "engine's shards (they may not fit whole on one rank). Go on with that "
                    "engine, or save its weights (engine.save_16bit_model), build the model "
                    "again under zero_ext.Init and load them (engine.load_weights)")
            if not destroyed:
                warnings.warn(
                    "zero_ext.initialize: this model is already wrapped by another zero_ext "
                    "engine, which is now destroyed (engine.destroy(): its backward and step "
                    "are refused from here on); the new engine trains the model from its "
                    "current weights, with fresh optimizer state. Call engine.destroy() on "
                    "the earlier engine yourself to silence this", UserWarning, stacklevel=4)
            if partitioned:  # collective: every rank initializes
                earlier.partitioned.make_whole()
            if not destroyed:
                earlier.destroy()
            return


def _weights_in(param: nn.Parameter, numel: int) -> int:
    """How many weights `numel` stored elements of a parameter hold (its full size, also when
    stage 3 partitions it): bitsandbytes' 4-bit weights pack two (per byte of their storage
    dtype) into each stored element, as PEFT counts them."""
    if precision.packed_4bit(param):
        return numel * 2 * param.element_size()
    return numel


def _sync_generation(model: nn.Module) -> None:
    """Stage 3: transformers' generate() keeps every rank forwarding until all have finished
    (synced_gpus) only under DeepSpeed's ZeRO-3 or FSDP, which it recognizes by this attribute
    (transformers.distributed.fsdp.is_fsdp_managed_module); without it, a rank whose sequences
    end first stops gathering, and the others wait in their all-gathers for it (GRPO, RLOO,
    predict_with_generate). Set on every module of the model that generates."""
    for module in model.modules():
        if callable(getattr(type(module), "generate", None)):
            module._is_fsdp_managed_module = True


def _cast_floating_to_half(value):
    """fp16.auto_cast: `value` with every floating-point tensor in it (inside lists, tuples and
    dicts too) cast to fp16, as DeepSpeed's engine casts a forward's positional inputs."""
    if isinstance(value, (list, tuple)):
        return value.__class__(_cast_floating_to_half(v) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floating_to_half(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.half()
    return value


def split_param_groups(model: nn.Module, model_parameters, defaults: dict) -> list[dict]:
    """The user's model_parameters (None, an iterable of tensors, or of group dicts) as a list of
    group dicts with every hyperparameter filled from `defaults`."""
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    items = list(model_parameters)
    if not items:
        raise ValueError("zero_ext.initialize: no trainable parameters")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        out.append({**defaults, **{k: v for k, v in group.items() if k != "params"},
                    "params": params})
    return out


def _adam_types() -> tuple[type, ...]:
    """Optimizer classes whose state the sharded AdamW can take over."""
    from zero_ext.optim import AdamW as ZeroAdamW

    return (torch.optim.AdamW, torch.optim.Adam, ZeroAdamW)


def adopted_by_sharded_adamw(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the optimizer given to initialize (None: the config's) becomes zero_ext's
    sharded AdamW: a torch AdamW / Adam (not a subclass with a step of its own) without
    amsgrad. Any other runs as it is (stage 0) or on the shards (zero/client_optimizer.py)."""
    return optimizer is None or (runs_as(optimizer, _adam_types()) and not any(
        g.get("amsgrad") for g in optimizer.param_groups))


def as_optimizer_defaults(config: ZeroConfig, optimizer) -> dict:
    """Hyperparameters for the sharded AdamW: from the config's optimizer section, or adopted
    from a torch.optim.AdamW / Adam (or zero_ext.optim.AdamW) instance the user passed."""
    from zero_ext.optim import AdamW as ZeroAdamW

    if optimizer is None:
        opt = config.optimizer
        if opt is None:
            from zero_ext.config import OptimizerConfig
            opt = OptimizerConfig()
        p = opt.params
        return {"lr": p.lr, "betas": tuple(p.betas), "eps": p.eps,
                "weight_decay": p.weight_decay, "bias_correction": p.bias_correction,
                "decoupled_weight_decay": opt.decoupled_weight_decay, "maximize": False}
    group = optimizer.param_groups[0]
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get(
        "decoupled_weight_decay", isinstance(optimizer, ZeroAdamW))
    return {"lr": group["lr"], "betas": tuple(group["betas"]), "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "bias_correction": group.get("bias_correction", True),
            "decoupled_weight_decay": bool(decoupled), "maximize": group.get("maximize", False)}


def _check_same_settings(config: ZeroConfig, optimizer) -> None:
    """Collective: the config and a client optimizer's hyperparameters must be equal on every
    rank. A different gradient_accumulation_steps issues a different number of collectives
    (a hang), a different lr trains each shard at its own rate (silently); both are named here
    with every rank's value before anything runs."""
    def flatten(value, path: str, out: dict) -> dict:
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(item, f"{path}.{key}" if path else str(key), out)
        else:
            out[path] = repr(value)
        return out

    mine = flatten(config.to_dict(), "", {})
    for i, group in enumerate(getattr(optimizer, "param_groups", None) or []):
        flatten({k: v for k, v in group.items() if k != "params"},
                f"optimizer.param_groups[{i}]", mine)
    everyone = comm.all_gather_object(mine)
    keys = sorted({key for settings in everyone for key in settings})
    differing = [key for key in keys if len({s.get(key, "<unset>") for s in everyone}) > 1]
    if differing:
        detail = "; ".join(f"{key}: " + ", ".join(f"rank {r} {s.get(key, '<unset>')}"
                                                 for r, s in enumerate(everyone))
                           for key in differing[:8])
        raise ValueError(f"zero_ext.initialize: the settings differ across ranks ({detail}); "
                         "every rank must get the same config and optimizer hyperparameters "
                         "(build them from the same values on every rank, not from the rank)")


def _share_param_groups(client: torch.optim.Optimizer,
                        engine_optimizer: torch.optim.Optimizer) -> None:
    """The optimizer the user passed reads and writes the engine's parameter groups (one for
    one, in order), as DeepSpeed's ZeRO optimizer steps on its client's own groups: a learning
    rate set on it, or by a scheduler built on it that the script steps itself, is the one the
    step uses, and reading it gives the engine's. Its `params` become the engine's (the
    tensors the step updates), as in DeepSpeed's."""
    if len(client.param_groups) != len(engine_optimizer.param_groups):
        raise ValueError(
            f"zero_ext.initialize: the optimizer passed has {len(client.param_groups)} "
            f"parameter groups and the engine's {len(engine_optimizer.param_groups)}; give "
            "every group at least one trainable parameter, or pass a callable "
            "parameters -> optimizer")
    client.param_groups = engine_optimizer.param_groups


def _rebind_scheduler(scheduler, client: torch.optim.Optimizer,
                      engine_optimizer: torch.optim.Optimizer) -> None:
    """A scheduler the user built on their optimizer drives the engine's instead: the engine's
    parameter groups are theirs, one for one and in order (adopted at initialize), so the
    schedule's per-group learning rates land where the step reads them (the client's groups
    are the engine's: _share_param_groups). Chained / sequential schedulers hold their parts in
    `_schedulers`."""
    for part in [scheduler, *getattr(scheduler, "_schedulers", [])]:
        if getattr(part, "optimizer", None) is client:
            part.optimizer = engine_optimizer


def _apply_fused_kernels(model: nn.Module, settings) -> None:
    """``zero_ext.fused_kernels``: swaps the fused ops in before the engine wraps the model, so
    the forwards stage 3's hooks run around are the fused ones; the counts go to rank 0's log."""
    if not settings.enabled:
        return
    from zero_ext.fused import apply
    counts = apply(model, cross_entropy=settings.cross_entropy, norms=settings.norms,
                   activations=settings.activations, softmax=settings.softmax,
                   modules=settings.modules or None)
    if comm.rank() == 0:
        print("[zero_ext] fused kernels: " + ", ".join(f"{n} {kind}" for kind, n in
                                                       counts.items()), flush=True)
    if not any(counts.values()) and not any(
            m.__dict__.get("_zero_ext_fused") for m in model.modules()):
        warnings.warn(f"zero_ext.initialize: zero_ext.fused_kernels.enabled is true, but no module "
                      f"of this {type(model).__name__} is one the fused kernels replace; name "
                      "its classes in zero_ext.fused_kernels.modules (docs/fused.md) or turn "
                      "the switch off", UserWarning, stacklevel=4)


@outside_init  # called inside a zero_ext.Init block, the engine is built outside it
def initialize(args=None, model: nn.Module | None = None, optimizer=None,
               model_parameters: Iterable | None = None, training_data=None,
               lr_scheduler=None, distributed_port: int | None = None, mpu=None,
               dist_init_required: bool | None = None, collate_fn: Callable | None = None,
               config=None, mesh_param=None, config_params=None):
    """Wraps `model` for ZeRO data-parallel training. Returns
    (engine, optimizer, dataloader, lr_scheduler); dataloader is None without training_data.
    DeepSpeed's arguments, in DeepSpeed's order (`initialize(args, model=...)` as in its
    examples): the config may come as config, config_params or in args (--deepspeed_config,
    zero_ext/arguments.py); dist_init_required False expects a process group already;
    distributed_port changes nothing (torchrun's variables place the group); mpu and
    mesh_param (model parallelism) are refused."""
    if isinstance(args, nn.Module):
        raise TypeError("zero_ext.initialize: the first positional argument is DeepSpeed's "
                        "`args` (the parsed command line), and a model was given there; pass "
                        "the model as model=")
    if not isinstance(model, nn.Module):
        raise TypeError(f"zero_ext.initialize: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}; pass the model to train as model=")
    arguments.check_launch(dist_init_required, mpu, mesh_param)
    config = ZeroConfig.load(arguments.config_from(args, config, config_params))
    from zero_ext import checkpointing
    if config.activation_checkpointing is not None:  # else what configure() set stays
        checkpointing.configure(config.activation_checkpointing)
    elastic.check_restartable_launch()
    comm.init_distributed(stall_timeout_s=config.zero_ext.stall_timeout_s)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(f"zero_ext.initialize: optimizer must be a torch.optim.Optimizer or "
                            f"a callable params -> optimizer, got {type(optimizer).__name__}")
        # DeepSpeed calls it with model_parameters, or with every parameter of the model.
        optimizer = optimizer(list(model_parameters) if model_parameters is not None
                              else list(model.parameters()))
    _check_same_settings(config, optimizer)
    _apply_fused_kernels(model, config.zero_ext.fused_kernels)  # settings equal on every rank
    # An optimizer instance names its own parameters: DeepSpeed then ignores model_parameters.
    client_optimizer = optimizer
    zero = config.zero_optimization
    own_rule = adopted_by_sharded_adamw(optimizer)
    if not own_rule and zero.stage == 0:
        # Stage 0 replicates the optimizer: any torch optimizer runs as it is.
        groups = [dict(g) for g in optimizer.param_groups]
        engine = ZeroEngine(model, config, groups, None, replicated_optimizer=optimizer)
    elif not own_rule:
        # Stages 1-3: the user's optimizer steps this rank's fp32 master shards.
        check_client_optimizer(optimizer, zero.stage, config.zero_allow_untested_optimizer,
                               zero.offload_optimizer.enabled,
                               config.zero_force_ds_cpu_optimizer)
        groups = split_param_groups(model, [dict(g) for g in optimizer.param_groups],
                                    dict(optimizer.defaults))
        engine = ZeroEngine(model, config, groups, dict(optimizer.defaults),
                            client_optimizer=optimizer)
    else:
        defaults = as_optimizer_defaults(config, optimizer)
        if optimizer is not None:
            model_parameters = [dict(g) for g in optimizer.param_groups]
        groups = split_param_groups(model, model_parameters, defaults)
        engine = ZeroEngine(model, config, groups, defaults)

    if client_optimizer is not None and client_optimizer is not engine.optimizer:
        _share_param_groups(client_optimizer, engine.optimizer)
    scheduler = None
    if lr_scheduler is not None:
        scheduler = lr_scheduler(engine.optimizer) if callable(lr_scheduler) and not hasattr(
            lr_scheduler, "step") else lr_scheduler
        if client_optimizer is not None and client_optimizer is not engine.optimizer:
            _rebind_scheduler(scheduler, client_optimizer, engine.optimizer)
        if getattr(scheduler, "optimizer", None) is not engine.optimizer:
            raise ValueError("zero_ext.initialize: lr_scheduler must drive the optimizer that "
                             "initialize returns (or the optimizer passed with it); pass a "
                             "callable optimizer -> scheduler")
    elif config.scheduler is not None:
        from zero_ext.lr_schedules import build_scheduler
        scheduler = build_scheduler(config.scheduler, engine.optimizer)
        # The schedule's length is the run's, as far as the progress bar can tell.
        engine.monitor.total_steps = config.scheduler.params.get("total_num_steps")
    if scheduler is not None and not stepping.steps_without_arguments(scheduler):
        warnings.warn(
            f"zero_ext.initialize: {type(scheduler).__name__}.step() needs arguments the engine "
            "does not have (ReduceLROnPlateau's metric), so engine.step() does not step it: "
            "call scheduler.step(metric) yourself after evaluating, as a torch training loop "
            "does, or give them to every step with engine.step(lr_kwargs={...}). (DeepSpeed "
            "steps it with the train batch size as the metric.)", stacklevel=2)
    engine.lr_scheduler = scheduler
    from zero_ext.integrations.peft import gather_dora_lora_weights, guard_save_pretrained
    guard_save_pretrained(engine)  # PEFT's own save_pretrained would read stage-3 shards
    gather_dora_lora_weights(engine)  # DoRA's magnitude reads LoRA weights of other units

    engine.collate_fn = collate_fn  # DeepSpeed's attribute: deepspeed_io's default
    dataloader = None
    if training_data is not None:
        # The same global batches at any world size; its position is in every checkpoint.
        # Loaded in this process (DeepSpeed's default starts two workers).
        dataloader = engine.deepspeed_io(training_data, num_local_io_workers=0)
    engine.training_dataloader = dataloader  # DeepSpeed's attribute (len(), its sampler)
    elastic.auto_resume(engine)
    return engine, engine.optimizer, dataloader, scheduler
