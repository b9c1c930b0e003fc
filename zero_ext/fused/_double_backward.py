"""Double backward (``create_graph=True``) for the fused ops whose backward kernels have no
autograd of their own: under a graph, their backward runs eager formulas instead, which autograd
can differentiate again (a Hessian-vector product, a gradient penalty). Without a graph, the
kernels run as always; this path costs the memory and passes of eager PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def upcast(t: Tensor | None) -> Tensor | None:
    """fp32 for bf16 / fp16 (the fused ops' math dtype), the tensor itself otherwise."""
    if t is not None and t.dtype in (torch.bfloat16, torch.float16):
        return t.float()
    return t


def _differentiable(t) -> bool:
    return isinstance(t, Tensor) and t.requires_grad


def eager_vjp(formula: Callable[..., Tensor], inputs: tuple, grad_output: Tensor) -> tuple:
    """The gradients of ``formula(*inputs)`` for ``grad_output`` with respect to each of
    ``inputs`` (None for those that are not tensors requiring grad), differentiable again.

    torch.func.vjp, not a nested torch.autograd.grad: an input that is an output of the op being
    differentiated (the norms' summed stream) would lead that backward into the op again."""
    wanted = [i for i, t in enumerate(inputs) if _differentiable(t)]
    if not wanted:
        return (None,) * len(inputs)

    def of_wanted(*tensors):
        full = list(inputs)
        for i, t in zip(wanted, tensors):
            full[i] = t
        return formula(*full)

    _, vjp = torch.func.vjp(of_wanted, *(inputs[i] for i in wanted))
    got = dict(zip(wanted, vjp(grad_output)))
    return tuple(got.get(i) for i in range(len(inputs)))
