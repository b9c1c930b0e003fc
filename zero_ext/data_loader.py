"""The loader `zero_ext.initialize(training_data=...)` and `engine.deepspeed_io()` return.

DeepSpeed scripts use its DeepSpeedDataLoader's interface: `batch_size` (the micro-batch),
`data_sampler` (whose `set_epoch` they call), `num_local_io_workers`, `collate_fn`, `len()`
(batches per pass) and `iter()` returning the loader itself, then `next()`. ZeroDataLoader
gives that interface over a torch DataLoader (`dataloader`; its other attributes, such as
`batch_sampler`, read through). The training route cuts global batches with
`zero_ext.ElasticSampler` (docs/deepspeed-compat.md: the same batches at any world size, the
position saved in checkpoints); other routes, or a sampler or batch size of the caller's, load
as DeepSpeed's do, a DistributedSampler per rank by default.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from zero_ext.elastic_sampler import ElasticSampler

__all__ = ["ROUTE_EVAL", "ROUTE_PREDICT", "ROUTE_TRAIN", "ZeroDataLoader", "deepspeed_io"]

# DeepSpeed's route names (deepspeed/runtime/engine.py)
ROUTE_TRAIN, ROUTE_EVAL, ROUTE_PREDICT, ROUTE_ENCODE = "train", "eval", "predict", "encode"


class ZeroDataLoader:
    """DeepSpeedDataLoader's interface over a torch DataLoader made from `data_sampler`: an
    ElasticSampler is its batch sampler (micro-batches of `batch_size`), any other sampler its
    sampler with `batch_size`."""

    def __init__(self, dataset, *, batch_size: int, data_sampler, collate_fn=None,
                 pin_memory: bool = False, num_local_io_workers: int = 0):
        self.dataset, self.batch_size, self.data_sampler = dataset, batch_size, data_sampler
        self.collate_fn, self.num_local_io_workers = collate_fn, num_local_io_workers
        self.pin_memory = bool(pin_memory)
        elastic = isinstance(data_sampler, ElasticSampler)
        self.dataloader_drop_last = elastic  # the sampler leaves out a short last batch
        sampling = ({"batch_sampler": data_sampler} if elastic
                    else {"batch_size": batch_size, "sampler": data_sampler})
        self.dataloader = DataLoader(  # pinning needs a GPU (torch warns without one)
            dataset, collate_fn=collate_fn, pin_memory=self.pin_memory and
            torch.cuda.is_available(), num_workers=num_local_io_workers, **sampling)
        self._iterator = None

    def __iter__(self):
        """A new pass (as DeepSpeed's, the loader is its own iterator)."""
        self._iterator = iter(self.dataloader)
        return self

    def __next__(self):
        if self._iterator is None:  # next() before iter(): DeepSpeed's fails; a pass starts
            self._iterator = iter(self.dataloader)
        return next(self._iterator)

    def __len__(self) -> int:
        """Batches per pass on this rank (the ElasticSampler's: those of the pass under way,
        from its start, so `len()` holds through a loop)."""
        return len(self.dataloader)

    def __getattr__(self, name: str):
        if name.startswith("__") or "dataloader" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataloader"], name)


def deepspeed_io(engine, dataset, batch_size: int | None = None, route: str = ROUTE_TRAIN,
                 pin_memory: bool = True, data_sampler=None, collate_fn=None,
                 num_local_io_workers: int | None = None) -> ZeroDataLoader:
    """DeepSpeed's `engine.deepspeed_io`: a loader of this rank's micro-batches of `dataset`.
    The training route without a sampler or batch size of the caller's cuts global batches with
    an ElasticSampler (one per engine: its data position is checkpointed; a later training
    loader loads as the other routes do); otherwise `data_sampler`, by default a
    DistributedSampler over the data-parallel ranks (DeepSpeed's: in order for eval and
    predict, else shuffled from seed 0), with `batch_size` (default the micro-batch) and
    `collate_fn` (default initialize's). `num_local_io_workers` defaults to DeepSpeed's 2."""
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"engine.deepspeed_io: the dataset must be map-style (__getitem__ and "
                        f"__len__), got {type(dataset).__name__}; wrap an iterable in a "
                        "torch.utils.data.DataLoader of your own")
    micro = engine.train_micro_batch_size_per_gpu()
    workers = 2 if num_local_io_workers is None else num_local_io_workers
    elastic = (route == ROUTE_TRAIN and data_sampler is None and batch_size in (None, micro)
               and not engine.checkpoint_states.names_of(ElasticSampler))
    if elastic:
        data_sampler = ElasticSampler(dataset, engine)
    elif data_sampler is None:  # evaluation in the dataset's order, as DeepSpeed's
        data_sampler = DistributedSampler(dataset, num_replicas=engine.world_size,
                                          rank=engine.rank,
                                          shuffle=route not in (ROUTE_EVAL, ROUTE_PREDICT))
    if collate_fn is None:  # initialize's, as DeepSpeed's
        collate_fn = getattr(engine, "collate_fn", None)
    return ZeroDataLoader(dataset, batch_size=micro if batch_size is None else batch_size,
                          data_sampler=data_sampler, collate_fn=collate_fn,
                          pin_memory=pin_memory, num_local_io_workers=workers)
