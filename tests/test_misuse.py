"""Misuse that used to train silently wrong now fails loudly, on every rank, before anything
changes; and the initialize() patterns DeepSpeed users write train as plain PyTorch does.

The cases run in one two-rank group (tests/misuse_cases.py); each test reads its part.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import misuse_cases
from dist_harness import run_group


@functools.cache
def _world2():
    return run_group(2, misuse_cases.world2)


def _assert_unchanged(saved: dict, after: dict, label: str) -> None:
    assert saved.keys() == after.keys(), label
    for name, value in saved.items():
        assert torch.equal(after[name], value), (label, name)


@pytest.mark.parametrize("stage", [2, 3])
def test_nan_batch_with_offload_is_skipped_before_any_weight_or_state_changes(stage):
    for rank, result in enumerate(_world2()):
        got = result["offload_nan"][stage]
        assert got["host_stepped"] > 0
        if stage == 3:
            assert got["deferrable"] > 0  # the units step behind the next forward
        assert got["error"] == "no error" and got["skipped"] == 1, got["error"]
        # Masters, moments, step counts and the model's weights: bitwise as before the step.
        _assert_unchanged(got["saved"], got["after"], f"rank {rank}")


@pytest.mark.parametrize("stage", [2, 3])
def test_forward_between_backward_and_step_sees_the_old_weights_with_offload(stage):
    for rank, result in enumerate(_world2()):
        got = result["offload_nan"][stage]
        assert torch.equal(got["between"], got["before"]), rank


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_backwards_before_one_step_are_refused_on_every_rank(stage):
    for rank, result in enumerate(_world2()):
        got = result["backward_twice"][stage]
        assert got["error"].startswith("RuntimeError: zero_ext: the engine expects exactly "
                                       "one engine.backward() before each engine.step()"), \
            got["error"]
        assert "rank 0: 2, rank 1: 2" in got["error"]
        assert "gradient_accumulation_steps" in got["error"]
        assert got["global_steps"] == 1
        _assert_unchanged(got["saved"], got["after"], f"rank {rank}")


@pytest.mark.parametrize("stage", [0, 2])
def test_pytorch_style_accumulation_loop_is_refused_instead_of_never_stepping(stage):
    for rank, result in enumerate(_world2()):
        got = result["pytorch_style"][stage]
        assert "expects exactly one engine.backward()" in got["error"], got["error"]
        # Between boundaries there is no collective: each rank names itself.
        assert f"calls since the last step(): rank {rank}: 2)" in got["error"]
        assert got["global_steps"] == 0
        assert "set gradient_accumulation_steps to k" in got["error"]


def test_stage0_a_rank_that_skipped_step_is_named_on_every_rank():
    for rank, result in enumerate(_world2()):
        got = result["skipped_step"][0]
        # Rank 0 stepped at step 1, rank 1 skipped it: at the next step the ranks disagree.
        last = got["errors"][-1]
        assert last.startswith("RuntimeError: zero_ext: the ranks are at different optimizer "
                               "steps (rank 0: step 2 after 1 backward(), rank 1: step 1 after "
                               "2 backward())"), (rank, last)
        assert "skipped or repeated engine.step()" in last
        assert got["global_steps"] == (2 if rank == 0 else 1)
        assert got["errors"][0] == "no error"


def test_a_dict_passed_to_backward_says_to_pass_the_loss():
    message = _world2()[0]["dict_loss"]
    assert message.startswith("TypeError: zero_ext: engine.backward expects the loss tensor, "
                              "got dict"), message
    assert 'outputs["loss"]' in message and "outputs.loss" in message


@pytest.mark.parametrize("dtype", ["fp64", "fp16"])
def test_a_layer_of_another_dtype_in_an_fp32_model_is_refused_by_name(dtype):
    message = _world2()[0]["wrong_dtype"][dtype]
    assert message.startswith("ValueError: zero_ext.initialize: "), message
    assert "head.weight" in message and "head.bias" in message and "body" not in message
    assert "model.float()" in message and "bf16" in message


def test_a_meta_model_below_stage_3_is_not_said_to_be_built_under_init():
    message = _world2()[0]["meta_stage2"]
    assert message.startswith("ValueError: zero_ext.initialize: "), message
    assert "meta device" in message and "weight" in message
    assert "zero_ext.Init" in message and "stage 3" in message


def _assert_trains_as(got: dict, reference: dict, label: str) -> None:
    for name, value in reference["params"].items():
        assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6, msg=f"{label} {name}")


def test_callable_optimizer_is_called_with_the_model_parameters():
    results = _world2()
    reference = results[0]["reference"]
    for rank, result in enumerate(results):
        _assert_trains_as(result["callable_optimizer"], reference, f"rank {rank}")


@pytest.mark.parametrize("schedule", ["transformers", "lambda"])
def test_client_scheduler_on_the_client_optimizer_drives_the_engines_lr(schedule):
    results = _world2()
    reference = results[0]["client_schedules"][schedule]["reference"]
    for rank, result in enumerate(results):
        got = result["client_schedules"][schedule]
        assert got["returned_is_engines"]
        assert got["lrs"] == pytest.approx(reference["lrs"]), rank
        _assert_trains_as(got, reference, f"rank {rank}")


def test_optimizer_with_model_parameters_trains_the_optimizers_groups():
    results = _world2()
    reference = results[0]["reference"]
    for rank, result in enumerate(results):
        _assert_trains_as(result["optimizer_with_model_parameters"], reference, f"rank {rank}")


def test_a_trainable_parameter_in_no_group_stays_fixed_with_one_warning():
    results = _world2()
    reference = results[0]["parameter_in_no_group"]["reference"]
    for rank, result in enumerate(results):
        got = result["parameter_in_no_group"]
        assert torch.equal(got["params"]["fc2.bias"], got["initial"]), rank
        _assert_trains_as(got, reference, f"rank {rank}")
        assert len(got["warnings"]) == (1 if rank == 0 else 0), got["warnings"]
    assert "not optimized" in results[0]["parameter_in_no_group"]["warnings"][0]


def test_engine_forwards_unknown_attributes_to_the_module():
    for result in _world2():
        got = result["forwarded_attributes"]
        assert got["flag"] == 7 and got["submodule_is"] and got["own_config"]
        assert got["missing"].startswith("AttributeError: "), got["missing"]
        assert "no_such_attribute" in got["missing"] and "TinyNet" in got["missing"]


EXIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_cases.py")


@pytest.mark.parametrize("scenario, expected",
                         [("train", 0), ("raise", 1), ("mixed", 1), ("destroyed", 0)])
def test_no_rank_ends_in_sigabrt_at_exit(scenario, expected):
    # Two two-rank jobs per scenario (a few seconds each; "destroyed" makes its race certain):
    # every rank leaves through the interpreter's normal exit with its script's own exit code,
    # never SIGABRT (-6) from a thread outliving the process group, and never a hang.
    run = subprocess.run([sys.executable, EXIT_SCRIPT, scenario, "2"], capture_output=True,
                         text=True, timeout=600, check=True)
    exits = json.loads(run.stdout.strip().splitlines()[-1])["exits"]
    assert exits == [[expected, expected]] * 2, exits
