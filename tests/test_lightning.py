"""ZeroStrategy: Lightning's Trainer on a zero_ext engine, against Lightning's own DDP.

Every run comes from one torchrun launch of 2 CPU ranks (tests/lightning_cases.py): the same
module and data under strategy="ddp" and under ZeroStrategy at stages 1-3, with gradient
accumulation (each epoch ending in a short window), clipping, a step-wise LR schedule and
max_steps; a resume from a ModelCheckpoint directory; a CSVLogger; bf16-mixed; a config that
contradicts the Trainer.
"""

import csv
import functools
import json
import os
import sys

import pytest
import torch

from launch import torchrun

pytest.importorskip("lightning", reason="the Lightning integration needs lightning installed")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from lightning_cases import (
    ACCUMULATE,
    BATCHES_PER_EPOCH,
    CLIP,
    MAX_STEPS,
    TOKENS_PER_SAMPLE,
    Regression,
    dataset,
)

STAGES = (1, 2, 3)
EPOCHS = 2


@functools.cache
def _runs(out: str) -> dict:
    torchrun([os.path.join(HERE, "lightning_cases.py"), out], timeout=300)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lightning"))
    return _runs(out), out


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


def test_the_reference_clips_and_accumulates(runs):
    """The comparisons below exercise clipping and a short window in each epoch."""
    results, _ = runs
    ddp = results["ddp"]
    assert min(ddp["norms"]) > CLIP
    assert len(ddp["losses"]) == EPOCHS * BATCHES_PER_EPOCH
    assert ddp["global_step"] == MAX_STEPS
    assert len(set(ddp["lrs"])) > 1  # the schedule moves


@pytest.mark.parametrize("stage", STAGES)
def test_losses_norms_and_lrs_equal_lightning_ddp(runs, stage):
    results, _ = runs
    zero, ddp = results[f"zero{stage}"], results["ddp"]
    assert zero["stage"] == stage
    _close(zero["losses"], ddp["losses"])
    _close(zero["norms"], ddp["norms"])
    _close(zero["lrs"], ddp["lrs"], rtol=0, atol=0)


def test_a_torch_sgd_runs_on_the_shards_as_under_ddp(runs):
    results, _ = runs
    zero, ddp = results["zero_sgd"], results["ddp_sgd"]
    _close(zero["losses"], ddp["losses"])
    _close(zero["norms"], ddp["norms"])
    _close(zero["lrs"], ddp["lrs"], rtol=0, atol=0)
    assert zero["losses"] != results["zero2"]["losses"]  # not the AdamW run
    for name, values in ddp["weights"].items():
        _close(zero["weights"][name], values)


def test_a_second_fit_with_another_optimizer_class_is_refused(runs):
    # The engine keeps the first fit's optimizer and its state; an SGD in the second fit
    # would otherwise be ignored (trained on as AdamW at SGD's rate).
    results, _ = runs
    assert "returned a SGD in this fit" in results["switched"]
    assert "runs the AdamW of the first fit" in results["switched"]


def test_a_second_fit_starts_the_schedule_again(runs):
    # As under DDP, where configure_optimizers runs again for every fit(): the StepLR of the
    # second fit starts from the module's rate (it went on from the first fit's, halved).
    # The module's rate is halved between the fits: the second fit's optimizer (and schedule)
    # start from it, with or without a schedule (the engine kept the first fit's rate).
    results, _ = runs
    for kind in ("refit", "refit_unscheduled"):
        ddp, zero = results[f"ddp_{kind}"], results[f"zero_{kind}"]
        assert zero["global_step"] == ddp["global_step"] == 2 * MAX_STEPS
        assert ddp["lrs"][MAX_STEPS] == ddp["lrs"][0] / 2, kind
        _close(zero["lrs"], ddp["lrs"], rtol=0, atol=0)


@pytest.mark.parametrize("stage", STAGES)
def test_final_weights_equal_lightning_ddp(runs, stage):
    results, _ = runs
    zero, ddp = results[f"zero{stage}"], results["ddp"]
    assert zero["weights"].keys() == ddp["weights"].keys()
    for name, values in ddp["weights"].items():
        _close(zero["weights"][name], values)


@pytest.mark.parametrize("stage", STAGES)
def test_max_steps_counts_optimizer_steps(runs, stage):
    zero = runs[0][f"zero{stage}"]
    assert zero["global_step"] == zero["engine_steps"] == MAX_STEPS
    assert len(zero["losses"]) == EPOCHS * BATCHES_PER_EPOCH
    # Each epoch's short last window is closed early; windows start at multiples of 2.
    windows = -(-BATCHES_PER_EPOCH // ACCUMULATE)
    assert zero["engine_micro_steps"] == EPOCHS * windows * ACCUMULATE


def test_manual_optimization_without_clipping_equals_lightning_ddp(runs):
    results, _ = runs
    zero, ddp = results["zero_manual"], results["ddp_manual"]
    assert max(ddp["norms"]) > 1.0  # zero_ext's own default would have clipped these
    assert zero["global_step"] == zero["engine_steps"] == ddp["global_step"] == MAX_STEPS
    _close(zero["losses"], ddp["losses"])
    _close(zero["norms"], ddp["norms"])
    _close(zero["lrs"], ddp["lrs"], rtol=0, atol=0)
    for name, values in ddp["weights"].items():
        _close(zero["weights"][name], values)


def test_stage3_builds_configure_model_under_init(runs):
    """The network built in configure_model is partitioned as it is built, with the values of
    a plain build: training equals DDP's."""
    late, ddp = runs[0]["zero3_configure_model"], runs[0]["ddp"]
    assert late["built_partitioned"] is True
    _close(late["losses"], ddp["losses"])
    for name, values in ddp["weights"].items():
        _close(late["weights"][name], values)


def test_stage3_model_summary_counts_the_whole_parameters(runs):
    """Lightning's summary table at stage 3 counts each partitioned parameter whole, as under
    DDP (the released placeholders alone count 0)."""
    zero, ddp = runs[0]["zero3"]["summary"], runs[0]["ddp"]["summary"]
    assert ddp["trainable"] == sum(len(v) for v in runs[0]["ddp"]["weights"].values())
    assert zero == ddp


def test_a_config_optimizer_replaces_configure_optimizers(runs):
    results, _ = runs
    zero, ddp = results["zero_config_optimizer"], results["ddp_unscheduled"]
    assert set(zero["lrs"]) == {0.02}  # configure_optimizers' StepLR did not run
    _close(zero["losses"], ddp["losses"])
    for name, values in ddp["weights"].items():
        _close(zero["weights"][name], values)


def test_stage3_partitions_the_parameters(runs):
    assert runs[0]["zero3"]["partitioned"]


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(runs):
    results, _ = runs
    resumed, uninterrupted, ddp = results["resumed"], results["zero3"], results["ddp"]
    assert results["ckpt_is_dir"]  # every rank's shards in a directory at the .ckpt path
    assert resumed["global_step"] == resumed["engine_steps"] == MAX_STEPS
    done = BATCHES_PER_EPOCH  # the checkpoint was saved after the first epoch
    _close(resumed["losses"], uninterrupted["losses"][done:])
    _close(resumed["losses"], ddp["losses"][done:])
    _close(resumed["lrs"], uninterrupted["lrs"][MAX_STEPS // EPOCHS:], rtol=0, atol=0)
    for name, values in uninterrupted["weights"].items():
        _close(resumed["weights"][name], values)


def test_strict_loading_false_resumes_a_module_with_a_buffer_the_checkpoint_lacks(runs):
    """LightningModule.strict_loading = False reaches the engine's load_checkpoint
    (load_module_strict), as Lightning's DeepSpeedStrategy passes it: the resume goes on as
    the strict one does, and the buffer keeps the module's value (the load refused it)."""
    results, _ = runs
    loose, resumed = results["resumed_not_strict"], results["resumed"]
    assert "error" not in loose, loose.get("error")
    assert loose["extra"] == [7.0] * 3
    assert loose["global_step"] == loose["engine_steps"] == MAX_STEPS
    _close(loose["losses"], resumed["losses"], rtol=0, atol=0)
    for name, values in resumed["weights"].items():
        _close(loose["weights"][name], values, rtol=0, atol=0)


def test_validate_with_ckpt_path_loads_the_checkpoint_weights(runs):
    """validate(ckpt_path=) on a fresh module: the loss of the checkpoint's weights, computed
    here in one process with plain torch."""
    results, _ = runs
    net = Regression().net
    weights = results["zero3"]["weights"]  # the run that wrote the final checkpoint
    with torch.no_grad():
        for name, param in net.named_parameters():
            param.copy_(torch.tensor(weights[f"net.{name}"]).view_as(param))
        x, y = dataset().tensors
        expected = torch.nn.functional.mse_loss(net(x), y).item()
    _close(results["validated"], expected)


def test_csv_logger_receives_the_engine_metrics(runs):
    results, out = runs
    with open(os.path.join(out, "csv", "run", "version_0", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("zero_ext/samples_per_s")]
    assert [int(r["step"]) for r in rows] == list(range(MAX_STEPS))  # log_every_n_steps=1
    for key in ("zero_ext/samples_per_s", "zero_ext/peak_memory_gib",
                "zero_ext/peak_memory_gib_rank0", "zero_ext/peak_memory_gib_rank1"):
        assert all(float(r[key]) > 0 for r in rows), key
    assert all(float(r["zero_ext/skipped_steps"]) == 0 for r in rows)
    _close([float(r["zero_ext/grad_norm"]) for r in rows], results["ddp"]["norms"])


def test_tokens_in_a_dict_batch_reach_the_logger(runs):
    """A language model's batch (a dict holding token ids): tokens/s and TFLOP/s are logged,
    tokens/s at TOKENS_PER_SAMPLE x samples/s (both over the same window)."""
    _, out = runs
    with open(os.path.join(out, "csv", "tokens", "version_0", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("zero_ext/samples_per_s")]
    assert len(rows) == MAX_STEPS
    for row in rows:
        assert float(row["zero_ext/tflops_per_rank"]) > 0
        _close(float(row["zero_ext/tokens_per_s"]),
               TOKENS_PER_SAMPLE * float(row["zero_ext/samples_per_s"]), rtol=1e-4)


def test_bf16_mixed_trains_bf16_weights_close_to_fp32(runs):
    bf16, ddp = runs[0]["bf16"], runs[0]["ddp"]
    assert bf16["dtype"] == "torch.bfloat16"
    assert bf16["global_step"] == MAX_STEPS
    _close(bf16["losses"], ddp["losses"], rtol=3e-2, atol=1e-2)


def test_16_true_trains_fp16_weights_with_loss_scaling(runs):
    results, out = runs
    fp16, ddp = results["fp16"], results["ddp"]
    assert fp16["dtype"] == "torch.float16"
    assert fp16["global_step"] == fp16["engine_steps"] == MAX_STEPS
    _close(fp16["losses"], ddp["losses"], rtol=1e-2, atol=1e-3)
    with open(os.path.join(out, "csv", "fp16", "version_0", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("zero_ext/loss_scale")]
    assert len(rows) == MAX_STEPS
    assert float(rows[0]["zero_ext/loss_scale"]) == 2.0 ** 4
    assert all(float(r["zero_ext/skipped_steps"]) == 0 for r in rows)


def test_a_checkpoint_converts_to_a_file_load_from_checkpoint_reads(runs):
    """zero_ext's convert_zero_checkpoint_to_fp32_state_dict, as Lightning's for DeepSpeed:
    the final checkpoint's weights are the run's, with Lightning's state beside them."""
    results, _ = runs
    converted = results["converted"]
    assert (converted["global_step"], converted["epoch"]) == (MAX_STEPS, EPOCHS - 1)
    assert converted["weights"].keys() == results["zero3"]["weights"].keys()
    for name, values in results["zero3"]["weights"].items():
        _close(converted["weights"][name], values, rtol=0, atol=0)


def test_a_config_contradicting_the_trainer_is_one_error(runs):
    message = runs[0]["contradiction"]
    assert message is not None and message.startswith("zero_ext.integrations.lightning: ")
    assert "gradient_accumulation_steps is 4 in the config, but " \
           "Trainer(accumulate_grad_batches) is 2" in message
    assert "gradient_clipping is 1.0 in the config, but Trainer(gradient_clip_val) is 0.05" \
        in message


def test_registered_strategy_names():
    from lightning.pytorch.strategies import StrategyRegistry

    from zero_ext.integrations.lightning import ZeroStrategy

    names = ["zero_ext", "zero_ext_stage_1", "zero_ext_stage_2", "zero_ext_stage_3",
             "zero_ext_stage_2_offload", "zero_ext_stage_3_offload"]
    assert set(names) <= set(StrategyRegistry.available_strategies())
    strategy = StrategyRegistry.get("zero_ext_stage_3_offload")
    assert isinstance(strategy, ZeroStrategy)
    assert (strategy.stage, strategy.offload_optimizer, strategy.offload_parameters) == \
        (3, True, True)


def test_the_pytorch_lightning_package_trains_the_same(runs):
    """`import pytorch_lightning` users: the same strategy, registered in that package."""
    results, _ = runs
    standalone, ddp = results["pytorch_lightning"], results["ddp"]
    if standalone is None:
        pytest.skip("the pytorch_lightning package is not installed")
    assert standalone["strategy"] == "zero_ext.integrations.pytorch_lightning"
    assert standalone["global_step"] == MAX_STEPS
    for name, values in ddp["weights"].items():
        _close(standalone["weights"][name], values)


def _leaves(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_deepspeed_strategy_arguments_set_the_keys_lightnings_strategy_writes():
    """ZeroStrategy takes Lightning's DeepSpeedStrategy arguments: each changed from its default
    puts into the engine's config the value Lightning's strategy writes for it (its own
    _create_default_config, and its fp16 section for the loss-scale arguments)."""
    import inspect

    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy

    from zero_ext.config import ZeroConfig
    from zero_ext.integrations.lightning import ZeroStrategy

    passed = {"stage": 3, "offload_optimizer": True, "offload_parameters": True,
              "pin_memory": True, "optimizer_buffer_count": 3, "params_buffer_count": 6,
              "reduce_bucket_size": 12345, "allgather_bucket_size": 23456, "overlap_comm": False,
              "contiguous_gradients": False, "sub_group_size": 777, "reduce_scatter": False,
              "partition_activations": True, "cpu_checkpointing": True,
              "zero_allow_untested_optimizer": False, "logging_batch_size_per_gpu": 4,
              "thread_count": 2}
    scale = {"initial_scale_power": 8, "loss_scale_window": 50, "hysteresis": 3,
             "min_loss_scale": 2}
    signature = inspect.signature(DeepSpeedStrategy.__init__).parameters
    defaults = {name: p.default for name, p in signature.items()
                if p.default is not inspect.Parameter.empty}
    named = [n for n in inspect.signature(DeepSpeedStrategy._create_default_config).parameters
             if n not in ("self", "zero_kwargs")]
    zero_kwargs = ("stage", "contiguous_gradients", "overlap_comm", "allgather_partitions",
                   "reduce_scatter", "allgather_bucket_size", "reduce_bucket_size",
                   "sub_group_size")

    def lightnings(**changed):
        args = {**defaults, **changed}
        return dict(_leaves(DeepSpeedStrategy._create_default_config(
            None, **{n: args[n] for n in named}, **{n: args[n] for n in zero_kwargs})))

    # the keys the passed arguments change (the offload switches on in both: the nvme-only keys
    # Lightning writes with them have no effect on the CPU)
    switches = {name: passed[name] for name in ("offload_optimizer", "offload_parameters")}
    expected = {path: value for path, value in lightnings(**passed).items()
                if lightnings(**switches).get(path, object()) != value}
    expected.update({f"fp16.{name}": value for name, value in scale.items()})
    assert len(expected) >= len(passed) + len(scale) - 1  # (pin_memory: two sections)
    strategy = ZeroStrategy(**passed, **scale)
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=1, precision="16-true",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)
    # the train loader fit() would attach: its batch size, logging_batch_size_per_gpu's
    trainer.fit_loop._data_source.instance = torch.utils.data.DataLoader(range(8), batch_size=4)
    ours = dict(_leaves(strategy.engine_config(trainer)))
    assert {path: ours.get(path) for path in expected} == expected
    assert ours["fp16.enabled"] is True and ours["zero_optimization.stage"] == 3
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['stage3_typo'\]"):
        ZeroStrategy(stage3_typo=1)
    with pytest.raises(ValueError, match="load_full_weights=True. is not supported"):
        ZeroStrategy(load_full_weights=True)
    assert ZeroStrategy(zero_optimization=False).engine_config(trainer)[
        "zero_optimization"]["stage"] == 0
    with pytest.raises(ValueError, match="zero_optimization.stage is 3 in the config, but the "
                                         "strategy's zero_optimization=False is 0"):
        ZeroStrategy(config={"zero_optimization": {"stage": 3}},
                     zero_optimization=False).engine_config(trainer)
    # logging_batch_size_per_gpu only stands in where the loader gives no batch size (in
    # Lightning's strategy it sizes DeepSpeed's throughput log, not the batches)
    trainer.fit_loop._data_source.instance = torch.utils.data.DataLoader(range(8), batch_size=8)
    assert ZeroStrategy(logging_batch_size_per_gpu=4).engine_config(trainer)[
        "train_micro_batch_size_per_gpu"] == 8
    # a device argument is the offload section's device: NVMe is refused as the config says
    nvme = ZeroStrategy(stage=2, offload_optimizer=True,
                        offload_optimizer_device="nvme").engine_config(trainer)
    with pytest.raises(ValueError, match="offload_optimizer.device: 'nvme' is not supported"):
        ZeroConfig.load(nvme)
