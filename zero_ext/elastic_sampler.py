"""ElasticSampler: the data order of a training run, and how far it has got, at any world size.

Built by ``zero_ext.initialize(training_data=...)`` for the loader it returns, or by hand for any
map-style dataset: ``DataLoader(dataset, batch_sampler=zero_ext.ElasticSampler(dataset,
engine))``. Each epoch is one permutation of the dataset drawn from ``seed + epoch`` (as
DistributedSampler draws it), cut into global batches of ``train_batch_size`` samples (a tail
shorter than one global batch is left out, so every epoch has the same steps at every world
size). Rank r takes the r-th of the world-size equal slices of each global batch and yields it
as ``gradient_accumulation_steps`` micro-batches. So the same global batches are trained at any
world size, and a job that restarts on fewer nodes continues with the same batches (the engine
derives the accumulation from ``train_batch_size``; see ZeroConfig.resolve_batch).

The position (epoch, and samples of that epoch consumed, counted in global samples so it holds
at any world size) follows the engine's optimizer steps, not the loader: each step consumes
one global batch, so a loader whose workers fetch ahead does not move it. The engine saves it
with every checkpoint (``engine.register_checkpoint_state``) and loading restores it, so a
resumed job trains exactly the batches that come after the checkpoint: none skipped, none
repeated. DeepSpeed's DeepSpeedDataSampler (consumed samples in global terms, rank slices of
each global batch) and torchdata's StatefulDataLoader were the models.
"""

from __future__ import annotations

import torch


class ElasticSampler(torch.utils.data.Sampler):
    """A batch sampler yielding this rank's micro-batches (lists of dataset indices) of each
    global batch, from the current data position to the end of its epoch. Iterate it again
    for the next epoch; ``set_epoch`` is accepted as DistributedSampler's."""

    def __init__(self, dataset, engine, *, seed: int = 0, shuffle: bool = True,
                 name: str = "data_position"):
        super().__init__()
        self.num_samples = len(dataset)
        self.engine = engine
        self.seed, self.shuffle = int(seed), bool(shuffle)
        batch = engine.batch
        self.global_batch = batch.train_batch_size
        self.micro_batch = batch.train_micro_batch_size_per_gpu
        self.accumulation = batch.gradient_accumulation_steps
        self.rank, self.world_size = engine.rank, engine.world_size
        if self.num_samples < self.global_batch:
            raise ValueError(
                f"ElasticSampler: the dataset has {self.num_samples} samples, fewer than one "
                f"global batch (train_batch_size {self.global_batch}); use a smaller "
                f"train_batch_size or a larger dataset")
        # The position is (epoch, offset) at engine step `_anchor_step`; later positions
        # follow from the steps taken since. `_generation` counts moves of the anchor other
        # than by steps (load, set_epoch), which invalidate iterators made before.
        self._anchor_step, self._anchor_epoch, self._anchor_offset = engine.global_steps, 0, 0
        self._generation = 0
        self._pass: tuple[int, int, int] | None = None  # (generation, epoch, micro-batches)
        engine.register_checkpoint_state(name, self)

    # -- position -----------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def position(self) -> tuple[int, int]:
        """(epoch, global samples of it consumed) after the engine's optimizer steps so far."""
        steps = self.engine.global_steps - self._anchor_step
        if steps < 0:
            raise RuntimeError(
                f"ElasticSampler: the engine is at step {self.engine.global_steps}, before the "
                f"step {self._anchor_step} its data position was set at; load the checkpoint "
                f"through the engine (engine.load_checkpoint), which moves both together")
        first = (self.num_samples - self._anchor_offset) // self.global_batch
        if steps < first:
            return self._anchor_epoch, self._anchor_offset + steps * self.global_batch
        steps -= first
        return (self._anchor_epoch + 1 + steps // self.steps_per_epoch,
                steps % self.steps_per_epoch * self.global_batch)

    @property
    def epoch(self) -> int:
        return self.position()[0]

    def set_epoch(self, epoch: int) -> None:
        """Start of `epoch`, unless the position is already in it (then it stays, so a resumed
        job's `for epoch in range(sampler.epoch, n): sampler.set_epoch(epoch)` continues)."""
        if int(epoch) != self.epoch:
            self._move(int(epoch), 0)

    def _move(self, epoch: int, offset: int) -> None:
        self._anchor_step = self.engine.global_steps
        self._anchor_epoch, self._anchor_offset = epoch, offset
        self._generation += 1

    # -- order --------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of dataset indices (the same on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self):
        """A pass from the current position to the end of its epoch (its length known, for
        len(), from here on)."""
        epoch, offset = self.position()
        self._pass = (self._generation, epoch,
                      (self.num_samples - offset) // self.global_batch * self.accumulation)
        return self._micro_batches(epoch, offset, self._generation)

    def _micro_batches(self, epoch: int, offset: int, generation: int):
        order = self.epoch_order(epoch)
        per_rank = self.micro_batch * self.accumulation
        # Whole global batches from the offset (a multiple of train_batch_size unless the
        # checkpoint was saved with another one), as position() counts them.
        for start in range(offset, self.num_samples - self.global_batch + 1, self.global_batch):
            if self._generation != generation:
                raise RuntimeError(
                    "ElasticSampler: the data position moved (a checkpoint was loaded, or "
                    "set_epoch changed the epoch) while this iterator was in use; start a new "
                    "one (iter(loader)) after the load")
            mine = order[start + self.rank * per_rank:start + (self.rank + 1) * per_rank]
            for micro in mine.split(self.micro_batch):
                yield micro.tolist()

    def __len__(self) -> int:
        """Micro-batches on this rank of the pass under way (all it yields, from its start:
        `len()` holds through a loop, as DeepSpeed's loader's), else of the rest of the
        current epoch (a resumed job's first pass is shorter)."""
        epoch, offset = self.position()
        if self._pass is not None and self._pass[:2] == (self._generation, epoch):
            return self._pass[2]
        return (self.num_samples - offset) // self.global_batch * self.accumulation

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        epoch, offset = self.position()
        return {"epoch": epoch, "offset": offset, "num_samples": self.num_samples,
                "seed": self.seed, "shuffle": self.shuffle}

    def state_problem(self, state) -> str | None:
        """Why `state` cannot be this sampler's position, or None."""
        if not isinstance(state, dict) or not {"epoch", "offset", "num_samples", "seed",
                                                "shuffle"} <= set(state):
            return f"expected an ElasticSampler state, got {state!r}"
        if state["num_samples"] != self.num_samples:
            return (f"it was saved for a dataset of {state['num_samples']} samples, this one "
                    f"has {self.num_samples}: the saved position means other samples here. "
                    f"Resume with the same dataset")
        if (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            return (f"it was saved with seed={state['seed']}, shuffle={state['shuffle']}, this "
                    f"sampler has seed={self.seed}, shuffle={self.shuffle}: another order would "
                    f"repeat and skip samples. Build the sampler with the saved values")
        if not 0 <= state["offset"] <= self.num_samples:
            return f"offset {state['offset']} is outside the dataset's {self.num_samples}"
        return None

    def load_state_dict(self, state: dict) -> None:
        problem = self.state_problem(state)
        if problem is not None:
            raise ValueError(f"ElasticSampler.load_state_dict: {problem}")
        self._move(state["epoch"], state["offset"])
