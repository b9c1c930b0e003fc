"""SwiGLU and bias + GeLU on zero_ext's kernels, with autograd that recomputes.

Eager ``F.silu(gate) * up`` saves gate, up and silu(gate) for backward, and ``F.gelu(x + b)``
saves x + b; these ops save only their inputs (which the surrounding linears hold anyway) and
recompute the activation in the backward kernel, one activation-sized tensor less per layer,
and each direction is one pass over memory. Autograd through ``torch.library.register_autograd``
and shapes through ``register_fake``, so ``torch.compile`` traces each call as one node.
Kernels: csrc/activation_cpu.cpp, kernels/cpu/activation.{h,cpp}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import zero_ext  # noqa: F401  (loads zero_ext._C, which defines the ops)
from zero_ext.fused._double_backward import eager_vjp, upcast

__all__ = ["bias_gelu", "swiglu"]


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up`` in fp32 (rounded once), gate and up of one shape and dtype."""
    return torch.ops.zero_ext.swiglu(gate.contiguous(), up.contiguous())


def bias_gelu(x: Tensor, bias: Tensor | None = None, approximate: str = "none") -> Tensor:
    """``F.gelu(x + bias, approximate=approximate)``; bias is [h] over x's last dimension."""
    return torch.ops.zero_ext.bias_gelu(
        x.contiguous(), None if bias is None else bias.contiguous(), approximate)


@torch.library.register_fake("zero_ext::swiglu")
def _swiglu_fake(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake("zero_ext::swiglu_backward")
def _swiglu_backward_fake(grad_out, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("zero_ext::bias_gelu")
def _bias_gelu_fake(x, bias, approximate="none"):
    return x.new_empty(x.shape)


@torch.library.register_fake("zero_ext::bias_gelu_backward")
def _bias_gelu_backward_fake(grad_out, x, bias, approximate="none"):
    return x.new_empty(x.shape)


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        return eager_vjp(lambda g, u: (F.silu(upcast(g)) * upcast(u)).to(g.dtype), (gate, up),
                         grad_out)
    return tuple(torch.ops.zero_ext.swiglu_backward(grad_out.contiguous(), gate, up))


def _bias_gelu_setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        def formula(x, bias):
            summed = upcast(x) if bias is None else upcast(x) + upcast(bias)
            return F.gelu(summed, approximate=ctx.approximate).to(x.dtype)

        return (*eager_vjp(formula, (x, bias), grad_out), None)
    grad_x = torch.ops.zero_ext.bias_gelu_backward(
        grad_out.contiguous(), x, bias, ctx.approximate)
    grad_bias = None
    if ctx.has_bias:
        # The gradient of x + bias summed over rows, as eager's backward of the add sums it
        # (ATen accumulates a bf16 / fp16 sum in fp32).
        grad_bias = grad_x.reshape(-1, x.shape[-1]).sum(0)
    return grad_x, grad_bias, None


torch.library.register_autograd(
    "zero_ext::swiglu", _swiglu_backward, setup_context=_swiglu_setup_context)
torch.library.register_autograd(
    "zero_ext::bias_gelu", _bias_gelu_backward, setup_context=_bias_gelu_setup_context)
