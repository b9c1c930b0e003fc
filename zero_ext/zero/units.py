"""Stage 3's gather unit: a module whose parameters are gathered and released together, its
shards, gathered buffers and the bookkeeping of its forwards and backward (the state that
PartitionedParameters, its UnitHooks and the Prefetcher read and change)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import nn

from zero_ext.zero.partition import BucketLayout

__all__ = ["GatherUnit", "UnitState"]


class UnitState(enum.Enum):
    SHARDED = "sharded"      # parameters hold empty tensors; only the shard exists
    GATHERING = "gathering"  # a prefetch all-gather is in flight into the full buffers
    GATHERED = "gathered"    # parameters are views of the full buffers


@dataclass(eq=False)
class GatherUnit:
    module: nn.Module
    layouts: list[BucketLayout]              # one per optimizer group among its parameters,
                                             # then one of its frozen parameters (if any)
    params: list[list[nn.Parameter]]         # per layout, in slot order
    shards: list[torch.Tensor]               # per layout, this rank's slice (model dtype)
    fulls: list[torch.Tensor | None] = field(default_factory=list)  # gathered buffers
    state: UnitState = UnitState.SHARDED
    reduced: int = 0                         # layouts reduced in the current backward
    # Frozen parameters' backward (their inputs' gradients) reduces nothing: the forwards
    # whose inputs' gradients this backward has not computed yet, and the trainable parameters
    # in its modules outside its buckets (kept whole, or an inner unit's: their gradients may
    # need the frozen weights' backward) and how many of them have their gradient so far
    # (see UnitHooks).
    inputs_pending: int = 0
    inputs_registered: int = 0  # forwards hooked since the last backward that freed its graph
    outside_trainable: int = 0
    outside_seen: int = 0
    backward_done: bool = False              # all of them reduced: its backward is over
    pending: list = field(default_factory=list)  # in-flight prefetch gathers (handles)
    holders: int = 0                         # external users whose forward is running
    # offload_param: device copies of the host shards feeding the in-flight all-gathers, and
    # (CUDA) the event on the upload stream after their copies and all-gathers: the host
    # shards must not be rewritten before it, and the compute stream waits for it at use.
    uploads: list = field(default_factory=list)
    uploaded: object | None = None
    refreshes: bool = False                  # the gather in flight refreshes hpZ's copy
    quantized: bool = False                  # gathered with qwZ: the values are dequantized
    codes: bool = False                      # holds packed 4-bit codes: gathered exactly
    # Holds a leaf module (zero/leaves.py: a mixture of experts): its backward is over once its
    # forwards' inputs have their gradients; its trainable buckets are then reduced, the
    # parameters without a gradient counting as zero (on_backward_over).
    leaf: bool = False
    untracked_use: bool = False  # a leaf's forward since the last backward on inputs needing
                                 # no gradient: its buckets wait for the end of backward

    @property
    def numel(self) -> int:
        return sum(layout.padded_numel for layout in self.layouts)

    @property
    def trainable_layouts(self) -> int:
        """Its first layouts, those with gradients (the rest hold frozen parameters)."""
        return sum(layout.group >= 0 for layout in self.layouts)

    @property
    def has_frozen(self) -> bool:
        return self.trainable_layouts < len(self.layouts)

    @property
    def waits_for_inputs(self) -> bool:
        """Whether its backward ends with its inputs' gradients (UnitHooks hooks them): frozen
        parameters reduce nothing, and a leaf's parameters may get no gradient."""
        return self.has_frozen or self.leaf
