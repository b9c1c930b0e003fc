"""The optimizer step at an accumulation boundary, and top-k's variance freeze before it.

ZeroEngine.step() calls `boundary_step` once the window's backwards are done: the gradient
norm and the step's identity agreed on by every rank (zero/agreement.py), the fp16 loss
scale's update, the skip or raise on a non-finite norm, the clipping factor, then the optimizer
(zero/optimizer_placement.py) and the parameter all-gather. Nothing changes optimizer state or
weights before that agreement. ZeroEngine.backward() calls `freeze_variance` at the first
micro-step of the first sparse step of top-k compression.

These are functions of the engine, as zero/reporting.py's are: the engine holds the state
(counters, buckets, optimizer), and the step's rules read here in one place.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch

__all__ = ["boundary_step", "check_lr_kwargs", "freeze_variance"]


def check_lr_kwargs(scheduler, lr_kwargs: dict | None) -> None:
    """engine.step(lr_kwargs=...): refused before anything steps when the LR scheduler's step()
    does not take them (found after the optimizer step, the update would be applied and not
    counted, and a retry would apply it twice)."""
    if not lr_kwargs or scheduler is None:
        return
    error = _step_refuses(scheduler, lr_kwargs)
    if error is not None:
        raise TypeError(
            f"zero_ext: engine.step(lr_kwargs={lr_kwargs!r}): {type(scheduler).__name__}.step() "
            f"does not take them ({error}); nothing was stepped. Pass the arguments its step() "
            f"takes (zero_ext's schedules take last_batch_iteration, as DeepSpeed's)") from None


def steps_without_arguments(scheduler) -> bool:
    """Whether engine.step() can step `scheduler` with no arguments: ReduceLROnPlateau's step
    needs its metric, which the engine does not have (the script steps it)."""
    return _step_refuses(scheduler, {}) is None


def _step_refuses(scheduler, kwargs: dict) -> TypeError | None:
    """Why `scheduler.step(**kwargs)` would not bind (None when it would, or when its
    signature cannot be read)."""
    try:
        inspect.signature(scheduler.step).bind(**kwargs)
    except TypeError as error:
        return error
    except ValueError:
        return None
    return None


@torch.no_grad()
def boundary_step(engine, backwards: int, lr_kwargs: dict | None = None) -> bool:
    """`backwards`: engine.backward() calls since the last step (agreed on with the norm);
    `lr_kwargs`: for the LR schedule's step. Whether the step was applied (False: skipped on a
    non-finite gradient norm)."""
    if engine.offload is not None:
        try:  # the uploads are waited for even on an error
            if backwards:
                engine.offload.wait_for_gradients()
            # The device gradients are gone (copied, then freed); their norms, taken on the
            # device before, decide clipping and the skip as without offload.
            stepped = _step_with(engine, None, backwards)
        finally:
            engine.offload.finish()
    else:
        stepped = _step_with(
            engine, engine.grad_buckets.reduced_grads() if backwards else None, backwards)
    if not stepped:
        return False
    engine.compression.end_step()
    if engine.stage >= 1:
        engine._persistent.all_gather()
    if engine.lr_scheduler is not None and (lr_kwargs or
                                            steps_without_arguments(engine.lr_scheduler)):
        engine.lr_scheduler.step(**(lr_kwargs or {}))
    return True


def _step_with(engine, grads: list[torch.Tensor] | None, backwards: int) -> bool:
    """Norm, overflow skip, clipping and the optimizer step (with `grads`, or offload's host
    copies when None); False when skipped. Nothing changes before every rank has agreed that
    the step is the same step everywhere, finite, and how much to clip."""
    buckets, config, scaler = engine.grad_buckets, engine.config, engine.loss_scaler
    norm = engine._agreement.norm(buckets.reduced_norms() if backwards else [],
                                  engine.global_steps, backwards, sharded=engine.stage >= 1,
                                  detached=engine.detached_parameters)
    if not config.zero_optimization.ignore_unused_parameters:
        engine._agreement.refuse_unused(engine.module, buckets.without_gradient())
    scale = scaler.scale if scaler is not None else 1.0
    overflow = not math.isfinite(norm)
    if scaler is not None:
        scaler.update(overflow)
    _record(engine, norm / scale, overflow)
    if overflow and config.nonfinite_gradients == "skip":
        buckets.clear()
        engine.compression.reset()  # the residuals hold parts of the discarded gradients
        engine.skipped_steps += 1
        if scaler is None and engine.rank == 0:  # fp16's scaler says its own
            warnings.warn(
                f"zero_ext: the gradient norm is {norm} at step {engine.global_steps}: the step "
                f"is skipped on every rank, weights and optimizer state unchanged "
                f"({engine.skipped_steps} skipped so far), as DeepSpeed skips it. Without fp16 "
                "loss scaling nothing adapts: if it recurs, check the data and the loss for "
                "inf/nan, lower the learning rate or enable gradient_clipping",
                RuntimeWarning, stacklevel=4)
        return False
    if overflow and engine.rank == 0:
        warnings.warn(
            f"zero_ext: the gradient norm is {norm} at step {engine.global_steps} and the update "
            "is applied (bf16.check_grad_overflow is false): weights and optimizer state are "
            "now inf/nan", RuntimeWarning, stacklevel=4)
    norm /= scale
    factor = 1.0 / scale
    clip = config.gradient_clipping
    if clip > 0:
        clip_coef = clip / (norm + 1e-6)
        if clip_coef < 1.0:
            factor *= clip_coef
    engine._optimizers.apply(grads, factor, buckets)
    buckets.clear()
    return True


def _record(engine, norm: float, overflow: bool) -> None:
    """The step's gradient norm (the loss scale divided out) and whether it was non-finite,
    where get_global_grad_norm() and DeepSpeed's optimizer attributes read them. A non-finite
    norm (inf, or nan from a nan gradient) reads inf, as DeepSpeed reports an overflow."""
    if overflow:
        norm = math.inf
    engine._global_grad_norm = norm
    if engine.replicated_optimizer is None:
        engine.optimizer._global_grad_norm, engine.optimizer.overflow = norm, overflow


def freeze_variance(engine) -> None:
    """Top-k's freeze_variance, at the engine's first sparse step (every rank at the same
    step: it follows global_steps), once. zero_ext's AdamW only; a torch optimizer is warned
    about."""
    engine.compression.variance_settled = True
    user = engine.replicated_optimizer or getattr(engine.optimizer, "optimizer", None)
    if user is not None:
        if engine.rank == 0:
            warnings.warn(
                f"zero_ext: freeze_variance applies to zero_ext's AdamW; the "
                f"{type(user).__name__} given to initialize keeps "
                "updating its second moment (top-k gradients then move rarely-sent entries "
                "less far); configure \"optimizer\": {\"type\": \"AdamW\"} instead",
                stacklevel=3)
        return
    optimizer, compression = engine.optimizer, engine.compression
    groups, shards = optimizer.param_groups, optimizer.shards
    momentum = compression.compresses_momentum
    resumed = all(g.get("variance_frozen") for g in groups)  # or frozen at an earlier step
    if not resumed:
        engine._settle_step()  # a deferred CPU step still reads the moments
    frozen = not resumed and optimizer.freeze_variance(compressed_momentum=momentum)
    if momentum:  # after a resume the residuals hold the momentum: no first moment again
        if any("compressed_beta1" not in g for g in groups):
            raise ValueError(
                "zero_ext: compress_momentum is on, but the optimizer's variance was frozen "
                "without it (the checkpoint this run resumed sent gradients, and its moments "
                "and residuals mean that); resume with compress_momentum false, or start the "
                "run again")
        compression.start_momentum(
            {s.layout.index: groups[s.layout.group]["compressed_beta1"] for s in shards},
            None if resumed else {s.layout.index: s.exp_avg for s in shards})
    if frozen and engine.rank == 0:
        print(f"[zero_ext] step {engine.global_steps}: dense warm-up over, Adam's second "
              f"moment frozen, top-k {'momentum' if momentum else 'gradients'} from here on",
              flush=True)
