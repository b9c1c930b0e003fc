"""The model's dtypes at initialize under fp16/bf16, as DeepSpeed (0.19.8) sets them.

- Trainable and frozen floating parameters take the training dtype.
- Buffers keep the dtype they came in (rotary `inv_freq`, BatchNorm's running statistics, MoE
  routing biases stay fp32), unless `data_types.buffer_dtype` names one for all of them.
- The buffers a transformers model lists for fp32 (`_keep_in_fp32_modules_strict`, and also
  `_keep_in_fp32_modules` under fp16), or those `data_types.keep_in_fp32_modules` names by
  pattern, are fp32 whatever `buffer_dtype` says, and are brought back to fp32 if they came
  in 16-bit. Parameters those lists name still train in the training dtype.

Under fp32 training nothing is cast.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

__all__ = ["CASTABLE", "cast_parameters", "keep_in_fp32_pattern", "mixed_batch_norms", "packed",
           "packed_4bit", "place_buffers", "set_buffer_dtypes"]

# What is cast (DeepSpeed's list): fp8 and other dtypes are left as they are
CASTABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@torch.no_grad()
def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter in `dtype`, in place (the same Parameter objects, so tied
    parameters stay tied and the caller's references stay valid), except bitsandbytes'
    quantized weights: their elements are packed codes in a storage dtype (QLoRA's
    bnb_4bit_quant_storage, bf16 for ZeRO-3), which a cast would turn into other codes."""
    for param in model.parameters():
        if param.dtype in CASTABLE and param.dtype != dtype and not packed(param):
            param.data = param.data.to(dtype)


def packed(param: torch.Tensor) -> bool:
    """Whether `param` is a bitsandbytes quantized weight (Params4bit, Int8Params)."""
    return type(param).__module__.startswith("bitsandbytes")


def packed_4bit(param: torch.Tensor) -> bool:
    """Whether `param` is a bitsandbytes 4-bit weight (Params4bit): two codes per byte of its
    storage dtype, its quantization state (absmax, shape) beside the values, whole."""
    return packed(param) and type(param).__name__ == "Params4bit"


def keep_in_fp32_pattern(model: nn.Module, setting: str | list[str],
                         dtype: torch.dtype) -> re.Pattern | None:
    """The buffer names (full, dotted) to keep in fp32 while training in `dtype`, as one
    pattern searched anywhere in a name, or None where there are none. `setting` is
    `data_types.keep_in_fp32_modules`: "auto" for the model's own transformers lists (each
    list's names scoped to the module that declares it), or a list of patterns in which `*`
    stands for any characters."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    if setting != "auto":
        patterns = {name.replace("*", ".*") for name in setting}
    else:
        patterns = set()
        for prefix, module in model.named_modules():
            names = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
            if dtype == torch.float16:
                names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
            scope = rf"^{re.escape(prefix)}\..*" if prefix else ""
            patterns |= {scope + name.replace("*", ".*") for name in names}
    return re.compile("|".join(sorted(patterns))) if patterns else None


@torch.no_grad()
def set_buffer_dtypes(model: nn.Module, buffer_dtype: torch.dtype | None,
                      keep: re.Pattern | None) -> list[str]:
    """Floating buffers matching `keep` in fp32, the other ones in `buffer_dtype` (None: as
    they are), in place (the same tensor objects: a buffer shared by modules is cast once).
    Returns the names kept in fp32."""
    kept = []
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if buffer.dtype not in CASTABLE:
            continue
        if keep is not None and keep.search(name):
            target = torch.float32
            kept.append(name)
        elif buffer_dtype is not None:
            target = buffer_dtype
        else:
            continue
        if buffer.dtype != target:
            buffer.data = buffer.data.to(target)
    return kept


def mixed_batch_norms(model: nn.Module) -> list[str]:
    """The BatchNorm modules whose parameters and running statistics now differ in dtype:
    torch's batch_norm refuses the mix on the CPU ("expected scalar type BFloat16 but found
    Float"), as under DeepSpeed, whose casting this follows."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.weight is not None \
                and module.running_mean is not None \
                and module.weight.dtype != module.running_mean.dtype:
            found.append(name or type(module).__name__)
    return found


def place_buffers(model: nn.Module, config, rank: int) -> None:
    """The buffers' dtypes under the config's fp16/bf16 (nothing under fp32), then a warning
    on rank 0 naming the BatchNorms whose statistics stay fp32 under 16-bit parameters."""
    if config.mixed_precision is None:
        return
    keep = keep_in_fp32_pattern(model, config.data_types.keep_in_fp32_modules,
                                config.mixed_precision)
    set_buffer_dtypes(model, config.buffer_dtype, keep)
    mixed = mixed_batch_norms(model)
    if mixed and rank == 0:
        name = config.training_dtype_name
        warnings.warn(
            f"zero_ext: under {name} the parameters of {mixed[:4]} are cast and their running "
            "statistics kept fp32, as DeepSpeed does; torch's batch_norm refuses that mix on "
            f"the CPU. Set \"data_types\": {{\"buffer_dtype\": \"{name}\"}} to cast buffers "
            "too", stacklevel=4)
