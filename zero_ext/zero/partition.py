"""Shard arithmetic: how parameters are laid out in flat buckets and which rank owns what.

Called by the engine at initialize to plan its buckets, and by the gradient buckets and the
sharded optimizer to find their slices. Pure arithmetic on sizes: no tensors are allocated here.

Layout: the trainable parameters of one parameter group (one dtype) are cut into buckets of
about `bucket_numel` elements, in reverse registration order (the order autograd tends to
produce their gradients). Inside a bucket each parameter starts at a multiple of ALIGN elements
(so every view is vector-aligned), and the bucket is padded to a multiple of world_size * ALIGN.
Rank r owns elements [r*S, (r+1)*S) of every bucket of S*world_size elements: one
reduce-scatter and one all-gather move a whole bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ALIGN", "BucketLayout", "ParamSlot", "plan_buckets"]

# Elements; 64 bytes of fp32, so a parameter's view starts on a cache line and a SIMD boundary.
ALIGN = 16


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives inside its bucket."""

    param_index: int   # index of the parameter in the engine's list of trainable parameters
    offset: int        # first element in the bucket's flat buffer
    numel: int
    shape: torch.Size


@dataclass(frozen=True)
class BucketLayout:
    """One flat buffer: its parameters, its padded size, and each rank's shard of it."""

    index: int                     # position among all buckets (launch order of collectives)
    group: int                     # parameter-group index; one group's hyperparameters per bucket
    slots: tuple[ParamSlot, ...]   # in offset order
    padded_numel: int              # multiple of world_size * ALIGN
    world_size: int

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """[start, end) of the elements rank `rank` owns."""
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    @property
    def used_numel(self) -> int:
        """Elements that belong to parameters (the rest is alignment and padding, kept zero)."""
        return sum(slot.numel for slot in self.slots)

    def owners(self, slot: ParamSlot) -> range:
        """The ranks whose shards hold part of `slot`."""
        first = slot.offset // self.shard_numel
        last = (slot.offset + max(slot.numel, 1) - 1) // self.shard_numel
        return range(first, last + 1)


def plan_buckets(param_numels: Sequence[int], param_shapes: Sequence[torch.Size],
                 group_of_param: Sequence[int], world_size: int,
                 bucket_numel: int) -> list[BucketLayout]:
    """Buckets for the given trainable parameters (registration order, as the engine lists them).

    A bucket holds parameters of one group only and closes once it reaches `bucket_numel`
    elements; a parameter larger than that gets a bucket of its own. Each group keeps one open
    bucket while the walk goes on, so interleaved groups (a weight with decay, its bias
    without) do not cut each other's buckets short. Buckets are numbered in the order they
    open, which is the order backward reaches them.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if bucket_numel < 1:
        raise ValueError(f"bucket size must be >= 1 element, got {bucket_numel}")
    opened: list[tuple[int, list[ParamSlot]]] = []  # (group, slots) in the order they opened
    open_by_group: dict[int, tuple[list[ParamSlot], list[int]]] = {}  # group -> (slots, [end])

    for index in reversed(range(len(param_numels))):
        group = group_of_param[index]
        if group in open_by_group and open_by_group[group][1][0] >= bucket_numel:
            del open_by_group[group]
        if group not in open_by_group:
            slots: list[ParamSlot] = []
            opened.append((group, slots))
            open_by_group[group] = (slots, [0])
        slots, end = open_by_group[group]
        offset = _round_up(end[0], ALIGN)
        slots.append(ParamSlot(index, offset, param_numels[index], param_shapes[index]))
        end[0] = offset + param_numels[index]

    buckets = []
    for position, (group, slots) in enumerate(opened):
        used_end = slots[-1].offset + slots[-1].numel
        padded = _round_up(max(used_end, 1), world_size * ALIGN)
        buckets.append(BucketLayout(position, group, tuple(slots), padded, world_size))
    return buckets
