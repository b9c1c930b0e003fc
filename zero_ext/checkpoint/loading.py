"""engine.load_checkpoint: reads what save_checkpoint (engine_state.py) wrote, at any world size
and stage, in two phases.

Called by ZeroEngine.load_checkpoint (collective: every rank calls it). First every rank checks
everything it will use, changing nothing: the directory and tag, the manifest and the
checksums of every file it reads, that each parameter, buffer and optimizer group fits, that
engine_state.pt is plain data, that the optimizer's update rule is the same. The verdicts are
exchanged; only if every rank may load does any rank start writing, so a load that fails
leaves the engine exactly as it was, on every rank. Loading maps each parameter's elements from
the saved bucket layout onto this engine's, so the world size and the stage may differ. A tag
directory DeepSpeed wrote (ZeRO stages 1-3) is read by from_deepspeed.py instead.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from zero_ext import comm
from zero_ext.checkpoint import compression_state, data_only, from_deepspeed
from zero_ext.checkpoint.engine_state import (
    CLIENT_KIND,
    _attempt,
    _bucket_shapes,
    _files_of,
    _fill_plan,
    _frozen_keys,
    _names,
    _raise_if_any,
    _restore_rng,
)
from zero_ext.checkpoint.files import dtype_problem
from zero_ext.checkpoint.format import (
    ENGINE_STATE,
    KINDS,
    LATEST,
    MODEL_STATES,
    CheckpointError,
    CheckpointIndex,
    find_checkpoint,
    partial_dirs,
    resolve_tag,
    shard_file_name,
)
from zero_ext.zero.client_optimizer import python_scalar, setting_differs

__all__ = ["load_checkpoint"]

CALLER = "zero_ext.load_checkpoint"
# Scheduler state entries that count progress rather than configure the schedule.
_SCHEDULER_COUNTERS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step",
                       "_is_initial", "verbose", "last_batch_iteration"}


@dataclass
class _Plan:
    """Everything a load writes, read and checked before the first write."""

    index: CheckpointIndex
    fill: list                        # (target, first, name, a, b, kind), from _fill_plan
    model_states: list                # writers of buffers and frozen parameters
    extra: dict                       # engine_state.pt
    own_rng: str | None               # this rank's shard file, when its RNG states apply
    differences: list[str]            # optimizer/scheduler settings the checkpoint replaces
    # A client optimizer's state (zero/client_optimizer.py): per-element tensors the fill
    # writes, then installed with the saved scalars.
    client_state: tuple[dict, list] | None = None
    # How compressed communication's state is restored (with the optimizer's state only).
    compression: compression_state.Restore | None = None


def _announce_missing(load_dir: str) -> None:
    latest = os.path.join(load_dir, LATEST)
    where = f"{load_dir} does not exist" if not os.path.exists(load_dir) else \
        f"{latest} does not exist"
    partial = partial_dirs(load_dir)
    hint = (f"; the only saves found there never finished: "
            f"{[os.path.basename(p) for p in partial]}" if partial else "")
    warnings.warn(f"{CALLER}: {where}, so there is no checkpoint to load{hint}. Returning "
                  f"(None, None) with the engine unchanged, as DeepSpeed does; pass tag= to load "
                  f"a named checkpoint", stacklevel=4)


def _model_states_plan(engine, index: CheckpointIndex, strict: bool = True) -> list:
    """Buffers and frozen parameters to copy from rank 0's file, checked against the model
    (names, shapes), frozen parameters that trained when saved from the checkpoint's fp32
    master weights, and stage 3's partitioned frozen ones from the shards' frozen values; the
    frozen parameters a save left out (exclude_frozen_parameters) keep the model's values, and
    so, when not `strict`, does anything else the checkpoint lacks (what it has beyond the
    model is then passed over). Returns one writer per value (called by _apply); a parameter
    this engine partitions reads only the elements of its shard."""
    reader = index.reader(MODEL_STATES)
    current = engine.module.state_dict(keep_vars=True)
    entries = index.metadata["state_dict"]
    wanted = {key: where for key, kind, where in entries if kind == "state"}
    # Read from the shards: (kind of tensor there, parameter name there).
    sharded = {key: ("master" if kind == "param" else "frozen", where)
               for key, kind, where in entries if kind in ("param", "frozen")}
    trainable = {id(p) for p in engine._params}
    mine = {key for key, value in current.items() if id(value) not in trainable}
    excluded = set(index.metadata.get("excluded_frozen", [])) & _frozen_keys(engine)
    missing = sorted(mine - set(wanted) - set(sharded) - excluded)
    # (A key the model has that trains now was frozen when saved: _unfrozen_since reads it.)
    extra = sorted(set(wanted) - set(current))
    if not strict:
        excluded |= set(missing)
    elif missing or extra:
        raise CheckpointError(
            f"{CALLER}: {index.path} does not fit this model's buffers and frozen parameters: "
            f"missing from the checkpoint {missing[:8]}, not in the model {extra[:8]} "
            f"(load_module_strict=False keeps the model's values of what is missing and "
            f"passes over the rest)")
    shapes = _bucket_shapes(engine)  # a released stage-3 parameter has no shape of its own
    partitioned = engine.partitioned
    plan = []
    for key in sorted(mine - excluded):
        value = current[key]
        shape = shapes.get(id(value), tuple(value.shape))
        if key in wanted:
            source = wanted[key]
            if source not in reader:
                raise CheckpointError(f"{CALLER}: {index.path}: {MODEL_STATES} has no "
                                      f"{source!r}")
            saved_shape = tuple(reader.shape(source))
            problem = dtype_problem(reader.dtype(source), value.dtype)
            if problem is not None:
                raise CheckpointError(f"{CALLER}: {key} cannot be loaded from {index.path}: "
                                      f"{problem}. Give the model's {key} the checkpoint's dtype")
            read_range = (lambda first, out, s=source: reader.read_into(s, first, out))
            read_whole = (lambda s=source: reader.read(s))
        else:  # from the shards: trained when saved (master weights), or a frozen shard
            kind, source = sharded[key]
            saved_shape = tuple(index.params[source].shape)
            index.verify_files(sorted({file for file, _, _, _ in index.pieces(
                source, 0, index.numel(source))}))
            read_range = (lambda first, out, k=kind, s=source: index.read_into(k, s, first, out))
            read_whole = (lambda k=kind, s=source, v=value, shape=shape:
                          index.read(k, s, dtype=v.dtype).view(shape))
        if saved_shape != shape:
            raise CheckpointError(f"{CALLER}: {key} is {saved_shape} in {index.path} and "
                                  f"{shape} in the model")
        if id(value) in shapes and partitioned is not None:
            plan.append(lambda v=value, r=read_range: partitioned.write_value(v, r))
        else:
            plan.append(lambda v=value, r=read_whole: v.data.copy_(r()))
    return plan


def _kept_whole(index: CheckpointIndex, names: list[str]) -> dict[str, tuple[int, ...]]:
    """name -> shape of the parameters that train here and were frozen and kept whole when
    saved (in model_states: any frozen parameter at stages 0-2, one stage 3 did not
    partition)."""
    saved = {key for key, kind, _ in index.metadata["state_dict"] if kind == "state"}
    whole = [name for name in names if name in saved and name not in index.params]
    reader = index.reader(MODEL_STATES) if whole else None
    return {name: tuple(reader.shape(name)) for name in whole}


def _unfrozen_since(index: CheckpointIndex, fill: list, whole: dict) -> list:
    """A parameter held frozen when saved and that trains now: its master weights are the
    saved (model-dtype) values, from stage 3's frozen shards ("frozen") or from model_states
    ("state": kept whole), and its Adam moments start at zero (there were none)."""
    frozen = {name for layout in index.frozen_layouts for name, _, _ in layout["slots"]}

    def source(name: str, kind: str) -> str:
        if name not in frozen and name not in whole:
            return kind
        if kind != "master":
            return "zero"
        return "frozen" if name in frozen else "state"

    return [(target, at, name, a, b, source(name, kind))
            for target, at, name, a, b, kind in fill]


def _update_rule(group: dict) -> str:
    return "AdamW (decoupled weight decay)" if group.get("decoupled_weight_decay") else \
        "Adam (L2 weight decay)"


def _optimizer_differences(engine, meta: dict, extra: dict, path: str) -> list[str]:
    """Checks that the checkpoint's optimizer state fits this engine's optimizer (refusing a
    change of update rule, whose moments mean something else), and lists the hyperparameters
    in which the two differ (the checkpoint's win, as in torch's Optimizer.load_state_dict)."""
    groups = extra["param_groups"]
    mine = engine.optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(mine):
        raise CheckpointError(
            f"{CALLER}: the checkpoint has {len(groups)} optimizer parameter groups, this "
            f"engine {len(mine)}; build the same groups, or pass load_optimizer_states=False")
    saved_class = meta.get("optimizer_class")
    if engine.replicated_optimizer is not None:
        if saved_class is not None and saved_class != type(engine.optimizer).__name__:
            raise CheckpointError(
                f"{CALLER}: {path} holds the state of a {saved_class}, this engine runs a "
                f"{type(engine.optimizer).__name__}; pass load_optimizer_states=False to keep "
                f"the weights and start this optimizer fresh")
        saved = extra["replicated_optimizer"]
        sizes = [len(g.get("params", [])) for g in saved.get("param_groups", [])] \
            if isinstance(saved, dict) else None
        if sizes != [len(g["params"]) for g in mine]:
            raise CheckpointError(
                f"{CALLER}: {path}'s optimizer state covers parameter groups of sizes {sizes}, "
                f"this optimizer's are {[len(g['params']) for g in mine]}; pass "
                f"load_optimizer_states=False")
    else:
        for index, (group, saved) in enumerate(zip(mine, groups)):
            if bool(group.get("decoupled_weight_decay")) != \
                    bool(saved.get("decoupled_weight_decay")):
                raise CheckpointError(
                    f"{CALLER}: {path} was saved by {_update_rule(saved)} and this engine runs "
                    f"{_update_rule(group)} (parameter group {index}): the moments and weights "
                    f"were made by the other update rule. Configure the checkpoint's optimizer "
                    f"to resume it, or pass load_optimizer_states=False to keep its weights and "
                    f"start this optimizer fresh")
    differences = []
    for index, (group, saved) in enumerate(zip(mine, groups)):
        for key in sorted(set(group) | set(saved)):
            if key in ("params", "initial_lr") or (key == "lr" and (
                    engine.lr_scheduler is not None or "initial_lr" in saved)):
                # A schedule's lr follows its own state, compared below; one stepped outside
                # the engine (Lightning's, accelerate's; it left initial_lr in the group)
                # restores its own with its state.
                continue
            if saved.get("variance_frozen") and key in ("betas", "bias_correction",
                                                        "variance_frozen", "compressed_beta1"):
                continue  # top-k's freeze_variance set them (ZeroOptimizer.freeze_variance)
            if key in saved and key in group and setting_differs(saved[key], group[key]):
                differences.append(f"group {index} {key}: {saved[key]!r} in the checkpoint, "
                                   f"{group[key]!r} configured")
    return differences


def _scheduler_differences(engine, saved: dict) -> list[str]:
    if not isinstance(saved, dict):
        return []
    mine = engine.lr_scheduler.state_dict()
    return [f"scheduler {key}: {saved[key]!r} in the checkpoint, {mine[key]!r} configured"
            for key in sorted(set(saved) & set(mine) - _SCHEDULER_COUNTERS)
            if setting_differs(saved[key], mine[key])]


def read_engine_state(index: CheckpointIndex, caller: str = CALLER) -> dict:
    """engine_state.pt of the checkpoint, read as data (never unpickled as code)."""
    with open(os.path.join(index.path, ENGINE_STATE), "rb") as f:
        raw = f.read()
    try:
        extra = data_only.loads(raw, os.path.join(index.path, ENGINE_STATE))
    except ValueError as error:
        raise CheckpointError(f"{caller}: {error}") from None
    keys = {"param_groups", "lr_scheduler", "replicated_optimizer", "client_state"}
    if not isinstance(extra, dict) or not keys <= set(extra):
        raise CheckpointError(f"{caller}: {index.path}/{ENGINE_STATE} is not a zero_ext engine "
                              f"state (expected a dict with {sorted(keys)})")
    return extra


def _check_client_records(saved: dict, groups: int, path: str) -> None:
    """A client optimizer's kinds and scalars in metadata.json as this version writes them
    (per group; each scalar [value, dtype, on the device, ndim]), before anything is read."""
    kinds, scalars = saved.get("kinds"), saved.get("scalars")
    if not (isinstance(kinds, list) and isinstance(scalars, list)
            and len(kinds) == len(scalars) == groups
            and all(isinstance(k, dict) for k in kinds)
            and all(isinstance(g, dict) and all(isinstance(r, list) and len(r) == 4
                                                for r in g.values()) for g in scalars)):
        raise CheckpointError(
            f"{CALLER}: {path}'s client optimizer records are not in this version's form ("
            f"{groups} parameter groups of kinds and scalars); pass "
            f"load_optimizer_states=False to keep the weights")


def _bound_state(engine, index: CheckpointIndex, meta: dict, names: list[str],
                 path: str, verify: list[str]) -> dict[int, dict]:
    """A client optimizer's state saved bound to each rank's shards (engine_state.
    _bound_entries), read from this rank's file (verified with the files in `verify` first):
    only at the world size and buckets it was saved with."""
    name = meta["client_optimizer"]["class"]
    if index.world_size != engine.world_size or \
            meta["layouts"] != compression_state.layouts_metadata(engine, names):
        at = ("the same buckets (stage, reduce_bucket_size, stage-3 units and parameter "
              "groups)" if index.world_size == engine.world_size else
              f"{index.world_size} ranks, with the same buckets")
        raise CheckpointError(
            f"{CALLER}: {path} holds {name} state that depends on how the parameters were "
            f"sharded when saved (per-block or per-shard values), so it resumes at {at} "
            f"only; resume it so, or pass load_optimizer_states=False to keep the weights and "
            f"start the optimizer fresh")
    own = shard_file_name(engine.rank, engine.world_size)
    index.verify_files(sorted({*verify, own}))
    reader = index.reader(own)
    records = json.loads(reader.metadata.get("client_bound", "{}"))
    state: dict[int, dict] = {}
    for layout, keys in records.items():
        master = engine.optimizer.shards[int(layout)].master
        for key, (kind, on_device) in keys.items():
            value = reader.read(f"{layout}.bound.{key}")
            if kind != "tensor":
                value = python_scalar(kind, value)
            elif on_device:
                value = value.to(master.device)
            state.setdefault(int(layout), {})[key] = value
    return state


def _trainable_mismatch(engine, index: CheckpointIndex, names: list[str], unexpected: list[str],
                        held: dict, strict: bool) -> str | None:
    """What differs between the checkpoint's trainable parameters and the model's, both sides
    named, with a way out that works, or None: `unexpected` (the checkpoint's, not in the
    model; passed over when not `strict`), and this engine's parameters the checkpoint does not
    hold (`held`: name -> shape of what it does): each resumes from its saved state, so one
    missing is an error either way."""
    trained = {id(p): name for p, name in zip(engine._params, names)}
    current = engine.module.state_dict(keep_vars=True)
    mine = {names[s.param_index] for layout in engine.layouts for s in layout.slots}
    absent = sorted(mine - set(held))
    if not absent and not (unexpected and strict):
        return None
    # Another name of a parameter in one model and a parameter of its own in the other.
    tied_here = {key: trained[id(current[key])] for key in unexpected if key in current}
    saved_as = {key: where for key, kind, where in index.metadata["state_dict"]
                if kind == "param" and key != where}
    untied = {key: saved_as[key] for key in absent if key in saved_as}
    sides = [f"{what} {keys[:8]}" for what, keys in
             (("in the checkpoint, not in the model:", unexpected),
              ("in the model, not in the checkpoint:", absent)) if keys]
    notes = [f"{key} is tied to {owner} in this model but was trained on its own when saved"
             for key, owner in list(tied_here.items())[:4]]
    notes += [f"{key} trains on its own in this model but was tied to {owner} when saved (the "
              f"checkpoint holds it once, as {owner})" for key, owner in list(untied.items())[:4]]
    what = f"{CALLER}: {index.path} does not fit this model's trainable parameters: " + \
        "; ".join(sides + notes)
    if not absent:
        return f"{what} (load_module_strict=False passes over them)"
    ways = []
    if untied:
        ways.append("tie " + ", ".join(f"{key} to {owner}" for key, owner in
                                       list(untied.items())[:4]) + " again, as when saved")
    renamed = sorted(set(absent) - set(untied))
    if renamed and unexpected:
        ways.append("give renamed parameters their saved names again")
    elif renamed:
        ways.append(f"build the model without {renamed[:4]}, as it was saved")
    fix = " or ".join(ways)
    if untied or unexpected:
        rename = ", rename its keys to this model's names" if unexpected else ""
        fix += (f"; or, to start this model from the checkpoint's weights with a fresh "
                f"optimizer, write them out with zero_ext.consolidate({index.path!r}, file) "
                f"(a tied weight under each of its names){rename} and load them with "
                f"engine.load_weights(file)")
    return (f"{what}. Every trainable parameter resumes from its saved state, found by name, so "
            f"load_module_strict=False cannot fill the model's: {fix}")


def _plan_load(engine, path: str, load_optimizer_states: bool,
               load_lr_scheduler_states: bool, load_module_only: bool,
               strict: bool = True) -> _Plan:
    """Every check of the load, without changing anything."""
    names = _names(engine)
    index = CheckpointIndex(path)
    meta = index.metadata
    if load_optimizer_states and engine.replicated_optimizer is None and \
            meta["optimizer"] == "replicated":
        raise CheckpointError(
            f"{path} holds a stage-0 torch optimizer's state (whole parameters), not the "
            f"sharded state this engine keeps; load it with load_optimizer_states=False")
    if load_optimizer_states and engine.replicated_optimizer is not None and \
            meta["optimizer"] != "replicated":
        raise CheckpointError(
            f"{path} holds sharded optimizer state (stages 1-3), which this engine's stage-0 "
            f"{type(engine.replicated_optimizer).__name__} cannot take; load it with "
            f"load_optimizer_states=False")
    kinds = KINDS if load_optimizer_states else ("master",)
    states_of = client_state = None
    client = getattr(engine.optimizer, "client", None)
    if load_optimizer_states and engine.replicated_optimizer is None:
        saved_client = meta.get("client_optimizer")
        mine = type(client.client).__name__ if client is not None else None
        if (saved_client or {}).get("class") != mine:
            held = f"{saved_client['class']} state" if saved_client else \
                "zero_ext's AdamW moments"
            runs = f"the {mine} given to initialize" if mine else "zero_ext's AdamW"
            raise CheckpointError(
                f"{CALLER}: {path} holds {held}, and this engine runs {runs}; pass "
                f"load_optimizer_states=False to keep the weights and start this optimizer "
                f"fresh")
        if client is not None and saved_client.get("rank_bound"):
            kinds, client_state = ("master",), "bound"  # read once verified, below
        elif client is not None:
            _check_client_records(saved_client, len(engine.optimizer.param_groups), path)
            staged = client.staged_state(saved_client["kinds"])
            kinds = ("master", *sorted({CLIENT_KIND + k for group in saved_client["kinds"]
                                        for k in group}))
            masters = {s.layout.index: s.master for s in engine.optimizer.shards}
            states_of = (lambda i: {"master": masters[i],
                                    **{CLIENT_KIND + k: t for k, t in staged[i].items()}})
            client_state = (staged, saved_client["scalars"])
    saved = {n: place.shape for n, place in index.params.items()}
    # A parameter that trained when saved and is frozen now is read by _model_states_plan; one
    # that is another name of a trained parameter here (tied to it) has nowhere to go.
    trained = {id(p): name for p, name in zip(engine._params, names)}
    current = engine.module.state_dict(keep_vars=True)
    untrained = {key for key, value in current.items() if id(value) not in trained}
    unexpected = sorted(set(saved) - set(names) - untrained)
    whole = _kept_whole(index, names)
    problem = _trainable_mismatch(engine, index, names, unexpected, {**saved, **whole}, strict)
    if problem is not None:
        raise CheckpointError(problem)
    fill = _unfrozen_since(index, _fill_plan(engine, {**saved, **whole}, names, kinds,
                                             f"{CALLER}: {path}", states_of), whole)
    unfrozen = sorted({name for _, _, name, _, _, kind in fill if kind == "zero"})
    if client_state is not None and unfrozen:
        raise CheckpointError(
            f"{CALLER}: {unfrozen[:8]} were frozen when {path} was saved and train now, and "
            f"the {type(client.client).__name__}'s state has no value for them (zero is not "
            f"every optimizer's start); pass load_optimizer_states=False to keep the weights "
            f"and start the optimizer fresh")
    own_rng = shard_file_name(engine.rank, engine.world_size) \
        if index.world_size == engine.world_size else None
    needed = _files_of(index, fill) + [MODEL_STATES, ENGINE_STATE] + ([own_rng] if own_rng else [])
    if client_state == "bound":  # (the world size is checked first: its file is needed)
        client_state = (_bound_state(engine, index, meta, names, path, verify=needed),
                        meta["client_optimizer"]["scalars"])
    index.verify_files(sorted(set(needed)))
    for file, tensor, kind in {(f, t, k) for _, _, name, a, b, k in fill
                               if k not in ("zero", "state")
                               for f, t, _, _ in index.pieces(name, a, b)}:
        if f"{tensor}.{kind}" not in index.reader(file):
            raise CheckpointError(f"{CALLER}: {path}/{file} has no {tensor}.{kind}")
    extra = read_engine_state(index)
    model_states = _model_states_plan(engine, index, strict)
    differences = _optimizer_differences(engine, meta, extra, path) \
        if load_optimizer_states else []
    if load_lr_scheduler_states and engine.lr_scheduler is not None:
        if extra["lr_scheduler"] is None:
            raise CheckpointError(f"{CALLER}: {path} has no LR scheduler state (it was saved "
                                  f"without a scheduler); pass load_lr_scheduler_states=False")
        differences += _scheduler_differences(engine, extra["lr_scheduler"])
    if not load_module_only:
        # Saved before registered states existed: absent, which problems() reads as none.
        problems = engine.checkpoint_states.problems(extra.get("registered_state"), path)
        if problems:
            raise CheckpointError(f"{CALLER}: {'; '.join(problems)}")
    compression = None
    if load_optimizer_states:
        try:
            compression = compression_state.plan(engine, index, own_rng, names)
        except CheckpointError as error:
            raise CheckpointError(f"{CALLER}: {error}") from None
    if own_rng is not None:
        metadata = index.reader(own_rng).metadata
        json.loads(metadata["python_random"])  # malformed: refused now, not half way
        if "numpy_random" in metadata:
            json.loads(metadata["numpy_random"])
    return _Plan(index, fill, model_states, extra, own_rng, differences, client_state,
                 compression)


@torch.no_grad()
def load_checkpoint(engine, load_dir: str, tag=None, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True, load_module_only: bool = False,
                    strict: bool = True):
    """Collective. Restores what save_checkpoint wrote, at this engine's world size and stage;
    returns (checkpoint path, client_state), or (None, None) when `load_dir` holds no
    checkpoint and no tag was given (DeepSpeed's behaviour). A load that fails raises on every
    rank and changes nothing."""
    load_dir = os.path.abspath(load_dir)
    resolved, problem = _attempt(resolve_tag, load_dir, tag, CALLER)
    views = comm.all_gather_object((resolved, problem))
    _raise_if_any([p for _, p in views], "load_checkpoint")
    tags = [v[0] for v in views]
    if len(set(tags)) > 1:
        raise CheckpointError(f"{CALLER}: the ranks resolved different tags ({tags}); each "
                              f"rank reads {load_dir}/{LATEST} from its own filesystem. Pass "
                              f"tag= explicitly, or save to a filesystem every rank shares")
    if resolved is None:
        if engine.rank == 0:
            _announce_missing(load_dir)
        return None, None
    path, note = find_checkpoint(load_dir, resolved)
    if engine.rank == 0:
        if note is not None:
            warnings.warn(f"{CALLER}: {note}", stacklevel=3)
        for partial in partial_dirs(load_dir):
            if partial != path:
                warnings.warn(f"{CALLER}: {partial} is an incomplete checkpoint (its save never "
                              f"finished); it was ignored and can be deleted", stacklevel=3)
    if from_deepspeed.is_deepspeed_checkpoint(path):
        return from_deepspeed.load_deepspeed_checkpoint(
            engine, path, load_optimizer_states, load_lr_scheduler_states, load_module_only)
    if load_module_only:
        load_optimizer_states = load_lr_scheduler_states = False

    plan, problem = _attempt(_plan_load, engine, path, load_optimizer_states,
                             load_lr_scheduler_states, load_module_only, strict)
    counters = plan.index.metadata["counters"] if plan is not None else None
    views = comm.all_gather_object((problem, counters))
    _raise_if_any([p for p, _ in views], "load_checkpoint")
    if len({json.dumps(c, sort_keys=True) for _, c in views}) > 1:
        detail = "; ".join(f"rank {r}: {c}" for r, (_, c) in enumerate(views))
        raise CheckpointError(f"{CALLER}: the ranks read different step counts from {path} "
                              f"({detail}): they see different copies of it. Load from a "
                              f"filesystem every rank shares")
    if plan.differences and engine.rank == 0:
        warnings.warn(
            f"{CALLER}: {path} was saved with other optimizer settings than this engine's "
            f"config, and the checkpoint's are used (PyTorch's rule: loading an optimizer's "
            f"state restores its hyperparameters): {'; '.join(plan.differences)}. To train "
            f"with the configured values, set them in engine.optimizer.param_groups after "
            f"loading, or pass load_optimizer_states=False (fresh moments)", stacklevel=3)
    dropped = plan.compression.dropped if plan.compression is not None else None
    if dropped is not None and engine.rank == 0:
        warnings.warn(f"{CALLER}: {path} holds compressed communication's state this engine has "
                      f"no place for, and it is dropped: {dropped}. To keep it, resume with the "
                      f"compression settings it was saved with", stacklevel=3)
    _apply(engine, plan, load_optimizer_states, load_lr_scheduler_states, load_module_only)
    return path, plan.extra["client_state"]


def restore_scheduler(engine, state: dict) -> None:
    """The LR scheduler's saved state, and the learning rates of its position in the groups."""
    engine.lr_scheduler.load_state_dict(state)
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr


def restore_counters(engine, global_steps: int, skipped_steps: int,
                     global_samples: int | None) -> None:
    """The step counters of a loaded checkpoint, with the window they imply. `global_samples`
    None (a checkpoint that lacks it): train_batch_size per step so far."""
    engine.global_steps = global_steps
    # Checkpoints are taken at window boundaries, so the next micro-step opens a window,
    # whatever the accumulation count was when the checkpoint was written.
    engine.micro_steps = global_steps * engine.batch.gradient_accumulation_steps
    engine._window_micro = 0
    # global_samples: the saved count, then train_batch_size per step from here
    engine._samples_anchor = (0, 0) if global_samples is None else (global_steps,
                                                                    int(global_samples))
    # A window this engine had begun (backwards before the load) belongs to the weights it
    # had: its gradients go, or the loaded run's first window would sum them in.
    engine.grad_buckets.clear()
    engine._backwards_since_step = 0
    engine.skipped_steps = skipped_steps


def _apply(engine, plan: _Plan, load_optimizer_states: bool, load_lr_scheduler_states: bool,
           load_module_only: bool) -> None:
    """Writes what _plan_load checked into the engine."""
    index, meta, extra = plan.index, plan.index.metadata, plan.extra
    for target, at, name, a, b, kind in plan.fill:
        if kind == "zero":
            target[at:at + b - a].zero_()
        elif kind == "state":
            index.reader(MODEL_STATES).read_into(name, a, target[at:at + b - a])
        else:
            index.read_into(kind, name, a, target[at:at + b - a])
    for write in plan.model_states:
        write()
    engine._sync_weights_from_master()
    if load_optimizer_states:
        if engine.replicated_optimizer is not None:
            engine.replicated_optimizer.load_state_dict(extra["replicated_optimizer"])
        else:
            for group, saved in zip(engine.optimizer.param_groups, extra["param_groups"]):
                group.update(saved)
            for shard in engine.optimizer.shards:
                shard.step.fill_(meta["optimizer_steps"][shard.layout.group])
            if plan.client_state is not None:
                engine.optimizer.client.install(*plan.client_state)
    if load_optimizer_states:
        compression_state.restore(engine, index, plan.own_rng, _names(engine),
                                  plan.compression)
    elif getattr(engine, "compression", None) is not None:
        engine.compression.reset()  # fresh moments, fresh residuals
    if load_lr_scheduler_states and engine.lr_scheduler is not None:
        restore_scheduler(engine, extra["lr_scheduler"])
    if load_module_only:
        return
    counters = meta["counters"]
    restore_counters(engine, counters["global_steps"], counters["skipped_steps"],
                     counters.get("global_samples"))
    # The scaler is part of DeepSpeed's optimizer state: fresh without it, as there.
    if load_optimizer_states and engine.loss_scaler is not None and \
            meta["loss_scaler"] is not None:
        engine.loss_scaler.load_state_dict(meta["loss_scaler"])
    # After global_steps: a data position anchors itself to the restored step count.
    engine.checkpoint_states.apply(extra.get("registered_state"))
    if plan.own_rng is not None:
        _restore_rng(index.reader(plan.own_rng))
    elif engine.rank == 0:
        print(f"[zero_ext] {index.path} was saved by {index.world_size} ranks and is loaded by "
              f"{engine.world_size}: random-number states are not restored", flush=True)
