"""The DeepSpeed engine's methods beside training, by its names, for scripts written against
it: the accessors (`engine.train_batch_size()`, `engine.gradient_accumulation_steps()`,
`engine.was_step_applied()` and the like, each reading the engine's own state), and the
lifecycle calls `destroy()` and `empty_partition_cache()`. ZeroEngine inherits them."""

from __future__ import annotations

import os

__all__ = ["DeepSpeedEngineAPI"]


class DeepSpeedEngineAPI:
    """Mixed into ZeroEngine (which sets `batch`, `config`, `stage`, `rank`, `global_steps`,
    `_step_applied`, `grad_buckets` and `partitioned`)."""

    def train_batch_size(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.batch.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        """Samples per forward and backward on one rank."""
        return self.batch.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        """Micro-steps per optimizer step."""
        return self.batch.gradient_accumulation_steps

    def zero_optimization_stage(self) -> int:
        return self.stage

    def gradient_clipping(self) -> float:
        """The global-norm clipping threshold (0: off)."""
        return self.config.gradient_clipping

    @property
    def global_rank(self) -> int:
        return self.rank

    @property
    def local_rank(self) -> int:
        """This rank's index on its node, as torchrun gives it (LOCAL_RANK; 0 without it)."""
        return int(os.environ.get("LOCAL_RANK", "0"))

    def fp16_enabled(self) -> bool:
        return self.config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        return self.config.bf16.enabled

    def was_step_applied(self) -> bool:
        """Whether the last step() updated the weights: False between accumulation boundaries,
        after a step skipped on a non-finite gradient norm, and before the first step."""
        return self._step_applied

    @property
    def global_samples(self) -> int:
        """Samples trained on so far: train_batch_size per optimizer step, skipped steps
        included (as DeepSpeed counts them)."""
        return self.global_steps * self.batch.train_batch_size

    def destroy(self) -> None:
        """DeepSpeed's engine.destroy(): the engine lets go of the model, removing its gradient
        hooks (and stage 3's module hooks), and refuses backward() and step() from then on. At
        stages 0-2 the model stays whole and usable alone; at stage 3 its parameters stay
        partitioned, as in DeepSpeed (save them first: full_state_dict(), save_16bit_model()).
        Not a collective."""
        self._settle_step()
        self.grad_buckets.remove_hooks()
        self.grad_buckets.clear()
        if self.partitioned is not None:
            self.partitioned.hooks.remove()
        self._destroyed = True

    def empty_partition_cache(self) -> None:
        """DeepSpeed's: at stage 3, releases every unit left gathered (prefetched, or gathered
        by an evaluation forward for a backward that did not follow), freeing its full
        parameters; the next forward gathers them again. Nothing below stage 3. Call it
        between steps, e.g. after generating."""
        if self.grad_buckets._active:
            raise RuntimeError("zero_ext: engine.empty_partition_cache() inside backward; call "
                               "it between steps")
        if self.partitioned is not None:
            self.partitioned.release_all()

    def _check_alive(self) -> None:
        if self.__dict__.get("_destroyed"):
            raise RuntimeError(
                "zero_ext: this engine was destroyed (engine.destroy()); to train again, build "
                "a new one with zero_ext.initialize (at stage 3 from a new model, or from "
                "weights saved before destroy: its parameters stay partitioned)")
