"""A parameter's fp32 weights, optimizer state and gradient under any ZeRO stage, by DeepSpeed's
names (deepspeed.utils: its "debugging" and tensor-fragment functions), for logging per-layer
gradient norms, editing gradients before the step, or changing a weight or a moment in place.

    from zero_ext.utils import safe_get_full_grad, safe_set_full_fp32_param
    engine.backward(loss)
    norms = {name: safe_get_full_grad(p).norm() for name, p in model.named_parameters()}
    engine.step()

The full functions read or write the whole parameter, shaped as it is, in fp32 on the training
device. A read is a collective at stages 1-3 on several ranks (each rank holds a fragment):
call it on every rank, for the same parameters in the same order. A write is not: every rank
passes the same whole value and keeps its own fragment of it. The local functions read or write
this rank's fragment (flat; possibly empty) of a stage-3 partitioned parameter, no collective.
A parameter no engine trains (requires_grad False, or not given to initialize) gives None, or
its own .grad for the gradient, as in DeepSpeed.

Where this differs from DeepSpeed (docs/deepspeed-compat.md): a gradient is read and written
as the true gradient, the fp16 loss scale divided out (DeepSpeed gives the scaled one); fp32
weights set here reach the model's 16-bit weights at once (in DeepSpeed at the next step); a
gradient is there only after the backward that ends an accumulation window and before step()
(an error otherwise); an unknown optimizer state key is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from zero_ext.zero import fragments

__all__ = [
    "safe_get_full_fp32_param",
    "safe_get_full_grad",
    "safe_get_full_optimizer_state",
    "safe_get_local_fp32_param",
    "safe_get_local_grad",
    "safe_get_local_optimizer_state",
    "safe_set_full_fp32_param",
    "safe_set_full_grad",
    "safe_set_full_optimizer_state",
    "safe_set_local_fp32_param",
    "safe_set_local_grad",
    "safe_set_local_optimizer_state",
    "safe_update_full_grad_vectorized",
]


def _engine(param: torch.nn.Parameter):
    """The engine that trains `param`, or None (frozen, or not under zero_ext)."""
    ref = getattr(param, "_zero_ext_engine", None)
    engine = ref() if ref is not None else None
    if ref is not None and engine is None:
        raise ValueError("zero_ext: this parameter's engine no longer exists")
    if engine is not None and param._zero_ext_layout >= len(engine.layouts):
        return None  # stage 3 partitions it in a frozen bucket: no optimizer state
    return engine


def _read(param: torch.nn.Parameter, what: str, local: bool = False) -> torch.Tensor | None:
    engine = _engine(param)
    if engine is None:  # as DeepSpeed: a parameter it does not manage gives its own .grad
        return param.grad if what == "grad" and not local else None
    return fragments.read(engine, param, what, local)


def _write(param: torch.nn.Parameter, value: torch.Tensor, what: str,
           local: bool = False) -> None:
    engine = _engine(param)
    if engine is not None:
        fragments.write(engine, param, value, what, local)
    elif what == "grad" and not local and param.grad is not None:
        param.grad.copy_(value)


def safe_get_full_fp32_param(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The whole fp32 (master) weights of `param`. Collective at stages 1-3."""
    return _read(param, "fp32")


def safe_set_full_fp32_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Sets the fp32 weights of `param` (and the model's weights) to `value`, whole and the
    same on every rank."""
    _write(param, value, "fp32")


def safe_get_full_optimizer_state(param: torch.nn.Parameter,
                                  optim_state_key: str) -> torch.Tensor | None:
    """The whole `optim_state_key` ("exp_avg" or "exp_avg_sq") of `param`. Collective at
    stages 1-3."""
    return _read(param, optim_state_key)


def safe_set_full_optimizer_state(param: torch.nn.Parameter, value: torch.Tensor,
                                  optim_state_key: str) -> None:
    """Sets the `optim_state_key` of `param` to `value`, whole and the same on every rank."""
    _write(param, value, optim_state_key)


def safe_get_full_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The whole gradient of `param` the next step() will apply (averaged over ranks and
    micro-steps, before clipping; fp32). After the backward that ends an accumulation window,
    before step(). Collective at stages 1-3."""
    return _read(param, "grad")


def safe_set_full_grad(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Sets the gradient the next step() applies to `param` (whole, the same on every rank);
    clipping and the overflow check see it."""
    _write(param, value, "grad")


def safe_update_full_grad_vectorized(
        param_list: Iterable[torch.nn.Parameter],
        update_func: Callable[[torch.Tensor, torch.nn.Parameter], torch.Tensor]) -> None:
    """For each parameter, its gradient becomes update_func(gradient, parameter). Collective
    at stages 1-3 (each gradient is read whole)."""
    for param in param_list:
        grad = safe_get_full_grad(param)
        if grad is not None:
            safe_set_full_grad(param, update_func(grad, param))


def safe_get_local_fp32_param(param: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's fragment of a stage-3 parameter's fp32 weights (flat)."""
    return _read(param, "fp32", local=True)


def safe_set_local_fp32_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Sets this rank's fragment of a stage-3 parameter's fp32 weights (and its shard of the
    model's weights)."""
    _write(param, value, "fp32", local=True)


def safe_get_local_optimizer_state(param: torch.nn.Parameter,
                                   optim_state_key: str) -> torch.Tensor | None:
    """This rank's fragment of a stage-3 parameter's `optim_state_key`."""
    return _read(param, optim_state_key, local=True)


def safe_set_local_optimizer_state(param: torch.nn.Parameter, value: torch.Tensor,
                                   optim_state_key: str) -> None:
    """Sets this rank's fragment of a stage-3 parameter's `optim_state_key`."""
    _write(param, value, optim_state_key, local=True)


def safe_get_local_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's fragment of a stage-3 parameter's reduced gradient (fp32)."""
    return _read(param, "grad", local=True)


def safe_set_local_grad(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Sets this rank's fragment of a stage-3 parameter's reduced gradient."""
    _write(param, value, "grad", local=True)
