"""The network benchmark shipped with zero_ext: alpha (latency) and beta (seconds per byte) of
each collective on the links a job really has, for the scaling model (zero_ext/scaling.py).

Run it under torchrun, on the nodes and ranks the training will use:

    torchrun --nnodes=2 --nproc_per_node=1 ... -m zero_ext.estimate --measure-network \\
        --save-network net.json
    python -m zero_ext.estimate --params 7B --network net.json --nodes 2

Each collective (all-reduce, all-gather, reduce-scatter through zero_ext.comm, as training
calls them) runs at a few sizes; the median time of several runs (the slowest rank's) is fitted
by least squares as alpha + beta x ring bytes (the bytes zero_ext.comm's traffic counters count
per rank). Rank 0 prints the fits and, with --save-network, writes them as JSON.

With gloo (collectives on the CPU) it also measures each collective's work on the cores: the
CPU seconds (user + system, every thread: gloo's and the kernel's TCP work done in them) the
rank's process spends per run, the slowest rank's mean, fitted the same way (`host_fits`). That
work competes with the compute for the same cores (zero_ext/scaling.py, Cluster.host), and it
is per byte on the link the job really has: how the link is shaped changes it severalfold (on
benchmarks/bench_two_nodes.py's tbf-capped veth link, docs/scaling.md). Work the kernel does
outside the rank's threads (ksoftirqd) is not counted.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence

import torch

from zero_ext import comm
from zero_ext.comm.collectives import ring_elements
from zero_ext.scaling import Cluster, Link

__all__ = ["cluster_from_measurement", "fit", "measure_network"]

OPS = ("all_reduce", "all_gather", "reduce_scatter")
DEFAULT_SIZES = tuple(2**k for k in (14, 16, 18, 20, 22, 23))  # bytes per collective


def _device() -> torch.device:
    """Where the collectives' tensors live: the rank's GPU under NCCL (it takes no CPU
    tensors), else the host."""
    if comm.backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _settle() -> None:
    """Under NCCL a collective's wait() only orders streams: the device's work must be done
    before the clock is read."""
    if comm.backend() == "nccl":
        torch.cuda.synchronize()


def _run(op: str, nbytes: int, world: int) -> None:
    numel = max(nbytes // 4 // world, 1) * world
    full = torch.ones(numel, device=_device())
    _settle()
    if op == "all_reduce":
        comm.all_reduce(full)
    elif op == "all_gather":
        comm.all_gather(full, full[:numel // world].clone())
    else:
        comm.reduce_scatter(torch.empty(numel // world, device=full.device), full)


def _timed(op: str, nbytes: int, world: int) -> float:
    comm.barrier()
    start = time.perf_counter()
    _run(op, nbytes, world)
    _settle()
    return time.perf_counter() - start


def _slowest(times: list[float]) -> list[float]:
    """Each run's time on the slowest rank."""
    everyone = torch.tensor(times, dtype=torch.float64, device=_device())
    comm.all_reduce(everyone, op=torch.distributed.ReduceOp.MAX)
    return everyone.tolist()


def measure_network(sizes: Sequence[int] = DEFAULT_SIZES, min_seconds: float = 0.2,
                    min_runs: int = 3, max_runs: int = 20) -> dict:
    """Times every collective at every size on the current process group (collective: every
    rank calls it). Returns {"world_size", "samples": [[op, ring bytes, seconds]], "fits":
    {op: {"alpha_s", "beta_s_per_byte"}}}, the same on every rank; with gloo also
    "host_samples" and "host_fits", the same for the CPU seconds each run costs a rank (see
    the module docstring)."""
    world = comm.world_size()
    if world < 2:
        raise RuntimeError("zero_ext: --measure-network needs 2 or more ranks (it times "
                           "collectives between them); launch it with torchrun across the "
                           "nodes, e.g. torchrun --nnodes=2 --nproc_per_node=1 ...")
    on_cores = comm.backend() == "gloo"
    rows, host_rows = [], []
    for op in OPS:
        for nbytes in sizes:
            # The warm-up (connections, buffers) also sizes the run count, from the slowest
            # rank's time, so every rank runs the same number.
            first = _slowest([_timed(op, nbytes, world)])[0]
            runs = min(max(min_runs, math.ceil(min_seconds / max(first, 1e-9))), max_runs)
            cpu = time.process_time()
            times = [_timed(op, nbytes, world) for _ in range(runs)]
            core = (time.process_time() - cpu) / runs
            *times, core = _slowest(times + [core])
            numel = max(nbytes // 4 // world, 1) * world
            ring = ring_elements(op, numel, world) * 4
            rows.append([op, ring, statistics.median(times)])
            host_rows.append([op, ring, core])
    out = {"world_size": world, "samples": rows,
           "fits": {op: fit([(b, t) for o, b, t in rows if o == op]) for op in OPS}}
    if on_cores:
        out["host_samples"] = host_rows
        out["host_fits"] = {op: fit([(b, t) for o, b, t in host_rows if o == op])
                            for op in OPS}
    return out


def fit(points: Sequence[tuple[float, float]]) -> dict:
    """Least squares t = alpha + beta x bytes; alpha >= 0 (a negative intercept, from noise,
    refits through the origin) and beta > 0 (a flat or falling fit, from latency-bound sizes,
    takes the fastest time as alpha and the largest size's excess as beta)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    beta = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    alpha = mean_y - beta * mean_x
    if alpha < 0:
        alpha, beta = 0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    if beta <= 0:  # times flat or falling with size (latency-bound, noisy): the largest bounds
        alpha = min(y for _, y in points)
        x, y = max(points)
        beta = max(y - alpha, 1e-3 * y) / x
    return {"alpha_s": alpha, "beta_s_per_byte": beta}


def cluster_from_measurement(measured: dict, nodes: int, gpus_per_node: int,
                             intra: Link) -> Cluster:
    """A Cluster whose network is the measured one: each collective's own fit, its alpha
    spread over its ring steps at the measured world size (so other world sizes scale by the
    ring's step count); the network's bandwidth and latency in general are all-gather's (the
    plain ring). The measured work on the cores (gloo: `host_fits`) becomes Cluster.host."""
    fitted = _links(measured, "fits")
    host = _links(measured, "host_fits") if "host_fits" in measured else {}
    return Cluster(nodes=nodes, gpus_per_node=gpus_per_node, network=fitted["all_gather"],
                   intra=intra, fitted=fitted, host=host)


def _links(measured: dict, key: str) -> dict[str, Link]:
    world = measured["world_size"]
    links = {}
    for op, f in measured[key].items():
        if f["beta_s_per_byte"] <= 0:  # no measurable cost (no work on the cores): none
            continue
        steps = (world - 1) * (2 if op == "all_reduce" else 1)
        links[op] = Link(1 / f["beta_s_per_byte"], f["alpha_s"] / steps)
    return links


def format_measurement(measured: dict) -> str:
    lines = [f"collectives among {measured['world_size']} ranks (median of the slowest rank):",
             f"{'collective':>15} {'ring bytes':>12} {'seconds':>10} {'GB/s':>8}"]
    for op, nbytes, seconds in measured["samples"]:
        lines.append(f"{op:>15} {nbytes:>12.0f} {seconds:>10.6f} {nbytes / seconds / 1e9:>8.3f}")
    lines.append("fit: seconds = alpha + beta x ring bytes")
    for op, f in measured["fits"].items():
        lines.append(f"{op:>15}  alpha {f['alpha_s'] * 1e6:9.1f} us   bandwidth "
                     f"{8 / f['beta_s_per_byte'] / 1e9:8.3f} Gbit/s")
    if "host_fits" in measured:
        lines.append("CPU seconds per collective on each rank (gloo: work on the compute's "
                     "cores): alpha + beta x ring bytes")
        for op, f in measured["host_fits"].items():
            lines.append(f"{op:>15}  alpha {f['alpha_s'] * 1e6:9.1f} us   "
                         f"{f['beta_s_per_byte'] * 1e9:8.3f} ns per byte")
    return "\n".join(lines)


def save(measured: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(measured, f, indent=1)
