"""The device and dtype conversions `nn.Module.to` / `.cpu()` / `.half()` / ... apply to each
parameter, read off the Tensor method they call, for the parameters that hold no values of
their own: zero_ext.Init's placeholders (construction.py) and stage-3 parameters whose unit is
released (params.py). Each decides what such a conversion means for it."""

from __future__ import annotations

import torch

__all__ = ["conversion_target", "same_device"]

_DTYPES = {"half": torch.float16, "float": torch.float32, "double": torch.float64,
           "bfloat16": torch.bfloat16}


def conversion_target(func, args, kwargs) -> tuple[torch.device | None, torch.dtype | None] | None:
    """(device, dtype) the Tensor method `func` converts `args[0]` to (None: unchanged), or
    None when `func` is not one of the conversions nn.Module's own methods call."""
    name = getattr(func, "__name__", "")
    if name == "to":
        device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        return device, dtype
    if name == "cpu":
        return torch.device("cpu"), None
    if name == "cuda":
        device = args[1] if len(args) > 1 else kwargs.get("device")
        return torch.device("cuda", torch.cuda.current_device() if device is None else device) \
            if not isinstance(device, torch.device) else device, None
    if name in _DTYPES and len(args) == 1 and not kwargs:
        return None, _DTYPES[name]
    return None


def same_device(target: torch.device | None, device: torch.device) -> bool:
    """Whether converting to `target` leaves a tensor on `device` where it is."""
    if target is None or target.type != device.type:
        return target is None
    if target.index is None and target.type == "cuda":
        return device.index == torch.cuda.current_device()
    return target.index is None or target.index == device.index
