"""The checkpoint directory: its files, its manifest, and reading parameters back from shards.

Shared by save/load (zero_ext/checkpoint/engine_state.py) and consolidation
(zero_ext/checkpoint/consolidate.py); neither needs the world size the checkpoint was written
at. One checkpoint is a directory `<save_dir>/<tag>/`:

    metadata.json                     layout of every bucket, parameter names/shapes, counters,
                                      loss scale, config (rank 0)
    engine_state.pt                   LR scheduler, optimizer hyperparameters, client_state,
                                      a replicated (stage 0) torch optimizer's state (rank 0)
    model_states.safetensors          buffers and frozen parameters, whole (rank 0)
    zero_shard_<r>_of_<N>.safetensors rank r's slice of every bucket: fp32 master weights,
                                      exp_avg, exp_avg_sq; its RNG states (every rank)
    manifest.json                     every file's size and SHA-256, written last (rank 0)

and `<save_dir>/latest` names the newest complete tag. Rank r's slice of a bucket of
padded_numel elements is [r*S, (r+1)*S) with S = padded_numel / N, at every stage (stage 0
ranks hold the whole bucket and each writes its slice), so a parameter's elements are found
from its bucket offset alone: that is what makes loading at another world size or stage a
matter of index arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass

import torch

from zero_ext.checkpoint.files import SafetensorsReader, chunk_digests, fsync_dir

__all__ = [
    "ENGINE_STATE",
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "METADATA",
    "MODEL_STATES",
    "PARTIAL_SUFFIX",
    "REPLACED_SUFFIX",
    "SAVE_LOCK",
    "VERSION",
    "CheckpointError",
    "CheckpointIndex",
    "find_checkpoint",
    "publish",
    "recover_interrupted_replace",
    "resolve_tag",
    "shard_file_name",
    "tag_problem",
]

FORMAT = "zero_ext.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.json"
ENGINE_STATE = "engine_state.pt"
MODEL_STATES = "model_states.safetensors"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"  # the old copy of a tag while a re-save replaces it
SAVE_LOCK = ".zero_ext_save.lock"  # held by the job saving into a save_dir
KINDS = ("master", "exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


def shard_file_name(rank: int, world_size: int) -> str:
    return f"zero_shard_{rank:05d}_of_{world_size:05d}.safetensors"


def partial_dirs(save_dir: str) -> list[str]:
    """Directories of saves that never finished (a crash or a kill while writing)."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(os.path.join(save_dir, d) for d in os.listdir(save_dir)
                  if d.endswith(PARTIAL_SUFFIX) and os.path.isdir(os.path.join(save_dir, d)))


def looks_like_checkpoint(path: str) -> bool:
    """A checkpoint directory (complete or not), as opposed to a save_dir holding them."""
    return os.path.isdir(path) and any(looks_like_checkpoint_file(name)
                                       for name in os.listdir(path))


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one file or directory name inside a directory, or None: never a
    path, so neither a `latest` file, a manifest nor an argument can point a load or a save
    outside the directory it was given."""
    if name in ("", ".", ".."):
        return f"{name!r} is not a directory name"
    if "/" in name or "\\" in name or os.sep in name or "\0" in name or os.path.isabs(name):
        return f"{name!r} is a path, not a directory name (it would leave the save directory)"
    if name.endswith((PARTIAL_SUFFIX, REPLACED_SUFFIX)) or name in (LATEST, SAVE_LOCK):
        return f"{name!r} is a name zero_ext uses for its own files"
    return None


def tag_problem(tag: str) -> str | None:
    """Why `tag` cannot name a checkpoint directory inside a save_dir, or None."""
    problem = name_problem(tag)
    if problem is None and looks_like_checkpoint_file(tag):
        # the save_dir would look like a checkpoint itself, and `latest` be refused
        problem = f"{tag!r} is a name zero_ext uses for its own files"
    if problem is None and tag != tag.strip():
        # `latest` is read back stripped: the tag would be saved and never found again
        problem = f"{tag!r} begins or ends with white space"
    return problem


def looks_like_checkpoint_file(name: str) -> bool:
    """A file name inside a checkpoint directory (which looks_like_checkpoint goes by)."""
    return name in (MANIFEST, METADATA) or name.startswith("zero_shard_")


def resolve_tag(load_dir: str, tag: str | None, caller: str = "zero_ext.load_checkpoint") \
        -> str | None:
    """The tag to load: `tag`, or the one `<load_dir>/latest` names; None when `tag` is None
    and there is no `latest` (nothing was ever saved there: DeepSpeed's load returns
    (None, None) then, and scripts start fresh on that)."""
    if os.path.exists(load_dir) and not os.path.isdir(load_dir):
        raise CheckpointError(f"{caller}: {load_dir} is a file, not a directory; pass the "
                              f"directory checkpoints were saved into")
    if tag is None:
        if looks_like_checkpoint(load_dir):
            parent, name = os.path.split(os.path.abspath(load_dir).rstrip(os.sep))
            raise CheckpointError(
                f"{caller}: {load_dir} is itself a checkpoint (a tag directory), not the "
                f"directory checkpoints are saved into; pass the parent directory {parent} "
                f"and tag={name!r}")
        latest = os.path.join(load_dir, LATEST)
        if not os.path.isfile(latest):
            return None
        with open(latest, "rb") as f:
            raw = f.read(4096)
        try:
            tag = raw.decode().strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{caller}: {latest} is not text ({raw[:32]!r}); it should "
                                  f"name a tag. Fix or delete it, or pass tag=") from None
        if not tag:
            raise CheckpointError(
                f"{caller}: {latest} is empty; it should name the newest complete tag. Write "
                f"the tag's name into it, delete it to start fresh, or pass tag=")
        where = f"{latest} names"
    else:
        tag = str(tag)
        where = "tag"
    problem = tag_problem(tag)
    if problem is not None:
        raise CheckpointError(f"{caller}: {where} {problem}; a checkpoint is loaded only from "
                              f"a directory directly inside {load_dir}. Pass tag= with the "
                              f"name of one")
    return tag


def has_manifest(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def find_checkpoint(save_dir: str, tag: str) -> tuple[str, str | None]:
    """The complete copy of `tag` to load, and a note when it is not `<save_dir>/<tag>`.

    Re-saving an existing tag renames the old copy to `<tag>.replaced`, then the new one from
    `<tag>.partial` (complete once its manifest is in) to `<tag>`. A crash between the two
    renames leaves no `<tag>`, but both copies complete: the new one is taken (it is what the
    save was publishing), else the old one."""
    path = os.path.join(save_dir, tag)
    if os.path.exists(path):
        return path, None
    for suffix, which in ((PARTIAL_SUFFIX, "the new copy"), (REPLACED_SUFFIX, "the old copy")):
        if has_manifest(path + suffix):
            return path + suffix, (
                f"the save of {path} stopped before renaming its files into place (between "
                f"its two renames when it replaced an earlier copy); {which} "
                f"({path + suffix}), which is complete, is loaded. The next save of this tag "
                f"puts it back in place")
    return path, None


def recover_interrupted_replace(save_dir: str, tag: str) -> None:
    """Before a save of `tag`: finishes what an interrupted re-save of it left (see
    find_checkpoint), so `<tag>` is a complete copy again, and drops the other copies."""
    path = os.path.join(save_dir, tag)
    partial, replaced = path + PARTIAL_SUFFIX, path + REPLACED_SUFFIX
    if not os.path.exists(path):
        for candidate in (partial, replaced):
            if has_manifest(candidate):
                os.replace(candidate, path)
                break
    # Only now, with <tag> complete (or never saved), may the other copies go.
    for leftover in (replaced, partial):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)


def publish(save_dir: str, staging: str, tag: str) -> str:
    """Renames the complete `staging` (its manifest written) to `<save_dir>/<tag>`. At every
    instant one complete copy of the tag exists where find_checkpoint looks: an existing
    `<tag>` is renamed aside, the new copy renamed in, and only then the old one removed."""
    final = os.path.join(save_dir, tag)
    if os.path.isdir(final):
        old = final + REPLACED_SUFFIX
        if os.path.isdir(old):
            shutil.rmtree(old)
        os.replace(final, old)
        fsync_dir(save_dir)
        os.replace(staging, final)
        fsync_dir(save_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
        fsync_dir(save_dir)
    return final


def _check_manifest(manifest, manifest_path: str) -> None:
    """The manifest's structure, checked before any of it is used, so that an edited or foreign
    file is refused with what is wrong rather than a TypeError or KeyError."""
    def bad(what: str):
        return CheckpointError(f"zero_ext checkpoint: {manifest_path} is malformed: {what}. It "
                               f"was edited or not written by zero_ext; restore it or load "
                               f"another tag")

    if not isinstance(manifest, dict):
        raise bad(f"it holds a {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"zero_ext checkpoint: {manifest_path} is not a zero_ext "
                              f"manifest (format {manifest.get('format')!r})")
    version = manifest.get("version")
    if type(version) is not int:
        raise bad(f"'version' is {version!r} ({type(version).__name__}), expected an integer")
    if version > VERSION:
        raise CheckpointError(
            f"zero_ext checkpoint {os.path.dirname(manifest_path)} has format version {version}; "
            f"this zero_ext reads up to version {VERSION}. Upgrade zero_ext to load it")
    chunk = manifest.get("chunk_bytes")
    if type(chunk) is not int or chunk <= 0:
        raise bad(f"'chunk_bytes' is {chunk!r}, expected a positive integer")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad("it has no 'files' object listing the checkpoint's files" if files is None
                  else f"'files' is a {type(files).__name__}, expected an object")
    for name, record in files.items():
        if name_problem(name) is not None or name == MANIFEST:
            raise bad(f"it lists {name!r}, which is not a file name inside the checkpoint")
        if not isinstance(record, dict) or type(record.get("bytes")) is not int or \
                not isinstance(record.get("sha256_chunks"), list):
            raise bad(f"the record of {name} is not {{'bytes': int, 'sha256_chunks': [...]}}")


@dataclass(frozen=True)
class _ParamPlace:
    layout: int    # bucket index in the checkpoint's metadata
    offset: int    # first element in the bucket
    shape: tuple[int, ...]


class CheckpointIndex:
    """A complete checkpoint directory, validated against its manifest, with reads of any
    element range of any parameter's master weights or moments, from whichever shards hold it.

    Opening checks that every file the manifest lists is present with its recorded size (cheap:
    one stat each) and that metadata.json matches its checksums. A shard's checksums are
    verified (in parallel, chunk by chunk) before it is first read; `verify_files` does it up
    front for a list."""

    def __init__(self, path: str):
        self.path = path
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            partial = path.rstrip("/") + PARTIAL_SUFFIX
            if os.path.exists(path):
                raise CheckpointError(f"zero_ext checkpoint {path} is a file, not a checkpoint "
                                      f"directory; pass the directory a checkpoint was saved "
                                      f"into and its tag")
            if os.path.isdir(partial):
                raise CheckpointError(
                    f"zero_ext checkpoint {path} is incomplete: its save never finished (the "
                    f"files written so far are in {partial}, with no manifest). Load an earlier "
                    f"tag (the '{LATEST}' file names the newest complete one)")
            raise CheckpointError(f"zero_ext checkpoint {path} does not exist")
        if not os.path.isfile(manifest_path):
            raise CheckpointError(
                f"zero_ext checkpoint {path} has no {MANIFEST}: it is incomplete (the manifest "
                f"is written last, after every file) or was damaged. It cannot be verified, so "
                f"it is not loaded; load an earlier tag")
        try:
            with open(manifest_path) as f:
                self.manifest = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"zero_ext checkpoint: {manifest_path} is corrupt "
                                  f"({error})") from None
        _check_manifest(self.manifest, manifest_path)
        self.files: dict[str, dict] = self.manifest["files"]
        problems = []
        for name, record in self.files.items():
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                problems.append(f"{name} is missing")
            elif os.path.getsize(file) != record["bytes"]:
                problems.append(f"{name} is {os.path.getsize(file)} bytes, the manifest "
                                f"recorded {record['bytes']} (truncated or overwritten)")
        if problems:
            raise CheckpointError(f"zero_ext checkpoint {path} is damaged: "
                                  + "; ".join(problems))
        self._verified: set[str] = set()
        self.verify_files([METADATA])
        with open(os.path.join(path, METADATA)) as f:
            self.metadata = json.load(f)
        self.world_size: int = self.metadata["world_size"]
        self.layouts: list[dict] = self.metadata["layouts"]
        # Stage 3's frozen buckets (model-dtype "<index>.frozen" shards), absent before them.
        self.frozen_layouts: list[dict] = self.metadata.get("frozen_layouts", [])
        self._layout_at = {layout["index"]: layout
                           for layout in self.layouts + self.frozen_layouts}
        self.params: dict[str, _ParamPlace] = {}
        for layout in self.layouts + self.frozen_layouts:
            for name, offset, shape in layout["slots"]:
                self.params[name] = _ParamPlace(layout["index"], offset, tuple(shape))
        self._readers: dict[str, SafetensorsReader] = {}

    def verify_files(self, names: list[str]) -> None:
        """Checks the SHA-256 of each named file against the manifest (once per file)."""
        for name in names:
            if name in self._verified:
                continue
            if name not in self.files:
                raise CheckpointError(f"zero_ext checkpoint {self.path}: {name} is not in its "
                                      f"manifest")
            chunk = self.manifest["chunk_bytes"]
            got = chunk_digests(os.path.join(self.path, name), chunk)
            want = tuple(self.files[name]["sha256_chunks"])
            bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
            if bad or len(got) != len(want):
                first = bad[0] if bad else min(len(got), len(want))
                raise CheckpointError(
                    f"zero_ext checkpoint {self.path}: {name} fails its checksum (SHA-256 of "
                    f"bytes {first * chunk}..{(first + 1) * chunk} differs from the "
                    f"manifest's): the file is corrupt. Restore it or load an earlier tag")
            self._verified.add(name)

    def reader(self, name: str) -> SafetensorsReader:
        self.verify_files([name])
        if name not in self._readers:
            try:
                self._readers[name] = SafetensorsReader(os.path.join(self.path, name))
            except ValueError as error:
                raise CheckpointError(str(error)) from None
        return self._readers[name]

    def numel(self, name: str) -> int:
        return math.prod(self.params[name].shape)

    def pieces(self, name: str, start: int, end: int) -> list[tuple[str, str, int, int]]:
        """Where elements [start, end) of parameter `name` live: (shard file, tensor name
        without its kind, first, last+1 element in that tensor), in element order."""
        place = self.params[name]
        layout = self._layout_at[place.layout]
        shard = layout["padded_numel"] // self.world_size
        lo, hi = place.offset + start, place.offset + end
        out = []
        if hi <= lo:
            return out
        for rank in range(lo // shard, (hi - 1) // shard + 1):
            a, b = max(lo, rank * shard), min(hi, (rank + 1) * shard)
            out.append((shard_file_name(rank, self.world_size), str(layout["index"]),
                        a - rank * shard, b - rank * shard))
        return out

    def read(self, kind: str, name: str, start: int = 0, end: int | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Elements [start, end) of parameter `name`'s `kind` (master, exp_avg, exp_avg_sq;
        "frozen" for stage 3's frozen parameters, saved in the model's dtype), flattened, in
        `dtype`."""
        end = self.numel(name) if end is None else end
        out = torch.empty(max(end - start, 0), dtype=dtype)
        self.read_into(kind, name, start, out)
        return out

    def read_into(self, kind: str, name: str, start: int, out: torch.Tensor) -> None:
        """Fills the 1-D `out` with elements [start, start + out.numel()) of parameter `name`'s
        `kind`, piece by piece from the shards that hold them."""
        at = 0
        for file, tensor, a, b in self.pieces(name, start, start + out.numel()):
            self.reader(file).read_into(f"{tensor}.{kind}", a, out[at:at + b - a])
            at += b - a
