"""zero_ext.lr_schedules: DeepSpeed's learning-rate schedules as torch LR schedulers.

The engine builds one from the config's ``scheduler`` section with :func:`build_scheduler` and
steps it once per optimizer step, as DeepSpeed does; users may also construct them directly.
They subclass ``torch.optim.lr_scheduler.LRScheduler``, so ``step()``, ``get_last_lr()``,
``state_dict()`` / ``load_state_dict()`` and the transformers Trainer work as with any torch
scheduler. Parameter names and defaults are DeepSpeed's (0.19); parameter checks are shared
with the config (:func:`zero_ext.config.validate_scheduler_params`).

Step counting, and parity with DeepSpeed. As DeepSpeed's, these schedulers count
``last_batch_iteration``: -1 when built, +1 per ``step()``; ``step(i)`` (DeepSpeed's
``step(last_batch_iteration=i)``, which ``engine.step(lr_kwargs=...)`` passes on) moves to
position ``i``; ``state_dict()`` is ``{"last_batch_iteration": i}``; the constructor's
``last_batch_iteration`` builds one at a position, leaving the groups' learning rates as they
are. torch's ``last_epoch`` is 0 once the scheduler is built (the constructor takes one step),
so here::

    i = last_batch_iteration = last_epoch - 1 = (number of step() calls after construction) - 1

and the learning rate after ``k`` calls of ``step()`` is DeepSpeed's formula at ``i = k - 1``,
which reproduces DeepSpeed's sequence exactly, including its first value (``i = -1``: the
minimum learning rate for WarmupLR / WarmupDecayLR, 0 for WarmupCosineLR). The base learning
rates (WarmupLR's ``warmup_max_lr`` None, WarmupCosineLR's ratios) follow torch's rule: each
group's ``initial_lr``, which the first scheduler built on the optimizer sets to its ``lr``
(DeepSpeed reads ``lr`` when built, which differs only after another schedule moved it:
docs/deepspeed-compat.md). With
``W = max(2, warmup_num_steps)`` (DeepSpeed's clamp) the warmup fraction for ``0 <= i < W`` is::

    g(i) = log(i + 1) / log(W)      (warmup_type "log")
    g(i) = i / W                    (warmup_type "linear")
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from zero_ext.config import ConfigError, SchedulerConfig, validate_scheduler_params

__all__ = ["WarmupCosineLR", "WarmupDecayLR", "WarmupLR", "build_scheduler"]


def _warmup_fraction(iteration: int, warmup_num_steps: int, warmup_type: str) -> float:
    """g(i) of the module docstring, for 0 <= iteration < warmup_num_steps."""
    if warmup_type == "log":
        return math.log(iteration + 1) / math.log(warmup_num_steps)
    return iteration / warmup_num_steps


def _check_optimizer(owner: str, optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{owner}: expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")


def _per_group(owner: str, name: str, optimizer: torch.optim.Optimizer,
               value: float | list[float]) -> list[float]:
    """One value per parameter group: a list is taken as is (its length must match), a number
    is repeated."""
    groups = len(optimizer.param_groups)
    if isinstance(value, list):
        if len(value) != groups:
            raise ConfigError(f"{owner}.{name}", f"expected one value per parameter group "
                              f"({groups}), got a list of {len(value)}")
        return list(value)
    return [value] * groups


class _DeepSpeedSchedule(LRScheduler):
    """What the three schedules share: closed-form learning rates indexed by DeepSpeed's
    ``last_batch_iteration``, DeepSpeed's step(), state dicts and constructor position."""

    def _start(self, optimizer: torch.optim.Optimizer, last_batch_iteration: int) -> None:
        """torch's set-up (the base learning rates are the groups' initial_lr, set to their lr
        by the first scheduler built on them: torch's rule, which SequentialLR and a resume
        that loads the optimizer before building the schedule rely on), then the position: -1
        writes the first learning rates into the groups, another leaves them as they are."""
        lrs = [group["lr"].clone() if torch.is_tensor(group["lr"]) else group["lr"]
               for group in optimizer.param_groups]
        LRScheduler.__init__(self, optimizer)
        if last_batch_iteration != -1:
            for group, lr in zip(optimizer.param_groups, lrs):
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            self.last_epoch = last_batch_iteration + 1
            self._last_lr = self.get_lr()

    def get_lr(self) -> list[float]:
        return self._lrs_at(self.last_epoch - 1)

    def _lrs_at(self, iteration: int) -> list[float]:
        raise NotImplementedError

    def step(self, last_batch_iteration: int | None = None) -> None:
        """DeepSpeed's: the next position, or `last_batch_iteration` when given; the groups'
        learning rates become the schedule's there."""
        self._step_count += 1
        self.last_epoch = (self.last_epoch + 1 if last_batch_iteration is None
                           else int(last_batch_iteration) + 1)
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    @property
    def last_batch_iteration(self) -> int:
        """DeepSpeed's step counter: ``last_epoch - 1`` (-1 right after construction)."""
        return self.last_epoch - 1

    @last_batch_iteration.setter
    def last_batch_iteration(self, value: int) -> None:
        self.last_epoch = int(value) + 1

    # As DeepSpeed's schedules, a state dict is the position in the schedule only: the
    # settings (total_num_steps, warmup, learning rates) are the config's, so a run resumed with
    # another length (a Trainer's new max_steps) follows it instead of the checkpoint's.
    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the position of DeepSpeed's ``{"last_batch_iteration": i}`` (this class's
        and a DeepSpeed checkpoint's) or of an earlier zero_ext's ``{"last_epoch": ...}``;
        ``get_last_lr()`` then gives that position's learning rates in this schedule (the
        engine writes them into the groups: zero_ext/checkpoint/loading.py)."""
        if "last_batch_iteration" in state_dict:
            self.last_batch_iteration = int(state_dict["last_batch_iteration"])
        else:
            self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = self.last_epoch + 1
        self._last_lr = self.get_lr()


class WarmupLR(_DeepSpeedSchedule):
    """Warm the learning rate up from ``warmup_min_lr`` to ``warmup_max_lr`` over
    ``warmup_num_steps`` steps, then hold it (DeepSpeed's ``WarmupLR``).

    With ``i``, ``W`` and ``g`` as in the module docstring, per parameter group::

        lr(i) = warmup_min_lr                                       i < 0
        lr(i) = warmup_min_lr + (warmup_max_lr - warmup_min_lr) * g(i)   0 <= i < W
        lr(i) = warmup_max_lr                                       i >= W

    Args:
        optimizer: the optimizer whose parameter groups' ``lr`` is set.
        warmup_min_lr: learning rate at the start; a number or one per parameter group.
        warmup_max_lr: learning rate after warmup; a number, one per group, or None (default,
            as in DeepSpeed 0.19) for each group's learning rate when the scheduler was built.
        warmup_num_steps: length of the warmup in steps (>= 1; below 2 acts as 2).
        warmup_type: "log" or "linear".
        last_batch_iteration: DeepSpeed's: the position to start at (-1: the start, the first
            learning rates written into the groups; another leaves them as they are).
    """

    _KIND = "WarmupLR"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ):
        self._start(optimizer, self._configure_warmup(optimizer, {
            "warmup_min_lr": warmup_min_lr, "warmup_max_lr": warmup_max_lr,
            "warmup_num_steps": warmup_num_steps, "warmup_type": warmup_type,
            "last_batch_iteration": last_batch_iteration}))

    def _configure_warmup(self, optimizer: torch.optim.Optimizer, params: dict) -> int:
        """The warmup's settings from `params` (checked as the config checks them); returns
        the position to start at."""
        _check_optimizer(self._KIND, optimizer)
        params = validate_scheduler_params(self._KIND, params, path=self._KIND)
        self.min_lrs = _per_group(self._KIND, "warmup_min_lr", optimizer,
                                  params["warmup_min_lr"])
        max_lr = params["warmup_max_lr"]
        # None: each group's base lr, known once LRScheduler.__init__ has set base_lrs.
        self.max_lrs = (None if max_lr is None
                        else _per_group(self._KIND, "warmup_max_lr", optimizer, max_lr))
        self.warmup_num_steps = max(2, params["warmup_num_steps"])
        self.warmup_type = params["warmup_type"]
        self.total_num_steps = params.get("total_num_steps")
        return params["last_batch_iteration"]

    def _lrs_at(self, iteration: int) -> list[float]:
        if iteration < 0:
            return list(self.min_lrs)
        max_lrs = self.base_lrs if self.max_lrs is None else self.max_lrs
        gamma = self._gamma(iteration)
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, max_lrs)]

    def _gamma(self, iteration: int) -> float:
        """Fraction of the way from min to max learning rate at ``iteration`` >= 0."""
        if iteration < self.warmup_num_steps:
            return _warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
        return 1.0


class WarmupDecayLR(WarmupLR):
    """:class:`WarmupLR`'s warmup, then a linear decay back to ``warmup_min_lr`` at step
    ``total_num_steps`` (DeepSpeed's ``WarmupDecayLR``; with the default ``warmup_min_lr`` of 0
    it decays to 0).

    After warmup (``i >= W``), with ``T = total_num_steps``::

        lr(i) = warmup_min_lr + (warmup_max_lr - warmup_min_lr) * max(0, (T - i) / max(1, T - W))

    Args:
        total_num_steps: the step at which the decay ends (>= warmup_num_steps).
        warmup_max_lr: as for WarmupLR (None: each group's lr), but the default is 0.001, as
            in DeepSpeed.
        The others as for :class:`WarmupLR`.
    """

    _KIND = "WarmupDecayLR"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] | None = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ):
        self._start(optimizer, self._configure_warmup(optimizer, {
            "total_num_steps": total_num_steps, "warmup_min_lr": warmup_min_lr,
            "warmup_max_lr": warmup_max_lr, "warmup_num_steps": warmup_num_steps,
            "warmup_type": warmup_type, "last_batch_iteration": last_batch_iteration}))

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return _warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
        remaining = self.total_num_steps - iteration
        return max(0.0, remaining / max(1, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_DeepSpeedSchedule):
    """Warmup then cosine decay, as ratios of each parameter group's base learning rate
    (DeepSpeed's ``WarmupCosineLR``): ``lr(i) = base_lr * ratio(i)`` with, for
    ``T = total_num_steps``::

        ratio(i) = 0                                                      i < 0
        ratio(i) = warmup_min_ratio + (1 - warmup_min_ratio) * g(i)        0 <= i < W
        ratio(i) = max(0, cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2)
                   with p = min(1, (i - W + 1) / max(1, T - W))            i >= W

    Args:
        optimizer: the optimizer; its groups' learning rates when the scheduler is built are
            the base learning rates.
        total_num_steps: the step at which the cosine reaches ``cos_min_ratio``
            (>= warmup_num_steps).
        warmup_min_ratio: ratio at the start of warmup, in [0, 1].
        warmup_num_steps: length of the warmup in steps (>= 1; below 2 acts as 2).
        cos_min_ratio: ratio at the end of the decay, in [0, 1].
        warmup_type: "log" or "linear".
        last_batch_iteration: as for :class:`WarmupLR`.
    """

    _KIND = "WarmupCosineLR"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ):
        _check_optimizer(self._KIND, optimizer)
        params = validate_scheduler_params(self._KIND, {
            "total_num_steps": total_num_steps, "warmup_min_ratio": warmup_min_ratio,
            "warmup_num_steps": warmup_num_steps, "cos_min_ratio": cos_min_ratio,
            "warmup_type": warmup_type, "last_batch_iteration": last_batch_iteration},
            path=self._KIND)
        self.total_num_steps = params["total_num_steps"]
        self.warmup_min_ratio = params["warmup_min_ratio"]
        self.warmup_num_steps = max(2, params["warmup_num_steps"])
        self.cos_min_ratio = params["cos_min_ratio"]
        self.warmup_type = params["warmup_type"]
        self._start(optimizer, params["last_batch_iteration"])

    def get_lr_ratio(self) -> float:
        """``ratio(i)`` at the current step (DeepSpeed's method of the same name)."""
        return self._ratio_at(self.last_epoch - 1)

    def _ratio_at(self, iteration: int) -> float:
        if iteration < 0:
            return 0.0
        if iteration < self.warmup_num_steps:
            warmup = _warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * warmup
        decay_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, (iteration - self.warmup_num_steps + 1) / decay_steps)
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def _lrs_at(self, iteration: int) -> list[float]:
        ratio = self._ratio_at(iteration)
        return [base_lr * ratio for base_lr in self.base_lrs]


_SCHEDULERS: dict[str, type[_DeepSpeedSchedule]] = {
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
    "WarmupCosineLR": WarmupCosineLR,
}


def build_scheduler(config: SchedulerConfig, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """The scheduler ``config`` describes, driving ``optimizer``'s learning rates (the engine
    calls this for the config's ``scheduler`` section)."""
    if not isinstance(config, SchedulerConfig):
        raise TypeError("build_scheduler: expected a zero_ext.config.SchedulerConfig, got "
                        f"{type(config).__name__}; build one with SchedulerConfig(type=..., "
                        "params={...})")
    return _SCHEDULERS[config.type](optimizer, **config.params)
