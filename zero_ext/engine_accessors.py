"""The DeepSpeed engine's read-only accessors, by its names, for scripts written against it:
`engine.train_batch_size()`, `engine.gradient_accumulation_steps()`, `engine.was_step_applied()`
and the like. ZeroEngine inherits them; each reads the engine's own state."""

from __future__ import annotations

import os

__all__ = ["DeepSpeedAccessors"]


class DeepSpeedAccessors:
    """Mixed into ZeroEngine (which sets `batch`, `config`, `stage`, `rank`, `global_steps`
    and `_step_applied`)."""

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
