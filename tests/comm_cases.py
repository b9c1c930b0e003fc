"""What each rank runs in the comm tests: every collective on uneven sizes and float dtypes."""

import os

import torch

from zero_ext import comm


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
    comm.traffic.reset()
    comm.all_reduce(torch.zeros(10))
    comm.reduce_scatter(torch.zeros(10), torch.zeros(10 * size))
    comm.all_gather(torch.zeros(10 * size), torch.zeros(10))
    out["traffic"] = comm.traffic.snapshot()
    out["arena"] = comm._shared_memory_arena(torch.zeros(1)) is not None
    return out


def _nodes(node_of_rank: list[int]) -> None:
    """torchrun's variables as on these nodes (contiguous rank blocks), detected again."""
    rank = comm.rank()
    node = node_of_rank[rank]
    members = [r for r, n in enumerate(node_of_rank) if n == node]
    os.environ.update(GROUP_RANK=str(node), LOCAL_WORLD_SIZE=str(len(members)),
                      LOCAL_RANK=str(members.index(rank)))
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
    environment = {k: os.environ.get(k)
                   for k in ("GROUP_RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK")}
    _nodes([0] * (size - 1) + [1])
    comm.traffic.reset()
    comm.all_to_all(torch.empty(10 * size, dtype=torch.bfloat16),
                    torch.zeros(10 * size, dtype=torch.bfloat16))
    comm.all_to_all(torch.empty(3 * size, dtype=torch.uint8),
                    torch.zeros(3 * size, dtype=torch.uint8))
    out["traffic"] = comm.traffic.snapshot()
    for key, value in environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    comm.detect_topology()
    return out


def run_cases() -> dict:
    return {"collectives": collectives(), "all_to_all": all_to_alls()}
