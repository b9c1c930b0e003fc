"""zero_ext.integrations.peft: PEFT (LoRA) models on a zero_ext engine, saved the PEFT way."""

from __future__ import annotations

import sys

__all__ = ["is_peft_model", "save_adapters"]


def is_peft_model(model) -> bool:
    """Whether `model` is a PEFT model; never imports peft (a PeftModel exists only if it was
    imported already)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def save_adapters(engine, output_dir, *, should_save: bool) -> bool:
    """Collective for PEFT models: writes only the trainable adapters. False for others."""
    if not is_peft_model(engine.module):
        return False
    raise NotImplementedError("zero_ext: saving PEFT adapters is being built")
