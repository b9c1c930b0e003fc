"""The parameter buckets every rank keeps whole: all of them below stage 3, and at stage 3 the
ones outside the gather units (zero/placement.py decides which).

`PersistentParameters` owns their flat buffers, which the model's parameters become views of,
and keeps every rank's copy of them the same: after an optimizer step each rank's updated
slice goes to every rank (all-gathers of at most allgather_bucket_size elements, cut by
`allgather_pieces`, which zero_ext.scaling plans a step's traffic by), after
GatheredParameters the modifying rank's values go to all (a broadcast). The stage-3 units'
buckets have the same duties in PartitionedParameters (params.py); the engine (engine.py)
holds one of each and asks the one that `owns` a bucket.
"""

from __future__ import annotations

import torch
from torch import nn

from zero_ext import comm
from zero_ext.zero.partition import BucketLayout

__all__ = ["PersistentParameters", "allgather_pieces"]


def allgather_pieces(shard_numel: int, world_size: int,
                     allgather_bucket_size: int) -> list[tuple[int, int]]:
    """The [lo, hi) ranges of a shard that the post-step all-gathers move, one collective each:
    allgather_bucket_size bounds the elements of one all-gather (the whole shard when it fits).
    The engine gathers by these; zero_ext.scaling plans a step's traffic by them."""
    piece = max(allgather_bucket_size // world_size, 1)
    if shard_numel <= piece:
        return [(0, shard_numel)]
    return [(lo, min(lo + piece, shard_numel)) for lo in range(0, shard_numel, piece)]


class PersistentParameters:
    """`layouts`: the persistent buckets, in the order of `flats` (one buffer each, in the
    model dtype, padded to a multiple of the world size). `sharded`: each rank updates its
    own slice (stages 1-3; at stage 0 every rank steps every element). `hierarchical`: the
    all-gathers go across nodes first, then within (hierarchical_allgather)."""

    def __init__(self, layouts: list[BucketLayout], params: list[nn.Parameter], *, rank: int,
                 world_size: int, sharded: bool, dtype: torch.dtype, device: torch.device,
                 allgather_bucket_size: int, hierarchical: bool = False):
        self.layouts = layouts
        self.rank, self.world_size, self.sharded = rank, world_size, sharded
        self.allgather_bucket_size = allgather_bucket_size
        # Asked now, at the same point on every rank: the topology's groups are made
        # collectively on first use, and nodes of different sizes are refused here.
        two_hops = hierarchical and comm.current_topology().hierarchical_groups() is not None
        self._gather = comm.hierarchical_all_gather if two_hops else comm.all_gather
        self.flats = [self._flatten(layout, params, dtype, device) for layout in layouts]
        self._by_index = {layout.index: (layout, flat)
                          for layout, flat in zip(layouts, self.flats)}
        # Where each parameter's tensor must stay: its slot of its bucket's flat buffer (read
        # at each check: offload_states moves a buffer and its views together).
        self._views = [(params[slot.param_index], flat, slot.offset * flat.element_size())
                       for layout, flat in zip(layouts, self.flats) for slot in layout.slots]

    def detached(self) -> list[nn.Parameter]:
        """The parameters no longer viewing their flat buffer (`param.data = tensor` after
        initialize): the optimizer updates the buffer, so they would silently stop training."""
        return [param for param, flat, offset in self._views
                if param.data_ptr() != flat.data_ptr() + offset]

    @staticmethod
    @torch.no_grad()
    def _flatten(layout: BucketLayout, params: list[nn.Parameter], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        """The bucket's flat buffer, each of its parameters moved in and made a view of it."""
        flat = torch.zeros(layout.padded_numel, dtype=dtype, device=device)
        for slot in layout.slots:
            param = params[slot.param_index]
            view = flat[slot.offset:slot.offset + slot.numel].view(param.shape)
            view.copy_(param.data)
            param.data = view
        return flat

    def owns(self, layout_index: int) -> bool:
        return layout_index in self._by_index

    def to_update(self, layout_index: int) -> torch.Tensor:
        """The elements of the bucket that this rank's optimizer updates (a view)."""
        layout, flat = self._by_index[layout_index]
        if not self.sharded:
            return flat
        start, end = layout.shard_range(self.rank)
        return flat[start:end]

    @torch.no_grad()
    def all_gather(self) -> None:
        """Every rank's updated slice of every bucket, into every rank's flat buffers."""
        for layout, flat in zip(self.layouts, self.flats):
            shard = layout.shard_numel
            start, _ = layout.shard_range(self.rank)
            pieces = allgather_pieces(shard, self.world_size, self.allgather_bucket_size)
            if len(pieces) == 1:
                self._gather(flat, flat[start:start + shard], bucket=layout.index)
                continue
            views = flat.view(self.world_size, shard)
            for lo, hi in pieces:
                gathered = torch.empty((self.world_size, hi - lo), dtype=flat.dtype,
                                       device=flat.device)
                self._gather(gathered.view(-1), views[self.rank, lo:hi].contiguous(),
                             bucket=layout.index)
                views[:, lo:hi].copy_(gathered)

    @torch.no_grad()
    def broadcast(self, layout_index: int, src: int) -> None:
        """Rank `src`'s values of one bucket into every rank's buffer (the model's tensors)."""
        comm.broadcast(self._by_index[layout_index][1], src=src)
