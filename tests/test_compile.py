"""engine.compile(): the user's model torch.compile'd in place (DeepSpeed's engine.compile),
trained at stages 0-3 over 2 ranks against the same run eager and the single-process reference
(tests/compile_cases.py)."""

import functools

import pytest
import torch

import compile_cases
from dist_harness import run_group
from engine_cases import assert_matches_reference


@functools.cache
def _results():
    return run_group(2, compile_cases.cases, timeout=600)


@pytest.mark.parametrize("case", compile_cases.CASES, ids=lambda c: "-".join(map(str, c)))
def test_compiled_model_trains_as_eager(case):
    _, dtype, backend = case
    for rank, result in enumerate(_results()):
        got = result[case]
        for name, value in got["eager"]["params"].items():
            compiled = got["compiled"]["params"][name]
            if backend == "aot_eager" and dtype == "fp32":
                # The same kernels in the same order: the same values.
                torch.testing.assert_close(compiled, value, rtol=0, atol=0,
                                           msg=f"rank {rank} {name}")
        assert got["compiled"]["global_steps"] == compile_cases.STEPS
        # Stage 3's hooks run eagerly between the compiled pieces: the units run in the same
        # order every step and prefetch stays on (seen failing with Dynamo tracing the hooks).
        assert got["compiled"]["prefetching"] and got["eager"]["prefetching"]
        assert_matches_reference(got["compiled"], _results()[0][case]["reference"], dtype,
                                 f"rank {rank} {case}")


def test_compile_calls_as_deepspeed_scripts_make_them():
    calls = _results()[0]["calls"]
    assert calls["before"] is False and calls["after_refusals"] is False
    assert calls["schedule"].startswith("zero_ext: engine.compile(schedule=...) is DeepCompile")
    assert calls["compiled_autograd"].startswith(
        "zero_ext: engine.compile(compiled_autograd_enabled=True) is not supported")
    assert calls["warnings"] == [("zero_ext: engine.compile: the `backend` in compile_kwargs "
                                  "is overridden by the backend argument")]
    assert calls["after"] is True and calls["module_is_model"] and calls["compiled_call"]


@pytest.mark.parametrize("case", compile_cases.CHECKPOINTED, ids=["on-device", "cpu_checkpointing"])
def test_checkpointed_segments_under_compile(case):
    """zero_ext.checkpointing inside a compiled model: the same training, and with
    cpu_checkpointing the same inputs moved to the host (that segment runs as Python: Dynamo
    does not follow the saved-tensor hooks; tracing them left half-built objects behind)."""
    stage, cpu = case
    for rank, result in enumerate(_results()):
        eager, compiled = result[("checkpointed", stage, cpu)].values()
        for name, value in eager["params"].items():
            torch.testing.assert_close(compiled["params"][name], value, rtol=0, atol=0,
                                       msg=f"rank {rank} {name}")
        assert compiled["segments"] == eager["segments"] == 3 * compile_cases.STEPS
        assert compiled["bytes_to_host"] == eager["bytes_to_host"]
        assert (eager["bytes_to_host"] > 0) == cpu
        assert compiled["unraisable"] == eager["unraisable"] == []


def test_a_model_deeper_than_dynamos_recompile_limit_stays_compiled():
    """Stage 3's gathers split the graph at every block; a hook per module that Dynamo traced
    (bucket first use) made each block its own compiled entry, and past the default recompile
    limit (8 entries) every block ran uncompiled from the second step on, without an error.
    The compiled graphs each step runs are the same under the default limit as under 64."""
    for rank, result in enumerate(_results()):
        default, raised = result["deep"][8], result["deep"][64]
        assert default[1:] == raised[1:] and raised[-1] >= 12, (rank, default, raised)


def test_a_model_passed_in_compiled_is_split_into_the_units_of_the_model_it_wraps():
    """torch.compile(model) given to initialize at stage 3: the same units as the model itself
    (the wrapper's one child, the whole model, had become one unit holding the embedding and
    head through the entire forward)."""
    units = _results()[0]["units"]
    assert units[True] == units[False] and len(units[False]) == 5, units
