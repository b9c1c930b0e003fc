"""PEFT models (and a frozen tied embedding) on a zero_ext engine driven directly, against
independent references: transformers' own loading of the pretrained files, single-process
torch training, PEFT's own save_pretrained. Cases in tests/peft_engine_cases.py: one group of
2 ranks."""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("peft", reason="the PEFT cases need peft")
import peft_engine_cases
from safetensors import safe_open
from safetensors.torch import load_file

from dist_harness import run_group

_DIR = tempfile.mkdtemp(prefix="zero_ext_peft_engine_")


@functools.cache
def _run() -> dict:
    return run_group(2, peft_engine_cases.peft_engine_cases, _DIR)[0]


def _case(*key) -> dict:
    result = _run()[key]
    assert not isinstance(result, str), result  # the case's traceback
    return result


@pytest.mark.parametrize("stage", peft_engine_cases.STAGES)
@pytest.mark.parametrize("files", ["once", "twice"])
def test_load_weights_takes_a_frozen_tied_embedding_stored_once_or_twice(files, stage):
    """A tied embedding and LM head are one tensor; transformers' files hold it under one
    name, a plain save of the state dict under both. Frozen (as LoRA leaves it), it is read
    once, under the name the files have."""
    from transformers import LlamaForCausalLM

    got = _case("tied", files, stage)
    path = os.path.join(_DIR, f"tied_{files}")
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) == (files == "twice")
    # transformers' own loading of its files (both files hold the same model).
    want = LlamaForCausalLM.from_pretrained(os.path.join(_DIR, "tied_once")).state_dict()
    assert got["unexpected"] == []
    assert sorted(got["state"]) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got["state"][key], value), key


@pytest.mark.parametrize("stage", peft_engine_cases.STAGES)
def test_dora_trains_as_single_process(stage):
    """DoRA's magnitude module reads lora_A's shape and runs lora_A and lora_B in its own
    forward: at stage 3 their units are gathered around it."""
    got, want = _case("dora", stage), _case("dora", "reference")
    # PEFT's parameter counts (print_trainable_parameters) at full size on the engine too:
    # released stage-3 parameters hold no elements, PEFT reads DeepSpeed's ds_numel then.
    before, after = got["counts"]
    assert after == before and before[0] > 0, got["counts"]
    if stage == 3:
        # One unit per decoder layer: the adapters' per-name ModuleDict layers are part of
        # it (each LoRA linear, and its base weight, was a unit of its own).
        layers = [u for u in got["units"] if u.endswith(tuple(f"layers.{i}" for i in range(2)))]
        assert len(layers) == 2 and not [u for u in got["units"] if "lora_" in u or
                                         "base_layer" in u or "proj" in u], got["units"]
        # Each unit gathered once per forward, one all-gather per bucket (DoRA's magnitude,
        # declaring its block's own LoRA matrices external, released and gathered its block
        # again inside its forward), in the recorded order every step.
        assert got["gathers"] == [got["layouts"]] * peft_engine_cases.STEPS, got["gathers"]
        assert not got["warnings"], got["warnings"]
    assert sorted(got["trainable"]) == sorted(want["trainable"])
    assert any("lora_magnitude_vector" in name for name in want["trainable"])
    for name, value in want["trainable"].items():
        assert_close(got["trainable"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage", peft_engine_cases.STAGES)
def test_save_pretrained_of_the_full_state_dict_saves_modules_to_save(stage):
    """model.save_pretrained(dir, state_dict=engine.full_state_dict()) on rank 0 writes what
    PEFT writes for the same training in one process, the partitioned lm_head copy included."""
    _case("modules_to_save", stage)
    _case("modules_to_save", "reference")
    mine = load_file(os.path.join(_DIR, f"modules_to_save_zero{stage}",
                                  "adapter_model.safetensors"))
    theirs = load_file(os.path.join(_DIR, "modules_to_save_reference",
                                    "adapter_model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    assert any("lm_head" in key for key in theirs), sorted(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype, key
        assert_close(mine[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_qlora_base_stored_in_16_bits_is_not_cast():
    """QLoRA for ZeRO-3 stores its 4-bit codes in bf16 elements (bnb_4bit_quant_storage): an
    fp16 engine casting parameters must leave those codes as they are (a cast turned them into
    other codes, silently: another base model), and still cast the model's other weights."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from zero_ext.zero.precision import cast_parameters

    path = os.path.join(_DIR, "qlora_base")
    peft_engine_cases.tiny_llama(tied=False).save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_quant_storage=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization,
                                             device_map="cpu", dtype=torch.bfloat16)
    packed = model.model.layers[0].self_attn.q_proj.weight
    assert type(packed).__name__ == "Params4bit" and packed.dtype == torch.bfloat16
    codes = packed.detach().view(torch.int16).clone()
    cast_parameters(model, torch.float16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(packed.detach().view(torch.int16), codes)
    assert model.model.embed_tokens.weight.dtype == torch.float16
