"""Stage 3 trains a mixture of experts whose routing differs between ranks (cases in
tests/moe_cases.py, one process group per world size): with its blocks marked as leaf modules
it equals single-process torch AdamW, every rank issuing the same collectives, and each block
is released once its own backward is over."""

from __future__ import annotations

import functools

import moe_cases
import pytest
from torch.testing import assert_close

from dist_harness import run_group

WORLD_SIZES = [2, 3]


@functools.cache
def _run(world_size: int):
    return run_group(world_size, moe_cases.moe_cases)


def _close(got: dict, want: dict, what: str, atol: float = 1e-5) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        assert_close(got[name].float(), value.float(), rtol=1e-5, atol=atol,
                     msg=f"{what}: {name}")


CASES = ["config_0", "config_40", "marked_zero_ext", "marked_deepspeed", "by_name",
         "checkpoint_reentrant", "checkpoint_non_reentrant"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES)
def test_experts_routed_differently_per_rank_train_as_single_process(world_size, case):
    results = _run(world_size)
    if case not in results[0]:
        pytest.skip("DeepSpeed is not installed")  # marked_deepspeed only
    trained = results[0][case]
    _close(trained["got"], results[0]["reference"], f"{world_size} ranks, {case}")
    # The routing really differed: in some forward an expert ran on some ranks only.
    per_rank = trained["routed"]
    assert any(
        0 < sum(per_rank[r][block][forward][expert] > 0 for r in range(world_size)) < world_size
        for block in range(3) for forward in range(len(per_rank[0][block]))
        for expert in range(moe_cases.EXPERTS)), per_rank
    # One unit per block, each holding its leaf, plus the embedding and the head.
    assert trained["units"] == 5 and trained["leaves"] == [False, True, True, True, False]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_each_block_is_released_once_its_backward_is_over(world_size):
    """When backward reaches the embedding's output only the embedding's unit and the first
    block's (whose backward ends with that gradient) are gathered. Before, a block whose
    expert got no gradient on a rank waited for the end of backward, and every block after it
    in backward order with it: the whole model gathered at once."""
    for rank, result in enumerate(_run(world_size)):
        for case in CASES:
            if case in result and case != "checkpoint_reentrant":
                gathered = result[case]["gathered"]
                assert gathered == [2] * moe_cases.STEPS, (rank, case, gathered)
            if case in result:
                assert result[case]["left"] == 0, (rank, case)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", ["strict", "strict_whole", "frozen", "twice", "borrowing"])
def test_unused_experts_frozen_experts_a_block_run_twice_and_borrowed_weights(world_size, case):
    """ignore_unused_parameters false counts an expert without a token as zero, as DeepSpeed
    does, partitioned or kept whole; frozen expert weights with trained biases kept whole; the
    first block run twice, once on inputs that need no gradient (its backward then ends with
    backward's end: its second run's inputs get their gradients before its first run's
    backward); experts using the head's weight, declared on an expert."""
    results = _run(world_size)
    want = results[0][{"strict": "reference", "strict_whole": "reference"}.get(
        case, f"reference_{case}")]
    # Borrowing: an element of an expert's weight whose gradient is near zero moves by up to
    # 3e-5 at 3 ranks (Adam normalizes its rounding); a gradient lost or wrong moves whole
    # weights by about the learning rate, 1e-2.
    _close(results[0][case]["got"], want, f"{world_size} ranks, {case}",
           atol=1e-4 if case == "borrowing" else 1e-5)
    if case == "frozen":
        for rank, result in enumerate(results):
            gathered = result[case]["gathered"]
            assert gathered == [2] * moe_cases.STEPS, (rank, gathered)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_another_units_weight_used_in_a_leaf_undeclared_is_refused(world_size):
    """Gathered where an expert runs, on some ranks only, it would pair collectives wrongly."""
    for result in _run(world_size):
        assert "used inside the leaf module MoE without a declaration" in result["undeclared"]
        assert "register_external_parameter(leaf_module, param)" in result["undeclared"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_second_gradient_after_its_bucket_was_reduced_is_refused(world_size):
    for result in _run(world_size):
        message = result["twice_reentrant"]
        assert message is not None and "got a second gradient in this backward" in message
        assert "use_reentrant=False" in message


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_accumulated_micro_steps_train_as_the_whole_batch(world_size):
    result = _run(world_size)[0]
    _close(result["accumulated"]["got"], result["reference_accumulated"],
           f"{world_size} ranks, 2 micro-steps")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_transformers_mixtral_trains_with_deepspeeds_default_leaf_class(world_size):
    """transformers 5's Mixtral keeps its experts in 3-D weights that get a gradient whenever
    any expert runs: its decoder layers train as units either way; this checks that DeepSpeed's
    default classes mark them, and that they then train as single-process torch."""
    mixtral = _run(world_size)[0]["mixtral"]
    _close(mixtral["got"], mixtral["reference"], f"{world_size} ranks, Mixtral")
    assert sorted(mixtral["leaves"]) == ["model.layers.0", "model.layers.1"], mixtral["leaves"]
