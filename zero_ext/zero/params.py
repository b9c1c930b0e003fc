"""Stage 3: partitioned parameters, gathered per unit around its forward and backward.

The engine builds one PartitionedParameters at initialize for stage 3. Each gather unit (by
default, every block of a ModuleList/Sequential and every other parameter-holding child of the
model) keeps only this rank's shard of its flat buffers; its parameters' .data is an empty
tensor except while the unit runs:
  forward pre-hook     all-gather the unit's shards, point the parameters at the full buffer
  forward post-hook    release; hook the outputs so the unit is gathered again when backward
                       reaches them
  gradients complete   GradientBuckets reduce-scatters the unit's gradients and calls release
                       (a unit with frozen parameters also waits for the gradients of its
                       forward's inputs: its frozen weights' backward computes only those)
Parameters shared by two units (tied embeddings), directly on the root, or smaller than
stage3_param_persistence_threshold stay whole and take the stage-2 path instead (frozen ones
just stay whole), as do frozen parameters of another class or dtype (quantized weights but
bitsandbytes' 4-bit ones stored in the model's dtype, which keep their class and state).

PartitionedParameters holds the shards and does the gathers, releases and prefetches; the
module hooks that call them as the model runs, and the external parameters, are its
UnitHooks (zero/unit_hooks.py); a unit's state is a GatherUnit (zero/units.py); which units to
gather ahead is its Prefetcher's (zero/prefetch.py); GatheredParameters (zero/gathered.py)
holds units open through it.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Collection

import torch
from torch import nn

from zero_ext import comm
from zero_ext.zero.construction import (
    Init,
    check_initializers,
    materialize,
    reads_metadata,
    tensor_attribute,
    tensors_in,
)
from zero_ext.zero.conversions import conversion_target, same_device
from zero_ext.zero.hpz import SecondaryPartition
from zero_ext.zero.leaves import enclosing_leaves, is_leaf
from zero_ext.zero.offload import host_buffer
from zero_ext.zero.partition import BucketLayout
from zero_ext.zero.precision import packed_4bit
from zero_ext.zero.prefetch import Prefetcher
from zero_ext.zero.unit_hooks import UnitHooks, replaying
from zero_ext.zero.units import GatherUnit, UnitState

__all__ = ["GatherUnit", "Init", "PartitionedParameters", "UnitState", "check_initializers",
           "find_units", "materialize", "register_external_parameter"]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def find_units(model: nn.Module, class_names: list[str] | None = None) -> list[nn.Module]:
    """Modules whose parameters are gathered together, in registration order: the instances of
    `class_names` when given (stage3_unit_classes), else the children of every container
    (transformer blocks) and the root's other children that hold parameters (embedding, head,
    final norm). Inside a block, a ModuleDict's children are part of the block: PEFT keys its
    per-adapter layers by name in ModuleDicts (lora_A, lora_B, DoRA's magnitudes), and units
    of their own would split a LoRA block into one unit per linear (its frozen base weights
    then leave a block holding units, see placement._move_frozen_out_of_bodies). No module
    inside a leaf (zero/leaves.py: a mixture of experts) is a unit. A model passed in
    torch.compile'd (OptimizedModule) is split as the model it wraps."""
    # (torch._dynamo not imported: nothing was compiled; importing it costs a process seconds)
    compiled = sys.modules.get("torch._dynamo.eval_frame")
    while compiled is not None and isinstance(model, compiled.OptimizedModule):
        model = model._orig_mod
    if is_leaf(model):
        raise ValueError("zero_ext stage 3: the model itself is marked as a leaf module "
                         "(set_z3_leaf_modules, zero_optimization.leaf_module); gathered whole it "
                         "would never be partitioned. Mark the blocks that must be gathered whole "
                         "(a mixture of experts' block) instead")
    if class_names is not None:
        leaf_of = enclosing_leaves(model)  # a leaf itself may be a unit, nothing inside it
        units = [m for m in model.modules() if type(m).__name__ in class_names
                 and m is not model and leaf_of.get(id(m), m) is m]
        missing = set(class_names) - {type(m).__name__ for m in units}
        if missing:
            present = sorted({type(m).__name__ for m in model.modules()})
            in_leaves = sorted(missing & set(present))
            if in_leaves:
                raise ValueError(f"zero_optimization.stage3_unit_classes: every module of class "
                                 f"{in_leaves} is inside a leaf module (leaf_module, "
                                 "set_z3_leaf_modules), which is gathered whole; name the leaf's "
                                 "class instead, or unmark the leaf")
            raise ValueError(f"zero_optimization.stage3_unit_classes: no module of class "
                             f"{sorted(missing)} in the model; its classes are {present}")
        return units
    units: list[nn.Module] = []

    def walk(module: nn.Module, in_container: bool, in_block: bool) -> None:
        if is_leaf(module):
            return  # gathered whole: in one unit, itself or the one holding it
        for child in module.children():
            if isinstance(child, _CONTAINERS):
                walk(child, not (in_block and isinstance(child, nn.ModuleDict)), in_block)
            elif in_container or (module is model and any(True for _ in child.parameters())):
                units.append(child)
                walk(child, False, in_block or in_container)
            else:
                walk(child, False, in_block)

    walk(model, False, False)
    return units


def _holds_leaf(module: nn.Module, unit_params: list[list[nn.Parameter]]) -> bool:
    """Whether a unit holds parameters of a leaf module (a body holding leaf units does not)."""
    held = {id(p) for members in unit_params for p in members}
    return any(is_leaf(m) and any(id(p) in held for p in m.parameters())
               for m in module.modules())


def _slot_view(unit: GatherUnit, i: int, slot) -> torch.Tensor:
    """One parameter's values in the unit's gathered buffer of layout `i`."""
    return unit.fulls[i][slot.offset:slot.offset + slot.numel].view(slot.shape)


class _ReleasedParameter(nn.Parameter):
    """The class a partitioned nn.Parameter has while its unit is released (its values exist
    only as shards): metadata reads pass, and any use of the values goes to the engine, which
    gathers the unit when the use happens inside a forward (DeepSpeed's automatic external
    parameters) and raises an error naming the parameter and the fix anywhere else, instead of
    letting an operation compute silently on the empty placeholder. A gathered parameter is a
    plain nn.Parameter again: it pays nothing per operation. `param.data = tensor` is refused:
    the next gather would point the parameter back at its shards' values, losing the tensor
    (zero_ext's own gather and release go past the refusal: _point_at)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        attribute = tensor_attribute(func)
        setter = getattr(func, "__name__", "") == "__set__"
        if setter and attribute == "data":
            if args[1] is args[0]:  # nn.Module.to's assignment after a conversion that kept it
                return None
            _refuse_data_assignment(args[0])
        target = conversion_target(func, args, kwargs)
        if target is not None and _converts_to_itself(args[0], *target):
            return args[0]  # `engine.to(engine.device)`, `model.cpu()` on CPU: nothing to do
        if reads_metadata(func) or setter:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        for value in dict.fromkeys(tensors_in((args, kwargs))):
            if isinstance(value, _ReleasedParameter):
                engine = _engine_of(value)
                if engine is None:
                    raise RuntimeError(
                        f"zero_ext stage 3: a parameter of shape {tuple(value.ds_shape)} is "
                        "used after the engine that partitioned it was freed (nothing kept the "
                        "engine zero_ext.initialize returned), and its values with it; keep the "
                        "engine for as long as the model is used")
                engine.partitioned.hooks.use_released(value)
        return func(*args, **kwargs)


def _point_at(param: nn.Parameter, tensor: torch.Tensor) -> None:
    """zero_ext's own `param.data = tensor` (gather, release), which a released parameter's
    class would refuse."""
    with torch._C.DisableTorchFunctionSubclass():
        param.data = tensor


def _converts_to_itself(param: nn.Parameter, device: torch.device | None,
                       dtype: torch.dtype | None) -> bool:
    """Whether a conversion (`.to(...)`, `.cpu()`, `.half()`, ...) of a released parameter
    leaves it as it is (as Tensor.to, it is then the parameter itself). Any other is a use of
    the values: gathered inside a forward, an error naming the parameter anywhere else."""
    return (dtype is None or dtype == param.dtype) and same_device(device, param.device)


def _refuse_data_assignment(param: nn.Parameter) -> None:
    raise RuntimeError(
        f"zero_ext stage 3: `{_name_of(param)}.data = tensor` on a partitioned parameter whose "
        "unit is released (its values exist only as shards): the next gather would point it "
        "back at the shards' values and the tensor would be lost. Write the values into the "
        "shards instead, on every rank together: `with zero_ext.GatheredParameters(param, "
        "modifier_rank=0): param.data.copy_(tensor)` (rank 0's tensor becomes every rank's; "
        "`param.data = tensor` inside that context works too), or load them with "
        "engine.load_checkpoint / engine.load_weights")


class PartitionedParameters:
    """The stage-3 units of a model: shard storage, gather/release, prefetch and shard access;
    `hooks` (zero/unit_hooks.py) gathers and releases them as the model runs."""

    # Set by the engine: reduces the given trainable buckets now, gradients missing counting as
    # zero (GradientBuckets.reduce_now), when a leaf unit's backward is over.
    on_backward_over: Callable[[list[int]], None] | None = None

    def __init__(self, units: list[tuple[nn.Module, list[BucketLayout]]],
                 params: list[nn.Parameter], *, rank: int, dtype: torch.dtype,
                 device: torch.device, prefetch_numel: int = 0,
                 max_live_numel: int = 2**62, max_reuse_numel: int = 0,
                 root: nn.Module | None = None, offload: bool = False, pin: bool = False,
                 hpz_partition_size: int = 1, hierarchical: bool = False,
                 compute_gather: Callable | None = None):
        self.rank, self.dtype, self.device = rank, dtype, device
        self._warned_stale = False  # _warn_held_for_stale_forwards
        # Gathers over every rank: in two hops (across nodes, then within) or one ring. The two
        # hops' groups are made now, at the same point on every rank, not in the first forward.
        if hierarchical:
            comm.current_topology().hierarchical_groups()
        self._gather_all = comm.hierarchical_all_gather if hierarchical else comm.all_gather
        # qwZ (zero/compression.py): the gathers whose values only feed forward and backward
        # are compressed; values read back or written (GatheredParameters, the full values of
        # checkpoints) are gathered exactly. None: every gather is exact.
        self._compute_gather = compute_gather
        # hpZ: backward gathers from a copy sharded within a block of a node's ranks (the
        # block checked against the nodes before anything is partitioned).
        hpz_group = comm.current_topology().block_group(
            hpz_partition_size, "zero_optimization.zero_hpz_partition_size") \
            if hpz_partition_size > 1 else None
        self.offload = offload  # offload_param: shards live in host memory
        self.root = root
        self.prefetch = Prefetcher(prefetch_numel, max_live_numel, max_reuse_numel)
        # Optimizer offload may leave a unit's step running behind the next forward:
        # before_read(layout index) waits until its shard is up to date. Set by the engine;
        # None when nothing is ever deferred. `stepping`: the layouts whose step was deferred
        # and that no gather has waited for since (steps_deferred), the same on every rank.
        self.before_read: Callable[[int], object] | None = None
        self.stepping: set[int] = set()
        self.in_backward = False  # inside engine.backward (begin_backward to end_backward)
        self._prefetch_after: GatherUnit | None = None  # see use() and after_forward()
        self._upload = None  # offload_param's CUDA stream (see _upload_stream)
        self.units: list[GatherUnit] = []
        self._unit_of_layout: dict[int, GatherUnit] = {}
        self._grad_accumulators: list = []  # see _gather_before_accumulating
        self._accumulator_hooks: list = []
        for module, layouts in units:
            self._partition_unit(module, layouts, params, pin)
        # id of each partitioned parameter -> its unit
        self.unit_of_param = {id(p): unit for unit in self.units
                              for members in unit.params for p in members}
        self.secondary = None
        if hpz_group is not None:
            self.secondary = SecondaryPartition(
                hpz_group, rank, [layout for unit in self.units for layout in unit.layouts],
                dtype, device, offload, pin)
        # When the units are needed as the model runs (zero/unit_hooks.py).
        self.hooks = UnitHooks(self, root)

    @torch.no_grad()
    def _partition_unit(self, module: nn.Module, layouts: list[BucketLayout],
                        params: list[nn.Parameter], pin: bool) -> None:
        """One unit: its parameters flattened into its buckets, this rank's shard of each kept
        (in host memory under offload_param), then released. A unit built under zero_ext.Init
        exists in full only from its materialization here to that release."""
        unit_params = [[params[s.param_index] for s in layout.slots] for layout in layouts]
        if any(p.is_meta for members in unit_params for p in members):
            materialize(self.root, list(module.modules()), set(), self.device, self.dtype)
        shards = []
        for layout, members in zip(layouts, unit_params):
            flat = torch.zeros(layout.padded_numel, dtype=self.dtype, device=self.device)
            for slot, param in zip(layout.slots, members):
                flat[slot.offset:slot.offset + slot.numel].copy_(param.data.reshape(-1))
                # DeepSpeed's full size and shape of a partitioned parameter, which PEFT's
                # and transformers' parameter counts and adapter shapes read where the tensor
                # holds no elements
                param.ds_numel, param.ds_shape = slot.numel, param.shape
            start, end = layout.shard_range(self.rank)
            if self.offload:
                shard = host_buffer(layout.shard_numel, self.dtype, pin)
                shards.append(shard.copy_(flat[start:end]))
            else:
                shards.append(flat[start:end].clone())
        unit = GatherUnit(module, layouts, unit_params, shards, [None] * len(layouts),
                          codes=any(packed_4bit(p) for members in unit_params for p in members),
                          leaf=_holds_leaf(module, unit_params))
        self.units.append(unit)
        for layout in layouts:
            self._unit_of_layout[layout.index] = unit
        self._gather_before_accumulating(unit)
        self.release(unit)

    def _gather_before_accumulating(self, unit: GatherUnit) -> None:
        """A gradient reaching a parameter of a released unit (its use was gathered outside any
        forward, e.g. with GatheredParameters around a loss head, and its backward runs after)
        gathers the unit first: autograd accumulates into a tensor of the parameter's current
        shape. The hook sits on each parameter's gradient accumulator (held here, as
        DeepSpeed holds them, so autograd keeps using the same node)."""
        with torch.enable_grad():
            for members in unit.params:
                for param in members:
                    if not param.requires_grad:
                        continue
                    node = param.view_as(param).grad_fn.next_functions[0][0]
                    self._accumulator_hooks.append(node.register_prehook(
                        lambda grads, unit=unit: self._accumulating(unit)))
                    self._grad_accumulators.append(node)

    def remove_hooks(self) -> None:
        """engine.destroy(): the modules' hooks and the gradient accumulators' removed (the
        units stay partitioned); an engine initialized on the model later gathers nothing of
        this one's in its backward."""
        self.hooks.remove()
        for handle in self._accumulator_hooks:
            handle.remove()
        self._accumulator_hooks, self._grad_accumulators = [], []

    def _accumulating(self, unit: GatherUnit) -> None:
        if unit.state is not UnitState.GATHERED:
            self.gather(unit)

    # -- gather / release ---------------------------------------------------------------------
    @torch.no_grad()
    def start_gather(self, unit: GatherUnit, exact: bool = False) -> None:
        """Issues the unit's all-gathers without waiting (a prefetch). `exact`: the values
        will be read or written back, not only computed with (no qwZ)."""
        if unit.state is not UnitState.SHARDED:
            return
        self._wait_steps(unit)
        # Allocated on the compute stream, which frees them after use (gather() orders it
        # after every stream that writes them).
        unit.fulls = [torch.empty(layout.padded_numel, dtype=self.dtype, device=self.device)
                      for layout in unit.layouts]
        # qwZ would turn packed 4-bit codes into other codes: such a unit is gathered exactly.
        exact = exact or unit.codes
        unit.quantized = self._compute_gather is not None and not exact
        gather_all = self._compute_gather if unit.quantized else self._gather_all
        # hpZ's copies hold what the forward's gather gave (dequantized under qwZ, so exact
        # values come from the primary shards).
        secondary = self.secondary.sources(unit.layouts) if self.secondary is not None and \
            not (exact and self._compute_gather is not None) else None
        # The copies take what the forward computes with: not an exact gather's values under
        # qwZ (a read-only GatheredParameters between forward and backward), or the backward
        # would compute with other weights than its forward did.
        unit.refreshes = self.secondary is not None and secondary is None and \
            (unit.quantized or self._compute_gather is None)
        sources = shards = secondary if secondary is not None else unit.shards
        if self.offload:
            unit.uploads = [torch.empty(s.shape, dtype=s.dtype, device=self.device)
                            for s in shards]
            shards = unit.uploads
        upload = self._upload_stream()
        if upload is not None:
            # offload_param on CUDA: the host-to-device copies and the all-gathers they feed
            # run on a stream of their own, so a prefetch overlaps the compute queued after
            # it; the stream first waits for what the compute stream queued so far (the
            # buffers may reuse memory that work still uses).
            upload.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(upload) if upload is not None else contextlib.nullcontext():
            for i, (host, shard) in enumerate(zip(sources, shards)):
                if self.offload:
                    shard.copy_(host, non_blocking=True)
                bucket = unit.layouts[i].index
                unit.pending.append(
                    comm.all_gather(unit.fulls[i], shard, async_op=True, bucket=bucket,
                                    group=self.secondary.group) if secondary is not None else
                    gather_all(unit.fulls[i], shard, async_op=True, bucket=bucket))
            if upload is not None:
                # Blocking: a host waiting on it (wait_host_reads) sleeps rather than spin a
                # core the CPU optimizer step could use.
                unit.uploaded = torch.cuda.Event(blocking=True)
                unit.uploaded.record(upload)
        unit.state = UnitState.GATHERING

    def _upload_stream(self):
        """offload_param's side stream on CUDA (created on first use), else None."""
        if not (self.offload and self.device.type == "cuda"):
            return None
        if self._upload is None:
            self._upload = torch.cuda.Stream(self.device)
        return self._upload

    @torch.no_grad()
    def gather(self, unit: GatherUnit, exact: bool = False) -> None:
        if exact and unit.quantized and unit.state is not UnitState.SHARDED:
            self.release(unit)  # gathered with qwZ for computing; the exact values are asked
        if unit.state is UnitState.GATHERED:
            return
        self.start_gather(unit, exact)
        for work in unit.pending:
            if work is not None:
                work.wait()
        uploaded = unit.uploaded  # read once: the offload worker may clear it (once complete)
        if uploaded is not None:
            # The copies (and at one rank the all-gather's own copy) ran on the upload stream.
            torch.cuda.current_stream(self.device).wait_event(uploaded)
        unit.pending.clear()
        unit.uploads.clear()
        if unit.refreshes:
            self.secondary.refresh(unit.layouts, unit.fulls)
        for i, layout in enumerate(unit.layouts):
            for slot, param in zip(layout.slots, unit.params[i]):
                if type(param) is _ReleasedParameter:
                    param.__class__ = nn.Parameter
                _point_at(param, _slot_view(unit, i, slot))
        unit.state = UnitState.GATHERED

    def gathered_view(self, param: nn.Parameter) -> torch.Tensor | None:
        """The view of its unit's gathered buffer that a partitioned parameter points at while
        the unit is gathered (None while it is not): where its values are written back from."""
        unit, i, slot = self._slot_of(param)
        return _slot_view(unit, i, slot) if unit.state is UnitState.GATHERED else None

    def use(self, unit: GatherUnit, phase: str) -> None:
        """A unit is needed now (its forward, or backward reached it): gather it, and let the
        prefetcher note the use and start the units it expects next."""
        self.gather(unit)
        if phase == "forward" and replaying():
            return  # no use in the forward order: the unit's backward is what comes next
        for upcoming in self.prefetch.next_units(phase, unit, self):
            # A unit whose deferred optimizer step no gather waited for yet is not waited for
            # here, while the unit now needed has not launched its forward: it is prefetched
            # once that forward is queued (after_forward), and nothing after it before. Not
            # whether the step happens to be done: every rank must start the same gathers at
            # the same points, or a collective of the model's own inside a forward meets
            # another gather on each rank.
            if any(layout.index in self.stepping for layout in upcoming.layouts):
                self._prefetch_after = upcoming if phase == "forward" else None
                break
            self.start_gather(upcoming)

    def after_forward(self) -> None:
        """A unit's forward is queued: the unit use() held back for its deferred step is
        gathered now, after waiting for that step (the same point on every rank)."""
        upcoming, self._prefetch_after = self._prefetch_after, None
        if upcoming is not None:
            self.start_gather(upcoming)

    def begin_backward(self) -> None:
        """engine.backward starts: a gradient computed before it (torch.autograd.grad through
        the model) released nothing and ended no unit's backward."""
        self.in_backward = True
        self.hooks.begin_backward()
        for unit in self.units:
            unit.backward_done = False
            unit.reduced = unit.outside_seen = 0
            # Every forward hooked since the last backward that freed its graph: a backward
            # again through a retained graph (retain_graph=True) meets its hooks again.
            unit.inputs_pending = unit.inputs_registered

    def begin_forward(self, training: bool) -> None:
        """The engine's forward starts; `training`: whether autograd records it."""
        self.prefetch.training_forward = training

    def end_forward(self) -> None:
        """The engine's forward ended (or raised): a prefetch still held back is dropped."""
        self.prefetch.training_forward = None
        self._prefetch_after = None

    def steps_deferred(self, layout_indices: Collection[int]) -> None:
        """The optimizer step left these layouts' steps running (OptimizerOffload.step)."""
        self.stepping = set(layout_indices)

    def _wait_steps(self, unit: GatherUnit) -> None:
        """Before reading a unit's shards: waits for deferred steps still writing them."""
        for layout in unit.layouts:
            if layout.index in self.stepping:
                self.stepping.discard(layout.index)
                self.before_read(layout.index)

    def end_backward(self, retain_graph: bool = False) -> None:
        """After engine.backward: fixes the recorded order after the first step, and drops any
        prefetched unit that was not used."""
        self.in_backward = False
        self.prefetch.end_step(self)
        self._prefetch_after = None
        self._warn_held_for_stale_forwards(retain_graph)
        for unit in self.units:
            unit.backward_done = False
            if unit.state is UnitState.GATHERING:
                self.gather(unit)
                self.release(unit)
            if unit.waits_for_inputs:
                # A forward whose inputs backward never reached (its output unused, or a
                # forward with autograd on and no backward) left its count behind.
                unit.inputs_pending = unit.reduced = unit.outside_seen = 0
                if not retain_graph:
                    unit.inputs_registered = 0
                    unit.untracked_use = False
                if unit.state is UnitState.GATHERED and unit.holders == 0:
                    self.release(unit)
        if self.secondary is not None:
            # The optimizer step may follow: the next forward refreshes the copies.
            self.secondary.invalidate()

    def _warn_held_for_stale_forwards(self, retain_graph: bool) -> None:
        """Once: units with frozen weights (or leaves) whose release waited for the end of this
        backward because a forward of theirs since the last backward was never reached by it
        (an evaluation forward with autograd on): at stage 3 on a large model, every such
        unit stays gathered through the backward."""
        if self._warned_stale or retain_graph or self.rank != 0:
            return
        held = sum(1 for unit in self.units if unit.waits_for_inputs and unit.inputs_pending > 0)
        if held:
            self._warned_stale = True
            warnings.warn(
                f"zero_ext stage 3: {held} of {len(self.units)} units (those with frozen "
                f"weights, or leaf modules) stayed gathered until the end of this backward: a "
                f"forward ran on them since the last backward with autograd on and this "
                f"backward did not reach it (an evaluation forward outside torch.no_grad(), "
                f"or a torch.autograd.grad through the model). Run evaluation under "
                f"torch.no_grad(); otherwise the next backward after such a forward holds the "
                f"whole model's parameters again (said once)", UserWarning, stacklevel=4)

    def release(self, unit: GatherUnit) -> None:
        if unit.state is UnitState.GATHERING:  # never leave a collective unwaited
            self.gather(unit)
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        for members in unit.params:
            for param in members:
                _point_at(param, empty)  # (a unit released again: already of the class)
                if type(param) is nn.Parameter:  # subclasses keep their class, unchecked
                    param.__class__ = _ReleasedParameter
        unit.fulls = [None] * len(unit.layouts)
        unit.state = UnitState.SHARDED
        unit.quantized = False

    def release_all(self) -> None:
        """Every unit not held by a running forward released: prefetched ones, and those an
        evaluation forward left gathered for a backward that never came."""
        for unit in self.units:
            if unit.state is not UnitState.SHARDED and unit.holders == 0:
                self.release(unit)

    def layout_reduced(self, layout_index: int) -> None:
        """GradientBuckets has taken a unit layout's gradients: once all of the unit's layouts
        are reduced, its full parameters are no longer needed in this backward."""
        unit = self._unit_of_layout.get(layout_index)
        if unit is None:
            return
        if unit.state is UnitState.GATHERING:
            # Prefetched in this backward but never used: its all-gather may still read the
            # shard that the optimizer (offload's upload) is about to rewrite.
            self.gather(unit)
        unit.reduced += 1
        self._backward_progress(unit)

    def inputs_reduced(self, unit: GatherUnit, leaf_input: bool = False) -> None:
        """Backward has computed the gradients of the inputs of one of `unit`'s forwards: the
        frozen weights' part of that forward's backward is over (UnitHooks), and once every
        forward's is, a leaf's trainable buckets are reduced (on_backward_over), whichever of
        its parameters got a gradient on this rank; after the backward running now where an
        input is a leaf tensor (`leaf_input`: its parameters' gradients may come after). Only
        inside engine.backward: a torch.autograd.grad through the model before it ends
        nothing."""
        if not self.in_backward:
            return
        unit.inputs_pending -= 1
        if unit.leaf and unit.inputs_pending == 0 and not unit.untracked_use \
                and self.on_backward_over is not None:
            if leaf_input:
                torch.autograd.Variable._execution_engine.queue_callback(
                    lambda: self._leaf_backward_over(unit))
            else:
                self._leaf_backward_over(unit)
            return
        self._backward_progress(unit)

    def _leaf_backward_over(self, unit: GatherUnit) -> None:
        """Reduces a leaf unit's buckets, which releases it once all of them are taken."""
        self.on_backward_over([layout.index for layout in unit.layouts if layout.group >= 0])
        self._backward_progress(unit)

    def outside_grad(self, unit: GatherUnit) -> None:
        """One of the trainable parameters in `unit`'s modules outside its buckets has its
        gradient (UnitHooks)."""
        if self.in_backward:
            unit.outside_seen += 1
            self._backward_progress(unit)

    def _backward_progress(self, unit: GatherUnit) -> None:
        """Released once its backward is over: every trainable layout reduced and, with frozen
        parameters, every forward's inputs and every trainable parameter in its modules
        outside its buckets given their gradients. (Its trainable weights' gradients are
        computed by the same nodes that read them; its frozen weights' backward computes only
        the gradients of what comes before them, and may run after its trainable ones reduced:
        a LoRA adapter's gradients are ready before the base weight's input-gradient matmul.)"""
        if unit.reduced < unit.trainable_layouts or unit.inputs_pending > 0 or \
                unit.outside_seen < unit.outside_trainable:
            return
        unit.reduced = 0
        unit.backward_done = True
        if unit.holders == 0:  # a GatheredParameters around the backward releases it at exit
            self.release(unit)

    def hold(self, layout_indices: set[int]) -> list[tuple[GatherUnit, bool]]:
        """GatheredParameters: gathers every unit holding one of these buckets, exactly, and
        holds it (a forward run meanwhile does not release it) until `unhold`. Returns each
        unit with whether this gathered it. (A unit gathered with qwZ for a forward running now
        is gathered again, exactly, and a prefetch in flight waited for: both left to their
        forward to release.)"""
        held, seen = [], set()
        for index in sorted(layout_indices):  # the same order on every rank
            unit = self._unit_of_layout.get(index)
            if unit is None or id(unit) in seen:
                continue
            seen.add(id(unit))
            mine = unit.state is UnitState.SHARDED
            if unit.state is not UnitState.GATHERED or unit.quantized:
                self.gather(unit, exact=True)
            unit.holders += 1
            held.append((unit, mine))
        return held

    def unhold(self, held: list[tuple[GatherUnit, bool]]) -> None:
        """Ends `hold`: the units it gathered are released unless something else holds them."""
        for unit, mine in held:
            unit.holders -= 1
            if mine and unit.holders == 0:
                self.release(unit)

    @torch.no_grad()
    def broadcast_layout(self, layout_index: int, src: int) -> None:
        """Rank `src`'s gathered values of one unit bucket into every rank's buffer and shard
        (the unit must be gathered)."""
        unit = self._unit_of_layout[layout_index]
        i = [layout.index for layout in unit.layouts].index(layout_index)
        full = unit.fulls[i]
        comm.broadcast(full, src=src)
        start, end = unit.layouts[i].shard_range(self.rank)
        unit.shards[i].copy_(full[start:end])
        self.weights_changed(layout_index)

    def weights_changed(self, layout_index: int | None = None) -> None:
        """A unit bucket's shard (None: every one) was written outside a step: hpZ's secondary
        copy of it is stale (the next backward's gather reads the shards again)."""
        if self.secondary is not None:
            self.secondary.invalidate(layout_index)

    def wait_host_reads(self, layout_index: int) -> None:
        """Before the host rewrites a unit's shard (offload_param with the CPU optimizer): the
        last asynchronous upload from it has finished reading."""
        unit = self._unit_of_layout.get(layout_index)
        if unit is not None and unit.uploaded is not None:
            unit.uploaded.synchronize()
            unit.uploaded = None

    def owns(self, layout_index: int) -> bool:
        return layout_index in self._unit_of_layout

    def _slot_of(self, param: nn.Parameter):
        """(unit, layout position in it, slot) of a partitioned parameter, or None."""
        unit = self.unit_of_param.get(id(param))
        for i, (layout, members) in enumerate(zip(unit.layouts, unit.params) if unit else ()):
            for slot, member in zip(layout.slots, members):
                if member is param:
                    return unit, i, slot
        return None

    @torch.no_grad()
    def write_value(self, param: nn.Parameter, read: Callable[[int, torch.Tensor], None]) -> None:
        """Sets a partitioned parameter (between steps, its unit released) from `read(first,
        out)`, which fills `out` with the flat full value's elements from `first` on: only the
        elements this rank's shard holds are read."""
        unit, i, slot = self._slot_of(param)
        start, end = unit.layouts[i].shard_range(self.rank)
        lo, hi = max(slot.offset, start), min(slot.offset + slot.numel, end)
        if lo < hi:
            read(lo - slot.offset, unit.shards[i][lo - start:hi - start])
        self.weights_changed(unit.layouts[i].index)

    def shard(self, layout_index: int) -> torch.Tensor:
        unit = self._unit_of_layout[layout_index]
        return unit.shards[[layout.index for layout in unit.layouts].index(layout_index)]

    def nbytes(self) -> int:
        """Shards plus whatever full buffers are gathered now."""
        return self.shard_nbytes() + sum(f.numel() * f.element_size() for unit in self.units
                                         for f in unit.fulls if f is not None)

    def shard_nbytes(self) -> int:
        """The units' shards alone, hpZ's secondary shards included (in host memory under
        offload_param)."""
        secondary = self.secondary.nbytes() if self.secondary is not None else 0
        return secondary + sum(t.numel() * t.element_size() for unit in self.units
                               for t in unit.shards)

    @torch.no_grad()
    def iter_full_values(self, keep: bool = True):
        """Per unit, in order, {parameter: its full value on the CPU}, with one unit gathered at
        a time. Collective: every rank must run the iteration to its end; ranks with
        keep=False take part in the gathers and get empty dicts."""
        for unit in self.units:
            was_gathered = unit.state is UnitState.GATHERED
            self.gather(unit, exact=True)
            values = {param: param.data.detach().to("cpu", copy=True)
                      for members in unit.params for param in members} if keep else {}
            if not was_gathered:
                self.release(unit)
            yield unit, values

    def make_whole(self) -> None:
        """Collective: every partitioned parameter holds its full value again, on this rank's
        device, as a plain nn.Parameter (a model another engine takes over); the units are
        not to be gathered or released after this. Once: nothing to do after the first."""
        if self.__dict__.get("_made_whole"):
            return
        self._made_whole = True
        for unit in self.units:
            self.gather(unit, exact=True)
            for members in unit.params:
                for param in members:
                    whole = param.data.clone()
                    if type(param) is _ReleasedParameter:
                        param.__class__ = nn.Parameter
                    _point_at(param, whole)
                    param.__dict__.pop("ds_numel", None)
            unit.fulls = [None] * len(unit.layouts)
            unit.state = UnitState.SHARDED

    def full_values(self, keep: bool = True) -> dict[nn.Parameter, torch.Tensor]:
        """Every partitioned parameter's full value on the CPU (collective; empty where
        `keep` is False)."""
        values = {}
        for _, unit_values in self.iter_full_values(keep):
            values.update(unit_values)
        return values


def _name_of(param: torch.Tensor) -> str:
    engine = _engine_of(param) or _engine_of(param, "_zero_ext_whole")
    if engine is None:  # built under zero_ext.Init, no engine yet to name it
        return f"a parameter of shape {tuple(param.shape)} (before initialize)"
    return next((n for n, p in engine.module.named_parameters() if p is param), "?")


def _engine_of(param: torch.Tensor, tag: str = "_zero_ext_engine"):
    ref = param.__dict__.get(tag)
    return ref() if ref is not None else None


def register_external_parameter(module: nn.Module, param: nn.Parameter) -> None:
    """Stage 3: `module`'s forward uses `param`, which another module owns (DeepSpeed's
    function of the same name). zero_ext then gathers the owner's unit around `module`'s
    forward (and backward) too. Before initialize (e.g. in the model's constructor, as with
    DeepSpeed) the declaration is kept on `module` and honoured when the engine is built."""
    engine = _engine_of(param)
    if engine is not None:
        if engine.partitioned is not None:
            engine.partitioned.hooks.register_external_parameter(module, param)
        return
    module.__dict__.setdefault("_zero_ext_external_params", []).append(param)
