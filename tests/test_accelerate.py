"""zero_ext.integrations.accelerate: an accelerate loop on a zero_ext engine.

Two launches of tests/accelerate_script.py, both 2 CPU ranks: torchrun runs the same loop with
plain accelerate (DDP, the reference) and with zero_ext's Accelerator at stages 1-3, a
save_state / load_state resume, the config-optimizer path, save_model, TensorBoard logging, a
tiny GPT-2 at stage 3 (zero3_init_flag, zero_ext.Init, save/load pre-hooks) and the misuse
errors; `accelerate launch --multi_gpu` runs the stage-2 loop with its config from
ZERO_EXT_CONFIG. The distributed tests read their JSON results; the config's resolution and
"auto" filling are checked in this process (no Accelerator is created here).
"""

import functools
import glob
import json
import math
import os
import sys

import pytest
import torch

from launch import free_port, launch, torchrun

pytest.importorskip("accelerate", reason="the accelerate integration needs accelerate")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "accelerate_script.py")
STAGES = (1, 2, 3)
STEPS, WINDOWS_PER_EPOCH = 12, 6  # 11 micro-batches per rank and epoch: the 6th window is short


@functools.cache
def _runs(out: str):
    torchrun([SCRIPT, out], timeout=240)
    config = os.path.join(out, "ds.json")
    with open(config, "w") as f:  # the stage-2 config of the torchrun runs
        json.dump({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}, f)
    launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes=2", "--num_machines=1", "--mixed_precision=no",
            "--dynamo_backend=no", f"--main_process_port={free_port()}", SCRIPT, out,
            "--env-config"], timeout=180, env={"ZERO_EXT_CONFIG": config})
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "results_env.json")) as f:
        results["env"] = json.load(f)
    return results, torch.load(os.path.join(out, "weights.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("accelerate"))
    results, weights = _runs(out)
    return out, results, weights


def _close(actual, expected, **tol):
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), **tol)


@pytest.mark.parametrize("stage", STAGES)
def test_the_loop_matches_plain_accelerate(runs, stage):
    _, results, _ = runs
    zero, plain = results[f"zero{stage}"], results["plain"]
    assert results[f"zero{stage}_prepared"][:2] == ["ZeroEngine", stage]
    assert len(zero["grad_norms"]) == STEPS  # every window stepped, the short ones too
    _close(zero["losses"], plain["losses"], rtol=1e-5, atol=1e-6)
    _close(zero["grad_norms"], plain["grad_norms"], rtol=1e-5, atol=0)
    _close(zero["lrs"], plain["lrs"], rtol=1e-12, atol=0)  # the loop's LambdaLR, stepped by it
    assert plain["lrs"][:4] == pytest.approx([0.02 / 6 * k for k in (1, 3, 5, 6)])
    assert zero["losses"][-2:] < zero["losses"][:2]
    assert len(zero["eval"]) == 10  # gather_for_metrics, a loader prepared after the model
    _close(zero["eval"], plain["eval"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_final_weights_match_plain_accelerate(runs, stage):
    _, results, weights = runs
    # get_state_dict: at stage 3 the main process only (one host copy), else every rank
    assert results[f"zero{stage}_weights_on"] == ([0] if stage == 3 else [0, 1])
    assert weights[f"zero{stage}"].keys() == weights["plain"].keys()
    for name, value in weights["plain"].items():
        torch.testing.assert_close(weights[f"zero{stage}"][name], value, rtol=1e-5, atol=1e-6)


def test_a_torch_rmsprop_runs_on_the_shards_as_under_plain_accelerate(runs):
    _, results, weights = runs
    zero, plain = results["zero3_rmsprop"], results["plain_rmsprop"]
    _close(zero["losses"], plain["losses"], rtol=1e-5, atol=1e-6)
    _close(zero["grad_norms"], plain["grad_norms"], rtol=1e-5, atol=0)
    assert zero["losses"] != results["zero3"]["losses"]  # not the AdamW run
    for name, value in weights["plain_rmsprop"].items():
        torch.testing.assert_close(weights["zero3_rmsprop"][name], value, rtol=1e-5, atol=1e-6)


def test_dynamo_backend_compiles_the_model_through_the_engine(runs):
    """Accelerator(dynamo_backend=...): engine.compile, as accelerate does for DeepSpeed (before,
    the backend was dropped without a word)."""
    _, results, _ = runs
    assert results["zero3_compiled_is_compiled"] is True
    for key in ("losses", "grad_norms"):
        _close(results["zero3_compiled"][key], results["zero3"][key], rtol=0, atol=0)


def test_unwrap_model_is_the_users_module(runs):
    _, results, _ = runs
    assert all(results[f"zero{s}_prepared"][2] == "Sequential" for s in STAGES)


def test_save_model_writes_the_full_weights(runs):
    from safetensors.torch import load_file

    out, _, weights = runs
    saved = load_file(os.path.join(out, "zero3_saved", "model.safetensors"))
    assert saved.keys() == weights["zero3"].keys()
    for name, value in weights["zero3"].items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)


def test_load_state_continues_the_uninterrupted_run(runs):
    """Stopped with save_state 4 micro-batches into epoch 2 (mid-window), resumed from other
    initial weights by a new Accelerator: the same losses, norms, rates and final weights."""
    _, results, weights = runs
    whole, stopped, resumed = (results[k] for k in ("zero2", "zero2_stopped", "zero2_resumed"))
    cut = len(stopped["losses"])
    assert cut == 2 * (11 + 4)
    assert stopped["losses"] == whole["losses"][:cut]
    _close(resumed["losses"], whole["losses"][cut:], rtol=0, atol=0)
    steps = len(stopped["grad_norms"])
    _close(resumed["grad_norms"], whole["grad_norms"][steps:], rtol=0, atol=0)
    _close(resumed["lrs"], whole["lrs"][steps:], rtol=0, atol=0)
    for name, value in weights["zero2"].items():
        torch.testing.assert_close(weights["zero2_resumed"][name], value, rtol=0, atol=0)


def test_config_optimizer_with_dummy_optim_matches_the_same_adamw(runs):
    _, results, weights = runs
    zero, plain = results["zero2_config_optimizer"], results["plain_config_optimizer"]
    assert zero["lrs"] == [0.02] * STEPS  # "auto" lr filled from DummyOptim(lr=...)
    _close(zero["losses"], plain["losses"], rtol=1e-5, atol=1e-6)
    for name, value in weights["plain_config_optimizer"].items():
        torch.testing.assert_close(weights["zero2_config_optimizer"][name], value, rtol=1e-5,
                                   atol=1e-6)


def test_fp16_skipped_steps_leave_the_loops_schedule(runs):
    """accelerate's scheduler wrapper does not step after a step the engine skipped on
    overflow (step_was_skipped); otherwise it steps num_processes (2) times per step."""
    _, results, _ = runs
    run = results["zero2_fp16"]
    assert run["skipped"][0] and not all(run["skipped"])
    taken = 0
    for skipped, lr in zip(run["skipped"], run["lrs"]):
        assert lr == pytest.approx(0.02 * min(1.0, (2 * taken + 1) / 6))
        taken += not skipped
    assert torch.isfinite(torch.tensor(run["losses"])).all()


def test_engine_figures_reach_the_trackers(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results, _ = runs
    (events,) = glob.glob(os.path.join(out, "zero3_logs", "run", "events.out.tfevents.*"))
    reader = EventAccumulator(events)
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    assert {"train/loss", "zero_ext/samples_per_s", "zero_ext/peak_memory_gib",
            "zero_ext/peak_memory_gib_rank0", "zero_ext/peak_memory_gib_rank1",
            "zero_ext/skipped_steps", "zero_ext/grad_norm"} <= tags
    rates = reader.Scalars("zero_ext/samples_per_s")
    assert [e.step for e in rates] == list(range(1, STEPS + 1))
    assert all(e.value > 0 for e in rates)
    norms = [e.value for e in reader.Scalars("zero_ext/grad_norm")]
    _close(norms, results["zero3"]["grad_norms"], rtol=1e-6, atol=0)


def test_accelerate_launch_with_the_config_in_the_environment(runs):
    _, results, _ = runs
    env = results["env"]
    assert env["prepared"] == ["ZeroEngine", 2]
    assert env["losses"] == results["zero2"]["losses"]
    assert env["grad_norms"] == results["zero2"]["grad_norms"]


def test_save_state_hooks_get_the_models_as_under_deepspeed(runs):
    """register_save_state_pre_hook's hooks get the prepared models list (the engine: its
    unwrap_model is the transformers model, whose save_pretrained writes get_state_dict's
    weights) and `weights` empty, as on accelerate's DeepSpeed path ([DeepSpeedEngine], 0);
    they got no models. accelerate writes no weights file of its own beside the engine
    checkpoint. Load pre-hooks get no models, as under DeepSpeed (the engine loads itself)."""
    _, results, _ = runs
    case = results["transformers"]
    if case is None:
        pytest.skip("transformers is not installed")
    assert case["hooks"]["save"] == [["ZeroEngine"], 0]
    assert case["hooks"].get("unwrapped") == "GPT2LMHeadModel"
    assert case["hooks"]["load"] == []
    assert {"hf", "latest", "pytorch_model"} <= set(case["files"])
    assert not {"model.safetensors", "pytorch_model.bin"} & set(case["files"])
    assert case["reloaded_names"] is True  # from_pretrained of the hook's folder
    assert case["reloaded_error"] == 0


def test_zero3_init_flag_is_said_when_transformers_built_the_model_whole(runs):
    """DeepSpeedPlugin's zero3_init_flag (on by default at stage 3) makes transformers build
    under deepspeed.zero.Init; zero_ext does not take that path, so prepare() of a
    transformers model built outside zero_ext.Init says so once (it was silently ignored),
    and one built under zero_ext.Init(config=...) is partitioned on every rank as built,
    with nothing said, and trains."""
    _, results, _ = runs
    case = results["transformers"]
    if case is None:
        pytest.skip("transformers is not installed")
    assert case["flag"] is True
    (message,) = case["said_plain"]
    assert message.startswith("zero_ext.integrations.accelerate.Accelerator: accelerate's "
                              "zero3_init_flag")
    assert "transformers built this GPT2LMHeadModel whole on every rank" in message
    assert "`with zero_ext.Init(config=...):`" in message and "load_weights" in message
    assert case["built_partitioned"] == [True, True]
    assert case["said_init"] == []
    assert len(case["losses"]) == 2 and all(math.isfinite(v) for v in case["losses"])


@pytest.mark.parametrize("case, fragment", [
    ("two_configs", "two configs were given (zero_config= and deepspeed_plugin=)"),
    ("no_config", "no zero_ext config"),
    ("clip_mismatch", "clip_grad_norm_(max_norm=1.0, norm_type=2), but the engine clips"),
    ("optimizer_twice", "has an \"optimizer\" section and the code passes an optimizer"),
])
def test_misuse_is_one_clear_error(runs, case, fragment):
    _, results, _ = runs
    message = results["errors"][case]
    assert message.startswith("ValueError: zero_ext.integrations.accelerate.Accelerator: ")
    assert fragment in message


# -- the config, in this process ----------------------------------------------------------------
HF_DOCS_CONFIG = {  # the shape of the Hugging Face DeepSpeed docs' ZeRO-3 config
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
        "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}


def test_auto_values_are_filled_as_accelerate_fills_them_for_deepspeed():
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.deepspeed import DummyOptim, DummyScheduler

    from zero_ext.config import ZeroConfig
    from zero_ext.integrations._accelerate_config import (
        complete_config,
        config_accumulation,
        micro_batch_size,
    )

    plugin = DeepSpeedPlugin(hf_ds_config=HF_DOCS_CONFIG)
    model = torch.nn.Linear(4, 4)
    model.config = type("Config", (), {"hidden_size": 32})()
    optimizer = DummyOptim(model.parameters(), lr=3e-4, weight_decay=0.1)
    scheduler = DummyScheduler(optimizer, total_num_steps=101, warmup_num_steps=10)
    loader = torch.utils.data.DataLoader(range(10), batch_size=3)
    assert config_accumulation(plugin, 4) == 4
    micro = micro_batch_size(plugin, [loader], split_batches=False, num_processes=2)
    config = complete_config(plugin, model, optimizer, scheduler, accumulation=4,
                             micro_batch=micro, num_processes=2, split_batches=False)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (3, 4, 3 * 4 * 2, 1.0)
    assert config["optimizer"]["params"] == {"lr": 3e-4, "weight_decay": 0.1}
    assert config["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 3e-4,
                                             "warmup_num_steps": 10, "total_num_steps": 51}
    zero = config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (32 * 32, int(0.9 * 32 * 32), 320)
    assert "steps_per_print" not in config  # accelerate's inf ("never") is the engine's default
    ZeroConfig.load(config)  # the engine takes it as it is


def test_explicit_values_stay_and_an_unfillable_auto_is_named():
    from accelerate.utils import DeepSpeedPlugin

    from zero_ext.integrations._accelerate_config import complete_config

    plugin = DeepSpeedPlugin(hf_ds_config={"train_micro_batch_size_per_gpu": 5,
                                           "gradient_clipping": 0.3,
                                           "zero_optimization": {"stage": 2}})
    config = complete_config(plugin, torch.nn.Linear(2, 2), None, None, accumulation=1,
                             micro_batch=5, num_processes=2, split_batches=False)
    assert (config["gradient_clipping"], config["train_micro_batch_size_per_gpu"]) == (0.3, 5)
    assert "train_batch_size" not in config  # absent stays absent: the engine derives it
    # DeepSpeed's own "auto" (keep the model's listed buffers in fp32) is a value, kept
    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2},
                                           "data_types": {"keep_in_fp32_modules": "auto"}})
    config = complete_config(plugin, torch.nn.Linear(2, 2), None, None, accumulation=1,
                             micro_batch=5, num_processes=2, split_batches=False)
    assert config["data_types"] == {"keep_in_fp32_modules": "auto"}, config
    plugin = DeepSpeedPlugin(hf_ds_config={"optimizer": {"type": "AdamW", "params": {
        "betas": "auto"}}, "zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match=r"^zero_ext.integrations.accelerate.Accelerator: the "
                                         r"config has an \"auto\" value .*optimizer.params.betas"):
        complete_config(plugin, torch.nn.Linear(2, 2), None, None, accumulation=1,
                        micro_batch=2, num_processes=1, split_batches=False)


def test_the_config_comes_from_exactly_one_place(tmp_path, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    from zero_ext.integrations._accelerate_config import resolve_plugin

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    monkeypatch.delenv("ZERO_EXT_CONFIG", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(ValueError, match="no zero_ext config; pass deepspeed_plugin="):
        resolve_plugin(None, None)
    assert resolve_plugin(str(path), None).deepspeed_config["zero_optimization"] == {"stage": 1}
    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3}})
    assert resolve_plugin(None, {"only": plugin}) is plugin
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # `accelerate launch --use_deepspeed`
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    assert resolve_plugin(None, None).deepspeed_config["zero_optimization"] == {"stage": 1}
    assert resolve_plugin(None, plugin) is plugin  # an explicit plugin wins, as in accelerate
    monkeypatch.setenv("ZERO_EXT_CONFIG", str(path))
    assert resolve_plugin(None, None).deepspeed_config["zero_optimization"] == {"stage": 1}
    with pytest.raises(ValueError, match=r"two configs were given \(deepspeed_plugin= and "
                                         r"ZERO_EXT_CONFIG="):
        resolve_plugin(None, plugin)
