"""The DeepSpeed engine's methods beside training, by its names, for scripts written against
it: the accessors (`engine.train_batch_size()`, `engine.gradient_accumulation_steps()`,
`engine.was_step_applied()` and the like, each reading the engine's own state), the config
readers (`engine.zero_optimization_partition_weights()`, `engine.loss_scale()`, ...: the
resolved ZeroConfig, answering as DeepSpeed's engine does for the same config), the state
dicts and 16-bit saves accelerate and transformers call (`module_state_dict()`,
`_zero3_consolidated_16bit_state_dict()`, `save_fp16_model()`), `no_sync()` and
`zero_grad()`, the lifecycle calls `destroy()` and `empty_partition_cache()`, and
`offload_states()` / `reload_states()` (zero/offload_states.py). ZeroEngine inherits them.
DeepSpeed's `get_wall_clock_timers()` is not here: zero_ext's phase timers (zero/reporting.py)
have other names and units and restart at each report line."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from zero_ext.zero.offload_states import move_back, move_to_host

__all__ = ["DeepSpeedEngineAPI"]


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class DeepSpeedEngineAPI:
    """Mixed into ZeroEngine (which sets `batch`, `config`, `stage`, `rank`, `world_size`,
    `comm_dtype`, `optimizer`, `replicated_optimizer`, `global_steps`, `_step_applied`,
    `grad_buckets` and `partitioned`)."""

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

    def get_batch_info(self) -> tuple[int, int, int]:
        """DeepSpeed's: (train_batch_size, train_micro_batch_size_per_gpu,
        gradient_accumulation_steps)."""
        return (self.train_batch_size(), self.train_micro_batch_size_per_gpu(),
                self.gradient_accumulation_steps())

    @property
    def dp_world_size(self) -> int:
        """Ranks in the data-parallel group: all of them (zero_ext has no model parallelism)."""
        return self.world_size

    @property
    def mp_world_size(self) -> int:
        """Model-parallel ranks: 1 (zero_ext refuses DeepSpeed's `mpu`)."""
        return 1

    # -- the config, as DeepSpeed's engine reads it ------------------------------------------
    def zero_optimization(self) -> bool:
        """Whether ZeRO is on: stage 1 or above."""
        return self.zero_optimization_stage() > 0

    def zero_optimization_partition_gradients(self) -> bool:
        """Stage 2 or above."""
        return self.zero_optimization_stage() >= 2

    def zero_optimization_partition_weights(self) -> bool:
        """Stage 3."""
        return self.zero_optimization_stage() >= 3

    def zero_offload_optimizer(self):
        """The offload_optimizer section (its `device`, `pin_memory`, `ratio`, ...), or None
        when nothing is offloaded (DeepSpeed's: None without the section)."""
        section = self.config.zero_optimization.offload_optimizer
        return section if section.enabled else None

    def zero_offload_param(self):
        """The offload_param section, or None when parameters are not offloaded."""
        section = self.config.zero_optimization.offload_param
        return section if section.enabled else None

    def zero_cpu_offload(self) -> bool:
        """Whether the optimizer state is offloaded to host memory."""
        return self.zero_offload_optimizer() is not None

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """zero_optimization.stage3_gather_16bit_weights_on_model_save (accelerate reads it
        before _zero3_consolidated_16bit_state_dict()). zero_ext's save_16bit_model writes the
        model at stage 3 either way."""
        return self.config.zero_optimization.stage3_gather_16bit_weights_on_model_save

    def loss_scale(self) -> float:
        """DeepSpeed's: the config's fp16.loss_scale (0: dynamic), whether fp16 is on or not;
        the scale in use is `engine.optimizer.loss_scale`."""
        return self.config.fp16.loss_scale

    def dynamic_loss_scale(self) -> bool:
        """DeepSpeed's: fp16.loss_scale is 0, whether fp16 is on or not."""
        return self.loss_scale() == 0

    def steps_per_print(self) -> int | None:
        return self.config.steps_per_print

    def wall_clock_breakdown(self) -> bool:
        return self.config.wall_clock_breakdown

    def optimizer_name(self) -> str:
        """DeepSpeed's: the class name of the optimizer given to initialize, else the config's
        optimizer type in lower case ("adamw" without an optimizer section: zero_ext's
        default, where DeepSpeed builds none). A torch AdamW / Adam given to initialize becomes
        zero_ext's sharded AdamW and is not kept, so it reads as the config's."""
        from zero_ext.config import OptimizerConfig

        if self.client_optimizer is not None:
            return type(self.client_optimizer).__name__
        return (self.config.optimizer or OptimizerConfig()).type.lower()

    def scheduler_name(self) -> str | None:
        """The config's scheduler type (None without a scheduler section)."""
        return self.config.scheduler.type if self.config.scheduler is not None else None

    @property
    def communication_data_type(self) -> torch.dtype:
        """The dtype gradients are reduced in: communication_data_type, else the training
        dtype."""
        return self.comm_dtype

    @property
    def client_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer given to initialize (a callable's result) where it runs as it is: at
        stage 0, or on the fp32 master shards (DeepSpeed's ZeRO wraps it alike). None without
        one, and for a torch AdamW / Adam, whose groups and hyperparameters zero_ext's sharded
        AdamW takes over (DeepSpeed keeps the instance)."""
        if self.replicated_optimizer is not None:
            return self.replicated_optimizer
        return getattr(self.optimizer, "optimizer", None)

    @property
    def basic_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that updates the weights: the client optimizer, else zero_ext's AdamW
        (DeepSpeed's: the client's, or the one it built from the config, which its ZeRO
        optimizer wraps; zero_ext's AdamW is its own ZeRO optimizer, engine.optimizer)."""
        client = self.client_optimizer
        return client if client is not None else self.optimizer

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
        included (as DeepSpeed counts them), each step at the batch size it had."""
        steps, samples = self._samples_anchor  # set_train_batch_size's (a load's: 0, 0)
        return samples + (self.global_steps - steps) * self.batch.train_batch_size

    def set_train_batch_size(self, train_batch_size: int) -> None:
        """DeepSpeed's: a new global batch size from the next step on, by another number of
        micro-batches per step (gradient_accumulation_steps); the micro batch stays. Between
        steps only. Refused while an ElasticSampler (initialize's training_data loader) cuts
        global batches of the old size."""
        micro, world = self.batch.train_micro_batch_size_per_gpu, self.world_size
        if not _positive_int(train_batch_size) or train_batch_size % (micro * world):
            raise ValueError(
                f"zero_ext: set_train_batch_size({train_batch_size!r}): the global batch must be "
                f"a positive multiple of train_micro_batch_size_per_gpu x world size ({micro} x "
                f"{world} = {micro * world}), as DeepSpeed requires")
        self._resize_batch("set_train_batch_size", micro, train_batch_size // (micro * world))

    def set_train_micro_batch_size(self, micro_batch_size: int) -> None:
        """DeepSpeed's: a new micro batch per rank from the next step on, the number of
        micro-batches per step (gradient_accumulation_steps) kept, so the global batch becomes
        micro x accumulation x world size. The engine does not cut batches itself: the caller
        feeds micro-batches of the new size. Between steps only; refused under an
        ElasticSampler, as set_train_batch_size is."""
        if not _positive_int(micro_batch_size):
            raise ValueError(f"zero_ext: set_train_micro_batch_size({micro_batch_size!r}): the "
                             "micro batch must be a positive int")
        self._resize_batch("set_train_micro_batch_size", micro_batch_size,
                           self.batch.gradient_accumulation_steps)

    def _resize_batch(self, caller: str, micro: int, accumulation: int) -> None:
        """From the next step on, `micro` samples per micro-batch and `accumulation`
        micro-batches per step; global_samples keeps what the steps so far counted."""
        from zero_ext.elastic_sampler import ElasticSampler

        if self._window_micro or self._backwards_since_step:
            raise RuntimeError(
                f"zero_ext: {caller} inside an accumulation window (backwards since the last "
                "step()); call it right after engine.step() at a boundary")
        samplers = self.checkpoint_states.names_of(ElasticSampler)
        if samplers:
            raise RuntimeError(
                f"zero_ext: {caller}: the ElasticSampler {samplers} (the loader "
                f"initialize(training_data=...) built) cuts batches of "
                f"{self.batch.train_micro_batch_size_per_gpu} samples per rank, "
                f"{self.batch.train_batch_size} per step; change the batch sizes in the config "
                f"and resume from a checkpoint instead")
        self._samples_anchor = (self.global_steps, self.global_samples)
        self.batch = dataclasses.replace(
            self.batch, train_batch_size=micro * accumulation * self.world_size,
            train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation)
        self.grad_buckets.set_accumulation_steps(accumulation,
                                                 fixed_dtype=self.offload is not None)
        self.micro_steps = self.global_steps * accumulation
        self.monitor.samples_per_micro_step = micro * self.world_size  # its samples/s

    def deepspeed_io(self, dataset, batch_size: int | None = None, route: str = "train",
                     pin_memory: bool = True, data_sampler=None, collate_fn=None,
                     num_local_io_workers: int | None = None):
        """DeepSpeed's: a loader of this rank's micro-batches of `dataset`
        (zero_ext/data_loader.py: the training route cuts global batches with an
        ElasticSampler, as initialize(training_data=...) does; eval and the others load as
        DeepSpeed's, a DistributedSampler per rank)."""
        from zero_ext.data_loader import deepspeed_io
        return deepspeed_io(self, dataset, batch_size, route, pin_memory, data_sampler,
                            collate_fn, num_local_io_workers)

    def get_mom(self) -> list:
        """Per parameter group, its momentum as DeepSpeed reports it: `momentum` for SGD and
        RMSprop, else the group's `betas` (0.0 where the group has neither). Under top-k's
        freeze_variance the groups step with the betas they show, (beta1, 1.0)."""
        # The optimizer the user gave (run on the shards, or at stage 0 as it is).
        name = type(getattr(self.optimizer, "optimizer", None) or self.optimizer).__name__
        key = "momentum" if name in ("SGD", "RMSprop") else "betas"
        return [group.get(key, 0.0) for group in self.optimizer.param_groups]

    # -- state dicts and 16-bit saves ----------------------------------------------------------
    def module_state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False,
                          exclude_frozen_parameters: bool = False) -> dict:
        """DeepSpeed's: the model's own state_dict (engine.module.state_dict(): its live
        tensors, not copies; not a collective), frozen parameters left out with
        exclude_frozen_parameters (as save_16bit_model's). At stage 3 DeepSpeed's holds empty
        placeholders for the partitioned parameters unless they are gathered; here, outside
        zero_ext.GatheredParameters, reading one is an error instead (keep_vars=True gives the
        Parameters themselves, as DeepSpeed's). The full weights at stage 3, collectively:
        full_state_dict() (every rank) or _zero3_consolidated_16bit_state_dict() (rank 0)."""
        state = self.module.state_dict(destination=destination, prefix=prefix,
                                       keep_vars=keep_vars)
        return self._without_frozen(state, prefix) if exclude_frozen_parameters else state

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False):
        """DeepSpeed's, which accelerate's get_state_dict and transformers' Trainer call at
        stage 3. Collective: the full state dict in the model's dtype, CPU tensors (tied
        weights one tensor), on rank 0 (full_state_dict(only_rank=0)); None on the other
        ranks. Below stage 3 a ValueError, as DeepSpeed's."""
        if not self.zero_optimization_partition_weights():
            raise ValueError(
                f"zero_ext: _zero3_consolidated_16bit_state_dict() needs ZeRO stage 3 (DeepSpeed's "
                f"raises too); at stage {self.stage} every rank holds the whole model: use "
                "engine.module_state_dict() or engine.full_state_dict()")
        state = self.full_state_dict(only_rank=0)
        if self.rank != 0:
            return None
        return self._without_frozen(state) if exclude_frozen_parameters else state

    def save_fp16_model(self, save_dir: str, save_filename: str = "model.safetensors",
                        exclude_frozen_parameters: bool = False) -> str:
        """DeepSpeed's deprecated name of save_16bit_model (same arguments, same file)."""
        return self.save_16bit_model(save_dir, save_filename, exclude_frozen_parameters)

    def _without_frozen(self, state: dict, prefix: str = "") -> dict:
        """`state` without the keys of parameters that do not train, the ones
        save_checkpoint's and save_16bit_model's exclude_frozen_parameters leave out."""
        from zero_ext.checkpoint.engine_state import _frozen_keys

        for key in _frozen_keys(self):
            state.pop(prefix + key, None)
        return state

    @contextlib.contextmanager
    def no_sync(self):
        """DeepSpeed's (and DDP's) no_sync, at stages 0-1: engine.backward() inside reduces
        nothing, its gradients stay on this rank (in .grad), and the next backward outside
        that ends an accumulation window reduces them with its own. The micro-step count does
        not move (these backwards are not micro-steps) and the loss is still divided by
        gradient_accumulation_steps. Refused: at stages 2-3 (each backward reduces into the
        partitioned gradient), inside itself, engine.step() inside, a backward inside after
        the one that ended the window (its gradient would never be reduced), and a step()
        whose window's backwards all ran inside."""
        self._check_alive()
        if self.stage >= 2:
            raise RuntimeError(
                f"zero_ext: engine.no_sync() is incompatible with ZeRO stage {self.stage}, "
                "which partitions gradients by reducing every backward's (DeepSpeed refuses "
                "it too). To accumulate, set gradient_accumulation_steps, or hold the window "
                "open with engine.set_gradient_accumulation_boundary(False)")
        if self._no_sync:
            raise RuntimeError("zero_ext: engine.no_sync() inside engine.no_sync(): re-entry "
                               "is not supported (DeepSpeed's neither); use one context")
        self._no_sync = True
        try:
            yield
        finally:
            self._no_sync = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """DeepSpeed's: drops the gradients backward left in the model's .grad and not reduced
        yet (stages 0-1 between accumulation boundaries, and under no_sync; with fp32
        accumulation their fp32 sums). A window's reduced gradients stay for its step()."""
        self.module.zero_grad(set_to_none=set_to_none)
        # Before a reduction (stages 0-1, window not ended) nothing of the window is left.
        self.grad_buckets.drop_windows(
            forget_used=self.stage <= 1 and not self.grad_buckets.reduced())

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
            self.partitioned.remove_hooks()
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

    def offload_states(self, include=None, device="cpu", pin_memory: bool = True,
                       non_blocking: bool = False) -> None:
        """DeepSpeed's: moves the engine's device-resident state to host memory (pinned where
        CUDA is) and frees it on the device, e.g. while a colocated inference engine generates.
        `include`: the states to move (OffloadStateTypeEnum members or their names:
        optim_states, hp_params, lp_params, lp_grads, contiguous_grad_buffer; default all);
        state already on the host (offload_optimizer's) stays. `device`: "cpu" only
        ("none" moves nothing, "nvme" is refused). Between steps, or between a backward and
        its step; not a collective, but call it on every rank. Until reload_states(), a
        forward runs unless lp_params were moved, and everything else that reads the state
        (backward, step, checkpoints) is refused. Refused with offload_param, as in DeepSpeed."""
        move_to_host(self, include, device, pin_memory, non_blocking)

    def reload_states(self, non_blocking: bool = False) -> None:
        """DeepSpeed's: everything offload_states() moved, back on the device (bit for bit);
        training goes on as if it had never left. Nothing to do when nothing is offloaded."""
        move_back(self, non_blocking)

    def _check_alive(self) -> None:
        if self.__dict__.get("_destroyed"):
            raise RuntimeError(
                "zero_ext: this engine was destroyed (engine.destroy()); to train again, build "
                "a new one with zero_ext.initialize (at stage 3 from a new model, or from "
                "weights saved before destroy: its parameters stay partitioned)")
