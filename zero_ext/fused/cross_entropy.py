"""Fused linear cross-entropy: the language-model loss from hidden states and the output head,
without the ``[tokens, vocabulary]`` logits.

At 4096 tokens and a 128256-entry vocabulary the logits alone are 2.1 GB in fp32, more than the
rest of a small model's activations; the op computes them a block at a time (csrc/fused_ce_cpu.cpp)
and recomputes them in the backward from the per-token log-sum-exp it saved. Training code calls
:func:`linear_cross_entropy` in place of ``F.cross_entropy(hidden @ weight.T, target)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` plus an optional z-loss,
    computed without materialising the logits.

    ``hidden`` is ``[..., H]`` (fp32, bf16 or fp64), ``weight`` ``[V, H]`` and ``bias`` ``[V]``
    of the same dtype, ``target`` int64 of ``hidden``'s leading shape. Per token ``i`` that is not
    ``ignore_index``, with ``lse_i = logsumexp_j(logit_ij)`` and ``e = label_smoothing``::

        loss_i = lse_i - (1 - e) * logit_i,target_i - e / V * sum_j logit_ij + z_loss * lse_i**2

    which is torch's label-smoothed cross-entropy plus the PaLM z-loss (as Liger-Kernel adds it:
    to each token's loss, so it is reduced like the loss). Ignored tokens have ``loss_i = 0`` and
    receive no gradient under every reduction. ``reduction="mean"`` divides the sum by the number
    of tokens not ignored; with none left that is 0 / 0 = NaN, as torch's ``cross_entropy``
    gives (and, as torch, zero gradients). ``"sum"`` sums; ``"none"`` returns the per-token
    losses in ``target``'s shape. The softmax math runs in fp32 (fp64 for fp64 inputs) and the
    result comes back in ``out_dtype``, by default ``hidden``'s dtype (``torch.float32`` keeps a
    bf16 model's loss in fp32, as transformers' loss functions return it).
    """
    api = "zero_ext.fused.linear_cross_entropy"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{api}: expected reduction 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.dim() < 1 or hidden.shape[:-1] != target.shape:
        raise ValueError(f"{api}: hidden is {tuple(hidden.shape)} and target "
                         f"{tuple(target.shape)}; expected hidden [..., H] with target [...] (one "
                         "class index per hidden row)")
    loss, _ = torch.ops.zero_ext.fused_linear_cross_entropy_fwd(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        target.reshape(-1).contiguous(), None if bias is None else bias.contiguous(),
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)
    if reduction == "none":
        out = loss.view(target.shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / (target != ignore_index).sum()
    return out.to(out_dtype or hidden.dtype)


@torch.library.register_fake("zero_ext::fused_linear_cross_entropy_fwd")
def _fwd_fake(hidden, weight, target, bias, *, ignore_index=-100, label_smoothing=0.0,
              z_loss=0.0):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc)


@torch.library.register_fake("zero_ext::fused_linear_cross_entropy_bwd")
def _bwd_fake(grad_loss, hidden, weight, target, bias, lse, *, ignore_index=-100,
              label_smoothing=0.0, z_loss=0.0):
    v = weight.shape[0] if bias is not None else 0
    return torch.empty_like(hidden), torch.empty_like(weight), hidden.new_empty((v,))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    hidden, weight, target, bias = inputs
    ctx.save_for_backward(hidden, weight, target, bias, output[1])
    ctx.options = keyword_only_inputs


def _backward(ctx, grad_loss, grad_lse):
    # lse is the saved statistic of the backward, not a result: linear_cross_entropy never
    # returns it, so grad_lse is always zero and is not used.
    hidden, weight, target, bias, lse = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = torch.ops.zero_ext.fused_linear_cross_entropy_bwd(
        grad_loss.contiguous(), hidden, weight, target, bias, lse, **ctx.options)
    return grad_hidden, grad_weight, None, grad_bias if bias is not None else None


torch.library.register_autograd("zero_ext::fused_linear_cross_entropy_fwd", _backward,
                                setup_context=_setup_context)
