"""Where zero_ext's accelerate `Accelerator` finds its config, and how prepare() completes it.

Called by zero_ext.integrations.accelerate: `resolve_plugin` in Accelerator.__init__, the rest
in prepare(). The config lives in an accelerate `DeepSpeedPlugin` (DeepSpeed need not be
installed for it), so that its "auto" values are filled by accelerate's own code with the
values accelerate's DeepSpeed path gives them: a DeepSpeed + accelerate user's config means
the same here. Explicit values are kept, as accelerate keeps them for DeepSpeed.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.deepspeed import DummyOptim, DummyScheduler
from torch.optim.lr_scheduler import LRScheduler

from zero_ext.integrations.config_fill import (
    AUTO,
    AUTO_IS_A_VALUE,
    hidden_size_defaults,
    model_hidden_size,
)

NAME = "zero_ext.integrations.accelerate.Accelerator"


def _plugin_from(source) -> DeepSpeedPlugin:
    if isinstance(source, DeepSpeedPlugin):
        return source
    config = copy.deepcopy(source) if isinstance(source, dict) else os.fspath(source)
    return DeepSpeedPlugin(hf_ds_config=config)


def resolve_plugin(zero_config, deepspeed_plugin) -> DeepSpeedPlugin:
    """The one config of this run, as a DeepSpeedPlugin: `zero_config`, `deepspeed_plugin` or
    $ZERO_EXT_CONFIG (two of them are an error), else what `accelerate launch --use_deepspeed`
    put in the environment."""
    if isinstance(deepspeed_plugin, dict):
        if len(deepspeed_plugin) != 1:
            raise ValueError(f"{NAME}: {len(deepspeed_plugin)} DeepSpeed plugins were given; "
                             "one engine trains one model: pass a single deepspeed_plugin")
        deepspeed_plugin = next(iter(deepspeed_plugin.values()))
    env = os.environ.get("ZERO_EXT_CONFIG") or None
    given = [(name, value) for name, value in (
        ("zero_config=", zero_config), ("deepspeed_plugin=", deepspeed_plugin),
        (f"ZERO_EXT_CONFIG={env}", env)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"{NAME}: two configs were given ({' and '.join(n for n, _ in given)}); "
                         "give exactly one of them")
    if given:
        return _plugin_from(given[0][1])
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # `accelerate launch --use_deepspeed [--deepspeed_config_file ds.json | --zero_stage N]`
        return DeepSpeedPlugin()
    raise ValueError(f"{NAME}: no zero_ext config; pass deepspeed_plugin=DeepSpeedPlugin("
                     "hf_ds_config='ds.json') or zero_config='ds.json', set ZERO_EXT_CONFIG, or "
                     "launch with `accelerate launch --use_deepspeed --deepspeed_config_file ...`")


def check_optimizer_and_scheduler(config: dict, optimizer, scheduler) -> None:
    """DeepSpeed's rules under accelerate: an optimizer (scheduler) comes from the config or
    from the code, never both; DummyOptim / DummyScheduler stand for the config's."""
    if isinstance(optimizer, torch.optim.Optimizer) and "optimizer" in config:
        raise ValueError(f"{NAME}: the config has an \"optimizer\" section and the code passes "
                         "an optimizer; remove the section or pass accelerate.utils.DummyOptim")
    if isinstance(optimizer, DummyOptim) and "optimizer" not in config:
        raise ValueError(f"{NAME}: a DummyOptim stands for the config's optimizer, but the "
                         "config has no \"optimizer\" section")
    if isinstance(scheduler, LRScheduler) and "scheduler" in config:
        raise ValueError(f"{NAME}: the config has a \"scheduler\" section and the code passes a "
                         "scheduler; remove the section or pass accelerate.utils.DummyScheduler")
    if isinstance(scheduler, DummyScheduler) and "scheduler" not in config and \
            scheduler.lr_scheduler_callable is None:
        raise ValueError(f"{NAME}: a DummyScheduler stands for the config's scheduler, but the "
                         "config has no \"scheduler\" section and no lr_scheduler_callable")


def config_accumulation(plugin: DeepSpeedPlugin, accelerator_steps: int) -> int:
    """The config's gradient_accumulation_steps ("auto" or absent: the Accelerator's)."""
    plugin.fill_match("gradient_accumulation_steps", must_match=False,
                      gradient_accumulation_steps=accelerator_steps)
    steps = plugin.get_value("gradient_accumulation_steps")
    if steps is None:
        steps = plugin.deepspeed_config["gradient_accumulation_steps"] = accelerator_steps
    return steps


def micro_batch_size(plugin: DeepSpeedPlugin, loaders: list, split_batches: bool,
                     num_processes: int) -> int | None:
    """The config's train_micro_batch_size_per_gpu, or when "auto" the batch size of the data
    loaders prepared with the model (accelerate's choice among several)."""
    if not plugin.is_auto("train_micro_batch_size_per_gpu"):
        return plugin.get_value("train_micro_batch_size_per_gpu")
    sizes = [loader.batch_size for loader in loaders]
    if not sizes or any(size is None for size in sizes):
        raise ValueError(
            f"{NAME}: train_micro_batch_size_per_gpu is \"auto\", so prepare() needs an "
            "unprepared DataLoader with an integer batch_size in the same call; pass one, or "
            "set the value in the config")
    if split_batches:
        sizes = [size // num_processes for size in sizes]
    return min(sizes) if plugin.is_train_batch_min else max(sizes)


def complete_config(plugin: DeepSpeedPlugin, model, optimizer, scheduler, *, accumulation: int,
                    micro_batch: int | None, num_processes: int, split_batches: bool) -> dict:
    """The plugin's config with its "auto" values filled as accelerate fills them for
    DeepSpeed, as a new dict for zero_ext.initialize."""
    values: dict[str, Any] = {"gradient_clipping": 1.0}  # accelerate's DeepSpeed default
    if micro_batch is not None:
        values["train_micro_batch_size_per_gpu"] = micro_batch
        values["train_batch_size"] = micro_batch * accumulation * num_processes
    hidden = model_hidden_size(model)
    if hidden:
        values.update({path: value for path, value, _ in hidden_size_defaults(hidden)})
    if isinstance(optimizer, DummyOptim):
        values["optimizer.params.lr"] = optimizer.lr
        values["optimizer.params.weight_decay"] = optimizer.weight_decay
    if isinstance(scheduler, DummyScheduler) and scheduler.lr_scheduler_callable is None:
        defaults = getattr(scheduler.optimizer, "defaults", None)
        values.update({
            "scheduler.params.warmup_min_lr": 0,
            "scheduler.params.warmup_max_lr": (defaults or {}).get(
                "lr", getattr(scheduler.optimizer, "lr", None)),
            "scheduler.params.warmup_num_steps": max(1, scheduler.warmup_num_steps)})
        if scheduler.total_num_steps is not None:  # accelerate counts them per process
            values["scheduler.params.total_num_steps"] = (
                scheduler.total_num_steps if split_batches
                else math.ceil(scheduler.total_num_steps / num_processes))
    # Keys whose "auto" is DeepSpeed's own value: passed as themselves, so accelerate keeps them
    values.update(dict.fromkeys(AUTO_IS_A_VALUE, AUTO))
    try:
        plugin.deepspeed_config_process(must_match=False, **values)
    except ValueError as error:  # an "auto" that nothing here determines
        raise ValueError(f"{NAME}: the config has an \"auto\" value that prepare() cannot "
                         f"fill: {error}") from None
    config = copy.deepcopy(plugin.deepspeed_config)
    if config.get("steps_per_print") == float("inf"):  # accelerate's "never": the engine's None
        del config["steps_per_print"]
    return config
