"""Ported cases that need no process group: config parsing and activation checkpointing.

From DeepSpeed's tests/unit/runtime/test_ds_config_dict.py and
runtime/activation_checkpointing/test_activation_checkpointing.py. They run in the pytest
process itself (registered under world size 0).
"""

from __future__ import annotations

import json
import os
import tempfile
from copy import deepcopy

import pytest
import torch
from torch import nn

from zero_ext import checkpointing
from zero_ext.config import ZeroConfig

from ds_conformance_cases import case

CONFIG = "test_ds_config_dict.py::"
ACT = "test_activation_checkpointing.py::"

# -- test_ds_config_dict.py -------------------------------------------------------------------
BATCH_TRIPLES = [(2, 32, 16, 1, True), (2, 32, 8, 2, True), (2, 33, 17, 2, False),
                 (2, 32, 18, 1, False)]


def _resolve(world_size: int, **given):
    return ZeroConfig.from_dict({k: v for k, v in given.items() if v is not None}) \
        .resolve_batch(world_size)


def _triple(b) -> tuple:
    return b.train_batch_size, b.train_micro_batch_size_per_gpu, b.gradient_accumulation_steps


for _ranks, _batch, _micro, _gas, _ok in BATCH_TRIPLES:
    @case(CONFIG + f"TestBatchConfig[{_ranks}-{_batch}-{_micro}-{_gas}-{_ok}]", world_size=0,
          ranks=_ranks, batch=_batch, micro=_micro, gas=_gas, ok=_ok)
    def batch_config(ranks, batch, micro, gas, ok):
        # DeepSpeed's cases: all three given, or two of them (any pair), or one (accumulation
        # then 1); a consistent triple resolves to itself, an inconsistent one is an error.
        if ok:
            subsets = [{"tbs": batch, "micro": micro, "gas": gas}, {"tbs": batch, "micro": micro},
                       {"tbs": batch, "gas": gas}, {"micro": micro, "gas": gas}]
            if gas == 1:
                subsets += [{"micro": micro}, {"tbs": batch}]
            for given in subsets:
                got = _triple(_resolve(ranks, train_batch_size=given.get("tbs"),
                                       train_micro_batch_size_per_gpu=given.get("micro"),
                                       gradient_accumulation_steps=given.get("gas")))
                assert got == (batch, micro, gas), (given, got)
            return
        refused = [{"tbs": batch, "micro": micro, "gas": gas}, {"tbs": batch, "micro": micro},
                   {"gas": gas}]
        if gas != 1:
            refused.append({"tbs": batch, "gas": gas})
        for given in refused:
            with pytest.raises(ValueError) as info:
                _resolve(ranks, train_batch_size=given.get("tbs"),
                         train_micro_batch_size_per_gpu=given.get("micro"),
                         gradient_accumulation_steps=given.get("gas"))
            text = str(info.value)
            assert "train_batch_size" in text or "gradient_accumulation_steps" in text, text


@case(CONFIG + "test_temp_config_json", world_size=0)
def temp_config_json():
    # A config file and the same dict load to the same configuration.
    config = {"train_batch_size": 1, "gradient_clipping": 0.5,
              "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ds_config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        assert ZeroConfig.load(path).to_dict() == ZeroConfig.load(config).to_dict()


for _key in ("bf16", "bfloat16"):
    @case(CONFIG + f"test_get_bfloat16_enabled[{_key}]", world_size=0, key=_key)
    def bfloat16_enabled(key):
        assert ZeroConfig.from_dict({key: {"enabled": True}}).mixed_precision == torch.bfloat16


for _key in ("stage3_gather_16bit_weights_on_model_save",
             "stage3_gather_fp16_weights_on_model_save"):
    @case(CONFIG + f"test_gather_16bit_params_on_model_save[{_key}]", world_size=0, key=_key)
    def gather_16bit_key(key):
        # Both spellings are accepted, and mean the same: the configuration from either equals
        # the one from the current spelling.
        current = {"zero_optimization": {"stage": 3,
                                         "stage3_gather_16bit_weights_on_model_save": True}}
        given = {"zero_optimization": {"stage": 3, key: True}}
        assert ZeroConfig.from_dict(given).to_dict() == ZeroConfig.from_dict(current).to_dict()


@case(CONFIG + "TestConfigLoad[unknown_key]", world_size=0)
def unknown_key(tmp=None):
    # DeepSpeed's zero_optimization model forbids extra keys; a misspelt key is an error that
    # names the key meant.
    with pytest.raises(ValueError) as info:
        ZeroConfig.from_dict({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 100}})
    assert "reduce_bucket_size" in str(info.value), str(info.value)


# -- runtime/zero/test_zero_config.py ------------------------------------------------------------
ZERO_CONFIG = "test_zero_config.py::"


def _zero(section: dict):
    return ZeroConfig.from_dict({"zero_optimization": section}).zero_optimization


@case(ZERO_CONFIG + "test_zero_config_deprecatedfields", world_size=0)
def zero_config_deprecated_fields():
    # DeepSpeed's legacy switches turn the offload sections on (to the CPU).
    assert _zero({"stage": 3, "cpu_offload_param": True}).offload_param.enabled
    legacy = _zero({"stage": 2, "cpu_offload": True}).offload_optimizer
    assert legacy.enabled and legacy.device == "cpu"


@case(ZERO_CONFIG + "test_zero_config_aliasfields", world_size=0)
def zero_config_alias_fields():
    # DeepSpeed's field names and their stage3_ aliases set the same value.
    for field, alias in (("prefetch_bucket_size", "stage3_prefetch_bucket_size"),
                         ("param_persistence_threshold", "stage3_param_persistence_threshold"),
                         ("max_reuse_distance", "stage3_max_reuse_distance")):
        by_field = _zero({"stage": 3, field: 12345})
        by_alias = _zero({"stage": 3, alias: 12345})
        assert getattr(by_field, alias) == getattr(by_alias, alias) == 12345, field


@case(ZERO_CONFIG + "test_zero_config_overlapcomm", world_size=0)
def zero_config_overlap_comm():
    assert [_zero({"stage": s}).overlap for s in range(4)] == [False, False, False, True]


@case(ZERO_CONFIG + "test_zero_config_offload_configs", world_size=0)
def zero_config_offload_configs():
    # No section, a null one and an empty one all mean no offload (DeepSpeed's device default
    # is "none").
    for sections in ({}, {"offload_param": None, "offload_optimizer": None},
                     {"offload_param": {}, "offload_optimizer": {}}):
        zero = _zero({"stage": 3, **sections})
        assert not zero.offload_param.enabled and not zero.offload_optimizer.enabled, sections


# -- test_activation_checkpointing.py -----------------------------------------------------------
HIDDEN_DIM = 20


def _compute(module, *inputs, do_checkpoint=False):
    outputs = checkpointing.checkpoint(module, *inputs) if do_checkpoint else module(*inputs)
    if torch.is_tensor(outputs):
        outputs = (outputs,)
    sum(o.sum() for o in outputs if torch.is_tensor(o) and o.requires_grad).backward()
    return {"outputs": outputs, "module_grads": [p.grad for p in module.parameters()],
            "input_grads": [x.grad for x in inputs if torch.is_tensor(x)]}


def _match(ref, got):
    assert type(ref) is type(got), (type(ref), type(got))
    if isinstance(ref, (list, tuple)):
        assert len(ref) == len(got)
        for x, y in zip(ref, got):
            _match(x, y)
    elif not torch.is_tensor(ref):
        assert ref == got, (ref, got)
    elif ref.is_floating_point():
        torch.testing.assert_close(got, ref)
    else:
        assert torch.equal(ref, got)


def _check_checkpoint(module, *inputs):
    """Outputs, parameter gradients and input gradients equal those without checkpointing."""
    module.eval()
    base = _compute(deepcopy(module), *deepcopy(inputs))
    test = _compute(deepcopy(module), *deepcopy(inputs), do_checkpoint=True)
    for group in base:
        assert len(base[group]) == len(test[group]), group
        for b, t in zip(base[group], test[group]):
            _match(b, t)
    return test


class MaskedLinear(nn.Linear):
    def forward(self, x, mask):
        out = super().forward(x)
        return out * (mask if mask.is_floating_point() else mask.type_as(out))


class MaskedLinearSeq(MaskedLinear):
    def forward(self, x, mask):
        return super().forward(x, mask), mask


class MaskedLinearSeqDup(MaskedLinearSeq):
    def forward(self, x, mask):
        dup = x.clone().detach() * 1.38
        x, mask = super().forward(x, mask)
        return dup, x, mask


class DropMaskLinear(nn.Linear):
    def forward(self, x, mask):
        return super().forward(x)


class LinearNonTensorInput(nn.Linear):
    def forward(self, x, non_tensor_input):
        return super().forward(x)


class LinearNonTensorOutput(nn.Linear):
    def __init__(self, non_tensor_output):
        super().__init__(HIDDEN_DIM, HIDDEN_DIM)
        self.non_tensor_output = non_tensor_output

    def forward(self, x):
        return super().forward(x), self.non_tensor_output


def _mask(floating: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    mask = torch.randn(HIDDEN_DIM, generator=gen) > 0
    return mask.float() if floating else mask


def _inputs() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(HIDDEN_DIM, requires_grad=True)


_MODULES = {
    "test_ckpt_inputs1_outputs1": (lambda: nn.Linear(HIDDEN_DIM, HIDDEN_DIM), False),
    "test_ckpt_inputs2_outputs1": (lambda: MaskedLinear(HIDDEN_DIM, HIDDEN_DIM), True),
    "test_ckpt_inputs2_outputs2": (lambda: MaskedLinearSeq(HIDDEN_DIM, HIDDEN_DIM), True),
    "test_ckpt_inputs2_outputs3": (lambda: MaskedLinearSeqDup(HIDDEN_DIM, HIDDEN_DIM), True),
}
for _name, (_factory, _masked) in _MODULES.items():
    for _floating in (False, True):
        @case(ACT + f"TestActivationCheckpoint::{_name}[{'float' if _floating else 'bool'}"
              "-mask]", world_size=0, factory=_factory, masked=_masked, floating=_floating)
        def activation_checkpoint(factory, masked, floating):
            torch.manual_seed(1)
            module = factory()
            inputs = (_inputs(), _mask(floating)) if masked else (_inputs(),)
            _check_checkpoint(module, *inputs)


for _floating in (False, True):
    @case(ACT + f"TestActivationCheckpoint::test_ckpt_arg_none[{'float' if _floating else 'bool'}"
          "-mask]", world_size=0)
    def arg_none():
        torch.manual_seed(1)
        _check_checkpoint(DropMaskLinear(HIDDEN_DIM, HIDDEN_DIM), _inputs(), None)


def _non_tensors():
    gen = torch.Generator().manual_seed(9)
    return {"None": None, "2": 2, "True": True, "(None,2.5)": (None, 2.5),
            "(None,True,tensor)": (None, True, torch.randn(HIDDEN_DIM, generator=gen))}


for _label in _non_tensors():
    @case(ACT + f"TestCheckpointNonTensor::test_ckpt_non_tensor_input[{_label}]",
          world_size=0, label=_label)
    def non_tensor_input(label):
        torch.manual_seed(1)
        _check_checkpoint(LinearNonTensorInput(HIDDEN_DIM, HIDDEN_DIM), _inputs(),
                          _non_tensors()[label])

    @case(ACT + f"TestCheckpointNonTensor::test_ckpt_non_tensor_output[{_label}]",
          world_size=0, label=_label)
    def non_tensor_output(label):
        torch.manual_seed(1)
        _check_checkpoint(LinearNonTensorOutput(_non_tensors()[label]), _inputs())


def _ordering_outputs():
    gen = torch.Generator().manual_seed(10)
    return {"None": None, "(tensor,2.5)": (torch.randn(HIDDEN_DIM, generator=gen), 2.5),
            "(None,tensor,True)": (None, torch.randn(HIDDEN_DIM, generator=gen), True),
            "(None,True,tensor)": (None, True, torch.randn(HIDDEN_DIM, generator=gen))}


for _label in _ordering_outputs():
    @case(ACT + f"TestCheckpointNonTensorOutputOrdering::test_ckpt_non_tensor_output_ordering"
          f"[{_label}]", world_size=0, label=_label)
    def non_tensor_output_ordering(label):
        torch.manual_seed(1)
        extra = _ordering_outputs()[label]
        test = _check_checkpoint(LinearNonTensorOutput(extra), _inputs())
        ordering = []
        for item in test["outputs"]:
            items = item if isinstance(item, (list, tuple)) else [item]
            ordering += [torch.is_tensor(t) for t in items]
        expected = [True] + ([torch.is_tensor(t) for t in extra]
                             if isinstance(extra, (list, tuple)) else [torch.is_tensor(extra)])
        assert ordering == expected, (ordering, expected)


@case(ACT + "TestActivationCheckpointKeywordArguments::"
      "test_tensor_and_non_tensor_keyword_arguments", world_size=0)
def keyword_arguments():
    def function(value, *, scale, offset):
        return value * scale + offset

    torch.manual_seed(2)
    value = torch.randn(HIDDEN_DIM, requires_grad=True)
    scale = torch.randn(HIDDEN_DIM, requires_grad=True)
    ref_value = value.detach().clone().requires_grad_()
    ref_scale = scale.detach().clone().requires_grad_()
    reference = function(ref_value, scale=ref_scale, offset=1.5)
    reference.sum().backward()
    output = checkpointing.checkpoint(function, value, scale=scale, offset=1.5)
    output.sum().backward()
    torch.testing.assert_close(output, reference)
    torch.testing.assert_close(value.grad, ref_value.grad)
    torch.testing.assert_close(scale.grad, ref_scale.grad)


@case(ACT + "TestCPUActivationCheckpoint::test_cpu_offload_matches_baseline", world_size=0)
def cpu_checkpointing_matches_baseline():
    # Stacked checkpointed layers with their saved inputs offloaded to host memory: outputs and
    # gradients equal a plain run.
    torch.manual_seed(1234)
    ref_layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
    test_layers = deepcopy(ref_layers)
    x = torch.randn(8, 64)
    x_ref = x.clone().requires_grad_()
    out_ref = x_ref
    for layer in ref_layers:
        out_ref = layer(out_ref)
    out_ref.sum().backward()
    checkpointing.configure(cpu_checkpointing=True)
    try:
        x_test = x.clone().requires_grad_()
        out_test = x_test
        for layer in test_layers:
            out_test = checkpointing.checkpoint(layer, out_test)
        out_test.sum().backward()
    finally:
        checkpointing.configure()
    torch.testing.assert_close(out_test, out_ref)
    torch.testing.assert_close(x_test.grad, x_ref.grad)
    for p_ref, p_test in zip(ref_layers.parameters(), test_layers.parameters()):
        torch.testing.assert_close(p_test.grad, p_ref.grad)
