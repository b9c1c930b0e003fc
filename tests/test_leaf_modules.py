"""Stage 3's leaf modules (zero/leaves.py): which modules are leaves (zero_optimization.leaf_module
with DeepSpeed's defaults, zero_ext.set_z3_leaf_modules, DeepSpeed's own function) and what
that does to the gather units. Training with them: tests/test_moe_stage3.py."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
from torch import nn

import zero_ext
from zero_ext.config import ConfigError, LeafModuleConfig, ZeroConfig
from zero_ext.zero.leaves import mark_configured_leaves
from zero_ext.zero.params import find_units
from zero_ext.zero.placement import lay_out


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 3)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.mlp = Experts()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(4, 5)


def _names(model: nn.Module, units: list[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(u)] for u in units]


def test_experts_in_a_leaf_are_not_units_of_their_own():
    model = Net()
    # Without leaves each expert (a ModuleList's child inside a block) is a unit: a rank that
    # routes no token to an expert would skip its gather.
    assert "blocks.0.mlp.experts.1" in _names(model, find_units(model))
    marked = zero_ext.set_z3_leaf_modules(model, [Experts])
    assert [m for m in model.modules() if getattr(m, "_z3_leaf", False)] == marked
    assert _names(model, find_units(model)) == ["embed", "blocks.0", "blocks.1", "head"]
    # Named unit classes: none inside a leaf.
    units = _names(model, find_units(model, ["Linear"]))
    assert units == ["head"], units
    zero_ext.set_z3_leaf_modules(model, [Block])
    with pytest.raises(ValueError, match=r"every module of class \['Experts'\] is inside a "
                       "leaf module"):
        find_units(model, ["Block", "Experts"])


def test_set_z3_leaf_modules_takes_names_and_refuses_what_matches_nothing():
    model = Net()
    zero_ext.set_z3_leaf_modules(model, {Net})
    with pytest.raises(ValueError, match="the model itself is marked as a leaf module"):
        find_units(model)
    model = Net()
    assert len(zero_ext.set_z3_leaf_modules(model, [f"{__name__}.Experts"])) == 2
    assert len(zero_ext.set_z3_leaf_modules(model, ["Block"])) == 2
    with pytest.raises(ValueError, match=r"no module of \['MixtralSparseMoeBlock'\].*Experts"):
        zero_ext.set_z3_leaf_modules(model, ["MixtralSparseMoeBlock"])
    assert zero_ext.set_z3_leaf_modules(model, ["Nothing"], raise_if_not_found=False) == []
    with pytest.raises(TypeError, match="list of module classes"):
        zero_ext.set_z3_leaf_modules(model, Experts)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="compares with DeepSpeed's own function and defaults")
def test_deepspeeds_marks_and_defaults_are_read():
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES
    from deepspeed.utils import set_z3_leaf_modules

    assert LeafModuleConfig().classes == DEFAULT_LEAF_MODULE_CLASSES
    model = Net()
    set_z3_leaf_modules(model, [Experts])
    assert _names(model, find_units(model)) == ["embed", "blocks.0", "blocks.1", "head"]


def _leaf_config(section) -> LeafModuleConfig:
    config = ZeroConfig.from_dict({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "leaf_module": section}})
    return config.zero_optimization.leaf_module


def test_leaf_module_section_parses_as_deepspeed_does():
    assert _leaf_config(None) == LeafModuleConfig()
    assert _leaf_config({"classes": "Experts", "names": ["a", "a"]}) == LeafModuleConfig(
        classes=["Experts"], names=["a"], name_suffixes=[])
    with pytest.raises(ConfigError, match=r"zero_optimization\.leaf_module\.names.*list"):
        _leaf_config({"names": [3]})
    with pytest.raises(ConfigError, match=r"leaf_module\.suffixes.*did you mean 'name_suffixes'"):
        _leaf_config({"suffixes": ["mlp"]})


def test_configured_leaves_are_marked_and_unmatched_entries_named():
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DeepSpeed's default classes, absent here: no warning
        assert mark_configured_leaves(model, LeafModuleConfig()) == []
        marked = mark_configured_leaves(model, LeafModuleConfig(
            classes=[], names=["blocks.0.mlp"], name_suffixes=["1.mlp"]))
    assert _names(model, marked) == ["blocks.0.mlp", "blocks.1.mlp"]
    with pytest.warns(UserWarning, match=r"\['Gone', 'blocks.9', 'nope'\] match no module"):
        mark_configured_leaves(Net(), LeafModuleConfig(
            classes=["Gone", "Experts"], names=["blocks.9"], name_suffixes=["nope"]))


class Body(nn.Module):
    """A unit holding units (a PeftModel's base model: its forward bypassed) with a mixture of
    experts directly in it, beside its blocks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.moe = Experts()


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Body()
        self.head = nn.Linear(4, 5)


def _unit_names(model: nn.Module, leaf_classes: list[str]) -> list[str]:
    for name, p in model.named_parameters():  # frozen expert weights (a LoRA base)
        p.requires_grad_(not (".experts." in name and name.endswith("weight")))
    params = [p for p in model.parameters() if p.requires_grad]
    zero = ZeroConfig.from_dict({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0,
        "leaf_module": {"classes": leaf_classes}}}).zero_optimization
    layout = lay_out(model, params, {p: 0 for p in params}, stage=3, zero=zero, world_size=2)
    return _names(model, [module for module, _ in layout.unit_plan])


def test_frozen_parameters_of_a_leaf_in_a_body_stay_in_the_leaf():
    """A body's frozen parameters go to the modules holding them, each a unit whose forward runs
    where it is used: inside a leaf that made each expert a unit, gathered by the ranks that
    route tokens to it only. They go to the leaf instead."""
    assert "model.moe.experts.0" in _unit_names(Outer(), [])
    units = _unit_names(Outer(), ["Experts"])
    assert "model.moe" in units and not any(".experts." in n for n in units), units
