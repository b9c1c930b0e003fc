"""Every rank's replica of the user's model, made ready for the engine to lay out.

- `training_device`: where the engine trains (this process's CUDA device, else the CPU).
- `place_model`: the model's tensors on that device, its parameters in the training dtype
  (buffers as zero/precision.py sets them), after checking that no trainable parameter is in
  a dtype the engine would cast silently; a model built under
  zero_ext.Init (meta parameters) is left where it is, checked to be one stage 3 can
  materialize.
- `check_same_structure` / `broadcast_from_rank0` (collective): every rank holds the same
  parameters (names, shapes, dtypes, requires_grad), or all raise one error naming each rank's
  model before a collective could mismatch and hang; then every rank starts from rank 0's
  values, as DDP does.

ZeroEngine's constructor (engine.py) calls these before zero/placement.py lays the parameters
out. They take the model and settings, not the engine: they run before there is anything of
the engine to hold, and read as the preconditions of training in one place.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from zero_ext import comm
from zero_ext.zero import precision
from zero_ext.zero.params import check_initializers

__all__ = ["broadcast_from_rank0", "check_same_structure", "place_model", "training_device"]


def training_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def place_model(model: nn.Module, device: torch.device, mixed_precision: torch.dtype | None,
                stage: int) -> bool:
    """The model's tensors on `device`, its parameters in `mixed_precision` if any, or, for a
    model built under zero_ext.Init (meta parameters), checked to be materializable. Returns
    whether it was built under Init."""
    built_under_init = any(p.is_meta for p in model.parameters())
    _check_parameter_dtypes(model, mixed_precision)
    if not built_under_init:
        model.to(device=device)
        if mixed_precision is not None:
            precision.cast_parameters(model, mixed_precision)  # buffers: set_buffer_dtypes
        return False
    if stage != 3:
        meta = [n for n, p in model.named_parameters() if p.is_meta]
        raise ValueError(
            f"zero_ext.initialize: the model's parameters are on the meta device (e.g. "
            f"{meta[:3]}): they hold no values. zero_ext gives meta parameters values "
            "only for a model built under zero_ext.Init, at zero_optimization.stage 3 "
            f"(it is {stage}): set stage 3 if that is how it was built; otherwise "
            "build the model with real tensors (not on torch.device('meta') or under "
            "init_empty_weights), or load its weights before initialize")
    check_initializers(model)
    return True


def check_same_structure(named: list[tuple[str, nn.Parameter]]) -> None:
    """Collective. Different parameter lists across ranks would make collectives mismatch and
    hang."""
    signatures = comm.all_gather_object(_structure_signature(named))
    if len(set(signatures)) > 1:
        summaries = comm.all_gather_object(
            f"{len(named)} parameters, {sum(p.numel() for _, p in named)} elements")
        detail = "; ".join(f"rank {r}: {s}" for r, s in enumerate(summaries))
        raise RuntimeError(
            "zero_ext.initialize: the model's parameters (names, shapes, dtypes or "
            f"requires_grad) differ across ranks ({detail}); every rank must build the same "
            "model before initialize")


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module) -> None:
    """Collective. Every rank starts from rank 0's weights and buffers, as DDP does (tensors
    still on the meta device get rank 0's values as they are materialized)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if not tensor.is_meta:
            comm.broadcast(tensor.data, src=0)


def _structure_signature(params: list[tuple[str, nn.Parameter]]) -> int:
    text = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for n, p in params)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def _check_parameter_dtypes(model: nn.Module, mixed_precision: torch.dtype | None) -> None:
    """Without fp16/bf16 the model trains in fp32, in fp32 flat buffers: a trainable parameter
    of another floating dtype would be cast silently and then meet its layer's other tensors
    in a dtype error inside torch. (DeepSpeed leaves such a layer alone; its ZeRO flattening
    then fails.) Under fp16/bf16 the parameters are cast, as DeepSpeed casts them."""
    if mixed_precision is not None:
        return
    wrong = [f"{n} ({p.dtype})" for n, p in model.named_parameters()
             if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32]
    if wrong:
        raise ValueError(
            f"zero_ext.initialize: the model trains in torch.float32 (no fp16/bf16 section), "
            f"but these trainable parameters are not fp32: {wrong[:5]}"
            f"{' ...' if len(wrong) > 5 else ''}. zero_ext keeps one dtype per model; cast it "
            "before initialize (model.float()), or enable bf16 or fp16 in the config to have "
            "the parameters cast to that dtype")
