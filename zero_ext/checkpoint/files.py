"""Checkpoint files on disk: atomic writes, checksums, and a streaming safetensors reader/writer.

Used by the checkpoint save/load code and by consolidation. Every tensor file is safetensors
(an 8-byte little-endian header length, a JSON header of names, dtypes, shapes and byte
offsets, then the raw bytes), so checkpoints hold no pickled code and any safetensors reader
can open them. We write the format ourselves because a shard or a consolidated model must be
produced one tensor at a time: the header is computed from shapes alone, then each tensor is
produced, written, hashed and dropped before the next.

Durability: a file is written under a temporary name, fsynced, renamed over its final name,
and its directory is fsynced, so a crash leaves either the old file or the new one, never a
torn one. Each writer returns the file's size and the SHA-256 of each 64 MiB chunk of it, which
go into the manifest. Chunks, not one digest per file, because SHA-256 runs at about 1 GB/s on
one core: chunks are hashed on a thread pool while the file is written, and verified in
parallel when it is read, so neither waits on a single core hashing a multi-GB shard.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

__all__ = ["CHUNK_BYTES", "FileRecord", "SafetensorsReader", "SafetensorsWriter", "SaveLock",
           "TensorEntry", "atomic_torch_save", "atomic_write_bytes", "chunk_digests",
           "dtype_problem", "fsync_dir", "remove_stale_temporaries", "write_safetensors"]

# The safetensors format's dtype names (safetensors.torch._TYPES, 0.8), for every torch dtype
# that has one and whose elements are whole bytes (its packed F4 counts 4-bit values in the
# shape, torch's float4_e2m1fn_x2 bytes: not written here). float8_e8m0fnu is torch 2.7's.
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    **({torch.float8_e8m0fnu: "F8_E8M0"} if hasattr(torch, "float8_e8m0fnu") else {}),
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
CHUNK_BYTES = 64 << 20  # checksum granularity


@dataclass(frozen=True)
class FileRecord:
    """What the manifest keeps of one written file."""

    bytes: int
    sha256_chunks: tuple[str, ...]   # SHA-256 of each CHUNK_BYTES piece, in order


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for hashing (hashlib releases the GIL on large buffers)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(os.cpu_count() or 1, 16), thread_name_prefix="zero_ext-hash")
    return _POOL


_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _sha256(pieces: list) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


class _ChunkHasher:
    """Cuts a byte stream into CHUNK_BYTES chunks and hashes each on the pool while the stream
    goes on. The pieces are views of the caller's buffers, kept alive until hashed; at most
    `window` chunks wait, which bounds that memory."""

    def __init__(self):
        self._pieces: list = []
        self._filled = 0
        self._futures: list[concurrent.futures.Future] = []
        self._window = threading.BoundedSemaphore(2 * min(os.cpu_count() or 1, 16))

    def update(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            take = min(len(data), CHUNK_BYTES - self._filled)
            self._pieces.append(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == CHUNK_BYTES:
                self._submit()

    def _submit(self) -> None:
        pieces, self._pieces, self._filled = self._pieces, [], 0
        self._window.acquire()
        future = _pool().submit(_sha256, pieces)
        future.add_done_callback(lambda _: self._window.release())
        self._futures.append(future)

    def digests(self) -> tuple[str, ...]:
        if self._pieces or not self._futures:
            self._submit()
        return tuple(f.result() for f in self._futures)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file to be written: its header fields, and how to produce its values
    when its turn comes (so only one tensor is materialized at a time)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def fsync_dir(path: str) -> None:
    """Makes a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: str, path: str) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:  # (a directory in the way, an interrupt): no temporary stays
        _remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def temporary_name(path: str) -> str:
    """`<path>.tmp.<host>.<pid>`: unique among writers on several hosts (the same pid on two
    of them, as containers give), and telling remove_stale_temporaries whose it is."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def _atomic_write(path: str, write) -> None:
    """`write(file)` into a temporary beside `path`, fsynced, then renamed over `path`; the
    temporary removed on any failure."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    _commit(tmp, path)


def atomic_write_bytes(path: str, data: bytes) -> FileRecord:
    _atomic_write(path, lambda f: f.write(data))
    hasher = _ChunkHasher()
    hasher.update(data)
    return FileRecord(len(data), hasher.digests())


def atomic_torch_save(path: str, obj) -> None:
    """torch.save(obj) to `path` as atomic_write_bytes writes, streamed (no second copy of it
    in memory). For files written in DeepSpeed's format (save_16bit_model's
    `pytorch_model.bin`)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str, every: bool = False) -> list[str]:
    """Removes the temporaries (temporary_name; `<path>.tmp.<pid>` from older versions) that a
    writer killed on this machine left behind (its process is gone; a live writer's file, and
    one of another host, whose process cannot be checked from here, are left alone), or, with
    `every` (the caller holds the directory's SaveLock, so no one else writes there), those of
    any writer on any host; returns their names."""
    directory, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):
        return []
    host = socket.gethostname()
    removed = []
    for name in sorted(os.listdir(directory)):
        if not name.startswith(base + ".tmp."):
            continue
        writer, _, pid = name[len(base) + len(".tmp."):].rpartition(".")
        if not pid.isdigit():
            continue
        if every or (writer in ("", host) and not _pid_alive(int(pid))):
            _remove_quietly(os.path.join(directory, name))
            removed.append(name)
    return removed


class SaveLock:
    """An exclusive marker file that one job holds while it saves into a directory, so that a
    second job saving into the same directory (both would rewrite `latest` and may replace
    each other's tags) is refused with the holder's host and process id, rather than the two
    interleaving. Created with O_EXCL (atomic on local and NFSv3+ filesystems). A marker left
    by a process that is gone from this host is taken over, and so is one left by an earlier
    attempt of this torchrun job (the same TORCHELASTIC_RUN_ID, not torchrun's default "none":
    torchrun restarts a job only after stopping all its workers, and the new rank 0 may be on
    another host; zero_ext/elastic.py); one from another host and job cannot be checked from
    here, and the error says how to remove it if that job is gone."""

    def __init__(self, path: str):
        self.path = path
        self.held = False

    def acquire(self, caller: str) -> str | None:
        """Takes the lock; returns a warning to show when a stale lock was taken over.
        Raises RuntimeError when another job holds it."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
              "job": os.environ.get("TORCHELASTIC_RUN_ID")}
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                        and holder["pid"] != me["pid"] and not _pid_alive(holder["pid"]):
                    _remove_quietly(self.path)
                    note = (f"{caller}: took over {self.path}, left by process "
                            f"{holder['pid']} on this host, which is gone (a save it made was "
                            f"interrupted)")
                    continue
                if self._earlier_attempt(holder, me):
                    _remove_quietly(self.path)
                    note = (f"{caller}: took over {self.path}, left by process "
                            f"{holder.get('pid')} on {holder.get('host')}, an earlier attempt "
                            f"of this torchrun job (run id {me['job']}) that torchrun stopped")
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"])) \
                    if isinstance(holder.get("time"), (int, float)) else "an unknown time"
                raise RuntimeError(
                    f"{caller}: another job is saving into {os.path.dirname(self.path)}: "
                    f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                    f"holds {self.path} (since {since}). Two jobs saving into one directory "
                    f"would overwrite each other's checkpoints and 'latest'; give each job its "
                    f"own directory. If that job is no longer running, delete {self.path}")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return note
        raise RuntimeError(f"{caller}: could not take {self.path}")

    @staticmethod
    def _earlier_attempt(holder: dict, me: dict) -> bool:
        """Whether the holder is an earlier attempt of this torchrun job: another process with
        the same run id, one that names a job (torchrun's default "none", which static and
        --master_port launches keep, names none). (Not the restart count: torchrun's agents
        keep their own, a membership change does not raise it, and a replacement node starts
        at 0.)"""
        return me["job"] not in (None, "", "none") and holder.get("job") == me["job"] and \
            (holder.get("host"), holder.get("pid")) != (me["host"], me["pid"])

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            _remove_quietly(self.path)
            self.held = False


def _unwritable(dtype: torch.dtype) -> str:
    """Why a tensor of `dtype` is not written, and what to do instead (the end of a sentence)."""
    if dtype == getattr(torch, "float4_e2m1fn_x2", None):
        return ("zero_ext's safetensors files do not hold (its F4 counts 4-bit values, torch's "
                "shape counts packed bytes); save tensor.view(torch.uint8) and view it back")
    held = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_NAMES)
    fix = ("torch.view_as_real(tensor) holds a complex tensor as real pairs" if dtype.is_complex
           else "convert it to one of them")
    return (f"the safetensors format has no type for (it holds {held}); {fix}, or register a "
            f"buffer that can be recomputed with persistent=False so it is not saved")


def dtype_problem(source: torch.dtype, target: torch.dtype) -> str | None:
    """Why values of `source` cannot be read into a tensor of `target` without losing what
    they are, or None: a complex value read into a real tensor loses its imaginary part (torch's
    copy_ only warns)."""
    if source.is_complex and not target.is_complex:
        return (f"it is {str(source).removeprefix('torch.')} there and "
                f"{str(target).removeprefix('torch.')} here: the imaginary parts would be "
                f"lost")
    return None


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class SafetensorsWriter:
    """Writes a safetensors file atomically, one tensor at a time, in the order announced:

        with SafetensorsWriter(path, [(name, dtype, shape), ...]) as writer:
            writer.write(name, tensor)   # for each, in order
        writer.record                    # FileRecord: size and SHA-256, hashed while writing

    The header is computed from the announced shapes, so no tensor needs to exist before its
    turn. Leaving the block early or with an error removes the temporary file; only a complete
    file is renamed into place."""

    def __init__(self, path: str, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self._specs = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        self._next = 0
        self.record: FileRecord | None = None
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in self._specs:
            if dtype not in _DTYPE_NAMES:
                raise TypeError(f"zero_ext checkpoint: {name} has dtype {dtype}, which "
                                f"{_unwritable(dtype)}")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        self._header = text + b" " * (-len(text) % 8)  # data starts 8-byte aligned
        self._digest = _ChunkHasher()
        self._tmp = temporary_name(path)
        self._file = None

    def __enter__(self) -> SafetensorsWriter:  # noqa: PYI034
        self._file = open(self._tmp, "wb")
        try:
            self._put(struct.pack("<Q", len(self._header)))
            self._put(self._header)
        except BaseException:
            self._file.close()
            _remove_quietly(self._tmp)
            raise
        return self

    def _put(self, data) -> None:
        self._file.write(data)
        self._digest.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise RuntimeError(f"zero_ext checkpoint: {name} was not announced for {self.path}")
        want, dtype, shape = self._specs[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"zero_ext checkpoint: expected {want} {dtype} {shape} next in {self.path}, "
                f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self._put(_as_bytes(tensor))
        self._next += 1

    def __exit__(self, kind, error, trace) -> None:
        failed = kind is not None
        try:
            if not failed and self._next != len(self._specs):
                failed = True
                missing = [n for n, _, _ in self._specs[self._next:]]
                raise RuntimeError(f"zero_ext checkpoint: {self.path} closed before "
                                   f"{missing[:4]} were written")
            if not failed:
                failed = True  # until the data is on disk (a full disk fails the flush)
                self._file.flush()
                os.fsync(self._file.fileno())
                size = self._file.tell()
                failed = False
        finally:
            self._file.close()
            if failed:
                _remove_quietly(self._tmp)
        if kind is not None:
            return
        _commit(self._tmp, self.path)
        self.record = FileRecord(size, self._digest.digests())


def write_safetensors(path: str, entries: Iterable[TensorEntry],
                      metadata: dict[str, str] | None = None) -> FileRecord:
    """Writes `entries` to `path` atomically, producing one tensor at a time."""
    entries = list(entries)
    with SafetensorsWriter(path, [(e.name, e.dtype, e.shape) for e in entries],
                           metadata) as writer:
        for entry in entries:
            writer.write(entry.name, entry.produce())
    return writer.record


def chunk_digests(path: str, chunk_bytes: int = CHUNK_BYTES) -> tuple[str, ...]:
    """The SHA-256 of each `chunk_bytes` piece of a file, computed in parallel."""
    size = os.path.getsize(path)

    def chunk(index: int) -> str:
        with open(path, "rb") as f:
            f.seek(index * chunk_bytes)
            return _sha256([f.read(chunk_bytes)])

    count = max((size + chunk_bytes - 1) // chunk_bytes, 1)
    return tuple(_pool().map(chunk, range(count)))


def _header_problem(header) -> str | None:
    """What breaks the safetensors format's rules in a parsed header, or None: a JSON object,
    each tensor a shape of non-negative integers and a byte range as long as its shape and
    dtype make it, the ranges following one another from the data's first byte. A file without
    checksums (model weights for engine.load_weights) is so refused when opened, before
    anything is written, rather than failing, or reading another tensor's bytes, half way."""
    if not isinstance(header, dict):
        return f"a JSON {type(header).__name__}, not an object"
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            return f"{name!r} has no dtype"
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return f"{name!r} has shape {shape!r}"
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            return f"{name!r} has data_offsets {offsets!r}"
        dtype = _DTYPES.get(entry["dtype"])  # another one is refused only if read (dtype())
        size = None if dtype is None else \
            math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if size is not None and offsets[1] - offsets[0] != size:
            return (f"{name!r} is {entry['dtype']} of shape {shape} ({size} bytes) and its "
                    f"data_offsets span {offsets[1] - offsets[0]} bytes")
        spans.append((offsets[0], offsets[1], name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            return (f"{name!r} starts at byte {start} of the data, where the tensor before it "
                    f"ends at {at}")
        at = end
    return None


class SafetensorsReader:
    """Reads tensors, or element ranges of them, from a safetensors file without loading the
    rest of it."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"zero_ext checkpoint: {path} is not a safetensors file (it is "
                                 f"{len(raw)} bytes long)")
            (length,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if length > size - 8:
                raise ValueError(f"zero_ext checkpoint: {path} is truncated or not a "
                                 f"safetensors file (its header claims {length} bytes)")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"zero_ext checkpoint: the header of {path} is corrupt "
                                 f"({error})") from None
        problem = _header_problem(header)
        if problem is not None:
            raise ValueError(f"zero_ext checkpoint: the header of {path} is corrupt: {problem}")
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + length
        self._entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end != size:
            raise ValueError(f"zero_ext checkpoint: {path} is {size} bytes but its header "
                             f"describes {self._data_start + end}: the file is truncated or "
                             f"was extended")

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        dtype = self._entry(name)["dtype"]
        if dtype not in _DTYPES:
            raise ValueError(f"zero_ext checkpoint: {name!r} in {self.path} has dtype {dtype}, "
                             f"which zero_ext does not read")
        return _DTYPES[dtype]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def _entry(self, name: str) -> dict:
        if name not in self._entries:
            raise KeyError(f"zero_ext checkpoint: {self.path} has no tensor {name!r}")
        return self._entries[name]

    def read(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of tensor `name`, flattened (the whole tensor, in its shape,
        when no range is given)."""
        whole = start == 0 and end is None
        end = math.prod(self.shape(name)) if end is None else end
        out = torch.empty(max(end - start, 0), dtype=self.dtype(name))
        self.read_into(name, start, out)
        return out.view(self.shape(name)) if whole else out

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Fills the 1-D tensor `out` with elements [start, start + out.numel()) of `name`,
        straight from the file when `out` is contiguous host memory of the same dtype (no
        intermediate copy), else through one host buffer (casting, or to a device)."""
        dtype, numel = self.dtype(name), math.prod(self.shape(name))
        entry = self._entry(name)
        end = start + out.numel()
        if not 0 <= start <= end <= numel:
            raise IndexError(f"zero_ext checkpoint: range [{start}, {end}) outside {name!r} "
                             f"({numel} elements) in {self.path}")
        if end == start:
            return
        problem = dtype_problem(dtype, out.dtype)
        if problem is not None:
            raise ValueError(f"zero_ext checkpoint: {name!r} in {self.path} cannot be read: "
                             f"{problem}")
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        buffer = out if direct else torch.empty(end - start, dtype=dtype)
        itemsize = buffer.element_size()
        with open(self.path, "rb") as f:
            f.seek(self._data_start + entry["data_offsets"][0] + start * itemsize)
            view = memoryview(buffer.view(torch.uint8).numpy())
            if f.readinto(view) != len(view):
                raise ValueError(f"zero_ext checkpoint: {self.path} ended inside {name!r}")
        if not direct:
            out.copy_(buffer)
