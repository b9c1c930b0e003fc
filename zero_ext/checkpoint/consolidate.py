"""Full model weights as one file: from a sharded checkpoint, or from a live engine.

`zero_ext.consolidate(checkpoint_dir, output_path, dtype=None)` (also `python -m
zero_ext.consolidate`) reads a checkpoint written by engine.save_checkpoint at any world size
and stage, on any machine, without torch.distributed or a GPU. It streams: the output header
is computed from the metadata, then each tensor is assembled from the shards that hold it,
written and dropped, so memory holds one tensor at a time. `engine.save_16bit_model` is
`save_engine_model`, which streams the same way from a live engine; given a file name that does
not end in .safetensors (DeepSpeed's default `pytorch_model.bin`) it writes a torch.save file
there instead, as DeepSpeed's save_16bit_model does, holding the model on the writing rank.

The file carries {"format": "pt"} metadata and, for a transformers model, a config.json beside
it, so `Model.from_pretrained(directory)` loads the result.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from zero_ext.checkpoint.engine_state import (
    _attempt,
    _bucket_shapes,
    _raise_together,
)
from zero_ext.checkpoint.files import (
    SafetensorsWriter,
    TensorEntry,
    atomic_torch_save,
    atomic_write_bytes,
    remove_stale_temporaries,
    write_safetensors,
)
from zero_ext.checkpoint.format import (
    LATEST,
    MODEL_STATES,
    CheckpointError,
    CheckpointIndex,
    find_checkpoint,
    looks_like_checkpoint,
    partial_dirs,
    resolve_tag,
)
from zero_ext.checkpoint.hf_format import (
    checkpoint_layout,
    keys_save_pretrained_omits,
    to_checkpoint_layout,
)

__all__ = ["checkpoint_tensors", "consolidate", "save_engine_model"]

MODEL_FILE = "model.safetensors"


def _output_path_name(output_path: str) -> str:
    """A directory (existing, or named without the .safetensors suffix) gets model.safetensors
    inside it, the name transformers looks for."""
    output_path = os.path.abspath(output_path)
    if os.path.isdir(output_path) or not str(output_path).endswith(".safetensors"):
        return os.path.join(output_path, MODEL_FILE)
    return output_path


def _torch_file_name(output_path: str) -> bool:
    """save_16bit_model's format: a file name not ending in .safetensors (DeepSpeed's
    `pytorch_model.bin`) gets a torch.save file at that path, as DeepSpeed writes; a
    .safetensors name (zero_ext's default model.safetensors), and a directory, safetensors."""
    return not (output_path.endswith((".safetensors", os.sep)) or os.path.isdir(output_path))


def _output_file(output_path: str, caller: str = "zero_ext.consolidate",
                 file: str | None = None) -> str:
    """`file` (default: _output_path_name), with its directory created, and the temporaries
    of an earlier write of it that was killed (`<file>.tmp.<pid>`, the process gone) removed
    and named."""
    file = file or _output_path_name(output_path)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    for name in ("config.json", os.path.basename(file)):
        removed = remove_stale_temporaries(os.path.join(os.path.dirname(file), name))
        if removed:
            warnings.warn(f"{caller}: removed {removed} from {os.path.dirname(file)}, left by an "
                          f"earlier write of {name} that was killed", stacklevel=3)
    return file


def _write_config(file: str, config) -> None:
    if config is None:
        return
    if hasattr(config, "to_json_string"):
        text = config.to_json_string()
    elif isinstance(config, dict):
        text = json.dumps(config, indent=2, sort_keys=True)
    else:
        raise TypeError(f"zero_ext.consolidate: config must be a transformers config or a "
                        f"dict, got {type(config).__name__}")
    atomic_write_bytes(os.path.join(os.path.dirname(file), "config.json"), text.encode())


def _write_model_config(file: str, model, dtype: torch.dtype | None) -> None:
    """What transformers' save_pretrained writes beside the weights of a model: config.json
    with the model's class as `architectures` and the saved weights' `dtype`, and
    generation_config.json for a model that generates (its end-of-turn tokens and sampling
    settings: without it, a fine-tuned instruct model reloads with its class defaults)."""
    from zero_ext.integrations.peft import is_peft_model

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or is_peft_model(model):
        # (A PEFT model's config is its base's: its class would name no loadable model)
        return _write_config(file, config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    _write_config(file, config)
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        atomic_write_bytes(os.path.join(os.path.dirname(file), "generation_config.json"),
                           generation.to_json_string().encode())


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


_WARNED_GATHER_KEY = False


def _warn_gather_key(engine, file: str) -> None:
    """DeepSpeed's save_16bit_model at stage 3 writes nothing (and returns False) unless
    stage3_gather_16bit_weights_on_model_save is true, because its consolidation holds the whole
    model on rank 0. zero_ext's streams one unit at a time, so it always writes; said once."""
    global _WARNED_GATHER_KEY
    if engine.stage != 3 or engine.rank != 0 or _WARNED_GATHER_KEY or \
            engine.config.zero_optimization.stage3_gather_16bit_weights_on_model_save:
        return
    _WARNED_GATHER_KEY = True
    warnings.warn(f"zero_ext.save_16bit_model: stage3_gather_16bit_weights_on_model_save is "
                  f"false, with which DeepSpeed writes no model at stage 3; zero_ext writes "
                  f"{file} anyway (it gathers one unit at a time, so no rank holds the whole "
                  f"model). Set the key to true to silence this", stacklevel=4)


def save_engine_model(engine, output_path: str, exclude_frozen_parameters: bool = False,
                      writing: bool | None = None) -> str:
    """engine.save_16bit_model: the live engine's full weights in the model's dtype, written by
    the ranks `writing` (default: rank 0 alone), as safetensors streamed one tensor at a time,
    or (_torch_file_name) as DeepSpeed's torch.save'd dict of tensors, which the writing ranks
    hold whole before writing. Collective: stage 3 units are gathered one at a time on every
    rank and only the writing ranks keep each, so for safetensors no rank ever holds more
    than one unit beyond its shards. Returns the file's path."""
    state = engine.module_state_dict(keep_vars=True,
                                     exclude_frozen_parameters=exclude_frozen_parameters)
    torch_file = _torch_file_name(output_path)
    if not torch_file:  # safetensors holds no aliases: a tied weight once, as transformers'
        for key in keys_save_pretrained_omits(engine.module, state):
            del state[key]
    target = os.path.abspath(output_path) if torch_file else _output_path_name(output_path)
    _warn_gather_key(engine, target)
    shapes = _bucket_shapes(engine)  # a released stage-3 parameter has no shape of its own
    units = engine.partitioned.units if engine.partitioned is not None else []
    unit_of = {id(p): position for position, unit in enumerate(units)
               for members in unit.params for p in members}
    keys = sorted(state, key=lambda k: unit_of.get(id(state[k]), len(units)))  # stable
    writing = engine.rank == 0 if writing is None else writing
    # Opened before any gather, and its failure (a file where the folder goes, a dtype the
    # format lacks) raised on every rank together: a writing rank raising alone would leave
    # the others waiting in the gathers.
    file, writer, problem, layout = None, None, None, None
    if writing:
        file, problem = _attempt(_output_file, output_path, "zero_ext.save_16bit_model",
                                 target)
        if problem is None and not torch_file:
            layout = _checkpoint_layout(engine.module, state, keys, unit_of, shapes)
            writer, problem = _attempt(_open_safetensors, file, state, keys, shapes, layout)
    try:
        _raise_together(problem, "save_16bit_model")
    except BaseException:
        if writer is not None:
            writer.__exit__(RuntimeError, None, None)
        raise
    values = _full_values(engine, state, keys, unit_of, writing)
    if not writing:
        problem = _drain(values)
    elif torch_file:
        problem = _write_torch_file(file, state, values)
    else:
        if layout is not None:
            values = _in_layout(engine.module, values, layout)
        problem = _write_safetensors_file(writer, values)
    if writing and problem is None:
        try:
            _write_model_config(file, engine.module, engine.model_dtype)
        except Exception as error:  # noqa: BLE001 - reported to every rank
            problem = f"{type(error).__name__}: {error}"
    _raise_together(problem, "save_16bit_model")
    return target


def _full_values(engine, state: dict, keys: list[str], unit_of: dict[int, int],
                 writing: bool):
    """(key, full value) for `keys` in their order, stage-3 units gathered one at a time on
    every rank (the value None where not `writing`), then the tensors every rank holds."""
    by_unit = {}
    for key in keys:
        by_unit.setdefault(unit_of.get(id(state[key])), []).append(key)
    if engine.partitioned is not None:
        for position, (_, values) in enumerate(
                engine.partitioned.iter_full_values(keep=writing)):
            for key in by_unit.get(position, []):
                yield key, values[state[key]] if writing else None
    for key in by_unit.get(None, []):
        yield key, state[key].detach()


def _drain(values) -> None:
    """A rank that writes nothing still takes part in every gather."""
    for _ in values:
        pass


def _open_safetensors(file: str, state: dict, keys: list[str], shapes: dict,
                      layout: list[tuple[list[str], dict]] | None = None) -> SafetensorsWriter:
    """The safetensors file of `keys` (or of the checkpoint `layout`'s names), its header
    written, open for their values."""
    entries = [(name, *spec) for _, part in layout for name, spec in part.items()] \
        if layout is not None else \
        [(k, state[k].dtype, shapes.get(id(state[k]), tuple(state[k].shape))) for k in keys]
    writer = SafetensorsWriter(file, entries, metadata={"format": "pt"})
    writer.__enter__()
    return writer


def _checkpoint_layout(model, state: dict, keys: list[str], unit_of: dict[int, int],
                       shapes: dict) -> list[tuple[list[str], dict]] | None:
    """For a model transformers stores in another layout than it holds (hf_format): each
    group of `keys` (a stage-3 unit's, then the rest) with the names, dtypes and shapes
    save_pretrained writes for it; None where they are the model's own."""
    groups: list[list[str]] = []
    for key in keys:
        if not groups or unit_of.get(id(state[key])) != unit_of.get(id(state[groups[-1][0]])):
            groups.append([])
        groups[-1].append(key)
    specs = {k: (state[k].dtype, shapes.get(id(state[k]), tuple(state[k].shape))) for k in keys}
    parts = checkpoint_layout(model, specs, groups)
    return None if parts is None else list(zip(groups, parts))


def _in_layout(model, values, layout: list[tuple[list[str], dict]]):
    """`values` ((key, tensor) in key order) converted group by group to the layout's names."""
    values = iter(values)
    for group, part in layout:
        converted = to_checkpoint_layout(model, dict(next(values) for _ in group))
        for name in part:
            yield name, converted[name]


def _write_safetensors_file(writer: SafetensorsWriter, values) -> str | None:
    """Streams `values` into the open `writer`; the gathers go on after a failed write, whose
    error is returned (None when written)."""
    problem = None
    try:
        for key, tensor in values:
            if problem is None:
                try:
                    writer.write(key, tensor)
                except Exception as error:  # noqa: BLE001 - the gathers go on; reported
                    problem = f"{type(error).__name__}: {error}"
    except BaseException:
        writer.__exit__(RuntimeError, None, None)
        raise
    if problem is not None:
        writer.__exit__(RuntimeError, None, None)
        return problem
    try:
        writer.__exit__(None, None, None)
    except Exception as error:  # noqa: BLE001 - reported to every rank
        return f"{type(error).__name__}: {error}"
    return None


def _write_torch_file(file: str, state: dict, values) -> str | None:
    """DeepSpeed's save_16bit_model file: torch.save of {key: tensor} in the module's key
    order, plain CPU tensors each with its own storage (a view of a flat buffer would carry the
    whole buffer along), tied weights one tensor. Returns the write's error, or None."""
    copies, out = {}, {}
    for key, tensor in values:  # every gather first: a failed write must not stop them
        source = id(state[key])
        if source not in copies:
            copies[source] = tensor.detach().to("cpu", copy=True)
        out[key] = copies[source]
    try:
        atomic_torch_save(file, {key: out[key] for key in state})
    except Exception as error:  # noqa: BLE001 - reported to every rank
        return f"{type(error).__name__}: {error}"
    return None


def _checkpoint_path(checkpoint_dir: str, tag: str | None,
                     caller: str = "zero_ext.consolidate") -> str:
    """`checkpoint_dir` itself when it is one checkpoint, else its tag (or `latest`)."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"{caller}: {checkpoint_dir} does not exist")
    if tag is None and looks_like_checkpoint(checkpoint_dir):
        return checkpoint_dir
    resolved = resolve_tag(checkpoint_dir, tag, caller)
    if resolved is None:
        partial = partial_dirs(checkpoint_dir)
        hint = (f"; the only saves found never finished: "
                f"{[os.path.basename(p) for p in partial]}" if partial else "")
        raise CheckpointError(
            f"{caller}: {checkpoint_dir} has no '{LATEST}' file, so there is no "
            f"complete checkpoint to pick{hint}. Pass tag= (--tag) to name one, or check the "
            f"directory")
    path, note = find_checkpoint(checkpoint_dir, resolved)
    if note is not None:
        warnings.warn(f"{caller}: {note}", stacklevel=3)
    return path


def client_state(checkpoint_dir: str, tag: str | None = None,
                 caller: str = "zero_ext.consolidate") -> dict:
    """The client_state save_checkpoint was given, read as data from `checkpoint_dir` (a
    save_dir: its `latest` tag, or `tag`; or one checkpoint), without an engine."""
    from zero_ext.checkpoint.loading import read_engine_state

    index = CheckpointIndex(_checkpoint_path(checkpoint_dir, tag, caller))
    return dict(read_engine_state(index, caller)["client_state"] or {})


def checkpoint_tensors(checkpoint_dir: str, dtype: torch.dtype | None = None, *,
                       tag: str | None = None, exclude_frozen: bool = False,
                       caller: str = "zero_ext.consolidate") -> tuple[CheckpointIndex,
                                                                      list[TensorEntry]]:
    """The checkpoint's index and one lazily read entry per key of the model's state_dict:
    trainable parameters from the fp32 master shards, buffers and frozen parameters as saved
    (cast to `dtype` when given, floating ones only); frozen parameters left out with
    `exclude_frozen`. The keys of tied weights share one `produce`."""
    index = CheckpointIndex(_checkpoint_path(checkpoint_dir, tag, caller))
    model_states = index.reader(MODEL_STATES)
    frozen = set()
    if exclude_frozen:
        if "frozen" not in index.metadata:
            raise CheckpointError(
                f"{caller}: {index.path} does not record which of its entries are frozen "
                "parameters (saved by an older zero_ext), so they cannot be told from buffers; "
                "convert without exclude_frozen_parameters")
        frozen = set(index.metadata["frozen"])
    entries, producers = [], {}
    for key, kind, source in index.metadata["state_dict"]:
        if kind == "param":
            shape = index.params[source].shape
            # Tied weights (one parameter under several keys) share one producer.
            produce = producers.setdefault(
                source, lambda s=source, shape=shape: _cast(index.read("master", s),
                                                            dtype).view(shape))
            entries.append(TensorEntry(key, dtype or torch.float32, shape, produce))
        elif kind == "frozen":  # stage 3's partitioned frozen parameters, in the model dtype
            if key in frozen:
                continue
            shape = index.params[source].shape
            saved_dtype = getattr(torch, index.metadata["model_dtype"])
            produce = producers.setdefault(
                source, lambda s=source, shape=shape, d=saved_dtype:
                    _cast(index.read("frozen", s, dtype=d), dtype).view(shape))
            entries.append(TensorEntry(key, dtype or saved_dtype, shape, produce))
        elif key not in frozen:
            saved_dtype = model_states.dtype(source)
            out_dtype = dtype if dtype is not None and saved_dtype.is_floating_point \
                else saved_dtype
            entries.append(TensorEntry(key, out_dtype, model_states.shape(source),
                                       lambda s=source: _cast(model_states.read(s), dtype)))
    return index, entries


def consolidate(checkpoint_dir: str, output_path: str, dtype: torch.dtype | str | None = None,
                *, tag: str | None = None, config=None) -> str:
    """Writes the full model of a checkpoint as one safetensors file; returns its path.

    checkpoint_dir: a checkpoint (`<save_dir>/<tag>`), or a save_dir (its `latest`, or `tag`).
    output_path:    a `.safetensors` file, or a directory (gets model.safetensors).
    dtype:          None keeps the fp32 master weights (buffers as saved); a floating dtype
                    (torch.bfloat16 or "bf16", ...) casts every floating tensor.
    config:         a transformers config or dict to write as config.json; by default the
                    one saved with the checkpoint, if the model had one.
    """
    dtype = _parse_dtype(dtype)
    index, entries = checkpoint_tensors(checkpoint_dir, dtype, tag=tag)
    omits = set(index.metadata.get("save_pretrained_omits", ()))
    entries = [entry for entry in entries if entry.name not in omits]
    file = _output_file(output_path)
    write_safetensors(file, entries, metadata={"format": "pt"})
    _write_config(file, config if config is not None else index.metadata.get("hf_config"))
    return file


_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"zero_ext.consolidate: dtype {dtype!r} is not one of "
                         f"{sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]
