"""zero_ext against DeepSpeed 0.19's semantics: every config default, the fp16 loss scale step
for step, and the keys that change training (docs/deepspeed-compat.md lists them).

The expected values are DeepSpeed's, read from its source (deepspeedai/DeepSpeed at v0.19.6);
each row names the file and the name the value comes from. The loss scale is compared with a
transcription of DeepSpeed's two update rules, written from its source independently of
zero_ext's implementation.
"""

import functools
import json
import pathlib
import random
import warnings

import ds_semantics_cases
import pytest

import zero_ext
from zero_ext.config import ConfigError, ZeroConfig
from zero_ext.loss_scaler import DynamicLossScaler, LossScaleAtMinimumError, loss_scaler_for

import engine_cases
from dist_harness import run_group

# --------------------------------------------------------------------------------------------
# Defaults.
# --------------------------------------------------------------------------------------------

RC = "deepspeed/runtime/constants.py"
ZC = "deepspeed/runtime/zero/config.py"
OC = "deepspeed/runtime/zero/offload_config.py"
PC = "deepspeed/runtime/precision_config.py"
AC = "deepspeed/runtime/activation_checkpointing/config.py"
FA = "deepspeed/ops/adam/fused_adam.py FusedAdam.__init__"
LR = "deepspeed/runtime/lr_schedules.py"

# (dotted path in a config loaded from {} (plus the sections named by `given`), DeepSpeed's
# value, where DeepSpeed sets it)
DEFAULTS = [
    ("train_batch_size", None, f"{RC} TRAIN_BATCH_SIZE_DEFAULT"),
    ("train_micro_batch_size_per_gpu", None, f"{RC} TRAIN_MICRO_BATCH_SIZE_PER_GPU_DEFAULT"),
    ("gradient_accumulation_steps", None, f"{RC} GRADIENT_ACCUMULATION_STEPS_DEFAULT"),
    ("gradient_clipping", 1.0, f"{RC} GRADIENT_CLIPPING_DEFAULT"),
    ("steps_per_print", None, f"{RC} STEPS_PER_PRINT_DEFAULT"),
    ("wall_clock_breakdown", False, f"{RC} WALL_CLOCK_BREAKDOWN_DEFAULT"),
    ("communication_data_type", None, f"{RC} COMMUNICATION_DATA_TYPE_DEFAULT"),
    ("fp16.enabled", False, f"{PC} DeepSpeedFP16Config.enabled"),
    ("fp16.auto_cast", False, f"{PC} DeepSpeedFP16Config.auto_cast"),
    ("fp16.loss_scale", 0.0, f"{PC} DeepSpeedFP16Config.loss_scale"),
    ("fp16.initial_scale_power", 16, f"{PC} DeepSpeedFP16Config.initial_scale_power"),
    ("fp16.loss_scale_window", 1000, f"{PC} DeepSpeedFP16Config.loss_scale_window"),
    ("fp16.hysteresis", 2, f"{PC} DeepSpeedFP16Config.hysteresis"),
    ("fp16.consecutive_hysteresis", False, f"{PC} DeepSpeedFP16Config.consecutive_hysteresis"),
    ("fp16.min_loss_scale", 1.0, f"{PC} DeepSpeedFP16Config.min_loss_scale"),
    ("fp16.raise_error_at_min_scale", True,
     "deepspeed/runtime/fp16/loss_scaler.py DynamicLossScaler(raise_error_at_min_scale=True)"),
    ("bf16.enabled", False, f"{PC} DeepSpeedBF16Config.enabled"),
    ("zero_optimization.stage", 0, f"{ZC} DeepSpeedZeroConfig.stage"),
    ("zero_optimization.contiguous_gradients", True, f"{ZC} contiguous_gradients"),
    ("zero_optimization.reduce_scatter", True, f"{ZC} reduce_scatter"),
    ("zero_optimization.reduce_bucket_size", 500_000_000, f"{ZC} reduce_bucket_size"),
    ("zero_optimization.allgather_partitions", True, f"{ZC} allgather_partitions"),
    ("zero_optimization.allgather_bucket_size", 500_000_000, f"{ZC} allgather_bucket_size"),
    ("zero_optimization.overlap", False, f"{ZC} overlap_comm_valid: stage == 3"),
    ("zero_optimization.sub_group_size", 1_000_000_000, f"{ZC} sub_group_size"),
    ("zero_optimization.stage3_prefetch_bucket_size", 50_000_000, f"{ZC} prefetch_bucket_size"),
    ("zero_optimization.stage3_param_persistence_threshold", 100_000,
     f"{ZC} param_persistence_threshold"),
    ("zero_optimization.stage3_max_live_parameters", 1_000_000_000,
     f"{ZC} max_live_parameters"),
    ("zero_optimization.stage3_max_reuse_distance", 1_000_000_000, f"{ZC} max_reuse_distance"),
    ("zero_optimization.stage3_gather_16bit_weights_on_model_save", False,
     f"{ZC} gather_16bit_weights_on_model_save"),
    ("zero_optimization.ignore_unused_parameters", True, f"{ZC} ignore_unused_parameters"),
    ("zero_optimization.round_robin_gradients", False, f"{ZC} round_robin_gradients"),
    ("zero_optimization.elastic_checkpoint", False, f"{ZC} elastic_checkpoint"),
    ("zero_optimization.leaf_module.classes", [
        "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
        "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
        "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock"],
     "runtime/zero/leaf_module_config.py DEFAULT_LEAF_MODULE_CLASSES"),
    ("zero_optimization.leaf_module.names", [],
     "runtime/zero/leaf_module_config.py DEFAULT_LEAF_MODULE_NAMES"),
    ("zero_optimization.leaf_module.name_suffixes", [],
     "runtime/zero/leaf_module_config.py DEFAULT_LEAF_MODULE_NAME_SUFFIXES"),
    ("zero_optimization.offload_optimizer.device", "none", f"{OC} device"),
    ("zero_optimization.offload_optimizer.pin_memory", True,
     f"{OC} DeepSpeedZeroOffloadOptimizerConfig.pin_memory"),
    ("zero_optimization.offload_optimizer.ratio", 1.0, f"{OC} ratio"),
    ("zero_optimization.offload_optimizer.cpuadam_cores_perc", 0.8, f"{OC} cpuadam_cores_perc"),
    ("zero_optimization.offload_param.device", "none", f"{OC} device"),
    ("zero_optimization.offload_param.pin_memory", True,
     f"{OC} DeepSpeedZeroOffloadParamConfig.pin_memory"),
    ("activation_checkpointing.partition_activations", False,
     f"{AC} ACT_CHKPT_PARTITION_ACTIVATIONS_DEFAULT"),
    ("activation_checkpointing.cpu_checkpointing", False,
     f"{AC} ACT_CHKPT_CPU_CHECKPOINTING_DEFAULT"),
    ("activation_checkpointing.contiguous_memory_optimization", False,
     f"{AC} ACT_CHKPT_CONTIGUOUS_MEMORY_OPTIMIZATION_DEFAULT"),
    ("activation_checkpointing.number_checkpoints", None,
     f"{AC} ACT_CHKPT_NUMBER_CHECKPOINTS_DEFAULT"),
    ("activation_checkpointing.synchronize_checkpoint_boundary", False,
     f"{AC} ACT_CHKPT_SYNCHRONIZE_CHECKPOINT_BOUNDARY_DEFAULT"),
    ("activation_checkpointing.profile", False, f"{AC} ACT_CHKPT_PROFILE_DEFAULT"),
    # "optimizer": {"type": "AdamW"} builds FusedAdam (DeepSpeedCPUAdam under offload, the
    # same defaults) with the params given, so its constructor's defaults apply.
    ("optimizer.params.lr", 1e-3, FA),
    ("optimizer.params.betas", (0.9, 0.999), FA),
    ("optimizer.params.eps", 1e-8, FA),
    ("optimizer.params.weight_decay", 0.0, FA),
    ("optimizer.params.bias_correction", True, FA),
    ("optimizer.params.adam_w_mode", True, "deepspeed/runtime/config.py ADAM_W_MODE_DEFAULT"),
    ("optimizer.params.torch_adam", False,
     "deepspeed/runtime/engine.py _configure_basic_optimizer: pop(TORCH_ADAM_PARAM, False)"),
    ("scheduler.params.warmup_min_lr", 0.0, f"{LR} WarmupDecayLR.__init__"),
    ("scheduler.params.warmup_max_lr", 0.001, f"{LR} WarmupDecayLR.__init__"),
    ("scheduler.params.warmup_num_steps", 1000, f"{LR} WarmupDecayLR.__init__"),
    ("scheduler.params.warmup_type", "log", f"{LR} WARMUP_LOG_RATE"),
]
# (An absent activation_checkpointing section is None: initialize then leaves the settings a
# configure() made; an empty one holds the defaults.)
SECTIONS = {"optimizer": {"type": "AdamW"}, "activation_checkpointing": {},
            "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 2000}}}


def _lookup(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


@pytest.mark.parametrize("path,deepspeed,source", DEFAULTS, ids=[row[0] for row in DEFAULTS])
def test_default_is_deepspeeds(path, deepspeed, source):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ZeroConfig.load(SECTIONS)
    assert _lookup(config, path) == deepspeed, f"DeepSpeed's default ({source}) is {deepspeed!r}"


def test_torch_adam_takes_torchs_weight_decay_default():
    # DeepSpeed: torch_adam builds torch.optim.AdamW(params, **params) (Adam when adam_w_mode
    # is false), whose weight_decay default is 0.01 (Adam's 0); torch has no bias_correction.
    def params(**given):
        return ZeroConfig.load({"optimizer": {"type": "Adam", "params": given}}).optimizer.params

    assert params(torch_adam=True).weight_decay == 0.01
    assert params(torch_adam=True, adam_w_mode=False).weight_decay == 0.0
    assert params(torch_adam=True, weight_decay=0.2).weight_decay == 0.2
    assert params().weight_decay == 0.0
    with pytest.raises(ConfigError, match=r"^optimizer\.params\.bias_correction: false needs "):
        params(torch_adam=True, bias_correction=False)
    with pytest.warns(UserWarning, match=r"optimizer\.torch_adam \(DeepSpeed reads torch_adam "
                      r"only inside optimizer\.params\)"):
        ZeroConfig.load({"optimizer": {"type": "AdamW", "torch_adam": True}})


# --------------------------------------------------------------------------------------------
# fp16 loss scale: DeepSpeed's update rules, transcribed from its source.
# --------------------------------------------------------------------------------------------


def deepspeed_scales(overflows, scale, window, min_scale, hysteresis=1, consecutive=False,
                     stage0=False):
    """The loss scale after each step under DeepSpeed's rules (0.19: ZeRO's
    runtime/fp16/loss_scaler.py DynamicLossScaler, stage 0's fused_optimizer.py
    FP16_Optimizer), written as a sequence: the number of clean steps since the last overflow
    (or the start) decides the doubling, which comes when that count, less one, is a positive
    multiple of `window`; at ZeRO stages an overflow first spends the hysteresis budget (refilled
    by a doubling, or by every clean step when `consecutive`), at stage 0 it always halves."""
    out, budget, clean_run = [], hysteresis, 0
    for overflow in overflows:
        if overflow:
            if stage0 or hysteresis == 1 or budget == 1:
                scale = max(scale / 2.0, min_scale)
            else:
                budget -= 1
            clean_run = 0
        else:
            clean_run += 1
            if consecutive and not stage0:
                budget = hysteresis
            if clean_run > 1 and (clean_run - 1) % window == 0:
                scale *= 2.0
                if not stage0:
                    budget = hysteresis
        out.append(scale)
    return out


def _fp16(stage, **fp16):
    return ZeroConfig.load({"zero_optimization": {"stage": stage},
                            "fp16": {"enabled": True, **fp16}})


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("window", [1, 2, 3, 7])
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_loss_scale_follows_deepspeed_step_for_step(stage, window, consecutive, hysteresis):
    rng = random.Random(hash((stage, window, consecutive, hysteresis)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stage 0 names the hysteresis settings it cannot apply
        ours = loss_scaler_for(_fp16(stage, initial_scale_power=12, loss_scale_window=window,
                                     hysteresis=hysteresis, consecutive_hysteresis=consecutive,
                                     min_loss_scale=0.5), rank=0)
    # Runs of clean steps and bursts of overflows; the scale is kept off the minimum (where
    # DeepSpeed's ZeRO scaler raises; tested below) by a budget of overflows.
    overflows, halvings = [], 0
    for i in range(3000):
        overflow = rng.random() < (0.6 if i % 200 < 20 else 0.04) and halvings < 8
        halvings += 1 if overflow else -0.05
        halvings = max(halvings, 0)
        overflows.append(overflow)
    expected = deepspeed_scales(overflows, 2.0**12, window, 0.5, hysteresis, consecutive,
                                stage0=stage == 0)
    for i, overflow in enumerate(overflows):
        ours.update(overflow)
        assert ours.scale == expected[i], (i, overflow)
    assert ours.scale != 2.0**12  # the sequence moved the scale


def test_hysteresis_at_stage_0_is_named_as_without_effect():
    with pytest.warns(UserWarning, match="fp16.hysteresis and fp16.consecutive_hysteresis have no "
                      "effect at stage 0"):
        loss_scaler_for(_fp16(0, hysteresis=4), rank=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_scaler_for(_fp16(0), rank=0)  # DeepSpeed's default: nothing to say
        loss_scaler_for(_fp16(0, hysteresis=4), rank=1)  # rank 0 speaks for all
        loss_scaler_for(_fp16(1, hysteresis=4, consecutive_hysteresis=True), rank=0)


def test_doubling_waits_for_clean_step_window_plus_one():
    # DeepSpeed's stable_interval = cur_iter - last_overflow_iter - 1 (0 on the first clean
    # step after an overflow): window 3 doubles on the 4th clean step, from the start too.
    ours = DynamicLossScaler(scale=256.0, window=3, hysteresis=1)
    scales = []
    for overflow in [False] * 4 + [True] + [False] * 4:
        ours.update(overflow)
        scales.append(ours.scale)
    assert scales == [256, 256, 256, 512, 256, 256, 256, 256, 512]


def test_overflow_at_minimum_scale_raises_as_deepspeed():
    # ZeRO stages: halving needs the hysteresis budget spent; at min_scale it raises.
    scaler = loss_scaler_for(_fp16(2, initial_scale_power=1, hysteresis=2), rank=0)
    scaler.update(True)   # hysteresis 2 -> 1, scale 2
    scaler.update(True)   # halves to 1 (the minimum)
    with pytest.raises(LossScaleAtMinimumError) as info:
        scaler.update(True)
    message = str(info.value)
    assert message.startswith("zero_ext: fp16 gradients overflowed")
    assert "fp16.min_loss_scale = 1" in message and "raise_error_at_min_scale" in message
    assert isinstance(info.value, FloatingPointError)
    # Configurable: false skips with a warning each time (only where warn is set: rank 0).
    quiet = loss_scaler_for(_fp16(2, initial_scale_power=0, hysteresis=1,
                                  raise_error_at_min_scale=False), rank=0)
    with pytest.warns(RuntimeWarning, match="raise_error_at_min_scale is false"):
        quiet.update(True)
    assert quiet.scale == 1.0
    other_rank = loss_scaler_for(_fp16(2, initial_scale_power=0, hysteresis=1,
                                       raise_error_at_min_scale=False), rank=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other_rank.update(True)


def test_static_scale_never_changes():
    scaler = loss_scaler_for(_fp16(1, loss_scale=128), rank=0)
    for overflow in (True, False, True, True):
        scaler.update(overflow)
    assert scaler.scale == 128.0 and not scaler.dynamic


def test_loss_scaler_state_keys_stay_loadable():
    # Checkpoints written before the move keep {scale, clean_steps, hysteresis_left}.
    old = {"scale": 1024.0, "clean_steps": 5, "hysteresis_left": 1}
    scaler = DynamicLossScaler(scale=1.0, window=1000, hysteresis=2)
    scaler.load_state_dict(old)
    assert scaler.state_dict() == old
    from zero_ext.engine import DynamicLossScaler as from_engine
    assert from_engine is DynamicLossScaler


# --------------------------------------------------------------------------------------------
# Clear errors (issue 13, item 12) and keys accepted only where they mean something.
# --------------------------------------------------------------------------------------------


def test_initial_scale_power_out_of_range_is_a_clear_error():
    with pytest.raises(ConfigError) as info:
        ZeroConfig.load({"fp16": {"enabled": True, "initial_scale_power": 2000}})
    assert str(info.value).startswith(
        "fp16.initial_scale_power: expected an integer in 0..127, got 2000 (int): the initial "
        "loss scale 2**initial_scale_power multiplies the fp32 loss")
    assert ZeroConfig.load({"fp16": {"initial_scale_power": 127}}).fp16.initial_loss_scale == \
        2.0**127


def test_config_path_missing_or_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"zero_ext config '.*nope\.json': no such "
                       "file; pass the path of a DeepSpeed JSON config file"):
        ZeroConfig.load(tmp_path / "nope.json")
    with pytest.raises(IsADirectoryError, match=r"zero_ext config '.*' is a directory; pass the "
                       "path of a DeepSpeed JSON config file inside it"):
        ZeroConfig.load(str(tmp_path))
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_clipping": 0.5}))
    assert ZeroConfig.load(tmp_path / "ds.json").gradient_clipping == 0.5


def test_auto_cast_needs_fp16():
    with pytest.raises(ConfigError, match=r"^fp16\.auto_cast: true casts the forward's inputs "
                       "to fp16, but fp16 is not enabled"):
        ZeroConfig.load({"fp16": {"auto_cast": True}})


def test_keys_without_effect_warn_once_when_set_off_their_default():
    performance_only = {"contiguous_gradients": False, "reduce_scatter": False,
                        "allgather_partitions": False, "sub_group_size": 1000,
                        "round_robin_gradients": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = ZeroConfig.load({"zero_optimization": {
            "stage": 2, "elastic_checkpoint": True, **performance_only}})
    assert len(caught) == 1
    text = str(caught[0].message)
    assert text.startswith("zero_ext config: these DeepSpeed keys have no effect in zero_ext")
    for key, value in performance_only.items():
        assert f"zero_optimization.{key} = {json.dumps(value)} (" in text, key
    assert "elastic_checkpoint" not in text  # zero_ext's checkpoints are always elastic
    assert config.zero_optimization.sub_group_size == 1000
    with warnings.catch_warnings():  # DeepSpeed's defaults, written out: nothing to say
        warnings.simplefilter("error")
        ZeroConfig.load({"zero_optimization": {
            "contiguous_gradients": True, "reduce_scatter": True, "allgather_partitions": True,
            "sub_group_size": 1e9, "round_robin_gradients": False}})


def test_keys_without_effect_warn_on_rank_0_only(monkeypatch):
    # Every rank of a job parses the same config: one warning for the job, from rank 0.
    for rank, expected in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ZeroConfig.load({"zero_optimization": {"round_robin_gradients": True}})
        assert len(caught) == expected, rank


def test_nonfinite_policy_from_the_config():
    def policy(**sections):
        return ZeroConfig.load(sections).nonfinite_gradients

    # DeepSpeed's ZeRO optimizers skip (bf16's check_grad_overflow defaults to true there).
    assert policy() == "skip"
    assert policy(bf16={"enabled": True}) == "skip"
    assert policy(bf16={"enabled": True, "check_grad_overflow": True}) == "skip"
    assert policy(bf16={"enabled": True, "check_grad_overflow": False}) == "apply"
    assert policy(fp16={"enabled": True}) == "skip"
    # DeepSpeed reads check_grad_overflow only with bf16 enabled.
    assert policy(bf16={"enabled": False, "check_grad_overflow": False}) == "skip"


# --------------------------------------------------------------------------------------------
# With an engine: one group of two ranks runs every case.
# --------------------------------------------------------------------------------------------


@functools.cache
def _cases():
    return run_group(2, ds_semantics_cases.all_cases)


def test_config_without_gradient_clipping_clips_at_one():
    results = _cases()
    got, ref = results[0]["clipping"], results[0]["clipping"]["reference_clip1"]
    assert max(got["norms"]) > 1.0  # clipping at 1.0 changes these steps
    engine_cases.assert_matches_reference(got, ref, "fp32", "default clipping")
    unclipped = results[0]["clipping"]["reference_clip0"]["params"]
    assert any((got["params"][n] - unclipped[n]).abs().max() > 1e-4 for n in unclipped)
    for result in results:  # steps_per_print unset: no report line, as DeepSpeed
        assert "[zero_ext] step" not in result["clipping"]["stdout"]


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_check_grad_overflow(stage):
    results = _cases()
    for rank, result in enumerate(results):
        absent, skip, apply = (result[("bf16", stage, check)] for check in (None, True, False))
        # Absent (DeepSpeed's default is true) or true: skipped on every rank, counted, weights
        # unchanged, warned on rank 0 (DeepSpeed 0.19.8 skips at stages 0-3 alike).
        for got in (absent, skip):
            assert got["error"] is None and got["unchanged"] and got["finite"], rank
            assert got["skipped"] == 1 and got["global_steps"] == 2
            assert len(got["warnings"]) == (1 if rank == 0 else 0), rank
            if rank == 0:
                assert got["warnings"][0].startswith(
                    "zero_ext: the gradient norm is inf at step 1: the step is skipped on every "
                    "rank, weights and optimizer state unchanged (1 skipped so far)"), got
        # false: applied (the weights are no longer finite), warned on rank 0.
        assert apply["error"] is None and not apply["finite"] and apply["skipped"] == 0
        assert len(apply["warnings"]) == (1 if rank == 0 else 0), rank
        if rank == 0:
            assert "the update is applied (bf16.check_grad_overflow is false)" in \
                apply["warnings"][0]


@pytest.mark.parametrize("case,named", [
    ((1, 1, False, "all"), None),  # every parameter used: no error
    ((1, 1, True, "rank0"), None),
    ((1, 1, False, "rank0"), {"rank 1: b.weight, b.bias"}),
    ((2, 2, False, "first_micro"), None),  # a gradient in one micro-step of the window
    ((3, 1, False, "rank0"), {"rank 1: b.weight, b.bias"}),
    ((0, 2, False, "rank0"), {"rank 1: b.weight, b.bias"}),
], ids=["all-used", "ignored", "stage1", "stage2-window", "stage3", "stage0-acc2"])
def test_ignore_unused_parameters_false_raises_on_every_rank(case, named):
    results = _cases()
    for rank, result in enumerate(results):
        got = result[("unused",) + case]
        if named is None:
            assert got["error"] is None and got["global_steps"] == 2, (rank, got)
            continue
        error = got["error"]
        assert error.startswith("zero_ext: trainable parameters got no gradient in this "
                                "accumulation window ("), (rank, error)
        for text in named:
            assert text in error, (rank, error)
        assert "rank 0:" not in error and "ignore_unused_parameters is false" in error
        assert got["global_steps"] == 0


@pytest.mark.parametrize("stage", [0, 1])
def test_fp16_overflow_at_minimum_scale_raises_on_every_rank(stage):
    results = _cases()
    for rank, result in enumerate(results):
        raised = result[("min_scale", stage, True)]
        warned = result[("min_scale", stage, False)]
        if stage == 0:  # DeepSpeed's stage-0 rule: every overflow halves (no hysteresis)
            assert raised["scales"] == [1.0] and raised["error"][0] == 1, rank
            assert warned["scales"] == [1.0] * 5 and warned["skipped"] == 5
            assert warned["warnings"] == (4 if rank == 0 else 0)
        else:  # hysteresis 2: the first overflow only spends it
            assert raised["scales"] == [2.0, 1.0] and raised["error"][0] == 2, rank
            assert warned["scales"] == [2.0, 1.0, 1.0, 1.0, 1.0] and warned["skipped"] == 5
            assert warned["warnings"] == (3 if rank == 0 else 0)
        assert raised["error"][1].startswith("zero_ext: fp16 gradients overflowed")
        assert warned["error"] is None


def test_fp16_auto_cast_casts_positional_inputs():
    for result in _cases():
        cast, plain = result[("auto_cast", True)], result[("auto_cast", False)]
        assert cast["error"] is None
        # As DeepSpeed's _cast_inputs_half: positional floating tensors, nested too; integer
        # tensors and keyword arguments as they were.
        assert cast["seen"] == {"x": "torch.float16", "nested_list": "torch.float16",
                                "nested_int": "torch.int64", "extra": "torch.float32"}
        assert plain["error"] is not None  # fp32 input, fp16 weights: torch refuses


def test_deepspeed_compat_doc_names_every_key_reading_here():
    # Every key this file tests is listed in docs/deepspeed-compat.md.
    path = pathlib.Path(zero_ext.__file__).parent.parent / "docs" / "deepspeed-compat.md"
    doc = path.read_text()
    for key in ("gradient_clipping", "check_grad_overflow", "ignore_unused_parameters",
                "raise_error_at_min_scale", "auto_cast", "torch_adam", "pin_memory",
                "loss_scale_window", "enable_sanity_checks", "sub_group_size",
                "contiguous_gradients", "reduce_scatter", "allgather_partitions",
                "round_robin_gradients", "elastic_checkpoint", "steps_per_print",
                "weight_decay"):
        assert f"`{key}" in doc or f".{key}`" in doc, key
