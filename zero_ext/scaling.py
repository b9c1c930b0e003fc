"""Scaling model: predicted step time of a ZeRO configuration on a cluster, and which to pick.

Answers "how fast will stage 1, 2 or 3 train this model on N nodes of P GPUs over this network?"
before anyone buys bandwidth. Called by `python -m zero_ext.estimate --network ...`
(zero_ext/scaling_cli.py) and by benchmarks/bench_two_nodes.py, which checks it against real
two-node runs.

Three parts, each stated so a reader can check it:
  traffic   `plan_step` lists the collectives one optimizer step issues (operation, elements,
            dtype, phase), from the engine's own bucket and unit layouts (estimate's
            `_module_layouts`, persistent's `allgather_pieces`); `planned_traffic` counts them
            with comm's own `CollectiveTraffic.count`, so the bytes equal what
            `zero_ext.comm.traffic` records on a real run (tests/test_scaling.py checks this).
  network   alpha-beta per collective: a ring over k ranks takes `steps * alpha + bytes * beta`
            with steps = k - 1 (all-gather, reduce-scatter) or 2(k - 1) (all-reduce) and bytes
            the ring-sense bytes each rank sends (the traffic counters' bytes). A collective
            over ranks on several nodes runs at the network's alpha and beta (one ring through
            every node: each node's link carries the ring, so the node's network bandwidth is
            the ring's bandwidth, NCCL spreading its rings over the node's NICs); one within a
            node (hpZ's secondary gathers, or a one-node job) at the intra-node link's.
            `python -m zero_ext.estimate --measure-network` fits alpha and beta per collective.
  compute   forward, backward and optimizer seconds per micro-step, given (measured) or from
            FLOPs: 6 x parameters x tokens (2 forward, 4 backward) at a stated throughput.
Overlap rules (what the engine does):
  forward   stage 3's unit all-gathers are prefetched (stage3_prefetch_bucket_size > 0), so
            they run behind forward compute, except the first, which nothing precedes;
  backward  the backward gathers likewise, and the gradient reduce-scatters / all-reduces when
            overlap_comm is on (stage 3's default), except the last bucket's, which starts when
            backward ends; with overlap_comm off each reduction waits where it is issued;
  step      the norm / agreement all-reduce and the post-step parameter all-gathers (stages
            1-3's buckets kept whole) run after the optimizer step, behind nothing.
  A phase takes max(compute, hidden collectives) + the exposed ones; collectives share one
  link, so they add up among themselves. Where collectives run on the compute cores (gloo on
  CPU: Cluster.host, their CPU seconds), the core is shared fairly between the compute and
  them (_shared_core): their CPU work adds to the compute's, and while both run they get at
  most Cluster.host_share of the core, so a transport needing more slows below its link rate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from zero_ext import ops
from zero_ext.comm.collectives import CollectiveTraffic, ring_elements
from zero_ext.comm.compressed import _sparse_pays, _topk_k
from zero_ext.config import ZeroConfig
from zero_ext.zero.partition import plan_buckets

__all__ = ["Cluster", "Compute", "Link", "PlannedCollective", "StepPrediction",
           "collective_seconds", "parse_bandwidth", "parse_latency", "parse_network",
           "plan_step", "planned_traffic", "predict_step", "recommend"]

# The step's one all-reduce of 5 fp64 elements: the norm's squares and the ranks' agreement
# (zero/agreement.py, StepAgreement.agree).
_AGREEMENT = (5, 8)


@dataclass(frozen=True)
class PlannedCollective:
    """One collective a step issues, as zero_ext.comm counts it."""

    op: str              # "all_reduce", "reduce_scatter" or "all_gather"
    numel: int           # all_reduce: the tensor; reduce_scatter: its input; all_gather: output
    element_size: int    # bytes per element on the wire
    phase: str           # "forward", "backward" or "step"
    hidden: bool         # may run behind compute (prefetched gathers, overlap_comm reductions)
    group: str = "world"  # "world": every rank; "node": ranks within one node (hpZ's block,
    #                        a hierarchical gather's second hop); "across": one rank per node
    #                        (a hierarchical gather's first hop; every local rank runs one)
    group_size: int | None = None  # ranks in the group (None: every rank)
    micro_step: int = 0  # which micro-step of the accumulation window
    compressed: bool = False  # moved as comm/compressed.py moves it (all-to-all, all-gather):
    #                           the ring's bytes of `op` on every transport, gloo's included


@dataclass(frozen=True)
class Link:
    """alpha-beta cost of one ring step: `latency` seconds plus bytes / `bandwidth`."""

    bandwidth: float     # bytes per second (a node's whole network bandwidth, for the network)
    latency: float       # seconds per ring step (alpha)

    def __post_init__(self):
        if not self.bandwidth > 0 or not self.latency >= 0 or math.isinf(self.bandwidth):
            raise ValueError(f"a link needs a positive finite bandwidth and a latency >= 0, got "
                             f"{self.bandwidth} B/s and {self.latency} s")


@dataclass(frozen=True)
class Cluster:
    """Where the job runs: nodes x gpus_per_node ranks, the links between and within nodes."""

    nodes: int
    gpus_per_node: int
    network: Link        # between nodes, per node
    intra: Link          # within a node (NVLink; shared memory on CPU)
    # Per-collective links measured by the network benchmark; they replace `network` for that
    # collective (gloo's reduce-scatter and all-reduce are not the ideal ring).
    fitted: dict[str, Link] = field(default_factory=dict)
    # Per-collective CPU seconds on the ranks' own cores (CPU transports: gloo moving bytes
    # through the kernel): that part of a collective cannot hide behind compute, which needs
    # the same cores. Measured by scaling_measure on the job's own link (the rank's CPU time
    # per run: host_fits; per byte it depends on the link); none on GPUs (NCCL).
    host: dict[str, Link] = field(default_factory=dict)
    # The largest share of a core the collectives' transport gets while the compute also runs
    # on it (a fair scheduler between the rank's one compute thread and the transport: 1/2);
    # see _shared_core.
    host_share: float = 0.5

    def __post_init__(self):
        if not 0 < self.host_share <= 1:
            raise ValueError(f"host_share is a share of a core, 0 < share <= 1, got "
                             f"{self.host_share}")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"a cluster needs at least 1 node of at least 1 GPU, got "
                             f"{self.nodes} x {self.gpus_per_node}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Compute:
    """Seconds of compute per micro-step on one rank (what the step takes without any
    communication). `optimizer` is the whole model's AdamW step on one rank; stages 1-3 step
    only their 1/N shard."""

    forward: float
    backward: float
    optimizer: float = 0.0

    @classmethod
    def from_flops(cls, params: int, tokens_per_rank: float, flops_per_s: float) -> Compute:
        """6 x params x tokens (the forward's matmuls 2, backward's 4) at `flops_per_s`
        achieved (peak x MFU). Activation recomputation would add a forward: not counted."""
        per_token = 2 * params * tokens_per_rank / flops_per_s
        return cls(forward=per_token, backward=2 * per_token)


@dataclass(frozen=True)
class StepPrediction:
    """One optimizer step, predicted."""

    stage: int
    world_size: int
    seconds: float            # the whole step
    compute: float            # compute alone
    communication: float      # every collective's time, hidden or not
    exposed: float            # communication not hidden behind compute
    traffic: CollectiveTraffic
    hpz: int = 1              # hpZ secondary partition size (1: none)

    @property
    def label(self) -> str:
        return f"stage {self.stage}" + (f" + hpZ {self.hpz}" if self.hpz > 1 else "")


# -- parsing ------------------------------------------------------------------------------------
_PREFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2.0**10, "mi": 2.0**20,
             "gi": 2.0**30}
_LATENCY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*"
# Bits per second (Gbps, Gbit, Gbit/s, Gb/s) or bytes (GB/s): only B against b is case-bound.
_BANDWIDTH = re.compile(_NUMBER + r"(?i:([kmgt]i?)?)((?i:bps|bits?/s|bits?)|b/s|B/s)\s*")


def parse_bandwidth(text: str) -> float:
    """'100Gbps', '25 Gbit', '450GB/s', '200mbit' -> bytes per second (bits when the unit says
    bps, bit or b/s; bytes when it says B/s)."""
    match = _BANDWIDTH.fullmatch(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a bandwidth; write a positive number and a unit, "
                         "e.g. 100Gbps, 25Gbit, 200mbit (bits per second) or 450GB/s (bytes)")
    per_byte = 1.0 if match.group(3) == "B/s" else 1 / 8
    return float(match.group(1)) * _PREFIXES[(match.group(2) or "").lower()] * per_byte


def parse_latency(text: str) -> float:
    """'5us', '2.5 ms', '0' -> seconds."""
    match = re.fullmatch(_NUMBER + r"([a-zµ]*)\s*", text, re.IGNORECASE)
    if not match or (match.group(2).lower() not in _LATENCY_UNITS
                     and not (match.group(2) == "" and float(match.group(1)) == 0)):
        raise ValueError(f"{text!r} is not a latency; write a number and a unit, e.g. 5us, "
                         "2ms, 800ns")
    return float(match.group(1)) * _LATENCY_UNITS.get(match.group(2).lower(), 0.0)


def parse_network(text: str, default_latency: float = 5e-6) -> Link:
    """'100Gbps' or '100Gbps,5us': a node's network bandwidth and the latency of one hop."""
    parts = text.split(",")
    if len(parts) > 2 or not parts[0].strip():
        raise ValueError(f"{text!r} is not a network; write BANDWIDTH[,LATENCY], e.g. "
                         "100Gbps or 100Gbps,5us")
    latency = parse_latency(parts[1]) if len(parts) == 2 else default_latency
    return Link(parse_bandwidth(parts[0]), latency)


# -- traffic -----------------------------------------------------------------------------------
def plan_step(model: nn.Module | int, config, world_size: int, *, gpus_per_node: int | None = None,
              largest_unit: int | None = None,
              param_groups: Iterable | None = None) -> list[PlannedCollective]:
    """The collectives one optimizer step (every micro-step of the accumulation window) issues
    for `model` (a module, possibly on the meta device, or a bare parameter count) under
    `config` on `world_size` ranks, `gpus_per_node` of them per node (default: one node), in
    the order the engine issues them. Follows the config's zero_hpz_partition_size (stage 3's
    backward gathers within blocks of that many ranks) and hierarchical_allgather (parameter
    gathers across nodes, then within). Assumes every stage-3 unit runs its forward once per
    micro-step. A bare count at stage 3 is cut into units of `largest_unit` elements (default
    reduce_bucket_size)."""
    from zero_ext.estimate import _module_layouts
    from zero_ext.zero.persistent import allgather_pieces
    from zero_ext.zero.placement import FROZEN

    config = ZeroConfig.load(config)
    zero = config.zero_optimization
    dtype = config.mixed_precision or torch.float32
    size = torch.empty((), dtype=dtype).element_size()
    comm_size = torch.empty((), dtype=config.comm_dtype or dtype).element_size()
    accumulation = config.resolve_batch(world_size).gradient_accumulation_steps
    per_node = gpus_per_node or world_size
    if world_size % per_node:
        raise ValueError(f"{world_size} ranks do not fill nodes of {per_node} GPUs; give a "
                         "multiple of the GPUs per node")
    nodes = world_size // per_node
    hierarchical = zero.hierarchical_allgather and 1 < nodes < world_size
    hpz = zero.zero_hpz_partition_size if zero.stage == 3 else 1
    if hpz > 1 and per_node % hpz:
        raise ValueError(f"zero_hpz_partition_size {hpz} must divide the GPUs per node "
                         f"({per_node})")
    if isinstance(model, nn.Module):
        units, whole, _ = _module_layouts(model, param_groups, zero, world_size, dtype)
    else:
        units, whole = _count_layouts(int(model), zero, world_size, largest_unit)
    prefetch = zero.stage3_prefetch_bucket_size > 0
    wire = _WireSizes(config, world_size, per_node, comm_size)
    reduce = "all_reduce" if zero.stage == 0 else "reduce_scatter"
    plan = []
    for micro in range(accumulation):
        boundary = micro == accumulation - 1

        def add(op, numel, element_size, phase, hidden, group="world", group_size=None,
                micro=micro, compressed=False):
            plan.append(PlannedCollective(op, numel, element_size, phase, hidden, group,
                                          group_size, micro, compressed))

        def gather(numel, phase, hidden, hpz_block=1):
            """A parameter all-gather of `numel` elements, as the engine moves it (stage 3's
            gathers for compute quantized under qwZ; hpZ's and the post-step ones exact)."""
            width = size if phase == "step" or hpz_block > 1 else wire.weights(numel, size)
            if hpz_block > 1:
                add("all_gather", numel, width, phase, hidden, "node", hpz_block)
            elif hierarchical:  # comm.hierarchical_all_gather's two hops
                add("all_gather", numel // per_node, width, phase, hidden, "across", nodes)
                add("all_gather", numel, width, phase, hidden, "node", per_node)
            else:
                add("all_gather", numel, width, phase, hidden)

        def reduction(numel):
            """A bucket's gradient reduction, as zero/compression.py moves it."""
            for op, n, width, group, group_size, compressed in wire.reduction(reduce, numel):
                add(op, n, width, "backward", zero.overlap, group, group_size,
                    compressed=compressed)

        for layouts in units:
            for layout in layouts:
                gather(layout.padded_numel, "forward", prefetch)
        reduce_now = boundary or zero.stage >= 2
        # Backward meets units and buckets in reverse; each unit is gathered, then reduced.
        for layouts in reversed(units):
            for layout in layouts:
                gather(layout.padded_numel, "backward", prefetch, hpz)
            for layout in layouts:
                if layout.group != FROZEN:  # stage 3's frozen buckets have no gradients
                    reduction(layout.padded_numel)
        for layout in whole if reduce_now else []:
            reduction(layout.padded_numel)
        if boundary:
            add("all_reduce", *_AGREEMENT, "backward" if zero.stage == 0 else "step", False)
            for layout in whole if zero.stage >= 1 else []:
                for lo, hi in allgather_pieces(layout.shard_numel, world_size,
                                               zero.allgather_bucket_size):
                    gather((hi - lo) * world_size, "step", False)
    return plan


class _WireSizes:
    """Bytes per element on the wire of the collectives compression changes (docs/compression.md),
    exactly as comm/compressed.py sends them: packed quantized rows (ops.quantized_row_bytes of
    a chunk, its last block padded) or top-k (index, value) rows, over the chunk's elements. The
    plan counts them in comm's ring sense, which an all-to-all matches: n(N-1)/N of its input."""

    def __init__(self, config: ZeroConfig, world_size: int, per_node: int, comm_size: int):
        self.plan = config.compression()
        self.world, self.per_node, self.comm_size = world_size, per_node, comm_size
        self.on = world_size > 1  # one rank sends nothing, so nothing is compressed

    def weights(self, numel: int, size: int) -> float:
        """qwZ: each rank's shard (numel / world elements) as one int8 row."""
        if not self.on or self.plan.weights == "none":
            return size
        m = numel // self.world
        return ops.quantized_row_bytes(m, 8, self.plan.weight_block) / m

    def reduction(self, op: str, numel: int) -> list[tuple]:
        """(op, numel, bytes per element, group, group size, compressed) of each collective
        that moves a bucket's reduction of `numel` elements."""
        exact = [(op, numel, self.comm_size, "world", None, False)]
        if not self.on or self.plan.gradients == "none":
            return exact
        m = numel // self.world
        if self.plan.grad_bits is not None:
            width = ops.quantized_row_bytes(m, self.plan.grad_bits, self.plan.grad_block) / m
            nodes = self.world // self.per_node
            if self.plan.two_hop and 1 < nodes < self.world:  # within the node, then across
                return [(op, numel, width, "node", self.per_node, True),
                        (op, numel // self.per_node, width, "across", nodes, True)]
            return [(op, numel, width, "world", None, True)]
        # top-k at the target density (after any warm-up): k (int32 index, value) pairs per
        # chunk, unless that is not smaller than the chunk (then the exact collective).
        k = _topk_k(self.plan.density, m)
        if not _sparse_pays(k, m, self.comm_size):
            return exact
        width = k * (4 + self.comm_size) / m
        if op == "all_reduce":  # stage 0: a sparse reduce-scatter, then a sparse all-gather
            return [(op, numel, width / 2, "world", None, True)] * 2
        return [(op, numel, width, "world", None, True)]


def _count_layouts(numel: int, zero, world_size: int, largest_unit: int | None):
    """Layouts for a bare parameter count: one group in reduce_bucket_size buckets, or at
    stage 3 units of `largest_unit` elements, each one bucket."""
    if numel < 1:
        raise ValueError(f"a model needs at least one parameter, got {numel}")
    piece = (largest_unit or zero.reduce_bucket_size) if zero.stage == 3 \
        else zero.reduce_bucket_size
    full, rest = divmod(numel, piece)
    sizes = [piece] * full + ([rest] if rest else [])
    if zero.stage == 3:
        return [plan_buckets([n], [torch.Size([n])], [0], world_size, piece) for n in sizes], []
    return [], plan_buckets(sizes, [torch.Size([n]) for n in sizes], [0] * len(sizes),
                            world_size, zero.reduce_bucket_size)


def planned_traffic(plan: Sequence[PlannedCollective], cluster_or_world: Cluster | int,
                    transport: str = "ring") -> CollectiveTraffic:
    """The traffic counters a real step following `plan` would show on one rank (group rank
    0) over `transport` (comm.wire_sends: "ring" for NCCL and one host's arena, "gloo" for
    gloo's own collectives): each collective counted by comm's own CollectiveTraffic.count,
    a compressed one (an all-to-all) as the ring on either."""
    traffic = CollectiveTraffic()
    for c in plan:
        traffic.count(c.op, c.numel, c.element_size, _ranks(c, cluster_or_world),
                      transport="ring" if c.compressed else transport)
    return traffic


def _ranks(c: PlannedCollective, cluster_or_world: Cluster | int) -> int:
    world = cluster_or_world if isinstance(cluster_or_world, int) else cluster_or_world.world_size
    return world if c.group_size is None else c.group_size


# -- time --------------------------------------------------------------------------------------
def collective_seconds(c: PlannedCollective, cluster: Cluster) -> float:
    """alpha-beta time of one collective: a ring over its ranks, at the network's (or the
    fitted) link when they span nodes, at the intra-node link otherwise. A hop across nodes
    (one rank per node) runs on every local rank at once: each has 1/P of the node's
    network bandwidth."""
    ranks = _ranks(c, cluster)
    if ranks == 1:
        return 0.0
    if c.group == "node" or cluster.nodes == 1:
        link = cluster.intra
    else:
        link = cluster.fitted.get(c.op, cluster.network)
        if c.group == "across":
            link = Link(link.bandwidth / cluster.gpus_per_node, link.latency)
    steps = (ranks - 1) * (2 if c.op == "all_reduce" else 1)
    ring_bytes = ring_elements(c.op, c.numel, ranks) * c.element_size
    return steps * link.latency + ring_bytes / link.bandwidth


def _host_seconds(c: PlannedCollective, cluster: Cluster) -> float:
    """The part of a collective that occupies the ranks' cores (Cluster.host), 0 without."""
    if c.op not in cluster.host:
        return 0.0
    return collective_seconds(c, replace(cluster, network=cluster.host[c.op],
                                         fitted={}, intra=cluster.host[c.op]))


def _shared_core(compute: float, host: float, link: float, share: float) -> float:
    """Seconds until both the compute (`compute` seconds of one core) and a chain of
    collectives (`link` seconds on the link, `host` seconds of CPU work on the same core) end,
    the core shared fairly: the collectives take the share of the core they need (host / link
    per second of link time), at most `share` while the compute runs (which gets the rest);
    whichever ends first leaves the core to the other. Without host work: max(compute, link);
    with host work at most `share` per second: max(compute + host, link)."""
    if host <= 0 or link <= 0 or compute <= 0:
        return max(compute + host, link)
    need = host / link                      # the core the collectives use at the link's rate
    taken = min(need, share)
    compute_ends = compute / (1 - taken)    # both running throughout
    link_ends = host / taken                # link time, slowed to taken / need of its rate
    if link_ends <= compute_ends:
        return compute + host               # the core never idles: its work, in a row
    return compute_ends + link - compute_ends * taken / need


def predict_step(plan: Sequence[PlannedCollective], cluster: Cluster, compute: Compute, *,
                 stage: int, hpz: int = 1, transform: Callable[[list[PlannedCollective]], list[PlannedCollective]]
                 | None = None) -> StepPrediction:
    """Step time of `plan` on `cluster` with `compute` per micro-step, by the overlap rules of
    the module docstring. `transform` rewrites the plan into what goes on the wire (the hook
    for compressed collectives: fewer bytes per element, an extra exchange)."""
    plan = list(transform(list(plan)) if transform is not None else plan)
    n = cluster.world_size
    optimizer = compute.optimizer / (n if stage >= 1 else 1)
    micro_steps = max((c.micro_step for c in plan), default=0) + 1
    seconds, communication, exposed_total = 0.0, 0.0, 0.0
    for micro in range(micro_steps):
        mine = [c for c in plan if c.micro_step == micro]
        for phase, work, edge in (("forward", compute.forward, 0), ("backward", compute.backward,
                                                                     -1)):
            times = [(collective_seconds(c, cluster), c.hidden, _host_seconds(c, cluster))
                     for c in mine if c.phase == phase]
            hidden = [(t, cores) for t, h, cores in times if h]
            # The first prefetched gather (forward) / the last reduction (backward) has no
            # compute left to hide behind (nor to share its core with).
            edge_s = hidden[edge][0] if hidden else 0.0
            exposed = sum(t for t, h, _ in times if not h) + edge_s
            behind = sum(t for t, _ in hidden) - edge_s
            # The hidden collectives' link time and their work on the compute's cores.
            cores = sum(min(t, c) for t, c in hidden) - (min(hidden[edge]) if hidden else 0.0)
            both = _shared_core(work, cores, behind, cluster.host_share)
            seconds += both + exposed
            exposed_total += exposed + both - work
            communication += sum(t for t, _, _ in times)
    step_comm = sum(collective_seconds(c, cluster) for c in plan if c.phase == "step")
    seconds += optimizer + step_comm
    communication += step_comm
    exposed_total += step_comm
    return StepPrediction(stage=stage, world_size=n, seconds=seconds,
                          compute=micro_steps * (compute.forward + compute.backward) + optimizer,
                          communication=communication, exposed=exposed_total,
                          traffic=planned_traffic(plan, cluster), hpz=hpz)


def recommend(predictions: Sequence[StepPrediction], memory: dict[str, int] | None = None,
              capacity: int | None = None, tolerance: float = 0.05) -> tuple[str, str]:
    """(label, reason): the configuration to pick. Among those that fit `capacity` bytes per
    GPU (`memory`: label -> bytes, from zero_ext.estimate), the ones within `tolerance` of the
    fastest step are as fast; of those, the one holding the least memory (the higher stage:
    the room goes to a larger batch or longer sequences). So a fast network, where stage 3's
    gathers hide behind compute, picks stage 3; a slow one, where they do not, stage 1 or 2."""
    fits = [p for p in predictions
            if capacity is None or memory is None or memory[p.label] <= capacity]
    if not fits:
        return "none", (f"no configuration fits {capacity / 1e9:.0f} GB per GPU: add GPUs, "
                        "offload the optimizer or parameters, or a larger GPU")
    best = min(p.seconds for p in fits)
    fast = [p for p in fits if p.seconds <= best * (1 + tolerance)]
    # Least memory: from the table when given, else the higher stage / larger hpZ last.
    pick = min(fast, key=lambda p: (memory[p.label] if memory else 0, -p.stage, p.hpz))
    by_stage = {p.label: p for p in predictions}
    reason = f"{pick.label}: {pick.seconds:.3g} s/step"
    slower = [p for p in fits if p not in fast]
    if len(fast) > 1:
        others = ", ".join(p.label for p in fast if p is not pick)
        reason += (f", as fast as {others} (within {tolerance:.0%}) and holding the least "
                   "memory of them")
    if slower:
        reason += "; " + ", ".join(f"{p.label} {p.seconds / pick.seconds:.2f}x slower "
                                   f"({p.exposed:.3g} s of communication not hidden)"
                                   for p in slower)
    one, three = by_stage.get("stage 1"), by_stage.get("stage 3")
    too_big = [p.label for p in predictions if p not in fits]
    if too_big:
        reason += (f"; {', '.join(too_big)} would not fit {capacity / 1e9:.0f} GB "
                   "per GPU")
    if one is not None and three is not None and one.traffic.bytes and three.traffic.bytes:
        ratio = sum(three.traffic.bytes.values()) / sum(one.traffic.bytes.values())
        reason += f" (stage 3 moves {ratio:.2f}x stage 1's bytes)"
    return pick.label, reason
