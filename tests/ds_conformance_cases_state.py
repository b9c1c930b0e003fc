"""Ported cases: checkpoints, zero_ext.Init and GatheredParameters, world-size changes.

From DeepSpeed's tests/unit/checkpoint/{test_zero_optimizer,test_latest_checkpoint,
test_lr_scheduler,test_other_optimizer}.py and runtime/zero/{test_zero_context,test_zero}.py.
DeepSpeed's checkpoint_correctness_verification compares optimizer internals after a load; the
ports check it from the outside: the loaded parameters and counters equal the saved ones, and
the loaded engine then trains exactly as the saving engine goes on training (optimizer state
restored) or as a fresh optimizer from the saved weights (optimizer state not loaded).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

import zero_ext

from ds_conformance_cases import (
    HIDDEN,
    SimpleModel,
    assert_params_close,
    batch,
    build_engine,
    case,
    collectively,
    ds_adam,
    ds_clip,
    expect_zero_ext_error,
    full_params,
    named,
    parity,
    rank,
    reference_copy,
    train_engine,
    train_reference,
    world,
)

ZERO_CKPT = "test_zero_optimizer.py::TestZeROCheckpoint::"
LATEST = "test_latest_checkpoint.py::TestLatestCheckpoint::"
LR = "test_lr_scheduler.py::TestLRSchedulerCheckpoint::"
OTHER = "test_other_optimizer.py::TestOtherOptimizerCheckpoint::"
ZERO = "test_zero.py::"
ELASTIC = "test_zero_optimizer.py::TestZeROElasticCheckpoint::"

STEPS, MORE = 3, 2


def ckpt_config(stage: int, offload: bool = False, dtype: str = "fp32", **extra) -> dict:
    """DeepSpeed's checkpoint tests' config (Adam with betas 0.8, weight decay 3e-7), 2 samples
    per rank; "cpu_offload" is DeepSpeed's legacy spelling of offload_optimizer."""
    config = {"train_batch_size": 2 * world(), "gradient_clipping": 1.0,
              "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "betas": [0.8, 0.999],
                                                       "eps": 1e-8, "weight_decay": 3e-7}},
              "zero_optimization": {"stage": stage, "cpu_offload": offload}, **extra}
    if dtype != "fp32":
        config[dtype] = {"enabled": True}
    return config


def _dtype(config: dict):
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if config.get("fp16", {}).get("enabled") else torch.float32


def round_trip(tmp: str, config: dict, *, tag="1", load_config: dict | None = None,
               factory=SimpleModel, **load_args) -> dict:
    """DeepSpeed's checkpoint_correctness_verification from the outside: engine A trains STEPS
    steps and saves; engine B (other initial weights) loads; both then train MORE steps on the
    same batches. Collective; returns what each side saw."""
    dtype = _dtype(config)
    a = build_engine(config, seed=1, factory=factory)
    train_engine(a, STEPS, dtype=dtype)
    saved = {"params": full_params(a), "global_steps": a.global_steps,
             "skipped_steps": a.skipped_steps, "lr": a.get_lr(), "scale": _scale(a)}
    a.save_checkpoint(os.path.join(tmp, "saved"), tag=tag)
    b = build_engine(load_config or config, seed=2, factory=factory)
    fresh = {"params": full_params(b), "lr": b.get_lr()}
    result = b.load_checkpoint(os.path.join(tmp, "saved"), tag=tag, **load_args)
    loaded = {"params": full_params(b), "global_steps": b.global_steps,
              "skipped_steps": b.skipped_steps, "lr": b.get_lr(), "scale": _scale(b),
              "result": result}
    a_lrs, b_lrs = [], []
    for step in range(STEPS, STEPS + MORE):
        train_engine(a, 1, start=step, dtype=dtype)
        train_engine(b, 1, start=step, dtype=dtype)
        a_lrs.append(a.get_lr())
        b_lrs.append(b.get_lr())
    return {"saved": saved, "fresh": fresh, "loaded": loaded, "a_after": full_params(a),
            "b_after": full_params(b), "a_lrs": a_lrs, "b_lrs": b_lrs, "dtype": dtype,
            "factory": factory}


def _scale(engine) -> float | None:
    return engine.loss_scaler.scale if engine.loss_scaler is not None else None


def assert_loaded_as_saved(r: dict, counters: bool = True) -> None:
    for name, value in r["saved"]["params"].items():
        assert torch.equal(r["loaded"]["params"][name], value), f"loaded {name} != saved"
    if counters:
        assert r["loaded"]["global_steps"] == r["saved"]["global_steps"]
        assert r["loaded"]["skipped_steps"] == r["saved"]["skipped_steps"]


def assert_continues_like_saver(r: dict) -> None:
    """Optimizer state restored: B's further training is A's."""
    assert_params_close(r["b_after"], r["a_after"], "continued training", torch.float32)


def assert_continues_fresh(r: dict, config: dict) -> None:
    """Optimizer state not restored: B trains on like a new Adam from the saved weights (and
    so unlike A, which shows that assert_continues_like_saver can tell the two apart)."""
    assert any(not torch.equal(r["b_after"][n], r["a_after"][n]) for n in r["a_after"]), \
        "a fresh optimizer trained exactly like the restored one"
    reference = reference_copy(r["factory"], r["saved"]["params"])
    optimizer = ds_adam([p for p in reference.parameters() if p.requires_grad], config)
    train_reference(reference, optimizer, MORE, start=STEPS, clip=ds_clip(config))
    assert_params_close(r["b_after"], named(reference), "fresh optimizer", r["dtype"],
                        r["saved"]["params"])


_OPTIMIZER_STATE = [(0, False), (1, False), (2, False), (2, True), (3, False), (3, True)]
for _stage, _offload in _OPTIMIZER_STATE:
    @case(ZERO_CKPT + f"test_load_optimizer_state[{_stage}-{_offload}]", stage=_stage,
          offload=_offload)
    def load_optimizer_state(tmp, stage, offload):
        config = ckpt_config(stage, offload, "bf16", wall_clock_breakdown=True)
        # lr 1e-2 (DeepSpeed's test: 1.5e-4): the further steps must move bf16 weights for a
        # wrong optimizer state to show.
        config["optimizer"]["params"]["lr"] = 1e-2
        r = round_trip(tmp, config, load_optimizer_states=True)
        assert_loaded_as_saved(r)
        assert_continues_like_saver(r)

for _stage, _offload in _OPTIMIZER_STATE[1:]:
    @case(ZERO_CKPT + f"test_not_load_optimizer_state[{_stage}-{_offload}]", stage=_stage,
          offload=_offload)
    def not_load_optimizer_state(tmp, stage, offload):
        config = ckpt_config(stage, offload)
        r = round_trip(tmp, config, load_optimizer_states=False)
        assert_loaded_as_saved(r)
        assert_continues_fresh(r, config)

for _stage in (0, 3):  # one code path for every stage; the two ends of it
    @case(ZERO_CKPT + f"fp16_scale_fresh_without_optimizer_states[{_stage}]", stage=_stage)
    def fresh_loss_scale(tmp, stage):
        """The loss scaler is part of DeepSpeed's optimizer state: load_optimizer_states=False
        leaves the loading engine's scale fresh (2**8), the saved one (grown by
        loss_scale_window 1) comes with the optimizer states only."""
        config = ckpt_config(stage, dtype="fp16")
        config["fp16"].update(initial_scale_power=8, loss_scale_window=1)
        for load in (False, True):
            r = round_trip(os.path.join(tmp, str(load)), config, load_optimizer_states=load)
            assert r["saved"]["scale"] > 2 ** 8, r["saved"]
            assert r["loaded"]["scale"] == (r["saved"]["scale"] if load else 2 ** 8), \
                (load, r["saved"]["scale"], r["loaded"]["scale"])


for _stage in (0, 1, 2, 3):
    @case(ZERO_CKPT + f"test_load_module_only[{_stage}]", stage=_stage)
    def load_module_only(tmp, stage):
        config = ckpt_config(stage)
        r = round_trip(tmp, config, load_module_only=True)
        assert_loaded_as_saved(r, counters=False)
        assert r["loaded"]["global_steps"] == 0, "load_module_only restored the step count"
        assert_continues_fresh(r, config)


@case(ZERO_CKPT + "test_load_optimizer_state[change_stage_1_to_3]")
def load_at_another_stage(tmp):
    # zero_ext's checkpoints load at any stage (DeepSpeed needs its universal checkpoint).
    r = round_trip(tmp, ckpt_config(1), load_config=ckpt_config(3))
    assert_loaded_as_saved(r)
    assert_continues_like_saver(r)


@case(LATEST + "test_existing_latest")
def existing_latest(tmp):
    config = {"train_batch_size": 2 * world(), "gradient_clipping": 1.0,
              "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "weight_decay": 0.0}}}
    config["zero_optimization"] = {"stage": 0}
    r = round_trip(tmp, config, tag=None, load_optimizer_states=True,
                   load_lr_scheduler_states=False)
    assert_loaded_as_saved(r)
    assert_continues_like_saver(r)
    path, _ = r["loaded"]["result"]
    assert os.path.basename(os.path.normpath(path)) == f"global_step{STEPS}", path


@case(LATEST + "test_missing_latest")
def missing_latest(tmp):
    # No checkpoint in the directory: DeepSpeed warns and returns (None, None); the script
    # starts fresh.
    engine = build_engine({"train_batch_size": 2 * world(), "zero_optimization": {"stage": 0},
                     "optimizer": {"type": "Adam",
                                   "params": {"lr": 0.00015, "weight_decay": 0.0}}}, seed=1)
    before = full_params(engine)
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine.load_checkpoint(empty)
    after = full_params(engine)
    assert tuple(result) == (None, None), result
    assert all(torch.equal(before[n], after[n]) for n in before)
    if rank() == 0:
        assert caught, "no warning that nothing was loaded"


_LR_CASES = [(0, False), (1, False), (2, False), (2, True), (3, False), (3, True)]
_WARMUP = {"type": "WarmupLR",
           "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000}}
for _stage, _offload in _LR_CASES:
    @case(LR + f"test_checkpoint_lr_scheduler[{_stage}-{_offload}]", stage=_stage,
          offload=_offload)
    def checkpoint_lr_scheduler(tmp, stage, offload):
        config = ckpt_config(stage, offload, scheduler=_WARMUP)
        r = round_trip(tmp, config, load_optimizer_states=False, load_lr_scheduler_states=True)
        assert_loaded_as_saved(r)
        assert r["loaded"]["lr"] == r["saved"]["lr"] != r["fresh"]["lr"], \
            (r["loaded"]["lr"], r["saved"]["lr"], r["fresh"]["lr"])
        assert r["b_lrs"] == r["a_lrs"], (r["b_lrs"], r["a_lrs"])

for _stage, _offload in ((1, False), (3, False)):
    @case(LR + f"test_checkpoint_no_lr_scheduler[{_stage}-{_offload}]", stage=_stage,
          offload=_offload)
    def checkpoint_no_lr_scheduler(tmp, stage, offload):
        config = ckpt_config(stage, offload, scheduler=_WARMUP)
        config["optimizer"]["params"] = {"lr": 1e-5}
        r = round_trip(tmp, config, load_optimizer_states=False, load_lr_scheduler_states=False)
        assert_loaded_as_saved(r)
        # The scheduler was not loaded: it goes on from where the loading engine's was.
        assert r["loaded"]["lr"] == r["fresh"]["lr"], (r["loaded"]["lr"], r["fresh"]["lr"])


for _dtype_name in ("bf16", "fp16"):
    for _load in (True, False):
        @case(OTHER + f"test_checkpoint_fused_optimizer[{_dtype_name}-load_optimizer_states="
              f"{_load}]", dtype=_dtype_name, load=_load)
        def checkpoint_fused_optimizer(tmp, dtype, load):
            config = ckpt_config(0, dtype=dtype)
            config.pop("zero_optimization")
            # lr 1e-2 instead of 1.5e-4: updates must be visible in 16-bit weights for the
            # fresh-optimizer reference to tell anything.
            config["optimizer"]["params"]["lr"] = 1e-2
            if dtype == "fp16":
                config["fp16"].update(initial_scale_power=8, loss_scale_window=2)
            r = round_trip(tmp, config, load_optimizer_states=load)
            assert_loaded_as_saved(r)
            if dtype == "fp16" and load:
                # DeepSpeed keeps the dynamic loss scale in the optimizer's state: restored
                # with it (2**8, doubled on clean step 3 with a window of 2).
                assert r["loaded"]["scale"] == r["saved"]["scale"] == 2 ** 9, \
                    (r["loaded"]["scale"], r["saved"]["scale"])
            if load:
                assert_continues_like_saver(r)
            else:
                assert_continues_fresh(r, config)


@case(OTHER + "test_checkpoint_fp32_optimizer")
def checkpoint_fp32_optimizer(tmp):
    config = ckpt_config(0)
    config.pop("zero_optimization")
    r = round_trip(tmp, config)
    assert_loaded_as_saved(r)
    assert_continues_like_saver(r)


# -- loading at another world size (the ws-3 group loads what the ws-2 group saved) ----------
def elastic_dir(tmp: str, stage: int) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(tmp)), f"elastic-stage{stage}")


def _elastic_config(stage):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.0}},
            "zero_optimization": {"stage": stage}}


for _stage in (2, 3):
    @case(ELASTIC + f"test_elastic_checkpoint_change_dp[save-stage{_stage}]", stage=_stage)
    def elastic_save(tmp, stage):
        engine = build_engine(_elastic_config(stage), seed=5)
        initial = full_params(engine)
        train_engine(engine, STEPS)
        trained = full_params(engine)
        directory = elastic_dir(tmp, stage)
        engine.save_checkpoint(directory)
        if rank() == 0:
            torch.save({"initial": initial, "trained": trained, "world_size": world()},
                       os.path.join(directory, "reference.pt"))
        dist.barrier()

    @case(ELASTIC + f"test_elastic_checkpoint_change_dp[load-stage{_stage}]", world_size=3,
          stage=_stage)
    def elastic_load(tmp, stage):
        # Saved at 2 ranks, loaded at 3: the weights are the saved ones and training goes on as
        # one uninterrupted single-process run (Adam state included) would.
        directory = elastic_dir(tmp, stage)
        saved = torch.load(os.path.join(directory, "reference.pt"), weights_only=True)
        engine = build_engine(_elastic_config(stage), seed=6)
        engine.load_checkpoint(directory)
        loaded = full_params(engine)
        train_engine(engine, MORE, start=STEPS)
        got = full_params(engine)
        assert engine.global_steps == STEPS + MORE
        for name, value in saved["trained"].items():
            assert torch.equal(loaded[name], value), name
        reference = reference_copy(SimpleModel, saved["initial"])
        optimizer = ds_adam(list(reference.parameters()), _elastic_config(stage))
        train_reference(reference, optimizer, STEPS, clip=1.0, world_size=saved["world_size"])
        train_reference(reference, optimizer, MORE, start=STEPS, clip=1.0)
        assert_params_close(got, named(reference), "after the resharded load")


# -- test_fp16.py::TestZeroEmptyPartition and test_zero.py large parameters at 3 ranks --------
class TwoParams(nn.Module):
    """Two one-element parameters: at 3 ranks one rank's partition is empty."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x, y):
        return ((self.linear(x[:, :1]) - y[:, None].float() / HIDDEN) ** 2).mean()


for _stage, _offload in ((1, False), (2, False), (2, True), (3, False)):
    @case(f"test_fp16.py::TestZeroEmptyPartition[{_offload}-{_stage}]", world_size=3,
          stage=_stage, offload=_offload)
    def empty_partition(tmp, stage, offload):
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 1.0,
                  "optimizer": {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.0}},
                  "zero_optimization": {"stage": stage, "cpu_offload": offload,
                                        "reduce_bucket_size": 100,
                                        "allgather_bucket_size": 100,
                                        "stage3_param_persistence_threshold": 0}}
        parity(TwoParams, config, steps=3)


class LargeParamModel(nn.Module):
    """One 8101-element parameter (uneven over 3 ranks), filled on rank 0 only with each
    partition's index: the values must come from rank 0."""

    SIZE = 8101

    def __init__(self):
        super().__init__()
        self.param = nn.Parameter(torch.zeros(self.SIZE))
        if rank() == 0:
            with torch.no_grad():
                self.param.copy_(_large_param_values())

    def forward(self, x):
        return x * self.param


def _large_param_values() -> torch.Tensor:
    part = -(-LargeParamModel.SIZE // world())
    return torch.arange(LargeParamModel.SIZE).div(part, rounding_mode="floor").float()


for _init in (True, False):
    @case(ZERO + f"TestZero3ParamPartitioningLargeParam[{_init}]", world_size=3, init=_init)
    def large_param(tmp, init):
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
                  "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0,
                                        "overlap_comm": True},
                  "optimizer": {"type": "Adam", "params": {"lr": 1.0, "weight_decay": 0.0}}}
        try:
            engine = build_engine(config, None, LargeParamModel, init=init)
        except Exception as error:  # noqa: BLE001 - Init may refuse loudly
            assert init and str(error).startswith("zero_ext"), repr(error)
            return
        ones = torch.ones(LargeParamModel.SIZE)
        activations = []
        for _ in range(3):
            activation = engine(ones)
            activations.append(activation.detach().clone())
            engine.backward(activation.sum())
            engine.step()
        got = full_params(engine)["param"]
        assert torch.equal(activations[0], _large_param_values())
        # d(sum(x * p))/dp = 1 everywhere: Adam at lr 1 moves every element by 1 per step.
        reference = nn.Parameter(_large_param_values())
        optimizer = torch.optim.AdamW([reference], lr=1.0, weight_decay=0.0)
        for _ in range(3):
            optimizer.zero_grad()
            (ones * reference).sum().backward()
            optimizer.step()
        torch.testing.assert_close(got, reference.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(activations[1], _large_param_values() - 1.0, rtol=0,
                                   atol=1e-5)


# -- test_shared_weights.py and test_tag_validation.py ---------------------------------------
class ModelWithSharedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer0 = nn.Linear(10, 10)
        self.layer1 = nn.Linear(20, 20)
        self.layer2 = nn.Linear(20, 20)
        self.layer1.weight = self.layer2.weight  # tied


@case("test_shared_weights.py::TestCheckpointSharedWeights::test_checkpoint_shared_weights")
def checkpoint_shared_weights(tmp):
    # A checkpoint of a model with tied weights consolidates to a state dict that a fresh
    # model loads strictly, with the engine's values.
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}
    torch.manual_seed(8)
    model = ModelWithSharedWeights()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          optimizer=torch.optim.Adam(model.parameters()))
    state = engine.full_state_dict()
    engine.save_checkpoint(tmp, tag="checkpoint")
    dist.barrier()
    out = os.path.join(tmp, f"fp32-{rank()}.safetensors")
    zero_ext.consolidate(tmp, out, tag="checkpoint")
    from safetensors.torch import load_file
    fresh = ModelWithSharedWeights()
    fresh.load_state_dict(load_file(out), strict=True)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, state[name].float()), name
    assert fresh.layer1.weight is fresh.layer2.weight


for _save_dir in ("None", "empty_string"):
    @case(f"test_tag_validation.py::TestSaveCheckpointInvalidDir::"
          f"test_save_checkpoint_empty_dir[{_save_dir}]", save_dir=_save_dir)
    def save_checkpoint_empty_dir(tmp, save_dir):
        # DeepSpeed: ValueError; nothing may be written into the working directory.
        engine = build_engine({"train_batch_size": 2 * world(), "zero_optimization": {"stage": 0}},
                        seed=1)
        before = set(os.listdir("."))
        try:
            engine.save_checkpoint(None if save_dir == "None" else "")
        except Exception as error:  # noqa: BLE001 - any clear refusal (DeepSpeed: ValueError)
            assert str(error).startswith("zero_ext") and "save_dir" in str(error), str(error)
        else:
            raise AssertionError(f"save_checkpoint({save_dir}) was accepted")
        assert set(os.listdir(".")) == before, "files appeared in the working directory"


# -- test_zero_optimizer.py: edge cases and frozen weights ------------------------------------
EDGE = "test_zero_optimizer.py::TestZeROSaveLoadEdgeCase::"
FROZEN = "test_zero_optimizer.py::TestZeROCheckpointFrozenWeights::"


def _edge_config(stage: int) -> dict:
    return {"train_batch_size": 2 * world(), "gradient_clipping": 1.0,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.0}},
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}


for _stage in (0, 1, 2, 3):
    @case(EDGE + f"test_immediate_save_load[{_stage}]", stage=_stage)
    def immediate_save_load(tmp, stage):
        # A checkpoint of an engine that never stepped loads back into it unchanged.
        engine = build_engine(_edge_config(stage), seed=1)
        before = full_params(engine)
        engine.save_checkpoint(tmp)
        engine.load_checkpoint(tmp, load_optimizer_states=False,
                               load_lr_scheduler_states=False, load_module_only=False)
        after = full_params(engine)
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert engine.global_steps == 0

    @case(EDGE + f"test_load_immediate_save[{_stage}]", stage=_stage)
    def load_immediate_save(tmp, stage):
        # Train one step and save; a fresh engine loads it and saves again at once (the same
        # default tag, global_step1): the second checkpoint holds the same weights.
        config = _edge_config(stage)
        first = build_engine(config, seed=1)
        train_engine(first, 1, dtype=torch.bfloat16)
        trained = full_params(first)
        first.save_checkpoint(tmp)
        second = build_engine(config, seed=2)
        second.load_checkpoint(tmp, load_optimizer_states=False,
                               load_lr_scheduler_states=False, load_module_only=False)
        second.save_checkpoint(tmp)
        third = build_engine(config, seed=3)
        third.load_checkpoint(tmp)
        reloaded = full_params(third)
        assert all(torch.equal(trained[n], reloaded[n]) for n in trained)
        assert third.global_steps == 1

    @case(EDGE + f"test_save_before_accum_grad_is_done[{_stage}]", stage=_stage)
    def save_before_accumulation_done(tmp, stage):
        # One micro-step of a 2-step window, then save_16bit_model: the saved weights are the
        # current ones. save_checkpoint there writes them too, as DeepSpeed's does (its test
        # saves both), saying that the window's gradients are not in it.
        config = {**_edge_config(stage), "train_batch_size": 2 * world(),
                  "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2}
        config["zero_optimization"]["stage3_gather_fp16_weights_on_model_save"] = True
        engine = build_engine(config, seed=1)
        x, y = batch(0, 0, rank(), 1, torch.bfloat16)
        engine.backward(engine(x, y))
        engine.step()
        current = full_params(engine)
        path = engine.save_16bit_model(tmp, "model.safetensors")
        dist.barrier()
        from safetensors.torch import load_file
        saved = load_file(path)
        for name, value in current.items():
            assert torch.equal(saved[name].float(), value), name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.save_checkpoint(tmp)
        said = [str(w.message) for w in caught if "middle of a gradient" in str(w.message)]
        assert len(said) == (rank() == 0), said


class SimpleFrozenModel(nn.Module):
    """DeepSpeed's SimpleFrozenModel: two linears, the first frozen, each layer's input also
    going through the first."""

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.cross_entropy_loss = nn.CrossEntropyLoss()
        self.linears[0].weight.requires_grad = False
        self.linears[0].bias.requires_grad = False

    def forward(self, x, y):
        for i, layer in enumerate(self.linears):
            x = self.linears[i // 2](x) + layer(x)
        return self.cross_entropy_loss(x.float(), y)


for _stage in (1, 2, 3):
    @case(FROZEN + f"test_load_optimizer_state[{_stage}]", stage=_stage)
    def frozen_load_optimizer_state(tmp, stage):
        config = ckpt_config(stage, dtype="bf16", wall_clock_breakdown=True)
        config["optimizer"]["params"]["lr"] = 1e-2
        r = round_trip(tmp, config, factory=SimpleFrozenModel, load_optimizer_states=True)
        assert_loaded_as_saved(r)
        assert_continues_like_saver(r)

    @case(FROZEN + f"test_not_load_optimizer_state[{_stage}]", stage=_stage)
    def frozen_not_load_optimizer_state(tmp, stage):
        config = ckpt_config(stage)
        r = round_trip(tmp, config, factory=SimpleFrozenModel, load_optimizer_states=False)
        assert_loaded_as_saved(r)
        assert_continues_fresh(r, config)

    @case(FROZEN + f"test_load_module_only[{_stage}]", stage=_stage)
    def frozen_load_module_only(tmp, stage):
        config = ckpt_config(stage)
        r = round_trip(tmp, config, factory=SimpleFrozenModel, load_module_only=True)
        assert_loaded_as_saved(r, counters=False)
        assert_continues_fresh(r, config)

for _stage in (1, 2):
    @case(FROZEN + f"test_save_exclude_frozen_weights[{_stage}]", stage=_stage)
    def save_exclude_frozen_weights(tmp, stage):
        # With exclude_frozen_parameters the checkpoint holds exactly the trainable
        # parameters; without it, all of them (seen through zero_ext.consolidate).
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "Adam"}}
        engine = build_engine(config, seed=1, factory=SimpleFrozenModel)
        model = engine.module
        every = os.path.join(tmp, "all_params")
        trainable_only = os.path.join(tmp, "no_frozen_params")
        engine.save_checkpoint(every)
        engine.save_checkpoint(trainable_only, exclude_frozen_parameters=True)
        dist.barrier()
        from safetensors.torch import load_file
        names = {}
        for directory in (every, trainable_only):
            out = os.path.join(directory, f"consolidated-{rank()}.safetensors")
            zero_ext.consolidate(directory, out)
            names[directory] = set(load_file(out))
        params = {n for n, _ in model.named_parameters()}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names[every] & params == params, names[every]
        assert names[trainable_only] & params == trainable, names[trainable_only]


def _load_mid_window(tmp, stage: int) -> None:
    """zero_ext's: load_checkpoint after a backward of a window begun (gradient_accumulation_steps
    2, one micro-step in; at stages 0-1 its gradient waits in .grad, at 2-3 in the fp32 shard
    sum) drops that window: the loaded engine's next window trains exactly as an engine that
    loaded the same checkpoint fresh."""
    config = {**ckpt_config(stage), "train_batch_size": 4 * world(),
              "train_micro_batch_size_per_gpu": 2}
    saver = build_engine(config, seed=1)
    saver.save_checkpoint(os.path.join(tmp, "saved"), tag="0")
    x, y = batch(7, 0, rank(), 2)
    saver.backward(saver(x, y))
    saver.step()  # the window's first micro-step
    saver.load_checkpoint(os.path.join(tmp, "saved"), tag="0")
    fresh = build_engine(config, seed=2)
    fresh.load_checkpoint(os.path.join(tmp, "saved"), tag="0")
    train_engine(saver, 1, gas=2)
    train_engine(fresh, 1, gas=2)
    got, want = full_params(saver), full_params(fresh)
    assert all(torch.equal(got[n], want[n]) for n in want), \
        [n for n in want if not torch.equal(got[n], want[n])]


for _stage in (0, 1, 2, 3):
    case(ZERO_CKPT + f"zero_ext::load_mid_window_drops_its_gradients[{_stage}]",
         stage=_stage)(_load_mid_window)


def _positional(tmp, stage: int) -> None:
    """DeepSpeed's load_checkpoint(load_dir, tag, load_module_strict, load_optimizer_states,
    ...): a script's positional (dir, tag, True, False) loads without the optimizer state,
    exactly as load_optimizer_states=False by keyword; the next step of both is the same, and
    differs from a load with it (the check sees the state)."""
    config = ckpt_config(stage)
    saver = build_engine(config, seed=1)
    train_engine(saver, STEPS)
    saver.save_checkpoint(os.path.join(tmp, "saved"), tag="t")
    after = []
    for args, kwargs in ((("t", True, False), {}), (("t",), {"load_optimizer_states": False}),
                         (("t",), {})):
        engine = build_engine(config, seed=2)
        engine.load_checkpoint(os.path.join(tmp, "saved"), *args, **kwargs)
        train_engine(engine, 1, start=STEPS)
        after.append(full_params(engine))
    assert all(torch.equal(after[0][n], after[1][n]) for n in after[0])
    assert not all(torch.equal(after[0][n], after[2][n]) for n in after[0])


for _stage in (1, 3):
    case(ZERO_CKPT + f"zero_ext::load_checkpoint_positional_arguments[{_stage}]",
         stage=_stage)(_positional)


class _Counted(SimpleModel):
    """SimpleModel with a buffer, and optionally one more trainable layer, for what a
    checkpoint and a model may not share."""

    def __init__(self, buffer: bool = True, extra: bool = False):
        super().__init__()
        if buffer:
            self.register_buffer("seen", torch.full((3,), 7.0))
        if extra:
            self.extra = nn.Linear(HIDDEN, HIDDEN)


def _strict(tmp, stage: int) -> None:
    """load_module_strict: a checkpoint without the model's buffer, and with a layer the model
    lacks, is refused by default (naming the layer and the way out) and loaded with
    load_module_strict=False: the
    shared trainable parameters are the saver's, the buffer keeps the model's value, and the
    loaded engine trains on exactly as the saver does. custom_load_fn is refused."""
    config = ckpt_config(stage)
    saver = build_engine(config, seed=1, factory=lambda: _Counted(buffer=False, extra=True))
    train_engine(saver, STEPS)
    saved = full_params(saver)
    saver.save_checkpoint(os.path.join(tmp, "saved"), tag="t")
    loader = build_engine(config, seed=2, factory=_Counted)
    with torch.no_grad():
        loader.module.seen.fill_(5.0)
    load = functools.partial(loader.load_checkpoint, os.path.join(tmp, "saved"), "t")
    collectively(lambda: expect_zero_ext_error(load, "extra.weight", "load_module_strict"))
    collectively(lambda: expect_zero_ext_error(
        lambda: load(load_module_strict=False, custom_load_fn=lambda src, dst: None),
        "custom_load_fn"))
    load(load_module_strict=False)
    got = full_params(loader)
    assert all(torch.equal(got[n], saved[n]) for n in got), sorted(got)
    assert torch.equal(loader.module.seen, torch.full((3,), 5.0))
    train_engine(saver, 1, start=STEPS)
    train_engine(loader, 1, start=STEPS)
    ours, theirs = full_params(loader), full_params(saver)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


for _stage in (0, 2, 3):
    case(ZERO_CKPT + f"zero_ext::load_module_strict[{_stage}]", stage=_stage)(_strict)


def _tied_since(tmp, stage: int) -> None:
    """A checkpoint whose two layers trained apart, loaded strictly into the model with the
    second layer's weight tied to the first's: refused, naming the tie (it was loaded with
    the second layer's training thrown away)."""
    config = ckpt_config(stage)
    two = functools.partial(SimpleModel, nlayers=2)
    saver = build_engine(config, seed=1, factory=two)
    train_engine(saver, STEPS)
    saver.save_checkpoint(os.path.join(tmp, "saved"), tag="t")

    def tied():
        model = two()
        model.linears[1].weight = model.linears[0].weight
        return model

    loader = build_engine(config, seed=2, factory=tied)
    load = functools.partial(loader.load_checkpoint, os.path.join(tmp, "saved"), "t")
    collectively(lambda: expect_zero_ext_error(
        load, "linears.1.weight is tied to linears.0.weight", "load_module_strict"))


for _stage in (1, 3):
    case(ZERO_CKPT + f"zero_ext::load_refuses_a_layer_tied_since[{_stage}]",
         stage=_stage)(_tied_since)


def _frozen_since(tmp, stage: int) -> None:
    """A checkpoint of a model that trained every layer, loaded (strictly, and with
    load_module_strict=False) into the same model with its first layer frozen (phase two of a
    run that freezes the embeddings): the frozen layer gets its saved fp32 master weights, the
    others theirs, exactly."""
    config = ckpt_config(stage)
    two = functools.partial(SimpleModel, nlayers=2)
    saver = build_engine(config, seed=1, factory=two)
    train_engine(saver, STEPS)
    saved = full_params(saver)
    saver.save_checkpoint(os.path.join(tmp, "saved"), tag="t")

    def frozen_first():
        model = two()
        model.linears[0].requires_grad_(False)
        return model

    for strict in (True, False):
        loader = build_engine(config, seed=2, factory=frozen_first)
        loader.load_checkpoint(os.path.join(tmp, "saved"), "t", strict)
        got = full_params(loader)
        assert sorted(got) == sorted(saved)
        wrong = [n for n in got if not torch.equal(got[n], saved[n])]
        assert not wrong, (strict, wrong)


for _stage in (0, 2, 3):
    case(ZERO_CKPT + f"zero_ext::load_into_a_model_that_froze_a_trained_layer[{_stage}]",
         stage=_stage)(_frozen_since)
