"""Full model weights as one safetensors file: from a sharded checkpoint, or from a live engine.

`zero_ext.consolidate(checkpoint_dir, output_path, dtype=None)` (also `python -m
zero_ext.consolidate`) reads a checkpoint written by engine.save_checkpoint at any world size
and stage, on any machine, without torch.distributed or a GPU. It streams: the output header
is computed from the metadata, then each tensor is assembled from the shards that hold it,
written and dropped, so memory holds one tensor at a time. `engine.save_16bit_model` uses
`write_model_file` for the live-engine case.

The file carries {"format": "pt"} metadata and, for a transformers model, a config.json beside
it, so `Model.from_pretrained(directory)` loads the result.
"""

from __future__ import annotations

import json
import os

import torch

from zero_ext.checkpoint.files import TensorEntry, atomic_write_bytes, write_safetensors
from zero_ext.checkpoint.format import (
    MODEL_STATES,
    CheckpointIndex,
    looks_like_checkpoint,
    resolve_tag,
)

__all__ = ["consolidate", "write_model_file"]

MODEL_FILE = "model.safetensors"


def _output_file(output_path: str) -> str:
    """A directory (existing, or named without the .safetensors suffix) gets model.safetensors
    inside it, the name transformers looks for."""
    output_path = os.path.abspath(output_path)
    if os.path.isdir(output_path) or not output_path.endswith(".safetensors"):
        os.makedirs(output_path, exist_ok=True)
        return os.path.join(output_path, MODEL_FILE)
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    return output_path


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


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def write_model_file(output_path: str, state: dict[str, torch.Tensor], config=None,
                     dtype: torch.dtype | None = None) -> str:
    """Writes a full state dict (tensors already whole) as one safetensors file."""
    file = _output_file(output_path)
    entries = [TensorEntry(key, _cast(value, dtype).dtype, tuple(value.shape),
                           lambda v=value: _cast(v.detach(), dtype).contiguous())
               for key, value in state.items()]
    write_safetensors(file, entries, metadata={"format": "pt"})
    _write_config(file, config)
    return file


def _checkpoint_path(checkpoint_dir: str, tag: str | None) -> str:
    """`checkpoint_dir` itself when it is one checkpoint, else its tag (or `latest`)."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"zero_ext.consolidate: {checkpoint_dir} does not exist")
    if tag is None and looks_like_checkpoint(checkpoint_dir):
        return checkpoint_dir
    return os.path.join(checkpoint_dir, resolve_tag(checkpoint_dir, tag, "zero_ext.consolidate"))


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
    index = CheckpointIndex(_checkpoint_path(checkpoint_dir, tag))
    model_states = index.reader(MODEL_STATES)
    entries = []
    for key, kind, source in index.metadata["state_dict"]:
        if kind == "param":
            shape = index.params[source].shape
            entries.append(TensorEntry(
                key, dtype or torch.float32, shape,
                lambda s=source, shape=shape: _cast(index.read("master", s), dtype).view(shape)))
        else:
            saved_dtype = model_states.dtype(source)
            out_dtype = dtype if dtype is not None and saved_dtype.is_floating_point \
                else saved_dtype
            entries.append(TensorEntry(key, out_dtype, model_states.shape(source),
                                       lambda s=source: _cast(model_states.read(s), dtype)))
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
