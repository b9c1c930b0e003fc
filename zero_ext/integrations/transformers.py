"""zero_ext.integrations.transformers: the Hugging Face Trainer on a zero_ext engine.

    trainer = ZeroTrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                          zero_config="examples/configs/trainer/zero2.json")
    trainer.train()
    trainer.save_model("out")        # collective: out/model.safetensors + config.json

The Trainer's own loop, logging, callbacks, evaluation and checkpoint rotation run unchanged;
the engine replaces what the Trainer would otherwise get from accelerate: the model wrapper
(no DistributedDataParallel), the optimizer and LR scheduler (the engine steps them),
mixed precision (no autocast, no GradScaler), gradient clipping and the sharded checkpoints.

The TrainingArguments are the single source of truth for what the Trainer's loop depends on.
:func:`fill_config` completes the zero_ext config from them: "auto" values (and batch sizes,
clipping, precision and AdamW hyperparameters the config leaves out) are taken from the
arguments, and explicit values that contradict them are refused together, in one error.

:func:`zero_trainer` gives any Trainer subclass (TRL's trainers) the same behaviour, and
:func:`apply` (what `python -m zero_ext.run script.py` calls) makes an unmodified script's
`Trainer(args=TrainingArguments(deepspeed="ds.json"))` one of them: see
docs/integrations/transformers.md.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import transformers.trainer
from transformers import Trainer

import zero_ext
from zero_ext.config import read_json_config
from zero_ext.integrations._hf_apply import apply, find_training_arguments, resolve_config
from zero_ext.integrations._hf_config import config_dict, fill_config
from zero_ext.integrations.config_fill import model_hidden_size

__all__ = ["ZeroTrainer", "apply", "fill_config", "zero_trainer"]

_LATEST = "latest"  # the engine checkpoint's pointer file: marks a folder zero_ext saved into


class _Forwarding:
    """Forwards every attribute it does not define itself to `target`."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        if name == "target":  # a copy that was never initialised: no recursion
            raise AttributeError(name)
        return getattr(self.target, name)


class _EngineOptimizer(_Forwarding):
    """What the Trainer sees as its optimizer: the engine's, except that step() and
    zero_grad() do nothing. The engine's step already ran inside training_step, because the
    Trainer reads the gradient norm before it calls step() and the engine computes that norm
    (across shards) in its step."""

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True):
        return None


class _EngineScheduler(_Forwarding):
    """What the Trainer sees as its LR scheduler: the real one, except that step() does
    nothing. The engine steps it after each optimizer step it did not skip (an fp16 overflow
    leaves the schedule where it was). With `rates_used`, get_last_lr() is the rate the last
    step used (`used`, noted before the engine's step), as the Trainer logs a schedule it steps
    itself; else the rate after it, as it logs one DeepSpeed's engine steps."""

    def __init__(self, target, rates_used: bool = False):
        super().__init__(target)
        self.rates_used = rates_used
        self.used: list[float] | None = None

    def step(self, *args, **kwargs):
        return None

    def get_last_lr(self) -> list[float]:
        if self.rates_used and self.used is not None:
            return list(self.used)
        return self.target.get_last_lr()


class _ZeroTrainerMixin:
    """What makes a transformers.Trainer (or any subclass) run on a zero_ext engine: see
    ZeroTrainer. Placed before the Trainer class in the MRO by :func:`zero_trainer`."""

    def __init__(self, *args, zero_config: Mapping | str | os.PathLike | None = None,
                 pretrained_weights: str | os.PathLike | None = None, **kwargs):
        # Checked before the Trainer sets anything up: a second config is refused here.
        training_args = find_training_arguments(args, kwargs)
        if training_args is not None and training_args.save_only_model and \
                training_args.load_best_model_at_end:
            # Refused as the Trainer refuses it under DeepSpeed: such checkpoints hold no engine
            # state to load the best one from, and the last weights would stay silently.
            raise ValueError(
                "ZeroTrainer: save_only_model=True with load_best_model_at_end=True is not "
                "supported (the checkpoints would hold no engine state to load the best model "
                "from); set save_only_model=False, or load_best_model_at_end=False")
        resolved = resolve_config(zero_config, training_args)
        _check_own_optimizer(kwargs, resolved)
        # A scheduler given with optimizers= stays over later train() calls (the Trainer
        # recreates only the one it made).
        self._given_scheduler = kwargs.get("optimizers", (None, None))[1] is not None
        self.pretrained_weights = pretrained_weights
        self.engine = None
        super().__init__(*args, **kwargs)
        if resolved is None:  # the Trainer made default TrainingArguments
            resolved = resolve_config(zero_config, self.args)
        self.zero_config, self.zero_config_source = resolved
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.args.world_size:
            # Otherwise every rank would train on the whole dataset as its own one-rank run.
            raise ValueError(
                f"ZeroTrainer: {launched} processes were launched but the TrainingArguments see "
                f"{self.args.world_size}; on a machine without GPUs pass use_cpu=True to "
                "TrainingArguments so that accelerate joins the processes (gloo)")
        _count_parameters_through_engines()
        _route_liger_kernel_to_engines()
        if self.args.use_liger_kernel and self.model is not None:
            _ENGINE_KERNELS.add(self.model)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if self.args.use_liger_kernel:
            _ENGINE_KERNELS.add(model)
        return model

    # -- set-up -------------------------------------------------------------------------------
    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        # The engine owns mixed precision (16-bit weights, fp32 masters, loss scaling); an
        # accelerate autocast or GradScaler on top would cast and scale a second time.
        return {**super()._build_accelerator_args(**kwargs), "mixed_precision": "no"}

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # The Trainer enters accelerator.no_sync(model) for every micro-batch but a window's
        # last, which on a multi-process run enters the model's own no_sync (DDP's). The engine
        # reduces at its own boundaries and steps inside the backward: its no_sync (stages 0-1,
        # step() refused inside) is not for this loop, as the Trainer enters none under
        # DeepSpeed.
        accelerator_no_sync = self.accelerator.no_sync

        def no_sync(model):
            if model is not None and model is self.engine:
                return contextlib.nullcontext()
            return accelerator_no_sync(model)

        self.accelerator.no_sync = no_sync

    def _move_model_to_device(self, model, device) -> None:
        # A model built under zero_ext.Init has no storage yet: the engine allocates it shard
        # by shard on the right device.
        if any(p.is_meta for p in model.parameters()):
            return
        super()._move_model_to_device(model, device)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Replaces the Trainer's optimizer and scheduler creation and accelerate's prepare of
        the model (which would wrap it in DistributedDataParallel) with the engine."""
        if self.engine is not None and self.engine.module is not self.model:
            # model_init (hyperparameter_search) built a new model for this train(): its own
            # engine (the old one lets go of the old model)
            self.engine.destroy()
            self.engine = None
        if self.engine is None:
            self._create_engine(max_steps)
        else:
            # Another train() on the same model: the optimizer state stays, and the schedule
            # starts again over this run's steps, as the Trainer recreates the one it made
            # (one given with optimizers= goes on).
            if not self._given_scheduler:
                scheduler = self._schedule(self._filled_config(max_steps), max_steps)(
                    self.engine.optimizer)
                self.engine.lr_scheduler = scheduler
                self.lr_scheduler = self._as_trainers_scheduler(scheduler)
            self.optimizer = _EngineOptimizer(self.engine.optimizer)
        self.model_wrapped = self.engine
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.engine, train_dataloader

    def _filled_config(self, max_steps: int) -> dict:
        return fill_config(self.zero_config, self.args, world_size=self.args.world_size,
                           max_steps=max_steps, hidden_size=model_hidden_size(self.model),
                           own_optimizer=self.optimizer is not None
                           or self.optimizer_cls_and_kwargs is not None
                           or type(self).create_optimizer is not Trainer.create_optimizer)

    def _schedule(self, config: dict, max_steps: int):
        """optimizer -> the LR schedule: the config's (DeepSpeed's schedulers, "auto" steps
        filled from this run), else the Trainer's own: its create_scheduler (lr_scheduler_type,
        warmup; or a subclass's override), called on a copy whose lr_scheduler is None and whose
        optimizer is the engine's, so that it builds one for the engine's optimizer whichever
        of the two it reads (transformers' DeepSpeed integration calls it on such a copy)."""
        if config.get("scheduler") is not None:
            from zero_ext.config import ZeroConfig
            from zero_ext.lr_schedules import build_scheduler
            schedule = ZeroConfig.load(config).scheduler
            return lambda optimizer: build_scheduler(schedule, optimizer)

        def trainers_own(optimizer):
            trainer = copy.copy(self)
            trainer.lr_scheduler, trainer.optimizer = None, optimizer
            return trainer.create_scheduler(num_training_steps=max_steps, optimizer=optimizer)

        return trainers_own

    def _create_engine(self, max_steps: int) -> None:
        model = self.model
        config = self._filled_config(max_steps)
        schedule = self._schedule(config, max_steps)
        if config.get("optimizer") is None:
            # As transformers' DeepSpeed integration does without an optimizer section: the
            # Trainer's own (optimizers=, optimizer_cls_and_kwargs=, else TrainingArguments.
            # optim, with its weight-decay split) runs on the shards, "untested" allowed.
            client, groups = self.create_optimizer(), None
            config["zero_allow_untested_optimizer"] = True
            if self._given_scheduler:  # optimizers=(optimizer, scheduler)
                schedule = self.lr_scheduler
        else:
            # The Trainer's weight-decay split: no decay on biases and norm weights.
            decay = set(self.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay],
                       "weight_decay": config["optimizer"]["params"]["weight_decay"]},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            groups, client = [g for g in groups if g["params"]], None
        with warnings.catch_warnings():
            # A schedule stepped with a metric (ReduceLROnPlateau) is the Trainer's to step,
            # with the evaluation's metric, as without DeepSpeed.
            warnings.filterwarnings("ignore", message=r"zero_ext\.initialize: .*needs "
                                    r"arguments the engine does not have")
            engine, _, _, scheduler = zero_ext.initialize(
                model=model, config=config, model_parameters=groups, optimizer=client,
                lr_scheduler=schedule)
        self.engine = engine
        if self.args.torch_compile:  # the model, in place, as DeepSpeed's engine.compile
            mode = self.args.torch_compile_mode
            engine.compile(backend=self.args.torch_compile_backend,
                           compile_kwargs={"mode": mode} if mode is not None else None)
        # One output: the Trainer's progress bar and logs; the engine's figures go into the
        # Trainer's logs (log() below), so they reach report_to.
        engine.log_externally()
        from zero_ext.integrations.trl import adapt_trainer
        adapt_trainer(self)
        if self.pretrained_weights is not None:  # a resumed checkpoint overrides them after
            engine.load_weights(os.fspath(self.pretrained_weights))
        self.optimizer = _EngineOptimizer(engine.optimizer)
        self.lr_scheduler = self._as_trainers_scheduler(scheduler)

    def _as_trainers_scheduler(self, scheduler):
        """The engine's schedule (the config's, else the Trainer's) as the Trainer sees it. A
        ReduceLROnPlateau as it is: the engine does not step it, the Trainer does with the
        evaluation's metric. Without an optimizer or scheduler section DeepSpeed leaves the
        Trainer's schedule to the Trainer, which logs the rate each step used; an engine that
        steps it has the Trainer log the rate after the step."""
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return scheduler
        user = config_dict(self.zero_config)
        return _EngineScheduler(scheduler, rates_used=(
            user.get("optimizer") is None and user.get("scheduler") is None))

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        # Evaluation and prediction go through the engine too: under stage 3 it gathers each
        # unit's parameters for the forward.
        if self.engine is not None:
            return self.engine
        if any(p.is_meta for p in model.parameters()):
            raise RuntimeError(
                "ZeroTrainer: the model was built under zero_ext.Init and has no weights until "
                "the engine exists, which train() creates; evaluate or predict after train() "
                "has started (e.g. eval_strategy='steps'), or build the model normally")
        return super()._wrap_model(model, training, dataloader)

    # -- training -----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model is not self.engine or (self.label_smoother is None and
                                        self.compute_loss_func is None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The Trainer shifts a causal LM's labels for the label smoother by the class name of
        # accelerate's unwrapped model, which would be our engine: unwrap it to the user's
        # model for that look-up.
        accelerator = self.accelerator
        unwrap = accelerator.unwrap_model
        accelerator.unwrap_model = lambda m, *a, **k: (
            self.engine.module if m is self.engine else unwrap(m, *a, **k))
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            del accelerator.unwrap_model  # back to the class's method

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        engine = self.engine
        boundary = self.accelerator.gradient_state.sync_gradients
        if not boundary and engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"ZeroTrainer: the engine's accumulation window ends at micro-step "
                f"{engine.micro_steps} but the Trainer's goes on; gradient_accumulation_steps "
                f"is {engine.batch.gradient_accumulation_steps} in the engine and "
                f"{self.args.gradient_accumulation_steps} in the TrainingArguments")
        gas = self.args.gradient_accumulation_steps
        accelerator = self.accelerator

        def backward(loss, **kwargs):
            # Trainer.training_step has made `loss` this micro-batch's share of the window's
            # loss (divided by a short window's length where it is a per-batch mean);
            # engine.backward divides by gradient_accumulation_steps, so multiply that back.
            engine.backward(loss.float() * gas)
            schedule = self.lr_scheduler
            if isinstance(schedule, _EngineScheduler) and \
                    engine.is_gradient_accumulation_boundary():
                schedule.used = schedule.target.get_last_lr()
            engine.step()

        # The Trainer's own training_step runs, under the subclass's overrides of it (TRL's
        # GRPO counts its steps there, and DPO/SFT/KTO/reward enter their activation
        # offloading); only its accelerator.backward becomes the engine's backward and step.
        accelerator.backward = backward
        try:
            with engine.window_ending_here(boundary):  # an epoch's short last window too
                return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del accelerator.backward  # back to the class's method

    def _clip_grad_norm(self, model):
        # The engine clipped to gradient_clipping (= max_grad_norm) with the global norm over
        # every rank's shard inside its step; report that norm.
        return self.engine.get_global_grad_norm()

    def _get_grad_norm(self, model, grad_norm=None):
        return self.engine.get_global_grad_norm()

    # The learning rate the Trainer logs is the base class's lr_scheduler.get_last_lr(), read
    # after the engine's step has advanced the schedule: what the Trainer logs under DeepSpeed,
    # whose engine steps the schedule inside accelerator.backward (a plain Trainer reads it
    # before its scheduler step: one step earlier), except where DeepSpeed leaves the schedule
    # to the Trainer (_EngineScheduler.rates_used). See docs/integrations/transformers.md.

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every rank logs each training logging step (the loss is averaged over ranks there):
        # the engine's figures join the Trainer's logs at the same point on every rank
        # (training_metrics is collective), and reach report_to's loggers with them.
        if self.engine is not None and "loss" in logs:
            logs.update(self.engine.training_metrics())
        super().log(logs, start_time)

    # -- saving and resuming ------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Collective: the full weights as `output_dir/model.safetensors` (+ config.json, so
        `from_pretrained(output_dir)` loads them), gathered one stage-3 unit at a time."""
        if self.engine is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        from zero_ext.integrations.peft import save_adapters
        if not save_adapters(self.engine, output_dir, should_save=self.args.should_save):
            # save_on_each_node: the rank that saves on each node writes the weights too.
            self.engine.save_16bit_model(output_dir, writes=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Collective: every rank writes its shard of the master weights and optimizer state
        # (the LR scheduler and loss scale go with them) into output_dir/global_step<N>/. A
        # PEFT model's frozen base is left out, as the Trainer does under DeepSpeed: the
        # checkpoint would otherwise hold the whole base model at every save.
        from zero_ext.integrations.peft import is_peft_model
        self.engine.save_checkpoint(output_dir,
                                    exclude_frozen_parameters=is_peft_model(self.engine.module))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # An engine checkpoint is loaded whole once the engine exists (_prepare_for_training);
        # loading its full weights into the bare model first would only be overwritten.
        if os.path.isfile(os.path.join(resume_from_checkpoint, _LATEST)):
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self.engine is None:
            return super()._load_best_model()
        # Collective: the best checkpoint's weights become the fp32 masters and the model's
        # (sharded) weights; the optimizer state and step counts of the finished run stay.
        self.engine.load_checkpoint(self.state.best_model_checkpoint, load_module_only=True)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if not os.path.isfile(os.path.join(checkpoint, _LATEST)):
            raise FileNotFoundError(
                f"ZeroTrainer: {checkpoint} holds no zero_ext engine checkpoint (no "
                f"'{_LATEST}' file); resume from a checkpoint folder a ZeroTrainer wrote with "
                "save_only_model=False")
        # Collective; any world size and stage. The model weights are the loaded masters.
        engine = self.engine
        engine.load_checkpoint(checkpoint)


class ZeroTrainer(_ZeroTrainerMixin, Trainer):
    """transformers.Trainer whose model, optimizer, scheduler, precision and checkpoints belong
    to a zero_ext engine. `zero_config` is a zero_ext (DeepSpeed-style) config dict or JSON
    path; see :func:`fill_config` for how it combines with the TrainingArguments (without it,
    the config comes from ZERO_EXT_CONFIG or, after :func:`apply`, from the arguments'
    `deepspeed`; two different ones are an error). Under torchrun every rank runs the same
    script; `save_model` is collective (call it on every rank), as are evaluation and saving
    under stage 3.

    For a model too large to build whole on every rank, build it under `zero_ext.Init` and
    pass `pretrained_weights` (a save_pretrained directory or a safetensors file): the engine
    reads each rank's shards from it when it is created (engine.load_weights)."""


@functools.cache
def _zero_subclass(cls: type) -> type:
    return type(f"Zero{cls.__name__}", (_ZeroTrainerMixin, cls), {
        "__module__": __name__, "__qualname__": f"Zero{cls.__name__}",
        "__doc__": f"{cls.__module__}.{cls.__qualname__} on a zero_ext engine (see ZeroTrainer)."})


def zero_trainer(cls: type) -> type:
    """`cls` (transformers.Trainer or a subclass: TRL's SFTTrainer, DPOTrainer, GRPOTrainer,
    RewardTrainer...) with ZeroTrainer's behaviour; the same class for the same `cls`, and
    ZeroTrainer for Trainer itself. It takes ZeroTrainer's `zero_config=` and
    `pretrained_weights=` besides `cls`'s own arguments:

        trainer = zero_trainer(SFTTrainer)(model=model, args=SFTConfig(...), zero_config=cfg)
    """
    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise TypeError(f"zero_ext.zero_trainer: expected transformers.Trainer or a subclass of "
                        f"it, got {cls!r}")
    if issubclass(cls, _ZeroTrainerMixin):
        return cls
    return ZeroTrainer if cls is Trainer else _zero_subclass(cls)


def _engine_parameter_count(model, trainable_only: bool = False) -> int | None:
    """The parameter count of a zero_ext engine's model, with stage-3 parameters at their full
    size (their tensors hold no elements while released); None for anything else."""
    if not isinstance(model, zero_ext.ZeroEngine):
        return None
    # engine.monitor counts every parameter the engine trains at full size, and stage 3's
    # frozen buckets hold the frozen parameters it partitions; the others (frozen, or in no
    # optimizer group) stay whole in the model.
    rest = sum(p.numel() for p in model.module.parameters()
               if not hasattr(p, "_zero_ext_engine") and (p.requires_grad or not trainable_only))
    frozen = 0 if trainable_only else sum(layout.used_numel for layout in model.frozen_layouts)
    return model.monitor.trainable_params + rest + frozen


# Models whose ZeroTrainer has use_liger_kernel=True: fill_config turned that into the config's
# zero_ext.fused_kernels section, so the engine swaps zero_ext's kernels in when it is built.
_ENGINE_KERNELS: weakref.WeakSet = weakref.WeakSet()


def _route_liger_kernel_to_engines() -> None:
    """Trainer.train() applies Liger-Kernel to the model when use_liger_kernel is set (an
    ImportError without Liger). For a ZeroTrainer's model zero_ext's kernels take its place
    (the engine applies them, and under stage 3 they read the head's weight through its
    gather, which Liger's fused head bypasses); every other model gets Liger as before. Once
    per process."""
    original = transformers.trainer.apply_liger_kernel
    if getattr(original, "__zero_ext_original__", None) is not None:
        return

    def apply_liger_kernel(model, kernel_config):
        if model not in _ENGINE_KERNELS:
            return original(model, kernel_config)
        return None

    apply_liger_kernel.__zero_ext_original__ = original
    transformers.trainer.apply_liger_kernel = apply_liger_kernel


def _count_parameters_through_engines() -> None:
    """The Trainer reports "Number of trainable parameters" with transformers'
    get_model_param_count on the engine, which sees released stage-3 parameters as empty (it
    counts full sizes only for DeepSpeed's). Once per process, that function learns zero_ext
    engines; every other model is counted by the original."""
    original = transformers.trainer.get_model_param_count
    if getattr(original, "__zero_ext_original__", None) is not None:
        return

    def get_model_param_count(model, trainable_only=False):
        count = _engine_parameter_count(model, trainable_only)
        return original(model, trainable_only) if count is None else count

    get_model_param_count.__zero_ext_original__ = original
    transformers.trainer.get_model_param_count = get_model_param_count


def _check_own_optimizer(kwargs: dict, resolved) -> None:
    """An optimizer (or scheduler) given to the Trainer runs when the zero_ext config has no
    section for it, as under transformers' DeepSpeed integration; given both, one would be
    dropped silently, so it is refused."""
    optimizer, scheduler = kwargs.get("optimizers", (None, None))
    if resolved is None or (optimizer is None and scheduler is None
                            and not kwargs.get("optimizer_cls_and_kwargs")):
        return
    config = resolved[0]
    if isinstance(config, (str, os.PathLike)):
        config = read_json_config(config)
    if not isinstance(config, Mapping):
        return
    for given, section in (((optimizer, kwargs.get("optimizer_cls_and_kwargs")), "optimizer"),
                           ((scheduler,), "scheduler")):
        if any(g is not None for g in given) and config.get(section) is not None:
            raise ValueError(
                f"ZeroTrainer: the Trainer was given its own {section} and the zero_ext config "
                f"({resolved[1]}) has an \"{section}\" section too; keep one (without the "
                f"section the Trainer's {section} runs, as under transformers' DeepSpeed "
                f"integration)")
    if scheduler is not None and optimizer is None:
        raise ValueError("ZeroTrainer: optimizers=(None, scheduler) gives a scheduler without "
                         "the optimizer it drives; pass optimizers=(optimizer, scheduler)")
