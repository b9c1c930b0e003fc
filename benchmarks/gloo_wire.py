"""What gloo really sends: every collective zero_ext uses, measured on the ranks' own TCP
sockets, against comm's counters (comm.wire_sends) and the ring figures.

    python benchmarks/gloo_wire.py                 # W = 2, 3, 4 ranks on this host's loopback
    python benchmarks/gloo_wire.py --netns         # in a fresh network namespace (root): also
                                                   # the loopback interface's tx_bytes

Each rank is a gloo process (file store: no TCP but gloo's own). Around R repetitions of one
collective (after a barrier, and a barrier after, whose bytes are measured alone and taken
off) each rank reads its sockets' bytes sent (tests/tcp_bytes.py: the TCP payload, gloo's
data and its 48-byte message preambles, no TCP/IP headers), by the rank at the other end. The
"zero_ext" rows go through zero_ext.comm with the shared-memory arena off (ZERO_EXT_CPU_SHM=0),
as on two hosts, and print comm.traffic's bytes beside the measurement; the "torch" rows call
torch.distributed directly, for the collectives zero_ext replaces (gloo's reduce_scatter, the
flat all-gather) or does not use (send / recv). With --netns, "lo" is the namespace's loopback
tx_bytes per call, all ranks together: TCP/IP headers and ACKs included. Prints one line per
(world size, collective, bytes, rank); benchmarks/RESULTS.md ("gloo on the wire") quotes it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import tcp_bytes  # tests/tcp_bytes.py: the socket counters the tests read too

SIZES = (4, 4000, 4_000_004)  # bytes: one fp32 element, one segment, several 1 MiB segments


def loopback_tx() -> int:
    with open("/sys/class/net/lo/statistics/tx_bytes", encoding="ascii") as f:
        return int(f.read())


def _measure(run, repeats: int, addresses: list[list[str]], barrier_cost: dict[int, float]):
    """(bytes by peer rank per call, loopback bytes per call) of `run`, `repeats` times."""
    dist.barrier()
    lo, before = loopback_tx(), tcp_bytes.sent_by_socket()
    for _ in range(repeats):
        run()
    dist.barrier()
    sent, lo = tcp_bytes.by_rank(tcp_bytes.sent_since(before), addresses), loopback_tx() - lo
    return ({p: (b - barrier_cost.get(p, 0.0)) / repeats for p, b in sent.items() if p >= 0},
            lo / repeats)


def _cases(size: int, rank: int):
    """(label, element size, bytes, run, zero_ext?) for each collective and size."""
    from zero_ext import comm

    for nbytes in SIZES:
        for dtype in (torch.float32, torch.bfloat16):
            esize = torch.empty((), dtype=dtype).element_size()
            numel = max(nbytes // esize // size, 1) * size  # divisible by the world size
            full, part = torch.ones(numel, dtype=dtype), torch.ones(numel // size, dtype=dtype)
            out = torch.empty_like(full)
            yield ("all_reduce", esize, numel * esize, lambda t=full: comm.all_reduce(t), True)
            yield ("reduce_scatter", esize, numel * esize,
                   lambda o=part, i=full: comm.reduce_scatter(o, i), True)
            yield ("all_gather", esize, numel * esize,
                   lambda o=out, i=part: comm.all_gather(o, i), True)
            yield ("all_to_all", esize, numel * esize,
                   lambda o=out, i=full: comm.all_to_all(o, i), True)
            yield ("broadcast", esize, numel * esize, lambda t=full: comm.broadcast(t, 0), True)
            yield ("torch reduce_scatter_tensor", esize, numel * esize,
                   lambda o=part, i=full: dist.reduce_scatter_tensor(o, i), False)
            yield ("torch all_gather_into_tensor", esize, numel * esize,
                   lambda o=out, i=part: dist.all_gather_into_tensor(o, i), False)

            def ring_pass(t=full):  # send / recv: each rank to the next, one tensor
                work = dist.isend(t, (rank + 1) % size)
                dist.recv(torch.empty_like(t), (rank - 1) % size)
                work.wait()
            yield ("torch send/recv", esize, numel * esize, ring_pass, False)


def _rank(rank: int, size: int, init_file: str, queue) -> None:
    os.environ["ZERO_EXT_CPU_SHM"] = "0"
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13's renamed ops
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=size)
    from zero_ext import comm
    from zero_ext.comm.collectives import ring_elements

    comm.init_distributed()
    for _, _, _, run, _ in _cases(size, rank):
        run()  # warm-up: gloo's pairs connect lazily
    addresses = comm.all_gather_object(tcp_bytes.local_addresses())
    barrier_cost, _ = _measure(lambda: None, 20, addresses, {})
    barrier_cost = {p: b * 20 / 21 for p, b in barrier_cost.items()}  # per barrier
    rows = []
    for label, esize, nbytes, run, counted in _cases(size, rank):
        repeats = 3 if nbytes > 100_000 else 20
        comm.traffic.reset()
        by_peer, lo = _measure(run, repeats, addresses, barrier_cost)
        count = sum(comm.traffic.bytes.values()) / repeats if counted else float("nan")
        op = label.split()[-1].replace("_tensor", "").replace("_into", "")
        ring = ring_elements(op, nbytes, size) if op != "send/recv" else nbytes
        rows.append((size, label, esize, nbytes, rank, by_peer, count, ring, lo))
    queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def measure(size: int) -> list[tuple]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, size, os.path.join(tmp, "store"), queue))
                 for r in range(size)]
        for p in procs:
            p.start()
        rows = []
        while len(rows) < size * len(list(_cases(size, 0))):
            try:
                rows += queue.get(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty: is every rank still running?
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("gloo_wire: a rank failed (its traceback is above)")
        for p in procs:
            p.join(60)
    return sorted(rows, key=lambda r: (r[1], r[3], r[2], r[4]))


def _in_netns(argv: list[str]) -> int:
    """Runs this script again inside a fresh network namespace with only loopback up."""
    name = f"zx-wire-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, *argv,
                               "--inside"], check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--netns", action="store_true",
                        help="run in a fresh network namespace and report loopback bytes")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.netns and not args.inside:
        return _in_netns([a for a in sys.argv[1:] if a != "--netns"] + ["--lo"])
    lo = "--lo" in sys.argv
    print(f"torch {torch.__version__}; bytes per call and rank: sent by peer (TCP payload), "
          "comm's count, the ring figure" + (", loopback tx of all ranks" if lo else ""))
    for size in args.world:
        for size_, label, esize, nbytes, rank, by_peer, count, ring, lo_bytes in measure(size):
            sent = sum(by_peer.values())
            peers = " ".join(f"->{p}:{b:.0f}" for p, b in sorted(by_peer.items()) if b > 0.5)
            print(f"W={size_} {label:29} e{esize} n={nbytes:>8} rank {rank}: sent {sent:>10.0f} "
                  f"count {count:>10.0f} (+{sent - count:>5.0f}) ring {ring:>10.0f} [{peers}]"
                  + (f" lo {lo_bytes:.0f}" if lo else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
