"""TRL's trainers on zero_ext: SFT, DPO, GRPO and reward training at ZeRO stages 1-3 equal to
TRL's own 2-rank DistributedDataParallel run, TRL's fused LM head at stage 3 included.

Two launches (tests/trl_script.py, then an unmodified TRL SFT script through
`torchrun -m zero_ext.run ... --deepspeed ds.json`), read by many small tests.

Tolerances: every run is fp32 on the same data, seeds and global batch; zero_ext sums
gradients in another order than DDP (reduce-scatter of flat buckets, norms summed over shards),
which moves fp32 results by ~1e-7 relative per reduction. Three AdamW steps at lr 1e-2 keep the
weights within ~1e-6 of each other, so 1e-5 leaves a margin while a lost, doubled or zero
gradient (what the fused head gave before) moves them by ~lr.
"""

import functools
import json
import os
import sys

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed")
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from trl_script import TRAINING, ZERO_CONFIG

from launch import torchrun

RUNS = [("sft", 1), ("sft", 2), ("sft", 3), ("dpo", 1), ("dpo", 2), ("dpo", 3), ("dpo_peft", 3),
        ("grpo", 1), ("grpo", 2), ("grpo", 3), ("reward", 3)]


@functools.cache
def _out(tmp_root: str) -> str:
    out = os.path.join(tmp_root, "trl")
    os.makedirs(out, exist_ok=True)
    torchrun([os.path.join(HERE, "trl_script.py"), out], timeout=420)
    # The unmodified script: its own --deepspeed option names a HF-docs ZeRO-3 config.
    config = os.path.join(out, "ds_zero3.json")
    with open(config, "w") as f:
        json.dump({**ZERO_CONFIG, "zero_optimization": {**ZERO_CONFIG["zero_optimization"],
                                                        "stage": 3}}, f)
    cli = [f"--{key}={value}" for key, value in TRAINING.items()]
    torchrun(["-m", "zero_ext.run", os.path.join(HERE, "trl_sft_cli.py"), "--deepspeed", config,
              "--output_dir", os.path.join(out, "cli"), *cli], timeout=240,
             cwd=os.path.dirname(HERE))
    return out


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return _out(str(tmp_path_factory.getbasetemp()))


def _result(out: str, name: str) -> dict:
    with open(os.path.join(out, f"{name}.json")) as f:
        return json.load(f)


def _weights(out: str, name: str) -> dict:
    """A run's saved model, or its adapters when it trained a PEFT adapter."""
    adapters = os.path.join(out, name, "adapter_model.safetensors")
    if os.path.exists(adapters):
        return load_file(adapters)
    return load_file(os.path.join(out, name, "model.safetensors"))


@pytest.mark.parametrize("kind,stage", RUNS)
def test_logged_losses_and_grad_norms_equal_trl_ddp(out, kind, stage):
    zero, ddp = _result(out, f"{kind}_zero{stage}"), _result(out, f"{kind}_ddp")
    assert len(zero["losses"]) == len(ddp["losses"]) == TRAINING["max_steps"]
    # GRPO's losses are near 0 at the first step (advantages average to 0): atol for those.
    torch.testing.assert_close(zero["losses"], ddp["losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zero["grad_norms"], ddp["grad_norms"], rtol=1e-5, atol=0)
    assert min(ddp["grad_norms"]) > 0.01  # something was trained


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sft_evaluation_equals_trl_ddp(out, stage):
    zero, ddp = _result(out, f"sft_zero{stage}"), _result(out, "sft_ddp")
    assert zero["eval_loss"] == pytest.approx(ddp["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("kind,stage", RUNS)
def test_final_weights_equal_trl_ddp(out, kind, stage):
    zero, ddp = _weights(out, f"{kind}_zero{stage}"), _weights(out, f"{kind}_ddp")
    assert zero.keys() == ddp.keys()
    if kind == "dpo_peft":  # LoRA's B matrices start at zero
        moved = max(float(v.abs().max()) for k, v in ddp.items() if "lora_B" in k)
    else:
        initial = _initial_weights(kind)
        moved = max(float((ddp[k] - initial[k]).abs().max()) for k in ddp)
    assert moved > 1e-3  # the reference really trained
    for key in ddp:
        torch.testing.assert_close(zero[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)


@functools.cache
def _initial_weights(kind: str) -> dict:
    from trl_script import char_tokenizer, tiny_llama

    model = tiny_llama(len(char_tokenizer()), classifier=kind == "reward")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fused_lm_head_outside_the_forward_is_gathered_or_refused(out):
    # After stage-3 SFT, lm_head.weight is partitioned (no values outside a forward). Inside
    # TRL's gather context TRL's fused kernel computes with the full final weight; a plain read
    # is refused with an error naming the parameter and the fix.
    guard = _result(out, "guard")
    assert guard["weight_numel_outside"] == 0
    assert "lm_head.weight is used outside any forward" in guard["outside"]
    assert "GatheredParameters" in guard["outside"]
    weight = _weights(out, "sft_zero3")["lm_head.weight"]
    hidden, targets = torch.tensor(guard["hidden"]), torch.tensor(guard["targets"])
    expected = torch.log_softmax(hidden @ weight.t(), dim=-1)[torch.arange(5), targets]
    torch.testing.assert_close(torch.tensor(guard["gathered_log_probs"]), expected,
                               rtol=1e-5, atol=1e-6)


def test_fused_lm_head_costs_the_gathers_of_the_lm_head_module(out):
    # At stage 3 TRL's fused head holds lm_head's unit through the forward and its backward:
    # the same all-gathers and reduce-scatters as the plain Trainer calling lm_head as a module
    # for as many micro-steps (a gather per use instead would add lm_head's size at each one).
    with open(os.path.join(out, "traffic.json")) as f:
        sent = json.load(f)
    fused, module = sent["sft_zero3"], sent["lm_head_module_zero3"]
    assert fused["all_gather"] == module["all_gather"] > 2 * sent["sft_zero2"]["all_gather"]
    assert fused["reduce_scatter"] == module["reduce_scatter"]


def test_unmodified_trl_script_with_deepspeed_option_runs_on_zero_ext(out):
    # The script names a DeepSpeed config and imports nothing of zero_ext (DeepSpeed is not
    # installed); zero_ext.run trains it at stage 3, equal to TRL's DDP run of the same setup.
    with open(os.path.join(out, "cli", "log_history.json")) as f:
        history = [entry for entry in json.load(f) if "loss" in entry]
    assert all("zero_ext/peak_memory_gib" in entry for entry in history)  # the engine's figures
    ddp = _result(out, "sft_ddp")
    torch.testing.assert_close([e["loss"] for e in history], ddp["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close([e["grad_norm"] for e in history], ddp["grad_norms"], rtol=1e-5,
                               atol=0)
    zero, plain = _weights(out, "cli"), _weights(out, "sft_ddp")
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)


def test_adapt_trainer_leaves_other_trainers_alone_without_importing_trl(monkeypatch):
    from zero_ext.integrations import trl as integration

    class PlainTrainer:  # no class of trl in its hierarchy
        engine = None  # adapt_trainer must not even look at it

    monkeypatch.setitem(sys.modules, "trl", None)  # any import of trl would now raise
    integration.adapt_trainer(PlainTrainer())
    assert not integration.is_trl_trainer(PlainTrainer())
