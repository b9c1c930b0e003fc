"""Compressed communication in the engine (issue 16): which reduction each gradient bucket runs,
its error-feedback state, and which gather stage 3 uses for the weights it computes with.

The engine builds one GradientCompression from `ZeroConfig.compression()` (a CompressionPlan).
GradientBuckets calls `reduce` instead of comm.reduce_scatter / comm.all_reduce when gradients
are compressed; PartitionedParameters takes `weight_gather` for its gathers over every rank.
The collectives themselves are comm's (zero_ext/comm/compressed.py); this module holds what
depends on the training run rather than on one call:

  int8 / int4, stages 1-3  comm.quantized_reduce_scatter, two hops when the nodes allow it
                           and the plan says so; with error feedback one QuantFeedback per
                           bucket (1 byte per element and 4 per chunk: fp8 residuals)
  topk, stage 0            comm.sparse_all_reduce (every rank ends with the same gradient)
  topk, stages 1-2         comm.sparse_reduce_scatter; one TopkFeedback per bucket (fp32
                           residual and momentum, DGC), at the density of the warm-up schedule
  weights int8, stage 3    comm.quantized_all_gather for the gathers whose values only feed the
                           forward and backward (qwZ)

Top-k with compress_momentum (after freeze_variance's dense warm-up) sends Adam's momentum
instead of the gradient: the engine calls `start_momentum` when it freezes the variance (the
optimizer's beta1 per bucket, Adam's first moment as it stands then), the buckets scale what
they hand over by `gradient_scale` (1 - beta1), and `end_step` returns beta1 of the step's
deliveries to the residuals.

Residuals are kept in the units of the gradients that made them: loss-scaled under fp16. When
the loss scale changes between two reductions of a bucket the stored residual is rescaled by
current / stored scale (comm's residual_factor, for quantized and top-k feedback alike), so an
error made at scale 2**16 is not fed back 2x too large once the scale is 2**15. A step the
engine skips (fp16 overflow) resets everything: see `reset`.

One rank sends nothing, so nothing is compressed there (the plan is kept, the state is empty).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from zero_ext import comm
from zero_ext.config import CompressionPlan
from zero_ext.zero.partition import BucketLayout

__all__ = ["GradientCompression", "warmup_density"]


def warmup_density(target: float, step: int, warmup_steps: int,
                   freeze_variance: bool = False) -> float:
    """Top-k density at optimizer step `step`: Deep Gradient Compression's exponential warm-up,
    target ** min(1, step / warmup_steps): dense (1) at step 0, each step the same factor
    sparser, `target` from `warmup_steps` on. Early gradients are large and change direction
    quickly; sending them whole lets the residuals start from a trained-in state. With
    `freeze_variance`, dense (1) for the first `warmup_steps` steps and `target` after them:
    Adam's second moment is taken from dense steps only, then frozen (1-bit Adam)."""
    if warmup_steps <= 0:
        return target
    if freeze_variance:
        return 1.0 if step < warmup_steps else target
    return target ** min(1.0, step / warmup_steps)


class GradientCompression:
    """The gradient reduction of every bucket under the plan, and stage 3's weight gather.

    State per bucket index (`feedback`): a comm.QuantFeedback (int8/int4 with error feedback)
    or comm.TopkFeedback (topk), and the loss scale its residuals were stored at
    (`residual_loss_scale`). The engine calls `begin_backward` before each backward (the
    optimizer step for the density, the loss scale of the gradients about to be reduced) and
    `reset` when it skips a step."""

    def __init__(self, plan: CompressionPlan, layouts: list[BucketLayout], *, stage: int,
                 device: torch.device):
        self.plan = plan
        self.stage = stage
        self.world_size = comm.world_size()
        # Only the wire is compressed: on one rank the reduction is a copy.
        self.gradients = plan.gradients if self.world_size > 1 else "none"
        self.weights = plan.weights if self.world_size > 1 else "none"
        self.feedback: dict[int, comm.QuantFeedback | comm.TopkFeedback] = {}
        self.residual_loss_scale: dict[int, float] = {}
        self.density = warmup_density(plan.density, 0, plan.warmup_steps, plan.freeze_variance)
        self._loss_scale = 1.0
        # Whether this engine has frozen Adam's variance (or, resumed, found it frozen) and
        # started the momentum: once per run, and again after a checkpoint is loaded.
        self.variance_settled = False
        if self.gradients in ("int8", "int4") and plan.two_hop:
            comm.two_hop_groups(comm.current_topology())  # made now, not mid-backward
        if self.gradients in ("int8", "int4") and plan.error_feedback:
            topology = comm.current_topology()
            for layout in layouts:
                self.feedback[layout.index] = comm.QuantFeedback.for_reduce_scatter(
                    layout.padded_numel, self.world_size, topology, device)
        elif self.gradients == "topk":
            for layout in layouts:
                self.feedback[layout.index] = comm.TopkFeedback(
                    layout.padded_numel, self.world_size, momentum=plan.momentum,
                    all_reduce=stage == 0, device=device)

    @property
    def compresses_gradients(self) -> bool:
        return self.gradients != "none"

    @property
    def compresses_momentum(self) -> bool:
        return self.gradients == "topk" and self.plan.compress_momentum

    def gradient_scale(self, bucket: int) -> float:
        """The factor on what bucket `bucket` hands to its reduction besides 1 / world size:
        1 - beta1 once the momentum is compressed (the residual accumulates the momentum's
        (1 - beta1) g term), else 1."""
        feedback = self.feedback.get(bucket)
        return 1.0 - feedback.carry if isinstance(feedback, comm.TopkFeedback) else 1.0

    def start_momentum(self, beta1: dict[int, float],
                       first_moment: dict[int, torch.Tensor] | None = None) -> None:
        """compress_momentum from here on (the first sparse step; on resume, the step after
        the checkpoint): `beta1` per bucket index (its parameter group's). `first_moment`,
        at the freeze only: this rank's first moment per bucket as the optimizer holds it
        (its chunk at stages 1-2, the whole bucket at stage 0, replicated), of which beta1
        enters the owner's state once, so the momentum goes on from the dense warm-up's
        instead of from zero (after a resume the residuals already hold it)."""
        if not self.compresses_momentum:
            return
        for bucket, feedback in self.feedback.items():
            feedback.carry = float(beta1[bucket])
            moment = None if first_moment is None else first_moment.get(bucket)
            if moment is None:
                continue
            moment = moment.to(feedback.residual.device, torch.float32).view(-1)
            if feedback.owner_residual is not None:  # stage 0: the owner's chunk of the whole
                moment = moment.view(self.world_size, -1)[comm.rank()]
                target = feedback.owner_residual
            else:
                target = feedback.residual.view(self.world_size, -1)[comm.rank()]
            # residuals are in the units of the gradients, loss-scaled under fp16
            target.add_(moment, alpha=feedback.carry * self._loss_scale)

    def end_step(self) -> None:
        """After an optimizer step's reductions (compress_momentum): beta1 of what each rank
        delivered returns to its residuals (comm.TopkFeedback.carry_momentum)."""
        for feedback in self.feedback.values():
            if isinstance(feedback, comm.TopkFeedback):
                feedback.carry_momentum()

    # -- the step's context --------------------------------------------------------------------
    def begin_backward(self, step: int, loss_scale: float) -> None:
        """Before a backward: `step` is the engine's optimizer step count (global_steps, which
        checkpoints restore, so a resumed warm-up goes on where it was), `loss_scale` the scale
        of the gradients this backward produces (1 without fp16)."""
        self.density = warmup_density(self.plan.density, step, self.plan.warmup_steps,
                                      self.plan.freeze_variance)
        self._loss_scale = float(loss_scale)

    def freezes_variance_at(self, step: int) -> bool:
        """Whether Adam's second moment is to be frozen before optimizer step `step`'s
        reductions: freeze_variance, at the first step after the dense warm-up that this
        engine runs (the frozen state lives in the optimizer's param groups and checkpoints;
        the engine sets `variance_settled` once it has frozen or found it frozen)."""
        return self.gradients == "topk" and self.plan.freeze_variance and \
            step >= self.plan.warmup_steps and not self.variance_settled

    def reset(self) -> None:
        """The engine skipped the step (fp16 overflow): every residual is zeroed. The residuals
        now hold part of the discarded gradients (the error of what this step sent, and for
        top-k the unsent rest), and the previous residuals went out inside the sends that were
        discarded, so nothing in them belongs to a gradient the optimizer will see; a residual
        of a non-finite chunk would also stay inf/nan for good. Collective in effect: the skip
        is decided on every rank alike, so every rank resets."""
        for feedback in self.feedback.values():
            feedback.reset()
        self.residual_loss_scale.clear()

    def _residual_factor(self, bucket: int) -> float:
        """current / stored loss scale of this bucket's residuals; they are stored at the
        current scale from now on."""
        stored = self.residual_loss_scale.get(bucket)
        self.residual_loss_scale[bucket] = self._loss_scale
        return 1.0 if stored is None else self._loss_scale / stored

    # -- the reduction -------------------------------------------------------------------------
    def reduce(self, flat: torch.Tensor, out: torch.Tensor | None, bucket: int):
        """Starts bucket `bucket`'s compressed reduction of `flat` (this rank's gradients,
        pre-divided by the world size): the sum's chunk of this rank into `out`, or the whole
        sum into `flat` in place when `out` is None (stage 0). Returns the async handle; what
        is left (dequantizing, scattering the received entries) runs in its wait()."""
        feedback = self.feedback.get(bucket)
        factor = self._residual_factor(bucket) if feedback is not None else 1.0
        if self.gradients in ("int8", "int4"):  # stages 1-3 (the config refuses stage 0)
            return comm.quantized_reduce_scatter(
                out, flat, bits=self.plan.grad_bits, block_size=self.plan.grad_block,
                feedback=feedback, residual_factor=factor, two_hop=self.plan.two_hop,
                async_op=True, bucket=bucket)
        if out is None:
            return comm.sparse_all_reduce(flat, state=feedback, density=self.density,
                                          residual_factor=factor, async_op=True, bucket=bucket)
        return comm.sparse_reduce_scatter(out, flat, state=feedback, density=self.density,
                                          residual_factor=factor, async_op=True, bucket=bucket)

    # -- stage 3's weights -----------------------------------------------------------------------
    def weight_gather(self, hierarchical: bool) -> Callable | None:
        """The all-gather over every rank for stage 3's weights used in forward and backward
        (qwZ): comm.quantized_all_gather, int8 blocks of plan.weight_block, in two hops when
        `hierarchical` (both carry the packed rows: the values are the flat gather's and the
        bytes within the node halve too). None when weights are not compressed.

        The values any rank computes with are the dequantized ones, its own shard's included,
        so every rank holds the same weights. Gathers whose values are read back or written
        (GatheredParameters, full_state_dict, checkpoints) stay exact (PartitionedParameters),
        and so do hpZ's secondary gathers: the secondary shards are copied from the forward's
        gathered (already dequantized) buffer, so backward computes with exactly the weights
        the forward used, over the fast link inside the node, where quantizing again would
        add a second rounding for little traffic."""
        if self.weights == "none":
            return None
        return functools.partial(comm.quantized_all_gather, bits=8,
                                 block_size=self.plan.weight_block, hierarchical=hierarchical)

    # -- checkpoint state ----------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every residual of this rank by "<bucket>.<name>" (the feedback objects' own, live
        tensors), and per bucket "<bucket>.loss_scale" (a new fp64 CPU tensor of 1 element:
        the loss scale its residuals are stored at, 0 before the first reduction or after a
        reset), so the keys depend only on the buckets and the method. Resharding goes
        through each feedback object's flat_total()."""
        out = {}
        for bucket, feedback in self.feedback.items():
            for name, tensor in feedback.tensors().items():
                out[f"{bucket}.{name}"] = tensor
            out[f"{bucket}.loss_scale"] = torch.tensor(
                [self.residual_loss_scale.get(bucket, 0.0)], dtype=torch.float64)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of tensors() (the same buckets and world size)."""
        per_bucket: dict[int, dict[str, torch.Tensor]] = {b: {} for b in self.feedback}
        self.residual_loss_scale.clear()
        for key, tensor in tensors.items():
            bucket, name = key.split(".", 1)
            if int(bucket) not in per_bucket:
                raise ValueError(f"zero_ext: compression state for bucket {bucket}, which "
                                 "this engine's compression does not have (another model, "
                                 "bucket size or compression method)")
            if name == "loss_scale":
                if tensor.item() > 0:
                    self.residual_loss_scale[int(bucket)] = float(tensor.item())
            else:
                per_bucket[int(bucket)][name] = tensor
        for bucket, state in per_bucket.items():
            self.feedback[bucket].load_tensors(state)
