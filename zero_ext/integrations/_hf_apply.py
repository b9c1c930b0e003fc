"""Where a Trainer's zero_ext config comes from, and the no-code-change path (apply()).

A config can come from four places: `ZeroTrainer(zero_config=...)`, the script's own
`TrainingArguments(deepspeed=...)` / `--deepspeed ds.json` (taken by zero_ext once apply() ran),
`apply(config)` and the environment variable ZERO_EXT_CONFIG. Exactly one config is used: two
of them naming different content are one ValueError before anything trains, because silently
preferring one would train a run the user did not describe.

apply() patches two things of transformers, once per process:

- TrainingArguments.__post_init__ takes `deepspeed` before transformers sees it, so that no
  DeepSpeed code runs (transformers would import deepspeed and set up accelerate's DeepSpeed
  plugin); the arguments then carry `zero_ext_config` (config, where it came from) instead, and
  `deepspeed` is None. transformers' `is_deepspeed_zero3_enabled()` therefore stays False:
  what it switches on (from_pretrained under deepspeed.zero.Init, DeepSpeed's parameter
  gathers in TRL and PEFT) is DeepSpeed's own code, which zero_ext replaces by its own paths.
- Trainer.__new__ makes `Trainer(...)` (or any subclass: TRL's SFTTrainer, DPOTrainer...) an
  instance of `zero_trainer(cls)` when a zero_ext config is in force for its arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from transformers import Trainer, TrainingArguments

from zero_ext.config import read_json_config

__all__ = ["ENV", "apply", "find_training_arguments", "resolve_config"]

ENV = "ZERO_EXT_CONFIG"
_APPLIED: dict[str, Any] = {"patched": False, "config": None}  # apply(config)'s (config, source)


def _content(config) -> Any:
    """A config's content, to compare two of them: a path is read, a dict taken as it is."""
    if isinstance(config, (str, os.PathLike)):
        return read_json_config(os.fspath(config))
    return dict(config) if isinstance(config, Mapping) else config


def _one(sources: list[tuple[Any, str]], fix: str) -> tuple[Any, str] | None:
    """The single config among `sources` ((config, where it came from)); configs of equal
    content count once. Two different ones: a ValueError naming both and `fix`."""
    chosen = None
    for config, source in sources:
        if chosen is None:
            chosen = (config, source)
        elif _content(config) != _content(chosen[0]):
            raise ValueError(
                f"zero_ext: two different zero_ext configs were given: {chosen[1]} and {source}. "
                f"Give one: {fix}")
    return chosen


def _describe(config, where: str) -> str:
    return f"{where} ({config!r})" if isinstance(config, (str, os.PathLike)) else \
        f"{where} (a dict)"


def _global_config() -> tuple[Any, str] | None:
    """The config for every Trainer of this process: apply(config)'s, else ZERO_EXT_CONFIG's."""
    if _APPLIED["config"] is not None:
        return _APPLIED["config"]
    env = os.environ.get(ENV)
    return (env, f"the environment variable {ENV}={env}") if env else None


def find_training_arguments(args: tuple, kwargs: dict) -> TrainingArguments | None:
    """The TrainingArguments among a Trainer's constructor arguments (`args` is the second
    positional argument of Trainer and SFTTrainer, the third of DPOTrainer)."""
    for value in (kwargs.get("args"), *args, *kwargs.values()):
        if isinstance(value, TrainingArguments):
            return value
    return None


def resolve_config(zero_config, training_args: TrainingArguments | None):
    """(config, where it came from) for a zero_ext Trainer, or None when there is none yet
    (no config given and no TrainingArguments to look at). Raises the conflict error."""
    sources = []
    if zero_config is not None:
        sources.append((zero_config, _describe(zero_config, "ZeroTrainer's zero_config=")))
    taken = getattr(training_args, "zero_ext_config", None)
    if taken is not None:
        sources.append(taken)
    elif training_args is not None and training_args.deepspeed:
        # transformers took `deepspeed` itself (apply() had not run when the arguments were
        # made): its DeepSpeed integration is configured for these arguments and would run
        # beside the engine (evaluate() would go into DeepSpeed's code).
        where = _describe(training_args.deepspeed, "TrainingArguments.deepspeed")
        first = f"{sources[0][1]} and " if sources else ""
        raise ValueError(
            f"zero_ext: {first}{where} both configure the run, and transformers has set up "
            "its DeepSpeed integration for these arguments. Give one: pass the config as "
            "zero_config= and drop deepspeed= (--deepspeed), or keep deepspeed= and call "
            "zero_ext.integrations.transformers.apply() before the TrainingArguments are "
            "made (or run the script with python -m zero_ext.run), without zero_config=")
    if not sources:
        found = _global_config()
        if found is None and training_args is None:
            return None
        sources = [found] if found else []
    chosen = _one(sources, "drop ZeroTrainer's zero_config= or the script's deepspeed= "
                           f"(--deepspeed), or unset {ENV}")
    if chosen is None:
        raise ValueError(
            "zero_ext: no zero_ext config for this Trainer: pass ZeroTrainer(zero_config=...), "
            "or give the script --deepspeed ds.json (TrainingArguments(deepspeed=...)) under "
            f"zero_ext.integrations.transformers.apply() / python -m zero_ext.run, or set {ENV}")
    return chosen


def _take_deepspeed(post_init):
    def __post_init__(self):
        sources = []
        if self.deepspeed:
            sources.append((self.deepspeed, _describe(
                self.deepspeed, "TrainingArguments.deepspeed (--deepspeed)")))
            self.deepspeed = None  # transformers' DeepSpeed integration never sees it
        found = _global_config()
        if found is not None:
            sources.append(found)
        self.zero_ext_config = _one(
            sources, f"drop --deepspeed (deepspeed=) or unset {ENV} / apply()'s config, or "
                     "make both name the same config")
        post_init(self)

    __post_init__.__zero_ext_original__ = post_init
    return __post_init__


def _new(cls, *args, **kwargs):
    from zero_ext.integrations.transformers import _ZeroTrainerMixin, zero_trainer

    if not issubclass(cls, _ZeroTrainerMixin):
        training_args = find_training_arguments(args, kwargs)
        if training_args is not None:
            wanted = getattr(training_args, "zero_ext_config", None) is not None
        else:  # the Trainer will make default arguments, which take the global config
            wanted = _global_config() is not None
        if wanted:
            cls = zero_trainer(cls)
    return object.__new__(cls)


def apply(config: Mapping | str | os.PathLike | None = None) -> None:
    """From now on, in this process, every transformers Trainer (and subclass: TRL's trainers)
    whose TrainingArguments name a config with `deepspeed=` (`--deepspeed ds.json`) trains on
    a zero_ext engine, with that config; so does every Trainer when `config` is given or the
    environment variable ZERO_EXT_CONFIG names one. Call it before the TrainingArguments are
    made (`python -m zero_ext.run script.py ...` calls it before the script runs). DeepSpeed
    need not be installed: `deepspeed=` never reaches transformers' DeepSpeed integration."""
    if config is not None:
        env = os.environ.get(ENV)
        sources = [(config, _describe(config, "apply(config=...)"))]
        if env:
            sources.append((env, f"the environment variable {ENV}={env}"))
        _APPLIED["config"] = _one(sources, f"unset {ENV} or call apply() without a config")
    if _APPLIED["patched"]:
        return
    TrainingArguments.__post_init__ = _take_deepspeed(TrainingArguments.__post_init__)
    Trainer.__new__ = staticmethod(_new)
    _APPLIED["patched"] = True
