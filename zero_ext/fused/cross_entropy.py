"""Fused linear cross-entropy: the language-model loss from hidden states and the output head,
without the ``[tokens, vocabulary]`` logits.

At 4096 tokens and a 128256-entry vocabulary the logits alone are 2.1 GB in fp32, more than the
rest of a small model's activations; the op computes them a chunk of tokens at a time
(csrc/fused_ce.cpp). When gradients are needed and the reduction is a mean or a sum, the forward
computes them too, in the same pass (as Liger-Kernel does): a chunk's logits become its logit
gradients in place, so they are computed once, and the backward only scales the saved gradients
by the incoming one. ``reduction="none"`` gives each token its own upstream gradient, known only
in the backward, which therefore recomputes the logits from the saved per-token log-sum-exp.
Training code calls :func:`linear_cross_entropy` in place of
``F.cross_entropy(hidden @ weight.T, target)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zero_ext.fused._double_backward import eager_vjp, upcast

__all__ = ["linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
_API = "zero_ext.fused.linear_cross_entropy"

# Default workspace_bytes by device type. CPU: 8 MiB keeps the op's extra memory within the hidden
# states of a 4096 x 1024 batch (the bound). CUDA: 256 MiB holds 348 whole rows of a
# 128256-entry bf16 vocabulary (fp32 copy included), so M=8192, H=4096 runs in 24 chunks of one
# logits matmul each under 512 MiB of extra memory.
_DEFAULT_WORKSPACE_BYTES = {"cuda": 256 << 20}
_CPU_WORKSPACE_BYTES = 8 << 20


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
    workspace_bytes: int | None = None,
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

    With a mean or sum under autograd, the gradients are computed in this call and kept until the
    backward (``grad_hidden`` and ``grad_weight`` are allocated here, not in the backward), which
    scales them in place and hands them out. A later backward through the same call
    (``retain_graph=True``) gets new tensors scaled from them, unless the first's were changed in
    place since (accumulated into ``.grad``, clipped): that is an error, as is ``create_graph``
    (differentiating twice needs ``reduction="none"``, whose backward then runs eager ops). ``workspace_bytes`` bounds the logits held at once: 8 MiB on CPU, 256 MiB on CUDA
    by default. A chunk of tokens whose whole logit rows fit it (256 rows at least) costs one
    logits matmul; otherwise each chunk sweeps the vocabulary twice (the logits computed twice).
    On CPU the default holds whole rows up to V = 8192; larger vocabularies gain from a larger
    workspace where memory allows (``256 * V * 4`` bytes: 32 MiB at V = 32000).
    The weight gradient sums over the chunks in fp32, except for a bf16 weight whose fp32
    ``[V, H]`` copy would not fit the workspace: it then sums in bf16, each chunk's product
    computed in fp32 and rounded once.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_API}: expected reduction 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.dim() < 1 or hidden.shape[:-1] != target.shape:
        raise ValueError(f"{_API}: hidden is {tuple(hidden.shape)} and target "
                         f"{tuple(target.shape)}; expected hidden [..., H] with target [...] (one "
                         "class index per hidden row)")
    if workspace_bytes is None:
        workspace_bytes = _DEFAULT_WORKSPACE_BYTES.get(hidden.device.type, _CPU_WORKSPACE_BYTES)
    args = (hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
            target.reshape(-1).contiguous(), None if bias is None else bias.contiguous())
    options = {"ignore_index": ignore_index, "label_smoothing": label_smoothing,
               "z_loss": z_loss}
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad and reduction != "none":
        loss, *_ = torch.ops.zero_ext.fused_linear_cross_entropy_fwd_grad(
            *args, **options, mean=reduction == "mean", hidden_grad=hidden.requires_grad,
            weight_grad=weight.requires_grad, workspace_bytes=workspace_bytes)
        return loss.to(out_dtype or hidden.dtype)
    loss, _ = torch.ops.zero_ext.fused_linear_cross_entropy_fwd(*args, **options)
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
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        grad_hidden, grad_weight, grad_bias = eager_vjp(
            lambda h, w, b: _eager_losses(h, w, b, target, **ctx.options), (hidden, weight, bias),
            grad_loss)
        return grad_hidden, grad_weight, None, grad_bias
    grad_hidden, grad_weight, grad_bias = torch.ops.zero_ext.fused_linear_cross_entropy_bwd(
        grad_loss.contiguous(), hidden, weight, target, bias, lse, **ctx.options)
    return grad_hidden, grad_weight, None, grad_bias if bias is not None else None


def _eager_losses(hidden, weight, bias, target, *, ignore_index, label_smoothing, z_loss):
    """The per-token losses by eager ops through the whole logits (fp32 math, fp64 for fp64),
    for a backward under create_graph=True."""
    logits = upcast(hidden) @ upcast(weight).T
    if bias is not None:
        logits = logits + upcast(bias)
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
    if z_loss:
        losses = losses + z_loss * logits.logsumexp(-1).pow(2) * (target != ignore_index)
    return losses


torch.library.register_autograd("zero_ext::fused_linear_cross_entropy_fwd", _backward,
                                setup_context=_setup_context)


@torch.library.register_fake("zero_ext::fused_linear_cross_entropy_fwd_grad")
def _fwd_grad_fake(hidden, weight, target, bias, *, ignore_index=-100, label_smoothing=0.0,
                   z_loss=0.0, mean=True, hidden_grad=True, weight_grad=True,
                   workspace_bytes=8 << 20):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (hidden.new_empty((), dtype=acc),
            torch.empty_like(hidden) if hidden_grad else hidden.new_empty((0,)),
            torch.empty_like(weight) if weight_grad else hidden.new_empty((0,)),
            hidden.new_empty((weight.shape[0] if bias is not None else 0,)))


def _setup_grad_context(ctx, inputs, keyword_only_inputs, output):
    # The gradient outputs are results, not functions of the inputs to differentiate; and the
    # backward must not receive zeros materialised for them ([N, H] and [V, H] of memory).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])
    ctx.wanted = (keyword_only_inputs.get("hidden_grad", True),
                  keyword_only_inputs.get("weight_grad", True), inputs[3] is not None)
    ctx.applied = None  # the upstream gradient the saved gradients are scaled by (None: 1)


def _backward_from_saved(ctx, grad_loss, *unused):
    # The gradients exist already, for an upstream gradient of 1; scaling them in place, rather
    # than into new tensors, keeps the backward from allocating another [V, H]. A later backward
    # through the same graph (retain_graph=True, as gradcheck does) rescales them by the ratio,
    # which a zero upstream gradient has made impossible.
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{_API}: double backward (create_graph=True) is not supported: the mean/sum path "
            "computes its gradients in the forward; use reduction='none' and reduce it yourself, "
            "or the unfused loss, to differentiate twice")
    if grad_loss is None:  # no gradient reached the loss (materialisation is off)
        return None, None, None, None
    try:
        saved = ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise RuntimeError(
            f"{_API}: a backward through the same call (retain_graph=True) after the gradients "
            "an earlier one produced were changed in place (accumulated into .grad by another "
            "backward, clipped or zeroed): the mean/sum path computes its gradients once, in the "
            "forward; call the loss again for each backward, or use reduction='none'") from error
    hidden, weight, bias = (g if wanted else None for g, wanted in zip(saved, ctx.wanted))
    if torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor:
        # Traced (torch.compile, or any functional tensor subclass): out of place, which the
        # compiler's memory planning handles; an in-place update of a saved tensor is not
        # expressible in a functional graph.
        return (None if hidden is None else hidden * grad_loss,
                None if weight is None else weight * grad_loss, None,
                None if bias is None else bias * grad_loss)
    if ctx.applied is not None:
        # A later backward through the same call (retain_graph=True). The first handed the
        # saved gradients out (as .grad, or as autograd.grad's results), so they are scaled out
        # of place from now on: what it handed out is never changed behind its holder's back,
        # and a change its holder made in place (accumulating into .grad, clipping) trips the
        # saved tensors' version check above.
        if bool(ctx.applied == 0):
            raise RuntimeError(
                f"{_API}: a second backward through the same call (retain_graph=True) after one "
                "whose upstream gradient was 0, which zeroed the saved gradients in place; call "
                "the loss again for each backward")
        factor = grad_loss / ctx.applied
        return tuple(None if g is None else g * factor for g in (hidden, weight, None, bias))
    for g in (hidden, weight, bias):
        if g is not None:
            # .data: the saved gradients are this function's own to rescale, so autograd's
            # version check (which guards inputs saved for a formula) must not trip on it.
            g.data.mul_(grad_loss)
    ctx.applied = grad_loss.detach().clone()
    return hidden, weight, None, bias


torch.library.register_autograd("zero_ext::fused_linear_cross_entropy_fwd_grad",
                                _backward_from_saved, setup_context=_setup_grad_context)
