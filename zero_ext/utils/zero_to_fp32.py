"""DeepSpeed's deepspeed.utils.zero_to_fp32, for zero_ext checkpoints: the full fp32 weights of
a sharded checkpoint (saved at any world size and stage), on any machine, without GPUs or
torch.distributed.

    from zero_ext.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state_dict = get_fp32_state_dict_from_zero_checkpoint("checkpoints")   # its latest tag
    model.load_state_dict(state_dict)

    python -m zero_ext.utils.zero_to_fp32 checkpoints/ out/ [--safe_serialization]
        [--max_shard_size 5GB] [-t TAG] [--exclude_frozen_parameters]

The functions keep DeepSpeed's signatures and defaults: `convert_zero_checkpoint_to_state_dict`
(and its fp32 form `convert_zero_checkpoint_to_fp32_state_dict`) writes `pytorch_model.bin`
(`model.safetensors` with safe_serialization), split into shards of at most max_shard_size with
transformers' index file when larger, every floating tensor in the dtype asked for. In
`get_fp32_state_dict_from_zero_checkpoint`, trainable parameters come from the fp32 master
weights, floating buffers are cast to fp32, frozen parameters stay as saved. Where zero_ext differs
(docs/deepspeed-compat.md): `checkpoint_dir` may also be one checkpoint (`<save_dir>/<tag>`);
shards are written one at a time from the checkpoint, so memory holds one shard, not the
model; `load_state_dict_from_zero_checkpoint` loads strictly (a missing or unexpected key is
an error naming them; DeepSpeed's strict=False would load a mismatched checkpoint without a
word). `python -m zero_ext.consolidate` is the same conversion into one safetensors file with
a transformers config.json beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys

import torch

from zero_ext.checkpoint import CheckpointError
from zero_ext.checkpoint.consolidate import checkpoint_tensors
from zero_ext.checkpoint.files import TensorEntry, atomic_write_bytes, write_safetensors

__all__ = [
    "convert_zero_checkpoint_to_fp32_state_dict",
    "convert_zero_checkpoint_to_state_dict",
    "get_fp32_state_dict_from_zero_checkpoint",
    "load_state_dict_from_zero_checkpoint",
]

CALLER = "zero_ext.utils.zero_to_fp32"
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


class LazyTensor:
    """A checkpoint tensor not read yet (lazy_mode): `.contiguous()` reads it, as DeepSpeed's
    lazy state dict values do; `shape` and `dtype` are known without reading."""

    def __init__(self, entry: TensorEntry):
        self._entry = entry
        self.shape = torch.Size(entry.shape)
        self.dtype = entry.dtype

    def contiguous(self) -> torch.Tensor:
        return self._entry.produce().contiguous()

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


def _entries(checkpoint_dir: str, tag: str | None, exclude_frozen: bool) -> list[TensorEntry]:
    """Every tensor of the state_dict as DeepSpeed's zero_to_fp32 gives it: trainable
    parameters from the fp32 master weights, floating buffers cast to fp32 (its .float()),
    frozen parameters and integer buffers as saved. (A checkpoint that does not record its
    frozen keys has its frozen parameters cast with the buffers.)"""
    index, entries = checkpoint_tensors(checkpoint_dir, tag=tag, exclude_frozen=exclude_frozen,
                                        caller=CALLER)
    frozen = set(index.metadata.get("frozen", []))
    return [entry if entry.name in frozen or entry.dtype == torch.float32
            or not entry.dtype.is_floating_point
            else TensorEntry(entry.name, torch.float32, entry.shape,
                             lambda produce=entry.produce: produce().float())
            for entry in entries]


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir: str, tag: str | None = None,
                                             exclude_frozen_parameters: bool = False,
                                             lazy_mode: bool = False) -> dict:
    """The model's full state_dict from a checkpoint, on the CPU: trainable parameters in fp32
    (the master weights), floating buffers cast to fp32, frozen parameters as saved (left out
    with exclude_frozen_parameters). `checkpoint_dir`: a save_dir (its `latest` tag, or `tag`) or one
    checkpoint. lazy_mode: values are LazyTensor, read by `.contiguous()`."""
    entries = _entries(checkpoint_dir, tag, exclude_frozen_parameters)
    if lazy_mode:
        return {entry.name: LazyTensor(entry) for entry in entries}
    return _materialize(entries)


def _materialize(entries: list[TensorEntry]) -> dict[str, torch.Tensor]:
    """Each entry read once; tied weights' keys get the same tensor, as in the model."""
    read: dict[int, torch.Tensor] = {}
    out = {}
    for entry in entries:
        if id(entry.produce) not in read:
            read[id(entry.produce)] = entry.produce().contiguous()
        out[entry.name] = read[id(entry.produce)]
    return out


def _size_in_bytes(size: int | str) -> int:
    """transformers' sizes: an int (bytes) or digits and a unit ("5GB", "200MiB")."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if match is None:
        raise ValueError(f"{CALLER}: max_shard_size {size!r} is not a size; give bytes or "
                         "digits with a unit, e.g. \"5GB\" or \"500MB\"")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _nbytes(entry: TensorEntry) -> int:
    return torch.Size(entry.shape).numel() * entry.dtype.itemsize


def _split(entries: list[TensorEntry], max_bytes: int | None) -> list[list[TensorEntry]]:
    """Consecutive entries into shards of at most max_bytes (a larger tensor alone in its
    own), as transformers splits a state_dict; the keys of one tied tensor go into the shard
    of its first key and count once."""
    if max_bytes is None:
        return [entries]
    shards: list[list[TensorEntry]] = [[]]
    size, placed = 0, {}
    for entry in entries:
        if id(entry.produce) in placed:
            placed[id(entry.produce)].append(entry)
            continue
        nbytes = _nbytes(entry)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        placed[id(entry.produce)] = shards[-1]
        size += nbytes
    return shards


def _total_size(entries: list[TensorEntry]) -> int:
    """Bytes of the distinct tensors (a tied one once), transformers' index total_size."""
    return sum(_nbytes(e) for e in {id(e.produce): e for e in entries}.values())


def _write_bin(path: str, entries: list[TensorEntry]) -> None:
    """One torch.save'd dict of plain tensors (loads with torch.load(weights_only=True)),
    written to a temporary and renamed."""
    buffer = io.BytesIO()
    torch.save(_materialize(entries), buffer)
    atomic_write_bytes(path, buffer.getbuffer())


# DeepSpeed's names for the output dtypes of convert_zero_checkpoint_to_state_dict.
_OUTPUT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                  "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _output_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype or DeepSpeed's name for one ("bf16", "torch.float16", ...)."""
    resolved = _OUTPUT_DTYPES.get(dtype.lower().removeprefix("torch.")) \
        if isinstance(dtype, str) else dtype
    if resolved not in _OUTPUT_DTYPES.values():
        raise ValueError(f"{CALLER}: output dtype {dtype!r} is not one of "
                         f"{', '.join(sorted(_OUTPUT_DTYPES))} (or their torch dtypes)")
    return resolved


def _cast(entries: list[TensorEntry], dtype: torch.dtype) -> list[TensorEntry]:
    """Every floating tensor in `dtype` (integer ones as they are), as DeepSpeed's
    to_torch_tensor writes them; the keys of one tied tensor keep sharing one cast."""
    cast: dict[int, TensorEntry] = {}
    out = []
    for entry in entries:
        if not entry.dtype.is_floating_point or entry.dtype == dtype:
            out.append(entry)
            continue
        if id(entry.produce) not in cast:
            cast[id(entry.produce)] = TensorEntry(
                entry.name, dtype, entry.shape,
                lambda produce=entry.produce: produce().to(dtype))
        out.append(TensorEntry(entry.name, dtype, entry.shape,
                               cast[id(entry.produce)].produce))
    return out


def convert_zero_checkpoint_to_state_dict(checkpoint_dir: str, output_dir: str,
                                          dtype: torch.dtype | str = torch.float32,
                                          max_shard_size: int | str | None = "5GB",
                                          safe_serialization: bool = False,
                                          tag: str | None = None,
                                          exclude_frozen_parameters: bool = False) -> None:
    """Writes the checkpoint's full state_dict into `output_dir`, every floating tensor in
    `dtype` (float32, float16 or bfloat16, or DeepSpeed's names for them; integer buffers as
    saved): `pytorch_model.bin`, or `model.safetensors` with safe_serialization; above
    max_shard_size (None: never) as `pytorch_model-00001-of-0000N.bin` ... with
    `pytorch_model.bin.index.json` (or the safetensors names), the layout transformers'
    from_pretrained reads."""
    dtype = _output_dtype(dtype)
    entries = _cast(_entries(checkpoint_dir, tag, exclude_frozen_parameters), dtype)
    shards = _split(entries, None if max_shard_size is None else _size_in_bytes(max_shard_size))
    stem, suffix = ("model", ".safetensors") if safe_serialization else ("pytorch_model", ".bin")
    os.makedirs(output_dir, exist_ok=True)
    names = [f"{stem}{suffix}"] if len(shards) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{suffix}" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        path = os.path.join(output_dir, name)
        if safe_serialization:
            write_safetensors(path, shard, metadata={"format": "pt"})
        else:
            _write_bin(path, shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": _total_size(entries)},
                 "weight_map": {e.name: name for name, shard in zip(names, shards)
                                for e in shard}}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(os.path.join(output_dir, f"{stem}{suffix}.index.json"),
                           text.encode())


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir: str, output_dir: str,
                                               max_shard_size: int | str | None = "5GB",
                                               safe_serialization: bool = False,
                                               tag: str | None = None,
                                               exclude_frozen_parameters: bool = False) -> None:
    """convert_zero_checkpoint_to_state_dict in fp32 (frozen 16-bit parameters too, as
    DeepSpeed's)."""
    convert_zero_checkpoint_to_state_dict(
        checkpoint_dir, output_dir, torch.float32, max_shard_size=max_shard_size,
        safe_serialization=safe_serialization, tag=tag,
        exclude_frozen_parameters=exclude_frozen_parameters)


def load_state_dict_from_zero_checkpoint(model: torch.nn.Module, checkpoint_dir: str,
                                         tag: str | None = None) -> torch.nn.Module:
    """Moves `model` to the CPU and loads the checkpoint's fp32 weights into it; returns it.
    Every key must match (the error names the ones that do not). The model is then plain
    PyTorch: to train it with zero_ext again, pass it to zero_ext.initialize anew."""
    state_dict = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{CALLER}: the checkpoint in {checkpoint_dir} does not fit this "
            f"{type(model).__name__}: missing {sorted(missing)[:10]}, unexpected "
            f"{sorted(unexpected)[:10]}; load it into the model it was saved from")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zero_ext.utils.zero_to_fp32",
        description="The full fp32 state_dict of a zero_ext checkpoint (DeepSpeed's "
                    "zero_to_fp32.py).")
    parser.add_argument("checkpoint_dir", help="a save_dir (its 'latest' tag is used) or one "
                                               "checkpoint, e.g. path/global_step12")
    parser.add_argument("output_dir", help="directory for the state_dict file(s)")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="largest shard before splitting (digits and a unit, e.g. 5GB)")
    parser.add_argument("--safe_serialization", action="store_true",
                        help="write safetensors instead of torch.save's pickle format")
    parser.add_argument("-t", "--tag", default=None, help="the tag to read, e.g. global_step1")
    parser.add_argument("--exclude_frozen_parameters", action="store_true",
                        help="leave out parameters that do not train")
    parser.add_argument("-d", "--debug", action="store_true", help="(DeepSpeed's; no effect)")
    args = parser.parse_args(argv)
    try:
        convert_zero_checkpoint_to_fp32_state_dict(
            args.checkpoint_dir, args.output_dir, max_shard_size=args.max_shard_size,
            safe_serialization=args.safe_serialization, tag=args.tag,
            exclude_frozen_parameters=args.exclude_frozen_parameters)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
