"""PEFT (LoRA) under ZeroTrainer: adapters trained exactly as without zero_ext, saved the PEFT
way (save_model and every checkpoint), loadable with PeftModel.from_pretrained.

Two launches (tests/peft_script.py): one torchrun of 2 CPU ranks runs every case (stages 1,
2, 3 with the adapters whole and partitioned, a frozen bf16 base, QLoRA when bitsandbytes is
installed), then one process trains the plain Trainer references. The references' adapter
files are PEFT's own save_pretrained output: file set, keys and values must match.
"""

import functools
import json
import os
import sys

import pytest
import torch

pytest.importorskip("peft", reason="the PEFT integration needs peft")
from peft import PeftModel
from safetensors.torch import load_file

from launch import launch, torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "peft_script.py")
sys.path.insert(0, HERE)
import peft_script

ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}
FP32_CASES = ["zero1", "zero2", "zero3_whole", "zero3_partitioned"]
REFERENCE = {**dict.fromkeys(FP32_CASES, "plain"), "zero3_bf16_base": "plain_bf16_base",
             "zero3_qlora": "plain_qlora"}


@functools.cache
def _out() -> str:
    import tempfile
    out = tempfile.mkdtemp(prefix="zero_ext_peft_")
    os.environ["HF_HUB_OFFLINE"] = "1"  # bitsandbytes would look for hub kernels otherwise
    torchrun([SCRIPT, "distributed", out], timeout=420)
    launch([sys.executable, SCRIPT, "single", out], timeout=240)
    return out


def _result(name):
    with open(os.path.join(_out(), f"{name}.json")) as f:
        return json.load(f)


def _adapters(*path):
    return load_file(os.path.join(_out(), *path, "adapter_model.safetensors"))


@pytest.mark.parametrize("case", list(peft_script.CASES))
def test_losses_match_the_plain_peft_run(case):
    torch.testing.assert_close(_result(case)["losses"], _result(REFERENCE[case])["losses"],
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", list(peft_script.CASES))
@pytest.mark.parametrize("where", ["final", "checkpoint"])
def test_saved_adapters_are_peft_files_with_the_plain_runs_values(case, where):
    # save_model and the Trainer's checkpoint (save_steps) both write PEFT's files, and no
    # full weights; the checkpoint also holds the engine's shards for resuming.
    reference = REFERENCE[case]
    if where == "final":
        ours, theirs = (case,), (reference,)
    else:
        step = f"checkpoint-{peft_script.SAVE_AT}"
        ours, theirs = (f"run_{case}", step), (f"run_{reference}", step)
    files = set(os.listdir(os.path.join(_out(), *ours)))
    assert ADAPTER_FILES <= files, files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), files
    mine, plain = _adapters(*ours), _adapters(*theirs)
    assert sorted(mine) == sorted(plain)
    assert all(not k.startswith("base_model.model.base_model") and ".default." not in k
               for k in mine)
    assert any(plain[k].abs().max() > 1e-3 for k in plain if "lora_B" in k)  # trained
    # QLoRA's base computes in bf16 from 4-bit weights: the two ranks' sums in another order
    # moved one of 256 adapter elements by 1.4e-6 (|max| 0.03) with transformers 5.25 and
    # bitsandbytes 0.50.2, against the fp32 cases' 1e-6.
    atol = 3e-6 if case == "zero3_qlora" else 1e-6
    for key in plain:
        assert mine[key].dtype == plain[key].dtype, key
        torch.testing.assert_close(mine[key], plain[key], rtol=1e-5, atol=atol)
    assert _adapter_config(*ours) == _adapter_config(*theirs)
    if where == "checkpoint":
        # The engine's checkpoint leaves the frozen base out, as the Trainer's DeepSpeed path
        # does for PEFT models (exclude_frozen_parameters): else every save holds the base.
        with open(os.path.join(_out(), *ours, "latest")) as f:
            tag = f.read().strip()
        with open(os.path.join(_out(), *ours, tag, "metadata.json")) as f:
            excluded = json.load(f)["excluded_frozen"]
        assert any("base_layer" in name or "embed_tokens" in name for name in excluded), excluded


def _adapter_config(*path):
    with open(os.path.join(_out(), *path, "adapter_config.json")) as f:
        config = json.load(f)
    # PEFT writes this set in the process's hash order.
    config["target_modules"] = sorted(config["target_modules"])
    return config


@pytest.mark.parametrize("case", FP32_CASES)
def test_from_pretrained_loads_the_trained_adapters(case):
    train = peft_script.data()
    base = peft_script.tiny_llama(len(train.vocab), seed=0)
    model = PeftModel.from_pretrained(base, os.path.join(_out(), case))
    saved = _adapters(case)
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items()
              if "lora_" in k}
    assert sorted(loaded) == sorted(saved)
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    reference = PeftModel.from_pretrained(peft_script.tiny_llama(len(train.vocab), seed=0),
                                          os.path.join(_out(), "plain"))
    ids = train[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits,
                                   reference(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["zero1", "zero2", "zero3_whole"])
def test_peft_save_pretrained_on_one_rank_works_where_adapters_are_whole(case):
    assert _result(case)["own"] == "saved"
    mine, gathered = _adapters(f"{case}_own"), _adapters(case)
    assert sorted(mine) == sorted(gathered)
    for key in gathered:
        torch.testing.assert_close(mine[key], gathered[key], rtol=0, atol=0)


@pytest.mark.parametrize("case", [c for c in peft_script.CASES if peft_script.CASES[c][1] == 0])
def test_peft_save_pretrained_on_one_rank_names_save_adapters_when_partitioned(case):
    message = _result(case)["own"]
    assert message.startswith("zero_ext: PeftModel.save_pretrained"), message
    assert "save_adapters(engine" in message and "ZeroTrainer.save_model" in message
    assert "partitioned" in message
    # Every tensor PEFT saves is partitioned here (threshold 0), each counted once
    assert f": {len(_adapters(case))} of the tensors it saves" in message, message
    assert not os.path.exists(os.path.join(_out(), f"{case}_own", "adapter_model.safetensors"))


@pytest.mark.parametrize("case", list(peft_script.CASES))
def test_the_flop_estimate_counts_every_base_weight(case):
    """The TFLOP/s figure counts the frozen base at full size: partitioned ones by their
    layout, and QLoRA's 4-bit weights unpacked (two per byte), as PEFT counts them."""
    result = _result(case)
    assert result["counted"] == result["peft_total"]
