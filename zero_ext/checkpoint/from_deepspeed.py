"""engine.load_checkpoint on a DeepSpeed ZeRO checkpoint: a DeepSpeed run resumed in zero_ext.

A tag directory that DeepSpeed's `engine.save_checkpoint` wrote at ZeRO stage 1, 2 or 3 (fp32,
bf16 or fp16; optimizer offload or not) holds, for a data-parallel world of N ranks:

    mp_rank_00_model_states.pt                 stages 1-2: the 16-bit module state dict,
                                               parameter names and shapes per optimizer
                                               group, the counters, the LR scheduler's state
    zero_pp_rank_<r>_mp_rank_00_model_states.pt stage 3, one per rank: the same, with frozen
                                               parameters as per-rank fragments
    [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt  rank r's partition of each group's
                                               flat fp32 master weights and Adam moments, the
                                               Adam step and the loss scaler

Stages 1-2 cut each group's flat buffer (parameters back to back in `param_shapes` order) into
N equal partitions; stage 3 cuts each parameter into N pieces of ceil(numel / N) elements and
lays a rank's pieces back to back (DeepSpeed's zero_to_fp32.py reads them so too). Each
parameter is assembled from the partitions' memory maps, one at a time, and written with the
fragment API, so the zero_ext engine may run at any world size and stage.

Files are read with `torch.load(weights_only=True)`: the four DeepSpeed classes a checkpoint
pickles (its loss scalers, ZeroStageEnum, fragment_address) are read as inert records, and
argparse.Namespace (Megatron-DeepSpeed's arguments in the client state) as itself, so no code
from the file runs and DeepSpeed need not be installed; any other object fails the load, named. As in load_checkpoint, everything is
read and checked on every rank before any rank writes. Not read (an error says so): model- or
pipeline-parallel checkpoints, expert (MoE) files, DeepSpeed's stage 0, universal checkpoints.
As by DeepSpeed's own load_checkpoint, random-number states (it saves none) and a data
position (its data_sampler entry is curriculum learning's) are not restored; an engine with
a registered data position (an ElasticSampler) refuses the load, as for a zero_ext
checkpoint without one. The fp16 loss scaler takes the state of DeepSpeed's dynamic one
(scale, clean steps, hysteresis left), never its settings; a static one (a fixed scale, or
a bf16 or fp32 run's 1.0) leaves it as this config makes it.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import zipfile
from dataclasses import dataclass

import torch

from zero_ext import comm
from zero_ext.checkpoint.engine_state import _bucket_shapes, set_value
from zero_ext.checkpoint.format import CheckpointError
from zero_ext.zero import fragments

__all__ = ["is_deepspeed_checkpoint", "load_deepspeed_checkpoint"]

CALLER = "zero_ext.load_checkpoint"
_MODEL_FILE = "mp_rank_00_model_states.pt"
_STAGE3_MODEL = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
# DeepSpeed's own entries of a model-states file; the others are the script's client_state.
_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
            "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler",
            "random_ltd", "sparse_tensor_module_names", "skipped_steps", "global_steps",
            "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
            "checkpoint_parallel_dimensions"}


class _Record:
    """An object of a DeepSpeed class, kept as its pickled fields: nothing of it runs."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


_DEEPSPEED_CLASSES = [
    (type(name.rsplit(".", 1)[1], (_Record,), {}), name)
    for name in ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                 "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                 "deepspeed.runtime.zero.config.ZeroStageEnum",
                 "deepspeed.utils.tensor_fragment.fragment_address")] + [
    argparse.Namespace]  # Megatron-DeepSpeed keeps its arguments in the client state: data


def _check_crc(path: str) -> None:
    """DeepSpeed writes no checksums, but torch.save's zip records carry a CRC-32 each, which a
    memory-mapped torch.load does not check: checked here, so a corrupted file is refused
    before anything is written instead of loading as wrong values."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return  # not a zip archive (or truncated): torch.load below says so
    if bad is not None:
        raise CheckpointError(f"{CALLER}: {path} is corrupt: its record {bad} fails its CRC-32 "
                              f"check. Restore the file or load another checkpoint")


def _load(path: str, index: int = 0, check: bool = True) -> dict:
    """One DeepSpeed file, as plain data. Its CRC-32s (a whole read of the file) are checked
    by one rank of the world (`index` modulo the world size; the load exchanges every rank's
    problems before any rank writes), not by every rank, and only where `check`."""
    if check and index % comm.world_size() == comm.rank():
        _check_crc(path)
    try:
        with torch.serialization.safe_globals(_DEEPSPEED_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - named with the file below
        raise CheckpointError(
            f"{CALLER}: {path} could not be read as plain data ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). zero_ext reads DeepSpeed "
            f"ZeRO checkpoints without running code from them; one holding other objects "
            f"(another DeepSpeed version or feature) is not read. DeepSpeed's zero_to_fp32.py "
            f"writes its fp32 weights as a state dict: load that into the model before "
            f"zero_ext.initialize") from None


def is_deepspeed_checkpoint(path: str) -> bool:
    """Whether the tag directory `path` is one DeepSpeed's save_checkpoint wrote."""
    return os.path.isfile(os.path.join(path, _MODEL_FILE)) or os.path.isfile(
        os.path.join(path, "zero_pp_rank_0_mp_rank_00_model_states.pt"))


def _ranked(path: str, pattern: re.Pattern) -> list[str]:
    found = {}
    for name in os.listdir(path):
        match = pattern.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(path, name)
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{CALLER}: {path} has DeepSpeed files for ranks {sorted(found)}; "
                              f"some are missing (a save that did not finish on every rank?)")
    return [found[r] for r in range(len(found))]


@dataclass
class _Checkpoint:
    path: str
    stage: int
    world_size: int
    model: dict                  # rank 0's model-states file
    optim: list[dict]            # each rank's optimizer_state_dict
    frozen_fragments: list       # stage 3: each rank's frozen_param_fragments
    shapes: list[dict]           # per flat (a group; a sub-group at stage 3): name -> shape

    def _base(self, rank: int = 0) -> dict:
        """Rank `rank`'s torch optimizer state dict (its moments' partitions, the groups)."""
        return self.optim[rank]["optimizer_state_dict" if self.stage == 3 else
                                "base_optimizer_state"]

    def flat(self, rank: int, kind: str) -> list[torch.Tensor]:
        """Rank `rank`'s partition of each flat: "master", "exp_avg" or "exp_avg_sq"."""
        state = self.optim[rank]
        if kind == "master":
            return list(state["fp32_flat_groups" if self.stage == 3
                              else "single_partition_of_fp32_groups"])
        return [self._base(rank)["state"][i][kind] for i in range(len(self.shapes))]

    def param_groups(self) -> list[dict]:
        return self._base()["param_groups"]

    def flats_of_groups(self) -> list[list[int]]:
        """The flats of each optimizer param group: stage 3 splits a group into sub-groups of
        `sub_group_size` elements, each its own flat and optimizer state entry."""
        if self.stage == 3:
            return [list(group["params"]) for group in self.param_groups()]
        return [[g] for g in range(len(self.param_groups()))]

    def steps(self) -> list[float]:
        """Each param group's Adam step count (in its state, or, as older FusedAdam saves it,
        in the group)."""
        state, steps = self._base()["state"], []
        for group, flats in zip(self.param_groups(), self.flats_of_groups()):
            entry = state.get(flats[0], {}) if flats else {}
            step = entry.get("step", group.get("step"))
            if step is None:
                raise CheckpointError(f"{CALLER}: {self.path} has no Adam step count for a "
                                      f"param group")
            steps.append(float(step))
        return steps


def _read(path: str) -> _Checkpoint:
    if os.path.isfile(os.path.join(path, _MODEL_FILE)):
        model_files = [os.path.join(path, _MODEL_FILE)]
    else:
        model_files = _ranked(path, _STAGE3_MODEL)
    if glob.glob(os.path.join(path, "*expp_rank_*")) or glob.glob(
            os.path.join(path, "mp_rank_01_*")):
        raise CheckpointError(f"{CALLER}: {path} is a DeepSpeed checkpoint with expert (MoE) or "
                              f"model-parallel files; zero_ext reads data-parallel ZeRO "
                              f"checkpoints only")
    optim_files = _ranked(path, _OPTIM)
    if not optim_files:
        raise CheckpointError(f"{CALLER}: {path} is a DeepSpeed checkpoint without ZeRO "
                              f"optimizer files (DeepSpeed's stage 0?); zero_ext resumes stages "
                              f"1-3. Its module state dict ({_MODEL_FILE}, key 'module') can "
                              f"be loaded into the model before zero_ext.initialize")
    model = _load(model_files[0])
    if model.get("mp_world_size", 1) != 1:
        raise CheckpointError(f"{CALLER}: {path} was saved with model parallelism "
                              f"(mp_world_size {model['mp_world_size']}); not supported")
    optim = [_load(f, i)["optimizer_state_dict"] for i, f in enumerate(optim_files)]
    stage_record = optim[0].get("zero_stage")
    stage = stage_record.args[0] if isinstance(stage_record, _Record) else stage_record
    if stage is None:
        raise CheckpointError(f"{CALLER}: {optim_files[0]} names no ZeRO stage: DeepSpeed's "
                              f"BF16_Optimizer wrote it (bf16 at stage 0-1 with "
                              f"grad_accum_dtype fp32), a layout zero_ext does not read")
    if stage not in (1, 2, 3):
        raise CheckpointError(f"{CALLER}: {optim_files[0]} has ZeRO stage {stage!r}; zero_ext "
                              f"resumes DeepSpeed stages 1-3")
    counts = optim[0].get("partition_count")
    world_size = max(counts) if isinstance(counts, list) else counts
    if world_size != len(optim_files):
        raise CheckpointError(f"{CALLER}: {path} holds {len(optim_files)} optimizer files for a "
                              f"world of {world_size} ranks; the save did not finish on every "
                              f"rank")
    paddings = [p for rank in optim for group in rank.get("param_alignment_paddings", [])
                for p in group]
    if any(paddings):
        raise CheckpointError(f"{CALLER}: {path} pads parameters inside its groups "
                              f"(param_alignment_paddings), a layout zero_ext does not read")
    fragments_ = [_load(f, i, check=i > 0).get("frozen_param_fragments") or {}
                  for i, f in enumerate(model_files)] if stage == 3 else []
    ckpt = _Checkpoint(path, stage, world_size, model, optim, fragments_,
                       [dict(group) for group in model["param_shapes"]])
    flats = sorted(i for group in ckpt.flats_of_groups() for i in group)
    if flats != list(range(len(ckpt.shapes))):
        raise CheckpointError(f"{CALLER}: {path}: its param groups hold flats {flats}, its "
                              f"parameter shapes {len(ckpt.shapes)} (an elastic or universal "
                              f"checkpoint?); not read")
    return ckpt


class _Assembler:
    """Whole parameters out of the ranks' flat partitions (memory-mapped), one at a time."""

    def __init__(self, ckpt: _Checkpoint):
        self.ckpt = ckpt
        self.where = {}  # name -> (flat, offset in it, shape)
        for flat, shapes in enumerate(ckpt.shapes):
            offset = 0  # stages 1-2: in the whole flat; stage 3: in each rank's partition
            for name, shape in shapes.items():
                numel = math.prod(shape)
                self.where[name] = (flat, offset, torch.Size(shape))
                offset += math.ceil(numel / ckpt.world_size) if ckpt.stage == 3 else numel
        self._flats = {}

    def _flat(self, rank: int, kind: str) -> list[torch.Tensor]:
        key = (rank, kind)
        if key not in self._flats:
            self._flats[key] = self.ckpt.flat(rank, kind)
        return self._flats[key]

    def check(self) -> None:
        """The flat partitions hold what the shapes say, in every rank's file and kind."""
        ckpt, n = self.ckpt, self.ckpt.world_size
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            sizes = [[t.numel() for t in self._flat(r, kind)] for r in range(n)]
            if ckpt.stage == 3:
                need = [sum(math.ceil(math.prod(s) / n) for s in g.values())
                        for g in ckpt.shapes]
                if any(s != need for s in sizes):
                    raise CheckpointError(f"{CALLER}: {ckpt.path}: stage-3 {kind} partitions "
                                          f"hold {sizes} elements per rank and flat, the "
                                          f"parameters need {need}")
                continue
            for group, shapes in enumerate(ckpt.shapes):
                # each rank's partition of the group padded to a multiple of 2 x N; the
                # masters are saved with the padding cut from the last ranks, the moments not
                need = sum(math.prod(s) for s in shapes.values())
                lengths = [sizes[r][group] for r in range(n)]
                if not need <= sum(lengths) < need + 2 * n or max(lengths) != lengths[0]:
                    raise CheckpointError(f"{CALLER}: {ckpt.path}: group {group}'s {kind} "
                                          f"partitions hold {lengths} elements for {need}")

    def full(self, name: str, kind: str) -> torch.Tensor:
        group, offset, shape = self.where[name]
        numel, n = shape.numel(), self.ckpt.world_size
        if self.ckpt.stage == 3:
            piece = math.ceil(numel / n)
            pieces = [self._flat(rank, kind)[group][offset:offset + piece] for rank in range(n)]
            return torch.cat(pieces)[:numel].float().view(shape).clone()
        size = self._flat(0, kind)[group].numel()
        pieces = []
        for rank in range(offset // size, (offset + numel - 1) // size + 1):
            part = self._flat(rank, kind)[group]
            lo, hi = max(offset, rank * size), min(offset + numel, (rank + 1) * size)
            pieces.append(part[lo - rank * size:hi - rank * size])
        return torch.cat(pieces).float().view(shape).clone()


def _frozen_values(ckpt: _Checkpoint) -> dict[str, torch.Tensor]:
    """Frozen parameters as saved: stage 3 keeps them as per-rank fragments; stages 1-2 in the
    module state dict, named there only (DeepSpeed records their shapes from stage 2 on)."""
    if ckpt.stage == 3:
        values = {}
        for name, shape in (ckpt.model.get("frozen_param_shapes") or {}).items():
            shape = torch.Size(shape)
            joined = torch.cat([f[name].reshape(-1) for f in ckpt.frozen_fragments])
            values[name] = joined[:shape.numel()].view(shape)
        return values
    trained = {name for shapes in ckpt.shapes for name in shapes}
    buffers = set(ckpt.model.get("buffer_names") or [])
    return {name: value for name, value in ckpt.model["module"].items()
            if name not in trained and name not in buffers}


def _scaler_state(record) -> dict | None:
    """The state of DeepSpeed's dynamic loss scaler for ours; None for its static LossScaler,
    which holds a setting only: a fixed fp16 scale, or the 1.0 of a bf16 or fp32 run (whose
    scale would have made this config's fp16 scaler start at 1)."""
    fields = getattr(record, "__dict__", {})
    if "cur_scale" not in fields or not fields.get("dynamic", False):
        return None
    # DeepSpeed's next update reads stable_interval = cur_iter - last_overflow_iter - 1
    return {"scale": float(fields["cur_scale"]),
            "clean_steps": int(fields["cur_iter"]) - int(fields["last_overflow_iter"]) - 1,
            "hysteresis_left": int(fields["cur_hysteresis"])}


@dataclass
class _Plan:
    """Everything the load writes, read and checked before the first write."""

    ckpt: _Checkpoint
    assembler: _Assembler
    trainable: list              # (name, parameter)
    frozen: list                 # (parameter, saved value)
    buffers: list                # (buffer, saved value)
    steps: list[float] | None    # per param group
    hyperparameters: list[dict] | None
    scheduler: dict | None
    scaler: dict | None
    client_state: dict


def _fits(what: str, name: str, saved: torch.Tensor, mine: torch.Tensor, problems: list):
    if tuple(saved.shape) != tuple(mine.shape):
        problems.append(f"{what} {name}: shape {tuple(saved.shape)} in the checkpoint, "
                        f"{tuple(mine.shape)} here")


def _plan(engine, path: str, load_optimizer_states: bool, load_lr_scheduler_states: bool,
          load_module_only: bool) -> _Plan:
    ckpt = _read(path)
    assembler = _Assembler(ckpt)
    assembler.check()
    problems = []
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    mine = {n for n, _ in trainable}
    if mine != set(assembler.where):
        problems.append(f"trainable parameters differ: only in this model "
                        f"{sorted(mine - set(assembler.where))[:8]}, only in the checkpoint "
                        f"{sorted(set(assembler.where) - mine)[:8]}")
    for name, param in trainable:
        shape = param.shape if engine.replicated_optimizer is not None else \
            fragments.fragment_of(engine, param).slot.shape
        if name in assembler.where and assembler.where[name][2] != shape:
            problems.append(f"{name}: shape {tuple(assembler.where[name][2])} in the "
                            f"checkpoint, {tuple(shape)} here")
    saved_frozen = _frozen_values(ckpt)
    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    if {n for n, _ in frozen} != set(saved_frozen):
        problems.append(f"frozen parameters differ: here {sorted(n for n, _ in frozen)[:8]}, "
                        f"in the checkpoint {sorted(saved_frozen)[:8]}")
    shapes = _bucket_shapes(engine)  # stage 3 partitions frozen parameters too
    for name, param in frozen:
        if name in saved_frozen and tuple(saved_frozen[name].shape) != \
                shapes.get(id(param), tuple(param.shape)):
            problems.append(f"frozen parameter {name}: shape {tuple(saved_frozen[name].shape)} "
                            f"in the checkpoint, {shapes.get(id(param), tuple(param.shape))} "
                            "here")
    frozen = [(p, saved_frozen[n]) for n, p in frozen if n in saved_frozen]
    buffers, mine_buffers = [], dict(engine.module.named_buffers())
    for name in ckpt.model.get("buffer_names") or []:
        if name in mine_buffers and name in ckpt.model["module"]:
            _fits("buffer", name, ckpt.model["module"][name], mine_buffers[name], problems)
            buffers.append((mine_buffers[name], ckpt.model["module"][name]))
    steps = hyperparameters = scheduler = scaler = None
    if load_optimizer_states:
        user = engine.replicated_optimizer or getattr(engine.optimizer, "optimizer", None)
        if user is not None and (not isinstance(user, (torch.optim.Adam, torch.optim.AdamW))
                                 or engine.replicated_optimizer is None):
            problems.append(f"the checkpoint holds Adam's moments for zero_ext's AdamW, and "
                            f"this engine runs the {type(user).__name__} given to initialize "
                            f"(as it is); pass load_optimizer_states=False")
        groups = engine.optimizer.param_groups
        if len(groups) != len(ckpt.param_groups()):
            problems.append(f"{len(ckpt.param_groups())} optimizer param groups in the "
                            f"checkpoint, {len(groups)} here")
        steps = ckpt.steps()
        hyperparameters = [{k: saved[k] for k in ("lr", "betas", "eps", "weight_decay")
                            if k in saved} for saved in ckpt.param_groups()]
        scaler = _scaler_state(ckpt.optim[0].get("loss_scaler"))
    if load_lr_scheduler_states and engine.lr_scheduler is not None:
        scheduler = ckpt.model.get("lr_scheduler")
        if not isinstance(scheduler, dict):
            problems.append("no LR scheduler state in the checkpoint; pass "
                            "load_lr_scheduler_states=False")
    if not load_module_only:
        # DeepSpeed saves no state of ours: a registered data position would otherwise go on
        # from this engine's step count silently (zero_ext's own checkpoints refuse so too).
        missing = engine.checkpoint_states.problems(None, path)
        if missing:
            problems.append("; ".join(missing) + ". A DeepSpeed checkpoint holds no such "
                            "state: build the ElasticSampler (or register the object) after "
                            "load_checkpoint, where it starts from the beginning, as "
                            "DeepSpeed's own loader does after a resume")
    if problems:
        raise CheckpointError(f"{CALLER}: the DeepSpeed checkpoint {path} does not fit this "
                              f"model: " + "; ".join(problems))
    # DeepSpeed's load_module_only returns all of the file but the module
    client_state = {k: v for k, v in ckpt.model.items()
                    if k != "module" and (load_module_only or k not in _DS_KEYS)}
    return _Plan(ckpt, assembler, trainable, frozen, buffers, steps, hyperparameters,
                 scheduler, scaler, client_state)


def load_deepspeed_checkpoint(engine, path: str, load_optimizer_states: bool,
                              load_lr_scheduler_states: bool, load_module_only: bool):
    """Collective. Resumes the DeepSpeed ZeRO checkpoint in the tag directory `path`; returns
    (path, client_state). Everything is read and checked on every rank before any rank
    writes."""
    from zero_ext.checkpoint.engine_state import _attempt, _raise_if_any
    from zero_ext.checkpoint.loading import restore_counters, restore_scheduler

    if load_module_only:
        load_optimizer_states = load_lr_scheduler_states = False
    plan, problem = _attempt(_plan, engine, path, load_optimizer_states,
                             load_lr_scheduler_states, load_module_only)
    _raise_if_any(comm.all_gather_object(problem), "load_checkpoint")
    for name, param in plan.trainable:
        fragments.write(engine, param, plan.assembler.full(name, "master"), "fp32")
        if load_optimizer_states:
            for kind in ("exp_avg", "exp_avg_sq"):
                fragments.write(engine, param, plan.assembler.full(name, kind), kind)
    for param, value in plan.frozen:
        set_value(engine, param, value)
    for buffer, value in plan.buffers:
        buffer.copy_(value)
    if load_optimizer_states:
        for group, saved in zip(engine.optimizer.param_groups, plan.hyperparameters):
            group.update({k: v for k, v in saved.items() if k in group})
        if engine.replicated_optimizer is not None:
            for g, group in enumerate(engine.replicated_optimizer.param_groups):
                for param in group["params"]:
                    engine.replicated_optimizer.state[param]["step"] = \
                        torch.tensor(plan.steps[g])
        else:
            for shard in engine.optimizer.shards:
                shard.step.fill_(plan.steps[shard.layout.group])
        if engine.loss_scaler is not None and plan.scaler is not None:
            engine.loss_scaler.load_state_dict(plan.scaler)
    if getattr(engine, "compression", None) is not None:
        engine.compression.reset()  # DeepSpeed keeps no residuals: those of this engine's past
    if plan.scheduler is not None:
        restore_scheduler(engine, plan.scheduler)
    if load_module_only:
        return path, plan.client_state
    samples = plan.ckpt.model.get("global_samples")
    restore_counters(engine, int(plan.ckpt.model["global_steps"]),
                     int(plan.ckpt.model.get("skipped_steps", 0)),
                     None if samples is None else int(samples))
    if engine.rank == 0:
        print(f"[zero_ext] resumed DeepSpeed's ZeRO-{plan.ckpt.stage} checkpoint {path} "
              f"(saved by {plan.ckpt.world_size} ranks, DeepSpeed "
              f"{plan.ckpt.model.get('ds_version')}); its data sampler and random-number "
              f"states are not restored", flush=True)
    return path, plan.client_state
