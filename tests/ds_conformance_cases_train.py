"""Ported cases: initialize patterns, configs, ZeRO training.

From DeepSpeed's tests/unit/runtime/test_ds_initialize.py, test_ds_config_dict.py and
runtime/zero/{test_zero,test_ignore_unused_parameters}.py. Every case trains against the
single-process reference of ds_conformance_cases.parity (or checks DeepSpeed's own expected
numbers); see that module for the rules.
"""

from __future__ import annotations

import json
import math
import os
from collections import namedtuple
from typing import NamedTuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, StepLR

import zero_ext

from ds_conformance_cases import (
    HIDDEN,
    LoudModel,
    SimpleModel,
    adam_config,
    assert_params_close,
    batch,
    build_engine,
    case,
    collectively,
    ds_adam,
    expect_zero_ext_error,
    full_params,
    model_fn,
    named,
    parity,
    rank,
    reference_copy,
    train_engine,
    train_reference,
    world,
)

INIT = "test_ds_initialize.py::"
CONFIG = "test_ds_config_dict.py::"
ZERO = "test_zero.py::"


# -- test_ds_initialize.py ------------------------------------------------------------------
@case(INIT + "TestClientOptimizer[None]")
def client_optimizer_none(tmp):
    # No client optimizer: the config's "Adam" (DeepSpeed: FusedAdam in adam_w_mode, weight
    # decay 0, lr 1e-3), and DeepSpeed's gradient_clipping default of 1.0 since the key is
    # absent. Ten steps make a weight decay of 0.01 visible (3e-5 of a weight).
    config = {"train_batch_size": world(), "optimizer": {"type": "Adam"}}
    result = parity(LoudModel, config, steps=10,
                    model_parameters=model_fn(lambda m: list(m.parameters())))
    assert result["engine"].get_global_grad_norm() > 2.0, "clipping would not act"


@case(INIT + "TestClientOptimizer[Optimizer]")
def client_optimizer_instance(tmp):
    # A torch.optim.Adam together with model_parameters, as DeepSpeed's test passes them: the
    # client's optimizer (L2-style Adam, torch's defaults) trains the model.
    config = {"train_batch_size": world()}
    parity(SimpleModel, config,
           model_parameters=model_fn(lambda m: list(m.parameters())),
           optimizer=model_fn(lambda m: torch.optim.Adam(m.parameters())),
           ref_optimizer=lambda ps: torch.optim.Adam(ps))


@case(INIT + "TestClientOptimizer[Callable]")
def client_optimizer_callable(tmp):
    # optimizer=callable(params) -> Optimizer: DeepSpeed calls it with model_parameters.
    config = {"train_batch_size": world()}
    parity(SimpleModel, config,
           model_parameters=model_fn(lambda m: list(m.parameters())),
           optimizer=lambda params: torch.optim.AdamW(params=params),
           ref_optimizer=lambda ps: torch.optim.AdamW(ps))


for _client in (True, False):
    @case(INIT + f"TestConfigOptimizer[client_parameters={_client}]", client=_client)
    def config_optimizer(tmp, client):
        # DeepSpeed's config verbatim but for the clipping: "Adam" with only lr set trains as
        # FusedAdam's defaults say (weight decay 0).
        config = {"train_batch_size": world(), "gradient_clipping": 1.0,
                  "optimizer": {"type": "Adam", "params": {"lr": 0.001}}}
        parity(SimpleModel, config, steps=10,
               model_parameters=model_fn(lambda m: list(m.parameters())) if client else None)


def _lr_schedule(engine, steps: int) -> list[float]:
    lrs = []
    for step in range(steps):
        train_engine(engine, 1, start=step)
        lrs.append(engine.get_lr()[0])
    return lrs


def _halving(epoch):
    return 0.5 ** epoch


@case(INIT + "TestClientLrScheduler[_LRScheduler-Optimizer]")
def client_scheduler_on_client_optimizer(tmp):
    # get_linear_schedule_with_warmup(opt)-style: a scheduler built on the client's optimizer,
    # passed with it. It must drive the engine's learning rate, and training must match torch
    # running the same optimizer and schedule.
    torch.manual_seed(3)
    model = SimpleModel()
    client = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = LambdaLR(client, _halving)
    engine, _, _, ds_scheduler = zero_ext.initialize(
        model=model, config={"train_batch_size": world(), "gradient_clipping": 1.0},
        model_parameters=list(model.parameters()), optimizer=client, lr_scheduler=scheduler)
    initial = full_params(engine)
    lrs = _lr_schedule(engine, 3)
    got = full_params(engine)
    reference = reference_copy(SimpleModel, initial)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    train_reference(reference, ref_opt, 3, clip=1.0, scheduler=LambdaLR(ref_opt, _halving))
    assert ds_scheduler is not None
    assert lrs == [0.01 * 0.5, 0.01 * 0.25, 0.01 * 0.125], lrs
    assert_params_close(got, named(reference), "client scheduler")


for _stage in (0, 1, 3):
    @case(INIT + f"TestClientOptimizer[script-schedule-stage{_stage}]", stage=_stage)
    def client_optimizer_driven_by_the_script(tmp, stage):
        # Not a DeepSpeed test: a scheduler built on the client's optimizer that the script
        # steps itself, not passed to initialize (DeepSpeed's ZeRO optimizer steps the client's
        # own groups, so it drives training). The engine's step uses the rate it sets, and
        # reading the client's groups gives the engine's. zero_ext used to copy the groups:
        # training went on at 0.01 silently.
        torch.manual_seed(3)
        model = SimpleModel()
        client = torch.optim.AdamW(model.parameters(), lr=0.01)
        scheduler = LambdaLR(client, _halving)
        engine, optimizer, _, _ = zero_ext.initialize(
            model=model, optimizer=client,
            config={"train_batch_size": world(), "zero_optimization": {"stage": stage}})
        initial = full_params(engine)
        lrs = []
        for step in range(3):
            train_engine(engine, 1, start=step)
            scheduler.step()
            lrs.append((engine.get_lr()[0], client.param_groups[0]["lr"]))
        got = full_params(engine)
        reference = reference_copy(SimpleModel, initial)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
        train_reference(reference, ref_opt, 3, clip=1.0, scheduler=LambdaLR(ref_opt, _halving))
        assert lrs == [(0.01 * 0.5 ** k, 0.01 * 0.5 ** k) for k in (1, 2, 3)], lrs
        assert client.param_groups is optimizer.param_groups
        assert_params_close(got, named(reference), "script-stepped client scheduler")


@case(INIT + "TestClientLrScheduler[_LRScheduler-None]")
def client_scheduler_on_foreign_optimizer(tmp):
    # A scheduler built on an optimizer the engine does not use, with the optimizer from the
    # config: DeepSpeed refuses (AssertionError); zero_ext must refuse too, saying why.
    model = SimpleModel()
    scheduler = LambdaLR(torch.optim.Adam(SimpleModel().parameters()), _halving)
    config = {"train_batch_size": world(), "optimizer": {"type": "Adam"}}
    expect_zero_ext_error(lambda: zero_ext.initialize(
        model=model, config=config, model_parameters=list(model.parameters()),
        lr_scheduler=scheduler), "lr_scheduler")


@case(INIT + "TestClientLrScheduler[Callable-Callable]")
def client_scheduler_callable(tmp):
    # Both callables: the scheduler factory is called with the engine's optimizer and drives it.
    model = SimpleModel()
    engine, _, _, scheduler = zero_ext.initialize(
        model=model, config={"train_batch_size": world()},
        model_parameters=list(model.parameters()),
        optimizer=lambda params: torch.optim.AdamW(params=params, lr=0.02),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, _halving))
    assert isinstance(scheduler, LambdaLR)
    assert _lr_schedule(engine, 3) == [0.01, 0.005, 0.0025]


@case(INIT + "TestClientLrScheduler[None-None]")
def config_scheduler(tmp):
    # Optimizer and scheduler from the config: DeepSpeed's WarmupLR (log warmup from
    # warmup_min_lr 0 to the optimizer's lr over warmup_num_steps 1000).
    model = SimpleModel()
    config = {"train_batch_size": world(),
              "optimizer": {"type": "Adam", "params": {"lr": 0.1, "weight_decay": 0.0}},
              "scheduler": {"type": "WarmupLR", "params": {}}}
    engine, _, _, scheduler = zero_ext.initialize(model=model, config=config,
                                                  model_parameters=list(model.parameters()))
    assert scheduler is not None
    lrs = _lr_schedule(engine, 3)
    # WarmupLR after k steps is at iteration k - 1: lr = max_lr * log(k) / log(1000), so 0
    # after the first step (DeepSpeed's lr_schedules.WarmupLR, warmup_type "log").
    expected = [0.1 * math.log(i) / math.log(1000) for i in (1, 2, 3)]
    for got, want in zip(lrs, expected):
        assert math.isclose(got, want, rel_tol=1e-9), (lrs, expected)


for _kind in ("None", "_LRScheduler", "Callable"):
    @case(INIT + f"TestClientLrSchedulerInit::test_diff_lrscheler_and_callable[{_kind}]",
          kind=_kind)
    def scheduler_precedence(tmp, kind):
        # A client scheduler (instance or callable) wins over the config's; without one the
        # config's is built.
        model = SimpleModel()
        client = torch.optim.Adam(model.parameters(), lr=0.01)
        config = {"train_batch_size": world()}
        scheduler = None
        if kind == "None":
            config["scheduler"] = {"type": "WarmupLR", "params": {}}
        elif kind == "_LRScheduler":
            scheduler = LambdaLR(client, _halving)
        else:
            def scheduler(optimizer):
                return StepLR(optimizer, step_size=1, gamma=0.1)
        engine, _, _, ds_scheduler = zero_ext.initialize(
            model=model, config=config, model_parameters=list(model.parameters()),
            optimizer=client, lr_scheduler=scheduler)
        lrs = _lr_schedule(engine, 2)
        if kind == "None":
            assert lrs == [0.0, 0.01 * math.log(2) / math.log(1000)], lrs
        elif kind == "_LRScheduler":
            assert ds_scheduler is scheduler and lrs == [0.005, 0.0025], lrs
        else:
            assert isinstance(ds_scheduler, StepLR)
            assert [round(v, 12) for v in lrs] == [0.001, 0.0001], lrs


_SUPPORTED = [(stage, dtype) for stage in (0, 1, 2, 3) for dtype in ("fp16", "bf16", "fp32")]
for _stage, _dtype in _SUPPORTED:
    _extension = {0: "None", 1: "zero1", 2: "zero2", 3: "zero3"}[_stage]
    @case(INIT + f"TestOptimizerImplementation[{_extension}-{_dtype}-None]", stage=_stage,
          dtype=_dtype)
    def optimizer_implementation(tmp, stage, dtype):
        # Every (ZeRO stage, model dtype) pair DeepSpeed supports initializes and trains.
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                  "fp16": {"enabled": dtype == "fp16"}, "bf16": {"enabled": dtype == "bf16"},
                  "optimizer": {"type": "Adam", "params": {"lr": 0.001, "weight_decay": 0.0}}}
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        model = SimpleModel()
        engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                              model_parameters=list(model.parameters()))
        before = full_params(engine)
        losses = train_engine(engine, 2, micro=1, dtype=torch_dtype[dtype])
        after = full_params(engine)
        assert all(math.isfinite(v) for v in losses), losses
        assert engine.global_steps == 2
        # fp16 at DeepSpeed's initial scale 2**16 may skip its first steps on overflow.
        changed = any(not torch.equal(before[n], after[n]) for n in before)
        assert changed or engine.skipped_steps == 2, engine.skipped_steps


@case(INIT + "TestBf16ZeRO0UnfusedOptimizer::test_static_scale_and_zero_grad_after_step")
def bf16_stage0_grads_freed(tmp):
    # bf16 at stage 0 with a client AdamW: the step leaves no gradient behind.
    model = SimpleModel(16)
    client = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = {"train_batch_size": world(), "train_micro_batch_size_per_gpu": 1,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()),
                                          optimizer=client)
    train_engine(engine, 1, micro=1, dtype=torch.bfloat16, hidden=16)
    assert engine.global_steps == 1
    assert all(p.grad is None for p in engine.module.parameters() if p.requires_grad)


# -- test_ds_config_dict.py (the parts that need an engine) ----------------------------------
def _batch_facts(config: dict) -> tuple:
    model = SimpleModel()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
    b = engine.batch
    return b.train_batch_size, b.train_micro_batch_size_per_gpu, b.gradient_accumulation_steps


@case(CONFIG + "TestBatchConfig[2-32-8-2-True]::initialize")
def batch_config_in_engine(tmp):
    # The engine runs the triple derived at the real world size (2): given any two of
    # (32, 8, 2), the third follows; the engine accumulates that many micro-steps per step.
    for given in ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8},
                  {"train_batch_size": 32, "gradient_accumulation_steps": 2},
                  {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}):
        assert _batch_facts(given) == (32, 8, 2), given
    model = SimpleModel()
    engine, _, _, _ = zero_ext.initialize(
        model=model, config={"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8},
        model_parameters=list(model.parameters()))
    train_engine(engine, 1, gas=2, micro=8)
    assert (engine.global_steps, engine.micro_steps) == (1, 2)


@case(CONFIG + "TestBatchConfig[2-33-17-2-False]::initialize")
def batch_config_refused_in_engine(tmp):
    # DeepSpeed: AssertionError; here the config's error, which names the keys and the
    # arithmetic.
    model = SimpleModel()
    try:
        zero_ext.initialize(
            model=model, config={"train_batch_size": 33, "train_micro_batch_size_per_gpu": 17,
                                 "gradient_accumulation_steps": 2},
            model_parameters=list(model.parameters()))
    except ValueError as error:
        assert "train_batch_size (33)" in str(error) and "68" in str(error), str(error)
    else:
        raise AssertionError("an inconsistent batch triple was accepted")


for _source in ("dict", "json"):
    @case(CONFIG + f"TestConfigLoad::test_{_source}", source=_source)
    def config_load(tmp, source):
        # The same config as a dict and as a JSON file path trains the same way.
        config = {"train_batch_size": world(), "gradient_clipping": 1.0,
                  "optimizer": {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.0}},
                  "bf16": {"enabled": True}}
        if source == "json":
            path = os.path.join(tmp, "config.json")
            if rank() == 0:
                with open(path, "w") as f:
                    json.dump(config, f)
            torch.distributed.barrier()
            model = SimpleModel()
            engine, _, _, _ = zero_ext.initialize(model=model, config=path,
                                                  model_parameters=list(model.parameters()))
            assert engine.config.bf16.enabled and engine.get_lr() == [0.01]
        parity(SimpleModel, config, model_parameters=model_fn(lambda m: list(m.parameters())))


@case(CONFIG + "TestNoModel")
def no_model(tmp):
    # initialize(model=None) is refused (DeepSpeed: AssertionError), with a message.
    try:
        zero_ext.initialize(model=None, config={"train_batch_size": world()})
    except (TypeError, ValueError, AttributeError) as error:
        assert "model" in str(error), str(error)
    else:
        raise AssertionError("initialize(model=None) was accepted")


# -- test_zero.py -----------------------------------------------------------------------------
def _unbalanced_toggle(model: nn.Module, micro_step: int) -> None:
    # DeepSpeed's drop_some_gradients: on odd micro-steps only odd-indexed parameters train,
    # on even ones only even-indexed.
    odd = (micro_step + 1) % 2
    for i, p in enumerate(model.parameters()):
        p.requires_grad = (i % 2) == odd


for _stage in (1, 2, 3):
    @case(ZERO + f"TestZeroUnbalancedGradients[{_stage}]", stage=_stage)
    def unbalanced_gradients(tmp, stage):
        config = adam_config(stage, gradient_accumulation_steps=2)
        parity(lambda: SimpleModel(4, nlayers=2), config, toggle=_unbalanced_toggle, steps=4,
               hidden=4)


class AlbertLikeModel(nn.Module):
    """One linear layer run three times per forward (ALBERT's shared layers)."""

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.cross_entropy = nn.CrossEntropyLoss()

    def forward(self, x, y):
        hidden = x
        for _ in range(3):
            hidden = hidden + self.linear(hidden)
        return self.cross_entropy(hidden.float(), y)


@case(ZERO + "TestZero3RepeatForwardLoop[mics_enabled=False]")
def repeat_forward_loop(tmp):
    config = adam_config(3, gradient_accumulation_steps=2)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    parity(AlbertLikeModel, config, steps=3)


class ChainModel(nn.Module):
    """DeepSpeed's TestZeroToFP32 model: 2 * world_size linears of 3x3 (+ a 4->1 classifier
    in the one-group variant), 53 elements with 2 ranks: an uneven count across ranks."""

    def __init__(self, n_layers: int, freeze: bool, classifier: bool):
        super().__init__()
        self.ll = nn.ModuleList(nn.Linear(3, 3) for _ in range(n_layers))
        if classifier:
            self.classifier = nn.Linear(4, 1)
        self.cross_entropy = nn.CrossEntropyLoss()
        if freeze:
            self.ll[0].weight.requires_grad = False
            self.ll[0].bias.requires_grad = False

    def forward(self, x, y):
        for layer in self.ll:
            x = layer(x)
        return self.cross_entropy(x.float(), y)


for _stage in (2, 3):
    for _freeze in (True, False):
        for _groups in (1, 2):
            _name = "test_1_param_group" if _groups == 1 else "test_2_param_groups"
            @case(ZERO + f"TestZeroToFP32::{_name}[{_freeze}-{_stage}]", stage=_stage,
                  freeze=_freeze, groups=_groups)
            def zero_to_fp32(tmp, stage, freeze, groups):
                # Train, save, consolidate: the fp32 weights of the checkpoint equal the
                # trained parameters (frozen ones too), and training matched the reference.
                config = adam_config(stage, gradient_accumulation_steps=2)
                config["zero_optimization"]["stage3_param_persistence_threshold"] = 0

                def factory():
                    return ChainModel(2 * world(), freeze, classifier=groups == 1)

                def split(model):
                    if groups == 1:
                        return None
                    return [{"params": [m.weight for m in model.ll if m.weight.requires_grad],
                             "weight_decay": 0.01},
                            {"params": [m.bias for m in model.ll if m.bias.requires_grad],
                             "weight_decay": 0.0}]

                def ref_groups(model):
                    return split(model) or [p for p in model.parameters() if p.requires_grad]

                _zero_to_fp32(tmp, config, factory, split, ref_groups)


def _zero_to_fp32(tmp, config, factory, split, ref_groups):
    torch.manual_seed(1234)
    model = factory()
    groups = split(model)
    engine, _, _, _ = zero_ext.initialize(model=model, config=config, model_parameters=groups)
    initial = full_params(engine)
    train_engine(engine, 2, gas=2, hidden=3)
    trained = full_params(engine)
    engine.save_checkpoint(tmp)
    torch.distributed.barrier()
    reference = reference_copy(factory, initial)
    train_reference(reference, ds_adam(ref_groups(reference), config), 2, gas=2, clip=1.0,
                    hidden=3)
    assert_params_close(trained, named(reference), "training")
    out = os.path.join(tmp, f"consolidated-{rank()}.safetensors")
    zero_ext.consolidate(tmp, out)
    from safetensors.torch import load_file
    fp32 = load_file(out)
    for name, value in trained.items():
        assert torch.equal(fp32[name].float(), value), name


@case(ZERO + "TestIncorectAllgatherBucketSize[1000]")
def allgather_bucket_size(tmp):
    config = adam_config(2, gradient_accumulation_steps=2)
    config["zero_optimization"]["allgather_bucket_size"] = 1000
    parity(lambda: SimpleModel(4), config, steps=2, hidden=4)


class EltwiseMultiplicationModule(nn.Module):
    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return self.weight * x


OUTPUT_KEYS = ("hidden1", "hidden2", "y_hat", "loss")
OutputsNamedTuple = NamedTuple("OutputsNamedTuple", [(k, torch.Tensor) for k in OUTPUT_KEYS])
outputs_namedtuple = namedtuple("outputs_namedtuple", OUTPUT_KEYS)


class EltwiseMultiplicationNetwork(nn.Module):
    """Three element-wise weights (3x5) in sequence and an L1 loss without reduction; the
    forward returns its four outputs as `kind` (dict, NamedTuple, namedtuple, tuple, list)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.layer1, self.layer2, self.layer3 = (
            EltwiseMultiplicationModule(nn.Parameter(torch.zeros(3, 5))) for _ in range(3))
        self.loss = nn.L1Loss(reduction="none")

    def forward(self, x, y):
        hidden1 = self.layer1(x)
        hidden2 = self.layer2(hidden1)
        y_hat = self.layer3(hidden2)
        values = (hidden1, hidden2, y_hat, self.loss(y_hat, y))
        if self.kind == "Dict":
            return dict(zip(OUTPUT_KEYS, values))
        if self.kind == "NamedTuple":
            return OutputsNamedTuple(*values)
        if self.kind == "namedtuple":
            return outputs_namedtuple(*values)
        return tuple(values) if self.kind == "Tuple" else list(values)


def as_dict(outputs) -> dict:
    return outputs if isinstance(outputs, dict) else dict(zip(OUTPUT_KEYS, outputs))


# DeepSpeed's expected outputs for weights i = 1, 2, 3 whose first 8 of 15 elements (rank 0's
# partition at 2 ranks) hold i and the other 7 hold 2 * i, with x = y = 1.
_EXPECTED = {
    "hidden1": [[1, 1, 1, 1, 1], [1, 1, 1, 2, 2], [2, 2, 2, 2, 2]],
    "hidden2": [[2, 2, 2, 2, 2], [2, 2, 2, 8, 8], [8, 8, 8, 8, 8]],
    "y_hat": [[6, 6, 6, 6, 6], [6, 6, 6, 48, 48], [48, 48, 48, 48, 48]],
    "loss": [[5, 5, 5, 5, 5], [5, 5, 5, 47, 47], [47, 47, 47, 47, 47]],
}


def _partition_pattern(i: int) -> torch.Tensor:
    flat = torch.full((15,), float(i + 1))
    flat[8:] *= 2
    return flat.view(3, 5)


def _param_partitioning(kind="Dict", threshold=0, fp16=False, prefetching=False,
                        offload_optimizer=False, contiguous_gradients=False,
                        reduce_scatter=False):
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
              "zero_optimization": {
                  "stage": 3, "stage3_max_reuse_distance": 0,
                  "stage3_param_persistence_threshold": threshold,
                  "stage3_prefetch_bucket_size": 45 if prefetching else 0},
              "optimizer": {"type": "Adam", "params": {"lr": 1.0, "weight_decay": 0.0}}}
    if contiguous_gradients:
        config["zero_optimization"]["contiguous_gradients"] = True
    if reduce_scatter:
        config["zero_optimization"]["reduce_scatter"] = True
    if fp16:
        config["fp16"] = {"enabled": True, "loss_scale": 1.0}
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    dtype = torch.float16 if fp16 else torch.float32
    model = EltwiseMultiplicationNetwork(kind)
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
    layers = [model.layer1, model.layer2, model.layer3]
    # DeepSpeed writes each rank's partition directly; from the outside that is a gathered
    # write by one rank.
    def write():
        with zero_ext.GatheredParameters([m.weight for m in layers], modifier_rank=0):
            if rank() == 0:
                with torch.no_grad():
                    for i, m in enumerate(layers):
                        m.weight.copy_(_partition_pattern(i))

    collectively(write)
    initial = full_params(engine)
    ones = torch.ones(3, 5, dtype=dtype)
    first = None
    for _ in range(3):
        outputs = as_dict(engine(ones, ones))
        if first is None:
            first = {k: v.detach().float() for k, v in outputs.items()}
        engine.backward(outputs["loss"].sum())
        engine.step()
    got = full_params(engine)

    reference = EltwiseMultiplicationNetwork(kind)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(initial[name])
    opt = torch.optim.AdamW(reference.parameters(), lr=1.0, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        # The gradient is averaged over ranks that all see the same batch.
        as_dict(reference(ones.float(), ones.float()))["loss"].sum().backward()
        opt.step()
    for key, expected in _EXPECTED.items():
        assert torch.equal(first[key], torch.tensor(expected, dtype=torch.float32)), \
            (key, first[key])
    for name, p in initial.items():
        assert torch.equal(p, _partition_pattern(int(name[5]) - 1)), name
    assert_params_close(got, named(reference), "after 3 steps", dtype, initial)


for _kind in ("Dict", "NamedTuple", "namedtuple", "Tuple", "List"):
    case(ZERO + f"TestZero3ParamPartitioningBase::test_model_class[EltwiseMultiplication"
         f"TestNetwork_{_kind}]", kind=_kind)(lambda tmp, kind: _param_partitioning(kind))
for _threshold in (0, 10):
    case(ZERO + f"TestZero3ParamPartitioningBase::test_param_persistence_threshold"
         f"[{_threshold}]", threshold=_threshold)(
        lambda tmp, threshold: _param_partitioning(threshold=threshold))
for _key in ("fp16_enabled", "prefetching", "offload_optimizer", "contiguous_gradients",
             "reduce_scatter"):
    case(ZERO + f"TestZero3ParamPartitioningBase::test_{_key}[True]", key=_key)(
        lambda tmp, key: _param_partitioning(**{key.replace("_enabled", ""): True}))


class ManyParamModel(nn.Module):
    """Layers of element-wise weights, each written in the constructor under
    GatheredParameters(modifier_rank=0): partition p of layer l holds 1 + 0.1 * l + p."""

    def __init__(self, n_layers: int = 6, size: int = 10):
        super().__init__()
        self.layers = nn.ModuleList(
            EltwiseMultiplicationModule(nn.Parameter(torch.empty(size)))
            for _ in range(n_layers))
        for layer_num, module in enumerate(self.layers):
            with zero_ext.GatheredParameters(module.weight, modifier_rank=0):
                with torch.no_grad():
                    module.weight.copy_(_many_param_values(layer_num, size))

    def forward(self, x):
        activations = []
        for module in self.layers:
            x = module(x)
            activations.append(x)
        return activations


def _many_param_values(layer_num: int, size: int) -> torch.Tensor:
    part = math.ceil(size / world())
    return torch.tensor([1 + 0.1 * layer_num + i // part for i in range(size)])


for _init in (True, False):
    @case(ZERO + f"TestZero3ParamPartitioningManyParams[{_init}]", init=_init)
    def many_params(tmp, init):
        config = {"train_micro_batch_size_per_gpu": 1,
                  "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0},
                  "optimizer": {"type": "Adam", "params": {"lr": 1.0, "weight_decay": 0.0}}}
        engine = build_engine(config, None, ManyParamModel, init=init)
        activations = engine(torch.ones(10))
        engine.backward(activations[-1].sum())
        engine.step()
        expected = torch.ones(10)
        for layer_num, activation in enumerate(activations):
            expected = expected * _many_param_values(layer_num, 10)
            torch.testing.assert_close(activation.detach(), expected, msg=f"layer {layer_num}")


@case(ZERO + "TestZeroOffloadStage1")
def offload_stage1(tmp):
    config = adam_config(1, lr=1e-4, gradient_accumulation_steps=2)
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    parity(SimpleModel, config, steps=3)


class DictFwdModel(nn.Module):
    def __init__(self, return_type: str):
        super().__init__()
        self.return_type = return_type
        self.l1 = nn.Linear(HIDDEN, HIDDEN)
        self.cel = nn.CrossEntropyLoss()

    def forward(self, x, y):
        x = self.l1(x)
        loss = self.cel(x.float(), y)
        if self.return_type == "dict":
            return {"a": x, "loss": loss, "b": 1, "c": None}
        return [x, loss] if self.return_type == "list" else (x, loss)


for _return in ("tuple", "list", "dict"):
    @case(ZERO + f"TestZero3DictFwd[{_return}]", return_type=_return)
    def dict_forward(tmp, return_type):
        config = adam_config(3, lr=1e-4)
        parity(lambda: DictFwdModel(return_type), config, init=True, steps=2)


for _stage in (1, 2, 3):
    @case(ZERO + f"TestZeroAdamOptimizerStepCount[{_stage}]", stage=_stage)
    def adam_step_count(tmp, stage):
        # global_steps counts boundaries from 0; Adam's bias correction (its step count) follows
        # them, which the reference checks through the parameters.
        config = adam_config(stage, gradient_accumulation_steps=2)
        config["zero_optimization"].update(stage3_param_persistence_threshold=0,
                                           sub_group_size=4)
        torch.manual_seed(1234)
        model = SimpleModel(4, nlayers=12)
        engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                              model_parameters=list(model.parameters()))
        assert engine.global_steps == 0
        initial = full_params(engine)
        boundaries = 0
        for step in range(4):
            for m in range(2):
                x, y = batch(step, m, rank(), 2, hidden=4)
                engine.backward(engine(x, y))
                boundaries += engine.is_gradient_accumulation_boundary()
                engine.step()
                assert engine.global_steps == boundaries
        got = full_params(engine)
        reference = reference_copy(lambda: SimpleModel(4, nlayers=12), initial)
        train_reference(reference, ds_adam(list(reference.parameters()), config), 4, gas=2,
                        clip=1.0, hidden=4)
        assert_params_close(got, named(reference))


class FrozenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(HIDDEN, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, HIDDEN)
        self.act = nn.ReLU()
        self.cel = nn.CrossEntropyLoss()
        self.l2.weight.requires_grad = False
        self.l2.bias.requires_grad = False

    def forward(self, x, y):
        x = self.l2(self.act(self.l1(x)))
        return x, self.cel(x.float(), y)


for _stage in (1, 2, 3):
    @case(ZERO + f"TestZeroFrozenWeights[{_stage}]", stage=_stage)
    def frozen_weights(tmp, stage):
        config = {"train_batch_size": 2 * world(), "gradient_clipping": 1.0,
                  "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.0}},
                  "zero_optimization": {"stage": stage}}
        result = parity(FrozenModel, config, init=stage == 3, steps=3)
        for name in ("l2.weight", "l2.bias"):
            assert torch.equal(result["params"][name], result["initial"][name]), name


@case(ZERO + "TestZeroOffloadOptim[False]")
def offload_with_client_optimizer(tmp):
    # A client torch Adam with the optimizer offloaded at stage 1: accepted and trained as Adam.
    config = {"train_batch_size": 4 * world(), "gradient_accumulation_steps": 2,
              "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    parity(SimpleModel, config,
           optimizer=model_fn(lambda m: torch.optim.Adam(m.parameters())),
           ref_optimizer=lambda ps: torch.optim.Adam(ps))


class FourLayers(SimpleModel):
    def __init__(self):
        super().__init__(4, nlayers=4)


for _client in (True, False):
    for _empty_weights in (True, False):
        @case(ZERO + f"TestEmptyParameterGroup[fp32-{_empty_weights}-{_client}]",
              client=_client, empty_weights=_empty_weights)
        def empty_parameter_group(tmp, client, empty_weights):
            # One group empty: the other group's parameters train; the parameters in no group
            # (all biases, or all weights) are not optimized, as in plain PyTorch.
            def groups(model):
                weights = [m.weight for m in model.linears]
                biases = [m.bias for m in model.linears]
                return [{"params": [] if empty_weights else weights, "weight_decay": 0.01},
                        {"params": biases if empty_weights else [], "weight_decay": 0.0}]

            config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0,
                      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
            if client:
                optimizer = model_fn(lambda m: torch.optim.AdamW(groups(m), lr=0.1))
                model_parameters = model_fn(lambda m: list(m.parameters()))
            else:
                config["optimizer"] = {"type": "adamw",
                                       "params": {"lr": 0.1, "weight_decay": 0.0}}
                optimizer, model_parameters = None, model_fn(groups)

            def ref_optimizer(param_groups):
                return torch.optim.AdamW(param_groups, lr=0.1)

            def ref_groups(model):
                return [g for g in groups(model) if g["params"]]

            result = parity(FourLayers, config, optimizer=optimizer, steps=2, hidden=4,
                            model_parameters=model_parameters,
                            ref_optimizer=ref_optimizer if client else None,
                            ref_groups=ref_groups)
            untouched = "weight" if empty_weights else "bias"
            for name, value in result["params"].items():
                if name.endswith(untouched):
                    assert torch.equal(value, result["initial"][name]), name


# -- test_ignore_unused_parameters.py ---------------------------------------------------------
for _ignore in (False, True):
    @case(f"test_ignore_unused_parameters.py::TestStage2IgnoreUnusedParameters[{_ignore}]",
          ignore=_ignore)
    def ignore_unused_parameters(tmp, ignore):
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                  "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": 2, "cpu_offload": True,
                                        "ignore_unused_parameters": ignore},
                  "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.0}}}
        if ignore:
            parity(lambda: SimpleModel(4, empty_grad=True), config, steps=2, hidden=4)
            return
        # DeepSpeed: AssertionError naming ignore_unused_parameters, at the first reduction.
        model = SimpleModel(4, empty_grad=True)
        engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                              model_parameters=list(model.parameters()))
        try:
            train_engine(engine, 2, gas=2, hidden=4)
        except Exception as error:  # noqa: BLE001 - which error is checked here
            text = str(error)
            assert "ignore_unused_parameters" in text and "unused" in text, text
            return
        raise AssertionError("a parameter without a gradient was accepted with "
                             "ignore_unused_parameters false")


# -- test_ds_initialize.py::TestNoOptim ------------------------------------------------------
for _stage in (0, 3):
    @case(f"test_ds_initialize.py::TestNoOptim[{_stage}]", stage=_stage)
    def no_optimizer_forward(tmp, stage):
        # A deep model (Init at stage 3, parameters offloaded), forward passes only: the outputs
        # are those of the same weights in plain PyTorch.
        config = {"train_batch_size": world(),
                  "zero_optimization": {"stage": stage, "offload_param": {"device": "cpu"}},
                  "bf16": {"enabled": True}}

        def factory():
            return SimpleModel(4, nlayers=20)

        if stage == 3:
            with zero_ext.Init(config=config):
                model = factory()
        else:
            model = factory()
        try:
            engine, _, _, _ = zero_ext.initialize(model=model, config=config)
        except ValueError as error:
            # DeepSpeed ignores offload_param below stage 3; refusing it, naming the key and
            # the fix, is allowed (never accepted and ignored in silence).
            assert stage < 3 and "offload_param" in str(error) and "stage" in str(error), \
                str(error)
            return
        weights = full_params(engine)
        reference = reference_copy(factory, weights).to(torch.bfloat16)
        for step in range(3):
            x, y = batch(step, 0, rank(), 1, torch.bfloat16, hidden=4)
            with torch.no_grad():
                got = engine(x, y)
                want = reference(x, y)
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
