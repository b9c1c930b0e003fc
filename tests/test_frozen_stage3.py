"""Stage 3 partitions frozen parameters (a LoRA fine-tune's base model) as DeepSpeed does:
training equals single-process torch AdamW, each rank holds 1/N of the frozen weights, units
are released in backward once their inputs' gradients are computed, and checkpoints carry the
frozen shards to another world size. Cases in tests/frozen_cases.py: one group of 3 ranks
(saves), then one of 2 (loads what the 3 saved); a QLoRA base's 4-bit weights among them."""

from __future__ import annotations

import functools
import glob
import os
import tempfile

import frozen_cases
import pytest
import torch
from safetensors import safe_open
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
        assert result["threshold_left"] == result["grad_first_left"] == left, rank
        assert result["cross_left"] == left, rank


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_models_own_pre_hook_reading_the_weights_runs_after_the_gather(world_size):
    # weight_norm's pre-hook recomputes each block's weight from weight_g and weight_v: the
    # gather runs before it, so the blocks are gathered one at a time within the live limit of
    # two (it ran on the released weights first, gathering all six and holding them).
    result = _run(world_size)[0]["weight_norm"]
    _close(result["got"], result["reference"], f"weight_norm, {world_size} ranks")
    assert result["gathered"] <= 2, result["gathered"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_an_input_every_block_takes_releases_each_block_after_its_own_backward(world_size):
    """An encoder's output feeding every block's cross-attention: its gradient is complete only
    after the first block's backward, and every block waiting for it stayed gathered until
    then (all of a T5 decoder at once)."""
    cross = _run(world_size)[0]["cross"]
    _close(cross["got"], cross["reference"], f"{world_size} ranks, shared input")
    assert len(cross["later"]) == 3 * frozen_cases.STEPS
    assert not any(cross["later"]), cross["later"]
    # A block that modifies that input in place still may (a custom Function's output could
    # not be modified in place: it raised).
    in_place = _run(world_size)[0]["cross_in_place"]
    _close(in_place["got"], in_place["reference"], f"{world_size} ranks, modified in place")


@pytest.mark.parametrize("world_size", [2, 3])
def test_trainable_parameters_kept_whole_wait_for_the_frozen_backward(world_size):
    """Norms and LoRA matrices below stage3_param_persistence_threshold stay whole; the first
    block's unit (whose input needs no gradient) waited only for its bucketed ones and was
    released before its base weight's backward ran (an error naming the weight)."""
    result = _run(world_size)[0]
    _close(result["threshold"], result["reference"], f"{world_size} ranks, threshold 50")


@pytest.mark.parametrize("world_size", [2, 3])
def test_autograd_grad_through_the_model_before_backward_changes_nothing(world_size):
    """A gradient taken before engine.backward (adversarial perturbation) had ended the units'
    backward: engine.backward then found them released and not gathered again."""
    result = _run(world_size)[0]
    _close(result["grad_first"], result["reference"], f"{world_size} ranks, grad first")


@pytest.mark.parametrize("world_size", [2, 3])
def test_an_evaluation_forward_with_autograd_on_is_named_once(world_size):
    # Steps 0 and 2-3 release every frozen unit before backward reaches the embedding; step 1,
    # after a forward with autograd on that no backward reached, cannot, and rank 0 says so
    # once, naming that many units; the other ranks stay quiet.
    results = _run(world_size)
    stale = results[0]["stale_eval"]
    assert stale["seen"][0] == stale["seen"][2] == stale["seen"][3] == 0, stale["seen"]
    assert stale["seen"][1] > 0
    assert len(stale["warnings"]) == 1 and "torch.no_grad()" in stale["warnings"][0]
    assert stale["warnings"][0].startswith(f"zero_ext stage 3: {stale['seen'][1]} of ")
    assert all(not r["stale_eval"]["warnings"] for r in results[1:])


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_bypassed_body_gives_its_frozen_parts_units_of_their_own(world_size):
    """PeftModel's base_model holds the decoder layers (units) and its frozen embedding, norm
    and LM head, and PEFT calls past its forward: those parts are units of their own, so the
    embedding runs outside any forward (as in generate()) with its values."""
    result = _run(world_size)[0]
    want = torch.nn.functional.embedding(result["tokens"], result["reference"]["body.embed.weight"])
    assert torch.equal(result["embedded_outside"], want)


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_estimator_counts_partitioned_frozen_parameters(world_size):
    """bf16 from an fp32-built model (the engine casts first; the estimator saw fp32 frozen
    parameters and counted them whole), and the host side under both offloads (the frozen
    shards were subtracted from the fp32 master's bytes)."""
    result = _run(world_size)[0]
    for name in ("bf16", "offload"):
        est_params, est_host, params, host = result[f"estimate_{name}"]
        assert (est_params, est_host) == (params, host), name


def test_a_rank_raising_inside_gathered_parameters_does_not_leave_the_others_waiting():
    results = _run(2)
    assert results[0]["gathered_raise"] == "KeyError: 'raised on rank 0 inside'"
    assert results[1]["gathered_raise"].startswith(
        "RuntimeError: zero_ext.GatheredParameters: rank 0 raised inside"), results[1]
    # With a modifier rank that got through, every rank keeps its values.
    assert bool((results[0]["modifier_raise"] == 7.0).all())
    assert torch.equal(results[0]["modifier_raise"], results[1]["modifier_raise"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_data_assignment_on_the_modifier_rank_is_every_ranks(world_size):
    """`param.data = tensor` inside GatheredParameters(modifier_rank=0), as model-loading code
    does under DeepSpeed: rank 0's tensor is kept on every rank (the other ranks assigned
    zeros), for partitioned trainable and frozen weights and parameters kept whole (the exit
    broadcast the gathered buffer and dropped the tensor), and training goes on from it as a
    single process started from those values does."""
    results = _run(world_size)
    for rank, result in enumerate(results):
        kept = result["data_assigned"]["modifier"]
        assert sorted(kept) == sorted(frozen_cases._ASSIGNED)
        for name, value in kept.items():
            assert torch.equal(value, frozen_cases._assigned_values(name, value)), (rank, name)
        assert_close(result["data_assigned"]["modifier_trained"],
                     results[0]["data_assigned"]["modifier_trained"], rtol=0, atol=0)
    assigned = results[0]["data_assigned"]
    _close(assigned["modifier_trained"], assigned["modifier_reference"],
           f"{world_size} ranks, trained after .data assignments")


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_data_assignment_that_would_be_lost_is_an_error_on_every_rank(world_size):
    """Inside a read-only GatheredParameters (rank 0 assigns) and with a tensor of another
    shape under a modifier rank, the exit raises on every rank; on a released parameter the
    assignment raises at once, naming the parameter and the fix. Nothing is changed but what
    the modifier rank wrote in place (it was all silently thrown away before)."""
    for rank, result in enumerate(_run(world_size)):
        assigned = result["data_assigned"]
        read_only = assigned["read_only"]
        assert read_only.startswith("zero_ext.GatheredParameters: parameters were changed"), \
            (rank, read_only)
        assert "rank 0: body.blocks.2.out.weight (`.data =`" in read_only, read_only
        assert "modifier_rank=" in read_only, read_only
        misfit = assigned["misfit"]
        assert "another shape or dtype" in misfit, (rank, misfit)
        assert "body.blocks.2.out.weight: torch.float32 (24, 2) for torch.float32 (24, 24)" \
            in misfit, misfit
        released = assigned["released"]
        assert released.startswith("zero_ext stage 3: `body.blocks.2.out.weight.data = "), \
            (rank, released)
        assert "GatheredParameters(param, modifier_rank=0): param.data.copy_(tensor)" \
            in released, released
        assert assigned["released_numel"] == 0  # still released, not holding the tensor
        assert sorted(assigned["unchanged"]) == [n for n in assigned["names"] if n != "head.bias"]
        assert bool((assigned["bias"] == 3.0).all()), rank


def test_a_frozen_weight_two_modules_hold_stays_whole():
    result = _run(2)[0]
    assert result["tied_embed"].numel() == frozen_cases.VOCAB * frozen_cases.DIM
    want = torch.ones(1, frozen_cases.DIM) @ result["tied_embed"].t()
    assert_close(result["tied_head"], want)


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
        # A block frozen when saved and trained now reads its saved values.
        assert torch.equal(result["loaded_unfrozen"][name], value), name
    _close(result["resumed"], result["reference_resumed"], "resumed at 2 ranks")


def test_exclude_frozen_parameters_leaves_the_frozen_shards_out():
    """As DeepSpeed leaves its frozen fragments out: the shard files hold no frozen values,
    and a load keeps the model's own frozen values."""
    saved = _run(3)[0]["saved"]
    frozen = set(_run(3)[0]["frozen_names"])
    for path in glob.glob(os.path.join(_DIR, "excluded", "zero_shard_*.safetensors")):
        with safe_open(path, "pt") as f:
            assert not [k for k in f.keys() if k.endswith(".frozen")], path  # noqa: SIM118
    result = _run(2)[0]
    for name, value in saved.items():
        want = value + 1.0 if name in frozen else value  # the fresh model's (+1) values
        assert torch.equal(result["loaded_excluded"][name], want), name


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


def _qlora(world_size: int, rank: int = 0) -> dict:
    qlora = _run(world_size)[rank]["qlora"]
    if qlora is None:
        pytest.skip("bitsandbytes is not installed")
    return qlora


# fp32 trains as stage 2 within fp rounding; bf16 differs by the sums' rounding order only.
_QLORA_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_qlora_base_stored_in_the_training_dtype_is_partitioned(world_size, dtype):
    """BitsAndBytesConfig(bnb_4bit_quant_storage=<training dtype>): each rank holds 1/N of the
    packed 4-bit codes (stage 2, and stage 3 before, kept them whole on every rank), trains as
    stage 2, leaves nothing gathered, evaluates and generates with them (evaluation mode
    without bitsandbytes' CPU repacking of a gathered view), and gives back the same codes."""
    runs = [_qlora(world_size, rank)[dtype] for rank in range(world_size)]
    stage2, stage3 = runs[0][2], runs[0][3]
    full = stage2["held"]
    held = [run[3]["held"] for run in runs]
    assert sum(held) == full and max(held) <= full // world_size + 1024, (held, full)
    tolerance = _QLORA_TOLERANCE[dtype]
    assert_close(torch.tensor(stage3["losses"]), torch.tensor(stage2["losses"]),
                 rtol=tolerance, atol=tolerance)
    for name, value in stage2["adapters"].items():
        assert_close(stage3["adapters"][name], value, rtol=tolerance, atol=tolerance, msg=name)
    assert_close(stage3["logits"], stage2["logits"], rtol=tolerance, atol=tolerance)
    assert torch.equal(stage3["eval_logits"], stage3["logits"])
    assert torch.equal(stage3["generated"], stage2["generated"])
    assert stage3["codes"].keys() == stage2["codes"].keys() and stage3["codes"]
    for name, codes in stage2["codes"].items():
        assert torch.equal(stage3["codes"][name], codes), name
    for run in runs:
        assert run[3]["left"] == [[0, 0]] * frozen_cases.STEPS
    # PEFT's count of the base (two weights per byte) is the full model's, and the estimator
    # counts what the engine holds.
    assert stage3["monitor"] == stage2["monitor"]
    assert stage3["estimated"] == stage3["params_bytes"]


def test_a_qlora_checkpoint_loads_the_codes_bit_exactly_at_another_world_size():
    saved = _qlora(3)["bf16"][3]
    loaded = _qlora(2)["bf16"]
    assert loaded["loaded"].keys() == saved["codes"].keys()
    for name, codes in saved["codes"].items():
        assert torch.equal(loaded["loaded"][name], codes), name
    for name, value in saved["adapters"].items():
        assert torch.equal(loaded["loaded_adapters"][name], value), name


def test_a_qlora_base_stored_as_uint8_stays_whole_with_a_warning():
    warned = _qlora(2)["uint8_warnings"]
    assert len(warned) == 1 and "bnb_4bit_quant_storage=torch.bfloat16" in warned[0], warned
