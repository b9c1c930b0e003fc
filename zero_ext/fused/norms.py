"""RMSNorm and LayerNorm, each optionally fused with the residual add, on zero_ext's kernels.

A transformer block's ``h = x + residual; y = norm(h)`` costs eager PyTorch a pass for the add
and two or three for the norm; ``rms_norm(x, w, residual=r)`` reads x and r once and writes h and
y in one pass, with fp32 statistics for bf16 activations, and its backward recomputes the
normalized input from h and two per-row statistics instead of saving it. Autograd is attached
with ``torch.library.register_autograd`` and shapes with ``register_fake``, so ``torch.compile``
traces each call as one node. Kernels and formulas: csrc/norm_cpu.cpp, kernels/cpu/norm.h.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

import zero_ext  # noqa: F401  (loads zero_ext._C, which defines torch.ops.zero_ext.fused_norm)
from zero_ext.fused._double_backward import eager_vjp, upcast

__all__ = ["layer_norm", "rms_norm"]


def rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """``F.rms_norm(x, (h,), weight, eps)`` over the last dimension h, statistics in fp32.

    With ``residual`` (x's shape and dtype) it normalizes ``x + residual`` and returns
    ``(out, x + residual)``, the second being the new residual stream (rounded to x's dtype, as
    eager's add would be); gradients flow through both outputs.
    """
    return _fused_norm(x, residual, weight, None, eps, rms=True)


def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``F.layer_norm(x, (h,), weight, bias, eps)`` over the last dimension h, fp32 statistics.

    ``residual`` as in :func:`rms_norm`: returns ``(out, x + residual)`` when given.
    """
    return _fused_norm(x, residual, weight, bias, eps, rms=False)


def _fused_norm(x, residual, weight, bias, eps, *, rms):
    out, summed, _, _ = torch.ops.zero_ext.fused_norm(
        x.contiguous(), None if residual is None else residual.contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), eps, rms)
    return out if residual is None else (out, summed)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("zero_ext::fused_norm")
def _fused_norm_fake(x, residual, weight, bias, eps, rms):
    rows = math.prod(x.shape[:-1])
    stat = _stat_dtype(x.dtype)
    summed = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return (x.new_empty(x.shape), summed, x.new_empty((0 if rms else rows,), dtype=stat),
            x.new_empty((rows,), dtype=stat))


@torch.library.register_fake("zero_ext::fused_norm_backward")
def _fused_norm_backward_fake(grad_out, grad_summed, input, weight, mean, rstd, rms, has_bias):
    return (input.new_empty(input.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0] if has_bias else 0,)))


def _fused_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms = inputs
    _out, summed, mean, rstd = output
    ctx.rms, ctx.eps = rms, eps
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    # The normalized input is x, or the summed stream the forward wrote anyway: nothing extra.
    ctx.save_for_backward(summed if ctx.has_residual else x, weight, mean, rstd)


def _eager_norm(ctx, input, weight):
    """The norm's output from its (summed) input by eager ops, statistics in fp32, without the
    bias (which it adds; its gradient is grad_out summed over the rows)."""
    x = upcast(input)
    if ctx.rms:
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps) * upcast(weight)
    else:
        out = F.layer_norm(x, x.shape[-1:], upcast(weight), None, ctx.eps)
    return out.to(input.dtype)


def _fused_norm_backward(ctx, grad_out, grad_summed, _grad_mean, _grad_rstd):
    input, weight, mean, rstd = ctx.saved_tensors
    if not ctx.has_residual or grad_summed is None:
        grad_summed = None
    else:
        grad_summed = grad_summed.contiguous()
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        grad_input, grad_weight = eager_vjp(lambda i, w: _eager_norm(ctx, i, w),
                                            (input, weight), grad_out)
        grad_bias = upcast(grad_out).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype) \
            if ctx.has_bias else None
        if grad_summed is not None:
            grad_input = grad_summed if grad_input is None else grad_input + grad_summed
    else:
        grad_input, grad_weight, grad_bias = torch.ops.zero_ext.fused_norm_backward(
            grad_out.contiguous(), grad_summed, input, weight, mean, rstd, ctx.rms,
            ctx.has_bias)
    # x and residual enter the output only through their sum: one gradient serves both.
    return (grad_input, grad_input if ctx.has_residual else None, grad_weight,
            grad_bias if ctx.has_bias else None, None, None)


torch.library.register_autograd(
    "zero_ext::fused_norm", _fused_norm_backward, setup_context=_fused_norm_setup_context)
