"""The single door to torch.distributed: process-group setup, collectives and traffic counters.

Everything in zero_ext that talks to other ranks calls this module; nothing else imports
torch.distributed's collectives. It picks the collective the backend supports (NCCL, or gloo on
CPU or CUDA tensors) and counts, per collective, the calls and the bytes this rank sends, to
which rank of the group, by the algorithm of the transport the call took (`wire_sends`, the one
accounting; n is the collective's size in bytes, N the group's ranks):

  collective (n: of)        NCCL, shared memory: ring    gloo (torch 2.13's, comm/pairs.py)
  all_reduce (tensor)       2n(N-1)/N to rank + 1        ~2n(N-1)/N to rank - 1: gloo's
                                                         segmented ring, exact (_gloo_ring_bytes)
  reduce_scatter (input)    n(N-1)/N to rank + 1         n/N to each other rank from 1 MiB
                                                         per rank (comm/pairs.py's sends);
                                                         below, and on CUDA tensors, the
                                                         all_reduce's, of the input (gloo
                                                         has no reduce-scatter of its own)
  all_gather (output)       n(N-1)/N to rank + 1         n(N-1)/N to rank + 1 (a ring; from
                                                         1 MiB per rank, of comm/pairs.py's
                                                         sends)
  all_to_all (input)        n/N to each other rank       n/N to each other rank (from 1 MiB
                                                         per peer, comm/pairs.py's sends)
  broadcast (tensor)        n to rank + 1 (pipelined)    n to each child in a binomial tree
                                                         (the root: ceil(log2 N) of them)

On gloo these are the bytes of the tensors themselves. gloo's TCP transport adds 48-byte
preambles per message (gloo/transport/tcp/pair.cc): two from its sender (the send notification,
the data's header), one from its receiver (the receive notification); they are not counted
(4(N-1) messages each way in an all-reduce of up to 2N MiB: 576(N-1) bytes; the all-to-all
and all-gather of comm/pairs.py send one message per 512 KiB segment: 144 bytes each).
benchmarks/gloo_wire.py measures all of it on the sockets (benchmarks/RESULTS.md, "gloo on the
wire"). The shared-memory arena below has no wire: it is counted as the ring collective it
stands in for. NCCL is counted as its ring; a tree or NVLS all-reduce, where NCCL picks one,
moves other amounts, which NCCL does not report.

Each byte is also counted by the link it crosses: within the node, or to a rank on another
node (nodes hold contiguous rank blocks under torchrun; comm/topology.py detects them in
init_distributed). The compressed collectives (comm/compressed.py) issue these collectives on
packed bytes (payload, block scales, indices) under `counted_as`, so the counters show the
bytes that went on the wire under the name of the collective they stand for
("reduce_scatter", "all_gather", "all_reduce"). Not counted: all_gather_object and barrier
(metadata and synchronization, a few hundred bytes) and the debug switch's header checks.

On CPU with every rank on one host (a laptop or one node under torchrun with gloo), the
collectives go through a shared-memory arena instead of gloo's loopback TCP, as DeepSpeed's
CPU backend does: each rank writes its part, one barrier, each rank reads and sums what it
needs. Set ZERO_EXT_CPU_SHM=0 to use gloo's own collectives.

Every collective is recorded and its wait bounded by comm/watch.py: a rank that does not
arrive, a rank that stops, or ranks in different collectives end in CollectiveStallError on
every rank instead of a hang (see docs/architecture.md, "Stall detection").
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import mmap
import os
import pickle
import socket
import struct
import time
import uuid
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zero_ext.comm.pairs import (
    next_tag,
    paired_all_gather,
    paired_all_to_all,
    paired_reduce_scatter,
    worth_pairing,
)
from zero_ext.comm.watch import (
    CollectiveRecord,
    CollectiveWatch,
    current_watch,
    set_stall_timeout,
    watch_for_group,
)

__all__ = [
    "CollectiveTraffic",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "counted_as",
    "init_distributed",
    "rank",
    "reduce_scatter",
    "traffic",
    "wire_sends",
    "world_size",
]


@dataclass
class CollectiveTraffic:
    """Calls, and elements and bytes sent per rank (wire_sends), per collective, since the
    last reset; the bytes also by the link they crossed."""

    calls: dict[str, int] = field(default_factory=dict)
    elements: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)
    intra_node_bytes: dict[str, float] = field(default_factory=dict)  # sent within the node
    inter_node_bytes: dict[str, float] = field(default_factory=dict)  # sent to another node

    def count(self, op: str, numel: int, element_size: int, size: int,
              crosses_nodes: bool = False, transport: str = "ring") -> None:
        """One call of `op` over `numel` elements (all_reduce: the tensor; reduce_scatter: the
        input; all_gather: the output; broadcast: the tensor) on a group of `size` ranks, as
        group rank 0 (the root of a broadcast) sends it over `transport` (wire_sends):
        zero_ext.scaling's step-time model counts its planned collectives so. `crosses_nodes`:
        all of it is inter-node."""
        nbytes = sum(b for _, b in wire_sends(op, numel * element_size, element_size, size, 0,
                                              transport))
        self.record_sends(op, nbytes / element_size, 0.0 if crosses_nodes else nbytes,
                          nbytes if crosses_nodes else 0.0)

    def record_sends(self, op: str, elements: float, intra_node_bytes: float,
                     inter_node_bytes: float) -> None:
        """One call of `op` that sent `elements` elements: these bytes within the node and
        these to other nodes."""
        self.calls[op] = self.calls.get(op, 0) + 1
        self.elements[op] = self.elements.get(op, 0.0) + elements
        self.bytes[op] = self.bytes.get(op, 0.0) + intra_node_bytes + inter_node_bytes
        for link, nbytes in ((self.intra_node_bytes, intra_node_bytes),
                             (self.inter_node_bytes, inter_node_bytes)):
            if nbytes:
                link[op] = link.get(op, 0.0) + nbytes

    def reset(self) -> None:
        for counts in (self.calls, self.elements, self.bytes, self.intra_node_bytes,
                       self.inter_node_bytes):
            counts.clear()

    def snapshot(self) -> CollectiveTraffic:
        return CollectiveTraffic(dict(self.calls), dict(self.elements), dict(self.bytes),
                                 dict(self.intra_node_bytes), dict(self.inter_node_bytes))


@dataclass(frozen=True, eq=False)
class CommGroup:
    """A process group of some of the ranks (comm/topology.py makes them): pass it as
    `group=` to a collective."""

    ranks: tuple[int, ...]   # global ranks, ascending; index in it = rank in the group
    handle: object           # the torch.distributed ProcessGroup

    @property
    def size(self) -> int:
        return len(self.ranks)


def new_groups(blocks: list[list[int]]) -> CommGroup:
    """Collective (every rank, the same `blocks`): one process group per block of global
    ranks; returns the one holding this rank."""
    blocks = [sorted(b) for b in blocks]
    mine, _ = dist.new_subgroups_by_enumeration(blocks)
    return CommGroup(tuple(next(b for b in blocks if rank() in b)), mine)


_node_of_rank: tuple[int, ...] | None = None


def set_node_of_rank(nodes: tuple[int, ...]) -> None:
    """Called by comm/topology.py: the node of each rank, for the link-class counters."""
    global _node_of_rank
    _node_of_rank = tuple(nodes)


def _other_node(group: CommGroup | None) -> list[bool]:
    """For each rank of `group` (None: every rank), in group order, whether it is on another
    node than this rank. Before a topology is detected (or after the world size changed)
    every rank counts as on one node."""
    ranks = group.ranks if group is not None else tuple(range(world_size()))
    nodes = _node_of_rank
    if nodes is None or len(nodes) != world_size():
        return [False] * len(ranks)
    return [nodes[r] != nodes[rank()] for r in ranks]


traffic = CollectiveTraffic()
_count_label: str | None = None


@contextlib.contextmanager
def counted_as(op: str):
    """The collectives issued inside count under `op` (and name it in the watch's records):
    comm/compressed.py moves a quantized reduce-scatter as an all-to-all of packed bytes, and
    its bytes on the wire belong to "reduce_scatter" so that compressed and plain reductions
    compare directly in `traffic`."""
    global _count_label
    previous, _count_label = _count_label, op
    try:
        yield
    finally:
        _count_label = previous


def _count(op: str, transport: str, nbytes: int, element_size: int,
           group: CommGroup | None = None, root: int = 0) -> str:
    """Counts one collective of `nbytes` over `group` (None: every rank) as `transport` moves
    it (wire_sends), each byte on the link to the rank it goes to; returns the name the watch
    records it under."""
    ranks = group.ranks if group is not None else tuple(range(world_size()))
    sends = wire_sends(op, nbytes, element_size, len(ranks), ranks.index(rank()), transport,
                       root)
    remote = _other_node(group)
    inter = float(sum(b for peer, b in sends if remote[peer]))
    total = float(sum(b for _, b in sends))
    traffic.record_sends(_count_label or op, total / element_size, total - inter, inter)
    return op if _count_label is None else f"{op}[{_count_label}]"


def _transport(arena: _SharedMemoryArena | None, tensor: torch.Tensor) -> str:
    """The accounting of a collective about to run: the ring's on the arena and NCCL; on gloo,
    its algorithms and comm/pairs.py's ("gloo": CPU tensors), or its algorithms alone
    ("gloo-device": CUDA tensors, which gloo's sends and receives do not take)."""
    if arena is not None or backend() != "gloo":
        return "ring"
    return "gloo" if tensor.device.type == "cpu" else "gloo-device"


_RING_FACTOR = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0, "all_to_all": 1.0}


def ring_elements(op: str, numel: int, size: int) -> float:
    """Elements one rank sends for `op` over `numel` elements among `size` ranks, in the
    bandwidth-optimal ring sense (broadcast: n, pipelined; nothing on one rank)."""
    if size == 1:
        return 0.0
    if op == "broadcast":
        return float(numel)
    return _RING_FACTOR[op] * numel * (size - 1) / size


# gloo's AllreduceOptions::kMaxSegmentSize (gloo/allreduce.h), which torch leaves as it is.
GLOO_MAX_SEGMENT_BYTES = 1 << 20


def wire_sends(op: str, nbytes: int, element_size: int, size: int, me: int,
               transport: str, root: int = 0) -> list[tuple[int, float]]:
    """(group rank, bytes) for each rank that rank `me` of a `size`-rank group sends to in one
    `op` over `nbytes` (see the module's table for what n is of): the one accounting of every
    counter. `transport` "ring" (NCCL, the shared-memory arena, scaling's model), "gloo" (CPU
    tensors on torch 2.13's ProcessGroupGloo: gloo/allreduce.cc's ring, allgather.cc,
    alltoall.cc, broadcast.cc, and comm/pairs.py's reduce-scatter from 1 MiB per rank;
    measured by benchmarks/gloo_wire.py) or "gloo-device" (CUDA tensors on gloo: its own
    algorithms throughout). Nothing on one rank."""
    if size == 1 or nbytes == 0:
        return []
    after, before = (me + 1) % size, (me - 1) % size
    # Chunk j to rank j: the all-to-all everywhere, comm/pairs.py's reduce-scatter on gloo.
    if op == "all_to_all" or (op == "reduce_scatter" and
                              _pairs_reduce_scatter(transport, nbytes // size)):
        return [(peer, nbytes / size) for peer in range(size) if peer != me]
    if transport == "ring":
        return [(after, ring_elements(op, nbytes, size))]
    if transport not in ("gloo", "gloo-device"):
        raise ValueError(f"zero_ext.comm.wire_sends: transport {transport!r} is not one of "
                         "'ring', 'gloo', 'gloo-device'")
    if op in ("all_reduce", "reduce_scatter"):
        return [(before, float(_gloo_ring_bytes(nbytes, element_size, size, me)))]
    if op == "all_gather":
        return [(after, nbytes * (size - 1) / size)]
    if op == "broadcast":
        virtual = (me - root) % size  # the root is 0 in gloo's tree
        children = [virtual + (1 << i) for i in range((size - 1).bit_length())
                    if virtual < (1 << i) and virtual + (1 << i) < size]
        return [((child + root) % size, float(nbytes)) for child in children]
    raise ValueError(f"zero_ext.comm.wire_sends: unknown collective {op!r}")


def _pairs_reduce_scatter(transport: str, peer_bytes: int) -> bool:
    """Whether a reduce-scatter sending `peer_bytes` to each peer on `transport` (_transport's)
    is comm/pairs.py's: the one rule, for running it and for counting it."""
    return transport == "gloo" and worth_pairing(peer_bytes)


def _gloo_ring_bytes(nbytes: int, element_size: int, size: int, me: int) -> int:
    """What rank `me` sends in gloo's ring all-reduce of `nbytes` (gloo/allreduce.cc, ring()):
    the buffer cut into a multiple of `size` segments, at least 2 per rank and at most
    GLOO_MAX_SEGMENT_BYTES each (rounded up to whole elements, so the last ones are short or
    empty); the reduce-scatter phase sends the segments from (me + 1) * per_rank on, the
    all-gather phase those from me * per_rank on, numSegments - per_rank of each, all to
    rank me - 1. So 2n(N-1)/N, give or take the short segments, which fall on some ranks."""
    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    max_segment = element_size * max(1, GLOO_MAX_SEGMENT_BYTES // element_size)
    segments = ceil_div(max(ceil_div(nbytes, max_segment), 2 * size), size) * size
    per_rank = segments // size
    segment = ceil_div(ceil_div(nbytes, segments), element_size) * element_size

    def phase(first: int) -> int:
        offsets = (((first + i) % segments) * segment for i in range(segments - per_rank))
        return sum(max(0, min(segment, nbytes - offset)) for offset in offsets)

    return phase((me + 1) * per_rank) + phase(me * per_rank)


# torch 2.13 renamed the flat-tensor collectives; older releases only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LAUNCH_HINT = ("launch with `torchrun --nproc_per_node=<ranks per node> your_script.py` (it "
                "sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), or run "
                "`python your_script.py` with none of them set for a single rank")


def _use_local_rank_device() -> None:
    """A process group the user started: like DeepSpeed's engine, put this rank on its
    LOCAL_RANK's GPU, so a script that called init_process_group("nccl") without
    torch.cuda.set_device does not run every rank of a node on GPU 0 (NCCL then fails with
    "Duplicate GPU detected" or hangs). The device the group is bound to
    (init_process_group(device_id=...)) wins; a device the user set (not 0) is kept, as is 0
    where LOCAL_RANK names no visible GPU (one GPU per process, CUDA_VISIBLE_DEVICES)."""
    if not torch.cuda.is_available():
        return
    bound = getattr(dist.group.WORLD, "bound_device_id", None)
    if bound is not None:
        torch.cuda.set_device(bound)
        return
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or torch.cuda.current_device() != 0:
        return
    if 0 < int(local_rank) < torch.cuda.device_count():
        torch.cuda.set_device(int(local_rank))


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0,
                     stall_timeout_s: float | None = None) -> None:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT), unless
    the user already initialised one; where an MPI launcher or srun started the process
    instead, the group their variables describe (comm/launchers.py). Without any of them it
    starts a one-rank group, so a plain `python train.py` works. Backend: NCCL when CUDA is available, else gloo.
    `stall_timeout_s` (config key zero_ext.stall_timeout_s) bounds how long a collective may
    make no progress before every rank raises CollectiveStallError (see comm/watch.py); the
    watch starts here, so a rank that never issues a collective still reports where it is."""
    global _group_used
    _group_used = True
    if stall_timeout_s is not None:
        set_stall_timeout(stall_timeout_s)
    if dist.is_initialized():
        _use_local_rank_device()
        if world_size() > 1:
            watch_for_group()
        _detect_topology()
        return
    if "RANK" not in os.environ:  # started by an MPI launcher or srun: their variables
        from zero_ext.comm.launchers import fill_from_launcher

        fill_from_launcher(_LAUNCH_HINT)
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if present and len(present) < len(_TORCHRUN_VARS):
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        raise RuntimeError(f"zero_ext: {', '.join(present)} set but {', '.join(missing)} "
                           f"missing, so this process cannot find the others; {_LAUNCH_HINT}")
    if not present:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > 1:
            print(f"[zero_ext] running as a single rank on 1 of {gpus} visible GPUs; to use "
                  f"all of them, launch with `torchrun --nproc_per_node={gpus} ...`", flush=True)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if gpus == 0:
            raise RuntimeError(
                "zero_ext: the NCCL backend needs CUDA GPUs and this process sees none "
                f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); on CPU use gloo "
                "(the default when no GPU is visible), or install a CUDA build of torch")
        if local_rank >= gpus:
            raise RuntimeError(
                f"zero_ext: LOCAL_RANK is {local_rank} but this node has {gpus} visible GPU(s); "
                f"NCCL needs one GPU per rank: pass --nproc_per_node={gpus} (or fewer) to "
                "torchrun")
        torch.cuda.set_device(local_rank)
    elif backend != "gloo":
        raise ValueError(f"zero_ext: backend {backend!r} is not supported; use 'nccl' (GPUs) "
                         "or 'gloo' (CPU)")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if world_size() > 1:
        watch_for_group()
    _detect_topology()


def _detect_topology() -> None:
    """Every rank's node (comm/topology.py; one small collective), read again at each
    initialize: the traffic counters split bytes by it and stage 3 builds its groups on it."""
    from zero_ext.comm.topology import detect_topology  # it builds on this module

    detect_topology()


@atexit.register
def _destroy_at_exit() -> None:
    """At interpreter exit, while Python is still whole, the process group goes (the watch's
    heartbeat first). Left to interpreter finalization, gloo's worker threads can outlive what
    they use, and the process ends in SIGABRT, "terminate called without an active exception"
    (pytorch/pytorch#65231, #190489), after the script itself ended well or with an exception.
    Not while a collective is pending or the group aborted (a failed job): destroying would
    wait for peers that will not come."""
    if dist.is_initialized():
        watch = current_watch()
        if watch is not None:
            if watch.abort_report is not None or watch.completed < watch.seq:
                return
            watch.stop()
        dist.destroy_process_group()
    if _group_used:
        _settle_gloo_workers()


_group_used = False  # init_distributed ran: this process had a process group

# Long enough for a worker that waits for the GIL to take it and finish (microseconds).
_SETTLE_S = 0.05


def _settle_gloo_workers() -> None:
    """A gloo worker thread drops its reference to a finished collective after the waiting
    thread has returned; when that was the last reference, it frees the collective's tensors,
    which takes the GIL. If the interpreter has begun to finalize by then (a script that ends
    right after its last collective, even after destroy_process_group), taking the GIL ends
    the thread inside C++ and the process aborts: "terminate called without an active
    exception", SIGABRT, after a run that went well (torch's race, not the script's). Here,
    while Python is still whole: collect the cycles that keep groups alive (an engine's), so
    that their destructors join the workers; then give the GIL away for a moment so that a
    worker of a group still referenced finishes its release."""
    gc.collect()
    time.sleep(_SETTLE_S)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def _gloo_on_cpu(tensor: torch.Tensor) -> bool:
    """gloo with CPU tensors: its all-to-all and all-gather of a MiB or more per peer run as
    sends and receives in segments (comm/pairs.py), which use both directions of a link at
    once; below that, its list-of-chunks all-gather beats the flat-tensor form (measured on 2
    ranks, 3.7M fp32 elements: 11 ms against 13 ms)."""
    return tensor.device.type == "cpu" and backend() == "gloo"


class _SharedMemoryArena:
    """A /dev/shm mapping every rank of a single-host CPU group shares for its collectives.

    Layout: two halves (alternated per collective, so a rank may start the next collective
    while a slower rank still reads the previous one: only one barrier per piece), each with
    one slot of SLOT_BYTES per rank. Larger tensors move in pieces of one slot. Sums run in a
    fixed rank order in fp32 (or fp64 for fp64), so every rank computes bitwise-identical
    results. After the data, per half and rank, a header of (sequence number, fingerprint) of
    the collective the rank wrote the piece for: each rank compares all headers after the
    barrier, so ranks in different collectives of equal size (which would exchange garbage
    without hanging) raise instead.
    """

    SLOT_BYTES = 8 << 20
    _HEADER = struct.Struct("<qq")

    def __init__(self, size: int, rank: int):
        self.size, self.rank = size, rank
        self.half = 0
        self._data_bytes = 2 * size * self.SLOT_BYTES
        nbytes = self._data_bytes + 2 * size * self._HEADER.size
        path = None
        if rank == 0:
            path = f"/dev/shm/zero_ext_{uuid.uuid4().hex}"
            with open(path, "wb") as f:
                f.truncate(nbytes)
        path = all_gather_object(path)[0]
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), nbytes)
        barrier()
        if rank == 0:
            os.unlink(path)  # the mappings stay valid; nothing is left behind on exit
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)[:self._data_bytes]
        self._headers = struct.Struct(f"<{2 * size}q")

    def _slots(self, dtype: torch.dtype) -> torch.Tensor:
        """[size, slot elements] view of the current half, in `dtype`."""
        base = self.half * self.size * self.SLOT_BYTES
        half = self.buffer[base:base + self.size * self.SLOT_BYTES]
        return half.view(dtype).view(self.size, -1)

    def _flip(self, watch: CollectiveWatch, record: CollectiveRecord) -> None:
        """The barrier after each rank wrote its piece, with the header check."""
        base = self._data_bytes + self.half * self.size * self._HEADER.size
        self._HEADER.pack_into(self._map, base + self.rank * self._HEADER.size, record.seq,
                               record.fingerprint)
        watch.wait(dist.barrier(async_op=True), record)
        headers = self._headers.unpack_from(self._map, base)
        if any(headers[2 * r] != record.seq or headers[2 * r + 1] != record.fingerprint
               for r in range(self.size)):
            watch.mismatch(record, [headers[2 * r:2 * r + 2] for r in range(self.size)])
        self.half ^= 1

    def _piece(self, dtype: torch.dtype) -> int:
        return self.SLOT_BYTES // torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, watch, record) -> None:
        n, out = input.numel(), output.view(self.size, -1)
        src = input.reshape(-1)
        piece = self._piece(input.dtype)
        for lo in range(0, n, piece):
            hi = min(lo + piece, n)
            slots = self._slots(input.dtype)
            slots[self.rank, :hi - lo].copy_(src[lo:hi])
            self._flip(watch, record)
            out[:, lo:hi].copy_(slots[:, :hi - lo])

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, watch, record) -> None:
        n = output.numel()
        chunks = input.reshape(self.size, n)
        piece = self._piece(input.dtype) // self.size
        for lo in range(0, n, piece):
            hi = min(lo + piece, n)
            slots = self._slots(input.dtype)
            mine = slots[self.rank, :self.size * (hi - lo)].view(self.size, hi - lo)
            mine.copy_(chunks[:, lo:hi])
            self._flip(watch, record)
            parts = slots[:, :self.size * (hi - lo)].view(self.size, self.size, hi - lo)
            total = parts[:, self.rank].to(self._sum_dtype(input.dtype)).sum(dim=0)
            output.reshape(-1)[lo:hi].copy_(total)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, watch, record) -> None:
        n = input.numel() // self.size
        chunks, out = input.view(self.size, n), output.view(self.size, n)
        piece = self._piece(input.dtype) // self.size
        for lo in range(0, n, piece):
            hi = min(lo + piece, n)
            slots = self._slots(input.dtype)
            slots[self.rank, :self.size * (hi - lo)].view(self.size, hi - lo).copy_(
                chunks[:, lo:hi])
            self._flip(watch, record)
            parts = slots[:, :self.size * (hi - lo)].view(self.size, self.size, hi - lo)
            out[:, lo:hi].copy_(parts[:, self.rank])

    def all_reduce(self, tensor: torch.Tensor, watch, record) -> None:
        flat = tensor.reshape(-1)
        n, piece = flat.numel(), self._piece(tensor.dtype)
        for lo in range(0, n, piece):
            hi = min(lo + piece, n)
            slots = self._slots(tensor.dtype)
            slots[self.rank, :hi - lo].copy_(flat[lo:hi])
            self._flip(watch, record)
            flat[lo:hi].copy_(slots[:, :hi - lo].to(self._sum_dtype(tensor.dtype)).sum(dim=0))


_arena: _SharedMemoryArena | None = None
_arena_group: weakref.ref | None = None  # the process group the arena was decided for (weakly)


def _shared_memory_arena(tensor: torch.Tensor,
                         reduces: bool = True) -> _SharedMemoryArena | None:
    """The arena when this collective can use one: contiguous CPU tensors (floating point when
    the collective `reduces`: the arena sums in fp32; any dtype, packed bytes included, when
    it only moves data), gloo, every rank on this host, not disabled by ZERO_EXT_CPU_SHM=0.
    Decided once per process, on the first collective (which every rank issues), so all ranks
    agree."""
    global _arena, _arena_group
    group = dist.group.WORLD
    if _arena_group is None or _arena_group() is not group:
        # Before looking at the tensor: every rank reaches this on the same collective call.
        # A new process group (destroyed and re-created) decides afresh.
        _arena, _arena_group = None, weakref.ref(group)
        if backend() == "gloo":
            hosts = all_gather_object(socket.gethostname())
            wanted = os.environ.get("ZERO_EXT_CPU_SHM", "1") != "0"
            enabled = all_gather_object(wanted and os.path.isdir("/dev/shm"))
            if len(set(hosts)) == 1 and all(enabled):
                _arena = _SharedMemoryArena(world_size(), rank())
    if (tensor.device.type != "cpu" or not tensor.is_contiguous()
            or (reduces and not tensor.is_floating_point())):
        return None
    return _arena


class WatchedWork:
    """The handle of an asynchronous collective: wait() is bounded by the stall timeout."""

    __slots__ = ("_record", "_then", "_watch", "_work")

    def __init__(self, watch: CollectiveWatch, work, record: CollectiveRecord, then=None):
        self._watch, self._work, self._record, self._then = watch, work, record, then

    def wait(self, timeout=None) -> bool:
        self._watch.wait(self._work, self._record)
        if self._then is not None:
            self._then()
            self._then = None
        return True

    def is_completed(self) -> bool:
        return self._work.is_completed()


def _pair_args(watch: CollectiveWatch, record: CollectiveRecord, group: CommGroup | None,
               size: int) -> tuple:
    """(this rank's index in `group`, its size, its handle, the collective's tag) for the
    paired collectives of comm/pairs.py."""
    what = f"{record.numel}|{record.dtype}"
    if group is None:
        return rank(), size, None, next_tag(watch, None, what)
    return group.ranks.index(rank()), size, group.handle, next_tag(watch, group.ranks, what)


def _enter(in_arena: bool, *what) -> tuple[CollectiveWatch, CollectiveRecord]:
    """The record of a collective about to be issued (`what`: CollectiveWatch.enter's
    arguments). Under the debug switch ZERO_EXT_CHECK_COLLECTIVES=1, a collective outside the
    arena (whose barrier checks headers anyway) is first compared across ranks: see _verify."""
    watch = watch_for_group()
    record = watch.enter(*what)
    if watch.verify and not in_arena:
        _verify(watch, record)
    return watch, record


def _verify(watch: CollectiveWatch, record: CollectiveRecord) -> None:
    """Every rank's (sequence number, fingerprint), all-gathered and compared before the
    collective itself: a mismatch raises here on every rank, before gloo meets collectives of
    different sizes (which aborts the process inside gloo) or of equal sizes (garbage until the
    heartbeats' running hashes disagree, within a heartbeat period). Doubles the latency of
    small collectives, hence a debug switch, like TORCH_DISTRIBUTED_DEBUG=DETAIL."""
    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" \
        else torch.device("cpu")
    mine = torch.tensor([record.seq, record.fingerprint], dtype=torch.int64, device=device)
    everyone = torch.empty(2 * world_size(), dtype=torch.int64, device=device)
    watch.wait(dist.all_gather(list(everyone.chunk(world_size())), mine, async_op=True), record)
    headers = [tuple(pair) for pair in everyone.view(-1, 2).tolist()]
    if any(pair != (record.seq, record.fingerprint) for pair in headers):
        watch.mismatch(record, headers)


def _issued(watch: CollectiveWatch, record: CollectiveRecord, work, async_op: bool,
            then=None):
    """A collective started with async_op=True: its handle when the caller asked for one,
    else waited for here (bounded). `then` runs once the wait returned."""
    handle = WatchedWork(watch, work, record, then)
    if async_op:
        return handle
    handle.wait()
    return None


def _entered(name: str, arena, counted: torch.Tensor, bucket: int | None,
             group: CommGroup | None = None) -> tuple[CollectiveWatch, CollectiveRecord]:
    """Counts collective `name` by the tensor it is counted by (`counted`: see _count) on the
    transport it takes, and records it with the watch. A group's collective is told apart from
    the world's of the same size by its name, which is the same on every rank (each rank's
    group holds other ranks)."""
    op = _count(name, _transport(arena, counted), counted.numel() * counted.element_size(),
                counted.element_size(), group)
    if group is not None:
        op = f"{op}[group of {group.size}]"
    return _enter(arena is not None, op, counted.numel(), counted.dtype, bucket)


def _on_one_rank(name: str, output: torch.Tensor, input: torch.Tensor,
                 group: CommGroup | None = None) -> None:
    """A collective over one rank: nothing on the wire (counted as such), `input` copied."""
    _count(name, "ring", 0, input.element_size(), group)
    if output.data_ptr() != input.data_ptr():
        output.copy_(input)


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, async_op: bool = False,
               bucket: int | None = None):
    """Sum (or `op`) of `tensor` over ranks, in place. `bucket` names the bucket layout the
    collective moves, so a rank reducing another bucket at the same point is caught."""
    if world_size() == 1:
        _count("all_reduce", "ring", 0, tensor.element_size())
        return None
    arena = _shared_memory_arena(tensor) if op == dist.ReduceOp.SUM else None
    watch, record = _entered("all_reduce", arena, tensor, bucket)
    if arena is not None:
        arena.all_reduce(tensor, watch, record)
        return None
    return _issued(watch, record, dist.all_reduce(tensor, op=op, async_op=True), async_op)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, async_op: bool = False,
                   bucket: int | None = None):
    """Sum `input` (world_size * output.numel() elements) across ranks; this rank receives
    chunk `rank` of the sum in `output`."""
    if input.numel() != output.numel() * world_size():
        raise ValueError(f"zero_ext.comm.reduce_scatter: input has {input.numel()} elements, "
                         f"expected output ({output.numel()}) x world size ({world_size()})")
    if world_size() == 1:
        _on_one_rank("reduce_scatter", output, input)
        return None
    arena = _shared_memory_arena(input)
    if arena is not None and not output.is_contiguous():
        arena = None
    watch, record = _entered("reduce_scatter", arena, input, bucket)
    if arena is not None:
        arena.reduce_scatter(output, input, watch, record)
        return None
    if _pairs_reduce_scatter(_transport(None, input), output.numel() * output.element_size()):
        work = paired_reduce_scatter(output, input.contiguous(),
                                     *_pair_args(watch, record, None, world_size()))
        return _issued(watch, record, work, async_op)
    if backend() == "gloo":
        # gloo's reduce_scatter (both forms) is an all_reduce of a copy whose handle ignores
        # wait()'s timeout (a LambdaWork): a rank would wait for a frozen node forever. The
        # same all_reduce issued here keeps the wait bounded (measured as fast, bitwise equal);
        # the copy of this rank's chunk follows it.
        summed = input.clone()
        chunk = summed.chunk(world_size())[rank()].view_as(output)
        return _issued(watch, record, dist.all_reduce(summed, async_op=True), async_op,
                       then=lambda: output.copy_(chunk))
    return _issued(watch, record, _reduce_scatter_flat(output, input, async_op=True), async_op)


def all_gather(output: torch.Tensor, input: torch.Tensor, async_op: bool = False,
               bucket: int | None = None, group: CommGroup | None = None):
    """Concatenate every rank's `input` into `output` (rank order), over every rank or over
    `group` (comm/topology.py's groups; its ranks in order). `input` may be this rank's chunk
    of `output` itself (in place)."""
    if group is not None and group.size == world_size():
        group = None  # every rank, in order: the world's own path (the arena where it exists)
    size = group.size if group is not None else world_size()
    if output.numel() != input.numel() * size:
        raise ValueError(f"zero_ext.comm.all_gather: output has {output.numel()} elements, "
                         f"expected input ({input.numel()}) x group size ({size})")
    if size == 1:
        _on_one_rank("all_gather", output, input, group)
        return None
    arena = _shared_memory_arena(output, reduces=False)
    if arena is not None and (group is not None or not input.is_contiguous()):
        arena = None
    watch, record = _entered("all_gather", arena, output, bucket, group)
    if arena is not None:
        arena.all_gather(output, input, watch, record)
        return None
    handle = group.handle if group is not None else None
    if _gloo_on_cpu(output) and output.is_contiguous() and \
            worth_pairing(input.numel() * input.element_size()):
        work = paired_all_gather(output, input, *_pair_args(watch, record, group, size))
    elif _gloo_on_cpu(output):
        work = dist.all_gather(list(output.chunk(size)), input, group=handle, async_op=True)
    else:
        work = _all_gather_flat(output, input, group=handle, async_op=True)
    return _issued(watch, record, work, async_op)


def all_to_all(output: torch.Tensor, input: torch.Tensor, *, group: CommGroup | None = None,
               async_op: bool = False, bucket: int | None = None):
    """Chunk j of `input` goes to rank j of `group` (None: every rank); chunk i of `output`
    comes from rank i. Both 1-D, contiguous, of the same numel, divisible by the group size;
    any dtype (comm/compressed.py moves packed uint8 rows). Counted by the bytes it sends:
    chunk j's to rank j, within or across nodes; nothing for this rank's own chunk (copied).
    On gloo with CPU tensors of a MiB or more per peer, sends and receives in segments, every
    pair's at once (comm/pairs.py: gloo's all_to_all_single often used one direction of a link
    at a time); their handle, gloo's and NCCL's honour wait()'s timeout, so the watch bounds
    them directly."""
    if group is not None and group.size == world_size():
        group = None
    size = group.size if group is not None else world_size()
    if (input.dim() != 1 or output.dim() != 1 or input.numel() != output.numel()
            or input.numel() % size or not input.is_contiguous()
            or not output.is_contiguous() or input.dtype != output.dtype):
        raise ValueError(
            f"zero_ext.comm.all_to_all: input and output must be 1-D contiguous tensors of one "
            f"dtype and the same numel, divisible by the group size ({size}); got input "
            f"{tuple(input.shape)} {input.dtype}, output {tuple(output.shape)} {output.dtype}")
    if size == 1:
        _on_one_rank("all_to_all", output, input, group)
        return None
    arena = _shared_memory_arena(input, reduces=False) if group is None else None
    watch, record = _entered("all_to_all", arena, input, bucket, group)
    if arena is not None:
        arena.all_to_all(output, input, watch, record)
        return None
    handle = group.handle if group is not None else None
    if _gloo_on_cpu(input) and worth_pairing(input.numel() * input.element_size() // size):
        work = paired_all_to_all(output, input, *_pair_args(watch, record, group, size))
    else:
        work = dist.all_to_all_single(output, input, group=handle, async_op=True)
    return _issued(watch, record, work, async_op)


# The dtypes both gloo and NCCL broadcast; others (uint16, uint32, float8, complex) travel as
# their bytes: a broadcast copies bits, so the byte view is exact (gloo refused uint16 with
# "Invalid scalar type", which failed initialize for a model with such a buffer).
_BROADCAST_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16,
                               torch.int8, torch.uint8, torch.int32, torch.int64})


def broadcast(tensor: torch.Tensor, src: int = 0, async_op: bool = False,
              bucket: int | None = None):
    if world_size() == 1:
        _count("broadcast", "ring", 0, tensor.element_size())
        return None
    if tensor.dtype not in _BROADCAST_DTYPES and tensor.numel() > 0:
        if not tensor.is_contiguous():
            if async_op:
                raise ValueError("zero_ext.comm.broadcast: an asynchronous broadcast of a "
                                 f"non-contiguous {tensor.dtype} tensor; make it contiguous")
            staged = tensor.contiguous()
            broadcast(staged, src, bucket=bucket)
            tensor.copy_(staged)
            return None
        tensor = tensor.view(-1).view(torch.uint8)
    name = _count("broadcast", _transport(None, tensor), tensor.numel() * tensor.element_size(),
                  tensor.element_size(), None, src)
    watch, record = _enter(False, name, tensor.numel(), tensor.dtype, bucket, src)
    return _issued(watch, record, dist.broadcast(tensor, src=src, async_op=True), async_op)


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (pickled; for small metadata, not tensors). Two
    all-gathers (sizes, then bytes) under one sequence number, each bounded like the rest."""
    if world_size() == 1:
        return [obj]
    watch, record = _enter(False, "all_gather_object", -1, "bytes")
    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" \
        else torch.device("cpu")
    data = pickle.dumps(obj)
    sizes = torch.zeros(world_size(), dtype=torch.int64, device=device)
    mine = torch.tensor([len(data)], dtype=torch.int64, device=device)
    watch.wait(dist.all_gather(list(sizes.chunk(world_size())), mine, async_op=True), record)
    lengths = sizes.tolist()
    longest = max(lengths)
    payload = torch.zeros(longest, dtype=torch.uint8, device=device)
    payload[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    everyone = torch.empty(world_size() * longest, dtype=torch.uint8, device=device)
    watch.wait(dist.all_gather(list(everyone.chunk(world_size())), payload, async_op=True),
               record)
    rows = everyone.cpu().view(world_size(), longest)
    return [pickle.loads(rows[r, :n].numpy().tobytes()) for r, n in enumerate(lengths)]


def barrier() -> None:
    if world_size() > 1:
        watch, record = _enter(False, "barrier", 0, "none")
        watch.wait(dist.barrier(async_op=True), record)
