"""fp16 loss scaling, step for step as DeepSpeed 0.19 does it.

The engine builds one scaler with :func:`loss_scaler_for` when fp16 is enabled, multiplies each
loss by ``scale`` before backward and calls :meth:`DynamicLossScaler.update` once per optimizer
step, after the all-rank overflow check (so every rank updates alike). Checkpoints keep
:meth:`DynamicLossScaler.state_dict`.

DeepSpeed has two scalers, and zero_ext follows the one each stage would use there:

* ZeRO stages 1-3 (``deepspeed/runtime/fp16/loss_scaler.py``, ``DynamicLossScaler``): an
  overflow halves the scale only once ``hysteresis`` overflows have used up the budget (the
  budget is refilled when the scale grows, or after every clean step with
  ``consecutive_hysteresis``); a clean step doubles the scale when the clean steps *before*
  it since the last overflow are a positive multiple of ``loss_scale_window``
  (``stable_interval = cur_iter - last_overflow_iter - 1``), i.e. on clean step
  ``window + 1``, ``2 * window + 1``, ...; an overflow at the minimum scale with the budget
  used up raises.
* stage 0 (``FP16_Optimizer``, ``fp16/fused_optimizer.py``): every overflow halves the scale;
  there is no hysteresis. The growth rule is the same.

Where zero_ext differs on purpose (docs/deepspeed-compat.md): it raises at the minimum scale
at stage 0 too, since DeepSpeed's stage 0 would skip every step from then on without a word,
and ``fp16.raise_error_at_min_scale: false`` (zero_ext's key, named after DeepSpeed's
constructor argument) turns the error into a warning on every step skipped there.
"""

from __future__ import annotations

import warnings

from zero_ext.config import ZeroConfig

__all__ = ["DynamicLossScaler", "LossScaleAtMinimumError", "loss_scaler_for"]


class LossScaleAtMinimumError(FloatingPointError):
    """fp16 gradients overflowed with the loss scale already at fp16.min_loss_scale."""


class DynamicLossScaler:
    """The fp16 loss scale of one engine; a static scale (``dynamic=False``) never changes.

    State: ``scale``; ``clean_steps``, the steps without overflow since the last overflow (or
    since the start): DeepSpeed's ``stable_interval`` of the next update; ``hysteresis_left``,
    DeepSpeed's ``cur_hysteresis``. These three are what a checkpoint keeps.
    """

    def __init__(self, *, scale: float, dynamic: bool = True, window: int = 1000,
                 hysteresis: int = 2, min_scale: float = 1.0,
                 consecutive_hysteresis: bool = False, raise_error_at_min_scale: bool = True,
                 warn: bool = True):
        self.scale = float(scale)
        self.dynamic = dynamic
        self.window = window
        self.hysteresis = hysteresis
        self.min_scale = float(min_scale)
        self.consecutive_hysteresis = consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.warn = warn  # this process prints the warnings (rank 0)
        self.clean_steps = 0
        self.hysteresis_left = hysteresis

    def update(self, overflow: bool) -> None:
        """The scale after an optimizer step whose gradients did (not) overflow. Raises
        LossScaleAtMinimumError on an overflow at the minimum scale with no hysteresis left,
        unless raise_error_at_min_scale is false (then the step is skipped with a warning)."""
        if not self.dynamic:
            return
        if not overflow:
            if self.consecutive_hysteresis:
                self.hysteresis_left = self.hysteresis
            if self.clean_steps > 0 and self.clean_steps % self.window == 0:
                if not self.consecutive_hysteresis:
                    self.hysteresis_left = self.hysteresis
                self.scale *= 2.0
            self.clean_steps += 1
            return
        self.clean_steps = 0
        if self.hysteresis > 1 and self.hysteresis_left > 1:
            self.hysteresis_left -= 1  # DeepSpeed's delayed shift: skip, keep the scale
            return
        if self.scale == self.min_scale:
            detail = (
                f"fp16 gradients overflowed (inf/nan) with the loss scale already at its minimum, "
                f"fp16.min_loss_scale = {self.min_scale:g}: the scale cannot be lowered, so "
                "every step from here would be skipped")
            if self.raise_error_at_min_scale:
                raise LossScaleAtMinimumError(
                    f"zero_ext: {detail}. Check the loss and the data for inf/nan, lower the "
                    "learning rate, or train in bf16 (\"bf16\": {\"enabled\": true}); set "
                    "fp16.raise_error_at_min_scale false to skip such steps with a warning "
                    "instead")
            if self.warn:
                warnings.warn(f"zero_ext: {detail}; step skipped (fp16.raise_error_at_min_scale "
                              "is false)", RuntimeWarning, stacklevel=3)
            return
        self.scale = max(self.scale / 2.0, self.min_scale)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps,
                "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.hysteresis_left = int(state["hysteresis_left"])


def loss_scaler_for(config: ZeroConfig, rank: int) -> DynamicLossScaler | None:
    """The engine's loss scaler for `config` (None without fp16): DeepSpeed's ZeRO scaler at
    stages 1-3, its stage-0 rule (every overflow halves) at stage 0, where rank 0 warns once
    about hysteresis settings off DeepSpeed's default, which cannot apply there."""
    fp16 = config.fp16
    if not fp16.enabled:
        return None
    stage0 = config.zero_optimization.stage == 0
    if stage0 and fp16.dynamic_loss_scale and rank == 0 and (
            fp16.hysteresis != 2 or fp16.consecutive_hysteresis):
        warnings.warn(
            "zero_ext: fp16.hysteresis and fp16.consecutive_hysteresis have no effect at stage 0: "
            "there, as in DeepSpeed (its FP16_Optimizer), every overflow halves the loss scale. "
            "Use stage 1-3 for the delayed halving", UserWarning, stacklevel=3)
    return DynamicLossScaler(
        scale=fp16.initial_loss_scale, dynamic=fp16.dynamic_loss_scale,
        window=fp16.loss_scale_window, hysteresis=1 if stage0 else fp16.hysteresis,
        min_scale=fp16.min_loss_scale,
        consecutive_hysteresis=fp16.consecutive_hysteresis and not stage0,
        raise_error_at_min_scale=fp16.raise_error_at_min_scale, warn=rank == 0)
