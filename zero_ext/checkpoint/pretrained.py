"""engine.load_weights: full model weights from safetensors files, read straight into the shards.

For fine-tuning a model too large to build whole on every rank: build it under zero_ext.Init,
initialize the engine, then load the pretrained weights. Each rank reads, with ranged reads,
only the elements of its own shards (and the whole-kept parameters and buffers), so no process
ever holds the full model. The files are what transformers' save_pretrained writes (one
model.safetensors, or shards listed in model.safetensors.index.json), what consolidation and
save_16bit_model write, or any single safetensors file.
"""

from __future__ import annotations

import json
import os

import torch

from zero_ext.checkpoint.engine_state import (
    _attempt,
    _bucket_shapes,
    _fill_plan,
    _names,
    _raise_together,
    set_value,
)
from zero_ext.checkpoint.files import SafetensorsReader, dtype_problem
from zero_ext.checkpoint.format import CheckpointError
from zero_ext.checkpoint.hf_format import load_conversion

__all__ = ["load_weights"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class _Weights:
    """Tensor name -> the file holding it, for one file or an indexed set."""

    def __init__(self, path: str):
        path = os.path.abspath(path)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, INDEX)):
                with open(os.path.join(path, INDEX)) as f:
                    weight_map = json.load(f)["weight_map"]
                files = {n: os.path.join(path, file) for n, file in weight_map.items()}
            elif os.path.isfile(os.path.join(path, SINGLE)):
                files = None
                path = os.path.join(path, SINGLE)
            else:
                raise CheckpointError(f"zero_ext.load_weights: {path} has neither {SINGLE} nor "
                                      f"{INDEX}; point at a safetensors file or a directory "
                                      f"written by save_pretrained")
        elif not os.path.isfile(path):
            raise CheckpointError(f"zero_ext.load_weights: {path} does not exist")
        else:
            files = None
        self._readers: dict[str, SafetensorsReader] = {}
        if files is None:
            reader = self._reader(path)
            files = dict.fromkeys(reader.names(), path)
        self.files = files

    def _reader(self, file: str) -> SafetensorsReader:
        if file not in self._readers:
            try:
                self._readers[file] = SafetensorsReader(file)
            except (OSError, ValueError) as error:
                raise CheckpointError(f"zero_ext.load_weights: {error}") from None
        return self._readers[file]

    def shape(self, name: str) -> tuple[int, ...]:
        """Its shape, once its dtype is known to be one zero_ext reads (asked of every tensor
        the load reads, before it writes anything)."""
        reader = self._reader(self.files[name])
        try:
            reader.dtype(name)
        except ValueError as error:
            raise CheckpointError(f"zero_ext.load_weights: {error}") from None
        return reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._reader(self.files[name]).dtype(name)

    def read_into(self, kind: str, name: str, start: int, out: torch.Tensor) -> None:
        """`kind` is always the weights themselves ("master": read and cast to fp32)."""
        self._reader(self.files[name]).read_into(name, start, out)

    def read(self, name: str) -> torch.Tensor:
        return self._reader(self.files[name]).read(name)


class _InModelLayout:
    """`_Weights` of files in transformers' checkpoint layout, seen under the model's keys
    (hf_format.LoadConversion): a renamed tensor is read from its file name, a converted one
    is made whole from its group's file tensors and this rank's elements taken from it."""

    def __init__(self, weights: _Weights, conversion):
        self.weights, self.conversion = weights, conversion
        files = {key: weights.files[key] for key in weights.files}
        for model_key, file_key in conversion.renamed.items():
            files[model_key] = files.pop(file_key)
        for model_key in conversion.groups:
            sources = conversion.file_keys(model_key)
            files[model_key] = weights.files[sources[0]]
            for key in sources:
                files.pop(key, None)
        self.files = files

    def _file_key(self, name: str) -> str:
        return self.conversion.renamed.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.conversion.groups:
            for key in self.conversion.file_keys(name):
                self.weights.shape(key)  # its dtype checked
            return self.conversion.specs[name][1]
        return self.weights.shape(self._file_key(name))

    def dtype(self, name: str) -> torch.dtype:
        if name in self.conversion.groups:
            return self.conversion.specs[name][0]
        return self.weights.dtype(self._file_key(name))

    def read_into(self, kind: str, name: str, start: int, out: torch.Tensor) -> None:
        if name in self.conversion.groups:
            whole = self.conversion.converted(name, self.weights.read).reshape(-1)
            out.copy_(whole[start:start + out.numel()].view(out.shape))
        else:
            self.weights.read_into(kind, self._file_key(name), start, out)


@torch.no_grad()
def load_weights(engine, path: str, strict: bool = True) -> list[str]:
    """Collective. Loads `path` into the engine's parameters and fp32 master weights (the
    optimizer's moments are left as they are). Returns the names of file tensors the model did
    not take (an error with strict=True)."""

    def plan_and_check():
        weights = _Weights(path)
        conversion = load_conversion(engine.module, list(weights.files),
                                     lambda k: (weights.dtype(k), weights.shape(k)))
        if conversion is not None:  # save_pretrained's layout, not the model's (MoE experts)
            weights = _InModelLayout(weights, conversion)
        state = engine.module.state_dict(keep_vars=True)
        aliases: dict[int, list[str]] = {}
        for key, value in state.items():
            aliases.setdefault(id(value), []).append(key)

        def in_files(keys: list[str]) -> str:
            # A tied tensor is read under whichever of its names the files have (transformers'
            # save_pretrained writes it once).
            return next((k for k in keys if k in weights.files), keys[0])

        names = [in_files([n, *aliases.get(id(p), [])])
                 for n, p in zip(_names(engine), engine._params)]
        saved = {n: weights.shape(n) for n in set(names) if n in weights.files}
        plan = _fill_plan(engine, saved, names, ("master",), f"zero_ext.load_weights: {path}")
        trainable = {id(p) for p in engine._params}
        # Buffers and frozen parameters, each once (a frozen tied embedding and LM head is one).
        others = list({id(v): (in_files(aliases[id(v)]), v) for v in state.values()
                       if id(v) not in trainable}.values())
        missing = [k for k, _ in others if k not in weights.files]
        unexpected = sorted(set(weights.files) - set(state))
        if missing or (strict and unexpected):
            raise CheckpointError(
                f"zero_ext.load_weights: {path} does not fit the model: buffers and frozen "
                f"parameters missing {missing[:8]}, tensors the model lacks {unexpected[:8]} "
                f"(strict=False loads anyway and returns the latter)")
        shapes = _bucket_shapes(engine)  # stage 3's partitioned frozen ones have none here
        for key, value in others:
            shape = shapes.get(id(value), tuple(value.shape))
            if weights.shape(key) != shape:
                raise CheckpointError(f"zero_ext.load_weights: {key} is {weights.shape(key)} in "
                                      f"{path} and {shape} in the model")
        # Checked before anything is written: trainable tensors are read into fp32 masters.
        targets = [(n, torch.float32) for n in saved] + [(k, v.dtype) for k, v in others]
        for key, dtype in targets:
            problem = dtype_problem(weights.dtype(key), dtype)
            if problem is not None:
                raise CheckpointError(f"zero_ext.load_weights: {key} in {path}: {problem}")
        return weights, plan, others, unexpected

    opened, problem = _attempt(plan_and_check)
    _raise_together(problem, "load_weights")
    weights, plan, others, unexpected = opened
    for target, at, name, a, b, kind in plan:
        weights.read_into(kind, name, a, target[at:at + b - a])
    for key, value in others:
        set_value(engine, value, read_range=lambda first, out, k=key:
                  weights.read_into("master", k, first, out))
    engine._sync_weights_from_master()
    return unexpected
