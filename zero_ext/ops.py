"""Typed wrappers of the torch.ops.zero_ext.* operators, with their fake kernels.

Callers (zero_ext.optim, the ZeRO optimizer, CPU offload) use these functions rather than
torch.ops directly. Each op's schema lives in csrc/ops.cpp; the fake kernels here let
torch.compile and torch.library.opcheck trace through the ops without running them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adamw_step_", "flatten_into_", "unflatten_from"]


def adamw_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    params_16bit: Sequence[Tensor] = (),
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool = True,
    bias_correction: bool = True,
    maximize: bool = False,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One AdamW (or, with ``decoupled_weight_decay=False``, Adam-with-L2) step, in place.

    For each i: fp32 ``params[i]``, ``exp_avgs[i]`` and ``exp_avg_sqs[i]`` are updated from
    ``grads[i]`` (fp32, bf16 or fp16, one dtype per call) in a single pass, and the one-element
    fp32 CPU tensor ``state_steps[i]`` is incremented first and used for bias correction, as
    ``torch.optim.AdamW`` does. When ``params_16bit`` is given (one bf16 or fp16 tensor per
    param), it receives the updated weights rounded to 16 bits in the same pass.

    ``inv_scale`` (one-element fp32 on the params' device) multiplies every gradient, undoing a
    loss scale; a nonzero ``found_inf`` makes the call a no-op, steps included.
    """
    if not (params or grads or exp_avgs or exp_avg_sqs or state_steps or params_16bit):
        return  # nothing to update, and no tensor for the dispatcher to pick a backend by
    torch.ops.zero_ext.adamw_step_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(state_steps),
        list(params_16bit), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
        bias_correction=bias_correction, maximize=maximize, inv_scale=inv_scale,
        found_inf=found_inf)


@torch.library.register_fake("zero_ext::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, params_16bit, *, lr,
                     beta1, beta2, eps, weight_decay, decoupled_weight_decay=True,
                     bias_correction=True, maximize=False, inv_scale=None, found_inf=None):
    # Mutates its inputs in place and returns nothing: no outputs to describe.
    return None


def flatten_into_(
    flat: Tensor,
    tensors: Sequence[Tensor],
    offsets: Sequence[int],
    *,
    scale: float = 1.0,
    accumulate: bool = False,
) -> None:
    """Copies every tensor into its range of a flat buffer, in one pass, in place.

    For each i, ``flat[offsets[i] : offsets[i] + tensors[i].numel()]`` becomes
    ``tensors[i].flatten() * scale`` (or, with ``accumulate``, that slice plus it), computed in
    fp32 and rounded to nearest even to ``flat``'s dtype: bit-for-bit
    ``(slice.float() + t.float() * scale).to(flat.dtype)``. ``flat`` is 1-D and contiguous;
    ``tensors`` are contiguous, of any shape, on ``flat``'s device, and may mix fp32, bf16 and
    fp16. The ranges must lie inside ``flat`` and be disjoint; elements of ``flat`` outside them
    are left untouched. With ``scale=1`` no multiplication happens (a same-dtype copy is exact).
    """
    if not (tensors or offsets):
        return  # nothing to copy
    torch.ops.zero_ext.flatten_into_(flat, list(tensors), list(offsets), scale=scale,
                                     accumulate=accumulate)


@torch.library.register_fake("zero_ext::flatten_into_")
def _flatten_into_fake(flat, tensors, offsets, *, scale=1.0, accumulate=False):
    # Mutates flat in place and returns nothing: no outputs to describe.
    return None


def unflatten_from(flat: Tensor, tensors: Sequence[Tensor], offsets: Sequence[int]) -> None:
    """Copies each range of a flat buffer back into its tensor, in one pass, in place.

    For each i, ``tensors[i].view(-1).copy_(flat[offsets[i] : offsets[i] + tensors[i].numel()])``,
    cast (round to nearest even) from ``flat``'s dtype to ``tensors[i]``'s. Dtypes, layout and
    range rules are those of :func:`flatten_into_`; the written tensors must not share memory
    with each other or with ``flat`` (except as the exact view of their own range).
    """
    if not (tensors or offsets):
        return  # nothing to copy
    torch.ops.zero_ext.unflatten_from(flat, list(tensors), list(offsets))


@torch.library.register_fake("zero_ext::unflatten_from")
def _unflatten_from_fake(flat, tensors, offsets):
    # Mutates tensors in place and returns nothing: no outputs to describe.
    return None
