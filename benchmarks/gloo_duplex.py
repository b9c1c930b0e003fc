"""Does gloo use both directions of a capped link at once? Times, on the two namespaced nodes of
tests/two_nodes.py (one rank each, the link capped per direction with tc tbf), collectives that
send the same bytes each way: gloo's all-to-all, zero_ext's all-to-all and all-gather (sends
and receives in 512 KiB segments, zero_ext/comm/pairs.py), one isend / irecv pair of the whole
size, gloo's all-reduce and all-gather. Why: stage 2's int8 reduce-scatter is an all-to-all
(zero_ext/comm/compressed.py), and over gloo's all_to_all_single its step at 300 Mbit/s took
about twice the wire time of its bytes (benchmarks/RESULTS.md, "gloo's all-to-all uses one
direction at a time").

    python benchmarks/gloo_duplex.py                      # 300mbit, 6.43 MB each way (~60 s)
    python benchmarks/gloo_duplex.py --rate 1gbit --mbytes 2

Each line: the median of --repeats timed calls (after one warm-up, each between barriers) on
node 0, and the rate it implies for the bytes one rank sends (the physical limit is the cap);
then the fastest and the slowest call: one large message each way takes either the link's time
or twice that, from call to call.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from zero_ext import comm

    comm.init_distributed("gloo")
    rank, other = dist.get_rank(), 1 - dist.get_rank()
    each = int(args.mbytes * 1e6) // 8 * 8  # bytes each rank sends
    send = torch.zeros(2 * each, dtype=torch.uint8)
    recv = torch.empty_like(send)
    floats = torch.zeros(each // 4, dtype=torch.float32)  # a 2-rank ring all-reduce sends n
    half = torch.zeros(each, dtype=torch.uint8)

    def pair():
        for work in (dist.isend(send[:each], other), dist.irecv(recv[:each], other)):
            work.wait()

    cases = [("all_to_all_single", lambda: dist.all_to_all_single(recv, send)),
             ("zero_ext all_to_all", lambda: comm.all_to_all(recv, send)),
             ("zero_ext all_gather", lambda: comm.all_gather(recv, half)),
             ("isend + irecv", pair),
             ("all_reduce (fp32)", lambda: dist.all_reduce(floats)),
             ("all_gather_into_tensor", lambda: dist.all_gather_into_tensor(recv, half))]
    for name, call in cases:
        call()
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        if rank == 0:
            seconds = statistics.median(times)
            print(f"{name:24s} {each / 1e6:.2f} MB each way: {seconds:.3f} s "
                  f"({each * 8 / seconds / 1e6:.0f} Mbit/s per direction; calls "
                  f"{min(times):.3f} - {max(times):.3f} s)", flush=True)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="300mbit", help="tbf rate per direction")
    parser.add_argument("--mbytes", type=float, default=6.43, help="MB each rank sends")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from two_nodes import TwoNodes, available

    ok, why = available()
    if not ok:
        print(f"two nodes cannot be made here: {why}")
        return 1
    command = (f"{sys.executable} -m torch.distributed.run --nnodes=2 --nproc_per_node=1 "
               f"--rdzv_backend=c10d --rdzv_endpoint=$NODE0_ADDR:29561 "
               f"--rdzv_id=zxd-{secrets.token_hex(4)} {os.path.abspath(__file__)} --worker "
               f"--mbytes {args.mbytes} --repeats {args.repeats}")
    print(f"gloo, 2 nodes x 1 rank, link capped at {args.rate} per direction (tc tbf)")
    with TwoNodes(rate=args.rate) as nodes:
        results = nodes.run([command, command], timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(results[0].stdout, end="")
    if any(r.returncode or r.timed_out for r in results):
        print("\n".join(r.stderr[-2000:] for r in results))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
