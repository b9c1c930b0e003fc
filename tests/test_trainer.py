"""ZeroTrainer: the Hugging Face Trainer on a zero_ext engine.

The distributed cases share two launches (tests/trainer_script.py): one torchrun of 2 CPU
ranks for stages 1-3 (uninterrupted, short-window and stopped-then-resumed runs), then one
process for the plain Trainer references, a resume of a 2-rank checkpoint at 1 rank, an fp16
run and a load_best_model_at_end run. Config filling and its errors are checked in this
process.
"""

import json
import os
import re
import sys
import types

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import TrainingArguments

import zero_ext
from zero_ext.integrations.transformers import ZeroTrainer, fill_config

import engine_cases
from dist_harness import run_group
from launch import launch, torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "trainer_script.py")
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "hf_trainer.py")
STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trainer"))
    torchrun([SCRIPT, "distributed", out], timeout=420)
    launch([sys.executable, SCRIPT, "single", out], timeout=240)

    def result(name):
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)

    def weights(name):
        """A run's saved weights (one file, or save_pretrained's shards and index)."""
        index = os.path.join(out, name, "model.safetensors.index.json")
        if not os.path.exists(index):
            return load_file(os.path.join(out, name, "model.safetensors"))
        with open(index) as f:
            files = set(json.load(f)["weight_map"].values())
        return {k: v for file in files for k, v in load_file(os.path.join(out, name, file)).items()}

    return result, weights


@pytest.mark.parametrize("stage", STAGES)
def test_loss_goes_down_and_logs_match_the_plain_trainer(runs, stage):
    result, _ = runs
    zero, plain = result(f"zero{stage}"), result("plain")
    assert zero["losses"][-1] < 0.9 * zero["losses"][0]
    # Same global batch (2 ranks x micro 2 x accumulation 2 against 1 x 2 x 4), fp32.
    torch.testing.assert_close(zero["losses"], plain["losses"], rtol=1e-5, atol=0)
    # grad_norm is the engine's global norm over the shards, before clipping to 0.5.
    torch.testing.assert_close(zero["grad_norms"], plain["grad_norms"], rtol=1e-5, atol=0)
    # The rate logged after the engine's step, as under DeepSpeed: the plain Trainer's next
    # one (it logs before its scheduler step); the linear schedule ends at 0.
    assert zero["lrs"] == pytest.approx(plain["lrs"][1:] + [0.0], rel=1e-12)


@pytest.mark.parametrize("stage", [2, 3])
def test_compressed_communication_under_the_trainer(runs, stage):
    # Stage 2: int8 gradients; stage 3: int4 gradients and int8 weights; error feedback on.
    result, _ = runs
    zero, compressed, plain = (result(f"zero{stage}"), result(f"zero{stage}_compressed"),
                               result("plain"))
    assert compressed["losses"][-1] < 0.9 * compressed["losses"][0]
    # Close to the plain Trainer, but not equal: the gradients (and weights) were quantized.
    torch.testing.assert_close(compressed["losses"], plain["losses"], rtol=0.02, atol=0)
    assert compressed["losses"] != zero["losses"]
    # fp32 gradients on the wire, blocks of 256 with an fp32 scale each: int8 sends
    # 4 / (1 + 4/256) = 3.94x fewer bytes than fp32, int4 4 / (0.5 + 4/256) = 7.75x.
    ratio = zero["wire"]["reduce_scatter"] / compressed["wire"]["reduce_scatter"]
    assert ratio > (3.8 if stage == 2 else 7.0), ratio
    if stage == 3:  # weights: int8 gathers for compute, exact ones after the step
        assert compressed["wire"]["all_gather"] < 0.5 * zero["wire"]["all_gather"]


@pytest.mark.parametrize("stage", STAGES)
def test_final_weights_match_the_plain_trainer(runs, stage):
    _, weights = runs
    zero, plain = weights(f"zero{stage}"), weights("plain")
    assert zero.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("loss", ["short", "short_mean"])
def test_an_epoch_ending_with_a_short_accumulation_window(runs, stage, loss):
    # Epochs of 7 micro-batches per rank, accumulation 2: the Trainer steps after a window of
    # one; with the loss normalised by the window's tokens, or a per-batch mean / window.
    result, weights = runs
    zero, plain = result(f"zero{stage}_{loss}"), result(f"plain_{loss}")
    torch.testing.assert_close(zero["losses"], plain["losses"], rtol=1e-5, atol=0)
    zero, plain = weights(f"zero{stage}_{loss}"), weights(f"plain_{loss}")
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("stage", STAGES)
def test_resumed_training_ends_with_the_uninterrupted_weights(runs, stage):
    _, weights = runs
    resumed, uninterrupted = weights(f"zero{stage}_resumed"), weights(f"zero{stage}")
    for key in uninterrupted:  # same world size: bitwise
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)


def test_checkpoint_of_two_ranks_resumes_at_one(runs):
    _, weights = runs
    resumed, uninterrupted = weights("zero2_resumed_1rank"), weights("zero2")
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-4, atol=1e-5,
                                   msg=key)


def test_resume_from_a_crafted_checkpoint_runs_no_code(runs):
    result, _ = runs
    evil = result("evil")
    assert not evil["marker"]
    assert "engine_state.pt holds something other than plain data" in evil["outcome"], evil


@pytest.mark.parametrize("stage", STAGES)
def test_no_ddp_and_each_rank_reads_its_own_samples(runs, stage):
    result, _ = runs
    zero = result(f"zero{stage}")
    assert zero["world_size"] == 2 and not zero["ddp"]
    first, second = (set(r) for r in zero["reads"])  # the first epoch of each rank
    assert not first & second and len(first | second) == 32


def test_label_smoothing_shifts_labels_as_for_the_plain_trainer(runs):
    result, _ = runs
    plain, ours, unsmoothed = result("plain_smooth"), result("zero2_smooth"), result("plain")
    # Smoothing is on: the losses move away from the unsmoothed run's as the model learns.
    assert max(abs(a - b) for a, b in zip(plain["losses"], unsmoothed["losses"])) > 1e-2
    # The same loss as the plain Trainer's, which shifts a causal LM's labels (unshifted labels
    # would give a different loss from the first step on).
    assert torch.allclose(torch.tensor(ours["losses"]), torch.tensor(plain["losses"]),
                          rtol=1e-5, atol=0), (ours["losses"], plain["losses"])


def test_model_built_under_init_takes_pretrained_weights(runs):
    _, weights = runs
    pretrained_state = weights("pretrained")
    # Trained one step at lr 0 (AdamW's decay is scaled by the lr too): the saved weights are
    # the pretrained ones, read into the shards of a model that never existed whole.
    saved = weights("zero3_pretrained")
    assert set(saved) >= set(pretrained_state) and len(pretrained_state) > 10
    for key, value in pretrained_state.items():
        assert torch.equal(saved[key], value), key


def test_stage3_evaluate_and_predict(runs):
    result, _ = runs
    zero3, plain = result("zero3"), result("plain_eval")
    # The plain Trainer's evaluation of the saved weights (from_pretrained) agrees.
    assert plain["dtype"] == "torch.float32"
    assert zero3["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    assert zero3["predictions_shape"][:2] == [8, 16]


def test_stage3_bf16_activation_checkpointing_and_torch_compile(runs):
    result, weights = runs
    plain = result("plain")["losses"]
    # Recomputing activations changes nothing, nor does torch_compile (the engine compiles the
    # model: aot_eager, the same kernels); bf16 weights stay near the fp32 run.
    torch.testing.assert_close(result("zero3_ckpt")["losses"], plain, rtol=1e-5, atol=0)
    torch.testing.assert_close(result("zero3_compiled")["losses"], plain, rtol=1e-5, atol=0)
    assert result("zero3_compiled")["compiled"] is True
    for key, value in weights("plain").items():
        torch.testing.assert_close(weights("zero3_compiled")[key], value, rtol=1e-4, atol=1e-5,
                                   msg=key)
    torch.testing.assert_close(result("zero3_bf16")["losses"], plain, rtol=1e-2, atol=0)
    assert {t.dtype for t in weights("zero3_bf16").values()} == {torch.bfloat16}


def test_load_best_model_at_end_restores_the_best_checkpoint(runs):
    result, weights = runs
    best = result("best")["best_checkpoint"]
    assert best == "checkpoint-4"
    final, saved = weights("best"), weights(os.path.join("best", best))
    for key in saved:
        torch.testing.assert_close(final[key], saved[key], rtol=0, atol=0, msg=key)


def test_skipped_fp16_steps_do_not_advance_the_schedule(runs):
    result, _ = runs
    fp16 = result("fp16")
    skipped = fp16["skipped_steps"]
    assert 0 < skipped < fp16["global_steps"] == 8
    assert fp16["scheduler_steps"] == 8 - skipped
    # The linear schedule (8 steps) starts at the first step taken; without an optimizer
    # section the Trainer steps it under DeepSpeed, logging the rate each step used.
    assert skipped + 1 < len(fp16["lrs"])
    assert fp16["lrs"][:skipped + 1] == pytest.approx([1e-2] * (skipped + 1))
    assert fp16["lrs"][skipped + 1] == pytest.approx(1e-2 * 7 / 8)


def test_example_with_stage3_offload_under_torchrun(tmp_path):
    config = os.path.join(os.path.dirname(EXAMPLE), "configs", "trainer", "zero3_offload.json")
    stdout = torchrun([EXAMPLE, "--config", config, "--steps", "12", "--output_dir",
                       str(tmp_path)], timeout=300).stdout
    match = re.search(r"stage 3, 2 rank\(s\): loss ([\d.]+) -> eval loss ([\d.]+)", stdout)
    assert match, stdout[-3000:]
    first, last = map(float, match.groups())
    assert last < 0.95 * first
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert model.config.num_hidden_layers == 2


# -- config filling (no processes launched) ---------------------------------------------------
@pytest.fixture(scope="module")
def args(tmp_path_factory):
    return TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("args")), per_device_train_batch_size=4,
        gradient_accumulation_steps=3, learning_rate=2e-4, adam_beta1=0.8, adam_beta2=0.95,
        adam_epsilon=1e-6, weight_decay=0.05, max_grad_norm=0.7, warmup_steps=10,
        report_to="none", use_cpu=True)


def test_auto_values_are_filled_from_the_training_arguments(args):
    config = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
            "total_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
    }
    filled = fill_config(config, args, world_size=2, max_steps=100, hidden_size=64)
    assert config["train_batch_size"] == "auto"  # the caller's dict is left alone
    assert filled["train_batch_size"] == 24
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 3
    assert filled["gradient_clipping"] == 0.7
    assert filled["bf16"] == {"enabled": False} and filled["fp16"] == {"enabled": False}
    assert filled["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.8, 0.95], "eps": 1e-6,
                                             "weight_decay": 0.05}
    assert filled["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-4,
                                             "warmup_num_steps": 10, "total_num_steps": 100}
    assert filled["zero_optimization"] == {
        "stage": 3, "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 3686,
        "stage3_param_persistence_threshold": 640}
    zero_ext.ZeroConfig.load(filled)  # a valid config
    # bf16_full_eval fills "auto" as transformers does (fp16|fp16_full_eval, bf16|bf16_full_eval),
    # and adds no section the config lacks
    full_eval = TrainingArguments(output_dir=args.output_dir, bf16_full_eval=True,
                                  report_to="none", use_cpu=True)
    assert fill_config({"bf16": {"enabled": "auto"}}, full_eval, world_size=1, max_steps=10,
                       hidden_size=64)["bf16"] == {"enabled": True}
    assert "bf16" not in fill_config({}, full_eval, world_size=1, max_steps=10, hidden_size=64)


def test_absent_keys_take_the_training_arguments(args):
    filled = fill_config({"zero_optimization": {"stage": 2}}, args, world_size=1)
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 3
    assert filled["gradient_clipping"] == 0.7
    assert filled["optimizer"] == {"type": "AdamW", "params": {
        "lr": 2e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.05}}
    assert "scheduler" not in filled  # the Trainer's own schedule is used


def test_contradictions_are_listed_in_one_error(args):
    config = {
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 3,
        "gradient_clipping": 1.0, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.8, 0.95]}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5,
                                                     "warmup_type": "auto"}},
    }
    with pytest.raises(ValueError) as error:
        fill_config(config, args, world_size=2, max_steps=100)
    text = str(error.value)
    for expected in (("train_micro_batch_size_per_gpu is 8 in the config, but "
                      "TrainingArguments.per_device_train_batch_size is 4"),
                     "gradient_clipping is 1.0",
                     ("bf16.enabled is True in the config, but "
                      "TrainingArguments.bf16|bf16_full_eval is False"),
                     "optimizer.params.lr is 0.001",
                     "scheduler.params.warmup_num_steps is 5",
                     "scheduler.params.warmup_type is \"auto\", but no value of the "
                     "TrainingArguments"):
        assert expected in text, text
    assert "gradient_accumulation_steps is" not in text and "betas" not in text
    assert text.count("\n  - ") == 6


@pytest.mark.parametrize("name", ["adagrad", "sgd"])
def test_the_trainers_own_optimizer_runs_on_the_shards(runs, name):
    # No optimizer section: TrainingArguments.optim (Adagrad), or optimizers=(SGD, StepLR),
    # runs on the engine's fp32 shards, as under transformers' DeepSpeed integration.
    result, weights = runs
    zero, plain = result(f"zero2_{name}"), result(f"plain_{name}")
    assert zero["inner"] == {"adagrad": "Adagrad", "sgd": "SGD"}[name]
    assert zero["losses"][-1] < 0.9 * zero["losses"][0]
    torch.testing.assert_close(zero["losses"], plain["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(zero["grad_norms"], plain["grad_norms"], rtol=1e-5, atol=0)
    # The rate each step used, as HF + DeepSpeed logs it without an optimizer section (the
    # Trainer steps its own schedule there) and as the plain Trainer does.
    assert zero["lrs"] == pytest.approx(plain["lrs"], rel=1e-12)
    zero_weights, plain_weights = weights(f"zero2_{name}"), weights(f"plain_{name}")
    for key in plain_weights:
        torch.testing.assert_close(zero_weights[key], plain_weights[key], rtol=1e-4, atol=1e-5,
                                   msg=key)


def test_the_trainers_optimizer_section_stays_out_of_an_optimizer_section(tmp_path):
    # TrainingArguments.optim other than AdamW leaves the section out (the Trainer's optimizer
    # runs); the AdamW default fills one in, unless the Trainer has an optimizer of its own.
    sgd = TrainingArguments(output_dir=str(tmp_path), optim="sgd", report_to="none",
                            use_cpu=True)
    assert "optimizer" not in fill_config({}, sgd, world_size=1)
    adamw = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert fill_config({}, adamw, world_size=1)["optimizer"]["type"] == "AdamW"
    assert "optimizer" not in fill_config({}, adamw, world_size=1, own_optimizer=True)


def _tiny_model():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))


def test_an_optimizer_of_ones_own_beside_an_optimizer_section_is_refused(args):
    # One of the two would be dropped silently.
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ValueError, match="its own optimizer.*\"optimizer\" section"):
        ZeroTrainer(model=model, args=args, zero_config=config, optimizers=(optimizer, None))
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    with pytest.raises(ValueError, match="its own scheduler"):
        ZeroTrainer(model=model, args=args, optimizers=(optimizer, schedule),
                    zero_config={"scheduler": {"type": "WarmupLR", "params": {}}})
    with pytest.raises(ValueError, match="without the optimizer it drives"):
        ZeroTrainer(model=model, args=args, zero_config={}, optimizers=(None, schedule))


def test_load_best_model_from_model_only_checkpoints_is_refused(tmp_path):
    # As the Trainer refuses it under DeepSpeed: the best checkpoint would hold no engine state
    # and the last weights would silently stay.
    args = TrainingArguments(output_dir=str(tmp_path), save_only_model=True,
                             load_best_model_at_end=True, eval_strategy="steps",
                             save_strategy="steps", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="save_only_model=True with load_best_model_at_end"):
        ZeroTrainer(model=_tiny_model(), args=args, zero_config={})


def test_auto_buckets_follow_a_multimodal_models_text_width():
    # transformers' DeepSpeed integration reads hidden_size, hidden_sizes, then text_config's
    from zero_ext.integrations.config_fill import model_hidden_size

    def holder(**config):
        return types.SimpleNamespace(config=types.SimpleNamespace(**config))

    text = types.SimpleNamespace(hidden_size=2304)
    assert model_hidden_size(holder(hidden_size=64, text_config=text)) == 64
    assert model_hidden_size(holder(hidden_sizes=[32, 96, 64])) == 96
    assert model_hidden_size(holder(text_config=text)) == 2304
    assert model_hidden_size(holder(text_config=types.SimpleNamespace(hidden_sizes=[8, 16]))) \
        == 16
    assert model_hidden_size(holder()) is None


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    # In a process of its own: training sets the process group up (and torchrun's variables).
    (result,) = run_group(1, engine_cases.retrain_cases, str(tmp_path_factory.mktemp("retrain")))
    return result


def test_a_second_train_restarts_the_schedule_and_model_init_gets_its_own_engine(retrained):
    # As the Trainer: a second train() keeps the optimizer state and starts the schedule it
    # made again (the engine's had ended at 0 and the weights stood still); with model_init
    # each train() trains the model it builds (it crashed on the first engine's optimizer).
    result = retrained
    first, second = result["rates"]
    assert second == first and first[0] > 0, result
    assert result["moved"] and result["model_init"] == [True, True] and result["built"] == 3
    first, second = result["cosine"]  # a config schedule reading its base rate when built
    assert second == pytest.approx(first, rel=1e-12) and max(first) > 0, result["cosine"]


def test_a_run_resumed_with_more_steps_decays_over_them(retrained):
    # Saved at step 3 of 6 and resumed with max_steps=9: the config's schedule ("auto" length)
    # runs over 9 steps, as the uninterrupted run of 9 (and as under DeepSpeed); the
    # checkpoint's length of 6 had brought the rate to 0 at step 6.
    assert retrained["resumed_total"] == 9
    resumed, uninterrupted = retrained["resumed_rates"], retrained["uninterrupted_rates"]
    assert len(resumed) == 6 and len(uninterrupted) == 9
    assert resumed == pytest.approx(uninterrupted[3:], rel=1e-12) and resumed[-2] > 0


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_an_overridden_create_scheduler_drives_the_engine(retrained, optim):
    # Without a scheduler section the Trainer's create_scheduler builds the schedule (a
    # subclass's override included), as under transformers' DeepSpeed integration; the
    # Trainer's linear schedule ran in its place before, whatever the subclass defined.
    # No optimizer or scheduler section: the Trainer steps its schedule under DeepSpeed and
    # logs the rate each step used.
    run = retrained["overridden"][optim]
    assert run["rates"] == pytest.approx([1e-2 * 0.5 ** k for k in (0, 1, 2)], rel=1e-12)
    assert run["group_lr"] == pytest.approx(1e-2 * 0.5 ** 3, rel=1e-12)


def test_reduce_lr_on_plateau_follows_the_evaluation_metric(retrained):
    # The Trainer steps it with each evaluation's metric, as a plain Trainer does (it crashed
    # in the engine's step, which has no metric to give it); the rate falls at evaluations.
    plain, zero = retrained["plateau"]["plain"], retrained["plateau"]["zero"]
    assert plain["rates"][-1] < plain["rates"][0], plain
    assert zero["rates"] == pytest.approx(plain["rates"], rel=1e-12)
    torch.testing.assert_close(zero["losses"], plain["losses"], rtol=1e-5, atol=0)


def test_evaluating_an_init_built_model_before_training_says_what_to_do(args):
    with zero_ext.Init():
        model = _tiny_model()
    trainer = ZeroTrainer(model=model, args=args, zero_config={})
    data = [{"input_ids": torch.arange(4), "labels": torch.arange(4)}] * 2
    with pytest.raises(RuntimeError, match="built under zero_ext.Init.*after train"):
        trainer.evaluate(data)


def test_processes_the_training_arguments_do_not_see_are_refused(args, monkeypatch):
    # torchrun's processes on a machine without GPUs, with TrainingArguments lacking use_cpu.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes were launched but the TrainingArguments "
                                         "see 1; .*use_cpu=True"):
        ZeroTrainer(model=_tiny_model(), args=args, zero_config={})
