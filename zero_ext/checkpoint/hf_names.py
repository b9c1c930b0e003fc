"""The names transformers' save_pretrained gives a model's weights in a safetensors file."""

from __future__ import annotations

import torch

__all__ = ["keys_save_pretrained_omits"]


def keys_save_pretrained_omits(model, state: dict) -> set[str]:
    """For a transformers model, the keys of `state` its save_pretrained leaves out of a
    safetensors file: `_keys_to_ignore_on_save`, and every name of a tied weight but the one
    from_pretrained reads (it ties the others again). Decided by transformers' own rule, on
    stand-ins that share as the model's tensors do (a released stage-3 parameter has no storage
    of its own to compare). Empty for other models, and where transformers finds the ties
    inconsistent (then every name is written, as before)."""
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return set()
    if not isinstance(model, PreTrainedModel):
        return set()
    shared: dict[int, torch.Tensor] = {}
    stand_ins = {key: shared.setdefault(id(value), torch.empty(1))
                 for key, value in state.items() if isinstance(value, torch.Tensor)}
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        stand_ins.pop(key, None)
    try:
        kept = remove_tied_weights_from_state_dict(stand_ins, model)
    except RuntimeError:
        return set(state) - set(stand_ins)
    return set(state) - set(kept)
