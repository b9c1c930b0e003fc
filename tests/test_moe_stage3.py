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


def _close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        assert_close(got[name].float(), value.float(), rtol=1e-5, atol=1e-5,
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
            if case in result and "reentrant" not in case:
                gathered = result[case]["gathered"]
                assert gathered == [2] * moe_cases.STEPS, (rank, case, gathered)
            if case in result:
                assert result[case]["left"] == 0, (rank, case)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", ["strict", "frozen", "twice"])
def test_unused_experts_frozen_experts_and_a_block_run_twice(world_size, case):
    """ignore_unused_parameters false counts an expert without a token as zero, as DeepSpeed
    does; frozen expert weights with trained biases kept whole; the first block run twice, once
    on inputs that need no gradient (its backward then ends with backward's end: its second
    run's inputs get their gradients before its first run's backward)."""
    results = _run(world_size)
    want = results[0][{"strict": "reference"}.get(case, f"reference_{case}")]
    _close(results[0][case]["got"], want, f"{world_size} ranks, {case}")
    if case == "frozen":
        for rank, result in enumerate(results):
            gathered = result[case]["gathered"]
            assert gathered == [2] * moe_cases.STEPS, (rank, gathered)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_accumulated_micro_steps_train_as_the_whole_batch(world_size):
    result = _run(world_size)[0]
    _close(result["accumulated"]["got"], result["reference_accumulated"],
           f"{world_size} ranks, 2 micro-steps")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_transformers_mixtral_trains_with_deepspeeds_default_leaf_class(world_size):
    mixtral = _run(world_size)[0]["mixtral"]
    _close(mixtral["got"], mixtral["reference"], f"{world_size} ranks, Mixtral")
    assert sorted(mixtral["leaves"]) == ["model.layers.0", "model.layers.1"], mixtral["leaves"]
