"""zero_ext.integrations.lightning: Lightning's Trainer on a zero_ext engine.

    import zero_ext.integrations.lightning  # registers the strategy names below
    trainer = L.Trainer(strategy="zero_ext_stage_3", precision="bf16-mixed", max_steps=1000)
    # or: strategy=ZeroStrategy(config="ds_config.json")

Importing this module registers "zero_ext", "zero_ext_stage_1", "zero_ext_stage_2",
"zero_ext_stage_3", "zero_ext_stage_2_offload" and "zero_ext_stage_3_offload" in Lightning's
StrategyRegistry, as Lightning's DeepSpeed strategy registers "deepspeed_stage_*".

:class:`ZeroStrategy` is Lightning's DDP strategy (processes, ranks, the distributed sampler,
barrier / broadcast / reduce) with the zero_ext engine in place of DistributedDataParallel: the
engine holds the model, the sharded AdamW, mixed precision, clipping and the checkpoints.
Lightning keeps its loop, hooks, callbacks, loggers and LR scheduling; the Trainer's
accumulate_grad_batches, gradient_clip_val and precision complete the zero_ext config (an
explicit config value that contradicts them is an error).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers, _MockOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.model_summary import ModelSummary
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig

import zero_ext
from zero_ext.config import read_json_config
from zero_ext.engine import _rebind_scheduler, adopted_by_sharded_adamw
from zero_ext.integrations import _lightning_options
from zero_ext.integrations.config_fill import ConfigFiller
from zero_ext.lr_schedules import build_scheduler

__all__ = ["EngineModelSummary", "ZeroPrecision", "ZeroStrategy",
           "convert_zero_checkpoint_to_fp32_state_dict"]

CONFIG_ENV_VAR = "ZERO_EXT_CONFIG"
_CHECKPOINT_TAG = "checkpoint"  # <ckpt path>/checkpoint/: one engine checkpoint per path
_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
           "16-mixed": torch.float16, "16-true": torch.float16}


class ZeroPrecision(Precision):
    """Lightning's precision flag, carried out by the engine: "bf16-mixed" / "bf16-true" run
    bf16 weights with fp32 master weights (config bf16), "16-mixed" / "16-true" fp16 with
    dynamic loss scaling (config fp16), "32-true" fp32; there is no autocast. As under
    DeepSpeed, floating-point inputs are cast to the weights' dtype. Gradient clipping is the
    engine's (the global norm over every rank's shard), so clip_gradients does nothing here."""

    def __init__(self, precision: str = "32-true"):
        if precision not in _DTYPES:
            raise ValueError(
                f"zero_ext.integrations.lightning: Trainer(precision={precision!r}) is not "
                f"supported by ZeroStrategy; use one of {sorted(_DTYPES)}")
        self.precision = precision
        self.dtype = _DTYPES[precision]

    def convert_input(self, data: Any) -> Any:
        if self.dtype == torch.float32:
            return data
        from lightning_utilities import apply_to_collection

        return apply_to_collection(data, torch.Tensor, lambda t: t.to(self.dtype)
                                   if t.is_floating_point() else t)

    def clip_gradients(self, optimizer, clip_val=0.0,
                       gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        """The engine clips at its step (gradient_clipping = Trainer(gradient_clip_val))."""


def _engine_summary(engine, max_depth: int, trainer, pl_module) -> ModelSummary:
    """ModelSummary callback's summary (its `_summary` method) under a stage-3 engine."""
    return EngineModelSummary(pl_module, engine, max_depth=max_depth)


def _plain(value):
    """`value` with every mapping a plain dict (Lightning's AttributeDict hyperparameters, an
    OrderedDict of loop state), so that a data-only engine checkpoint can hold it; anything
    else that is not plain data is named by the engine's check when saving."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    return value


class EngineModelSummary(ModelSummary):
    """Lightning's model summary with each parameter of a stage-3 engine counted whole: while
    its unit is released, a partitioned parameter's own tensor is an empty placeholder (as
    DeepSpeed's, for which Lightning has DeepSpeedSummary)."""

    def __init__(self, model, engine, max_depth: int = 1):
        # Every bucketed parameter's size (trained, and stage 3's partitioned frozen ones),
        # from the engine's bucket layouts.
        self._numels = {id(param): slot.numel for param, _, slot in engine.bucket_slots()}
        super().__init__(model, max_depth)

    def _count(self, params) -> int:
        return sum(self._numels.get(id(p), p.numel()) for p in params)

    @property
    def param_nums(self) -> list[int]:
        return [self._count(layer._module.parameters()) for layer in self._layer_summary.values()]

    @property
    def total_parameters(self) -> int:
        return self._count(self._model.parameters())

    @property
    def trainable_parameters(self) -> int:
        return self._count(p for p in self._model.parameters() if p.requires_grad)


class ZeroStrategy(DDPStrategy):
    """Lightning strategy training on a zero_ext engine (ZeRO stages 0-3).

    `config`: a zero_ext (DeepSpeed-style) config dict or JSON path; None reads the path in
    $ZERO_EXT_CONFIG, else starts from an empty config. `stage`, `offload_optimizer` and
    `offload_parameters` set zero_optimization.stage (default 2, as DeepSpeed's strategy) and
    CPU offload; the config must not say otherwise. From the Trainer: gradient_accumulation_steps
    (accumulate_grad_batches), train_micro_batch_size_per_gpu (the train DataLoader's
    batch_size), gradient_clipping (gradient_clip_val; unset: the config's, else 0, as Lightning
    does not clip by default) and fp16/bf16 (precision).

    Optimizer: the one LightningModule.configure_optimizers returns (torch.optim.AdamW or Adam:
    its parameter groups and hyperparameters are adopted; any other torch optimizer runs on the
    fp32 shards, zero_allow_untested_optimizer true unless the config says false), with
    its LR scheduler, which Lightning keeps stepping (interval, frequency, ReduceLROnPlateau).
    A config with an "optimizer" section uses that one instead and configure_optimizers is not
    called (DeepSpeed's rule); its "scheduler" is then stepped by Lightning every step.

    Checkpoints: trainer.save_checkpoint(path) and ModelCheckpoint write a directory at `path`
    (every rank its shards, Lightning's own state inside), `fit(ckpt_path=path)` resumes it
    exactly (the engine also loads it at another world size or stage).
    zero_ext.consolidate(path, out) gives one weights file."""

    strategy_name = "zero_ext"

    def __init__(self, config: Mapping | str | os.PathLike | None = None, *,
                 stage: int | None = None, offload_optimizer: bool = False,
                 offload_parameters: bool = False, accelerator=None, parallel_devices=None,
                 cluster_environment=None, checkpoint_io=None, precision_plugin=None,
                 process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout,
                 **deepspeed_options: Any) -> None:
        _lightning_options.check_names(deepspeed_options)
        if deepspeed_options.get("zero_optimization") is False and stage not in (None, 0):
            raise ValueError(f"ZeroStrategy(zero_optimization=False, stage={stage}): "
                             "zero_optimization=False is stage 0; pass one of them")
        if deepspeed_options.get("load_full_weights"):
            raise ValueError(
                "ZeroStrategy(load_full_weights=True) is not supported: a ckpt_path of "
                "ZeroStrategy's is its checkpoint directory, which any world size and stage "
                "resumes; for weights alone, call engine.load_weights(path) on a safetensors "
                "file (zero_ext.consolidate writes one) before fit")
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin,
                         process_group_backend=process_group_backend, timeout=timeout)
        if config is None and os.environ.get(CONFIG_ENV_VAR):
            config = os.environ[CONFIG_ENV_VAR]
        if isinstance(config, (str, os.PathLike)):
            config = read_json_config(config)
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"zero_ext.integrations.lightning: ZeroStrategy(config=...) takes a "
                            f"dict or a path to a JSON file, got {type(config).__name__}")
        self.config = dict(config or {})
        self.stage = stage
        self.offload_optimizer = offload_optimizer
        self.offload_parameters = offload_parameters
        self.deepspeed_options = deepspeed_options  # Lightning's DeepSpeedStrategy arguments
        self.exclude_frozen_parameters = deepspeed_options.get("exclude_frozen_parameters", False)
        self.engine: zero_ext.engine.ZeroEngine | None = None
        self._fit_state: tuple[list, list] = ([], [])  # the engine's optimizer, schedulers
        self._stepping = False  # inside optimizer_step (its closure's backward ends a window)

    @property
    def deepspeed_engine(self):
        """The engine, under the name Lightning's DeepSpeedStrategy gives its own."""
        return self.engine

    # -- precision: Lightning's flag becomes the engine's ------------------------------------
    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else ZeroPrecision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        # The Trainer builds MixedPrecision / HalfPrecision from its precision flag; their
        # autocast or cast would come on top of the engine's own 16-bit weights.
        if plugin is not None and not isinstance(plugin, ZeroPrecision):
            plugin = ZeroPrecision(getattr(plugin, "precision", "32-true"))
        self._precision_plugin = plugin

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self.engine is None or self.engine.module is not module:
            if not any(p.is_meta for p in module.parameters()):
                self.model_to_device()  # (zero_ext.Init's shards are placed by the engine)
            self._create_engine(trainer, fitting)
        elif fitting:
            self._restart_schedule()
        self.model = self.engine
        if fitting:
            self.optimizers, self.lr_scheduler_configs = self._fit_state
        if self.engine.partitioned is not None:
            for callback in trainer.callbacks:  # the summary printed at on_fit_start
                if isinstance(callback, ModelSummaryCallback):
                    callback._summary = functools.partial(_engine_summary, self.engine,
                                                          callback._max_depth)
        self.barrier()

    def engine_config(self, trainer) -> dict:
        """The zero_ext config completed from the strategy's arguments and the Trainer."""
        filler = ConfigFiller(self.config)
        if self.stage is not None:
            filler.fill("zero_optimization.stage", self.stage, "the strategy's stage")
        elif self.deepspeed_options.get("zero_optimization") is False:
            filler.fill("zero_optimization.stage", 0, "the strategy's zero_optimization=False")
        else:
            filler.fill("zero_optimization.stage", 2, "the default stage", must_match=False)
        options = self.deepspeed_options
        if self.offload_optimizer:
            filler.fill("zero_optimization.offload_optimizer.device",
                        _lightning_options.offload_device(options, "offload_optimizer"),
                        "the strategy's offload_optimizer")
        if self.offload_parameters:
            filler.fill("zero_optimization.offload_param.device",
                        _lightning_options.offload_device(options, "offload_param"),
                        "the strategy's offload_parameters")
        for path, value, name in _lightning_options.config_fills(
                self.deepspeed_options, self.offload_optimizer, self.offload_parameters):
            filler.fill(path, value, f"the strategy's {name}")
        accumulation = trainer.accumulate_grad_batches
        filler.fill("gradient_accumulation_steps", accumulation,
                    "Trainer(accumulate_grad_batches)")
        micro = self._loader_batch_size(trainer)
        filler.fill("train_micro_batch_size_per_gpu",
                    micro or _lightning_options.logging_batch_size(options) or 1,
                    "the train DataLoader's batch_size", must_match=micro is not None)
        if micro is not None:
            filler.fill("train_batch_size", micro * accumulation * self.world_size,
                        f"batch_size * accumulate_grad_batches * world size ({micro} * "
                        f"{accumulation} * {self.world_size})")
        if trainer.gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
            raise ValueError("zero_ext.integrations.lightning: gradient_clip_algorithm='value' is "
                             "not supported; the engine clips by the global norm over every "
                             "rank's shard: use gradient_clip_algorithm='norm'")
        if trainer.gradient_clip_val is not None:
            filler.fill("gradient_clipping", float(trainer.gradient_clip_val),
                        "Trainer(gradient_clip_val)")
        else:
            # Lightning does not clip by default; zero_ext's default (DeepSpeed's) clips at 1.0.
            filler.fill("gradient_clipping", 0.0, "Trainer(gradient_clip_val=None)",
                        must_match=False)
        precision = self.precision_plugin.precision
        source = f"Trainer(precision={precision!r})"
        bf16_key = "bfloat16" if "bfloat16" in self.config and "bf16" not in self.config \
            else "bf16"
        filler.fill(f"{bf16_key}.enabled", precision.startswith("bf16"), source)
        filler.fill("fp16.enabled", precision.startswith("16"), source)
        return filler.finish("zero_ext.integrations.lightning", "the Lightning Trainer")

    def _loader_batch_size(self, trainer) -> int | None:
        # As Lightning's DeepSpeed strategy: the engine only counts samples/s with it.
        source = trainer.fit_loop._data_source
        if not source.is_defined():
            return None
        sampler = getattr(source.dataloader(), "batch_sampler", None)
        return getattr(sampler, "batch_size", None)

    def _configured_optimizer(self, has_optimizer: bool, has_scheduler: bool):
        """(optimizer, its LRSchedulerConfig or None) from LightningModule.configure_optimizers,
        checked; (None, None) when the zero_ext config has an "optimizer" section."""
        if has_optimizer:
            return None, None
        optimizers, schedulers = _init_optimizers_and_lr_schedulers(self.lightning_module)
        if len(optimizers) != 1 or len(schedulers) > 1:
            raise ValueError(
                f"zero_ext.integrations.lightning: configure_optimizers returned "
                f"{len(optimizers)} optimizers and {len(schedulers)} LR schedulers; the "
                "engine steps one optimizer (with at most one scheduler): return one")
        optimizer = optimizers[0]
        if isinstance(optimizer, _MockOptimizer) or \
                not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("zero_ext.integrations.lightning: configure_optimizers returned "
                             "no optimizer; return a torch.optim.AdamW (or add an "
                             "\"optimizer\" section to the zero_ext config)")
        scheduler_config = schedulers[0] if schedulers else None
        if scheduler_config is not None and has_scheduler:
            raise ValueError("zero_ext.integrations.lightning: both configure_optimizers and "
                             "the zero_ext config's \"scheduler\" section give an LR "
                             "schedule; keep one")
        return optimizer, scheduler_config

    def _restart_schedule(self) -> None:
        """Another fit() on this engine: Lightning builds the optimizer and its LR schedule anew
        for every fit (configure_optimizers; its DeepSpeed strategy, a new engine), so the
        schedule starts again, over this fit's steps, instead of going on from where the last
        fit left it (ended, at 0 for one that decays). The engine's optimizer keeps its state,
        as in ZeroTrainer's second train(), and takes the new optimizer's settings (a second
        phase's rate, lr_find's suggestion), group for group."""
        engine = self.engine
        optimizer, scheduler_config = self._configured_optimizer(
            engine.config.optimizer is not None, engine.config.scheduler is not None)
        if optimizer is not None:
            running = engine.replicated_optimizer or engine.optimizer.optimizer
            adopted = adopted_by_sharded_adamw(optimizer)
            if adopted != (running is None) or (not adopted and type(running) is not
                                                type(optimizer)):
                first = type(running).__name__ if running is not None else "AdamW"
                raise ValueError(
                    f"zero_ext.integrations.lightning: configure_optimizers returned a "
                    f"{type(optimizer).__name__} in this fit, and the engine runs the {first} "
                    f"of the first fit, whose state it keeps; return the same optimizer class "
                    f"(and amsgrad setting), or fit a new Trainer and strategy")
            if len(optimizer.param_groups) != len(engine.optimizer.param_groups):
                raise ValueError(
                    f"zero_ext.integrations.lightning: configure_optimizers returned "
                    f"{len(optimizer.param_groups)} parameter groups in this fit, the engine "
                    f"has {len(engine.optimizer.param_groups)} from the first; keep the groups")
            for mine, theirs in zip(engine.optimizer.param_groups, optimizer.param_groups):
                mine.update({k: v for k, v in theirs.items() if k != "params" and k in mine})
        if scheduler_config is not None:  # configure_optimizers' schedule, on our optimizer
            _rebind_scheduler(scheduler_config.scheduler, optimizer, engine.optimizer)
        elif engine.config.scheduler is not None:  # the config's
            scheduler_config = LRSchedulerConfig(
                build_scheduler(engine.config.scheduler, engine.optimizer), interval="step")
        if scheduler_config is not None:  # the rates of the schedule's start
            for group, lr in zip(engine.optimizer.param_groups,
                                 scheduler_config.scheduler.get_last_lr()):
                group["lr"] = lr
        self._fit_state = ([engine.optimizer], [scheduler_config] if scheduler_config else [])

    def _create_engine(self, trainer, fitting: bool) -> None:
        module = self.lightning_module
        config = self.engine_config(trainer)
        optimizer, scheduler_config = None, None
        if fitting:
            optimizer, scheduler_config = self._configured_optimizer(
                config.get("optimizer") is not None, config.get("scheduler") is not None)
        if fitting and optimizer is None and is_overridden("configure_optimizers", module):
            rank_zero_info("zero_ext: the config's \"optimizer\" section is used; "
                           "LightningModule.configure_optimizers is not called")
        if is_overridden("backward", module):
            rank_zero_warn("zero_ext: LightningModule.backward is not called: the engine runs "
                           "the backward pass (loss scaling, gradient reduction)")
        if is_overridden("configure_gradient_clipping", module):
            rank_zero_warn("zero_ext: the engine clips gradients at Trainer(gradient_clip_val) "
                           "by the global norm; LightningModule.configure_gradient_clipping "
                           "is called but clips nothing")
        if optimizer is not None:
            # Lightning's DeepSpeedStrategy allows any optimizer by default
            # (zero_allow_untested_optimizer=True): AdamW/Adam are adopted, others run on the
            # shards (zero/client_optimizer.py).
            config.setdefault("zero_allow_untested_optimizer", True)
        engine, _, _, scheduler = zero_ext.initialize(
            model=module, config=config, optimizer=optimizer,
            lr_scheduler=scheduler_config.scheduler if scheduler_config else None)
        engine.log_externally()  # Lightning's progress bar and loggers show the run
        # Lightning steps the schedule (its interval, frequency and monitor), as it does the
        # one DeepSpeed's engine built.
        engine.lr_scheduler = None
        if scheduler is not None and scheduler_config is None:
            scheduler_config = LRSchedulerConfig(scheduler, interval="step")
        self.engine = engine
        self._fit_state = ([engine.optimizer], [scheduler_config] if scheduler_config else [])

    def setup_optimizers(self, trainer) -> None:
        # The engine's optimizer is built with the engine (setup); nothing to build before.
        self.optimizers, self.lr_scheduler_configs = self._fit_state

    def _setup_model(self, model):
        return model  # no DistributedDataParallel: the engine reduces the gradients

    @contextmanager
    def block_backward_sync(self):
        """Lightning enters the model's no_sync for the micro-batches inside an accumulation
        window when the model looks like DDP (has a no_sync, as the engine does). The engine
        owns the window: it reduces at its own boundary and steps inside backward, so its
        no_sync (step() refused inside) is not entered."""
        yield None

    # -- training -----------------------------------------------------------------------------
    def backward(self, closure_loss: torch.Tensor, optimizer, *args, **kwargs) -> torch.Tensor:
        module = self.lightning_module
        engine = self.engine
        # Manual optimization: manual_backward, then opt.step() (accumulate_grad_batches is 1).
        automatic = module.automatic_optimization
        if automatic and not self._stepping and engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"zero_ext.integrations.lightning: the engine's accumulation window ends at "
                f"micro-step {engine.micro_steps} but Lightning's goes on; "
                f"gradient_accumulation_steps is {engine.batch.gradient_accumulation_steps} in "
                f"the engine and accumulate_grad_batches "
                f"{module.trainer.accumulate_grad_batches} in the Trainer (a "
                "GradientAccumulationScheduler is not supported)")
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        # Lightning divided the loss by accumulate_grad_batches and engine.backward divides by
        # gradient_accumulation_steps, the same number: undo one.
        engine.backward(closure_loss * module.trainer.accumulate_grad_batches)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        if automatic and not self._stepping:
            engine.step()  # a micro-batch inside the window: the engine counts it
        return closure_loss

    def optimizer_step(self, optimizer, closure, model=None, **kwargs) -> Any:
        module = model if model is not None else self.lightning_module
        engine = self.engine
        automatic = module.automatic_optimization
        with engine.window_ending_here(automatic):  # an epoch's short last window too
            self._stepping = True
            try:
                result = closure()
            finally:
                self._stepping = False
            self.precision_plugin._after_closure(module, optimizer)  # on_before_optimizer_step
            if automatic and result is None:
                raise RuntimeError(
                    "zero_ext.integrations.lightning: training_step returned None; every rank "
                    "must run the same backward and step: return the loss")
            engine.step()
        self._log_engine_metrics(module)
        return result

    def _log_engine_metrics(self, module) -> None:
        """engine.training_metrics() into Lightning's loggers, at the steps Lightning logs at
        (log_every_n_steps): the decision is the same on every rank, as the call is
        collective."""
        trainer = module.trainer
        if not trainer.loggers or not trainer._logger_connector.should_update_logs:
            return
        module.log_dict(self.engine.training_metrics(), on_step=True, on_epoch=False)

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the engine must exist to load its shards

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # the engine checkpoint holds the optimizer state

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # the weights are saved (sharded) by the engine

    def optimizer_state(self, optimizer) -> dict:
        return {}  # likewise the optimizer state

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Collective: a directory at `filepath`: every rank's shards of weights and optimizer
        state, and Lightning's loop, callback and scheduler state as the client state."""
        if storage_options is not None:
            raise TypeError("zero_ext.integrations.lightning: save_checkpoint(storage_options=) "
                            "is not supported: the engine writes the checkpoint, not a "
                            "CheckpointIO")
        if self.engine is None:
            raise RuntimeError("zero_ext.integrations.lightning: no engine yet: save checkpoints "
                               "during or after fit/validate/test")
        filepath = self.broadcast(os.fspath(filepath))
        client = {k: v for k, v in checkpoint.items() if k not in ("state_dict",
                                                                    "optimizer_states")}
        self.engine.save_checkpoint(filepath, tag=_CHECKPOINT_TAG, client_state=_plain(client),
                                    exclude_frozen_parameters=self.exclude_frozen_parameters)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = os.fspath(checkpoint_path)
        if not os.path.isfile(os.path.join(path, "latest")):
            raise FileNotFoundError(
                f"zero_ext.integrations.lightning: {path} is not a checkpoint ZeroStrategy wrote "
                "(a directory with a 'latest' file); to start from a plain Lightning .ckpt, "
                "load its state_dict into the module before fit() instead of ckpt_path")
        module = self.lightning_module
        fitting = module.trainer.state.fn == TrainerFn.FITTING
        # LightningModule.strict_loading False: buffers and frozen parameters the checkpoint
        # lacks keep the module's values, as Lightning's strategies load them.
        _, client_state = self.engine.load_checkpoint(
            path, load_module_strict=module.strict_loading, load_optimizer_states=fitting,
            load_lr_scheduler_states=False, load_module_only=not fitting)
        return dict(client_state or {})

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # load_checkpoint put the weights into the engine

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass  # likewise the optimizer state

    def teardown(self) -> None:
        # The module stays where the engine put it: moving it to the CPU would detach its
        # parameters from the engine's flat buffers, which a later validate/test still uses.
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    def model_sharded_context(self):
        """LightningModule.configure_model runs inside this: at stage 3 under zero_ext.Init,
        so that no rank holds the whole model it builds there (values as a plain build's)."""
        return zero_ext.Init() if self.configured_stage() == 3 else nullcontext()

    def configured_stage(self) -> int:
        if self.stage is not None:
            return self.stage
        return int((self.config.get("zero_optimization") or {}).get("stage", 2))

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        entries = [("zero_ext", "zero_ext engine, stage from the config (default 2)", {})]
        entries += [(f"zero_ext_stage_{s}", f"zero_ext engine, ZeRO stage {s}", {"stage": s})
                    for s in (1, 2, 3)]
        entries += [("zero_ext_stage_2_offload", "zero_ext engine, ZeRO stage 2, CPU offload",
                     {"stage": 2, "offload_optimizer": True}),
                    ("zero_ext_stage_3_offload", "zero_ext engine, ZeRO stage 3, CPU offload",
                     {"stage": 3, "offload_optimizer": True, "offload_parameters": True})]
        for name, description, params in entries:
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, **params)


ZeroStrategy.register_strategies(StrategyRegistry)


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_file,
                                               tag: str | None = None) -> dict[str, Any]:
    """Lightning's function of this name (lightning.pytorch.utilities.deepspeed), for
    ZeroStrategy's checkpoints: one torch file at `output_file` holding the fp32 weights as
    `state_dict` beside Lightning's own state (epoch, loops, callbacks, hyperparameters), so
    that `LightningModule.load_from_checkpoint(output_file)` loads it without the strategy.
    `checkpoint_dir`: the path trainer.save_checkpoint / ModelCheckpoint wrote. Returns what it
    wrote. Not collective: one process, any world size the checkpoint was saved at."""
    from zero_ext.checkpoint.consolidate import client_state
    from zero_ext.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    caller = "zero_ext.integrations.lightning.convert_zero_checkpoint_to_fp32_state_dict"
    checkpoint = client_state(os.fspath(checkpoint_dir), tag, caller)
    checkpoint["state_dict"] = get_fp32_state_dict_from_zero_checkpoint(
        os.fspath(checkpoint_dir), tag)
    torch.save(checkpoint, output_file)
    return checkpoint
