"""zero_ext.integrations.accelerate: a training loop written for `accelerate.Accelerator` with
DeepSpeed, run on a zero_ext engine by changing its import line.

    from zero_ext.integrations.accelerate import Accelerator    # was: from accelerate import ...
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config="ds.json"))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)   # backward, and the engine's step
            accelerator.clip_grad_norm_(model.parameters(), 1.0)  # the step's global norm
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

The config comes from `deepspeed_plugin=`, `zero_config=` (dict or JSON path), the environment
variable ZERO_EXT_CONFIG, or `accelerate launch --use_deepspeed --deepspeed_config_file ds.json`
(exactly one of the first three, else the launcher's). Its "auto" values are filled the way
accelerate fills them for DeepSpeed (accelerate's own DeepSpeedPlugin code does it).

What each call does mirrors accelerate's DeepSpeed path (DeepSpeedEngineWrapper and its
optimizer / scheduler wrappers): `prepare` builds the engine in place of DistributedDataParallel;
`backward` runs engine.backward and engine.step, which steps the optimizer (clipping, AdamW,
all-gather) at the end of each accumulation window; `optimizer.step()` / `zero_grad()` do
nothing; `clip_grad_norm_` returns the global norm the engine clipped with. docs/integrations/
accelerate.md lists the rules (optimizer, scheduler, clipping, checkpoints, logging); where the
config comes from and how its "auto" values are filled is in _accelerate_config.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import warnings
from collections import OrderedDict
from typing import Any

import torch
from accelerate import Accelerator as _Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils.constants import MODEL_NAME
from accelerate.utils.deepspeed import DummyOptim, DummyScheduler
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

import zero_ext
from zero_ext.engine import _rebind_scheduler
from zero_ext.integrations._accelerate_config import (
    NAME,
    check_optimizer_and_scheduler,
    complete_config,
    config_accumulation,
    micro_batch_size,
    resolve_plugin,
)
from zero_ext.zero.construction import is_init_partitioned

__all__ = ["Accelerator"]

logger = logging.getLogger(__name__)


class _EngineOptimizer(AcceleratedOptimizer):
    """What the loop holds as its optimizer: the engine's sharded one, whose step and zero_grad
    already ran inside accelerator.backward (as accelerate's DeepSpeedOptimizerWrapper)."""

    def __init__(self, optimizer):
        super().__init__(optimizer, device_placement=False, scaler=None)
        self.last_step_skipped = False  # set by Accelerator.backward at each window's end

    def zero_grad(self, set_to_none=None):
        pass

    def step(self, closure=None):
        pass

    @property
    def step_was_skipped(self) -> bool:
        """An fp16 overflow skipped the engine's last step: accelerate's scheduler wrapper
        then leaves the schedule where it was."""
        return self.last_step_skipped


class _EngineScheduler(AcceleratedScheduler):
    """A schedule from the config's "scheduler" section (or a DummyScheduler's callable): the
    engine steps it after each step it did not skip, and saves it in its checkpoints."""

    def step(self, *args, **kwargs):
        pass


def _holds_transformers_model(model: nn.Module) -> bool:
    """Whether `model` is or wraps (a PEFT model, say) a transformers PreTrainedModel."""
    transformers = sys.modules.get("transformers")  # not imported for a model without it
    pretrained = getattr(transformers, "PreTrainedModel", None)
    return pretrained is not None and any(isinstance(m, pretrained) for m in model.modules())


def _with_models(hook, models: list, _walked: list, weights: list, output_dir: str):
    """A save_state pre-hook called with `models` in place of the list accelerate walked."""
    return hook(models, weights, output_dir)


class Accelerator(_Accelerator):
    """accelerate.Accelerator whose prepared model is a zero_ext engine. Takes accelerate's
    arguments, plus `zero_config` (a zero_ext / DeepSpeed config dict or JSON path); a
    `deepspeed_plugin` is read for its config and never reaches DeepSpeed, which need not be
    installed. One model per Accelerator, as with DeepSpeed."""

    def __init__(self, *args, zero_config=None, deepspeed_plugin=None, deepspeed_plugins=None,
                 mixed_precision=None, **kwargs):
        if deepspeed_plugin is not None and deepspeed_plugins is not None:
            raise ValueError(f"{NAME}: pass deepspeed_plugin or deepspeed_plugins, not both")
        self.zero_plugin = resolve_plugin(zero_config, deepspeed_plugin or deepspeed_plugins)
        precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        # Fills the config's fp16 / bf16 sections as AcceleratorState does for DeepSpeed.
        self.zero_plugin.set_mixed_precision(str(getattr(precision, "value", precision)).lower())
        # accelerate would build DeepSpeed's own plugin from the launcher's environment; the
        # engine owns mixed precision (no autocast or GradScaler on top of it).
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
        super().__init__(*args, mixed_precision="no", **kwargs)
        self.engine: zero_ext.ZeroEngine | None = None
        self._engine_optimizer: _EngineOptimizer | None = None
        self._last_metrics: dict[str, float] = {}

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, *args, device_placement=None):
        """As accelerate's DeepSpeed path: data loaders prepared as usual; the model, optimizer
        and scheduler (given in the same call) become the engine and its wrappers."""
        models = [obj for obj in args if isinstance(obj, nn.Module)]
        trained = [obj for obj in args if isinstance(
            obj, (torch.optim.Optimizer, DummyOptim, LRScheduler, DummyScheduler))]
        if not models:
            if trained:
                raise ValueError(f"{NAME}: prepare the optimizer and scheduler in the same "
                                 "call as their model: prepare(model, optimizer, ...)")
            return super().prepare(*args, device_placement=device_placement)
        if len(models) > 1 or self.engine is not None:
            raise ValueError(f"{NAME}: one model per Accelerator (as with DeepSpeed); create "
                             "another Accelerator for another model")
        if device_placement is not None:
            raise ValueError(f"{NAME}: device_placement is not supported; the engine places "
                             "the model")
        result = [self._prepare_one(obj, first_pass=True)
                  if isinstance(obj, torch.utils.data.DataLoader) else obj for obj in args]
        optimizer = next((o for o in args if isinstance(o, (torch.optim.Optimizer, DummyOptim))),
                         None)
        scheduler = next((o for o in args if isinstance(o, (LRScheduler, DummyScheduler))),
                         None)
        engine, engine_optimizer, engine_scheduler = self._create_engine(
            models[0], optimizer, scheduler, args)
        for i, obj in enumerate(result):
            if obj is models[0]:
                result[i] = engine
            elif obj is optimizer:
                result[i] = engine_optimizer
            elif obj is scheduler:
                result[i] = engine_scheduler
        self._models.append(engine)
        self._optimizers.append(engine_optimizer)
        if engine_scheduler is not None:
            self._schedulers.append(engine_scheduler)
        for item in result:
            if any(item in group for group in (self._dataloaders, self._models,
                                               self._optimizers, self._schedulers)):
                item._is_accelerate_prepared = True
        return tuple(result) if len(result) > 1 else result[0]

    def _create_engine(self, model, optimizer, scheduler, args):
        """The engine, its optimizer wrapper and the scheduler's wrapper (or None)."""
        check_optimizer_and_scheduler(self.zero_plugin.deepspeed_config, optimizer, scheduler)
        self._check_zero3_init(model)
        # The config's accumulation wins over the Accelerator's, as under DeepSpeed.
        accumulation = config_accumulation(self.zero_plugin, self.gradient_accumulation_steps)
        if accumulation != self.gradient_accumulation_steps:
            logger.warning("%s: gradient_accumulation_steps is %s in the config and %s in the "
                           "Accelerator; using the config's", NAME, accumulation,
                           self.gradient_accumulation_steps)
            self.gradient_accumulation_steps = accumulation
        loaders = [obj for obj in args if isinstance(obj, torch.utils.data.DataLoader)]
        engine_config = complete_config(
            self.zero_plugin, model, optimizer, scheduler, accumulation=accumulation,
            micro_batch=micro_batch_size(self.zero_plugin, loaders, self.split_batches,
                                         self.num_processes),
            num_processes=self.num_processes, split_batches=self.split_batches)

        kwargs: dict[str, Any] = {}
        if isinstance(optimizer, torch.optim.Optimizer):
            # AdamW/Adam: adopted by the sharded AdamW; any other runs on the shards, "untested"
            # allowed as accelerate allows it for DeepSpeed.
            kwargs["optimizer"] = optimizer
            engine_config["zero_allow_untested_optimizer"] = True
        elif isinstance(optimizer, DummyOptim):
            kwargs["model_parameters"] = optimizer.params
        if isinstance(scheduler, DummyScheduler) and scheduler.lr_scheduler_callable is not None:
            kwargs["lr_scheduler"] = scheduler.lr_scheduler_callable
        engine, engine_optimizer, _, engine_scheduler = zero_ext.initialize(
            model=model, config=engine_config, **kwargs)
        self._compile(engine)
        engine.log_externally()
        self.engine = engine
        self._engine_optimizer = _EngineOptimizer(engine_optimizer)

        wrapped_scheduler = None
        if isinstance(scheduler, LRScheduler):
            # A torch schedule the loop steps itself, with accelerate's rules (only after a
            # step, num_processes times unless split_batches), as under DeepSpeed; it now drives
            # the engine's parameter groups, which are the user optimizer's, in order.
            if isinstance(optimizer, torch.optim.Optimizer):
                _rebind_scheduler(scheduler, optimizer, engine_optimizer)
            if scheduler.optimizer is not engine_optimizer:
                raise ValueError(f"{NAME}: the LR scheduler drives an optimizer that was not "
                                 "passed to prepare(); pass its optimizer in the same call")
            wrapped_scheduler = AcceleratedScheduler(
                scheduler, self._engine_optimizer,
                step_with_optimizer=self.step_scheduler_with_optimizer,
                split_batches=self.split_batches)
        elif scheduler is not None:
            wrapped_scheduler = _EngineScheduler(engine_scheduler, self._engine_optimizer)
        return engine, self._engine_optimizer, wrapped_scheduler

    def _check_zero3_init(self, model) -> None:
        """DeepSpeedPlugin.zero3_init_flag (on by default at stage 3) makes transformers build
        its models under deepspeed.zero.Init, partitioned as they are built. That switch runs
        DeepSpeed's own code, which zero_ext leaves off (is_deepspeed_zero3_enabled() stays
        False, docs/integrations/transformers.md), so a transformers model built outside
        zero_ext.Init was whole on every rank: said, with what to do instead, rather than
        ignored without a word."""
        if not self.zero_plugin.zero3_init_flag or not _holds_transformers_model(model):
            return
        if any(is_init_partitioned(p) for p in model.parameters()) or not self.is_main_process:
            return  # built under zero_ext.Init, what the flag asks for; or said by the main one
        warnings.warn(
            f"{NAME}: accelerate's zero3_init_flag (DeepSpeedPlugin(zero3_init_flag=...), "
            "ACCELERATE_DEEPSPEED_ZERO3_INIT; on by default at stage 3) has no effect on "
            f"zero_ext: transformers built this {type(model).__name__} whole on every rank, not "
            "partitioned as under DeepSpeed. To build it partitioned, construct it inside "
            "`with zero_ext.Init(config=...):` (from_config), and load pretrained weights after "
            "prepare() with `model.load_weights(path)` (each rank reads its shards); "
            "zero3_init_flag=False (ACCELERATE_DEEPSPEED_ZERO3_INIT=false) silences this",
            stacklevel=4)

    def _compile(self, engine) -> None:
        """The Accelerator's dynamo_backend (`--dynamo_backend`, TorchDynamoPlugin), as
        accelerate applies it to a DeepSpeed engine: engine.compile, or its regional
        compilation of the model's repeated blocks."""
        from accelerate.utils import DynamoBackend

        plugin = self.state.dynamo_plugin
        if plugin.backend == DynamoBackend.NO:
            return
        compile_kwargs = plugin.to_kwargs()
        if plugin.use_regional_compilation:
            from accelerate.utils import compile_regions_deepspeed

            compile_regions_deepspeed(engine.module, **compile_kwargs)
        else:
            engine.compile(backend=compile_kwargs.pop("backend"), compile_kwargs=compile_kwargs)

    # -- training -----------------------------------------------------------------------------
    def backward(self, loss, **kwargs):
        """engine.backward (it divides by gradient_accumulation_steps, as accelerate does) and
        engine.step, which steps at the end of accelerate's accumulation window."""
        engine = self.engine
        if engine is None:
            return super().backward(loss, **kwargs)
        if kwargs:
            raise TypeError(f"{NAME}.backward: {sorted(kwargs)} are not supported; the engine "
                            "runs the backward of the loss alone")
        window_ends = self.sync_gradients
        if not window_ends and engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"{NAME}: the engine's accumulation window ends at micro-step "
                f"{engine.micro_steps} but accelerate's goes on (step {self.step} of "
                f"{self.gradient_accumulation_steps}); call accelerator.backward once per "
                "batch, inside `with accelerator.accumulate(model)`")
        skipped = engine.skipped_steps
        with engine.window_ending_here(window_ends):  # a data loader's short last window too
            engine.backward(loss)
            engine.step()
        if window_ends:
            self._engine_optimizer.last_step_skipped = engine.skipped_steps != skipped
            if self.log_with:  # collective, on every rank, at the same step
                self._last_metrics = engine.training_metrics()

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """The global gradient norm (before clipping) of the engine's last step, which clipped
        to the config's gradient_clipping; a different max_norm is refused rather than ignored
        (DeepSpeed ignores it)."""
        engine = self.engine
        if engine is None:
            return super().clip_grad_norm_(parameters, max_norm, norm_type)
        clipping = float(engine.config.gradient_clipping or 0.0)
        if float(norm_type) != 2.0 or not math.isclose(float(max_norm), clipping):
            raise ValueError(
                f"{NAME}: clip_grad_norm_(max_norm={max_norm}, norm_type={norm_type}), but the "
                f"engine clips the L2 norm inside its step, to the config's gradient_clipping "
                f"({clipping}); set \"gradient_clipping\": {max_norm} in the config")
        norm = engine.get_global_grad_norm()
        return None if norm is None else torch.tensor(norm, dtype=torch.float32)

    def clip_grad_value_(self, parameters, clip_value):
        if self.engine is None:
            return super().clip_grad_value_(parameters, clip_value)
        raise ValueError(f"{NAME}: clip_grad_value_ is not supported (nor under DeepSpeed); "
                         "set gradient_clipping in the config and use clip_grad_norm_")

    def log(self, values: dict, step: int | None = None, log_kwargs: dict | None = None):
        """Also logs the engine's figures of its last step (zero_ext/samples_per_s, peak memory,
        ...), taken on every rank at each step's end when the Accelerator has trackers."""
        return super().log({**self._last_metrics, **values}, step=step, log_kwargs=log_kwargs)

    def no_sync(self, model):
        """accelerate's no_sync(model) enters the model's own (DDP's) on a multi-process run,
        and accumulate() enters it for every micro-batch but a window's last. The engine is no
        DDP: it reduces at its own accumulation boundaries and steps inside backward, so its
        no_sync (stages 0-1, step() refused inside) is not entered here, as accelerate enters
        none under DeepSpeed."""
        if self._is_engine(model):
            return contextlib.nullcontext()
        return super().no_sync(model)

    # -- models and checkpoints ---------------------------------------------------------------
    def _is_engine(self, model) -> bool:
        return self.engine is not None and (model is self.engine or model is self.engine.module)

    def unwrap_model(self, model, keep_fp32_wrapper: bool = True,
                     keep_torch_compile: bool = True):
        if self._is_engine(model):
            return self.engine.module
        return super().unwrap_model(model, keep_fp32_wrapper, keep_torch_compile)

    def get_state_dict(self, model, unwrap=True):
        """The engine model's full weights, as accelerate's DeepSpeed path gives them: at stage
        3 collective, gathered one unit at a time, as CPU tensors on the main process and {}
        on the others (one host copy of a 70B model, not one per rank; {} rather than
        DeepSpeed's None, so that `save_pretrained(..., state_dict=...)` off the main process
        does not read the partitioned parameters); below stage 3 on every rank, as there (CPU
        copies: the model's own tensors are views of flat buffers, which safetensors would
        take as one shared tensor). save_model writes them on the main process."""
        if self._is_engine(model):
            return self.engine.full_state_dict(only_rank=0 if self.engine.stage == 3 else None)
        return super().get_state_dict(model, unwrap)

    def _without_engine_state(self):
        """The lists save_state / load_state walk, less what the engine checkpoint holds (the
        model, the optimizer and an engine-stepped schedule), as on accelerate's DeepSpeed path;
        returns the full lists to put back."""
        full = self._models, self._optimizers, self._schedulers
        self._models = [m for m in full[0] if m is not self.engine]
        self._optimizers = [o for o in full[1] if o is not self._engine_optimizer]
        self._schedulers = [s for s in full[2] if not isinstance(s, _EngineScheduler)]
        return full

    def save_state(self, output_dir=None, safe_serialization: bool = True,
                   **save_model_func_kwargs):
        """Collective. accelerate's state (RNG, step, the loop's schedulers, data loaders,
        registered objects) plus the engine checkpoint in `<dir>/pytorch_model/` (every rank's
        shard; DeepSpeed's layout)."""
        if self.engine is None:
            return super().save_state(output_dir, safe_serialization, **save_model_func_kwargs)
        full = self._without_engine_state()
        hooks = self._save_model_state_pre_hook
        # register_save_state_pre_hook's hooks get the models as on accelerate's DeepSpeed path
        # (the prepared list, the engine in it: unwrap_model gives the user's module, for
        # save_pretrained), and `weights` empty as there: accelerate's own loop walks the lists
        # without the engine, so it writes no second copy of the weights beside the engine's.
        self._save_model_state_pre_hook = OrderedDict(
            (key, functools.partial(_with_models, hook, full[0])) for key, hook in hooks.items())
        try:
            location = super().save_state(output_dir, safe_serialization)
        finally:
            self._models, self._optimizers, self._schedulers = full
            self._save_model_state_pre_hook = hooks
        self.engine.save_checkpoint(location, MODEL_NAME, **save_model_func_kwargs)
        return location

    def load_state(self, input_dir=None, load_kwargs=None, **load_model_func_kwargs):
        """Collective. The counterpart of save_state; the engine checkpoint may come from another
        world size or stage."""
        if self.engine is None:
            return super().load_state(input_dir, load_kwargs, **load_model_func_kwargs)
        chosen: list[str] = []  # accelerate picks the folder (the newest, with automatic naming)
        handle = self.register_load_state_pre_hook(lambda models, folder: chosen.append(folder))
        full = self._without_engine_state()
        try:
            super().load_state(input_dir, load_kwargs)
        finally:
            self._models, self._optimizers, self._schedulers = full
            handle.remove()
        for wrapper in self._schedulers:
            # The loop's own schedule, just loaded, sets the rate its groups had at the save,
            # so the engine sees the checkpoint's rate as configured (no "other settings").
            schedule = getattr(wrapper, "scheduler", None)
            if getattr(schedule, "optimizer", None) is self.engine.optimizer:
                for group, lr in zip(self.engine.optimizer.param_groups,
                                     schedule.get_last_lr()):
                    group["lr"] = lr
        path, _ = self.engine.load_checkpoint(chosen[0], MODEL_NAME, **load_model_func_kwargs)
        if path is None:
            raise FileNotFoundError(f"{NAME}.load_state: {chosen[0]} holds no zero_ext engine "
                                    f"checkpoint ({MODEL_NAME}/); load a folder that this "
                                    "Accelerator's save_state wrote")

    def free_memory(self, *objects):
        self.engine = self._engine_optimizer = None
        self._last_metrics = {}
        return super().free_memory(*objects)
