"""zero_ext's fused kernels under the engine and the HF Trainer: the same training as without.

One launch (tests/fused_engine_cases.py under `torchrun -m zero_ext.run`, 2 CPU ranks) trains
tiny Llamas (head tied and untied) and a GPT-2 at ZeRO stages 0-3 with the config switch on and
off, and ZeroTrainer runs at stage 3 with the kernels off, through use_liger_kernel=True, through
the config switch and through zero_ext.run's plain Trainer; many small tests read its results.

Tolerances: fp32 throughout. The fused ops compute the same sums in another order (the
cross-entropy's online log-sum-exp over vocabulary blocks, fp32 row statistics): the gradients
agree to ~5e-7 of their largest element, losses and grad norms to ~1e-7 relative. With Adam's
eps above that noise (fused_engine_cases.ADAM_EPS) three AdamW steps at lr 1e-2 keep the weights
within ~1.2e-7, so 1e-5 leaves a margin while a lost gradient moves them by ~lr: the head's
weight detached inside the fused loss fails 31 of these tests, the Trainer's num_items_in_batch
ignored fails the three Trainer comparisons.
"""

import functools
import os
import sys

import pytest
import torch
from torch.testing import assert_close

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fused_engine_cases import CASES, STEPS, build

from launch import torchrun

EXPECTED_KINDS = {"llama_tied": ["cross_entropy", "norm", "swiglu"],
                  "llama_untied": ["cross_entropy", "norm", "swiglu"],
                  "gpt2": ["cross_entropy", "gelu", "norm"]}
IDS = [f"{name}-stage{stage}" + (f"-{units}-unit" if units else "") for name, stage, units in CASES]


@functools.cache
def _results(tmp_root: str) -> dict:
    out = os.path.join(tmp_root, "fused_engine")
    os.makedirs(out, exist_ok=True)
    torchrun(["-m", "zero_ext.run", os.path.join(HERE, "fused_engine_cases.py"), out],
             timeout=600, cwd=os.path.dirname(HERE))
    return torch.load(os.path.join(out, "results.pt"), weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _results(str(tmp_path_factory.getbasetemp()))


def _assert_weights_equal(got: dict, expected: dict, initial: dict) -> None:
    assert got.keys() == expected.keys()
    moved = max(float((expected[k].float() - initial[k].float()).abs().max()) for k in expected)
    assert moved > 1e-3  # the reference really trained
    for key, value in expected.items():
        assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


@functools.cache
def _initial(name: str) -> dict:
    return {k: v.detach().clone() for k, v in build(name).state_dict().items()}


def _pair(results: dict, name: str, stage: int, units: str | None) -> tuple[dict, dict]:
    """The case's run with the kernels on, and off."""
    return results["engine"][(name, stage, units, True)], \
        results["engine"][(name, stage, units, False)]


@pytest.mark.parametrize("name,stage,units", CASES, ids=IDS)
def test_engine_trains_the_same_with_the_kernels_on(results, name, stage, units):
    on, off = _pair(results, name, stage, units)
    for rank, (got, expected) in enumerate(zip(on["losses"], off["losses"])):
        assert len(got) == STEPS
        assert_close(got, expected, rtol=1e-5, atol=0, msg=f"rank {rank} losses")
    assert on["losses"][0] != on["losses"][1]  # the ranks' data differ
    assert_close(on["norms"], off["norms"], rtol=1e-5, atol=0, msg="global grad norms")
    assert min(off["norms"]) > 0.01
    _assert_weights_equal(on["weights"], off["weights"], _initial(name))


@pytest.mark.parametrize("name,stage,units", CASES, ids=IDS)
def test_the_fused_kernels_are_what_ran(results, name, stage, units):
    # The training step's autograd graph goes through the fused ops (and only with the switch
    # on); the training forward with labels gives the loss without logits.
    on, off = _pair(results, name, stage, units)
    assert on["kinds"] == EXPECTED_KINDS[name]
    assert off["kinds"] == []
    assert on["logits_none"] and not off["logits_none"]


@pytest.mark.parametrize("name,stage,units", CASES, ids=IDS)
def test_evaluation_keeps_the_logits(results, name, stage, units):
    on, off = _pair(results, name, stage, units)
    assert_close(on["eval_logits"], off["eval_logits"], rtol=1e-5, atol=1e-5)
    assert on["eval_loss"] == pytest.approx(off["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("name,stage,units", CASES, ids=IDS)
def test_the_fused_head_costs_no_extra_communication(results, name, stage, units):
    # Under stage 3 the head's weight (tied or not) is gathered by the head's own module hooks
    # once for its forward and once for its backward, as the unfused head: the same elements
    # all-gathered and reduce-scattered at every stage.
    on, off = _pair(results, name, stage, units)
    assert on["traffic"] == off["traffic"]
    if stage == 3:
        assert on["traffic"]["all_gather"] > 0


@pytest.mark.parametrize("name,units,owner", [
    ("llama_untied", None, "Linear"), ("llama_tied", "embedding", "Embedding"),
    ("gpt2", "embedding", "Embedding")])
def test_stage3_partitions_the_fused_head(results, name, units, owner):
    # Between steps the head's weight holds no values (a released placeholder of the unit
    # named), so the equal training above went through the engine's gathers of it: the head's
    # own unit, or the embedding's when the head is tied to it.
    on = results["engine"][(name, 3, units, True)]
    assert on["head_numel_outside"] == 0
    assert on["head_class"] == "_ReleasedParameter"
    assert on["head_unit"] == owner


@pytest.mark.parametrize("name", ["llama_tied", "gpt2"])
def test_stage3_default_units_keep_a_tied_head_whole(results, name):
    # The engine's rule for a parameter two units share, unchanged by the fused head.
    on = results["engine"][(name, 3, None, True)]
    assert on["head_numel_outside"] > 0 and on["head_unit"] is None


@pytest.mark.parametrize("kind", ["liger", "switch", "run"])
def test_trainer_with_the_kernels_trains_as_without(results, kind):
    on, off = results["trainer"][kind], results["trainer"]["off"]
    assert on["class"] == off["class"] == "ZeroTrainer"
    assert len(on["losses"]) == STEPS
    assert_close(on["losses"], off["losses"], rtol=1e-5, atol=0)
    assert_close(on["grad_norms"], off["grad_norms"], rtol=1e-5, atol=0)
    assert on["eval_loss"] == pytest.approx(off["eval_loss"], rel=1e-5)
    _assert_weights_equal(on["weights"], off["weights"], _initial("llama_untied"))
    assert on["kinds"] == EXPECTED_KINDS["llama_untied"] and on["logits_none"]
    assert off["kinds"] == [] and not off["logits_none"]


# -- use_liger_kernel's config, in this process --------------------------------------------
def _arguments(tmp_path, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **extra)


def test_use_liger_kernel_fills_the_fused_kernels_section(tmp_path):
    from zero_ext.integrations.transformers import fill_config

    plain = fill_config({}, _arguments(tmp_path), world_size=2)
    assert "fused_kernels" not in plain.get("zero_ext", {})
    filled = fill_config({}, _arguments(tmp_path, use_liger_kernel=True), world_size=2)
    assert filled["zero_ext"]["fused_kernels"] == {
        "enabled": True, "cross_entropy": True, "norms": True, "activations": True}
    # Liger's own switches map onto zero_ext's; "rope" has no zero_ext kernel and changes nothing.
    filled = fill_config({}, _arguments(tmp_path, use_liger_kernel=True, liger_kernel_config={
        "fused_linear_cross_entropy": False, "swiglu": False, "geglu": False, "rope": False}),
        world_size=2)
    assert filled["zero_ext"]["fused_kernels"] == {
        "enabled": True, "cross_entropy": False, "norms": True, "activations": False}
    # "auto" and agreeing explicit values are taken.
    filled = fill_config({"zero_ext": {"fused_kernels": {"enabled": "auto", "norms": True}}},
                         _arguments(tmp_path, use_liger_kernel=True), world_size=2)
    assert filled["zero_ext"]["fused_kernels"]["enabled"] is True


@pytest.mark.parametrize("config,liger,message", [
    ({"zero_ext": {"fused_kernels": {"enabled": False}}}, None,
     "zero_ext.fused_kernels.enabled is False in the config, but TrainingArguments"),
    ({}, {"rms_norm": True, "layer_norm": False},
     "liger_kernel_config sets rms_norm and layer_norm differently"),
    ({}, {"cross_entropy": True}, "use fused_linear_cross_entropy=True"),
    ({}, {"fused_rope": True}, "liger_kernel_config has ['fused_rope']"),
])
def test_use_liger_kernel_contradictions_are_refused(tmp_path, config, liger, message):
    from zero_ext.integrations.transformers import fill_config

    args = _arguments(tmp_path, use_liger_kernel=True, liger_kernel_config=liger)
    with pytest.raises(ValueError, match="ZeroTrainer: ") as error:
        fill_config(config, args, world_size=2)
    assert message in str(error.value)


def test_liger_is_replaced_only_for_zero_trainers(tmp_path):
    # A ZeroTrainer's model gets zero_ext's kernels from the engine, not Liger (not installed
    # here); any other model still goes to transformers' Liger integration.
    import transformers.trainer

    from zero_ext.integrations.transformers import ZeroTrainer

    model = build("llama_untied")
    ZeroTrainer(model=model, args=_arguments(tmp_path, use_liger_kernel=True),
                zero_config={"zero_optimization": {"stage": 2}})
    assert transformers.trainer.apply_liger_kernel(model, None) is None
    with pytest.raises(ImportError, match="liger-kernel"):
        transformers.trainer.apply_liger_kernel(build("llama_untied"), None)
