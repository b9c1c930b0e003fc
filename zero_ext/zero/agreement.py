"""The decisions of an optimizer step that every rank makes together.

Nothing in a step may change weights or optimizer state until all ranks agree that it is the
same step everywhere, with the same gradient norm (which decides the overflow skip and the
clipping factor). `StepAgreement` makes those decisions from values every rank holds after one
collective: a rank that skipped or repeated engine.step(), or called engine.backward() other
than once per micro-step, raises the same named error on every rank before anything changes,
instead of leaving the replicas different or a collective waiting forever.

ZeroEngine (engine.py) owns one; it hands over its counters and the buckets' per-shard norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from zero_ext import comm

__all__ = ["StepAgreement", "backward_count_error", "detached_error", "step_divergence_error"]


class StepAgreement:
    """`on_disagree` runs on every rank before the error is raised (the engine drops the
    window's gradients, so a caught error leaves nothing half-reduced behind)."""

    def __init__(self, *, world_size: int, rank: int, device: torch.device,
                 on_disagree: Callable[[], None]):
        self.world_size, self.rank, self.device = world_size, rank, device
        self.on_disagree = on_disagree

    def agree(self, global_steps: int, backwards: int,
              squares: torch.Tensor | None = None,
              detached: Callable[[], list[str]] = list) -> torch.Tensor | None:
        """One all-reduce of the ranks' agreement, with the norm's `squares` when given
        (returned summed): the sum and the sum of squares of global_steps across ranks (the
        squares' sum is N times the square of the mean only when every rank is at the same
        step), and the count of ranks whose engine.backward() calls since the last step were
        not exactly one, and of ranks where `detached()` names parameters that left zero_ext's
        buffers. Any disagreement raises on every rank, before anything changes."""
        steps = float(global_steps)  # fp64: exact up to 2**26 steps, squares included
        left = detached()
        agreement = torch.tensor([0.0, steps, steps * steps, float(backwards != 1),
                                  float(bool(left))], dtype=torch.float64, device=self.device)
        if squares is not None:
            agreement[0] = squares
        comm.all_reduce(agreement)
        step_sum, step_squares, miscounted, detaching = agreement[1:].tolist()
        diverged = step_squares * self.world_size != step_sum * step_sum
        if miscounted or diverged or detaching:
            self.on_disagree()
            per_rank = comm.all_gather_object((global_steps, backwards, left))
            if diverged:
                raise RuntimeError(step_divergence_error([s[:2] for s in per_rank]))
            if miscounted:
                raise RuntimeError(backward_count_error(
                    {rank: count for rank, (_, count, _) in enumerate(per_rank)}))
            raise RuntimeError(detached_error(
                {rank: names for rank, (_, _, names) in enumerate(per_rank) if names}))
        return agreement[0] if squares is not None else None

    def norm(self, bucket_norms: Iterable[torch.Tensor], global_steps: int, backwards: int,
             *, sharded: bool, detached: Callable[[], list[str]] = list) -> float:
        """L2 norm of the whole averaged gradient from each bucket's (local shard's) norm:
        squares summed across ranks when `sharded` (stage 0's buckets are whole on every rank,
        and agreed on in backward instead). inf/nan anywhere gives inf/nan on every rank, which
        makes the skip decision collective; the same all-reduce carries the agreement."""
        # fp64: a loss-scaled fp16 gradient's squares can pass fp32's range.
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for norm in bucket_norms:
            squares += norm.double() ** 2
        if sharded:
            squares = self.agree(global_steps, backwards, squares, detached)
        elif backwards != 1:
            self.on_disagree()
            raise RuntimeError(backward_count_error({self.rank: backwards}))
        return math.sqrt(squares.item())

    def refuse_unused(self, module: nn.Module, without_gradient: Iterable[nn.Parameter]) -> None:
        """ignore_unused_parameters false (collective): raises on every rank when a trainable
        parameter got no gradient on some rank in this accumulation window."""
        missing = {id(p) for p in without_gradient}
        unused = comm.all_gather_object(
            [n for n, p in module.named_parameters() if id(p) in missing])
        if not any(unused):
            return
        self.on_disagree()
        where = "; ".join(f"rank {rank}: {', '.join(params[:10])}"
                          f"{' ...' if len(params) > 10 else ''}"
                          for rank, params in enumerate(unused) if params)
        raise RuntimeError(
            f"zero_ext: trainable parameters got no gradient in this accumulation window "
            f"({where}), and zero_optimization.ignore_unused_parameters is false. Make every "
            "trainable parameter take part in the loss, set requires_grad=False on the ones "
            "that should not train, or set ignore_unused_parameters true (their gradient then "
            "counts as zero)")


def backward_count_error(backwards: dict[int, int]) -> str:
    """What to say when engine.backward() calls since the last step() were not exactly one on
    some rank (`backwards`: rank -> count, of every rank or of this one)."""
    wrong = ", ".join(f"rank {rank}: {count}" for rank, count in sorted(backwards.items())
                      if count != 1)
    return (
        f"zero_ext: the engine expects exactly one engine.backward() before each "
        f"engine.step() (engine.backward() calls since the last step(): {wrong}). The engine "
        "counts micro-steps in step(): call engine.backward(loss) then engine.step() for every "
        "micro-batch, as with DeepSpeed; step() only steps the optimizer at the accumulation "
        "boundary. To "
        "accumulate over k micro-batches set gradient_accumulation_steps to k (two backwards "
        "before one step would keep only the last gradient, or never step), or, at stages 0-1, "
        "run all but the window's last backward inside engine.no_sync() (those are not counted)")


def step_divergence_error(per_rank: list[tuple[int, int]]) -> str:
    """What to say when ranks reach engine.step() at different optimizer steps (`per_rank`:
    each rank's global_steps and engine.backward() calls since its last step())."""
    where = ", ".join(f"rank {rank}: step {step} after {count} backward()"
                      for rank, (step, count) in enumerate(per_rank))
    return (
        f"zero_ext: the ranks are at different optimizer steps ({where}): a rank skipped "
        "or repeated engine.step() (e.g. a step() inside a rank-dependent branch, or an "
        "exception caught on one rank), so the replicas' weights already differ. Every rank "
        "must call engine.backward(loss) and then engine.step() for every micro-batch; "
        "resume from the last checkpoint")


def detached_error(names_by_rank: dict[int, list[str]]) -> str:
    where = "; ".join(f"rank {rank}: {', '.join(names[:5])}"
                      for rank, names in sorted(names_by_rank.items()))
    return (f"zero_ext: `param.data = tensor` after initialize replaced these parameters' "
            f"tensors ({where}). zero_ext keeps them in flat buffers, which the optimizer "
            "updates (from the fp32 master weights), so they would stop training silently; "
            "the step is refused on every rank and this window's gradients dropped. Write new "
            "values on every rank together with `with zero_ext.GatheredParameters(param, "
            "modifier_rank=0): param.data = tensor` (rank 0's values become every rank's, the "
            "master weights included), or set them before zero_ext.initialize")
