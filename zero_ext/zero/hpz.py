"""Stage 3's secondary partition (ZeRO++ hpZ, DeepSpeed's zero_hpz_partition_size).

PartitionedParameters calls this module when zero_hpz_partition_size > 1. Next to its primary
shard (1/N of each unit bucket, the slice the optimizer steps), each rank keeps a secondary
shard: 1/L of the bucket, L = zero_hpz_partition_size ranks of its node (a block of
consecutive ranks, comm/topology.py), in the compute dtype, in the same memory as the primary
shards (host memory under offload_param). The forward's gather of a unit (over every rank,
flat or hierarchical) refreshes it from the gathered buffer, at no extra traffic; a gather
inside backward then all-gathers the secondary shards within the block: the same values bit
for bit, and no byte crosses nodes.

When a secondary copy may be used: only inside backward (where the gathers of a training step
come after that step's forward), and only for a unit whose copy was refreshed since the last
end of backward. Everything that rewrites shards (the optimizer step, a checkpoint load,
GatheredParameters with a modifier) comes after a backward ended or says so
(`invalidate`), so a copy never outlives the values it was taken from (the bug of DeepSpeed
#7606: a first step after loading a checkpoint gathered stale secondary copies). The choice
depends only on the order of gathers, which is the same on every rank, so every rank takes
the same path.
"""

from __future__ import annotations

import torch

from zero_ext.comm import CommGroup
from zero_ext.zero.offload import host_buffer
from zero_ext.zero.partition import BucketLayout

__all__ = ["SecondaryPartition", "secondary_numel"]


def secondary_numel(layouts: list[BucketLayout], partition_size: int) -> int:
    """Elements of the secondary shards of these unit buckets on one rank
    (zero_hpz_partition_size = `partition_size`; 0 when hpZ is off). Engine and estimator
    plan memory by it; SecondaryPartition allocates by it."""
    if partition_size <= 1:
        return 0
    return sum(layout.padded_numel // partition_size for layout in layouts)


def in_backward() -> bool:
    """Whether the autograd engine is running (this thread is inside a backward)."""
    return torch._C._current_graph_task_id() != -1


class SecondaryPartition:
    """The secondary shards of every unit bucket, and which of them are current."""

    def __init__(self, group: CommGroup, rank: int, layouts: list[BucketLayout],
                 dtype: torch.dtype, device: torch.device, offload: bool, pin: bool):
        self.group = group
        self.index = group.ranks.index(rank)   # this rank's slice of each bucket
        self.shards: dict[int, torch.Tensor] = {}
        for layout in layouts:
            numel = secondary_numel([layout], group.size)
            self.shards[layout.index] = host_buffer(numel, dtype, pin) if offload else \
                torch.zeros(numel, dtype=dtype, device=device)
        self._current: set[int] = set()       # bucket indices refreshed since invalidate()

    def _range(self, layout: BucketLayout) -> tuple[int, int]:
        numel = secondary_numel([layout], self.group.size)
        return self.index * numel, (self.index + 1) * numel

    def sources(self, layouts: list[BucketLayout]) -> list[torch.Tensor] | None:
        """The secondary shards to gather `layouts` from, when a gather may use them now."""
        if not in_backward() or any(layout.index not in self._current for layout in layouts):
            return None
        return [self.shards[layout.index] for layout in layouts]

    @torch.no_grad()
    def refresh(self, layouts: list[BucketLayout], fulls: list[torch.Tensor]) -> None:
        """After a gather over every rank: this rank's slice of the gathered buckets."""
        for layout, full in zip(layouts, fulls):
            start, end = self._range(layout)
            # Asynchronous into pinned host shards (offload_param): a blocking copy would stall
            # the host once per unit in every forward. Only the backward's gather reads them,
            # through the upload stream, which waits for the compute stream (this copy) first;
            # `full` goes back to the allocator on the compute stream, after this copy.
            self.shards[layout.index].copy_(full[start:end], non_blocking=True)
            self._current.add(layout.index)

    def invalidate(self, layout_index: int | None = None) -> None:
        """The primary shards may change (one bucket, or all): gathers go over every rank
        until the next forward refreshes the copies."""
        if layout_index is None:
            self._current.clear()
        else:
            self._current.discard(layout_index)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shards.values())
