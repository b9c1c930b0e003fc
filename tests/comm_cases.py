"""What each rank runs in the comm tests: every collective on uneven sizes and float dtypes,
and comm's counters beside the bytes this rank's sockets really sent."""

import contextlib
import os

import tcp_bytes
import torch

from zero_ext import comm


def odd_broadcast_input(rank: int, dtype: torch.dtype) -> torch.Tensor:
    return ((torch.arange(24).view(4, 6) + rank) % 7).to(dtype)


def collectives() -> dict:
    """Results of each collective, and comm's traffic counters, on this rank."""
    size, rank = comm.world_size(), comm.rank()
    # Small arena slots, so the sizes below cross several pieces of the shared-memory path.
    comm._SharedMemoryArena.SLOT_BYTES = 4096
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for n in (1, 7, 1000, 4099):
            gen = torch.Generator().manual_seed(rank * 1000 + n)
            x = torch.randn(n * size, generator=gen).to(dtype)
            reduced = x.clone()
            comm.all_reduce(reduced)
            shard = torch.empty(n, dtype=dtype)
            comm.reduce_scatter(shard, x)
            gathered = torch.empty(n * size, dtype=dtype)
            comm.all_gather(gathered, x[rank * n:(rank + 1) * n])
            out[(str(dtype), n)] = {"input": x, "all_reduce": reduced, "reduce_scatter": shard,
                                    "all_gather": gathered}
    # Broadcasts of dtypes gloo has no type for (a model's uint16 / float8 buffers), also
    # non-contiguous: every rank gets the source's very bits.
    odd = {}
    for dtype in (torch.uint16, torch.uint32, torch.float8_e4m3fn, torch.bool,
                  torch.complex64):
        mine = odd_broadcast_input(rank, dtype)
        target = mine.t()  # a non-contiguous view, broadcast into in place
        comm.broadcast(target, src=size - 1)
        odd[str(dtype)] = mine.view(torch.uint8).clone()
    out["odd_broadcasts"] = odd
    comm.traffic.reset()
    comm.all_reduce(torch.zeros(10))
    comm.reduce_scatter(torch.zeros(10), torch.zeros(10 * size))
    comm.all_gather(torch.zeros(10 * size), torch.zeros(10))
    out["traffic"] = comm.traffic.snapshot()
    out["arena"] = comm._shared_memory_arena(torch.zeros(1)) is not None
    return out


@contextlib.contextmanager
def _on_nodes(node_of_rank: list[int]):
    """torchrun's variables as on these nodes (contiguous rank blocks), the topology detected
    again; as they were, and detected again, after."""
    environment = {k: os.environ.get(k) for k in ("GROUP_RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK")}
    rank = comm.rank()
    node = node_of_rank[rank]
    members = [r for r, n in enumerate(node_of_rank) if n == node]
    os.environ.update(GROUP_RANK=str(node), LOCAL_WORLD_SIZE=str(len(members)),
                      LOCAL_RANK=str(members.index(rank)))
    comm.detect_topology()
    try:
        yield
    finally:
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        comm.detect_topology()


def all_to_alls() -> dict:
    """all_to_all on uneven chunk sizes, byte and float dtypes (sync and async), and its
    counters with the ranks split over simulated nodes: the last rank alone on node 1."""
    size, rank = comm.world_size(), comm.rank()
    comm._SharedMemoryArena.SLOT_BYTES = 4096
    out = {}
    for dtype in (torch.uint8, torch.float32, torch.bfloat16):
        for n in (1, 7, 3001):
            gen = torch.Generator().manual_seed(rank * 7919 + n)
            if dtype == torch.uint8:
                x = torch.randint(0, 256, (n * size,), generator=gen, dtype=torch.uint8)
            else:
                x = torch.randn(n * size, generator=gen).to(dtype)
            y, y_async = torch.empty_like(x), torch.full_like(x, 3)
            comm.all_to_all(y, x)
            handle = comm.all_to_all(y_async, x, async_op=True)  # None: done (the arena)
            if handle is not None:
                handle.wait()
            out[(str(dtype), n)] = {"input": x, "output": y, "output_async": y_async}
    with _on_nodes([0] * (size - 1) + [1]):
        comm.traffic.reset()
        comm.all_to_all(torch.empty(10 * size, dtype=torch.bfloat16),
                        torch.zeros(10 * size, dtype=torch.bfloat16))
        comm.all_to_all(torch.empty(3 * size, dtype=torch.uint8),
                        torch.zeros(3 * size, dtype=torch.uint8))
        out["traffic"] = comm.traffic.snapshot()
    return out


# Elements per collective for the counters against arithmetic: tiny, uneven, a few segments of
# gloo's ring; and for the all-reduce and reduce-scatter (whose segments depend on the size)
# 2.7M fp32 elements (10.8 MB): more than 2 segments of 1 MiB per rank.
COUNTED_NUMELS = (1, 7, 1000, 4099)
SEGMENTED_NUMEL = 2_700_001
# Bytes per collective measured on the sockets: large beside gloo's framing, small enough that
# every message leaves the socket before the collective returns (loopback's windows hold it).
MEASURED_BYTES = 24576


def _one_call(op: str, numel: int, dtype: torch.dtype, root: int = 0):
    """Runs `op` once on `numel` elements (reduce_scatter: its input; all_gather: its output;
    rounded up to the world size where the collective needs it)."""
    size = comm.world_size()
    if op in ("reduce_scatter", "all_gather", "all_to_all"):
        numel = -(-numel // size) * size
    full = torch.ones(numel, dtype=dtype)
    part = torch.ones(numel // size, dtype=dtype)
    if op == "all_reduce":
        comm.all_reduce(full)
    elif op == "reduce_scatter":
        comm.reduce_scatter(part, full)
    elif op == "all_gather":
        comm.all_gather(full, part)
    elif op == "all_to_all":
        comm.all_to_all(torch.empty_like(full), full)
    else:
        comm.broadcast(full, root)
    return numel


def wire() -> dict:
    """Over gloo's own collectives (the arena off): comm's counters for each collective at
    COUNTED_NUMELS (fp32, bf16; broadcast from every root) and SEGMENTED_NUMEL, and at
    MEASURED_BYTES what this
    rank's sockets sent, by the rank at the other end, beside the counters. Then the link
    classes with the last rank alone on node 1."""
    size = comm.world_size()
    ops = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast")
    out = {"counted": {}, "measured": {}}
    cases = [(op, root, dtype, numel) for op in ops
             for root in (range(size) if op == "broadcast" else [0])
             for dtype in (torch.float32, torch.bfloat16) for numel in COUNTED_NUMELS]
    cases += [(op, 0, torch.float32, SEGMENTED_NUMEL) for op in ("all_reduce", "reduce_scatter")]
    for op, root, dtype, numel in cases:
        comm.traffic.reset()
        done = _one_call(op, numel, dtype, root)
        out["counted"][(op, root, str(dtype), done)] = comm.traffic.snapshot()
    for op in ops:  # every pair connected before the sockets are listed
        _one_call(op, MEASURED_BYTES // 4, torch.float32)
    addresses = comm.all_gather_object(tcp_bytes.local_addresses())
    for op in ops:
        for root in (range(size) if op == "broadcast" else [0]):
            comm.barrier()
            comm.traffic.reset()
            before = tcp_bytes.sent_by_socket()
            _one_call(op, MEASURED_BYTES // 4, torch.float32, root)
            sent = tcp_bytes.by_rank(tcp_bytes.sent_since(before), addresses)
            out["measured"][(op, root)] = (sent, comm.traffic.snapshot())
    out["links"] = {}
    with _on_nodes([0] * (size - 1) + [1]):
        for op in ops:
            comm.traffic.reset()
            _one_call(op, 1200, torch.float32)
            out["links"][op] = comm.traffic.snapshot()
    return out


def paired() -> dict:
    """Over gloo, where all-to-all, all-gather and reduce-scatter of a MiB or more per peer are
    sends and receives in segments (zero_ext/comm/pairs.py): chunks of several segments and a
    short last one, in four dtypes (the reduce-scatter in the floating ones, and in fp32 of
    random values); then three all-gathers, an all-to-all and a reduce-scatter of equal sizes
    in flight at once, waited for in reverse order (each must keep its own messages)."""
    from zero_ext.comm import pairs

    size, rank = comm.world_size(), comm.rank()
    out = {}
    for dtype in (torch.uint8, torch.bfloat16, torch.float16, torch.float32):
        n = (pairs.MIN_PAIRED_BYTES + 2 * pairs.SEGMENT_BYTES) \
            // torch.empty((), dtype=dtype).element_size() + 1001
        gen = torch.Generator().manual_seed(rank * 31 + n)
        x = torch.randint(0, 100, (n * size,), generator=gen).to(dtype)
        y, gathered = torch.empty_like(x), torch.empty_like(x)
        comm.all_to_all(y, x)
        comm.all_gather(gathered, x[:n])
        out[str(dtype)] = {"input": x, "all_to_all": y, "all_gather": gathered}
        if dtype.is_floating_point:
            out[str(dtype)]["reduce_scatter"] = torch.empty(n, dtype=dtype)
            comm.reduce_scatter(out[str(dtype)]["reduce_scatter"], x)
    n = pairs.MIN_PAIRED_BYTES // 4 + 17
    x = torch.randn(n * size, generator=torch.Generator().manual_seed(rank))
    out["random"] = {"input": x, "reduce_scatter": torch.empty(n)}
    comm.reduce_scatter(out["random"]["reduce_scatter"], x)
    shard = x.clone()  # the output a shard of the input, as a bucket's own partition is
    comm.reduce_scatter(shard.view(size, -1)[rank], shard)
    out["random"]["into_its_shard"] = shard.view(size, -1)[rank].clone()
    handles, outputs = [], []
    for k in range(5):
        x = torch.full((n * size,), float(1000 * rank + k))
        y = torch.empty_like(x) if k != 4 else torch.empty(n)
        if k == 2:
            handles.append(comm.all_to_all(y, x, async_op=True))
        elif k == 4:
            handles.append(comm.reduce_scatter(y, x, async_op=True))
        else:
            handles.append(comm.all_gather(y, x[:n], async_op=True))
        outputs.append(y)
    for handle in reversed(handles):
        handle.wait()
    out["in_flight"] = outputs
    return out


def hosts_at_start() -> dict:
    """Right after init_distributed: which ranks' hosts the stall watch knows (its reports name
    them). The heartbeats' own learning is switched off, so only init_distributed can have
    told it."""
    from zero_ext.comm.watch import current_watch
    from zero_ext.comm.watch_nodes import RankHosts

    RankHosts.learn_some = lambda self: None
    comm.init_distributed()
    return dict(current_watch().nodes.hosts)


def run_cases() -> dict:
    out = {"collectives": collectives(), "all_to_all": all_to_alls()}
    if comm._shared_memory_arena(torch.zeros(1)) is None:
        out["wire"] = wire()
        out["paired"] = paired()
    return out
