"""A legitimately long collective across two nodes: rank 0 broadcasts ZX_EXCHANGE_MB megabytes
over a capped link (tests/test_two_nodes_failures.py caps it with tbf so that the broadcast
takes several stall timeouts), as a large checkpoint exchange does. Every rank prints how long
it took and how many diagnoses found only progress; a CollectiveStallError would end it."""

import os
import time

import torch

from zero_ext import comm

if __name__ == "__main__":
    comm.init_distributed(stall_timeout_s=float(os.environ["ZX_STALL_TIMEOUT_S"]))
    comm.barrier()
    tensor = torch.full((int(os.environ["ZX_EXCHANGE_MB"]) * 2**18,), float(comm.rank()))
    started = time.monotonic()
    comm.broadcast(tensor, src=0)
    seconds = time.monotonic() - started
    assert bool((tensor == 0).all()), "the broadcast delivered other values"
    print(f"rank {comm.rank()} exchanged in {seconds:.1f} s, progress checks "
          f"{comm.current_watch().progress_checks}", flush=True)
    comm.barrier()
