"""Full model weights as one safetensors file: from a sharded checkpoint, or from a live engine.

`zero_ext.consolidate(checkpoint_dir, output_path, dtype=None)` (also `python -m
zero_ext.consolidate`) reads a checkpoint written by engine.save_checkpoint at any world size
and stage, on any machine, without torch.distributed or a GPU. It streams: the output header
is computed from the metadata, then each tensor is assembled from the shards that hold it,
written and dropped, so memory holds one tensor at a time. `engine.save_16bit_model` is
`save_engine_model`, which streams the same way from a live engine.

The file carries {"format": "pt"} metadata and, for a transformers model, a config.json beside
it, so `Model.from_pretrained(directory)` loads the result.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from zero_ext.checkpoint.engine_state import _bucket_shapes, _frozen_keys, _raise_together
from zero_ext.checkpoint.files import (
    SafetensorsWriter,
    TensorEntry,
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

__all__ = ["checkpoint_tensors", "consolidate", "save_engine_model"]

MODEL_FILE = "model.safetensors"


def _output_path_name(output_path: str) -> str:
    """A directory (existing, or named without the .safetensors suffix) gets model.safetensors
    inside it, the name transformers looks for."""
    output_path = os.path.abspath(output_path)
    if os.path.isdir(output_path) or not str(output_path).endswith(".safetensors"):
        return os.path.join(output_path, MODEL_FILE)
    return output_path


def _output_file(output_path: str, caller: str = "zero_ext.consolidate") -> str:
    """_output_path_name, with its directory created, and the temporaries of an earlier write
    of it that was killed (`<file>.tmp.<pid>`, the process gone) removed and named."""
    file = _output_path_name(output_path)
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
    the ranks `writing` (default: rank 0 alone). Collective: stage 3 units are gathered one at
    a time on every rank and only the writing ranks keep each, so no rank ever holds more than
    one unit beyond its shards."""
    state = engine.module.state_dict(keep_vars=True)
    if exclude_frozen_parameters:
        for key in _frozen_keys(engine):
            del state[key]
    _warn_gather_key(engine, _output_path_name(output_path))
    shapes = _bucket_shapes(engine)  # a released stage-3 parameter has no shape of its own
    units = engine.partitioned.units if engine.partitioned is not None else []
    unit_of = {id(p): position for position, unit in enumerate(units)
               for members in unit.params for p in members}
    keys = sorted(state, key=lambda k: unit_of.get(id(state[k]), len(units)))  # stable
    writing = engine.rank == 0 if writing is None else writing
    file = _output_file(output_path, "zero_ext.save_16bit_model") if writing else None
    writer = SafetensorsWriter(
        file, [(k, state[k].dtype, shapes.get(id(state[k]), tuple(state[k].shape)))
               for k in keys], metadata={"format": "pt"}) if writing else None
    problem = None

    def put(key: str, tensor: torch.Tensor) -> None:
        nonlocal problem
        if writer is not None and problem is None:
            try:
                writer.write(key, tensor)
            except Exception as error:  # noqa: BLE001 - the gathers go on; reported below
                problem = f"{type(error).__name__}: {error}"

    if writer is not None:
        writer.__enter__()
    try:
        by_unit = {}
        for key in keys:
            by_unit.setdefault(unit_of.get(id(state[key])), []).append(key)
        if engine.partitioned is not None:
            for position, (_, values) in enumerate(
                    engine.partitioned.iter_full_values(keep=writing)):
                for key in by_unit.get(position, []):
                    put(key, values[state[key]] if writing else None)
        for key in by_unit.get(None, []):
            put(key, state[key].detach())
    except BaseException:
        if writer is not None:
            writer.__exit__(RuntimeError, None, None)
        raise
    if writer is not None:
        if problem is not None:
            writer.__exit__(RuntimeError, None, None)
        else:
            try:
                writer.__exit__(None, None, None)
                _write_model_config(file, engine.module, engine.model_dtype)
            except Exception as error:  # noqa: BLE001 - reported to every rank
                problem = f"{type(error).__name__}: {error}"
    _raise_together(problem, "save_16bit_model")
    return file if writing else _output_path_name(output_path)


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
