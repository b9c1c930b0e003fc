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
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

import zero_ext
from zero_ext.config import read_json_config

__all__ = ["ZeroTrainer", "fill_config"]

AUTO = "auto"
_ABSENT = object()
_LATEST = "latest"  # the engine checkpoint's pointer file: marks a folder zero_ext saved into


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


class _ConfigFiller:
    """Fills one copy of a config dict and collects every contradiction before raising."""

    def __init__(self, config: Mapping):
        self.config = copy.deepcopy(dict(config))
        self.mismatches: list[str] = []

    def fill(self, path: str, value: Any, source: str, *, fill_absent: bool = True,
             must_match: bool = True) -> None:
        """`path` (dotted) becomes `value` when it is "auto", or absent and `fill_absent`;
        an explicit value must equal `value` when `must_match`."""
        *parents, key = path.split(".")
        section = self.config
        for name in parents:
            if not isinstance(section.get(name), dict):
                if not fill_absent or section.get(name, None) is not None:
                    return
                section[name] = {}
            section = section[name]
        current = section.get(key, _ABSENT)
        if current == AUTO or (current is _ABSENT and fill_absent):
            section[key] = value
        elif current is not _ABSENT and must_match and not _same(current, value):
            self.mismatches.append(f"{path} is {current!r} in the config, but {source} is "
                                   f"{value!r}")

    def leftover_autos(self) -> list[str]:
        found = []

        def walk(node, prefix):
            for key, value in node.items():
                path = f"{prefix}{key}"
                if isinstance(value, dict):
                    walk(value, path + ".")
                elif value == AUTO:
                    found.append(path)

        walk(self.config, "")
        return found


def _optim_name(args: TrainingArguments) -> str:
    return str(getattr(args.optim, "value", args.optim))


def fill_config(config: Mapping | str | os.PathLike, args: TrainingArguments, *,
                world_size: int, max_steps: int | None = None,
                hidden_size: int | None = None) -> dict:
    """The zero_ext config (dict or JSON path) completed from `args`, as a new dict.

    Filled from the arguments when "auto" or absent (an explicit value must agree):
    train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size (with
    `world_size`), gradient_clipping (max_grad_norm), fp16/bf16.enabled, and the AdamW
    hyperparameters optimizer.params.lr/betas/eps/weight_decay (an absent optimizer section
    becomes AdamW when args.optim is the Trainer's torch AdamW). Filled only when "auto": the
    scheduler's warmup_min_lr (0), warmup_max_lr (lr), warmup_num_steps and total_num_steps
    (from `max_steps`), and, from the model's `hidden_size`, DeepSpeed's bucket-size
    heuristics. Raises one ValueError listing every contradiction and every "auto" that has
    no counterpart among the arguments.
    """
    raw = read_json_config(config) if isinstance(config, (str, os.PathLike)) else config
    if not isinstance(raw, Mapping):
        raise TypeError(f"ZeroTrainer: zero_config must be a dict or a path to a JSON file, got "
                        f"{type(config).__name__}")
    filler = _ConfigFiller(raw)
    cfg = filler.config
    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    filler.fill("train_micro_batch_size_per_gpu", micro,
                "TrainingArguments.per_device_train_batch_size")
    filler.fill("gradient_accumulation_steps", gas,
                "TrainingArguments.gradient_accumulation_steps")
    filler.fill("train_batch_size", micro * gas * world_size,
                f"per_device_train_batch_size * gradient_accumulation_steps * world size "
                f"({micro} * {gas} * {world_size})")
    filler.fill("gradient_clipping", float(max(args.max_grad_norm or 0.0, 0.0)),
                "TrainingArguments.max_grad_norm")
    filler.fill("fp16.enabled", bool(args.fp16), "TrainingArguments.fp16")
    bf16_key = "bfloat16" if "bfloat16" in cfg and "bf16" not in cfg else "bf16"
    filler.fill(f"{bf16_key}.enabled", bool(args.bf16), "TrainingArguments.bf16")

    if cfg.get("optimizer") is None:
        # The Trainer's torch AdamW variants; zero_ext's sharded AdamW computes the same update.
        if _optim_name(args) not in ("adamw_torch", "adamw_torch_fused"):
            raise ValueError(
                f"ZeroTrainer: TrainingArguments.optim is {_optim_name(args)!r}, but the zero_ext "
                "engine shards AdamW/Adam only; set optim='adamw_torch' or add an \"optimizer\" "
                "section to the zero_ext config")
        cfg["optimizer"] = {"type": "AdamW", "params": {}}
    filler.fill("optimizer.params.lr", args.learning_rate, "TrainingArguments.learning_rate")
    filler.fill("optimizer.params.betas", [args.adam_beta1, args.adam_beta2],
                "[TrainingArguments.adam_beta1, adam_beta2]")
    filler.fill("optimizer.params.eps", args.adam_epsilon, "TrainingArguments.adam_epsilon")
    filler.fill("optimizer.params.weight_decay", args.weight_decay,
                "TrainingArguments.weight_decay")

    if isinstance(cfg.get("scheduler"), dict) and max_steps is not None:
        auto_only = {"fill_absent": False}
        filler.fill("scheduler.params.warmup_min_lr", 0.0, "the Trainer's schedules (0)",
                    must_match=False, **auto_only)
        filler.fill("scheduler.params.warmup_max_lr", args.learning_rate,
                    "TrainingArguments.learning_rate", **auto_only)
        # DeepSpeed's schedules warm up over max(2, warmup_num_steps) steps, so 0 and 1 give
        # the same schedule; the config requires >= 1.
        filler.fill("scheduler.params.warmup_num_steps", max(args.get_warmup_steps(max_steps), 1),
                    "TrainingArguments.warmup_steps (for max_steps "
                    f"{max_steps})", **auto_only)
        filler.fill("scheduler.params.total_num_steps", max_steps,
                    "the Trainer's max_steps", **auto_only)
    if hidden_size:
        # DeepSpeed's Trainer integration sizes buckets from the model's width the same way.
        heuristics = {"fill_absent": False, "must_match": False}
        filler.fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size,
                    "hidden_size**2", **heuristics)
        filler.fill("zero_optimization.stage3_prefetch_bucket_size",
                    int(0.9 * hidden_size * hidden_size), "0.9 * hidden_size**2", **heuristics)
        filler.fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size,
                    "10 * hidden_size", **heuristics)

    problems = [f"  - {m}" for m in filler.mismatches]
    problems += [f"  - {path} is \"auto\", but no TrainingArguments value corresponds to it; "
                 "give a value" for path in filler.leftover_autos()]
    if problems:
        raise ValueError(
            "ZeroTrainer: the zero_ext config does not agree with the TrainingArguments:\n"
            + "\n".join(problems) + "\nSet the config keys to \"auto\" (or remove them) to take "
            "the TrainingArguments' values, or change the arguments to match the config.")
    return cfg


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
    leaves the schedule where it was)."""

    def step(self, *args, **kwargs):
        return None


class ZeroTrainer(Trainer):
    """transformers.Trainer whose model, optimizer, scheduler, precision and checkpoints belong
    to a zero_ext engine. `zero_config` is a zero_ext (DeepSpeed-style) config dict or JSON
    path; see :func:`fill_config` for how it combines with the TrainingArguments. Under
    torchrun every rank runs the same script; `save_model` is collective (call it on every
    rank), as are evaluation and saving under stage 3.

    For a model too large to build whole on every rank, build it under `zero_ext.Init` and
    pass `pretrained_weights` (a save_pretrained directory or a safetensors file): the engine
    reads each rank's shards from it when it is created (engine.load_weights)."""

    def __init__(self, *args, zero_config: Mapping | str | os.PathLike,
                 pretrained_weights: str | os.PathLike | None = None, **kwargs):
        optimizers = kwargs.get("optimizers", (None, None))
        if any(o is not None for o in optimizers) or kwargs.get("optimizer_cls_and_kwargs"):
            raise ValueError(
                "ZeroTrainer: the zero_ext engine builds the optimizer and LR scheduler; drop "
                "`optimizers=`/`optimizer_cls_and_kwargs=` and describe them in zero_config "
                "(an \"optimizer\"/\"scheduler\" section) or in the TrainingArguments")
        self.zero_config = zero_config
        self.pretrained_weights = pretrained_weights
        self.engine = None
        super().__init__(*args, **kwargs)
        if self.args.torch_compile:
            raise ValueError("ZeroTrainer: torch_compile=True is not supported; compile the "
                             "model's blocks yourself before passing it")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.args.world_size:
            # Otherwise every rank would train on the whole dataset as its own one-rank run.
            raise ValueError(
                f"ZeroTrainer: {launched} processes were launched but the TrainingArguments see "
                f"{self.args.world_size}; on a machine without GPUs pass use_cpu=True to "
                "TrainingArguments so that accelerate joins the processes (gloo)")

    # -- set-up -------------------------------------------------------------------------------
    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        # The engine owns mixed precision (16-bit weights, fp32 masters, loss scaling); an
        # accelerate autocast or GradScaler on top would cast and scale a second time.
        return {**super()._build_accelerator_args(**kwargs), "mixed_precision": "no"}

    def _move_model_to_device(self, model, device) -> None:
        # A model built under zero_ext.Init has no storage yet: the engine allocates it shard
        # by shard on the right device.
        if any(p.is_meta for p in model.parameters()):
            return
        super()._move_model_to_device(model, device)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Replaces the Trainer's optimizer and scheduler creation and accelerate's prepare of
        the model (which would wrap it in DistributedDataParallel) with the engine."""
        if self.engine is None:
            self._create_engine(max_steps)
        self.model_wrapped = self.engine
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.engine, train_dataloader

    def _create_engine(self, max_steps: int) -> None:
        model = self.model
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        config = fill_config(self.zero_config, self.args, world_size=self.args.world_size,
                             max_steps=max_steps, hidden_size=hidden)
        # The Trainer's weight-decay split: no decay on biases and norm weights.
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay],
                   "weight_decay": config["optimizer"]["params"]["weight_decay"]},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        lr_scheduler = None
        if config.get("scheduler") is None:
            # No DeepSpeed schedule configured: the Trainer's own (lr_scheduler_type, warmup).
            from transformers.optimization import get_scheduler

            def lr_scheduler(optimizer):
                return get_scheduler(
                    self.args.lr_scheduler_type, optimizer=optimizer,
                    num_warmup_steps=self.args.get_warmup_steps(max_steps),
                    num_training_steps=max_steps,
                    scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        engine, _, _, scheduler = zero_ext.initialize(
            model=model, config=config, model_parameters=groups, lr_scheduler=lr_scheduler)
        self.engine = engine
        if self.pretrained_weights is not None:  # a resumed checkpoint overrides them after
            engine.load_weights(os.fspath(self.pretrained_weights))
        self.optimizer = _EngineOptimizer(engine.optimizer)
        self.lr_scheduler = _EngineScheduler(scheduler)  # the config's, else the Trainer's
        self._lr_of_last_step: float | None = None

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
        if boundary and not engine.is_gradient_accumulation_boundary():
            engine.set_gradient_accumulation_boundary()  # an epoch's short last window
        elif not boundary and engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"ZeroTrainer: the engine's accumulation window ends at micro-step "
                f"{engine.micro_steps} but the Trainer's goes on; gradient_accumulation_steps "
                f"is {engine.batch.gradient_accumulation_steps} in the engine and "
                f"{self.args.gradient_accumulation_steps} in the TrainingArguments")
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        gas = self.args.gradient_accumulation_steps
        window = self.current_gradient_accumulation_steps  # shorter at an epoch's end
        # As in Trainer.training_step: a loss normalised by the window's item count is already
        # this micro-batch's share of the window's loss; otherwise it is a per-batch mean.
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None)
        # engine.backward divides by gradient_accumulation_steps, which is the one
        # 1/accumulation a per-batch mean needs in a whole window; otherwise the loss is
        # multiplied back first.
        if scaled:
            engine.backward(loss.float() * gas)
        elif window != gas:
            engine.backward(loss.float() * (gas / window))
        else:
            engine.backward(loss)
        if boundary:
            self._lr_of_last_step = engine.get_lr()[0]
        engine.step()
        return (loss if scaled else loss / window).detach()

    def _clip_grad_norm(self, model):
        # The engine clipped to gradient_clipping (= max_grad_norm) with the global norm over
        # every rank's shard inside its step; report that norm.
        return self.engine.get_global_grad_norm()

    def _get_grad_norm(self, model, grad_norm=None):
        return self.engine.get_global_grad_norm()

    def _get_learning_rate(self) -> float:
        # The Trainer logs the rate the step used; the engine has already advanced the schedule.
        if self.engine is not None and self._lr_of_last_step is not None:
            return self._lr_of_last_step
        return super()._get_learning_rate()

    # -- saving and resuming ------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Collective: the full weights as `output_dir/model.safetensors` (+ config.json, so
        `from_pretrained(output_dir)` loads them), gathered one stage-3 unit at a time."""
        if self.engine is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.engine.save_16bit_model(output_dir)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Collective: every rank writes its shard of the master weights and optimizer state
        # (the LR scheduler and loss scale go with them) into output_dir/global_step<N>/.
        self.engine.save_checkpoint(output_dir)

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
