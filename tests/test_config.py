"""zero_ext.config: DeepSpeed-style configs load, bad ones fail with the key's path, and the
batch-size triple resolves as train_batch_size = micro * accumulation * world size."""

import copy
import importlib.util
import json
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from zero_ext.config import (
    SCHEDULER_DEFAULTS,
    ActivationCheckpointingConfig,
    AdamParams,
    BatchSizes,
    BF16Config,
    ConfigError,
    OffloadConfig,
    OptimizerConfig,
    SchedulerConfig,
    ZeroConfig,
    ZeroOptimizationConfig,
)
from zero_ext.estimate import estimate
from zero_ext.zero import offload
from zero_ext.zero.placement import lay_out

# DeepSpeed's own example (docs/_tutorials/zero.md style) and a Hugging Face-style ZeRO-3
# template with every "auto" filled in.
DS_EXAMPLE = {"train_batch_size": 256, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW"}}
FULL = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "steps_per_print": 2000,
    "wall_clock_breakdown": False,
    "communication_data_type": "bfloat16",
    "bf16": {"enabled": True},
    "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 32,
             "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "adamw",
                  "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                             "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR",
                  "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4,
                             "warmup_num_steps": 100, "total_num_steps": 1000}},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "none"},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 2e8,
        "stage3_prefetch_bucket_size": 4.5e7,
        "stage3_param_persistence_threshold": 1e4,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": True,
                                 "number_checkpoints": 4},
}


def load_quietly(config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of the configs below should warn
        return ZeroConfig.load(config)


def error_of(config) -> str:
    with pytest.raises(ValueError) as info:
        ZeroConfig.load(config)
    assert isinstance(info.value, ConfigError)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


# Every default against DeepSpeed 0.19's: tests/test_ds_semantics.py.


def test_full_config_loads_into_dataclasses():
    c = load_quietly(FULL)
    assert isinstance(c.zero_optimization, ZeroOptimizationConfig)
    assert isinstance(c.zero_optimization.offload_optimizer, OffloadConfig)
    assert isinstance(c.optimizer.params, AdamParams)
    assert isinstance(c.activation_checkpointing, ActivationCheckpointingConfig)
    assert c.optimizer.type == "AdamW" and c.optimizer.params.betas == (0.9, 0.95)
    assert c.optimizer.decoupled_weight_decay
    assert c.zero_optimization.stage3_prefetch_bucket_size == 45_000_000
    assert type(c.zero_optimization.sub_group_size) is int
    assert c.zero_optimization.offload_optimizer.enabled
    assert not c.zero_optimization.offload_param.enabled
    assert c.communication_data_type == "bf16" and c.comm_dtype is torch.bfloat16
    assert c.mixed_precision is torch.bfloat16
    assert c.scheduler.params == {"total_num_steps": 1000, "warmup_min_lr": 0.0,
                                  "warmup_max_lr": 3e-4, "warmup_num_steps": 100,
                                  "warmup_type": "log", "last_batch_iteration": -1}


def test_json_path_str_and_pathlike(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(FULL))
    assert load_quietly(path) == load_quietly(str(path)) == load_quietly(FULL)


def test_bad_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"train_batch_size": 8,,}')
    with pytest.raises(ValueError, match=r"broken\.json.* valid JSON \(line 1.* nor Hjson"):
        ZeroConfig.load(path)
    path.write_text('{"train_batch_size": 8, "train_batch_size": 16}')
    with pytest.raises(ValueError, match="'train_batch_size' appears twice"):
        ZeroConfig.load(path)


def test_config_files_are_read_as_deepspeed_reads_them_hjson(tmp_path):
    pytest.importorskip("hjson", reason="DeepSpeed reads config files with hjson")
    # DeepSpeed reads config files with hjson: comments and trailing commas are its users'
    path = tmp_path / "ds_config.json"
    path.write_text('{\n  // ZeRO-2\n  "train_batch_size": 8,\n  "zero_optimization": '
                    '{"stage": 2,},\n}\n')
    config = ZeroConfig.load(path)
    assert (config.train_batch_size, config.zero_optimization.stage) == (8, 2)
    # (DeepSpeedConfig(path) reads it as 8 and stage 2 too, checked by hand: importing
    # deepspeed here would change what the in-process integration tests see)


def test_deepspeed_spellings_read_as_deepspeed_reads_them():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on = ZeroConfig.load({"train_batch_size": 8, "zero_optimization": True,
                              "gradient_allreduce_op": "MEAN", "vocabulary_size": 50257})
        off = ZeroConfig.load({"train_batch_size": 8, "zero_optimization": False})
    # DeepSpeed's deprecated boolean: true is stage 1, false stage 0, with a warning
    assert (on.zero_optimization.stage, off.zero_optimization.stage) == (1, 0)
    text = " ".join(str(w.message) for w in caught)
    assert "deprecated ZeRO switch" in text and "vocabulary_size" in text, text
    # DeepSpeed compares warmup_type's exact spelling ("Linear" warms up as "log" there)
    with pytest.raises(ConfigError, match="'Linear': write 'linear'"):
        ZeroConfig.load({"train_batch_size": 8, "scheduler": {
            "type": "WarmupLR", "params": {"warmup_type": "Linear"}}})


def test_dict_is_not_mutated():
    config = copy.deepcopy(FULL)
    config["zero_optimization"]["cpu_offload"] = False
    config["wandb"] = {"enabled": True}
    before = copy.deepcopy(config)
    with pytest.warns(UserWarning):
        ZeroConfig.load(config)
    assert config == before


def test_zero_config_passes_through():
    c = load_quietly(FULL)
    assert ZeroConfig.load(c) is c
    with pytest.raises(TypeError, match="expected a dict, a path to a JSON file or a ZeroConfig"):
        ZeroConfig.load(42)


@pytest.mark.parametrize("config", [{}, DS_EXAMPLE, FULL], ids=["empty", "ds-example", "full"])
def test_to_dict_round_trip(config):
    c = load_quietly(config)
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert load_quietly(d) == c


def test_round_trip_of_python_built_config():
    c = ZeroConfig(zero_optimization={"stage": 1, "overlap_comm": False},
                   scheduler=SchedulerConfig(type="warmuplr", params={"warmup_num_steps": 10}),
                   optimizer=OptimizerConfig(type="Adam", params=AdamParams(adam_w_mode=False)))
    assert isinstance(c.zero_optimization, ZeroOptimizationConfig)
    assert c.scheduler.type == "WarmupLR" and c.scheduler.params["warmup_max_lr"] is None
    assert not c.optimizer.decoupled_weight_decay
    assert load_quietly(c.to_dict()) == c


def test_aliases():
    c = load_quietly({"bfloat16": {"enabled": True}})
    assert c.bf16.enabled and c.mixed_precision is torch.bfloat16
    z = load_quietly({"zero_optimization": {"stage": 3,
                                            "stage3_gather_fp16_weights_on_model_save": True}})
    assert z.zero_optimization.stage3_gather_16bit_weights_on_model_save


def test_fp16_and_mixed_precision():
    c = load_quietly({"fp16": {"enabled": True}})
    assert c.mixed_precision is torch.float16
    assert c.fp16.dynamic_loss_scale and c.fp16.initial_loss_scale == 2.0**16
    static = load_quietly({"fp16": {"enabled": True, "loss_scale": 128}})
    assert not static.fp16.dynamic_loss_scale and static.fp16.initial_loss_scale == 128.0


@pytest.mark.parametrize("spelling,dtype", [
    ("fp32", torch.float32), ("float32", torch.float32), ("FP16", torch.float16),
    ("float16", torch.float16), ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16)])
def test_communication_data_type_spellings(spelling, dtype):
    assert load_quietly({"communication_data_type": spelling}).comm_dtype is dtype


def test_overlap_comm_stage_default():
    for stage, expected in [(0, False), (1, False), (2, False), (3, True)]:
        z = ZeroOptimizationConfig(stage=stage)
        assert z.overlap_comm is None and z.overlap is expected
    assert ZeroOptimizationConfig(stage=3, overlap_comm=False).overlap is False
    assert ZeroOptimizationConfig(stage=1, overlap_comm=True).overlap is True


def test_adam_types():
    adam = load_quietly({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}})
    assert adam.optimizer.type == "Adam" and not adam.optimizer.decoupled_weight_decay
    assert load_quietly({"optimizer": {"type": "ADAM"}}).optimizer.decoupled_weight_decay
    msg = error_of({"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}})
    assert msg.startswith("optimizer.params.adam_w_mode: false contradicts type 'AdamW'")
    assert "\"type\": \"Adam\"" in msg
    msg = error_of({"optimizer": {"type": "Lamb"}})
    assert msg.startswith("optimizer.type: 'Lamb' is not supported")
    assert "'AdamW' or 'Adam'" in msg and "initialize(" in msg and "optimizer=" in msg


def test_legacy_cpu_offload_is_read_as_offload_optimizer():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = ZeroConfig.load({"zero_optimization": {"stage": 2, "cpu_offload": True}})
    # Applied, and said so: not listed among keys that "have no effect" (it used to be).
    assert [str(w.message) for w in caught] == [(
        "zero_ext config: DeepSpeed's deprecated offload switch, applied; write the section "
        "instead: zero_optimization.cpu_offload is read as offload_optimizer: "
        "{\"device\": \"cpu\", \"pin_memory\": true}")]
    assert c.zero_optimization.offload_optimizer == OffloadConfig(device="cpu", pin_memory=True)
    msg = error_of({"zero_optimization": {"stage": 2, "cpu_offload": True,
                                          "offload_optimizer": {"device": "cpu"}}})
    assert msg.startswith("zero_optimization.cpu_offload: given together with offload_optimizer")


# --------------------------------------------------------------------------------------------
# Keys: unknown, ignored, unsupported.
# --------------------------------------------------------------------------------------------


def test_unknown_key_suggests_nearest():
    assert error_of({"train_batch_sise": 8}) == (
        "train_batch_sise: unknown key; did you mean 'train_batch_size'?")
    assert error_of({"zero_optimization": {"reduce_bucket_sise": 5}}) == (
        "zero_optimization.reduce_bucket_sise: unknown key; did you mean 'reduce_bucket_size'?")
    assert error_of({"zero_optimization": {"offload_param": {"devise": "cpu"}}}).startswith(
        "zero_optimization.offload_param.devise: unknown key; did you mean 'device'?")
    assert error_of({"optimizer": {"params": {"weight_decai": 0.1}}}).startswith(
        "optimizer.params.weight_decai: unknown key; did you mean 'weight_decay'?")


def test_unknown_key_without_near_match_lists_valid_keys():
    msg = error_of({"fp16": {"xyzzy": 1}})
    assert msg.startswith("fp16.xyzzy: unknown key; the keys zero_ext reads here are: ")
    assert "loss_scale_window" in msg and "min_loss_scale" in msg


def test_harmless_keys_warn_once_naming_them():
    config = dict(DS_EXAMPLE, comet={"enabled": True},
                  wandb={"enabled": False}, flops_profiler={"enabled": True},
                  memory_breakdown=False, dump_state=False)
    config["zero_optimization"] = {"stage": 3, "stage3_module_granularity_threshold": 0,
                                   "offload_param": {"device": "cpu", "buffer_count": 5}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = ZeroConfig.load(config)
    assert len(caught) == 1
    text = str(caught[0].message)
    for name in ["comet", "wandb", "flops_profiler",
                 "memory_breakdown", "dump_state",
                 "zero_optimization.stage3_module_granularity_threshold",
                 "zero_optimization.offload_param.buffer_count"]:
        assert name in text
    assert c == load_quietly(dict(DS_EXAMPLE, zero_optimization={
        "stage": 3, "offload_param": {"device": "cpu"}}))


def test_inert_values_of_unsupported_keys_are_accepted_silently():
    c = load_quietly(dict(DS_EXAMPLE, prescale_gradients=False, gradient_predivide_factor=1.0,
                          sparse_gradients=False, amp={"enabled": False, "opt_level": "O1"},
                          gradient_allreduce_op="mean"))
    assert c == load_quietly(DS_EXAMPLE)


@pytest.mark.parametrize("config,prefix,fix", [
    ({"prescale_gradients": True}, "prescale_gradients: true is not supported",
     "set it to false"),
    ({"gradient_predivide_factor": 2.0}, "gradient_predivide_factor: values other than 1.0",
     "set it to 1.0"),
    ({"sparse_gradients": True}, "sparse_gradients: true is not supported", "set it to false"),
    ({"amp": {"enabled": True}}, "amp: NVIDIA Apex AMP is not supported", "\"fp16\""),
    ({"pipeline": {"stages": 2}}, "pipeline: pipeline parallelism is not supported", "remove"),
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}},
     "zero_optimization.offload_optimizer.device: 'nvme' is not supported",
     "\"device\": \"cpu\""),
    ({"zero_optimization": {"zero_quantized_nontrainable_weights": True}},
     "zero_optimization.zero_quantized_nontrainable_weights: quantized frozen weights",
     "set it to false"),
    ({"optimizer": {"params": {"max_grad_norm": 1.0}}},
     "optimizer.params.max_grad_norm: not an optimizer parameter", "gradient_clipping"),
    ({"optimizer": {"params": {"amsgrad": True}}}, "optimizer.params.amsgrad: true is not",
     "remove the key"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
     "fp16.fp16_master_weights_and_grads: true is not supported", "remove the key"),
    ({"scheduler": {"type": "OneCycle"}}, "scheduler.type: 'OneCycle' is not supported",
     "lr_scheduler="),
])
def test_unsupported_semantics_error(config, prefix, fix):
    msg = error_of(config)
    assert msg.startswith(prefix), msg
    assert fix in msg


# --------------------------------------------------------------------------------------------
# Values: types, ranges, "auto".
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,expected", [
    ({"gradient_clipping": "abc"}, "gradient_clipping: expected a number, got 'abc' (str)"),
    ({"gradient_clipping": True}, "gradient_clipping: expected a number, got True (bool)"),
    ({"wall_clock_breakdown": 2}, "wall_clock_breakdown: expected true or false, got 2 (int)"),
    ({"fp16": {"enabled": "maybe"}}, "fp16.enabled: expected true or false, got 'maybe' (str)"),
    ({"zero_optimization": {"reduce_bucket_size": 5.5e-1}},
     "zero_optimization.reduce_bucket_size: expected an integer >= 1, got 0.55 (float)"),
    ({"zero_optimization": {"allgather_bucket_size": 5.5}},
     "zero_optimization.allgather_bucket_size: expected an integer >= 0, got 5.5 (float)"),
    ({"train_batch_size": "8.5"}, "train_batch_size: expected an integer >= 1, got '8.5' (str)"),
    ({"optimizer": {"params": {"betas": 0.9}}},
     "optimizer.params.betas: expected a list of two numbers [beta1, beta2], got 0.9 (float)"),
    ({"zero_optimization": []},
     "zero_optimization: expected a JSON object of zero_optimization settings, got [] (list)"),
    ({"communication_data_type": "int8"},
     "communication_data_type: expected one of 'fp32', 'fp16', 'bf16', got 'int8' (str)"),
    ({"gradient_clipping": float("nan")},
     "gradient_clipping: expected a number, got nan (float)"),
])
def test_type_errors(config, expected):
    assert error_of(config) == expected


@pytest.mark.parametrize("config,expected", [
    ({"zero_optimization": {"stage": 4}},
     "zero_optimization.stage: expected an integer in 0..3, got 4 (int)"),
    ({"zero_optimization": {"stage": -1}},
     "zero_optimization.stage: expected an integer in 0..3, got -1 (int)"),
    ({"zero_optimization": {"reduce_bucket_size": -5}},
     "zero_optimization.reduce_bucket_size: expected an integer >= 1, got -5 (int)"),
    ({"zero_optimization": {"stage3_prefetch_bucket_size": -1}},
     "zero_optimization.stage3_prefetch_bucket_size: expected an integer >= 0, got -1 (int)"),
    ({"optimizer": {"params": {"betas": [0.9, 1.0]}}},
     "optimizer.params.betas[1]: expected a number in [0, 1), got 1.0 (float)"),
    ({"optimizer": {"params": {"betas": [-0.1, 0.99]}}},
     "optimizer.params.betas[0]: expected a number in [0, 1), got -0.1 (float)"),
    ({"optimizer": {"params": {"eps": -1e-8}}},
     "optimizer.params.eps: expected a number >= 0, got -1e-08 (float)"),
    ({"optimizer": {"params": {"lr": -0.1}}},
     "optimizer.params.lr: expected a number >= 0, got -0.1 (float)"),
    ({"fp16": {"enabled": True, "loss_scale_window": 0}},
     "fp16.loss_scale_window: expected an integer >= 1, got 0 (int)"),
    ({"fp16": {"enabled": True, "hysteresis": 0}},
     "fp16.hysteresis: expected an integer >= 1, got 0 (int)"),
    ({"fp16": {"enabled": True, "min_loss_scale": 0.0}},
     "fp16.min_loss_scale: expected a number > 0, got 0.0 (float)"),
    ({"fp16": {"loss_scale": -1}}, "fp16.loss_scale: expected a number >= 0, got -1 (int)"),
    ({"steps_per_print": 0}, "steps_per_print: expected an integer >= 1, got 0 (int)"),
    ({"train_batch_size": 0}, "train_batch_size: expected an integer >= 1, got 0 (int)"),
    ({"train_micro_batch_size_per_gpu": -2},
     "train_micro_batch_size_per_gpu: expected an integer >= 1, got -2 (int)"),
    ({"gradient_accumulation_steps": 0},
     "gradient_accumulation_steps: expected an integer >= 1, got 0 (int)"),
    ({"activation_checkpointing": {"number_checkpoints": 0}},
     "activation_checkpointing.number_checkpoints: expected an integer >= 1, got 0 (int)"),
])
def test_range_errors(config, expected):
    assert error_of(config) == expected


def test_integral_floats_accepted_for_int_fields():
    z = load_quietly({"zero_optimization": {"stage": 2.0, "reduce_bucket_size": 5e8}})
    assert z.zero_optimization.stage == 2 and type(z.zero_optimization.stage) is int
    assert z.zero_optimization.reduce_bucket_size == 500_000_000


def test_dynamic_scaling_ranges_only_checked_when_dynamic():
    # DeepSpeed does the same: a static-scale or disabled fp16 section may carry unused values.
    c = load_quietly({"fp16": {"enabled": True, "loss_scale": 1024, "min_loss_scale": 0,
                               "loss_scale_window": 0}})
    assert c.fp16.loss_scale == 1024.0


def test_fp16_and_bf16_both_enabled():
    assert error_of({"fp16": {"enabled": True}, "bf16": {"enabled": True}}) == (
        "fp16.enabled: fp16 and bf16 are both enabled; enable at most one of them")


AUTO = ("'auto' is filled in by the Hugging Face Trainer integration "
        "(zero_ext.integrations.transformers); outside it, give a value")


@pytest.mark.parametrize("config,path", [
    ({"train_batch_size": "auto"}, "train_batch_size"),
    ({"gradient_clipping": "auto"}, "gradient_clipping"),
    ({"bf16": {"enabled": "auto"}}, "bf16.enabled"),
    ({"optimizer": {"params": {"lr": "auto"}}}, "optimizer.params.lr"),
    ({"optimizer": {"params": {"betas": "auto"}}}, "optimizer.params.betas"),
    ({"zero_optimization": {"stage3_prefetch_bucket_size": "auto"}},
     "zero_optimization.stage3_prefetch_bucket_size"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}},
     "scheduler.params.total_num_steps"),
    ({"gradient_predivide_factor": "auto"}, "gradient_predivide_factor"),
])
def test_auto_is_an_error_outside_the_trainer(config, path):
    assert error_of(config) == f"{path}: {AUTO}"


def test_scheduler_params_are_validated():
    assert error_of({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}}) == (
        "scheduler.params.warmup_num_step: unknown key for WarmupLR; "
        "did you mean 'warmup_num_steps'?")
    assert error_of({"scheduler": {"type": "WarmupDecayLR", "params": {}}}).startswith(
        "scheduler.params.total_num_steps: required by WarmupDecayLR")
    assert error_of({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cos"}}}) == (
        "scheduler.params.warmup_type: expected one of 'log', 'linear', got 'cos' (str)")
    assert error_of({"scheduler": {"params": {}}}) == "scheduler.type: missing; this section "\
        "requires it"


def test_errors_direct_construction_and_pickling():
    with pytest.raises(ConfigError, match=r"^stage: expected an integer in 0\.\.3"):
        ZeroOptimizationConfig(stage=7)
    with pytest.raises(ConfigError, match=r"^zero_optimization\.stage: expected"):
        ZeroConfig(zero_optimization={"stage": 7})
    with pytest.raises(ConfigError, match=r"^enabled: expected true or false"):
        BF16Config(enabled=2)
    error = ConfigError("fp16.enabled", "expected true or false, got 1 (int)")
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error) and clone.path == "fp16.enabled"


# --------------------------------------------------------------------------------------------
# Batch sizes.
# --------------------------------------------------------------------------------------------


def batch(**given) -> ZeroConfig:
    return ZeroConfig(**given)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_deepspeed_example_resolves(world_size):
    c = load_quietly(DS_EXAMPLE)
    if 256 % world_size:
        with pytest.raises(ValueError, match=re.escape(
                f"train_micro_batch_size_per_gpu: cannot be derived, train_batch_size (256) / "
                f"world size ({world_size}) = {256 / world_size:g} is not a positive whole")):
            c.resolve_batch(world_size)
        return
    assert c.resolve_batch(world_size) == BatchSizes(
        train_batch_size=256, train_micro_batch_size_per_gpu=256 // world_size,
        gradient_accumulation_steps=1)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("micro,gas", [(1, 1), (2, 3), (8, 4)])
def test_any_two_determine_the_third(world_size, micro, gas):
    tbs = micro * gas * world_size
    expected = BatchSizes(train_batch_size=tbs, train_micro_batch_size_per_gpu=micro,
                          gradient_accumulation_steps=gas)
    for given in [
        {"train_batch_size": tbs, "train_micro_batch_size_per_gpu": micro,
         "gradient_accumulation_steps": gas},
        {"train_batch_size": tbs, "train_micro_batch_size_per_gpu": micro},
        {"train_batch_size": tbs, "gradient_accumulation_steps": gas},
        {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas},
    ]:
        assert batch(**given).resolve_batch(world_size) == expected, given


def test_one_or_none_given():
    assert batch(train_batch_size=12).resolve_batch(3) == BatchSizes(
        train_batch_size=12, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    assert batch(train_micro_batch_size_per_gpu=5).resolve_batch(2) == BatchSizes(
        train_batch_size=10, train_micro_batch_size_per_gpu=5, gradient_accumulation_steps=1)
    assert batch().resolve_batch(4) == BatchSizes(
        train_batch_size=4, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="^gradient_accumulation_steps: given without a batch"):
        batch(gradient_accumulation_steps=4).resolve_batch(2)


def test_inconsistent_triple_shows_arithmetic():
    c = batch(train_batch_size=256, train_micro_batch_size_per_gpu=8,
              gradient_accumulation_steps=4)
    with pytest.raises(ValueError) as info:
        c.resolve_batch(2)
    assert str(info.value) == (
        "train_batch_size (256) != train_micro_batch_size_per_gpu (8) * "
        "gradient_accumulation_steps (4) * world size (2) = 64; fix one of the three or drop "
        "train_batch_size to have it derived")
    assert c.resolve_batch(8).train_batch_size == 256


def test_derived_value_must_be_whole():
    with pytest.raises(ValueError, match=re.escape(
            "gradient_accumulation_steps: cannot be derived, train_batch_size (10) / "
            "(train_micro_batch_size_per_gpu (4) * world size (1)) = 2.5")):
        batch(train_batch_size=10, train_micro_batch_size_per_gpu=4).resolve_batch(1)
    with pytest.raises(ValueError, match=re.escape(
            "train_micro_batch_size_per_gpu: cannot be derived, train_batch_size (8) / "
            "(gradient_accumulation_steps (4) * world size (4)) = 0.5")):
        batch(train_batch_size=8, gradient_accumulation_steps=4).resolve_batch(4)
    with pytest.raises(ValueError, match=r"^world_size: expected an integer >= 1"):
        batch().resolve_batch(0)


# --------------------------------------------------------------------------------------------
# Compressed communication: zero_ext.compression and DeepSpeed's ZeRO++ keys.
# --------------------------------------------------------------------------------------------


def test_compression_is_off_by_default():
    plan = ZeroConfig.load({}).compression()
    assert (plan.gradients, plan.weights, plan.enabled) == ("none", "none", False)


def test_deepspeed_zeropp_keys_mean_int4_gradients_and_int8_weights_at_stage_3():
    # DeepSpeed's qgZ quantizes gradients to int4 (no error feedback), qwZ weights to int8.
    plan = ZeroConfig.load({"zero_optimization": {
        "stage": 3, "zero_quantized_gradients": True, "zero_quantized_weights": True}}
    ).compression()
    assert (plan.gradients, plan.grad_bits, plan.error_feedback, plan.weights) == \
        ("int4", 4, False, "int8")


def test_qgz_takes_error_feedback_from_zero_ext_and_inert_keys_are_named():
    # DeepSpeed's qgZ has no error feedback; zero_ext's section adds it (it was dropped).
    plan = ZeroConfig.load({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True},
                            "zero_ext": {"compression": {"gradients": {"error_feedback": True}}}}
                           ).compression()
    assert (plan.gradients, plan.error_feedback) == ("int4", True)
    with pytest.warns(UserWarning, match=r"another compression method than the gradients' "
                      r"'int8' and have no effect: zero_ext.compression.gradients.density = 0.5; "
                      r"zero_ext.compression.gradients.warmup_steps = 3$"):
        ZeroConfig.load({"zero_optimization": {"stage": 2}, "zero_ext": {"compression": {
            "gradients": {"method": "int8", "density": 0.5, "warmup_steps": 3}}}})
    with pytest.warns(UserWarning, match=r"gradients' 'none' .*error_feedback = true$"):
        ZeroConfig.load({"zero_ext": {"compression": {"gradients": {"error_feedback": True}}}})
    with pytest.raises(ConfigError, match=r"^zero_ext.compression: expected a JSON object of "
                                          r"compression settings, got None"):
        ZeroConfig.load({"zero_ext": {"compression": None}})


@pytest.mark.parametrize("key", ["zero_quantized_gradients", "zero_quantized_weights"])
def test_deepspeed_zeropp_keys_below_stage_3_warn_and_do_nothing(key):
    # DeepSpeed reads them only in its stage-3 optimizer.
    with pytest.warns(UserWarning, match=f"zero_optimization.{key} .DeepSpeed reads it only "
                      "at stage 3, the stage is 2"):
        plan = ZeroConfig.load({"zero_optimization": {"stage": 2, key: True}}).compression()
    assert not plan.enabled


def test_zero_ext_compression_section_resolves():
    config = ZeroConfig.load({"zero_optimization": {"stage": 2}, "zero_ext": {"compression": {
        "gradients": {"method": "Top-K", "density": 0.05, "momentum": 0.0, "warmup_steps": 10,
                      "block_size": 128}}}})
    plan = config.compression()
    assert (plan.gradients, plan.density, plan.momentum, plan.warmup_steps, plan.grad_block,
            plan.error_feedback) == ("topk", 0.05, 0.0, 10, 128, True)
    assert plan.grad_bits is None
    # The section round-trips under its own names.
    assert ZeroConfig.load(config.to_dict()).compression() == plan
    plan = ZeroConfig.load({"zero_optimization": {"stage": 3}, "zero_ext": {"compression": {
        "gradients": {"method": "int8", "error_feedback": True},
        "weights": {"method": "int8", "block_size": 512}}}}).compression()
    assert (plan.gradients, plan.grad_bits, plan.error_feedback, plan.weights,
            plan.weight_block) == ("int8", 8, True, "int8", 512)


@pytest.mark.parametrize("config,prefix,fix", [
    ({"zero_optimization": {"stage": 0},
      "zero_ext": {"compression": {"gradients": {"method": "int8"}}}},
     "zero_ext.compression.gradients.method: 'int8' quantizes the reduce-scatter of stages "
     "1-3", "\"topk\" at stage 0"),
    ({"zero_optimization": {"stage": 3},
      "zero_ext": {"compression": {"gradients": {"method": "topk"}}}},
     "zero_ext.compression.gradients.method: \"topk\" keeps a full-size fp32 residual",
     "top-k at stages 0-2"),
    ({"zero_optimization": {"stage": 1},
      "zero_ext": {"compression": {"weights": {"method": "int8"}}}},
     "zero_ext.compression.weights.method: 'int8' compresses stage 3's parameter gathers",
     "stage to 3"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True},
      "zero_ext": {"compression": {"gradients": {"method": "int8"}}}},
     "zero_ext.compression.gradients.method: 'int8' and "
     "zero_optimization.zero_quantized_gradients", "keep one of them"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True},
      "zero_ext": {"compression": {"weights": {"method": "int8"}}}},
     "zero_ext.compression.weights.method: 'int8' and zero_optimization.zero_quantized_weights",
     "keep one of them"),
    ({"zero_ext": {"compression": {"gradients": {"method": "int2"}}}},
     "zero_ext.compression.gradients.method: expected one of 'none', 'int8', 'int4', 'topk'",
     "got 'int2'"),
    ({"zero_ext": {"compression": {"gradients": {"block_size": 100}}}},
     "zero_ext.compression.gradients.block_size: expected a multiple of 8", "got 100"),
    ({"zero_ext": {"compression": {"weights": {"block_size": 4}}}},
     "zero_ext.compression.weights.block_size: expected an integer >= 8", "got 4"),
    ({"zero_ext": {"compression": {"gradients": {"density": 0}}}},
     "zero_ext.compression.gradients.density: expected a number in (0, 1]", "got 0"),
    ({"zero_ext": {"compression": {"gradients": {"momentum": 1.0}}}},
     "zero_ext.compression.gradients.momentum: expected a number in [0, 1)", "got 1.0"),
    ({"zero_ext": {"compression": {"gradient": {"method": "int8"}}}},
     "zero_ext.compression.gradient: unknown key", "did you mean 'gradients'?"),
    ({"zero_ext": {"compression": {"gradients": {"method": "topk", "freeze_variance": True}}}},
     "zero_ext.compression.gradients.freeze_variance: true needs warmup_steps >= 1",
     "set warmup_steps"),
    ({"zero_ext": {"compression": {"gradients": {"method": "topk", "compress_momentum": True}}}},
     "zero_ext.compression.gradients.compress_momentum: true needs freeze_variance true",
     "set freeze_variance and warmup_steps"),
    ({"zero_ext": {"compression": {"gradients": {
        "method": "topk", "momentum": 0.9, "warmup_steps": 3, "freeze_variance": True,
        "compress_momentum": True}}}},
     "zero_ext.compression.gradients.compress_momentum: true and momentum 0.9", "keep one of them"),
])
def test_compression_errors(config, prefix, fix):
    msg = error_of(config)
    assert msg.startswith(prefix), msg
    assert fix in msg, msg


def test_freeze_variance_belongs_to_topk():
    def plan(method):
        return ZeroConfig.load({"zero_optimization": {"stage": 2}, "zero_ext": {"compression": {
            "gradients": {"method": method, "warmup_steps": 5, "freeze_variance": True}}}}
        ).compression()
    assert (plan("topk").freeze_variance, plan("topk").warmup_steps) == (True, 5)
    with pytest.warns(UserWarning, match="gradients.freeze_variance = true"):
        assert plan("int8").freeze_variance is False  # quantized sends keep Adam as it is


def test_compress_momentum_belongs_to_topk():
    def plan(method):
        return ZeroConfig.load({"zero_optimization": {"stage": 2}, "zero_ext": {"compression": {
            "gradients": {"method": method, "warmup_steps": 5, "freeze_variance": True,
                          "compress_momentum": True}}}}).compression()
    assert plan("topk").compress_momentum is True
    with pytest.warns(UserWarning, match="gradients.compress_momentum = true"):
        assert plan("int4").compress_momentum is False


# --------------------------------------------------------------------------------------------
# Read as DeepSpeed reads them: each compared with DeepSpeed 0.19 itself, run in a subprocess
# (importing deepspeed here would change what the in-process integration tests see).
# --------------------------------------------------------------------------------------------

_DEEPSPEED_READS = r"""
import inspect, json, logging, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
logging.disable(logging.WARNING)
import torch
from deepspeed.runtime import lr_schedules
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.zero import parameter_offload


def plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def read(request):
    kind = request["kind"]
    try:
        if kind == "config":  # the attributes `read` of DeepSpeedConfig(config)
            parsed = DeepSpeedConfig(request["config"])
            out = {}
            for path in request["read"]:
                value = parsed
                for part in path.split("."):
                    value = None if value is None else getattr(value, part)
                out[path] = plain(value)
            return out
        if kind == "persistent":  # the names mark_persistent_parameters keeps whole
            module = torch.nn.ParameterDict({name: torch.nn.Parameter(torch.zeros(numel))
                                             for name, numel in request["numels"].items()})
            for p in module.parameters():
                p.ds_numel = p.numel()
            parameter_offload.print_rank_0 = lambda *a, **k: None
            holder = type("Holder", (), {"module": module})()
            kept = parameter_offload.DeepSpeedZeRoOffload.mark_persistent_parameters(
                holder, request["threshold"], 2**62)
            names = {id(p): n for n, p in module.named_parameters()}
            return sorted(names[id(p)] for p in kept)
        if kind == "scheduler":  # constructor defaults, and whether `params` build one
            cls = getattr(lr_schedules, request["type"])
            defaults = {n: plain(p.default) for n, p in inspect.signature(cls).parameters.items()
                        if n != "optimizer" and p.default is not inspect.Parameter.empty}
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
            schedule = cls(opt, **request["params"])
            schedule.step()
            return {"defaults": defaults, "lr": schedule.get_last_lr()[0]}
    except Exception as error:  # noqa: BLE001 - what DeepSpeed refuses is a result too
        return {"error": f"{type(error).__name__}: {error}"}


print(json.dumps({name: read(request) for name, request in json.load(sys.stdin).items()}))
"""


def deepspeed_reads(requests: dict) -> dict:
    """DeepSpeed's reading of each request (see _DEEPSPEED_READS), by name."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("compares with DeepSpeed, which is not installed")
    done = subprocess.run([sys.executable, "-c", _DEEPSPEED_READS], input=json.dumps(requests),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def ds_config(config: dict, *read: str) -> dict:
    return {"kind": "config", "config": {"train_micro_batch_size_per_gpu": 1, **config},
            "read": list(read)}


def loaded(config: dict) -> tuple[ZeroConfig, list[str]]:
    """The config and the warnings its load gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = ZeroConfig.load(config)
    return c, [str(w.message) for w in caught]


def test_legacy_offload_switches_pin_memory_as_deepspeed():
    # DeepSpeed builds the section from its defaults (pin_memory true) and sets nothing with
    # cpu_offload_use_pin_memory (its field's set_new_param is false).
    cases = {"optimizer": {"stage": 2, "cpu_offload": True},
             "optimizer_unpinned": {"stage": 2, "cpu_offload": True,
                                    "cpu_offload_use_pin_memory": False},
             "param": {"stage": 3, "cpu_offload_param": True, "cpu_offload_use_pin_memory": False}}
    read = ("zero_config.offload_optimizer.device", "zero_config.offload_optimizer.pin_memory",
            "zero_config.offload_param.device", "zero_config.offload_param.pin_memory")
    deepspeed = deepspeed_reads({name: ds_config({"zero_optimization": zero}, *read)
                                 for name, zero in cases.items()})
    for name, zero in cases.items():
        c, said = loaded({"zero_optimization": zero})
        for section in ("offload_optimizer", "offload_param"):
            ours = getattr(c.zero_optimization, section)
            device = deepspeed[name][f"zero_config.{section}.device"]
            assert ours.device == (device or "none"), (name, section)
            if device is not None:
                assert ours.pin_memory is deepspeed[name][f"zero_config.{section}.pin_memory"]
                assert ours.pin_memory is True
        assert any("is read as" in s and "\"pin_memory\": true" in s for s in said), said
        if "cpu_offload_use_pin_memory" in zero:
            assert any("zero_optimization.cpu_offload_use_pin_memory (DeepSpeed sets nothing "
                       "with it" in s for s in said), said


def test_persistence_threshold_keeps_parameters_of_exactly_that_many_elements_whole():
    # DeepSpeed keeps a parameter whole when ds_numel <= threshold (parameter_offload.py's
    # mark_persistent_parameters, partition_parameters.py's Init).
    threshold = 64

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(threshold, threshold)   # weight above, bias at the threshold
            self.norm = nn.LayerNorm(threshold)           # at the threshold
            self.small = nn.Linear(threshold, 1)         # below

    model = nn.Sequential(nn.ModuleList([Block(), Block()]))
    named = dict(model.named_parameters())
    deepspeed = deepspeed_reads({"kept": {
        "kind": "persistent", "threshold": threshold,
        "numels": {name.replace(".", "_"): p.numel() for name, p in named.items()}}})["kept"]
    params = list(named.values())
    zero = load_quietly({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": threshold}}).zero_optimization
    layout = lay_out(model, params, {p: 0 for p in params}, stage=3, zero=zero, world_size=2)
    partitioned = layout.unit_param_ids(params)
    kept = sorted(name.replace(".", "_") for name, p in named.items() if id(p) not in partitioned)
    assert kept == deepspeed
    assert "0_0_lin_bias" in kept and "0_0_norm_weight" in kept  # exactly `threshold` elements
    # The estimator lays out with the engine's rule: the same boundary.
    def held(at):
        return estimate(model, stage=3, world_size=2, dtype="fp32",
                        stage3_param_persistence_threshold=at).device.params
    assert held(threshold) > held(threshold - 1)  # the 64-element ones whole at 64, not at 63


def test_offload_optimizer_at_stage_0_is_ignored_with_a_warning_as_deepspeed_ignores_it():
    # DeepSpeed 0.19 trains stage 0 with the torch optimizer on the device (it was refused here)
    c, said = loaded({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}})
    assert not c.zero_optimization.offload_optimizer.enabled
    assert [s for s in said if "offload_optimizer" in s] == [
        "zero_ext config: these DeepSpeed keys have no effect in zero_ext and are ignored: "
        "zero_optimization.offload_optimizer (DeepSpeed reads it only at stages 1-3, the stage "
        "is 0; the optimizer state stays on the device)"]


def test_offload_param_below_stage_3_is_ignored_with_a_warning_as_deepspeed_ignores_it():
    cases = {stage: {"stage": stage, "offload_param": {"device": "cpu"}} for stage in (1, 2)}
    deepspeed = deepspeed_reads({str(stage): ds_config(
        {"zero_optimization": zero}, "zero_config.stage", "zero_config.offload_param.device")
        for stage, zero in cases.items()})
    for stage, zero in cases.items():
        assert deepspeed[str(stage)] == {"zero_config.stage": stage,
                                         "zero_config.offload_param.device": "cpu"}
        c, said = loaded({"zero_optimization": zero})
        assert not c.zero_optimization.offload_param.enabled  # parameters stay on the device
        assert [s for s in said if "offload_param" in s] == [(
            "zero_ext config: these DeepSpeed keys have no effect in zero_ext and are ignored: "
            f"zero_optimization.offload_param (DeepSpeed reads it only at stage 3, the stage is "
            f"{stage}; the parameters stay on the device)")]


# Values through one key of each kind whose range is unbounded (fp16 off: its dynamic-scaling
# ranges do not apply), beside what pydantic's lax mode (DeepSpeed's models) reads from them.
_LAX_SAMPLES = ["2", " 2 ", "2.0", "1_000", "+3", "-3", "5e8", "2.5", "1e3", "0x10", "abc", "",
                "on", "OFF", "Yes", "t", "F", "y", "n", "1", "0", "true", "FALSE", " yes",
                0, 1, 2, -3, 0.0, 1.0, 2.5, 5e8, None]


@pytest.mark.parametrize("kind,section,key", [
    (bool, "zero_optimization", "overlap_comm"),
    (int, "fp16", "loss_scale_window"),
    (float, "fp16", "min_loss_scale"),
])
def test_values_convert_as_deepspeeds_pydantic_models_convert_them(kind, section, key):
    pydantic = pytest.importorskip("pydantic")
    for value in _LAX_SAMPLES:
        if value is None and kind is bool:
            continue  # overlap_comm null is its stage default, as DeepSpeed's Optional
        try:
            expected = pydantic.TypeAdapter(kind).validate_python(value)
        except pydantic.ValidationError:
            expected = None
        if expected is None:
            assert error_of({section: {key: value}}).startswith(f"{section}.{key}: expected "), \
                value
            continue
        got = getattr(getattr(load_quietly({section: {key: value}}), section), key)
        assert got == expected and type(got) is kind, (value, got, expected)


def test_deepspeed_reads_a_config_of_strings_as_zero_ext_does():
    config = {"zero_optimization": {"stage": "3", "reduce_bucket_size": "500000000",
                                    "overlap_comm": "off", "stage3_prefetch_bucket_size": "1000",
                                    "offload_optimizer": {"device": "cpu", "pin_memory": "no",
                                                          "ratio": "0.5"}},
              "fp16": {"enabled": "yes", "loss_scale": "128", "initial_scale_power": "12"},
              "bf16": {"enabled": 0}}
    read = {"zero_config.stage": "zero_optimization.stage",
            "zero_config.reduce_bucket_size": "zero_optimization.reduce_bucket_size",
            "zero_config.overlap_comm": "zero_optimization.overlap",
            "zero_config.prefetch_bucket_size": "zero_optimization.stage3_prefetch_bucket_size",
            "zero_config.offload_optimizer.pin_memory":
                "zero_optimization.offload_optimizer.pin_memory",
            "zero_config.offload_optimizer.ratio": "zero_optimization.offload_optimizer.ratio",
            "float16_config.enabled": "fp16.enabled",
            "float16_config.loss_scale": "fp16.loss_scale",
            "float16_config.initial_scale_power": "fp16.initial_scale_power",
            "bfloat16_config.enabled": "bf16.enabled"}
    deepspeed = deepspeed_reads({"strings": ds_config(config, *read)})["strings"]
    assert "error" not in deepspeed, deepspeed
    c = load_quietly(config)
    for theirs, ours in read.items():
        value = c
        for part in ours.split("."):
            value = getattr(value, part)
        assert value == deepspeed[theirs] and type(value) is type(deepspeed[theirs]), ours
    # "5e8" is no integer for pydantic either: refused by both.
    refused = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "5e8"}}
    assert "int_parsing" in deepspeed_reads({"r": ds_config(refused)})["r"]["error"]
    assert error_of(refused) == ("zero_optimization.reduce_bucket_size: expected an integer "
                                 ">= 1, got '5e8' (str)")


@pytest.mark.parametrize("section,key", [
    ("optimizer", "adam_w_mode"), ("optimizer", "bias_correction"),
    ("activation_checkpointing", "cpu_checkpointing"), (None, "wall_clock_breakdown")])
def test_bool_strings_are_refused_where_deepspeed_reads_the_key_as_given(section, key):
    # No pydantic model there: DeepSpeed tests the value's truth, so "false" is true. 0 and 1
    # mean the same in both.
    def config(value):
        if section == "optimizer":
            return {"optimizer": {"type": "Adam", "params": {key: value}}}
        return {section: {key: value}} if section else {key: value}
    path = f"{section}.params.{key}" if section == "optimizer" else \
        f"{section}.{key}" if section else key
    assert error_of(config("false")) == (
        f"{path}: expected true or false, got 'false' (str): DeepSpeed reads this key as given, "
        "where any non-empty string counts as true; write JSON true or false")
    value = load_quietly(config(0))
    for part in path.split("."):
        value = getattr(value, part)
    assert value is False


def test_sequence_and_data_parallel_sizes_as_deepspeed_reads_them():
    deepspeed = deepspeed_reads({
        "sp1": ds_config({"sequence_parallel_size": 1}, "world_size"),
        "dp1": ds_config({"data_parallel_size": 1}, "world_size")})
    assert deepspeed == {"sp1": {"world_size": 1}, "dp1": {"world_size": 1}}
    assert load_quietly({"sequence_parallel_size": 1}).sequence_parallel_size == 1
    assert load_quietly({"sequence_parallel_size": None}).sequence_parallel_size is None
    assert error_of({"sequence_parallel_size": 2}) == (
        "sequence_parallel_size: 2 splits each sequence over 2 ranks (DeepSpeed-Ulysses), which "
        "zero_ext does not have: every rank is data-parallel here. Remove the key or set it to 1")
    # Alone, DeepSpeed never reads data_parallel_size: warned, with no effect.
    c, said = loaded({"data_parallel_size": 8})
    assert said == [("zero_ext config: these DeepSpeed keys have no effect in zero_ext and are "
                     "ignored: data_parallel_size = 8 (DeepSpeed reads it only together with "
                     "sequence_parallel_size; the data-parallel size is the world size)")]
    assert c.resolve_batch(2).train_batch_size == 2
    # With sequence_parallel_size, DeepSpeed's (data, sequence) mesh covers every rank.
    both = load_quietly({"data_parallel_size": 4, "sequence_parallel_size": 1})
    assert both.resolve_batch(4).train_batch_size == 4
    with pytest.raises(ConfigError, match=r"^data_parallel_size: 4 with sequence_parallel_size "
                       r"1, but the world size is 2: the data-parallel size is the world size"):
        both.resolve_batch(2)


def test_gradient_clipping_at_or_below_zero_is_no_clipping_as_in_deepspeed():
    # DeepSpeed clips only when gradient_clipping > 0 (engine.py, stage_1_and_2.py); its -1.0
    # is the usual "off".
    deepspeed = deepspeed_reads({"off": ds_config({"gradient_clipping": -1.0},
                                                  "gradient_clipping")})
    assert deepspeed["off"] == {"gradient_clipping": -1.0}
    c = load_quietly({"gradient_clipping": -1.0})
    assert c.gradient_clipping == -1.0
    assert error_of({"gradient_clipping": float("-inf")}) == (
        "gradient_clipping: expected a number, got -inf (float)")


def test_bf16_null_and_bf16_beside_bfloat16_as_deepspeed_reads_them():
    # DeepSpeed reads "bfloat16" only when "bf16" is absent or null; null alone is off.
    cases = {"null": {"bf16": None},
             "bf16_on": {"bf16": {"enabled": True}, "bfloat16": {"enabled": False}},
             "bf16_off": {"bf16": {"enabled": False}, "bfloat16": {"enabled": True}},
             "bf16_null": {"bf16": None, "bfloat16": {"enabled": True}}}
    deepspeed = deepspeed_reads({name: ds_config(config, "bfloat16_config.enabled")
                                 for name, config in cases.items()})
    for name, config in cases.items():
        c, said = loaded(config)
        assert c.bf16.enabled is deepspeed[name]["bfloat16_config.enabled"], name
        if name in ("bf16_on", "bf16_off"):
            assert said == [("zero_ext config: these DeepSpeed keys have no effect in zero_ext "
                             "and are ignored: bfloat16 (DeepSpeed reads bf16 when both are "
                             "given)")], name
        else:
            assert said == [], name


@pytest.mark.parametrize("section,key,hint", [
    ("activation_checkpointing", "partitioned_activations",
     "did you mean 'partition_activations'?"),
    ("data_types", "comment", ("the keys zero_ext reads here are: buffer_dtype, "
                               "grad_accum_dtype, keep_in_fp32_modules, param_dtype")),
])
def test_unknown_keys_deepspeed_ignores_are_warned_about_not_refused(section, key, hint):
    # DeepSpeed reads these two sections key by key and ignores any other key.
    config = {section: {key: False}}
    deepspeed = deepspeed_reads({"unknown": ds_config(config, "train_micro_batch_size_per_gpu")})
    assert deepspeed["unknown"] == {"train_micro_batch_size_per_gpu": 1}
    c, said = loaded(config)
    assert said == [(f"zero_ext config: unknown keys, ignored as DeepSpeed ignores them in this "
                     f"section: {section}.{key} (unknown key; {hint})")]
    assert c == load_quietly({section: {}})  # as if the key were not there
    # Elsewhere an unknown key is still an error.
    assert error_of({"fp16": {key: False}}).startswith(f"fp16.{key}: unknown key")


def test_offload_ratio_and_cpu_cores_at_zero_as_deepspeed_bounds_them():
    # DeepSpeed's bounds include 0 (offload_config.py: ge=0.0). ratio 0 steps every sub-group
    # on the device (stage3.py: subgroup_to_device), so nothing of the optimizer is offloaded;
    # cpuadam_cores_perc 0 leaves the CPU step its one thread.
    cases = {"ratio": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.0}},
             "cores": {"stage": 3, "offload_optimizer": {"device": "cpu",
                                                         "cpuadam_cores_perc": 0.0}},
             "ratio_with_param": {"stage": 3, "offload_param": {"device": "cpu"},
                                  "offload_optimizer": {"device": "cpu", "ratio": 0.0}}}
    read = ("zero_config.offload_optimizer.ratio", "zero_config.offload_optimizer.cpuadam_cores_perc")
    deepspeed = deepspeed_reads({name: ds_config({"zero_optimization": zero}, *read)
                                 for name, zero in cases.items()})
    for name, zero in cases.items():
        ours = load_quietly({"zero_optimization": zero}).zero_optimization
        assert (ours.offload_optimizer.ratio, ours.offload_optimizer.cpuadam_cores_perc) == \
            tuple(deepspeed[name][path] for path in read), name
    ratio = load_quietly({"zero_optimization": cases["ratio"]}).zero_optimization
    assert not ratio.offload_optimizer.enabled  # every bucket's state stays on the device
    with_param = load_quietly({"zero_optimization": cases["ratio_with_param"]}).zero_optimization
    assert with_param.offload_param.enabled and not with_param.offload_optimizer.enabled
    assert offload.cpu_step_threads(0.0) == 1
    for value, expected in ((-0.1, "got -0.1 (float)"), (1.5, "got 1.5 (float)")):
        for key in ("ratio", "cpuadam_cores_perc"):
            assert error_of({"zero_optimization": {"stage": 3, "offload_optimizer": {
                "device": "cpu", key: value}}}) == (
                f"zero_optimization.offload_optimizer.{key}: expected a number in [0, 1], "
                f"{expected}")


def test_schedulers_take_deepspeeds_constructor_parameters():
    # last_batch_iteration (-1: the start) for all three, and WarmupDecayLR's warmup_max_lr
    # None (each group's lr: it inherits WarmupLR's constructor).
    cases = {"WarmupLR": {"warmup_num_steps": 10, "last_batch_iteration": 4},
             "WarmupDecayLR": {"total_num_steps": 100, "warmup_num_steps": 10,
                               "warmup_max_lr": None, "last_batch_iteration": -1},
             "WarmupCosineLR": {"total_num_steps": 100, "warmup_num_steps": 10,
                                "last_batch_iteration": 0}}
    deepspeed = deepspeed_reads({name: {"kind": "scheduler", "type": name, "params": params}
                                 for name, params in cases.items()})
    for name, params in cases.items():
        assert "error" not in deepspeed[name], deepspeed[name]
        defaults = {k: v for k, v in SCHEDULER_DEFAULTS[name].items() if k != "total_num_steps"}
        assert defaults == deepspeed[name]["defaults"], name
        parsed = SchedulerConfig(type=name, params=params).params
        assert all(parsed[key] == value for key, value in params.items()), name
    assert SchedulerConfig(type="WarmupLR").params["last_batch_iteration"] == -1
    assert error_of({"scheduler": {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 10, "last_batch_iteration": -2}}}) == (
        "scheduler.params.last_batch_iteration: expected an integer >= -1, got -2 (int)")
