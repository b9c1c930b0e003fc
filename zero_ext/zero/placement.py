"""Where the engine puts each trainable parameter and its training state, decided before any
buffer is allocated.

- `group_parameters`: the trainable parameters in registration order, each with its optimizer
  group (a parameter in two groups is refused; one in none is warned about and left alone, as a
  torch optimizer that lacks it would).
- `lay_out`: the flat buckets. Below stage 3 every parameter lives whole in a persistent bucket
  that the model's tensors view; at stage 3 the parameters of each gather unit get buckets of
  their own (partitioned by params.py), listed first in backward order, and the rest (shared
  by two units, on the root, or of at most stage3_param_persistence_threshold elements) stay
  persistent. Frozen parameters (requires_grad=False) of a unit are partitioned too, as
  DeepSpeed does (a LoRA fine-tune's base model is most of its memory), in buckets of their
  own numbered after every trainable one: they have no gradients and no optimizer state.
- `place_offload`: which buckets' optimizer state steps on the host (offload_optimizer and its
  ratio), whether unit shards live there (offload_param), and whether host buffers are
  page-locked.

ZeroEngine builds its buffers from these plans (engine.py); they hold decisions only, so the
rules read in one place and the engine's constructor stays a list of steps.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from zero_ext.config import ZeroOptimizationConfig
from zero_ext.zero import offload, precision
from zero_ext.zero.construction import is_init_partitioned, partitionable_class
from zero_ext.zero.leaves import enclosing_leaves, mark_configured_leaves
from zero_ext.zero.params import find_units
from zero_ext.zero.partition import BucketLayout, plan_buckets

__all__ = ["FROZEN", "OffloadPlacement", "ParameterLayout", "group_parameters", "lay_out",
           "place_offload", "warn_packed_kept_whole"]

# The group of a bucket of frozen parameters (no optimizer group steps it).
FROZEN = -1


def group_parameters(named: list[tuple[str, nn.Parameter]], param_groups: list[dict],
                     rank: int) -> tuple[list[nn.Parameter], dict[nn.Parameter, int]]:
    """(trainable parameters in registration order that some group holds, group index of
    each). Warns (rank 0) about trainable parameters in no group."""
    group_of: dict[nn.Parameter, int] = {}
    for index, group in enumerate(param_groups):
        for p in group["params"]:
            if p in group_of:
                raise ValueError("zero_ext.initialize: a parameter appears in two parameter "
                                 "groups; give each parameter one group")
            group_of[p] = index
    params = [p for _, p in named if p.requires_grad and p in group_of]
    missing = [n for n, p in named if p.requires_grad and p not in group_of]
    if missing and rank == 0:
        # As with a torch optimizer that lacks them: autograd still fills their .grad, the
        # step leaves them as they are.
        warnings.warn(
            f"zero_ext.initialize: trainable parameters in no parameter group: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; they are not optimized "
            "and keep their values, as with a torch optimizer that lacks them. Add them to "
            "model_parameters (or the optimizer's groups) to train them, or set "
            "requires_grad=False to freeze them without computing their gradients",
            stacklevel=4)
    return params, group_of


@dataclasses.dataclass(frozen=True)
class ParameterLayout:
    """The engine's buckets. `unit_plan`: (gather unit module, its bucket layouts: trainable
    ones first, then its frozen parameters' if any) per stage-3 unit, in backward order;
    `layouts`: every trainable bucket, the units' first (backward reaches them first; indices
    follow that order); `persistent_layouts`: the trainable buckets kept whole (all of them
    below stage 3); `frozen_layouts`: the units' frozen buckets (group FROZEN), indices after
    every trainable one, their slots' param_index counting on from the trainable parameters
    into `frozen_params`."""

    unit_plan: list[tuple[nn.Module, list[BucketLayout]]]
    layouts: list[BucketLayout]
    persistent_layouts: list[BucketLayout]
    frozen_layouts: list[BucketLayout] = dataclasses.field(default_factory=list)
    frozen_params: list[nn.Parameter] = dataclasses.field(default_factory=list)

    @property
    def unit_indices(self) -> set[int]:
        """The trainable unit buckets (those with optimizer state)."""
        return {layout.index for _, layouts in self.unit_plan for layout in layouts
                if layout.group != FROZEN}

    def unit_param_ids(self, params: list[nn.Parameter]) -> set[int]:
        """ids of the parameters that stage 3 partitions (the units' members, frozen ones
        included); `params`: the trainable parameters the slots index."""
        every = params + self.frozen_params
        return {id(every[s.param_index]) for _, layouts in self.unit_plan
                for layout in layouts for s in layout.slots}


def lay_out(model: nn.Module, params: list[nn.Parameter], group_of: dict[nn.Parameter, int],
            *, stage: int, zero: ZeroOptimizationConfig, world_size: int,
            dtype: torch.dtype = torch.float32) -> ParameterLayout:
    """The buckets of `params` (shapes only: meta parameters are laid out as real ones); at
    stage 3 also of the frozen parameters a unit holds that are in the model's `dtype`."""
    frozen = _partitionable_frozen(model, dtype) if stage == 3 else []
    unit_plan, persistent = _plan_units(model, params, frozen, group_of, zero, world_size) \
        if stage == 3 else ([], params)
    position = {id(p): i for i, p in enumerate(params)}
    persistent_index = [position[id(p)] for p in persistent]
    persistent_layouts = plan_buckets(
        [p.numel() for p in persistent], [p.shape for p in persistent],
        [group_of[p] for p in persistent], world_size, zero.reduce_bucket_size)
    layouts: list[BucketLayout] = [layout for _, unit in unit_plan for layout in unit
                                   if layout.group != FROZEN]
    first_persistent = len(layouts)
    for layout in persistent_layouts:
        slots = tuple(dataclasses.replace(s, param_index=persistent_index[s.param_index])
                      for s in layout.slots)
        layouts.append(dataclasses.replace(layout, index=len(layouts), slots=slots))
    # The frozen buckets: numbered after every trainable one (the optimizer, the gradient
    # buckets and the checkpoints' optimizer state index the trainable ones from 0).
    frozen_layouts, plan = [], []
    for module, unit_layouts in unit_plan:
        renumbered = []
        for layout in unit_layouts:
            if layout.group == FROZEN:
                layout = dataclasses.replace(layout, index=len(layouts) + len(frozen_layouts))
                frozen_layouts.append(layout)
            renumbered.append(layout)
        plan.append((module, renumbered))
    return ParameterLayout(plan, layouts, layouts[first_persistent:], frozen_layouts, frozen)


def _partitionable_frozen(model: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
    """The frozen parameters stage 3 may partition: plain parameters in the model's dtype (the
    flat buffers' one), or that Init holds and the engine materializes in it (its floating
    ones), and bitsandbytes' 4-bit weights stored in it (QLoRA's bnb_4bit_quant_storage: the
    packed codes move as that dtype's elements, never cast; the quantization state stays on
    the parameter, whole). Other subclasses, 4-bit weights in another storage dtype (uint8 by
    default) or repacked by an inference forward on the CPU (bitsandbytes' own layout, which
    only its inference kernel reads), and parameters of another dtype (a bf16 base model under
    an fp32 engine's LoRA adapters) stay whole, computing as they are."""
    # Under fp16/bf16 the engine casts every floating parameter first (precision.py); the
    # estimator lays out the model before that cast.
    cast = precision.CASTABLE if dtype in (torch.float16, torch.bfloat16) else ()
    return [p for p in model.parameters() if not p.requires_grad and (
        partitionable_class(p) and (p.dtype == dtype or p.dtype in cast
                                    or (is_init_partitioned(p) and p.is_floating_point()))
        or precision.packed_4bit(p) and p.dtype == dtype
        and not getattr(p.quant_state, "packing_format_for_cpu", False))]


def warn_packed_kept_whole(model: nn.Module, dtype: torch.dtype) -> None:
    """Stage 3: one warning naming the frozen 4-bit weights that stay whole on every rank
    because their storage dtype is not the model's."""
    whole = [(name, p.dtype) for name, p in model.named_parameters()
             if not p.requires_grad and precision.packed_4bit(p) and p.dtype != dtype]
    if whole:
        name, stored = whole[0]
        warnings.warn(
            f"zero_ext stage 3: {len(whole)} bitsandbytes 4-bit weights ({name}, ...) are "
            f"stored as {stored}, not the model's {dtype}, and stay whole on every rank; load "
            f"the model with BitsAndBytesConfig(..., bnb_4bit_quant_storage={dtype}) "
            "to partition them", stacklevel=4)


def _plan_units(model: nn.Module, params: list[nn.Parameter], frozen: list[nn.Parameter],
                group_of: dict[nn.Parameter, int], zero: ZeroOptimizationConfig,
                world_size: int):
    """Stage 3: (unit module, its bucket layouts) for each gather unit, and the trainable
    parameters that stay whole: shared by two units, directly on the root or outside any
    unit, or of at most stage3_param_persistence_threshold elements (DeepSpeed's
    `ds_numel <= threshold`). `frozen` parameters follow the same rule, in buckets of group
    FROZEN after each unit's trainable ones (temporary indices: lay_out renumbers them after
    every trainable bucket), their slots indexing `params + frozen`."""
    threshold = zero.stage3_param_persistence_threshold
    owner: dict[nn.Parameter, list[nn.Module]] = {}
    mark_configured_leaves(model, zero.leaf_module)
    found = find_units(model, zero.stage3_unit_classes)
    for unit in found:
        for p in unit.parameters():
            owner.setdefault(p, []).append(unit)
    members: dict[nn.Module, list[nn.Parameter]] = {}
    persistent = []
    trainable = {id(p) for p in params}
    for p in params + frozen:
        # The innermost unit holding p (units nest: a model's body holds its blocks).
        units = owner.get(p, [])
        innermost = [u for u in units if not any(
            v is not u and any(m is v for m in u.modules()) for v in units)]
        if len(innermost) != 1 or p.numel() <= threshold:
            if id(p) in trainable:
                persistent.append(p)
        else:
            members.setdefault(innermost[0], []).append(p)
    _move_frozen_out_of_bodies(model, members, trainable)
    position = {id(p): i for i, p in enumerate(params + frozen)}
    plan, next_index = [], 0
    for module in reversed(list(members)):  # backward order
        unit_params = members[module]
        local = plan_buckets([p.numel() for p in unit_params], [p.shape for p in unit_params],
                             [group_of[p] if id(p) in trainable else FROZEN
                              for p in unit_params], world_size, 2**62)
        # Trainable buckets first: a unit's first layouts are the ones its gradients reduce.
        local.sort(key=lambda layout: layout.group == FROZEN)
        layouts = []
        for layout in local:
            slots = tuple(dataclasses.replace(s, param_index=position[id(
                unit_params[s.param_index])]) for s in layout.slots)
            index = -1 if layout.group == FROZEN else next_index  # see lay_out
            layouts.append(dataclasses.replace(layout, index=index, slots=slots))
            next_index += layout.group != FROZEN
        plan.append((module, layouts))
    return plan, persistent


def _move_frozen_out_of_bodies(model: nn.Module, members: dict[nn.Module, list],
                               trainable: set[int]) -> None:
    """A frozen parameter of a body (a unit holding other units that hold parameters: a
    PeftModel's base_model, whose forward PEFT and generate() bypass) goes to the module
    holding it directly (the frozen embedding, final norm, LM head), a unit of its own whose
    forward runs where it is used; it stays whole where several modules hold it (tied
    embeddings: the other one's forward would use it released) or that module holds
    parameter-holding units too. Inside a leaf module (a mixture of experts, whose experts run
    on some ranks only) it goes to the outermost leaf instead, gathered whole."""
    leaf_of = enclosing_leaves(model)
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(module)

    def holds_units(module: nn.Module) -> bool:
        return any(m is not module and m in members for m in module.modules())

    for body in [u for u in members if holds_units(u)]:
        frozen = [p for p in members[body] if id(p) not in trainable]
        members[body] = [p for p in members[body] if id(p) in trainable]
        if not members[body]:
            del members[body]
        for p in frozen:
            owners = holders[id(p)]
            owner = leaf_of.get(id(owners[0]), owners[0])
            if len(owners) == 1 and owner is not body and not holds_units(owner):
                members.setdefault(owner, []).append(p)


@dataclasses.dataclass(frozen=True)
class OffloadPlacement:
    """`optimizer`: offload_optimizer is on; `param`: stage-3 unit shards live in host memory;
    `host_stepped`: the bucket indices whose optimizer state lives (and steps) on the host;
    `pin_memory`: host buffers are page-locked (only where CUDA exists)."""

    optimizer: bool
    param: bool
    pin_memory: bool
    host_stepped: frozenset[int]


def place_offload(zero: ZeroOptimizationConfig, layout: ParameterLayout, *, rank: int,
                  cuda: bool) -> OffloadPlacement:
    """The offload decisions for `layout` (warnings and the ratio's line on rank 0)."""
    optimizer = zero.offload_optimizer.enabled
    # Only stage-3 unit shards move to the host; with no units (every parameter kept whole,
    # e.g. none above stage3_param_persistence_threshold) there is nothing to offload.
    param = zero.offload_param.enabled and bool(layout.unit_plan)
    if zero.offload_param.enabled and not layout.unit_plan and rank == 0:
        warnings.warn("zero_ext: offload_param has nothing to offload: no parameter is "
                      "partitioned (each is within stage3_param_persistence_threshold or "
                      "kept whole); lower the threshold to partition and offload them",
                      stacklevel=5)
    pin = cuda and ((zero.offload_optimizer.pin_memory and optimizer)
                    or (zero.offload_param.pin_memory and param))
    # All buckets under offload_optimizer, or the first ones backward finishes under its ratio.
    ratio = zero.offload_optimizer.ratio
    layouts = layout.layouts
    host_stepped = frozenset(range(offload.host_stepped_buckets(
        [b.shard_numel for b in layouts], ratio))) if optimizer else frozenset()
    if ratio < 1.0 and optimizer and rank == 0:
        host_numel = sum(layouts[i].shard_numel for i in host_stepped)
        total_numel = sum(b.shard_numel for b in layouts)
        print(f"[zero_ext] offload: optimizer ratio {ratio:g}: {len(host_stepped)} of "
              f"{len(layouts)} buckets ({100 * host_numel / total_numel:.1f}% of the "
              "elements) step on the host, the rest on the device", flush=True)
    return OffloadPlacement(optimizer, param, pin, host_stepped)
