"""zero_ext.integrations.trl: TRL's trainers (SFT, DPO, GRPO, reward) on a zero_ext engine.

ZeroTrainer (``zero_trainer(SFTTrainer)`` and friends, or any TRL trainer under
``zero_ext.run``) calls :func:`adapt_trainer` once its engine exists; everything TRL-specific
lives here, so that the Trainer integration stays library-neutral.

At stages 1 and 2 every rank holds the whole model and TRL runs unchanged. Stage 3 needs two
adaptations, both for places where TRL reads a partitioned parameter itself and asks DeepSpeed,
not the engine, whether to gather it:

- TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``: SFT, DPO, GRPO, RLOO, KTO)
  multiplies the hidden states by ``lm_head.weight`` inside a custom autograd Function without
  calling ``lm_head``, and sizes its loops from ``weight.shape``, which a partitioned parameter
  reports as ``(0,)``: the forward computes on nothing. TRL gathers the weight only when
  DeepSpeed's ZeRO-3 is on (``maybe_gather_lm_head_ctx``). :func:`gathered_lm_head` replaces that
  context manager: inside the model's forward it holds the head's unit gathered until the
  forward ends and gathers it again for the backward, exactly as the ``lm_head`` module's own
  forward would, so its gradient is reduce-scattered into the gradient buckets with the rest.
- ``sync_ref_model=True`` (``SyncRefModelCallback``) mixes the policy's weights into the
  reference model after each step, reading the policy's parameters outside any forward; the
  engine's placeholder refuses that read, so the callback here gathers them first.

The reference model (DPO's ``ref_model``, GRPO's with ``beta > 0``) is not the engine's: it is
frozen and used without gradients, so zero_ext leaves it whole on every rank (TRL prepares it
with accelerate in evaluation mode; DeepSpeed would wrap it in a ZeRO-3 inference engine).
"""

from __future__ import annotations

import contextlib

__all__ = ["adapt_trainer", "gathered_lm_head", "is_trl_trainer"]


def is_trl_trainer(trainer) -> bool:
    """Whether `trainer` is (a subclass of) one of TRL's trainers; decided from the class
    hierarchy alone, so that trl is never imported for a plain Trainer."""
    return any(cls.__module__.startswith("trl.") for cls in type(trainer).__mro__)


def adapt_trainer(trainer) -> None:
    """TRL-specific adaptation of a trainer whose engine (`trainer.engine`) was just created;
    see the module's docstring. Does nothing for a trainer that is not TRL's, nor below
    stage 3 (or at stage 3 when every parameter stayed whole)."""
    if not is_trl_trainer(trainer) or trainer.engine.partitioned is None:
        return
    _install_lm_head_gather()
    from trl.trainer.callbacks import SyncRefModelCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, SyncRefModelCallback):
            # The callback calls self.sync_target_model(model, ref_model, alpha).
            callback.sync_target_model = _sync_ref_model_gathered


def gathered_lm_head(*params):
    """zero_ext's ``trl.trainer.utils.maybe_gather_lm_head_ctx``: a context manager in which
    the given parameters (the LM head's weight and bias; None is skipped) hold their full values.

    For parameters a zero_ext stage-3 engine partitions: inside a forward of that engine's model
    their unit is gathered and held until the forward ends, then gathered again when backward
    reaches the forward's outputs, and released once its gradients are reduced (a null context
    is returned, there being nothing to undo at exit); outside any forward (e.g. the fused
    Function's backward) a released unit is gathered for the block with
    ``zero_ext.GatheredParameters``, and a gathered one is used as it is. Any other parameter
    goes to TRL's own function (DeepSpeed's gather, or nothing)."""
    from zero_ext.zero.gathered import _is_partitioned
    from zero_ext.zero.params import _engine_of

    ours = {id(p): p for p in params
            if p is not None and _engine_of(p) is not None and _is_partitioned(p)}
    if not ours:
        return _trl_lm_head_ctx(*params)
    for param in ours.values():
        _engine_of(param).partitioned.hooks.hold_in_forward(param)
    released = [p for p in ours.values() if p.numel() == 0]  # a partitioned, released unit
    if not released:
        return contextlib.nullcontext()
    import zero_ext

    return zero_ext.GatheredParameters(released)


def _trl_lm_head_ctx(*params):
    """TRL's own maybe_gather_lm_head_ctx, as it was before :func:`_install_lm_head_gather`."""
    from trl.trainer import utils

    return getattr(utils.maybe_gather_lm_head_ctx, "_zero_ext_wrapped",
                   utils.maybe_gather_lm_head_ctx)(*params)


def _install_lm_head_gather() -> None:
    """Points ``trl.trainer.utils.maybe_gather_lm_head_ctx`` at :func:`gathered_lm_head` (once
    per process). TRL looks it up there at every call: the fused forward through its module's
    globals, the fused Function's backward by importing it then."""
    from trl.trainer import utils

    if getattr(utils.maybe_gather_lm_head_ctx, "_zero_ext_wrapped", None) is not None:
        return

    def maybe_gather_lm_head_ctx(*params):
        return gathered_lm_head(*params)

    maybe_gather_lm_head_ctx._zero_ext_wrapped = utils.maybe_gather_lm_head_ctx
    maybe_gather_lm_head_ctx.__doc__ = gathered_lm_head.__doc__
    utils.maybe_gather_lm_head_ctx = maybe_gather_lm_head_ctx


def _sync_ref_model_gathered(model, target_model, alpha: float) -> None:
    """SyncRefModelCallback.sync_target_model for a policy whose parameters a zero_ext engine
    partitions (collective): the policy is gathered, and every rank mixes it into its own whole
    copy of the reference model, which therefore stays the same on every rank."""
    from trl.trainer.callbacks import SyncRefModelCallback

    import zero_ext

    with zero_ext.GatheredParameters(list(model.parameters())):
        SyncRefModelCallback._sync_target_model(model, target_model, alpha)
