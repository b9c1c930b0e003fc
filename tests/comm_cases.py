"""What each rank runs in the comm tests: every collective on uneven sizes and float dtypes."""

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
            out[(str(dtype), n)] = dict(input=x, all_reduce=reduced, reduce_scatter=shard,
                                        all_gather=gathered)
    comm.traffic.reset()
    comm.all_reduce(torch.zeros(10))
    comm.reduce_scatter(torch.zeros(10), torch.zeros(10 * size))
    comm.all_gather(torch.zeros(10 * size), torch.zeros(10))
    out["traffic"] = comm.traffic.snapshot()
    out["arena"] = comm._shared_memory_arena(torch.zeros(1)) is not None
    return out
