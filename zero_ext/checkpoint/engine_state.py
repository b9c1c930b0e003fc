"""engine.save_checkpoint: every rank writes its shard (loading.py reads them back at any world
size and stage); plus what saving and loading share.

Called by ZeroEngine.save_checkpoint (collective: every rank calls it). The format is described
in zero_ext/checkpoint/format.py.

Before anything is written, every rank's reasons not to save (its step counts, a non-finite
optimizer state, a client_state that is not plain data) are exchanged in one all-gather (a
save in the middle of an accumulation window is said in a warning: _partial_window). Then saving writes into
`<save_dir>/<tag>.partial/` under a lock file naming this job; when every rank reports its
files written and fsynced, rank 0 writes the manifest (sizes and checksums), renames the
directory to `<save_dir>/<tag>/` (format.publish: a complete copy is always findable) and only
then points `latest` at it. A rank that dies mid-save leaves the `.partial` directory behind
and `latest` where it was. Every check whose failure stops a save is exchanged between ranks
first, so all ranks raise together rather than some waiting in a collective for the others.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import warnings

import torch

from zero_ext import comm
from zero_ext.checkpoint import compression_state, data_only
from zero_ext.checkpoint.data_only import check_data_only, first_disallowed
from zero_ext.checkpoint.files import (
    CHUNK_BYTES,
    SaveLock,
    TensorEntry,
    atomic_write_bytes,
    remove_stale_temporaries,
    write_safetensors,
)
from zero_ext.checkpoint.format import (
    ENGINE_STATE,
    FORMAT,
    LATEST,
    MANIFEST,
    METADATA,
    MODEL_STATES,
    PARTIAL_SUFFIX,
    SAVE_LOCK,
    VERSION,
    CheckpointError,
    CheckpointIndex,
    partial_dirs,
    publish,
    recover_interrupted_replace,
    shard_file_name,
    tag_problem,
)
from zero_ext.checkpoint.hf_format import keys_save_pretrained_omits
from zero_ext.zero.client_optimizer import PYTHON_SCALARS, python_scalar_kind

__all__ = ["save_checkpoint"]


def _describe(problems: list) -> str | None:
    """Every rank's problem (None when fine), ranks with the same problem named together."""
    by_problem: dict[str, list[int]] = {}
    for rank, problem in enumerate(problems):
        if problem is not None:
            by_problem.setdefault(problem, []).append(rank)
    if not by_problem:
        return None
    failed = sum(len(ranks) for ranks in by_problem.values())
    return f"failed on {failed} of {len(problems)} ranks: " + "; ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {problem}"
        for problem, ranks in by_problem.items())


def _raise_if_any(problems: list, what: str) -> None:
    """Raises on this rank if any rank's problem (already exchanged) is not None."""
    detail = _describe(problems)
    if detail is not None:
        raise CheckpointError(f"zero_ext.{what} {detail}")


def _raise_together(problem: str | None, what: str) -> None:
    """Every rank's `problem` (None when fine) is exchanged; if any rank has one, all raise."""
    _raise_if_any(comm.all_gather_object(problem), what)


def _free_bytes(path: str) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:  # not there on this rank's filesystem: the error says what happened
        return -1


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


def _frozen_keys(engine) -> set[str]:
    """state_dict keys of parameters that do not train (requires_grad=False)."""
    trainable = {id(p) for p in engine._params}
    frozen = {id(p) for p in engine.module.parameters() if id(p) not in trainable}
    return {key for key, value in engine.module.state_dict(keep_vars=True).items()
            if id(value) in frozen}


def _bucket_shapes(engine) -> dict[int, tuple[int, ...]]:
    """id -> shape of every parameter in a bucket (trainable, and stage 3's frozen ones):
    stage 3's released parameters have no shape of their own."""
    return {id(param): tuple(slot.shape) for param, _, slot in engine.bucket_slots()}


@torch.no_grad()
def set_value(engine, param: torch.nn.Parameter, value: torch.Tensor | None = None, *,
              read_range=None) -> None:
    """Sets a parameter kept outside the optimizer (frozen) to the whole `value`, or to what
    `read_range(first, out)` reads (the flat value's elements from `first` on into `out`):
    into this rank's shard where stage 3 partitions it, reading only that."""
    if read_range is None:
        flat = value.reshape(-1)

        def read_range(first: int, out: torch.Tensor) -> None:
            out.copy_(flat[first:first + out.numel()])
    if engine.partitioned is not None and id(param) in engine.partitioned.unit_of_param:
        engine.partitioned.write_value(param, read_range)
    else:
        whole = torch.empty(param.numel(), dtype=param.dtype)
        read_range(0, whole)
        param.data.copy_(whole.view(param.shape))


def _state_sources(engine, names: list[str], exclude_frozen: bool = False) -> list[list[str]]:
    """[state_dict key, "param" | "frozen" | "state", where]: trainable parameters come from
    the shards' master weights (by parameter name; tied weights appear under every key),
    stage 3's partitioned frozen parameters from the shards' model-dtype values ("frozen"),
    the rest from model_states; frozen parameters are left out with exclude_frozen
    (DeepSpeed's exclude_frozen_parameters)."""
    trainable = {id(p): n for p, n in zip(engine._params, names)}
    partitioned = _partitioned_frozen(engine)
    skip = _frozen_keys(engine) if exclude_frozen else set()
    return [[key, "param", trainable[id(value)]] if id(value) in trainable
            else [key, "frozen", partitioned[id(value)]] if id(value) in partitioned
            else [key, "state", key]
            for key, value in engine.module.state_dict(keep_vars=True).items()
            if key not in skip]


def _partitioned_frozen(engine) -> dict[int, str]:
    """id -> name of the frozen parameters stage 3 partitions (in engine.frozen_layouts)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {id(param): names[id(param)] for param, layout, _ in engine.bucket_slots()
            if layout.index >= len(engine.layouts)}


def frozen_layouts_metadata(engine) -> list[dict]:
    """Stage 3's frozen buckets as checkpoint metadata records them (parameters by name,
    offsets); their shards are saved in the model's dtype as "<index>.frozen"."""
    names = _partitioned_frozen(engine)
    every = engine._params + engine._frozen_params
    return [{"index": layout.index, "padded_numel": layout.padded_numel,
             "slots": [[names[id(every[s.param_index])], s.offset, list(s.shape)]
                       for s in layout.slots]}
            for layout in engine.frozen_layouts]


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
    if engine.optimizer.client is not None:  # the user's optimizer: its per-element state
        return {"master": shard.master, **{CLIENT_KIND + k: v for k, v in
                                           engine.optimizer.client.elementwise_state(shard).items()}}
    return {"master": shard.master, "exp_avg": shard.exp_avg, "exp_avg_sq": shard.exp_avg_sq}


# A client optimizer's per-element state is saved as kind "client.<its key>": apart from the
# kinds of zero_ext's own (master, exp_avg, ...) and of the load plan (zero, state, frozen).
CLIENT_KIND = "client."


def client_optimizer_metadata(engine, rank_bound: bool) -> dict | None:
    """A client optimizer's class, per-element state kinds and scalars (zero/
    client_optimizer.py), for metadata.json, or with `rank_bound` none of them (each rank's
    file holds its shards' whole state: `_bound_entries`); None for zero_ext's AdamW or stage
    0's torch optimizer."""
    client = getattr(engine.optimizer, "client", None)
    if client is None:
        return None
    kinds, scalars, _, _ = client.saved_state()
    if rank_bound:
        kinds, scalars = [{} for _ in kinds], [{} for _ in scalars]
    return {"class": type(client.client).__name__, "kinds": kinds, "scalars": scalars,
            "rank_bound": rank_bound}


def _bound_entries(engine) -> tuple[list[TensorEntry], dict[str, str]]:
    """A client optimizer's whole state of this rank's shards, bound to them (a rank-bound
    checkpoint): each value a tensor entry "<layout>.bound.<key>" (a number as a 0-d tensor),
    and how to make each one again (its Python type, whether on the shard's device) in the
    file's metadata."""
    client = engine.optimizer.client
    entries, records = [], {}
    for index, state in client.bound_state().items():
        device = engine.optimizer.shards[index].master.device
        for key, value in state.items():
            kind = "tensor" if torch.is_tensor(value) else python_scalar_kind(value)
            tensor = value if kind == "tensor" else torch.tensor(
                0 if value is None else value, dtype=PYTHON_SCALARS[kind][1])
            entries.append(TensorEntry(f"{index}.bound.{key}", tensor.dtype,
                                       tuple(tensor.shape), lambda t=tensor: t.detach()))
            records.setdefault(str(index), {})[key] = [
                kind, kind == "tensor" and value.device == device and device.type != "cpu"]
    return entries, {"client_bound": json.dumps(records)}


def _write_shard(engine, path: str, compression_totals: dict[str, torch.Tensor],
                 exclude_frozen: bool = False, rank_bound: bool = False):
    entries = compression_state.entries(engine, compression_totals)
    bound, bound_meta = _bound_entries(engine) if rank_bound else ([], {})
    for layout in engine.layouts:
        held_start, _ = _held_range(engine, layout)
        start, end = layout.shard_range(engine.rank)
        for kind, tensor in _layout_states(engine, layout.index).items():
            if rank_bound and kind.startswith(CLIENT_KIND):
                continue  # in `bound`
            # A client optimizer's state in its own dtype; zero_ext's in fp32.
            dtype = tensor.dtype if kind.startswith(CLIENT_KIND) else torch.float32
            entries.append(TensorEntry(
                f"{layout.index}.{kind}", dtype, (end - start,),
                lambda t=tensor, a=start - held_start, b=end - held_start, d=dtype:
                t[a:b].to(d)))
    # Stage 3's frozen shards, in the model's dtype (left out, as DeepSpeed leaves its frozen
    # fragments out, with exclude_frozen_parameters).
    for layout in [] if exclude_frozen else engine.frozen_layouts:
        shard = engine.partitioned.shard(layout.index)
        entries.append(TensorEntry(f"{layout.index}.frozen", shard.dtype, tuple(shard.shape),
                                   lambda t=shard: t))
    rng, rng_meta = _rng_entries()
    return write_safetensors(path, entries + bound + rng, metadata={**rng_meta, **bound_meta})


def _metadata(engine, tag: str, names: list[str], exclude_frozen: bool = False,
              rank_bound: bool = False) -> dict:
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
                     "skipped_steps": engine.skipped_steps,
                     "global_samples": engine.global_samples},
        "loss_scaler": engine.loss_scaler.state_dict() if engine.loss_scaler else None,
        "optimizer": "replicated" if engine.replicated_optimizer is not None else "sharded",
        "optimizer_class": type(engine.optimizer).__name__,
        "client_optimizer": client_optimizer_metadata(engine, rank_bound),
        "optimizer_steps": steps,
        "layouts": compression_state.layouts_metadata(engine, names),
        "frozen_layouts": [] if exclude_frozen else frozen_layouts_metadata(engine),
        "compression": compression_state.metadata(engine),
        "state_dict": _state_sources(engine, names, exclude_frozen),
        "excluded_frozen": sorted(_frozen_keys(engine)) if exclude_frozen else [],
        # The frozen parameters saved among model_states' entries (the rest are buffers), for
        # zero_ext.utils.zero_to_fp32's exclude_frozen_parameters.
        "frozen": [] if exclude_frozen else sorted(_frozen_keys(engine)),
        "hf_config": hf_config,
        # The names transformers' save_pretrained leaves out (a tied weight's aliases), which
        # zero_ext.consolidate leaves out too, so the file is the one from_pretrained expects.
        "save_pretrained_omits": sorted(keys_save_pretrained_omits(
            engine.module, engine.module.state_dict(keep_vars=True))),
    }


def _write_rank0_files(engine, staging: str, tag: str, names: list[str],
                       engine_state: bytes, exclude_frozen: bool, rank_bound: bool) -> dict:
    records = {}
    metadata = _metadata(engine, tag, names, exclude_frozen, rank_bound)
    state = engine.module.state_dict(keep_vars=True)
    entries = [TensorEntry(key, state[key].dtype, tuple(state[key].shape),
                           lambda v=state[key]: v.detach())
               for key, kind, _ in metadata["state_dict"] if kind == "state"]
    records[MODEL_STATES] = write_safetensors(os.path.join(staging, MODEL_STATES), entries)
    records[ENGINE_STATE] = atomic_write_bytes(os.path.join(staging, ENGINE_STATE),
                                               engine_state)
    records[METADATA] = atomic_write_bytes(os.path.join(staging, METADATA),
                                           json.dumps(metadata, indent=1).encode())
    return records


def _engine_state(engine, client_state) -> dict:
    """What engine_state.pt holds; checked to be plain data (data_only.py) before anything is
    written, so that the checkpoint can be read back without running code."""
    state = {
        "param_groups": [{k: v for k, v in g.items() if k != "params"}
                         for g in engine.optimizer.param_groups],
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None,
        "replicated_optimizer": (engine.replicated_optimizer.state_dict()
                                 if engine.replicated_optimizer is not None else None),
        "client_state": client_state,
        "registered_state": engine.checkpoint_states.state(),
    }
    caller = "zero_ext.save_checkpoint"
    check_data_only(client_state, "client_state", caller)
    for key in ("param_groups", "lr_scheduler", "replicated_optimizer", "registered_state"):
        found = first_disallowed(state[key], key)
        if found is not None:
            raise TypeError(
                f"{caller}: the {key.replace('_', ' ')} state holds {found[0]}, a "
                f"{type(found[1]).__qualname__}, which a checkpoint cannot hold (checkpoints are "
                f"read back as data only). Its state_dict() must hold only plain data")
    return state


def _non_finite(engine, names: list[str]) -> str | None:
    """Where this rank's fp32 master weights or moments are not finite, or None: a checkpoint
    of them would replace a good one with weights that cannot train."""
    for layout in engine.layouts:
        held_start, _ = _held_range(engine, layout)
        for kind, tensor in _layout_states(engine, layout.index).items():
            finite = torch.isfinite(tensor)
            if bool(finite.all()):
                continue
            first = held_start + int((~finite).nonzero()[0, 0])
            bad = int((~finite).sum())
            slot = next((s for s in layout.slots if s.offset <= first < s.offset + s.numel),
                        None)
            where = names[slot.param_index] if slot is not None else "padding"
            return (f"bucket {layout.index} has {bad} non-finite {kind} value(s), the first in "
                    f"{where} (element {first - slot.offset if slot else first})")
    return None


def _save_problem(engine, save_dir, client_state, names: list[str]) -> tuple[str | None, bytes]:
    """This rank's reason not to save (None when fine), and rank 0's engine_state.pt bytes.
    Checked before anything is written and exchanged, so every rank refuses together."""
    caller = "zero_ext.save_checkpoint"
    if not save_dir or not str(save_dir).strip():
        return (f"save_dir is {save_dir!r}; pass the directory to save into "
                f"(DeepSpeed refuses an empty one too, rather than write into the working "
                f"directory)"), b""
    client = getattr(engine.optimizer, "client", None)
    unsaved = client.saved_state()[3] if client is not None else None
    if unsaved is not None:
        return (f"the {type(client.client).__name__} given to initialize cannot be saved: "
                f"{unsaved}. Save with an optimizer whose state is per element or scalar, or "
                f"keep the weights with save_16bit_model()"), b""
    bad = _non_finite(engine, names)
    if bad is not None:
        return (f"the optimizer state is not finite ({bad}); a checkpoint of it would "
                f"replace a good one with weights that cannot train. Nothing was written: "
                f"resume from the last checkpoint"), b""
    if engine.rank != 0:
        return None, b""
    state, problem = _attempt(_engine_state, engine, client_state)
    if problem is not None:
        return problem.removeprefix("TypeError: ").removeprefix(f"{caller}: "), b""
    # Plain data torch.save may still fail on (an opaque tensor, a nesting deeper than the
    # recursion limit): exchanged like every other reason, so no rank is left in a collective.
    data, problem = _attempt(data_only.dumps, state)
    if problem is not None:
        detail, _ = _attempt(_unserializable, state, problem)
        return detail or f"engine_state.pt cannot be written ({problem}). Nothing was written", b""
    return None, data


def _partial_window(engine) -> str | None:
    """What a save inside an accumulation window leaves out (None at a boundary): the
    gradients of the window's micro-batches so far. The checkpoint holds the weights and
    optimizer state of the last completed step, which is what they are until the window's
    step, and a load starts a new window (loading.restore_counters); a save there is what
    DeepSpeed, accelerate's save_state and Lightning's ModelCheckpoint do at any batch."""
    accumulation = engine.batch.gradient_accumulation_steps
    if engine._window_micro != 0:  # (windows also start at multiples of `accumulation`)
        held = (f"in the middle of a gradient accumulation window (micro-step "
                f"{engine.micro_steps}, {accumulation} per step, {engine._window_micro} in "
                f"this window so far)")
    elif engine._no_sync or engine.grad_buckets.unreduced():
        held = "with gradients of engine.no_sync() not reduced yet"
    else:
        return None
    return (f"saved {held}: the checkpoint holds the weights and optimizer state of the last "
            f"completed step (global_steps {engine.global_steps}), not those gradients; a run "
            f"resumed from it starts a new window, and a data loader resumed past these "
            f"micro-batches leaves them out of training. This run goes on with them. To "
            f"resume exactly, save right after engine.step() completes an accumulation "
            f"boundary")


def _unserializable(state: dict, problem: str) -> str:
    """Why engine_state.pt could not be written (`problem`: torch.save's error as text), naming
    the value at fault where it can be found, and what to change."""
    found = data_only.first_unwritable(state["client_state"], "client_state") or \
        data_only.first_unwritable({k: v for k, v in state.items() if k != "client_state"},
                                   "the engine's state")
    if found is not None:
        place, tensor, error = found
        what = (f"{place} is a {tensor.layout} tensor, which torch.save cannot write ({error}); "
                f"convert it to an ordinary one first (.to_dense(), .cpu())")
    elif problem.startswith("RecursionError"):
        what = (f"a value in it is nested deeper than Python's recursion limit "
                f"({sys.getrecursionlimit()}) allows torch.save to write ({problem}); store it "
                f"flatter (a list of records rather than a chain of containers)")
    else:
        what = f"torch.save failed ({problem})"
    return (f"engine_state.pt (client_state, the optimizer's groups, the LR scheduler's state) "
            f"cannot be written: {what}. Nothing was written")


def _check_steps_agree(views: list[dict], caller: str) -> None:
    """All ranks must have taken the same optimizer and micro steps: otherwise their replicas
    (stage 0) or shards have diverged and no single state exists to save or resume."""
    for key, what in (("global_steps", "optimizer steps"), ("micro_steps", "micro-steps")):
        counts = [v[key] for v in views]
        if len(set(counts)) > 1:
            detail = ", ".join(f"rank {r} {c}" for r, c in enumerate(counts))
            raise CheckpointError(
                f"{caller}: the ranks have taken different numbers of {what} ({detail}): a "
                f"rank skipped engine.step() or engine.backward(), so their states have "
                f"diverged and there is no single state to save. Nothing was written; call "
                f"backward() and step() on every rank for every micro-batch")


def _client_rank_bound(views: list[dict]) -> bool:
    """Whether a client optimizer's state is saved bound to each rank's shards (the same on
    every rank: from every rank's view): when some rank holds state that is neither per
    element nor a scalar its group's shards share, or the ranks' per-element kinds or scalars
    differ (rank 0 alone would write them for all)."""
    states = [view["client"] for view in views]
    if states[0] is None:
        return False
    return any(bound for _, _, bound in states) or any(
        state[:2] != states[0][:2] for state in states[1:])


def _same_step_warning(final: str, engine) -> str | None:
    """A warning when the default tag is about to replace a checkpoint written at the same step
    counts: no optimizer step completed since, so if one failed in between (its error caught),
    the state saved now may differ from that one under the same name."""
    try:
        with open(os.path.join(final, METADATA)) as f:
            counters = json.load(f).get("counters", {})
    except (OSError, ValueError, AttributeError):
        return None
    if counters.get("global_steps") != engine.global_steps or \
            counters.get("micro_steps") != engine.micro_steps:
        return None
    return (f"zero_ext.save_checkpoint: replacing {final}, which was saved at the same step "
            f"counts (global_steps {engine.global_steps}): no optimizer step completed since. If "
            f"a step failed in between, the state saved now differs from that checkpoint's; pass "
            f"tag= to keep both")


def _no_space_detail(save_dir: str, staging: str, outcomes: list) -> str:
    """For a save that ran out of disk: the bytes the checkpoint needs, the bytes free, and the
    incomplete saves (their directories named) that hold space."""
    needed = sum(planned for _, _, planned, _ in outcomes)
    free = min((free for _, _, _, free in outcomes if free >= 0), default=0)
    others = []
    for partial in partial_dirs(save_dir):
        if partial == staging:
            continue
        size = sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(partial) for f in files)
        others.append(f"{partial} ({size:,} bytes)")
    held = f"; incomplete earlier saves hold space: {', '.join(others)}" if others else ""
    return (f"failed: the disk is full. The checkpoint needs about {needed:,} bytes and {free:,} "
            f"were free on the filesystem of {save_dir}; the incomplete save in {staging} was "
            f"removed{held}. Free space or save elsewhere")


def _publish(save_dir: str, staging: str, tag: str, files: dict, save_latest: bool) -> str:
    """Rank 0, once every file is on disk: manifest, then the directory's final name, then
    `latest`. Each step is atomic, and a complete copy is always where a load looks
    (format.publish), so a crash between them leaves a loadable state."""
    manifest = {"format": FORMAT, "version": VERSION, "tag": tag,
                "chunk_bytes": CHUNK_BYTES,
                "files": {name: {"bytes": r.bytes, "sha256_chunks": list(r.sha256_chunks)}
                          for name, r in sorted(files.items())}}
    atomic_write_bytes(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1).encode())
    final = publish(save_dir, staging, tag)
    if save_latest:
        atomic_write_bytes(os.path.join(save_dir, LATEST), tag.encode())
    return final


def _planned_bytes(engine, rank0: bool) -> int:
    """About how many bytes this rank's files take (for the error of a full disk)."""
    total = sum(3 * 4 * layout.shard_numel for layout in engine.layouts)
    total += sum(layout.shard_numel for layout in engine.frozen_layouts) * \
        torch.empty((), dtype=engine.model_dtype).element_size()
    if rank0:
        total += sum(v.numel() * v.element_size()
                     for v in engine.module.state_dict(keep_vars=True).values())
    return total


def save_checkpoint(engine, save_dir: str, tag=None, client_state=None,
                    save_latest: bool = True, exclude_frozen_parameters: bool = False) -> str:
    """Collective. Writes the engine's complete training state to `<save_dir>/<tag>/` (tag
    defaults to `global_step<N>`); returns that path."""
    caller = "zero_ext.save_checkpoint"
    names = _names(engine)
    problem, engine_state = _save_problem(engine, save_dir, client_state, names)
    default_tag = tag is None
    tag = f"global_step{engine.global_steps}" if default_tag else str(tag)
    client = getattr(engine.optimizer, "client", None)
    views = comm.all_gather_object({"tag": tag, "problem": problem,
                                    "global_steps": engine.global_steps,
                                    "micro_steps": engine.micro_steps,
                                    "client": client.saved_state()[:3] if client else None})
    _check_steps_agree(views, caller)
    _raise_if_any([v["problem"] for v in views], "save_checkpoint")
    partial = _partial_window(engine)
    if partial is not None and engine.rank == 0:
        warnings.warn(f"{caller}: {partial}", UserWarning, stacklevel=3)
    rank_bound = _client_rank_bound(views)
    tags = [v["tag"] for v in views]
    if len(set(tags)) > 1:
        raise CheckpointError(
            f"{caller}: the ranks passed different tags ({tags}); nothing was "
            f"written. Pass the same tag on every rank (or none: global_step<N> is the default)")
    bad_tag = tag_problem(tag)
    if bad_tag is not None:
        raise CheckpointError(f"{caller}: {bad_tag}, so it cannot be a tag (it becomes a "
                              f"directory name); use letters, digits, '_', '-' or '.'")
    save_dir = os.path.abspath(save_dir)
    staging = os.path.join(save_dir, tag + PARTIAL_SUFFIX)
    lock = SaveLock(os.path.join(save_dir, SAVE_LOCK))

    def prepare():
        if os.path.exists(save_dir) and not os.path.isdir(save_dir):
            raise NotADirectoryError(f"{save_dir} is a file, not a directory; pass a directory "
                                     f"to save checkpoints into")
        os.makedirs(save_dir, exist_ok=True)
        note = lock.acquire(caller)
        if note is not None:
            warnings.warn(note, stacklevel=4)
        # What a save killed between writing `latest`'s temporary and renaming it left.
        removed = remove_stale_temporaries(os.path.join(save_dir, LATEST), every=True)
        if removed:
            warnings.warn(f"{caller}: removed {removed} from {save_dir}, left by an earlier "
                          f"save that was interrupted while it wrote '{LATEST}'", stacklevel=4)
        final = os.path.join(save_dir, tag)
        if os.path.exists(final) and not os.path.isdir(final):
            raise FileExistsError(f"{final} is a file, so tag {tag!r} cannot be saved there; "
                                  f"pass another tag or move the file")
        recover_interrupted_replace(save_dir, tag)
        if default_tag and os.path.isdir(final):
            warning = _same_step_warning(final, engine)
            if warning is not None:
                warnings.warn(warning, stacklevel=4)
        shutil.rmtree(staging, ignore_errors=True)  # an earlier, interrupted save of this tag
        os.makedirs(staging)

    try:
        _raise_together(_attempt(prepare)[1] if engine.rank == 0 else None, "save_checkpoint")
        # Collective, so before the writes (a rank whose write fails must not leave the
        # others in a reduce-scatter).
        compression_totals = compression_state.totals(engine)
        shard_name = shard_file_name(engine.rank, engine.world_size)
        records, problem = _attempt(lambda: {
            shard_name: _write_shard(engine, os.path.join(staging, shard_name),
                                     compression_totals, exclude_frozen_parameters, rank_bound),
            **(_write_rank0_files(engine, staging, tag, names, engine_state,
                                  exclude_frozen_parameters, rank_bound)
               if engine.rank == 0 else {})})
        outcomes = comm.all_gather_object(
            (records, problem, _planned_bytes(engine, engine.rank == 0),
             _free_bytes(save_dir)))
        detail = _describe([p for _, p, _, _ in outcomes])
        if detail is not None:
            if engine.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            if "[Errno 28]" in detail or "No space left" in detail:
                detail = f"{_no_space_detail(save_dir, staging, outcomes)} ({detail})"
            else:
                detail += f"; the incomplete save in {staging} was removed"
            raise CheckpointError(f"{caller} {detail}")
        files = {name: record for r, _, _, _ in outcomes for name, record in r.items()}
        _, problem = _attempt(_publish, save_dir, staging, tag, files, save_latest) \
            if engine.rank == 0 else (None, None)
        _raise_together(problem, "save_checkpoint")
    finally:
        lock.release()
    return os.path.join(save_dir, tag)


def _fill_plan(engine, saved: dict[str, tuple[int, ...]], names: list[str], kinds,
               what: str, states_of=None) -> list:
    """(target tensor, first element, source name, its first, last+1 element, kind) for every
    piece of this rank's buckets, reading parameter i as `names[i]` of a source holding
    `saved` (name -> shape), after checking that every parameter is there with its shape.
    `states_of(layout index)`: the tensors to fill (default: the engine's own)."""
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
        states = (states_of or (lambda i: _layout_states(engine, i)))(layout.index)
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
    """The shard files a fill plan reads (a parameter frozen and kept whole when saved is in
    none: model_states holds it)."""
    files = {file for _, _, name, a, b, _ in plan if name in index.params
             for file, _, _, _ in index.pieces(name, a, b)}
    return sorted(files)
