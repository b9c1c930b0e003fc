"""What each rank runs in tests/test_compressed_comm.py: the compressed collectives (and the
all-to-all under them) on seeded inputs; each case returns this rank's inputs, outputs, state
and counters, and the test computes the references from every rank's inputs."""

from __future__ import annotations

import os
import time

import hierarchy_cases
import torch

from zero_ext import comm

from dist_harness import restart_group

BLOCK = 32
UNEVEN = 100  # elements per chunk: three full blocks of 32 and a partial one


def _inputs(seed: int, numel: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 131 + comm.rank())
    return (torch.randn(numel, generator=gen) * scale).to(dtype)


def _traffic(collective, *args, **kwargs) -> comm.CollectiveTraffic:
    """comm's counters over one call of `collective`."""
    comm.traffic.reset()
    collective(*args, **kwargs)
    return comm.traffic.snapshot()


def _wait(handle) -> None:
    if handle is not None:
        handle.wait()


def quantized_reduce_scatters(two_hop: bool) -> dict:
    """int8 / int4 over fp32 and bf16 inputs of uneven chunks, sync and async; bf16 inputs hold
    values fp16 cannot (1e6 overflows it, 1e-7 is below its normal range)."""
    size = comm.world_size()
    out = {}
    for bits in (8, 4):
        for dtype in (torch.float32, torch.bfloat16):
            x = _inputs(bits, UNEVEN * size, dtype)
            if dtype == torch.bfloat16:
                x[::7] *= 1e6
                x[3::11] *= 1e-7
            y = torch.empty(UNEVEN, dtype=dtype)
            traffic = _traffic(comm.quantized_reduce_scatter, y, x, bits=bits,
                               block_size=BLOCK, two_hop=two_hop)
            y_async = torch.full_like(y, 5)
            handle = comm.quantized_reduce_scatter(y_async, x, bits=bits, block_size=BLOCK,
                                                   two_hop=two_hop, async_op=True, bucket=3)
            handle.wait()
            out[(bits, str(dtype))] = {"input": x, "output": y, "output_async": y_async,
                                       "traffic": traffic}
    return out


def error_feedback(two_hop: bool, steps: int = 12) -> dict:
    """int4 reduce-scatter of one constant input, `steps` times, with and without error
    feedback: the cumulative sums delivered, and the residuals left."""
    size = comm.world_size()
    x = _inputs(11, UNEVEN * size)
    out = {"input": x}
    for label in ("feedback", "none"):
        feedback = comm.QuantFeedback.for_reduce_scatter(
            x.numel(), size, comm.current_topology()) if label == "feedback" else None
        delivered = torch.zeros(UNEVEN, dtype=torch.float64)
        y = torch.empty(UNEVEN)
        for _ in range(steps):
            comm.quantized_reduce_scatter(y, x, bits=4, block_size=BLOCK, feedback=feedback,
                                          two_hop=two_hop)
            delivered += y.double()
        out[label] = {"delivered": delivered,
                      "flat_total": None if feedback is None else feedback.flat_total()}
    return out


def quantized_all_gathers() -> dict:
    size = comm.world_size()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = _inputs(21, UNEVEN, dtype)
        if dtype == torch.bfloat16:
            x[::5] *= 1e6
        y = torch.empty(UNEVEN * size, dtype=dtype)
        traffic = _traffic(comm.quantized_all_gather, y, x, bits=8, block_size=BLOCK)
        y_async = torch.zeros_like(y)
        comm.quantized_all_gather(y_async, x, block_size=BLOCK, async_op=True).wait()
        plain = torch.empty_like(y)
        plain_traffic = _traffic(comm.all_gather, plain, x)
        out[str(dtype)] = {"input": x, "output": y, "output_async": y_async,
                           "traffic": traffic, "plain_traffic": plain_traffic}
    return out


def topk(all_reduce: bool, momentum: float, steps: int = 4, density: float = 0.1) -> dict:
    """`steps` sparse reductions of fresh inputs (bf16) with one TopkFeedback; the outputs,
    the state after each step."""
    size = comm.world_size()
    numel = UNEVEN * size
    state = comm.TopkFeedback(numel, size, momentum=momentum, all_reduce=all_reduce)
    out = {"inputs": [], "outputs": [], "states": []}
    for step in range(steps):
        x = _inputs(40 + step, numel, torch.bfloat16)
        if all_reduce:
            y = x.clone()
            handle = comm.sparse_all_reduce(y, state=state, density=density, async_op=True)
        else:  # fp32 output: the sum of the bf16 values delivered, unrounded
            y = torch.empty(UNEVEN, dtype=torch.float32)
            handle = comm.sparse_reduce_scatter(y, x, state=state, density=density,
                                                async_op=True)
        handle.wait()
        out["inputs"].append(x)
        out["outputs"].append(y)
        out["states"].append({k: v.clone() for k, v in state.tensors().items()})
    out["flat_total"] = state.flat_total()
    return out


def topk_torch_path() -> dict:
    """The same fp32 top-k reductions (no ties at the k-th) through the C++ op and through the
    torch ops that devices without the op's kernel take (CUDA), both with momentum, for
    reduce-scatter and all-reduce: each path's outputs and final state."""
    from zero_ext.comm import compressed

    size = comm.world_size()
    numel = UNEVEN * size
    out = {}
    op_path = compressed._select_with_feedback
    for path in ("op", "torch"):
        if path == "torch":
            compressed._select_with_feedback = \
                lambda residual, grad, chunks, k, dtype, momentum=None, momentum_factor=0.0: \
                compressed._select_with_feedback_torch(residual, grad, chunks, k, dtype,
                                                       momentum, momentum_factor)
        try:
            for all_reduce in (False, True):
                state = comm.TopkFeedback(numel, size, momentum=0.5, all_reduce=all_reduce)
                outputs = []
                for step in range(3):
                    x = _inputs(60 + step, numel)
                    if all_reduce:
                        y = x.clone()
                        comm.sparse_all_reduce(y, state=state, density=0.1)
                    else:
                        y = torch.empty(UNEVEN)
                        comm.sparse_reduce_scatter(y, x, state=state, density=0.1)
                    outputs.append(y)
                out[(path, all_reduce)] = {"outputs": outputs, "state": state.tensors()}
        finally:
            compressed._select_with_feedback = op_path
    return out


def dense_fallback() -> dict:
    """Density 0.5: (index, value) pairs would not be smaller than the dense chunk (bf16: 6
    bytes against 2 a pair; fp32: 8 against 4), so the dense collectives run on everything due
    (after one sparse step at 0.05 left residuals and momentum)."""
    size = comm.world_size()
    numel = UNEVEN * size
    out = {}
    for all_reduce in (False, True):
        for dtype in (torch.bfloat16, torch.float32):
            state = comm.TopkFeedback(numel, size, momentum=0.5, all_reduce=all_reduce)
            xs, ys = [_inputs(60, numel, dtype), _inputs(61, numel, dtype)], []
            for density in (0.05, 0.5):
                before = {k: v.clone() for k, v in state.tensors().items()}
                x = xs[len(ys)]
                if all_reduce:
                    y = x.clone()
                    traffic = _traffic(comm.sparse_all_reduce, y, state=state, density=density)
                else:
                    y = torch.empty(UNEVEN, dtype=dtype)
                    traffic = _traffic(comm.sparse_reduce_scatter, y, x, state=state,
                                       density=density)
                ys.append(y)
            out[(all_reduce, str(dtype))] = {
                "inputs": xs, "outputs": ys, "before_dense": before, "traffic": traffic,
                "after": {k: v.clone() for k, v in state.tensors().items()}}
    return out


def wire_bytes(n: int = 4096) -> dict:
    """Each reduction's counters for n elements per chunk: plain fp32 and bf16, int8, int4,
    top-k at density 0.01 (reduce-scatter and all-reduce)."""
    size = comm.world_size()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = _inputs(80, n * size, dtype)
        y = torch.empty(n, dtype=dtype)
        out[("plain", str(dtype))] = _traffic(comm.reduce_scatter, y, x)
        out[("plain all_reduce", str(dtype))] = _traffic(comm.all_reduce, x.clone())
    x = _inputs(80, n * size, torch.bfloat16)
    y = torch.empty(n, dtype=torch.bfloat16)
    for bits in (8, 4):
        out[(f"int{bits}", "bf16")] = _traffic(comm.quantized_reduce_scatter, y, x,
                                               bits=bits, block_size=256, two_hop=False)
    state = comm.TopkFeedback(n * size, size)
    out[("topk", "bf16")] = _traffic(comm.sparse_reduce_scatter, y, x, state=state,
                                     density=0.01)
    state = comm.TopkFeedback(n * size, size, all_reduce=True)
    out[("topk all_reduce", "bf16")] = _traffic(comm.sparse_all_reduce, x.clone(),
                                                state=state, density=0.01)
    return out


def all_to_all_groups() -> dict:
    """all_to_all over every rank and over the node and across-node groups (4 ranks as 2
    nodes x 2), with its counters."""
    topology = comm.current_topology()
    out = {}
    x = torch.arange(12, dtype=torch.uint8) + 16 * comm.rank()
    for label, group in (("world", None), ("node", topology.node_group("test")),
                         ("across", topology.across_nodes_group("test"))):
        y = torch.empty_like(x)
        traffic = _traffic(comm.all_to_all, y, x, group=group)
        out[label] = {"input": x, "output": y, "traffic": traffic,
                      "ranks": None if group is None else group.ranks}
    return out


def stalled_reduce_scatter() -> dict:
    """Rank 0 enters a quantized reduce-scatter (its all-to-all) that rank 1 never joins, over
    the shared-memory arena and over gloo's all_to_all_single: both ranks raise within a few
    stall timeouts (the group is restarted around it)."""
    comm.set_stall_timeout(1.5)
    out = {}
    for transport in ("shm", "gloo"):
        os.environ["ZERO_EXT_CPU_SHM"] = "1" if transport == "shm" else "0"
        restart_group()  # a new group decides afresh whether to use the arena
        # Both ranks' watches (and heartbeats) start on the new group, the arena and the
        # topology decided.
        comm.all_reduce(torch.zeros(1))
        comm.current_topology()
        started = time.monotonic()
        try:
            if comm.rank() == 0:
                comm.quantized_reduce_scatter(torch.empty(64), torch.ones(128), bits=8,
                                              block_size=BLOCK)
            else:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # interrupted by rank 0's report
                    time.sleep(0.05)
            out[transport] = (None, "", time.monotonic() - started)
        except comm.CollectiveStallError as error:
            out[transport] = (type(error).__name__, str(error), time.monotonic() - started)
    os.environ["ZERO_EXT_CPU_SHM"] = "1"
    restart_group()
    return out


def run_cases(nodes: bool) -> dict:
    if nodes:
        hierarchy_cases.simulate_nodes(2)
    out = {"flat": quantized_reduce_scatters(two_hop=False),
           "ef": error_feedback(two_hop=False),
           "gather": quantized_all_gathers(),
           "topk_rs": topk(False, 0.0), "topk_rs_momentum": topk(False, 0.9),
           "topk_ar": topk(True, 0.0), "topk_ar_momentum": topk(True, 0.9),
           "topk_torch_path": topk_torch_path(),
           "dense": dense_fallback(), "bytes": wire_bytes()}
    if comm.world_size() == 2:
        out["stall"] = stalled_reduce_scatter()
    if nodes:
        out["two_hop"] = quantized_reduce_scatters(two_hop=True)
        out["ef_two_hop"] = error_feedback(two_hop=True)
        out["a2a"] = all_to_all_groups()
        y = torch.empty(UNEVEN * 4)
        x = _inputs(21, UNEVEN)
        comm.quantized_all_gather(y, x, block_size=BLOCK, hierarchical=True)
        out["gather_hierarchical"] = y
    return out
