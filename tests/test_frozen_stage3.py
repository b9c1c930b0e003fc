"""Stage 3 partitions frozen parameters (a LoRA fine-tune's base model) as DeepSpeed does:
training equals single-process torch AdamW, each rank holds 1/N of the frozen weights, units
are released in backward once their inputs' gradients are computed, and checkpoints carry the
frozen shards to another world size. Cases in tests/frozen_cases.py: one group of 3 ranks
(saves), then one of 2 (loads what the 3 saved)."""

from __future__ import annotations

import functools
import os
import tempfile

import frozen_cases
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from dist_harness import run_group

_DIR = tempfile.mkdtemp(prefix="zero_ext_frozen_")


@functools.cache
def _run(world_size: int):
    if world_size == 3:
        return run_group(3, frozen_cases.frozen_cases, _DIR)
    _run(3)  # saves the checkpoint the 2 ranks load
    return run_group(2, frozen_cases.frozen_cases, None, _DIR, 3)


def _close(got: dict, want: dict, what: str) -> None:
    for name, value in want.items():
        assert_close(got[name].float(), value.float(), rtol=1e-5, atol=1e-6,
                     msg=f"{what}: {name}")


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("checkpoint", [None, "reentrant", "non_reentrant"])
def test_lora_trains_as_single_process_with_the_base_partitioned(world_size, checkpoint):
    result = _run(world_size)[0]
    trained = result[f"trained_{checkpoint}"]
    _close(trained["got"], result["reference"], f"{world_size} ranks, {checkpoint}")
    # Backward reaching the embedding: every block's unit was released on the way, the
    # entirely frozen block included (no gradient of its own tells when its backward ends).
    assert trained["seen"] and max(trained["seen"]) == 0, trained["seen"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_nothing_stays_gathered_after_backward_or_step(world_size):
    for rank, result in enumerate(_run(world_size)):
        left = result["trained_None"]["left"] if rank == 0 else result["left"]
        assert left == [[0, 0]] * frozen_cases.STEPS, (rank, left)


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_holds_a_shard_of_the_frozen_weights(world_size):
    result = _run(world_size)[0]
    # Every frozen parameter lives in a unit here (embedding, base linears, block 1).
    assert result["frozen_partitioned"] == result["frozen_names"]
    numel = sum(result["reference"][n].numel() for n in result["frozen_names"])
    assert result["frozen_padded_numel"] >= numel
    assert result["frozen_shard_numel"] * world_size == result["frozen_padded_numel"]
    assert result["frozen_shard_numel"] < numel / world_size + 16 * 8  # padding only
    # The TFLOP/s estimate counts every parameter at its full size (4 FLOPs per token) and
    # the trained ones twice more, not only the adapters.
    total = sum(value.numel() for value in result["reference"].values())
    assert result["monitor"] == (total, total - numel)
    # The estimator counts what the engine holds: its shards, frozen ones included.
    assert result["estimated_params"] == result["params_bytes"]


def test_checkpoint_of_the_frozen_shards_loads_at_another_world_size():
    saved = _run(3)[0]["saved"]
    result = _run(2)[0]
    for name, value in saved.items():
        assert torch.equal(result["loaded"][name], value), name
        assert torch.equal(result["pretrained"][name], value), name  # engine.load_weights
    _close(result["resumed"], result["reference_resumed"], "resumed at 2 ranks")


def test_consolidated_and_16bit_models_hold_the_frozen_weights():
    saved = _run(3)[0]["saved"]
    written = load_file(os.path.join(_DIR, "16bit", "model.safetensors"))
    consolidated = os.path.join(_DIR, "consolidated.safetensors")
    from zero_ext.checkpoint.consolidate import consolidate
    consolidate(os.path.join(_DIR, "frozen"), consolidated)
    merged = load_file(consolidated)
    for name, value in saved.items():
        assert torch.equal(written[name], value), name
        assert torch.equal(merged[name], value), name
