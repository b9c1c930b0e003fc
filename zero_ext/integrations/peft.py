"""zero_ext.integrations.peft: PEFT (LoRA and the other tuners) models on a zero_ext engine,
saved the PEFT way.

    model = get_peft_model(base, LoraConfig(...))
    engine, *_ = zero_ext.initialize(model=model, config=ds_config)
    ...train...
    save_adapters(engine, "out", should_save=engine.rank == 0)     # collective
    PeftModel.from_pretrained(base, "out")                         # the trained adapters

`ZeroTrainer.save_model` (and so every Trainer checkpoint, which saves through it) calls
`save_adapters` first and writes no full weights when it returns True.

The trainable parameters are gathered, exactly, with any frozen one stage 3 partitions that
PEFT saves beside them (an embedding's base weight when the embeddings are saved), then
PEFT's own `PeftModel.save_pretrained` writes them on the saving rank: the same files
(adapter_config.json, adapter_model.safetensors, README.md) and keys as a run without
zero_ext.

PEFT's `model.save_pretrained(dir)` called directly (usually on rank 0 alone) reads the
parameters as this rank holds them; once stage 3 has partitioned an adapter they are empty
here, so that call is refused with an error naming save_adapters (`guard_save_pretrained`,
installed by zero_ext.initialize). Where every adapter is whole (stages 0-2, or stage 3 with
the adapters under stage3_param_persistence_threshold) it works unchanged.

Never imports peft itself: a PEFT model exists only if peft was imported already.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
import weakref

import torch

__all__ = ["gather_dora_lora_weights", "guard_save_pretrained", "is_peft_model",
           "save_adapters"]


def is_peft_model(model) -> bool:
    """Whether `model` is a PEFT model; never imports peft (a PeftModel exists only if it was
    imported already)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def save_adapters(engine, output_dir, *, should_save: bool, **save_pretrained_kwargs) -> bool:
    """Collective for PEFT models (every rank calls it, the same way): gathers the trainable
    parameters exactly, and the rank with `should_save` writes them with PEFT's
    `save_pretrained(output_dir, **save_pretrained_kwargs)` (adapter_config.json +
    adapter_model.safetensors, loadable with `PeftModel.from_pretrained`). Returns True.

    For any other model it returns False at once, with no collective: the decision depends on
    the model's type alone, the same on every rank."""
    model = engine.module
    if not is_peft_model(model):
        return False
    from zero_ext.zero.gathered import GatheredParameters

    if "state_dict" in save_pretrained_kwargs:
        raise ValueError("zero_ext.integrations.peft.save_adapters: the state dict is gathered "
                         "from the engine; drop state_dict=")
    engine._settle_step()  # a deferred offloaded step may still be writing the weights
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # The same on every rank (it depends on the model and the arguments alone).
    saved_partitioned = _partitioned_peft_saves(engine, save_pretrained_kwargs)
    with GatheredParameters([p for _, p in trainable] + list(saved_partitioned.values())):
        if should_save:
            # PEFT picks the adapter entries out of the whole state dict (its key naming, extra
            # saved buffers, embedding layers): the other frozen entries go by reference
            # (unread), the gathered ones as CPU copies (apart from the engine's flat buffers,
            # which safetensors would see as shared memory). The other ranks wait at the
            # gather's end.
            names = {name for name, _ in trainable} | set(saved_partitioned)
            state = {key: value.detach().to("cpu", copy=True) if key in names else value
                     for key, value in _state_dict_unread_partitioned(model).items()}
            model.save_pretrained(output_dir, state_dict=state, **save_pretrained_kwargs)
    return True


def _partitioned_peft_saves(engine, kwargs: dict) -> dict:
    """{state_dict key: parameter} of the parameters stage 3 holds partitioned that PEFT's
    save_pretrained(**kwargs) would write: PEFT's own selection, run on placeholders of their
    shapes (no values read)."""
    from peft.utils import get_peft_model_state_dict

    from zero_ext.checkpoint.engine_state import _bucket_shapes
    from zero_ext.zero.gathered import _is_partitioned

    model = engine.module
    shapes = _bucket_shapes(engine)
    probe, partitioned = {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        if "_zero_ext_engine" in value.__dict__ and _is_partitioned(value):
            placeholder = torch.empty(shapes[id(value)], dtype=value.dtype, device="meta")
            partitioned[id(placeholder)] = (key, value)
            probe[key] = placeholder
        else:
            probe[key] = value.detach()
    selected = {}
    with _copies_list_keys_only(model):
        for adapter in kwargs.get("selected_adapters") or list(model.peft_config):
            chosen = get_peft_model_state_dict(
                model, state_dict=probe, adapter_name=adapter,
                save_embedding_layers=kwargs.get("save_embedding_layers", "auto"))
            for value in chosen.values():
                if id(value) in partitioned:
                    key, param = partitioned[id(value)]
                    selected[key] = param
    return dict(sorted(selected.items()))


@contextlib.contextmanager
def _copies_list_keys_only(model: torch.nn.Module):
    """PEFT lists a modules_to_save copy's keys from the copy's own state_dict(), which reads
    its values (a partitioned copy's raise) though the values come from the state dict PEFT
    was given: inside, those calls list keys only (keep_vars), reading nothing."""
    copies = [copy for module in model.modules() if hasattr(module, "modules_to_save")
              and isinstance(module.modules_to_save, torch.nn.ModuleDict)
              for copy in module.modules_to_save.values()]
    for copy in copies:
        copy.state_dict = functools.partial(torch.nn.Module.state_dict, copy, keep_vars=True)
    try:
        yield
    finally:
        for copy in copies:
            del copy.state_dict


def guard_save_pretrained(engine) -> None:
    """Makes PEFT's `engine.module.save_pretrained(dir)` refuse, with an error naming
    save_adapters, when the engine holds some adapter partitioned (stage 3) and no state_dict
    is passed: it would otherwise read this rank's empty placeholders. zero_ext.initialize calls
    it; it does nothing for a model that is not a PEFT model."""
    model = engine.module
    if not is_peft_model(model) or "save_pretrained" in model.__dict__:
        return
    original = model.save_pretrained
    engine_ref = weakref.ref(engine)  # the model (which holds this method) outlives it

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        live = engine_ref()
        if kwargs.get("state_dict") is None and live is not None:
            partitioned = list(dict.fromkeys(  # (each tensor once: both name adapters)
                _partitioned_trainable(self) + list(_partitioned_peft_saves(
                    live, {k: v for k, v in kwargs.items() if k != "state_dict"}))))
            if partitioned:
                raise RuntimeError(
                    f"zero_ext: PeftModel.save_pretrained cannot save the adapters of a "
                    f"zero_ext stage-3 engine from one rank: {len(partitioned)} of the "
                    f"tensors it saves (e.g. {partitioned[0]}) are partitioned across the "
                    "ranks. Call "
                    "zero_ext.integrations.peft.save_adapters(engine, save_directory, "
                    "should_save=engine.rank == 0) on every rank (ZeroTrainer.save_model does), "
                    "or keep the adapters whole with a larger "
                    "stage3_param_persistence_threshold")
            # The adapters are whole: PEFT picks them out of the state dict, in which the
            # frozen base weights stage 3 partitions go unread, by reference.
            kwargs["state_dict"] = _state_dict_unread_partitioned(self)
        with _copies_list_keys_only(self):  # e.g. state_dict=engine.full_state_dict()
            return original(save_directory, *args, **kwargs)

    model.save_pretrained = types.MethodType(save_pretrained, model)


def gather_dora_lora_weights(engine) -> None:
    """Stage 3: DoRA's magnitude module (`lora_magnitude_vector[adapter]`) computes its weight
    norm from `lora_A[adapter]` and `lora_B[adapter]` in its own forward, sizing an identity
    from `lora_A.weight.shape` before calling them, which a partitioned parameter reports as
    (0,): their parameters are declared its external parameters (DeepSpeed's mechanism), so
    their units are gathered around its forward and backward. With zero_ext's own units they
    are in the magnitude's block (find_units), and the declarations change nothing; with
    stage3_unit_classes naming the LoRA layers' class they are needed. zero_ext.initialize
    calls it; it does nothing below stage 3 or for a model that is not a PEFT model."""
    if engine.partitioned is None or not is_peft_model(engine.module):
        return
    from zero_ext.zero.params import register_external_parameter

    for module in engine.module.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not isinstance(magnitudes, torch.nn.ModuleDict):
            continue
        for adapter, magnitude in magnitudes.items():
            for lora in (module.lora_A, module.lora_B):
                if adapter in lora:
                    for param in lora[adapter].parameters():
                        register_external_parameter(magnitude, param)


def _state_dict_unread_partitioned(model: torch.nn.Module) -> dict:
    """model.state_dict() without reading stage 3's partitioned parameters (they hold no
    values here: an entry of one is the parameter itself, and reading it raises, naming it)."""
    from zero_ext.zero.gathered import _is_partitioned

    return {key: value if "_zero_ext_engine" in value.__dict__ and _is_partitioned(value)
            else value.detach() for key, value in model.state_dict(keep_vars=True).items()}


def _partitioned_trainable(model: torch.nn.Module) -> list[str]:
    """The trainable parameters a stage-3 engine holds as shards on this rank."""
    from zero_ext.zero.gathered import _is_partitioned

    return [name for name, p in model.named_parameters()
            if p.requires_grad and "_zero_ext_engine" in p.__dict__ and _is_partitioned(p)]
