"""zero_ext.optim.AdamW: a torch.optim.Optimizer whose step runs zero_ext's C++ AdamW op.

A drop-in for torch.optim.AdamW on fp32 parameters: the same constructor arguments, the same
per-parameter state ("step", "exp_avg", "exp_avg_sq", in the same dtypes and devices), so LR
schedulers, state_dict / load_state_dict (in either direction between the two) and the
transformers Trainer work unchanged. Python only groups tensors; the math is in C++.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from zero_ext import ops

__all__ = ["AdamW"]


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) or, with ``decoupled_weight_decay=False``, Adam with an
    L2 penalty, for fp32 parameters on CPU or CUDA.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (same defaults).
        amsgrad: not implemented; ``True`` raises.
        maximize: ascend the objective instead of descending it.
        decoupled_weight_decay: AdamW when True; Adam's L2 (``torch.optim.Adam``) when False.
        bias_correction: divide the moments by ``1 - beta**step`` (DeepSpeed's option).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = True,
        bias_correction: bool = True,
    ):
        if amsgrad:
            raise ValueError(
                "zero_ext.optim.AdamW does not implement amsgrad=True; use torch.optim.AdamW "
                "for AMSGrad, or drop the option")
        if isinstance(lr, torch.Tensor):
            raise TypeError("zero_ext.optim.AdamW: lr must be a Python float, not a Tensor")
        if not lr >= 0.0:
            raise ValueError(f"zero_ext.optim.AdamW: invalid lr {lr}: expected lr >= 0")
        if not eps >= 0.0:
            raise ValueError(f"zero_ext.optim.AdamW: invalid eps {eps}: expected eps >= 0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(
                    f"zero_ext.optim.AdamW: invalid betas[{i}] {beta}: expected 0 <= beta < 1")
        if not weight_decay >= 0.0:
            raise ValueError(f"zero_ext.optim.AdamW: invalid weight_decay {weight_decay}: "
                             "expected weight_decay >= 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", True)
            group.setdefault("bias_correction", True)
            group.setdefault("amsgrad", False)

    def _group_tensors(self, group: dict) -> dict[tuple, list[list[torch.Tensor]]]:
        """Params of one group that have grads, as op argument lists keyed by (device, dtype)."""
        lists: dict[tuple, list[list[torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("zero_ext.optim.AdamW does not support sparse gradients")
            if p.dtype != torch.float32:
                raise TypeError(
                    f"zero_ext.optim.AdamW: expected fp32 parameters, got {p.dtype}; keep fp32 "
                    "master weights (autocast for bf16/fp16 compute), or let zero_ext.initialize "
                    "manage mixed precision")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            key = (p.device, p.grad.dtype)
            entry = lists.setdefault(key, [[], [], [], [], []])
            for target, tensor in zip(
                    entry, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                target.append(tensor)
        return lists

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for params, grads, exp_avgs, exp_avg_sqs, steps in self._group_tensors(group).values():
                ops.adamw_step_(
                    params, grads, exp_avgs, exp_avg_sqs, steps,
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    bias_correction=group["bias_correction"], maximize=group["maximize"])
        return loss
