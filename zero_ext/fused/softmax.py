"""Scaled masked softmax + dropout in one op, for attention implementations that don't use SDPA.

Eager attention runs ``softmax(scale * scores + mask)`` then ``dropout`` as four or five passes
over the [batch, heads, q, k] scores and saves, for backward, the softmax output *and* the
dropout mask (a byte per score). This op makes one pass each way and saves the softmax output
only: its dropout keep-mask comes from a counter-based generator (Philox4x32-10, keyed by a seed
and the element's index, kernels/philox.h), so the backward regenerates the mask instead of
reading it. The seed is drawn from torch's generator on each call, so ``torch.manual_seed``
reproduces a run. Autograd through ``torch.library.register_autograd`` and shapes through
``register_fake``, so ``torch.compile`` traces each call as one node. Kernels:
csrc/softmax_{cpu.cpp,cuda.cu}, kernels/cpu/softmax.cpp, kernels/cuda/softmax.cu; formulas:
kernels/softmax_math.h. zero_ext/fused/attention.py calls it from transformers models.
"""

from __future__ import annotations

import torch
from torch import Tensor

import zero_ext  # noqa: F401  (loads zero_ext._C, which defines the ops)
from zero_ext.fused._double_backward import upcast

__all__ = ["dropout_keep_mask", "dropout_seed", "scaled_masked_softmax"]

# Seeds below 2**62: any int64 tensor value works, this keeps them positive.
_SEED_BOUND = 2 ** 62


def scaled_masked_softmax(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float = 1.0,
    causal: bool = False,
    dropout_p: float = 0.0,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``dropout(softmax(scale * x + mask, dim=-1), dropout_p, training)`` with fp32 math.

    ``mask`` is additive (x's dtype; ``-inf`` masks) or bool (True = attend, as SDPA's
    ``attn_mask``), broadcastable to x; a float mask that requires grad gets its gradient.
    ``causal`` masks key j > query i over x's last two dimensions ([..., q, k]) without a mask
    tensor, as SDPA's ``is_causal``. A row whose every key is masked comes out as zeros where
    torch's softmax gives NaN: a fully padded query then contributes nothing instead of poisoning
    the batch. The dropout seed is drawn from ``generator`` (torch's default CPU generator when
    None) when dropout is active. fp32 / bf16 / fp16 (fp64 on CPU) in, fp32 math, rounded once.
    """
    p = float(dropout_p) if training else 0.0
    seed = dropout_seed(generator) if p > 0.0 else torch.zeros(1, dtype=torch.int64)
    out, _ = torch.ops.zero_ext.scaled_masked_softmax(
        x.contiguous(), mask, float(scale), bool(causal), p, seed)
    return out


def dropout_seed(generator: torch.Generator | None = None) -> Tensor:
    """The seed :func:`scaled_masked_softmax` draws from ``generator`` for its dropout: a CPU
    int64 tensor of one element. Drawing it again from a generator in the same state gives the
    same seed, which :func:`dropout_keep_mask` turns into the mask that call used."""
    device = generator.device if generator is not None else "cpu"
    seed = torch.randint(_SEED_BOUND, (1,), generator=generator, device=device, dtype=torch.int64)
    return seed.cpu()


def dropout_keep_mask(x: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """The keep-mask (bool, x's shape) that the dropout of :func:`scaled_masked_softmax` on x
    draws for ``seed``: element i is kept when its Philox word is at least ``dropout_p * 2**32``.
    For tests and references; the op itself never materializes it."""
    return torch.ops.zero_ext.dropout_keep_mask(x.contiguous(), float(dropout_p), seed)


@torch.library.register_fake("zero_ext::scaled_masked_softmax")
def _softmax_fake(x, mask, scale, causal, dropout_p, seed):
    return x.new_empty(x.shape), x.new_empty(x.shape if dropout_p > 0 else (0,))


@torch.library.register_fake("zero_ext::scaled_masked_softmax_backward")
def _softmax_backward_fake(grad_out, probs, scale, dropout_p, seed):
    return probs.new_empty(probs.shape)


@torch.library.register_fake("zero_ext::dropout_keep_mask")
def _keep_mask_fake(x, dropout_p, seed):
    return x.new_empty(x.shape, dtype=torch.bool)


def _setup_context(ctx, inputs, output):
    _x, mask, scale, _causal, dropout_p, seed = inputs
    out, probs = output
    ctx.mark_non_differentiable(probs)
    # probs never receives a gradient: no zero-filled scores-sized tensor for it in backward.
    ctx.set_materialize_grads(False)
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    # Without dropout the output is the softmax itself: nothing else to save.
    ctx.save_for_backward(probs if dropout_p > 0 else out, seed)
    ctx.mask_shape = None
    if mask is not None and mask.dtype != torch.bool and mask.requires_grad:
        ctx.mask_shape = mask.shape


def _backward(ctx, grad_out, _grad_probs):
    if grad_out is None:
        return None, None, None, None, None, None
    probs, seed = ctx.saved_tensors
    grad = grad_out.contiguous()
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        grad_logits = _eager_grad_logits(ctx, grad, probs)
    elif ctx.mask_shape is None:
        grad_x = torch.ops.zero_ext.scaled_masked_softmax_backward(
            grad, probs, ctx.scale, ctx.dropout_p, seed)
        return grad_x, None, None, None, None, None
    else:
        grad_logits = torch.ops.zero_ext.scaled_masked_softmax_backward(
            grad, probs, 1.0, ctx.dropout_p, seed)
    # The logits' gradient is the mask's (summed over its broadcast dimensions); x's is scale
    # times it.
    grad_mask = None if ctx.mask_shape is None else grad_logits.sum_to_size(ctx.mask_shape)
    return grad_logits * ctx.scale, grad_mask, None, None, None, None


def _eager_grad_logits(ctx, grad: Tensor, out: Tensor) -> Tensor:
    """The logits' gradient by eager ops, for a backward under create_graph=True: without
    dropout the saved tensor is the output itself, which carries its graph."""
    if ctx.dropout_p > 0:
        raise RuntimeError(
            "zero_ext.fused.scaled_masked_softmax: double backward (create_graph=True) with "
            "dropout is not supported (the probabilities it drops from are kept without their "
            "graph); use dropout_p=0, or eager softmax and dropout, to differentiate twice")
    p, g = upcast(out), upcast(grad)
    return (p * (g - (g * p).sum(-1, keepdim=True))).to(out.dtype)


torch.library.register_autograd(
    "zero_ext::scaled_masked_softmax", _backward, setup_context=_setup_context)
