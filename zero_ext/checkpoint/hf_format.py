"""A transformers model's weights as its save_pretrained writes them and from_pretrained reads
them: which keys a safetensors file holds (tied weights once), and the checkpoint layout
transformers 5 converts some weights from on load and back to on save (save_16bit_model and
consolidate write through it, load_weights reads through it)."""

from __future__ import annotations

import sys
import warnings

import torch

__all__ = ["checkpoint_layout", "keys_save_pretrained_omits", "load_conversion",
           "to_checkpoint_layout"]


def keys_save_pretrained_omits(model, state: dict) -> set[str]:
    """For a transformers model, the keys of `state` its save_pretrained leaves out of a
    safetensors file: `_keys_to_ignore_on_save`, and every name of a tied weight but the one
    from_pretrained reads (it ties the others again). Decided by transformers' own rule, on
    stand-ins that share as the model's tensors do (a released stage-3 parameter has no storage
    of its own to compare). Empty for other models, and where transformers finds the ties
    inconsistent (then every name is written, as before)."""
    if not _is_transformers_model(model):
        return set()
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
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


# -- the checkpoint layout transformers converts from on load and back to on save ---------------
# transformers 5 holds some weights in another layout than its checkpoints (a mixture of
# experts' per-expert w1/w2/w3 matrices as one stacked gate_up_proj and down_proj per layer):
# from_pretrained converts on load, save_pretrained converts back. zero_ext writes and reads the
# checkpoint layout the same way, with transformers' own conversions, one group of tensors (a
# stage-3 unit) at a time.

def _revert():
    """transformers' revert_weight_conversion (save_pretrained's), or None without it."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    return revert_weight_conversion


def _is_transformers_model(model) -> bool:
    """Without importing transformers (seconds per process): a model of its classes has."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def checkpoint_layout(model, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      groups: list[list[str]]) -> list[dict] | None:
    """The names, dtypes and shapes save_pretrained writes for each group of the model's keys
    (`specs`: key -> dtype and shape), from transformers' conversion run on meta tensors; None
    where it writes the model's own keys (no conversion), or where a conversion takes keys
    from two groups (then the model's own keys are written, as before: from_pretrained reads
    them too, and says so in a warning)."""
    revert = _revert() if _is_transformers_model(model) else None
    if revert is None:
        return None
    meta = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in
            specs.items()}
    try:
        whole = revert(model, dict(meta))
        if {k: tuple(v.shape) for k, v in whole.items()} == \
                {k: shape for k, (_, shape) in specs.items()}:
            return None
        parts = [revert(model, {k: meta[k] for k in group}) for group in groups]
    except Exception as error:  # noqa: BLE001 - a conversion that cannot run here
        warnings.warn(f"zero_ext: transformers' conversion to {type(model).__name__}'s "
                      f"checkpoint layout failed ({type(error).__name__}: {error}); writing its "
                      "own parameter names instead", stacklevel=3)
        return None
    names = [name for part in parts for name in part]
    if sorted(names) != sorted(whole):
        warnings.warn(f"zero_ext: {type(model).__name__}'s checkpoint layout mixes tensors of "
                      "different stage-3 units; writing its own parameter names instead",
                      stacklevel=3)
        return None
    return [{name: (value.dtype, tuple(value.shape)) for name, value in part.items()}
            for part in parts]


def to_checkpoint_layout(model, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One group's tensors (as checkpoint_layout grouped them) in the checkpoint layout."""
    return _revert()(model, values)


class LoadConversion:
    """The model's keys that a checkpoint in transformers' layout holds converted: for each,
    the file tensors it is made of and how (from_pretrained's conversions, run here one group
    at a time). `renamed`: model key -> the file key holding it as it is (renamed only);
    `groups`: converted model key -> the key naming its group (the tensors converted together);
    `specs`: converted model key -> its dtype and shape."""

    def __init__(self, model, file_keys: list[str], file_specs):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange,
            WeightConverter,
            dot_natural_key,
            rename_source_key,
        )

        self.model = model
        transforms = getattr(model, "_weight_conversions", None)
        if transforms is None:
            transforms = [t for t in get_model_conversion_mapping(model)
                          if not isinstance(t, PrefixChange)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        self.renamed: dict[str, str] = {}
        sources: dict[str, list[tuple[str, str]]] = {}
        for key in sorted(file_keys, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters)
            if pattern is None:
                self.renamed[target] = key
            else:
                sources.setdefault(target, []).append((key, pattern))
        self._converter = {target: by_pattern[members[0][1]]
                           for target, members in sources.items()}
        self._sources = sources
        self.groups: dict[str, str] = {}  # model key -> its group's first target
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for target, members in sources.items():
            made = self._convert(target, {k: torch.empty(file_specs(k)[1], device="meta",
                                                         dtype=file_specs(k)[0])
                                          for k, _ in members})
            for name, value in made.items():
                self.groups[name] = target
                self.specs[name] = (value.dtype, tuple(value.shape))
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def _convert(self, target: str, tensors: dict[str, torch.Tensor]) -> dict:
        import copy

        converter = copy.deepcopy(self._converter[target])
        for key, pattern in self._sources[target]:
            converter.add_tensor(target, key, pattern, tensors[key])
        made = converter.convert(target, model=self.model, config=self.model.config)
        return {name: value[0] if isinstance(value, list) else value
                for name, value in made.items()}

    def file_keys(self, name: str) -> list[str]:
        return [key for key, _ in self._sources[self.groups[name]]]

    def converted(self, name: str, read) -> torch.Tensor:
        """Model key `name`'s whole tensor, its group converted from the file tensors `read`
        gives (the last group kept: its other keys are usually read next)."""
        target = self.groups[name]
        if self._cached is None or self._cached[0] != target:
            self._cached = None  # the previous group's memory goes first
            self._cached = (target, self._convert(
                target, {key: read(key) for key, _ in self._sources[target]}))
        return self._cached[1][name]


def load_conversion(model, file_keys: list[str], file_specs) -> LoadConversion | None:
    """The conversion from_pretrained would apply to files of `file_keys` for this model, or
    None where their keys are the model's own (nothing to convert)."""
    if not _is_transformers_model(model):
        return None
    try:
        conversion = LoadConversion(model, file_keys, file_specs)
    except ImportError:
        return None
    if not conversion.groups and all(k == v for k, v in conversion.renamed.items()):
        return None
    return conversion
