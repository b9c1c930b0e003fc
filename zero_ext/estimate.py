"""Memory estimator: bytes of model states per rank, by ZeRO stage, world size and offload.

Answers "how much memory does each rank need for parameters, gradients and Adam state?" before
a run, as a Python API (`estimate`, `estimate_from_config`, and `host_bytes_needed` for the
host memory offload takes) and as a command line:

    python -m zero_ext.estimate --params 70B --world-sizes 8
    python -m zero_ext.estimate --params 7B --world-sizes 1,8,64 --dtype bf16 --plot mem.png
    python -m zero_ext.estimate --hf-config path/config.json --world-sizes 8,64 \\
        --offload-optimizer --plot mem.png
    python -m zero_ext.estimate --params 70B --stages 3 --offload-optimizer --offload-param \\
        --largest-unit 1.05B
    python -m zero_ext.estimate --hf-config path/config.json --config ds_config.json
    python -m zero_ext.estimate --hf-config config.json --config hf_ds.json --micro-batch 4 \
        --grad-accum 8        # a Trainer config with "auto" values

A config written for the Hugging Face Trainer says "auto" where the TrainingArguments decide:
`fill_autos` gives each one a value, from the command line where it has one (--micro-batch,
--grad-accum, --dtype; the bucket sizes from --hf-config's hidden_size, as DeepSpeed's Trainer
integration does) and otherwise by a stated assumption; the output lists every one.

Two ways to count:
  a module (real or on the meta device; `--hf-config` builds one on the meta device) is exact:
    the engine's own layout arithmetic (plan_buckets, find_units, the stage-3 persistence rule)
    gives each bucket's padded size and each rank's shard, so the numbers are the bytes
    `engine.memory_breakdown()` reports;
  a bare parameter count uses the ZeRO paper's formulas (DESIGN.md's table) on the count
    padded as one parameter group cut into reduce_bucket_size buckets. The per-parameter
    alignment (under 16 elements per tensor) and stage-3 per-unit padding are unknown without
    the model: a bare count underestimates by at most 16 elements per parameter tensor plus
    world_size * 16 per stage-3 unit.

What is counted (the moment each number describes):
  params      the model-dtype flat buffers between steps: whole at stages 0-2; at stage 3 the
              units' shards plus the parameters kept whole (tied, outside any unit, of at
              most stage3_param_persistence_threshold elements)
  grads       the most gradient storage held: stage 0 the whole all-reduced buckets; stage 1
              whole .grad between accumulation boundaries (accumulation > 1; the padded fp32
              buckets with data_types.grad_accum_dtype fp32), otherwise its shard; stages 2-3
              the shard, fp32 when accumulating over micro-steps
  master      fp32 master weights; none when the model is fp32 (they alias its buffers),
              except under optimizer offload, where the host copy is separate, and under
              offload_param alone, where the device keeps one of the host unit shards
  exp_avg, exp_avg_sq   Adam's moments, fp32, for this rank's shards (whole at stage 0)
  gathered    stage 3: the largest unit gathered in full plus what prefetch may have in
              flight (the next unit, or the units that fit in stage3_prefetch_bucket_size if
              more; within stage3_max_live_parameters): an upper bound
  frozen      parameters with requires_grad=False kept whole on every rank (stage 3
              partitions those in a unit, in the model dtype: they count in params)
  offload_buffers   ("staging" in the table) see offload below
  compression ("feedback" in the table) compressed communication's state (docs/compression.md):
              error feedback, 1 byte per bucket element plus 4 per chunk (with two hops,
              given ranks_per_node, 1/(ranks per node) more for the second hop); top-k, an
              fp32 residual of every bucket element, its momentum, at stage 0 the owned chunk's
Not counted: activations, module buffers (e.g. rotary tables), and the transient flat buffer of
the gradient bucket being reduced (up to reduce_bucket_size elements).
Offload follows DeepSpeed: offload_optimizer moves master and moments to the host (the master
is a separate fp32 copy there even for an fp32 model, unless offload_param already keeps that
fp32 shard on the host) and adds host buffers: a copy of each reduced gradient shard for the
CPU step, and for a 16-bit model the new weights on their way back; offload_param (stage 3)
moves the units' parameter shards to the host too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from zero_ext import scaling_cli
from zero_ext.config import ZeroConfig, read_json_config
from zero_ext.zero import offload
from zero_ext.zero.buckets import reduced_grad_dtype
from zero_ext.zero.partition import BucketLayout, plan_buckets
from zero_ext.zero.placement import FROZEN, lay_out

__all__ = ["MemoryEstimate", "StateBytes", "estimate", "estimate_from_config",
           "host_bytes_needed", "load_hf_model", "main", "parse_count"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StateBytes:
    """Bytes of each kind of model state in one place (a rank's device, or its host)."""

    params: int = 0       # model-dtype parameters (flat buffers, stage-3 shards)
    grads: int = 0        # gradient storage held (see the module docstring for the moment)
    master: int = 0       # fp32 master weights that do not alias the model
    exp_avg: int = 0      # Adam's first moment, fp32
    exp_avg_sq: int = 0   # Adam's second moment, fp32
    gathered: int = 0     # stage 3: full units gathered at once (upper bound)
    frozen: int = 0       # requires_grad=False parameters kept whole
    offload_buffers: int = 0  # offload: host gradient copies and 16-bit weight upload buffers
    compression: int = 0  # compressed communication: error-feedback residuals, top-k state

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank bytes of model states for one (stage, world size, precision, offload) setup."""

    stage: int
    world_size: int
    dtype: torch.dtype        # the model's training dtype (fp32, or bf16/fp16 mixed precision)
    gradient_accumulation_steps: int
    numel: int                # trainable parameter elements, unpadded
    padded_numel: int         # trainable elements with alignment and bucket padding
    device: StateBytes
    host: StateBytes
    exact: bool               # from a module's layout (True) or a bare count's formulas
    largest_unit_numel: int | None   # stage 3's largest gather unit, None if unknown
    # under offload_optimizer: the share of the optimizer state stepped on the host (its ratio
    # splits by whole buckets, at least one), else None
    host_state_share: float | None = None

    @property
    def total(self) -> int:
        return self.device.total + self.host.total


def estimate(model: nn.Module | int, *, stage: int, world_size: int,
             dtype: str | torch.dtype = "bf16", offload_optimizer: bool = False,
             offload_param: bool = False, offload_ratio: float | None = None,
             gradient_accumulation_steps: int = 1, param_groups: Iterable | None = None,
             largest_unit: int | None = None, **zero_optimization) -> MemoryEstimate:
    """Per-rank memory of `model` (an nn.Module, possibly on the meta device, or a trainable
    parameter count) trained with ZeRO `stage` on `world_size` ranks.

    `dtype` is the training dtype ("fp32", "bf16", "fp16" or a torch dtype); other
    `offload_ratio` is offload_optimizer.ratio: the share of the optimizer state on the host
    (it implies offload_optimizer). Other zero_optimization keys (reduce_bucket_size,
    stage3_param_persistence_threshold,
    stage3_unit_classes, stage3_prefetch_bucket_size, ...) pass through as keyword arguments.
    `param_groups` are the model_parameters given to initialize (groups split buckets).
    `largest_unit` (elements) gives stage 3's largest gather unit for a bare count.
    """
    if offload_param and stage != 3:
        # A config's offload_param below stage 3 is ignored (with a warning), as DeepSpeed
        # does; asked for here, it is a question about stage 3.
        raise ValueError(f"offload_param=True: parameter offload needs stage 3, the stage is "
                         f"{stage}; ask for stage=3 or leave offload_param off")
    config = _with_options({}, dtype=dtype, accumulation=gradient_accumulation_steps,
                           offload_optimizer=offload_optimizer, offload_param=offload_param,
                           offload_ratio=offload_ratio, stage=stage, **zero_optimization)
    return estimate_from_config(model, config, world_size, param_groups=param_groups,
                                largest_unit=largest_unit)


def _with_options(config: dict, *, dtype: str | torch.dtype | None = None,
                  accumulation: int | None = None, offload_optimizer: bool = False,
                  offload_param: bool = False, offload_ratio: float | None = None,
                  **zero_optimization) -> dict:
    """A copy of the config dict `config` with these options set over its own (None and False
    leave its setting as it is)."""
    config = json.loads(json.dumps(config))  # a deep copy of plain JSON data
    if dtype is not None:
        dtype = _as_dtype(dtype)
        config.pop("fp16", None)
        config.pop("bf16", None)
        if dtype == torch.bfloat16:
            config["bf16"] = {"enabled": True}
        elif dtype == torch.float16:
            config["fp16"] = {"enabled": True}
    if accumulation is not None:
        config["gradient_accumulation_steps"] = accumulation
        config.pop("train_batch_size", None)  # it would fix accumulation per world size
        config.setdefault("train_micro_batch_size_per_gpu", 1)
    zero = config.setdefault("zero_optimization", {})
    zero.update(zero_optimization)
    if offload_optimizer or offload_ratio is not None:
        zero["offload_optimizer"] = {"device": "cpu"}
        if offload_ratio is not None:
            zero["offload_optimizer"]["ratio"] = offload_ratio
    if offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return config


def estimate_from_config(model: nn.Module | int, config, world_size: int, *,
                         param_groups: Iterable | None = None,
                         largest_unit: int | None = None,
                         ranks_per_node: int | None = None) -> MemoryEstimate:
    """The estimate for a zero_ext / DeepSpeed config (dict, JSON path or ZeroConfig): its
    stage, precision, communication dtype, accumulation, buckets, stage-3 keys, offload and
    compression. With a module this is exactly what the engine built from the same config
    holds (given `ranks_per_node` where two-hop error feedback depends on the nodes)."""
    config = ZeroConfig.load(config)
    zero = config.zero_optimization
    if world_size < 1:
        raise ValueError(f"world_size must be a positive number of ranks, got {world_size}")
    dtype = config.mixed_precision or torch.float32
    comm_dtype = config.comm_dtype or dtype
    accumulation = config.resolve_batch(world_size).gradient_accumulation_steps
    if isinstance(model, nn.Module):
        if largest_unit is not None:
            raise ValueError("largest_unit is for a bare parameter count; a module's gather "
                             "units are found from its structure, leave it out")
        unit_layouts, whole_layouts, frozen_numel = _module_layouts(
            model, param_groups, zero, world_size, dtype)
        numel = sum(layout.used_numel for layout in layouts_of(unit_layouts, whole_layouts))
        exact = True
        unit_numels = _unit_numels(unit_layouts)
        largest = max(unit_numels, default=None)
    else:
        numel = _check_count(model)
        # One group in reduce_bucket_size buckets: plan_buckets pads them as the engine would.
        # Past the first two, the full buckets are alike: one layout stands for them all.
        full, rest = divmod(numel, zero.reduce_bucket_size)
        sizes = [zero.reduce_bucket_size] * min(full, 2) + ([rest] if rest else [])
        laid_out = plan_buckets(sizes, [torch.Size([n]) for n in sizes], [0] * len(sizes),
                                world_size, zero.reduce_bucket_size)
        if full > 2:
            laid_out = laid_out[:1] + laid_out[1:2] * (full - 1)
        # Stage 3 shards every unit; without the model, all of it counts as unit parameters.
        unit_layouts, whole_layouts = ([laid_out], []) if zero.stage == 3 else ([], laid_out)
        frozen_numel, exact = 0, False
        largest = largest_unit
        unit_numels = [largest] if largest else []
    return _account(
        stage=zero.stage, world_size=world_size, dtype=dtype, comm_dtype=comm_dtype,
        accumulation=accumulation, unit_layouts=unit_layouts, whole_layouts=whole_layouts,
        numel=numel, frozen_numel=frozen_numel, unit_numels=unit_numels, exact=exact,
        largest=largest, prefetch_numel=zero.stage3_prefetch_bucket_size,
        max_live_numel=zero.stage3_max_live_parameters,
        offload_optimizer=zero.offload_optimizer.enabled, offload_param=zero.offload_param.enabled,
        offload_ratio=zero.offload_optimizer.ratio, fp32_accumulation=config.fp32_accumulation,
        compression=_compression_bytes(config, layouts_of(unit_layouts, whole_layouts),
                                       world_size, ranks_per_node))


def layouts_of(unit_layouts, whole_layouts: list[BucketLayout]) -> list[BucketLayout]:
    """Every trainable bucket, in the engine's order (not stage 3's frozen ones: no
    gradients, no optimizer state)."""
    return [layout for layouts in unit_layouts for layout in layouts
            if layout.group != FROZEN] + whole_layouts


def _compression_bytes(config: ZeroConfig, layouts: list[BucketLayout], world_size: int,
                       ranks_per_node: int | None) -> int:
    """What zero/compression.py keeps per rank (comm.QuantFeedback / TopkFeedback)."""
    plan = config.compression()
    if world_size == 1:
        return 0  # nothing is sent, nothing kept
    total = 0
    if plan.grad_bits is not None and plan.error_feedback:
        nodes = world_size // ranks_per_node if ranks_per_node else 1
        two_hop = 1 < nodes < world_size and world_size % ranks_per_node == 0
        for layout in layouts:
            total += layout.padded_numel + 4 * world_size
            if two_hop:
                total += layout.padded_numel // ranks_per_node + 4 * nodes
    elif plan.gradients == "topk":
        copies = 2 if plan.momentum > 0 else 1
        stage = config.zero_optimization.stage
        for layout in layouts:
            total += 4 * copies * layout.padded_numel
            if stage == 0:
                total += 4 * layout.padded_numel // world_size
    return total


def host_bytes_needed(model: nn.Module | int, config, world_size: int, *,
                      param_groups: Iterable | None = None) -> int:
    """Host bytes one rank's offloaded state takes under `config` (0 without offload): what the
    offload code should find free before it allocates its host buffers. Multiply by the ranks
    per node for a node's total."""
    return estimate_from_config(model, config, world_size, param_groups=param_groups).host.total


# -- exact layout of a module ------------------------------------------------------------------
def _module_layouts(model: nn.Module, param_groups, zero, world_size: int,
                    dtype: torch.dtype):
    """(stage-3 unit layouts, frozen ones included, layouts of trainable parameters kept
    whole, elements of frozen parameters kept whole): the buckets ZeroEngine builds for this
    model, from the engine's own planning code."""
    named = list(model.named_parameters())
    group_of = _group_of(model, param_groups)
    params = [p for _, p in named if p.requires_grad and p in group_of]
    missing = [n for n, p in named if p.requires_grad and p not in group_of]
    if missing:
        raise ValueError(f"param_groups: trainable parameters missing from the groups: "
                         f"{missing[:5]}; list every trainable parameter (or freeze it)")
    # The engine's own planning (zero/placement.py): its stage-3 rule (innermost unit, tied and
    # root-level parameters and small ones kept whole) and its bucket padding.
    layout = lay_out(model, params, group_of, stage=zero.stage, zero=zero,
                     world_size=world_size, dtype=dtype)
    partitioned = layout.unit_param_ids(params)
    frozen = sum(p.numel() for p in dict.fromkeys(p for _, p in named)
                 if not p.requires_grad and id(p) not in partitioned)
    return [layouts for _, layouts in layout.unit_plan], layout.persistent_layouts, frozen


def _group_of(model: nn.Module, param_groups) -> dict[nn.Parameter, int]:
    if param_groups is None:
        return {p: 0 for p in model.parameters() if p.requires_grad}
    group_of = {}
    for index, group in enumerate(param_groups):
        members = group["params"] if isinstance(group, dict) else group
        for p in ([members] if isinstance(members, torch.Tensor) else members):
            if p.requires_grad:
                group_of[p] = index
    return group_of


def _unit_numels(unit_layouts) -> list[int]:
    return [sum(layout.padded_numel for layout in layouts) for layouts in unit_layouts]


def _account(*, stage: int, world_size: int, dtype: torch.dtype, comm_dtype: torch.dtype,
             accumulation: int, unit_layouts, whole_layouts: list[BucketLayout], numel: int,
             frozen_numel: int, unit_numels: list[int], exact: bool, largest: int | None,
             prefetch_numel: int, max_live_numel: int, offload_optimizer: bool,
             offload_param: bool, offload_ratio: float = 1.0,
             compression: int = 0, fp32_accumulation: bool = False) -> MemoryEstimate:
    """Bytes per kind from the layouts, following what the engine allocates."""
    units = [layout for layouts in unit_layouts for layout in layouts]
    layouts = layouts_of(unit_layouts, whole_layouts)
    padded = sum(layout.padded_numel for layout in layouts)
    shards = sum(layout.shard_numel for layout in layouts)
    width, comm_width = _itemsize(dtype), _itemsize(comm_dtype)
    # The shard elements whose optimizer state (and reduced gradient) goes to the host: all of
    # them under offload_optimizer, or the first buckets' under its ratio; the rest stay here.
    host_shards = 0
    if offload_optimizer:
        on_host = offload.host_stepped_buckets([layout.shard_numel for layout in layouts],
                                               offload_ratio)
        host_shards = sum(layout.shard_numel for layout in layouts[:on_host])
    device_shards = shards - host_shards

    unit_params = width * sum(layout.shard_numel for layout in units)
    whole_params = width * sum(layout.padded_numel for layout in whole_layouts)
    # The reduced gradient of a step: whole all-reduced buckets at stage 0, else this rank's
    # shard; under offload_optimizer it is copied to the host and freed during backward.
    final = comm_width * (padded if stage == 0 else device_shards)
    if stage <= 1:
        # Stage 0/1 reduce only at the boundary: until then every .grad is whole, unpadded
        # (with fp32 accumulation, the buckets' fp32 windows instead, padded).
        between = 4 * padded if fp32_accumulation else width * numel
        grads = max(final, between if accumulation > 1 else 0)
    else:
        grads = 4 * shards if accumulation > 1 else final
    state = padded if stage == 0 else device_shards
    unit_shards = sum(layout.shard_numel for layout in units if layout.group != FROZEN)
    frozen_shards = sum(layout.shard_numel for layout in units if layout.group == FROZEN)
    fp32_model = dtype == torch.float32
    # offload_param alone: the unit shards live on the host, their optimizer state here, with
    # an fp32 master of them (an fp32 model's cannot be its shard there).
    staged = unit_shards if offload_param and not offload_optimizer else 0
    # On the device an fp32 model's master weights are its own buffers (the host side is
    # offload.host_state_bytes).
    master = 4 * staged if fp32_model else 4 * state
    gathered = 0
    if stage == 3:
        biggest = max(unit_numels, default=0)
        room = max(max_live_numel - biggest, 0)
        budget = min(prefetch_numel, room)
        # Prefetch issues the next unit whatever its size, then whole units within the budget.
        # A bare count knows no units, so any part of the model may be in flight.
        others = unit_numels.copy()
        if others:
            others.remove(biggest)
        ahead = min(budget, sum(n for n in others if n <= budget) if exact else numel)
        if prefetch_numel > 0:
            next_unit = max((n for n in others if n <= room), default=0) if exact \
                else min(biggest, room)
            ahead = max(ahead, next_unit)
        gathered = width * (biggest + ahead)
    optimizer = {"master": master, "exp_avg": 4 * state, "exp_avg_sq": 4 * state}
    device = {"params": whole_params + unit_params, "grads": grads, "gathered": gathered,
              "frozen": width * frozen_numel, "compression": compression}
    host = offload.host_state_bytes(
        shard_numel=host_shards, unit_shard_numel=unit_shards,
        frozen_shard_numel=frozen_shards, dtype=dtype,
        grad_dtype=reduced_grad_dtype(stage, accumulation, comm_dtype),
        offload_optimizer=offload_optimizer, offload_param=offload_param)
    device.update(optimizer)
    if offload_param:
        device["params"] = whole_params
    return MemoryEstimate(stage=stage, world_size=world_size, dtype=dtype,
                          gradient_accumulation_steps=accumulation, numel=numel,
                          padded_numel=padded, device=StateBytes(**device),
                          host=StateBytes(**host), exact=exact, largest_unit_numel=largest,
                          host_state_share=host_shards / shards if offload_optimizer else None)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not a training dtype zero_ext supports; use "
                             "torch.float32, torch.bfloat16 or torch.float16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# 10**15 parameters, a thousand times today's largest models: past it, a count is a typo (and
# its bucket list would not fit in memory).
MAX_PARAMS = 10**15


def _too_many(text: str) -> str:
    return (f"{text} parameters is more than zero_ext.estimate handles ({MAX_PARAMS:.0e}, a "
            "thousand times the largest models trained); check the count, e.g. 70B or 7e10")


def _check_count(numel) -> int:
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"expected an nn.Module or a positive parameter count, got {numel!r}")
    if numel > MAX_PARAMS:
        raise ValueError(_too_many(f"{numel:.3g}"))
    return numel


# -- inputs --------------------------------------------------------------------------------------
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str) -> int:
    """'70B', '6.7e9', '1.3M', '125000', '1_000' -> elements (K, M, B/G, T are powers of 1000)."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]?)\s*",
                         str(text))
    suffix = match.group(2).upper() if match else None
    if match is None or suffix not in _SUFFIXES:
        raise ValueError(f"{text!r} is not a parameter count; write a number with an optional "
                         "K, M, B or T suffix, e.g. 70B, 6.7e9 or 125M")
    value = float(match.group(1).replace("_", "")) * _SUFFIXES[suffix]
    if value < 1:
        raise ValueError(f"{text!r} is less than one parameter; give a positive count, e.g. 7B")
    if value > MAX_PARAMS:
        raise ValueError(_too_many(repr(text)))
    return round(value)


def load_hf_model(path: str | os.PathLike) -> nn.Module:
    """A transformers model built from a config.json on the meta device: exact parameter shapes
    and module structure (its decoder layers become the stage-3 units), nothing allocated or
    downloaded."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass the path of a transformers config.json "
                         "(the one next to a model's weights)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); pass a transformers config.json"
                         ) from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path}: no \"model_type\" key, so transformers cannot tell which model "
                         "it describes; pass a model's config.json (it has e.g. \"model_type\": "
                         "\"llama\"), or use --params with a parameter count")
    try:
        import transformers
    except ImportError:
        raise ValueError("--hf-config needs the transformers package: pip install transformers"
                         ) from None
    transformers.logging.set_verbosity_error()
    data = dict(data)
    try:
        config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a language model (e.g. an encoder): its base model
            return transformers.AutoModel.from_config(config)


# -- "auto" values -----------------------------------------------------------------------------
_PRECISION_AUTOS = ("fp16.enabled", "bf16.enabled", "bfloat16.enabled")


def fill_autos(config: dict, *, micro_batch: int | None = None,
               accumulation: int | None = None, dtype: str | None = None,
               hidden_size: int | None = None) -> tuple[dict, list[str]]:
    """`config` (a dict) with every "auto" value replaced, and one line per replacement saying
    what it became and why. Never refuses: what the arguments do not give is assumed, and said.

    train_micro_batch_size_per_gpu <- `micro_batch`, else 1 (model states do not depend on it);
    gradient_accumulation_steps <- `accumulation`, else derived from an explicit
    train_batch_size per world size, else 1; train_batch_size <- left to be derived; fp16/bf16
    <- `dtype`, else bf16 weights; the bucket sizes <- DeepSpeed's heuristics from
    `hidden_size`, else zero_ext's defaults; anything else (optimizer, scheduler, clipping)
    does not change model-state memory and takes zero_ext's default."""
    from zero_ext.integrations.config_fill import AUTO, ConfigFiller, hidden_size_defaults

    cfg = ConfigFiller(config).config  # a deep copy
    said: list[str] = []

    def set_auto(path: str, value, why: str) -> None:
        *parents, key = path.split(".")
        section = cfg
        for name in parents:
            section = section.get(name)
            if not isinstance(section, dict):
                return
        if section.get(key) != AUTO:
            return
        if value is None:
            del section[key]
        else:
            section[key] = value
        said.append(f"{path}: {why}" if value is None else
                    f"{path} = {json.dumps(value)}: {why}")

    set_auto("train_micro_batch_size_per_gpu", micro_batch or 1,
             "from --micro-batch" if micro_batch else
             "assumed (model states do not depend on it; give --micro-batch)")
    explicit_total = isinstance(cfg.get("train_batch_size"), int)
    if accumulation is not None:
        set_auto("gradient_accumulation_steps", accumulation, "from --gradient-accumulation-steps")
    elif explicit_total:
        set_auto("gradient_accumulation_steps", None,
                 "train_batch_size / (micro batch * world size), at each world size")
    else:
        set_auto("gradient_accumulation_steps", 1,
                 "assumed (with accumulation stage 1 keeps whole gradients and stages 2-3 an "
                 "fp32 shard; give --gradient-accumulation-steps)")
    set_auto("train_batch_size", None, "micro batch * accumulation * world size, at each world "
             "size")
    before = len(said)
    for path in _PRECISION_AUTOS:
        if dtype is not None:
            set_auto(path, None, f"from --dtype {dtype}")
        else:
            set_auto(path, not path.startswith("fp16"), "assumed bf16 weights (give --dtype)")
    if dtype is None and len(said) > before and "bfloat16" not in cfg:
        cfg.setdefault("bf16", {})["enabled"] = True  # also when only fp16 said "auto"
    defaults = ZeroConfig().zero_optimization
    for path, value, source in hidden_size_defaults(hidden_size or 1):
        if hidden_size:
            set_auto(path, value, f"{source}, hidden_size {hidden_size} from --hf-config, as "
                                  "DeepSpeed's Trainer integration sizes it")
        else:
            key = path.split(".")[-1]
            set_auto(path, getattr(defaults, key), "zero_ext's default (give --hf-config to "
                                                   "size it from the model's hidden_size)")
    scheduler = cfg.get("scheduler")
    if isinstance(scheduler, dict) and ConfigFiller(scheduler).leftover_autos():
        del cfg["scheduler"]  # its "auto" steps may be required keys; it holds no memory
        said.append("scheduler: left out (its \"auto\" values come from the run's length; a "
                    "schedule holds no model-state memory)")
    for path in ConfigFiller(cfg).leftover_autos():
        set_auto(path, None, "zero_ext's default: it does not change model-state memory")
    return cfg, said


# -- command line --------------------------------------------------------------------------------
# Each kind counts wherever it lives; "device" and "host" split the total by place.
_COLUMNS = [("params", lambda e: _both(e, "params") + _both(e, "frozen")),
            ("grads", lambda e: _both(e, "grads")), ("master", lambda e: _both(e, "master")),
            ("Adam m+v", lambda e: _both(e, "exp_avg") + _both(e, "exp_avg_sq")),
            ("gathered", lambda e: _both(e, "gathered")),
            ("staging", lambda e: _both(e, "offload_buffers")),
            ("feedback", lambda e: _both(e, "compression")),
            ("device", lambda e: e.device.total),
            ("host", lambda e: e.host.total)]


def _both(e: MemoryEstimate, kind: str) -> int:
    return getattr(e.device, kind) + getattr(e.host, kind)


def _unit(largest: int) -> tuple[str, int]:
    for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "B", 1


def _human(numel: int) -> str:
    for suffix, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if numel >= size:
            return f"{numel / size:.2f}{suffix}"
    return str(numel)


def format_table(estimates: Sequence[MemoryEstimate], title: str) -> str:
    """A table of per-rank bytes, one row per (stage, world size)."""
    unit, size = _unit(max(max(e.device.total, e.host.total) for e in estimates))
    offload = any(e.host.total for e in estimates)
    # Without offload everything is on the device: no host or staging columns.
    compressed = any(e.device.compression for e in estimates)
    columns = [(name, get) for name, get in _COLUMNS
               if (offload or name not in ("staging", "host"))
               and (compressed or name != "feedback")]
    header = ["stage", "ranks"] + [name for name, _ in columns]
    rows = [[str(e.stage), str(e.world_size)] +
            [f"{get(e) / size:.2f}" for _, get in columns] for e in estimates]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    legend = f"per rank, {unit}" + ("; 'device' and 'host' split the total by where the state "
                                    "lives (host: what offload moves to CPU memory)"
                                    if offload else "")
    lines = [title, textwrap.fill(legend, 100)]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header] + rows]
    return "\n".join(lines)


def plot(estimates: Sequence[MemoryEstimate], title: str, path: str) -> None:
    """Writes `figure(estimates, title)` to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(estimates, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(estimates: Sequence[MemoryEstimate], title: str):
    """Memory per rank by stage: against world size, one line per stage (host dashed), or for
    a single world size, side-by-side bars per stage (device, host), since points at one x
    would be drawn on top of each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, size = _unit(max(max(e.device.total, e.host.total) for e in estimates))
    fig, axes = plt.subplots(figsize=(7, 4.5))
    stages = sorted({e.stage for e in estimates})
    world_sizes = sorted({e.world_size for e in estimates})
    with_host = any(e.host.total for e in estimates)
    if len(world_sizes) == 1:
        _draw_bars(axes, estimates, stages, with_host, size)
        axes.set_xlabel(f"ZeRO stage, {world_sizes[0]} data-parallel ranks")
    else:
        _draw_lines(axes, estimates, stages, world_sizes, size)
        axes.set_xlabel("data-parallel ranks")
    axes.set_ylabel(f"model states per rank ({unit})")
    axes.set_title(textwrap.fill(title, 80), fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend()
    fig.tight_layout()
    return fig


def _draw_bars(axes, estimates, stages: list[int], with_host: bool, size: int) -> None:
    width = 0.38 if with_host else 0.6
    by_stage = {e.stage: e for e in estimates}
    xs = list(range(len(stages)))
    places = [("device", 0.0)] if not with_host else [("device", -width / 2),
                                                      ("host", width / 2)]
    for place, shift in places:
        bars = axes.bar([x + shift for x in xs],
                        [getattr(by_stage[s], place).total / size for s in stages],
                        width=width, label=place, hatch="//" if place == "host" else None)
        axes.bar_label(bars, fmt="%.3g", fontsize=8)
    axes.set_xticks(xs, [f"stage {s}" for s in stages])


def _draw_lines(axes, estimates, stages: list[int], world_sizes: list[int], size: int) -> None:
    import matplotlib

    # Distinct markers: stages 1 and 2 coincide without accumulation and must stay visible
    # (drawn at the true world sizes; a single world size is drawn as bars instead).
    markers = {0: "o", 1: "s", 2: "^", 3: "D"}
    for stage in stages:
        rows = sorted((e for e in estimates if e.stage == stage), key=lambda e: e.world_size)
        xs = [e.world_size for e in rows]
        line, = axes.plot(xs, [e.device.total / size for e in rows], marker=markers[stage],
                          fillstyle="none", label=f"stage {stage}")
        if any(e.host.total for e in rows):
            axes.plot(xs, [e.host.total / size for e in rows], linestyle="--",
                      marker=markers[stage], fillstyle="none", color=line.get_color(),
                      label=f"stage {stage} host")
    # Memory falls by orders of magnitude from 1 rank to many: log scales on both axes.
    axes.set_yscale("log")
    axes.set_xscale("log", base=2)
    axes.set_xticks(world_sizes)
    axes.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zero_ext.estimate",
        description=textwrap.fill(
            "Per-rank memory of model states (parameters, gradients, fp32 master weights and "
            "Adam moments) under ZeRO stages 0-3, for a parameter count or a transformers "
            "config. Activations are not included: leave room for them.", 79),
        epilog="examples:\n"
               "  python -m zero_ext.estimate --params 70B --world-sizes 8\n"
               "  python -m zero_ext.estimate --hf-config config.json --world-sizes 8,64 "
               "--plot mem.png\n"
               "  python -m zero_ext.estimate --params 7B --offload-optimizer\n"
               "  python -m zero_ext.estimate --hf-config config.json --config ds_config.json\n"
               + textwrap.fill("A config.json gives exact numbers (padding, parameters "
                               "kept whole at stage 3); a bare count uses the ZeRO paper's "
                               "formulas.", 79),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--params", type=_arg(parse_count), metavar="COUNT",
                       help="trainable parameters, e.g. 70B, 6.7e9, 125M")
    model.add_argument("--hf-config", metavar="PATH",
                       help="a transformers config.json; the model is built on the meta device "
                            "(nothing is downloaded or allocated)")
    parser.add_argument("--world-sizes", type=_arg(_parse_sizes), default=[1, 8, 64],
                        metavar="N,N,...", help="data-parallel ranks to tabulate (default "
                                                "1,8,64)")
    parser.add_argument("--stages", type=_arg(_parse_stages), default=None, metavar="S,S,...",
                        help="ZeRO stages to tabulate (default: every stage the offload flags "
                             "allow)")
    parser.add_argument("--config", metavar="JSON",
                        help="a zero_ext / DeepSpeed config: its precision, accumulation, "
                             "buckets, stage-3 keys and offload are used (the flags below "
                             "override them) and the table shows its stage unless --stages "
                             "says otherwise")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="training dtype of the weights (default bf16, or the config's; "
                             "Adam state is fp32)")
    parser.add_argument("--micro-batch", type=_arg(_parse_positive), default=None, metavar="B",
                        help="train_micro_batch_size_per_gpu where the config says \"auto\"")
    parser.add_argument("--gradient-accumulation-steps", "--grad-accum",
                        type=_arg(_parse_positive), default=None, metavar="K",
                        help="micro-steps per optimizer step: stage 1 then keeps whole "
                             "gradients, stages 2-3 an fp32 shard (default 1, or the config's)")
    parser.add_argument("--offload-optimizer", action="store_true",
                        help="fp32 master weights and Adam moments in host memory (stages 1-3)")
    parser.add_argument("--offload-param", action="store_true",
                        help="stage-3 parameter shards in host memory too")
    parser.add_argument("--offload-ratio", type=float, default=None, metavar="R",
                        help="offload_optimizer.ratio: only this share (0 <= R <= 1) of the "
                             "optimizer state on the host, the rest on the device (implies "
                             "--offload-optimizer; 0 keeps it all on the device)")
    parser.add_argument("--largest-unit", type=_arg(parse_count), metavar="COUNT",
                        help="with --params: elements of the largest stage-3 gather unit (e.g. "
                             "one decoder layer, or the embedding); --hf-config finds it")
    parser.add_argument("--plot", metavar="PNG", help="also draw memory by stage and world size")
    scaling_cli.add_arguments(parser, model)
    return parser


def _arg(parse):
    """An argparse type whose error message is the parser's own advice."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = parse.__name__
    return convert


def _parse_positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive whole number, e.g. 1 or 8")
    return int(text)


def _parse_sizes(text: str) -> list[int]:
    try:
        return sorted({_parse_positive(item) for item in text.split(",")})
    except ValueError:
        raise ValueError(f"{text!r} is not a list of rank counts; write positive whole numbers "
                         "comma-separated, e.g. 1,8,64") from None


def _parse_stages(text: str) -> list[int]:
    items = text.split(",")
    if not all(item.strip() in ("0", "1", "2", "3") for item in items):
        raise ValueError(f"{text!r} is not a list of ZeRO stages; use 0-3 comma-separated, "
                         "e.g. 1,2,3")
    return sorted({int(item) for item in items})


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.measure_network:
        return scaling_cli.measure(args)
    if args.largest_unit is not None and args.params is None:
        parser.error("--largest-unit goes with --params; --hf-config finds the units itself")
    if args.hf_config is not None:
        try:
            model = load_hf_model(args.hf_config)
        except ValueError as error:
            parser.error(f"--hf-config {error}")
        numel = sum(p.numel() for p in model.parameters())
        source = f"{type(model).__name__} from {args.hf_config}, {_human(numel)} parameters"
    else:
        model = args.params
        source = f"{_human(args.params)} parameters (ZeRO paper formulas)"
    base = _read_json_config(args.config, parser) if args.config is not None else {}
    base, autos = fill_autos(
        base, micro_batch=args.micro_batch, accumulation=args.gradient_accumulation_steps,
        dtype=args.dtype, hidden_size=getattr(getattr(model, "config", None), "hidden_size",
                                              None))
    base = _with_options(base, dtype=args.dtype or (None if args.config else "bf16"),
                         accumulation=args.gradient_accumulation_steps,
                         offload_optimizer=args.offload_optimizer,
                         offload_param=args.offload_param, offload_ratio=args.offload_ratio)
    try:
        # Stage 3 admits every offload setting, so this checks the rest of the config.
        probe = ZeroConfig.load(_at_stage(base, 3)).zero_optimization
    except ValueError as error:
        parser.error(f"--config {args.config}: {error}" if args.config else str(error))
    offload_optimizer, offload_param = probe.offload_optimizer.enabled, probe.offload_param.enabled
    # A config's offload_param is ignored below stage 3 and its offload_optimizer at stage 0,
    # as the engine does (with a warning); --offload-param asks about stage 3 only, and
    # --offload-optimizer about stages 1-3.
    possible = [s for s in range(4) if (s >= 1 or not args.offload_optimizer)
                and (s == 3 or not args.offload_param)]
    stages = args.stages
    if stages is None:
        stages = [base["zero_optimization"]["stage"]] if "stage" in base["zero_optimization"] \
            else possible
    if set(stages) - set(possible):
        parser.error(f"stage {','.join(map(str, sorted(set(stages) - set(possible))))}: "
                     + ("parameter offload needs stage 3" if args.offload_param else
                        "optimizer offload needs stage 1, 2 or 3")
                     + f"; ask for --stages {','.join(map(str, possible))} or turn the offload "
                       "off")
    if scaling_cli.wanted(args):
        return scaling_cli.run(args, parser, model, base, stages, source)
    try:
        estimates = [estimate_from_config(model, _at_stage(base, stage), n,
                                          largest_unit=args.largest_unit)
                     for stage in stages for n in args.world_sizes]
    except ValueError as error:  # e.g. the config's batch sizes do not divide by a world size
        parser.error(f"--config {args.config}: {error}" if args.config else str(error))
    # (a config's offload_optimizer at stage 0 offloads nothing)
    offload_optimizer = any(e.host_state_share is not None for e in estimates)
    name = {v: k for k, v in _DTYPES.items()}[estimates[0].dtype]
    options = [f"{name} weights", "fp32 Adam"]
    ratio = probe.offload_optimizer.ratio
    options += [f"optimizer offload{f' (ratio {ratio:g})' if ratio < 1 else ''}"] \
        if offload_optimizer else []
    if offload_param and 3 in stages:  # a config's offload_param is ignored below stage 3
        options.append("parameter offload" if stages == [3] else "parameter offload (stage 3)")
    accumulations = sorted({e.gradient_accumulation_steps for e in estimates})
    if accumulations != [1]:
        options.append(f"accumulation {','.join(map(str, accumulations))}")
    if args.config:
        options.append(f"config {args.config}")
    title = f"{source}; {', '.join(options)}"
    print(format_table(estimates, title))
    if autos:
        print(f'"auto" in {args.config}, as estimated:')
        print("\n".join(f"  {line}" for line in autos))
    for note in _notes(estimates, stages, offload_optimizer, ratio):
        print(textwrap.fill(note, 100, subsequent_indent="  "))
    if args.plot:
        plot(estimates, title, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _notes(estimates: Sequence[MemoryEstimate], stages: list[int],
           offload_optimizer: bool, ratio: float = 1.0) -> list[str]:
    """What the reader of the table needs to know to use its numbers."""
    notes = []
    if offload_optimizer and ratio < 1:
        shares = ", ".join(f"{e.host_state_share:.0%} at stage {e.stage} on {e.world_size} "
                           f"rank{'s' if e.world_size > 1 else ''}" for e in estimates
                           if e.host_state_share is not None)
        notes.append(f"offload ratio {ratio:g}: the optimizer state is split by whole gradient "
                     f"buckets (at least one on the host), so the host steps {shares}; a "
                     "smaller reduce_bucket_size splits finer")
    if 3 in stages:
        largest = estimates[-1].largest_unit_numel
        if largest is None:
            notes.append("stage 3 'gathered' counts only the prefetch budget: give "
                         "--largest-unit (or use --hf-config) to add the largest unit gathered "
                         "in full")
        else:
            notes.append(f"stage 3 'gathered': the largest unit ({_human(largest)} elements) "
                         "gathered in full plus what prefetch may have in flight, an upper bound")
    if any(e.stage == 1 and e.gradient_accumulation_steps == 1 for e in estimates):
        notes.append("stage 1 without accumulation reduce-scatters as buckets fill, so it holds "
                     "what stage 2 holds; with --gradient-accumulation-steps 2 or more it keeps "
                     "whole gradients between steps (the paper's 2 bytes per parameter)")
    if offload_optimizer:
        notes.append("'staging': the host copy of each gradient shard the CPU step reads, which "
                     "then carries the 16-bit weights back to the device (a separate buffer "
                     "for them when gradients accumulate in fp32)")
    notes.append("not included: activations, module buffers (e.g. rotary tables), the gradient "
                 "bucket being reduced")
    return notes


def _at_stage(config: dict, stage: int) -> dict:
    return {**config, "zero_optimization": {**config["zero_optimization"], "stage": stage}}


def _read_json_config(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        config = read_json_config(path)
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file; pass the JSON config you train with")
    except (OSError, ValueError) as error:  # a directory, unreadable, invalid JSON
        parser.error(f"--config {path}: {error}")
    if not isinstance(config, dict):
        parser.error(f"--config {path}: expected a JSON object of config keys, e.g. "
                     '{"bf16": {"enabled": true}, "zero_optimization": {"stage": 3}}')
    return config


if __name__ == "__main__":
    sys.exit(main())
