"""Which node every rank runs on, the process groups within and across nodes, and the
hierarchical all-gather that uses them.

comm.init_distributed detects the topology once per process group (a collective), from
torchrun's variables: GROUP_RANK (the node's index), LOCAL_RANK and LOCAL_WORLD_SIZE; without
GROUP_RANK, node = rank // LOCAL_WORLD_SIZE (torchrun numbers a node's ranks contiguously);
without either, from the hostnames every rank reports. collectives.py then counts each
collective's bytes by link class (within a node, across nodes). Stage 3 asks for the groups:
the ranks of this node (hpZ's secondary partition, zero_hpz_partition_size), a block of them,
and the ranks with this local index on every node (the first hop of the hierarchical
all-gather). Groups are created on first use, by every rank in the same order (the callers
are collective), and kept for the life of the process group.
"""

from __future__ import annotations

import os
import socket
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zero_ext.comm import collectives
from zero_ext.comm.collectives import CommGroup, all_gather, all_gather_object, new_groups
from zero_ext.comm.watch import current_watch

__all__ = ["Topology", "TopologyError", "current_topology", "detect_topology",
           "hierarchical_all_gather"]


class TopologyError(ValueError):
    """The nodes' layout does not allow what was asked (uneven ranks per node, a group size
    that does not fit a node)."""


@dataclass(eq=False)
class Topology:
    """The node of every rank of the default process group."""

    rank: int
    node_of_rank: tuple[int, ...]    # node index of each rank, nodes numbered from 0
    source: str                      # where it came from: "torchrun", "LOCAL_WORLD_SIZE", ...
    _groups: dict = field(default_factory=dict, repr=False)  # (kind, size) -> CommGroup

    @property
    def world_size(self) -> int:
        return len(self.node_of_rank)

    @property
    def nodes(self) -> int:
        return max(self.node_of_rank) + 1

    @property
    def node(self) -> int:
        return self.node_of_rank[self.rank]

    def ranks_on(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of_rank) if n == node]

    def describe(self) -> str:
        counts = [len(self.ranks_on(n)) for n in range(self.nodes)]
        return (f"{self.world_size} ranks on {self.nodes} node(s) with "
                f"{', '.join(map(str, counts))} rank(s) (from {self.source})")

    def ranks_per_node(self, needed_for: str) -> int:
        """The number of ranks on each node, when every node has the same number in a
        contiguous block of ranks (what torchrun's --nproc_per_node gives); else an error
        saying what `needed_for` supports."""
        per_node = self.world_size // self.nodes
        expected = tuple(r // per_node for r in range(self.world_size))
        if self.world_size % self.nodes or self.node_of_rank != expected:
            raise TopologyError(
                f"zero_ext: {needed_for} needs the same number of ranks on every node, "
                f"numbered node by node (torchrun --nproc_per_node=K on every node); this job "
                f"has {self.describe()}, ranks by node {list(self.node_of_rank)}. Launch the "
                "same number of ranks per node, or turn the option off")
        return per_node

    # -- groups ---------------------------------------------------------------------------------
    def _group(self, kind: str, size: int, blocks: list[list[int]]) -> CommGroup:
        key = (kind, size)
        if key not in self._groups:
            self._groups[key] = new_groups(blocks)
        return self._groups[key]

    def block_group(self, size: int, needed_for: str) -> CommGroup:
        """This rank's group among the blocks of `size` consecutive ranks inside a node
        (size = ranks per node: the node's group). Collective on first use."""
        per_node = self.ranks_per_node(needed_for)
        if size < 1 or per_node % size:
            raise TopologyError(
                f"zero_ext: {needed_for} = {size} must divide the ranks per node ({per_node}; "
                f"{self.describe()}) so that its groups stay within a node; use {per_node} or a "
                f"divisor of it ({', '.join(str(d) for d in _divisors(per_node))})")
        blocks = [list(range(start, start + size))
                  for start in range(0, self.world_size, size)]
        return self._group("block", size, blocks)

    def node_group(self, needed_for: str) -> CommGroup:
        return self.block_group(self.ranks_per_node(needed_for), needed_for)

    def hierarchical_groups(self) -> tuple[CommGroup, CommGroup] | None:
        """The two hops of hierarchical_all_gather (across nodes, within the node), or None
        where it is the flat all-gather (one node, or one rank per node). Collective on first
        use; raises for nodes of different sizes."""
        if self.nodes == 1 or self.nodes == self.world_size:
            return None
        what = "zero_optimization.hierarchical_allgather"
        return self.across_nodes_group(what), self.node_group(what)

    def across_nodes_group(self, needed_for: str) -> CommGroup:
        """The ranks with this rank's local index, one per node. Collective on first use."""
        per_node = self.ranks_per_node(needed_for)
        blocks = [list(range(local, self.world_size, per_node)) for local in range(per_node)]
        return self._group("across", per_node, blocks)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_current: Topology | None = None
_current_group: weakref.ref | None = None


def detect_topology() -> Topology:
    """Collective (one small all-gather): every rank's node, from torchrun's variables or the
    hostnames; installs it for the traffic counters and returns it."""
    global _current, _current_group
    size, rank = collectives.world_size(), collectives.rank()
    env = {name: os.environ.get(name) for name in ("GROUP_RANK", "LOCAL_RANK",
                                                   "LOCAL_WORLD_SIZE")}
    reports = all_gather_object((socket.gethostname(), env)) if size > 1 else \
        [(socket.gethostname(), env)]
    watch = current_watch()
    if watch is not None:
        # Every rank's host known from the start: a stall report names the ranks of a node cut
        # off in the first seconds, before the heartbeats (a few hosts each) have told them.
        for r, (host, _) in enumerate(reports):
            watch.nodes.learn(r, host)
    nodes, group = _nodes_from(reports), dist.group.WORLD if dist.is_initialized() else None
    if (_current is not None and group is not None and _current_group is not None
            and _current_group() is group and _current.node_of_rank == nodes):
        # The same group and layout (another initialize): keep its subgroups, made on first
        # use; new ones each time would leave the old communicators (NCCL: device memory)
        # behind. Every rank decides alike: the reports are the same everywhere.
        topology = _current
        topology.source = _source(reports)  # what described it this time, for its messages
    else:
        topology = Topology(rank, nodes, _source(reports))
    _current = topology
    _current_group = weakref.ref(group) if group is not None else None
    collectives.set_node_of_rank(topology.node_of_rank)
    return topology


def _source(reports) -> str:
    envs = [env for _, env in reports]
    if all(env["GROUP_RANK"] is not None and env["LOCAL_WORLD_SIZE"] is not None
           for env in envs):
        return "torchrun's GROUP_RANK"
    if all(env["LOCAL_WORLD_SIZE"] is not None for env in envs):
        return "LOCAL_WORLD_SIZE"
    return "hostnames"


def _nodes_from(reports) -> tuple[int, ...]:
    """Node index per rank; raises TopologyError naming the variables that disagree."""
    source = _source(reports)
    if source == "hostnames":
        first_seen: dict[str, int] = {}
        return tuple(first_seen.setdefault(host, len(first_seen)) for host, _ in reports)
    if source == "LOCAL_WORLD_SIZE":
        sizes = {int(env["LOCAL_WORLD_SIZE"]) for _, env in reports}
        local = [int(env["LOCAL_RANK"] or -1) for _, env in reports]
        declared = [env["LOCAL_WORLD_SIZE"] for _, env in reports]
        per_node = sizes.pop() if len(sizes) == 1 else None
        if per_node is None or per_node < 1 or len(reports) % per_node or any(
                lr != r % per_node for r, lr in enumerate(local)):
            raise TopologyError(
                "zero_ext: LOCAL_WORLD_SIZE / LOCAL_RANK do not describe nodes of contiguous "
                f"ranks (LOCAL_WORLD_SIZE per rank: {declared}, LOCAL_RANK per rank: {local}); "
                "launch with torchrun, which sets GROUP_RANK too, or unset them to detect "
                "nodes by hostname")
        return tuple(r // per_node for r in range(len(reports)))
    groups = [int(env["GROUP_RANK"]) for _, env in reports]
    order = {g: i for i, g in enumerate(sorted(set(groups)))}
    nodes = tuple(order[g] for g in groups)
    for node in range(len(order)):
        members = [r for r, n in enumerate(nodes) if n == node]
        declared = {int(reports[r][1]["LOCAL_WORLD_SIZE"]) for r in members}
        locals_ = sorted(int(reports[r][1]["LOCAL_RANK"]) for r in members)
        if declared != {len(members)} or locals_ != list(range(len(members))):
            raise TopologyError(
                f"zero_ext: torchrun's variables disagree on node {node} (GROUP_RANK "
                f"{sorted(order)[node]}): ranks {members} report LOCAL_WORLD_SIZE "
                f"{sorted(declared)} and LOCAL_RANK {locals_}; every rank of a node must come "
                "from the same torchrun agent")
    return nodes


def known_topology() -> Topology | None:
    """The current default group's topology if it was detected (no collective), else None."""
    if _current is None or (dist.is_initialized() and (
            _current_group is None or _current_group() is not dist.group.WORLD)):
        return None
    return _current


def current_topology() -> Topology:
    """The topology of the current default group (detected now if it was not: collective)."""
    known = known_topology()
    return detect_topology() if known is None else known


# -- the hierarchical all-gather -----------------------------------------------------------------
class _HierarchicalWork:
    """An all-gather in two hops: the first (across nodes) in flight, the second (within the
    node) issued and waited for by wait(), then the chunks put in rank order."""

    def __init__(self, first, finish):
        self._first, self._finish = first, finish

    def wait(self, timeout=None) -> bool:
        if self._first is not None:
            self._first.wait()
        self._finish()
        self._finish = lambda: None
        self._first = None
        return True

    def is_completed(self) -> bool:
        return self._first is None


def hierarchical_all_gather(output: torch.Tensor, input: torch.Tensor, async_op: bool = False,
                            bucket: int | None = None):
    """comm.all_gather's result (every rank's `input` in rank order), moved in two hops, as
    MiCS's hierarchical gather: across nodes among the ranks with this local index (each node
    receives every other node's data once), then within the node. Over the slow link a node
    receives (M-1)/M of the output instead of a flat ring's (N-1)/N (M nodes, N ranks); the
    bytes within nodes grow to make up the total. One node, or one rank per node: the flat
    all-gather."""
    groups = current_topology().hierarchical_groups()
    if groups is None:
        return all_gather(output, input, async_op=async_op, bucket=bucket)
    across, within = groups
    nodes, per_node, n = across.size, within.size, input.numel()
    # first hop: [node][n] of this local index; second hop: [local][node][n]
    mine = torch.empty(nodes * n, dtype=input.dtype, device=input.device)
    first = all_gather(mine, input.reshape(-1), async_op=True, bucket=bucket, group=across)
    everyone = torch.empty(per_node * nodes * n, dtype=input.dtype, device=input.device)

    def finish() -> None:
        all_gather(everyone, mine, bucket=bucket, group=within)
        output.view(nodes, per_node, n).copy_(everyone.view(per_node, nodes, n).transpose(0, 1))

    work = _HierarchicalWork(first, finish)
    if async_op:
        return work
    work.wait()
    return None
