"""What zero_ext's network door costs per collective: comm.all_reduce (sequence number,
fingerprint, record, bounded wait; the shared-memory arena on one host) against
torch.distributed.all_reduce on the same group, in one torchrun launch.

    torchrun --nproc_per_node=2 benchmarks/bench_collectives.py
    ZERO_EXT_CPU_SHM=0 torchrun --nproc_per_node=2 benchmarks/bench_collectives.py   # gloo path

For each size, every implementation runs --calls all-reduces after a warm-up, --repeats times;
the table has the best (least disturbed) time per call and zero_ext's ratio to torch. The
physical limit on one host is a memory copy of the tensor per rank, shown beside.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from zero_ext import comm


def time_per_call(fn, calls: int, repeats: int) -> float:
    for _ in range(min(calls, 20)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,65536,1048576",
                        help="comma-separated fp32 element counts")
    parser.add_argument("--calls", type=int, default=500, help="calls per timing (small sizes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    comm.init_distributed()
    rank, size = comm.rank(), comm.world_size()
    rows = []
    for numel in (int(s) for s in args.sizes.split(",")):
        tensor = torch.ones(numel)
        calls = max(10, min(args.calls, args.calls * 65536 // max(numel, 1)))
        ours = time_per_call(lambda t=tensor: comm.all_reduce(t), calls, args.repeats)
        theirs = time_per_call(lambda t=tensor: dist.all_reduce(t), calls, args.repeats)
        scratch = torch.empty_like(tensor)
        copy = time_per_call(lambda s=scratch, t=tensor: s.copy_(t), calls, args.repeats)
        rows.append((numel, ours, theirs, copy))
    if rank == 0:
        print(f"[bench_collectives] {size} ranks, backend {comm.backend()}, torch "
              f"{torch.__version__}; best of {args.repeats}")
        print("| fp32 elements | zero_ext us/call | torch.distributed us/call | torch / zero_ext "
              "| memory copy us (limit) |")
        print("|---:|---:|---:|---:|---:|")
        for numel, ours, theirs, copy in rows:
            print(f"| {numel} | {1e6 * ours:.1f} | {1e6 * theirs:.1f} | {theirs / ours:.2f}x "
                  f"| {1e6 * copy:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
