"""engine.save_checkpoint / engine.load_checkpoint: every rank writes its shard, any world size and
stage reads it back.

Called by ZeroEngine's methods of those names (collective: every rank calls them). The format
is described in zero_ext/checkpoint/format.py.

Saving writes into `<save_dir>/<tag>.partial/`; when every rank reports its files written and
fsynced, rank 0 writes the manifest (sizes and checksums), renames the directory to
`<save_dir>/<tag>/` and only then points `latest` at it. A rank that dies mid-save leaves the
`.partial` directory behind and `latest` where it was. Loading maps each parameter's elements
from the saved bucket layout onto this engine's, so the world size and the stage may differ.
Every check whose failure stops a save or a load is exchanged between ranks first, so all
ranks raise together rather than some waiting in a collective for the others.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import warnings

import torch

from zero_ext import comm
from zero_ext.checkpoint.files import (
    CHUNK_BYTES,
    TensorEntry,
    atomic_write_bytes,
    write_safetensors,
)
from zero_ext.checkpoint.format import (
    ENGINE_STATE,
    FORMAT,
    KINDS,
    LATEST,
    MANIFEST,
    METADATA,
    MODEL_STATES,
    PARTIAL_SUFFIX,
    VERSION,
    CheckpointError,
    CheckpointIndex,
    partial_dirs,
    resolve_tag,
    shard_file_name,
)

__all__ = ["load_checkpoint", "save_checkpoint"]


def _raise_together(problem: str | None, what: str) -> None:
    """Every rank's `problem` (None when fine) is exchanged; if any rank has one, all raise."""
    problems = comm.all_gather_object(problem)
    failed = [(r, p) for r, p in enumerate(problems) if p is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {p}" for r, p in failed)
        raise CheckpointError(f"zero_ext.{what} failed on {len(failed)} of {len(problems)} "
                              f"ranks: {detail}")


def _attempt(fn, *args):
    """(result, None) or (None, the error as text): a failure must reach the other ranks."""
    try:
        return fn(*args), None
    except Exception as error:  # noqa: BLE001 - reported to every rank, then raised
        return None, f"{type(error).__name__}: {error}"


def _names(engine) -> list[str]:
    """The name of each of the engine's trainable parameters (engine._params order)."""
    by_id = {id(p): n for n, p in engine.module.named_parameters()}
    return [by_id[id(p)] for p in engine._params]


def _held_range(engine, layout) -> tuple[int, int]:
    """The elements of a bucket this rank's optimizer state covers."""
    if engine.stage == 0 or engine.world_size == 1:
        return 0, layout.padded_numel
    return layout.shard_range(engine.rank)


def _state_sources(engine, names: list[str]) -> list[list[str]]:
    """[state_dict key, "param" | "state", where]: trainable parameters come from the shards
    (by parameter name; tied weights appear under every key), the rest from model_states."""
    trainable = {id(p): n for p, n in zip(engine._params, names)}
    return [[key, "param", trainable[id(value)]] if id(value) in trainable
            else [key, "state", key]
            for key, value in engine.module.state_dict(keep_vars=True).items()]


def _rng_entries() -> tuple[list[TensorEntry], dict[str, str]]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, state, gauss = random.getstate()
    meta = {"python_random": json.dumps([version, list(state), gauss])}
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy_random"] = json.dumps([name, keys.tolist(), pos, has_gauss, cached])
    except ImportError:
        pass
    return [TensorEntry(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()], \
        meta


def _restore_rng(reader) -> None:
    torch.set_rng_state(reader.read("rng.cpu"))
    if "rng.cuda" in reader and torch.cuda.is_available():
        torch.cuda.set_rng_state(reader.read("rng.cuda"))
    version, state, gauss = json.loads(reader.metadata["python_random"])
    random.setstate((version, tuple(state), gauss))
    if "numpy_random" in reader.metadata:
        import numpy as np
        name, keys, pos, has_gauss, cached = json.loads(reader.metadata["numpy_random"])
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _layout_states(engine, layout_index: int) -> dict[str, torch.Tensor]:
    """The bucket's fp32 master weights and moments over `_held_range` (replicated stage 0:
    the model's own weights, there being no master and no sharded moments)."""
    if engine.replicated_optimizer is not None:
        flat = dict(zip((lo.index for lo in engine.persistent_layouts), engine.flat_params))
        return {"master": flat[layout_index]}
    shard = engine.optimizer.shards[layout_index]
    return {"master": shard.master, "exp_avg": shard.exp_avg, "exp_avg_sq": shard.exp_avg_sq}


def _write_shard(engine, path: str):
    entries = []
    for layout in engine.layouts:
        held_start, _ = _held_range(engine, layout)
        start, end = layout.shard_range(engine.rank)
        for kind, tensor in _layout_states(engine, layout.index).items():
            entries.append(TensorEntry(
                f"{layout.index}.{kind}", torch.float32, (end - start,),
                lambda t=tensor, a=start - held_start, b=end - held_start: t[a:b].float()))
    rng, rng_meta = _rng_entries()
    return write_safetensors(path, entries + rng, metadata=rng_meta)


def _metadata(engine, tag: str, names: list[str]) -> dict:
    steps = []
    if engine.replicated_optimizer is None:
        for index in range(len(engine.optimizer.param_groups)):
            group_steps = {float(s.step) for s in engine.optimizer.shards
                           if s.layout.group == index}
            steps.append(max(group_steps, default=0.0))
    hf_config = None
    config = getattr(engine.module, "config", None)
    if hasattr(config, "to_json_string"):
        hf_config = json.loads(config.to_json_string())
    return {
        "format": FORMAT, "version": VERSION, "tag": tag,
        "world_size": engine.world_size, "stage": engine.stage,
        "model_dtype": str(engine.model_dtype).removeprefix("torch."),
        "config": engine.config.to_dict(),
        "counters": {"global_steps": engine.global_steps, "micro_steps": engine.micro_steps,
                     "skipped_steps": engine.skipped_steps},
        "loss_scaler": engine.loss_scaler.state_dict() if engine.loss_scaler else None,
        "optimizer": "replicated" if engine.replicated_optimizer is not None else "sharded",
        "optimizer_steps": steps,
        "layouts": [{"index": layout.index, "group": layout.group,
                     "padded_numel": layout.padded_numel,
                     "slots": [[names[s.param_index], s.offset, list(s.shape)]
                               for s in layout.slots]} for layout in engine.layouts],
        "state_dict": _state_sources(engine, names),
        "hf_config": hf_config,
    }


def _write_rank0_files(engine, staging: str, tag: str, names: list[str], client_state) -> dict:
    records = {}
    metadata = _metadata(engine, tag, names)
    state = engine.module.state_dict(keep_vars=True)
    entries = [TensorEntry(key, state[key].dtype, tuple(state[key].shape),
                           lambda v=state[key]: v.detach())
               for key, kind, _ in metadata["state_dict"] if kind == "state"]
    records[MODEL_STATES] = write_safetensors(os.path.join(staging, MODEL_STATES), entries)
    buffer = io.BytesIO()
    torch.save({
        "param_groups": [{k: v for k, v in g.items() if k != "params"}
                         for g in engine.optimizer.param_groups],
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None,
        "replicated_optimizer": (engine.replicated_optimizer.state_dict()
                                 if engine.replicated_optimizer is not None else None),
        "client_state": client_state,
    }, buffer)
    records[ENGINE_STATE] = atomic_write_bytes(os.path.join(staging, ENGINE_STATE),
                                               buffer.getvalue())
    records[METADATA] = atomic_write_bytes(os.path.join(staging, METADATA),
                                           json.dumps(metadata, indent=1).encode())
    return records


def _publish(save_dir: str, staging: str, tag: str, files: dict, save_latest: bool) -> str:
    """Rank 0, once every file is on disk: manifest, then the directory's final name, then
    `latest`. Each step is atomic, so a crash between them leaves a loadable state."""
    manifest = {"format": FORMAT, "version": VERSION, "tag": tag,
                "chunk_bytes": CHUNK_BYTES,
                "files": {name: {"bytes": r.bytes, "sha256_chunks": list(r.sha256_chunks)}
                          for name, r in sorted(files.items())}}
    atomic_write_bytes(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1).encode())
    final = os.path.join(save_dir, tag)
    if os.path.exists(final):  # re-saving a tag: the old copy goes only once the new one is in
        old = final + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
    if save_latest:
        atomic_write_bytes(os.path.join(save_dir, LATEST), tag.encode())
    return final


def save_checkpoint(engine, save_dir: str, tag=None, client_state=None,
                    save_latest: bool = True) -> str:
    """Collective. Writes the engine's complete training state to `<save_dir>/<tag>/` (tag
    defaults to `global_step<N>`); returns that path."""
    if engine.micro_steps % engine.batch.gradient_accumulation_steps != 0:
        raise CheckpointError(
            f"zero_ext.save_checkpoint: called in the middle of a gradient accumulation window "
            f"(micro-step {engine.micro_steps}, {engine.batch.gradient_accumulation_steps} per "
            f"step); the partial gradients would be lost. Save right after engine.step() "
            f"completes an accumulation boundary")
    tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
    tags = comm.all_gather_object(tag)
    if len(set(tags)) > 1:
        raise CheckpointError(
            f"zero_ext.save_checkpoint: the ranks passed different tags ({tags}); nothing was "
            f"written. Pass the same tag on every rank (or none: global_step<N> is the default)")
    if os.sep in tag or tag in ("", ".", "..") or tag.endswith(PARTIAL_SUFFIX) or tag == LATEST:
        raise CheckpointError(f"zero_ext.save_checkpoint: {tag!r} cannot be a tag (it becomes a "
                              f"directory name); use letters, digits, '_', '-' or '.'")
    save_dir = os.path.abspath(save_dir)
    staging = os.path.join(save_dir, tag + PARTIAL_SUFFIX)

    def prepare():
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # an earlier, interrupted save of this tag
        os.makedirs(staging)

    _raise_together(_attempt(prepare)[1] if engine.rank == 0 else None, "save_checkpoint")
    names = _names(engine)
    shard_name = shard_file_name(engine.rank, engine.world_size)
    records, problem = _attempt(lambda: {
        shard_name: _write_shard(engine, os.path.join(staging, shard_name)),
        **(_write_rank0_files(engine, staging, tag, names, client_state)
           if engine.rank == 0 else {})})
    outcomes = comm.all_gather_object((records, problem))
    _raise_together(problem, "save_checkpoint")
    files = {name: record for r, _ in outcomes for name, record in r.items()}
    _, problem = _attempt(_publish, save_dir, staging, tag, files, save_latest) \
        if engine.rank == 0 else (None, None)
    _raise_together(problem, "save_checkpoint")
    return os.path.join(save_dir, tag)


def _fill_plan(engine, saved: dict[str, tuple[int, ...]], names: list[str], kinds,
               what: str) -> list:
    """(target tensor, first element, source name, its first, last+1 element, kind) for every
    piece of this rank's buckets, reading parameter i as `names[i]` of a source holding
    `saved` (name -> shape), after checking that every parameter is there with its shape."""
    # Shapes from the layouts: stage 3's released parameters have no shape of their own.
    mine = {names[s.param_index]: tuple(s.shape) for layout in engine.layouts
            for s in layout.slots}
    missing = sorted(set(mine) - set(saved))
    shapes = [f"{n}: {saved[n]} there, {mine[n]} in the model" for n in mine
              if n in saved and saved[n] != mine[n]]
    if missing or shapes:
        raise CheckpointError(f"{what} does not fit this model's trainable parameters: "
                              f"missing {missing[:8]}, shapes differ {shapes[:8]}")
    plan = []
    for layout in engine.layouts:
        start, end = _held_range(engine, layout)
        states = _layout_states(engine, layout.index)
        for kind in kinds:
            if kind not in states:
                continue
            for slot in layout.slots:
                lo, hi = max(slot.offset, start), min(slot.offset + slot.numel, end)
                if lo < hi:
                    plan.append((states[kind], lo - start, names[slot.param_index],
                                 lo - slot.offset, hi - slot.offset, kind))
    return plan


def _files_of(index: CheckpointIndex, plan) -> list[str]:
    files = {file for _, _, name, a, b, _ in plan for file, _, _, _ in index.pieces(name, a, b)}
    return sorted(files)


@torch.no_grad()
def load_checkpoint(engine, load_dir: str, tag=None, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True, load_module_only: bool = False):
    """Collective. Restores what save_checkpoint wrote, at this engine's world size and stage;
    returns (checkpoint path, client_state)."""
    load_dir = os.path.abspath(load_dir)
    tag, problem = _attempt(resolve_tag, load_dir, tag)
    _raise_together(problem, "load_checkpoint")
    tags = comm.all_gather_object(tag)
    if len(set(tags)) > 1:
        raise CheckpointError(f"zero_ext.load_checkpoint: the ranks resolved different tags "
                              f"({tags}); pass tag= explicitly")
    if engine.rank == 0:
        for partial in partial_dirs(load_dir):
            warnings.warn(f"zero_ext.load_checkpoint: {partial} is an incomplete checkpoint "
                          f"(its save never finished); it was ignored and can be deleted",
                          stacklevel=3)
    path = os.path.join(load_dir, tag)
    if load_module_only:
        load_optimizer_states = load_lr_scheduler_states = False
    names = _names(engine)

    def open_and_plan():
        index = CheckpointIndex(path)
        if load_optimizer_states and engine.replicated_optimizer is None and \
                index.metadata["optimizer"] == "replicated":
            raise CheckpointError(
                f"{path} holds a stage-0 torch optimizer's state, not AdamW moments for the "
                f"sharded optimizer; load it with load_optimizer_states=False")
        if load_optimizer_states and engine.replicated_optimizer is not None and \
                index.metadata["optimizer"] != "replicated":
            raise CheckpointError(
                f"{path} holds sharded AdamW state, which this engine's "
                f"{type(engine.replicated_optimizer).__name__} cannot take; load it with "
                f"load_optimizer_states=False")
        kinds = KINDS if load_optimizer_states else ("master",)
        saved = {n: place.shape for n, place in index.params.items()}
        unexpected = sorted(set(saved) - set(names))
        if unexpected:
            raise CheckpointError(f"zero_ext.load_checkpoint: {path} has parameters this model "
                                  f"lacks: {unexpected[:8]}")
        plan = _fill_plan(engine, saved, names, kinds, f"zero_ext.load_checkpoint: {path}")
        own_rng = shard_file_name(engine.rank, engine.world_size) \
            if index.world_size == engine.world_size else None
        needed = _files_of(index, plan) + [MODEL_STATES, ENGINE_STATE] + \
            ([own_rng] if own_rng else [])
        index.verify_files(sorted(set(needed)))
        return index, plan, own_rng

    opened, problem = _attempt(open_and_plan)
    _raise_together(problem, "load_checkpoint")
    index, plan, own_rng = opened
    meta = index.metadata

    for target, at, name, a, b, kind in plan:
        index.read_into(kind, name, a, target[at:at + b - a])
    _load_model_states(engine, index)
    engine._sync_weights_from_master()

    extra = torch.load(os.path.join(path, ENGINE_STATE), map_location="cpu",
                       weights_only=False)
    if load_optimizer_states:
        _load_optimizer(engine, meta, extra)
    if load_lr_scheduler_states and engine.lr_scheduler is not None:
        if extra["lr_scheduler"] is None:
            raise CheckpointError(f"zero_ext.load_checkpoint: {path} has no LR scheduler state "
                                  f"(it was saved without a scheduler); pass "
                                  f"load_lr_scheduler_states=False")
        engine.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    if not load_module_only:
        counters = meta["counters"]
        engine.global_steps = counters["global_steps"]
        # Checkpoints are taken at window boundaries, so the next micro-step opens a window,
        # whatever the accumulation count was when the checkpoint was written.
        engine.micro_steps = counters["global_steps"] * engine.batch.gradient_accumulation_steps
        engine.skipped_steps = counters["skipped_steps"]
        if engine.loss_scaler is not None and meta["loss_scaler"] is not None:
            engine.loss_scaler.load_state_dict(meta["loss_scaler"])
        if own_rng is not None:
            _restore_rng(index.reader(own_rng))
        elif engine.rank == 0:
            print(f"[zero_ext] {path} was saved by {index.world_size} ranks and is loaded by "
                  f"{engine.world_size}: random-number states are not restored", flush=True)
    return path, extra["client_state"]


def _load_model_states(engine, index: CheckpointIndex) -> None:
    """Buffers and frozen parameters, whole, from rank 0's file."""
    reader = index.reader(MODEL_STATES)
    current = engine.module.state_dict(keep_vars=True)
    wanted = {key: where for key, kind, where in index.metadata["state_dict"] if kind == "state"}
    trainable = {id(p) for p in engine._params}
    mine = {key for key, value in current.items() if id(value) not in trainable}
    if set(wanted) != mine:
        raise CheckpointError(
            f"zero_ext.load_checkpoint: {index.path} does not fit this model's buffers and "
            f"frozen parameters: missing from the checkpoint {sorted(mine - set(wanted))[:8]}, "
            f"not in the model {sorted(set(wanted) - mine)[:8]}")
    for key in sorted(mine):
        value = current[key]
        saved = reader.read(wanted[key])
        if tuple(saved.shape) != tuple(value.shape):
            raise CheckpointError(f"zero_ext.load_checkpoint: {key} is {tuple(saved.shape)} in "
                                  f"{index.path} and {tuple(value.shape)} in the model")
        value.data.copy_(saved)


def _load_optimizer(engine, meta: dict, extra: dict) -> None:
    groups = extra["param_groups"]
    if len(groups) != len(engine.optimizer.param_groups):
        raise CheckpointError(
            f"zero_ext.load_checkpoint: the checkpoint has {len(groups)} optimizer parameter "
            f"groups, this engine {len(engine.optimizer.param_groups)}; build the same groups, "
            f"or pass load_optimizer_states=False")
    if engine.replicated_optimizer is not None:
        engine.replicated_optimizer.load_state_dict(extra["replicated_optimizer"])
        return
    for group, saved in zip(engine.optimizer.param_groups, groups):
        group.update(saved)
    for shard in engine.optimizer.shards:
        shard.step.fill_(meta["optimizer_steps"][shard.layout.group])
