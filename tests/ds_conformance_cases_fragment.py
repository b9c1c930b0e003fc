"""Ported cases: a parameter's fp32 weights, optimizer state and gradient by DeepSpeed's
deepspeed.utils functions (zero_ext.utils), and the engine's DeepSpeed accessors.

From DeepSpeed's tests/unit/runtime/zero/test_zero_tensor_fragment.py. DeepSpeed's cases check
that the getters return something (None for frozen parameters) and that what a setter wrote is
read back; the ports check that too and, against single-process plain PyTorch (torch.optim.AdamW
on the whole batch), that the values are the right ones: the gradient the step will apply, the
master weights, Adam's moments after each step, and that what the setters write is what the
next step reads (weights, moments, gradients seen by clipping).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import zero_ext
from zero_ext.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_grad,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_grad,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_grad,
    safe_set_local_optimizer_state,
    safe_update_full_grad_vectorized,
)

from ds_conformance_cases import (
    HIDDEN,
    SimpleModel,
    batch,
    build_engine,
    case,
    collectively,
    ds_adam,
    expect_zero_ext_error,
    full_params,
    loss_of,
    rank,
    reference_copy,
    train_engine,
    world,
)
from ds_conformance_cases_precision import GradientProbe

FRAGMENT = "test_zero_tensor_fragment.py::"
ZERO = "test_zero.py::"
MANAGED = ZERO + "TestUnmanagedGradientAccumulation::"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KEYS = ("exp_avg", "exp_avg_sq")


class MyModel(nn.Module):
    """DeepSpeed's test model: three linears (hidden -> 1 -> 1 -> hidden) with ReLU, then
    cross-entropy; `frozen` freezes the first."""

    def __init__(self, hidden: int = HIDDEN, frozen: bool = False):
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(hidden, 1), nn.Linear(1, 1),
                                      nn.Linear(1, hidden)])
        if frozen:
            self.linears[0].requires_grad_(False)
        self.cross_entropy = nn.CrossEntropyLoss()

    def forward(self, x, y):
        for linear in self.linears:
            x = torch.relu(linear(x))
        return self.cross_entropy(x.float(), y)


def fragment_config(stage: int, dtype: str = "fp32", offload: str = "none", **extra) -> dict:
    """DeepSpeed's fragment-test config: Adam at lr 1e-3 (its 1e-6 moves nothing a test could
    see), 2 samples per rank; stage 3 partitions every parameter; fp16 starts at scale 2**8 as
    its set test does."""
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    if offload in ("optimizer", "both"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload == "both":
        zero["offload_param"] = {"device": "cpu"}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.0}},
              "zero_optimization": zero, **extra}
    if dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8}
    elif dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def build(model_factory, config: dict):
    """The engine (under zero_ext.Init at stage 3) and a plain fp32 copy of its initial model."""
    engine = build_engine(config, 1234, model_factory)
    initial = {n: v.float().clone() for n, v in engine.full_state_dict().items()}
    return engine, reference_copy(model_factory, initial)


def engine_backward(engine, step: int, dtype=torch.float32) -> None:
    x, y = batch(step, 0, rank(), 2, dtype)
    engine.backward(engine(x, y))


def reference_backward(reference: nn.Module, step: int) -> None:
    """The whole batch's gradient (the mean of every rank's micro-batch loss), in fp32."""
    reference.zero_grad(set_to_none=True)
    losses = [reference(*batch(step, 0, r, 2)) for r in range(world())]
    (sum(losses) / world()).backward()
    for p in reference.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def reference_step(reference: nn.Module, optimizer, clip: float = 1.0) -> None:
    params = [p for p in reference.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, label: str) -> None:
    """fp32 element-wise; 16-bit as a whole (relative error of the tensor under 5%)."""
    assert got is not None, f"{label}: None"
    got = got.detach().float().cpu()
    want = want.detach().float().cpu()
    assert got.shape == want.shape, f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if dtype == torch.float32:
        assert_close(got, want, rtol=1e-5, atol=1e-6, msg=label)
        return
    error = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    assert error < 0.05, f"{label}: relative error {error:.3g}"


# -- TestTensorFragmentGet ---------------------------------------------------------------------
def _get(tmp, stage: int, dtype: str, offload: str, frozen: bool) -> None:
    """DeepSpeed's test: after backward the weights and gradients of every trainable parameter,
    after step its moments, are there (None for the frozen ones). Here also: each equals the
    single-process reference's (gradient before clipping, master weights, AdamW's exp_avg and
    exp_avg_sq), whole and, at stage 3, as the concatenation of every rank's fragment."""
    torch_dtype = DTYPES[dtype]
    engine, reference = build(lambda: MyModel(frozen=frozen), fragment_config(stage, dtype,
                                                                             offload))
    optimizer = ds_adam([p for p in reference.parameters() if p.requires_grad],
                        fragment_config(stage))
    named = dict(engine.module.named_parameters())
    ref = dict(reference.named_parameters())
    problems = []
    for step in range(2):
        engine_backward(engine, step, torch_dtype)
        reference_backward(reference, step)
        before = {n: p.detach().clone() for n, p in ref.items()}
        got = {n: (safe_get_full_grad(p), safe_get_full_fp32_param(p)) for n, p in named.items()}
        local = _gather_local(engine, named, stage, ("grad", "fp32"))
        engine.step()
        reference_step(reference, optimizer)
        states = {n: [safe_get_full_optimizer_state(p, key) for key in KEYS]
                  for n, p in named.items()}
        local_states = _gather_local(engine, named, stage, KEYS)
        for name, (grad, weight) in got.items():
            try:
                if not named[name].requires_grad:
                    assert grad is None and weight is None and states[name] == [None, None], \
                        f"{name} (frozen) gave a value"
                    continue
                close(grad, ref[name].grad, torch_dtype, f"step {step} grad {name}")
                close(weight, before[name], torch_dtype, f"step {step} fp32 {name}")
                for key, value in zip(KEYS, states[name]):
                    close(value, optimizer.state[ref[name]][key], torch_dtype,
                          f"step {step} {key} {name}")
                for what, value in {**local.get(name, {}), **local_states.get(name, {})}.items():
                    whole = {"grad": grad, "fp32": weight, **dict(zip(KEYS, states[name]))}
                    assert torch.equal(value, whole[what].flatten().cpu()), \
                        f"step {step}: the ranks' local {what} of {name} != the full one"
            except AssertionError as error:
                problems.append(str(error))
    assert not problems, "\n".join(problems[:6])


def _gather_local(engine, named: dict, stage: int, whats) -> dict:
    """At stage 3: {name: {what: every rank's local fragment, concatenated in rank order}}."""
    if stage != 3:
        return {}
    out = {}
    for name, param in named.items():
        if not param.requires_grad:
            continue
        out[name] = {}
        for what in whats:
            mine = safe_get_local_grad(param) if what == "grad" else \
                safe_get_local_fp32_param(param) if what == "fp32" else \
                safe_get_local_optimizer_state(param, what)
            pieces = [None] * world()
            dist.all_gather_object(pieces, mine.cpu())
            out[name][what] = torch.cat(pieces)
    return out


for _stage in (1, 2, 3):
    for _dtype in DTYPES:
        for _offload in ("none", "optimizer"):
            for _frozen in (True, False):
                case(FRAGMENT + f"TestTensorFragmentGet::test_zero_fragments[{_frozen}-"
                     f"{_offload}-{_stage}-{_dtype}]", stage=_stage, dtype=_dtype,
                     offload=_offload, frozen=_frozen)(_get)
# Beyond DeepSpeed's parametrization: stage 0, offload_param, and 3 ranks (uneven shards).
case(FRAGMENT + "TestTensorFragmentGet::test_zero_fragments[False-none-0-fp32]", stage=0,
     dtype="fp32", offload="none", frozen=False)(_get)
case(FRAGMENT + "TestTensorFragmentGet::test_zero_fragments[False-both-3-bf16]", stage=3,
     dtype="bf16", offload="both", frozen=False)(_get)
for _stage in (1, 2, 3):
    case(FRAGMENT + f"TestTensorFragmentGet::test_zero_fragments[True-none-{_stage}-fp32]",
         world_size=3, stage=_stage, dtype="fp32", offload="none", frozen=True)(_get)


# -- TestTensorFragmentSet ---------------------------------------------------------------------
def _random_like(named: dict, seed: int, dtype=torch.float32, local: bool = False) -> dict:
    """A random value per trainable parameter: whole and the same on every rank, or (`local`)
    shaped as this rank's fragment and different on each."""
    gen = torch.Generator().manual_seed(seed + (1000 * rank() if local else 0))
    out = {}
    for name, param in named.items():
        if param.requires_grad:
            shape = safe_get_local_fp32_param(param).shape if local else \
                safe_get_full_fp32_param(param).shape
            out[name] = torch.rand(shape, generator=gen).to(dtype)
    return out


def _set(tmp, stage: int, dtype: str, offload: str, api: str) -> None:
    """DeepSpeed's test: random weights and gradients set after backward, random weights and
    moments after step, each read back equal. Here also (fp32, whole values): the next step
    continues from exactly what was set, as torch.optim.AdamW does from the same weights and
    moments, and the model computes with the weights set."""
    torch_dtype = DTYPES[dtype]
    local = api == "local"
    set_weight = safe_set_local_fp32_param if local else safe_set_full_fp32_param
    get_weight = safe_get_local_fp32_param if local else safe_get_full_fp32_param
    set_grad = safe_set_local_grad if local else safe_set_full_grad
    get_grad = safe_get_local_grad if local else safe_get_full_grad
    set_state = safe_set_local_optimizer_state if local else safe_set_full_optimizer_state
    get_state = safe_get_local_optimizer_state if local else safe_get_full_optimizer_state
    engine, reference = build(MyModel, fragment_config(stage, dtype, offload))
    named = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    problems = []

    def check(what: str, got, want) -> None:
        if not torch.equal(got.cpu(), want.float()):
            problems.append(f"{what}: read back {got.flatten()[:4].tolist()} where "
                            f"{want.flatten()[:4].tolist()} was set")

    engine_backward(engine, 0, torch_dtype)
    weights, grads = _random_like(named, 1, local=local), _random_like(named, 2, torch_dtype,
                                                                          local=local)
    reduced = {name: get_grad(param) for name, param in named.items()}
    for name, param in named.items():
        set_weight(param, weights[name])
    for name, param in named.items():  # the weights set left the gradients alone
        check(f"after setting the weights: grad {name}", get_grad(param), reduced[name])
    for name, param in named.items():
        set_grad(param, grads[name])
    for name, param in named.items():
        check(f"after backward: weight {name}", get_weight(param), weights[name])
        check(f"after backward: grad {name}", get_grad(param), grads[name])
    engine.step()
    values = {what: _random_like(named, seed, local=local)
              for seed, what in enumerate(("fp32",) + KEYS, start=3)}
    for name, param in named.items():
        set_weight(param, values["fp32"][name])
        for key in KEYS:
            set_state(param, values[key][name], key)
    for name, param in named.items():
        check(f"after step: weight {name}", get_weight(param), values["fp32"][name])
        for key in KEYS:
            check(f"after step: {key} {name}", get_state(param, key), values[key][name])
    assert not problems, "\n".join(problems[:6])
    model_weights = engine.full_state_dict()
    for name, param in named.items():
        whole = safe_get_full_fp32_param(param).cpu() if local else values["fp32"][name]
        assert torch.equal(model_weights[name], whole.to(torch_dtype)), \
            f"the model's {name} is not the fp32 weights set"
    if local or torch_dtype != torch.float32:
        return
    # One more step from the set state, against torch.optim.AdamW from the same state.
    ref = dict(reference.named_parameters())
    optimizer = ds_adam([p for p in reference.parameters() if p.requires_grad],
                        fragment_config(stage))
    reference_backward(reference, 0)
    optimizer.step()  # creates the state (its step count matches the engine's: 1)
    with torch.no_grad():
        for name in named:
            ref[name].copy_(values["fp32"][name])
            for key in KEYS:
                optimizer.state[ref[name]][key].copy_(values[key][name])
    engine_backward(engine, 1)
    engine.step()
    reference_backward(reference, 1)
    reference_step(reference, optimizer)
    for name, param in named.items():
        close(safe_get_full_fp32_param(param), ref[name], torch.float32,
              f"the step after the set state: {name}")


for _stage in (0, 1, 2, 3):
    for _dtype in DTYPES:
        for _offload in ("none", "optimizer") if _stage else ("none",):
            for _api in ("local", "full") if _stage == 3 else ("full",):
                case(FRAGMENT + f"TestTensorFragmentSet::test_zero_fragments[{_dtype}-"
                     f"{_offload}-{_stage}-{_api}]", stage=_stage, dtype=_dtype,
                     offload=_offload, api=_api)(_set)
for _stage in (1, 3):
    case(FRAGMENT + f"TestTensorFragmentSet::test_zero_fragments[fp32-none-{_stage}-full]",
         world_size=3, stage=_stage, dtype="fp32", offload="none", api="full")(_set)
case(FRAGMENT + "TestTensorFragmentSet::test_zero_fragments[bf16-both-3-full]", stage=3,
     dtype="bf16", offload="both", api="full")(_set)


# -- TestTensorFragmentUpdate ------------------------------------------------------------------
def _update(tmp, stage: int, dtype: str, offload: str) -> None:
    """DeepSpeed's test: safe_update_full_grad_vectorized replaces the gradients, read back
    equal. Here also (fp32): the step applies them, clipped by their own norm (DeepSpeed's
    default clipping of 1.0; these random gradients' norm is well above it), as
    torch.optim.AdamW applies the same gradients."""
    torch_dtype = DTYPES[dtype]
    engine, reference = build(MyModel, fragment_config(stage, dtype, offload))
    named = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    new = _random_like(named, 7, torch_dtype)
    by_param = {named[n]: v for n, v in new.items()}
    engine_backward(engine, 0, torch_dtype)
    seen = {}

    def update(old, param):
        seen[param] = old
        return by_param[param]

    safe_update_full_grad_vectorized(list(named.values()), update)
    assert len(seen) == len(named) and all(g.dtype == torch.float32 for g in seen.values())
    for name, param in named.items():
        assert torch.equal(safe_get_full_grad(param).cpu(), new[name].float()), name
    engine.step()
    if torch_dtype != torch.float32:
        return
    ref = dict(reference.named_parameters())
    optimizer = ds_adam([p for p in reference.parameters() if p.requires_grad],
                        fragment_config(stage))
    for name in named:
        ref[name].grad = new[name].clone()
    reference_step(reference, optimizer)
    total = torch.cat([v.flatten() for v in new.values()]).norm().item()
    assert total > 2, f"the new gradients' norm {total} does not make clipping act"
    assert abs(engine.get_global_grad_norm() - total) < 1e-4 * total, \
        f"clipping saw norm {engine.get_global_grad_norm()}, the gradients set have {total}"
    for name, param in named.items():
        close(safe_get_full_fp32_param(param), ref[name], torch.float32, f"after step: {name}")


for _stage in (0, 1, 2, 3):
    for _dtype in DTYPES:
        for _offload in ("none", "optimizer") if _stage else ("none",):
            case(FRAGMENT + f"TestTensorFragmentUpdate::test_zero_fragments[{_dtype}-"
                 f"{_offload}-{_stage}-False]", stage=_stage, dtype=_dtype,
                 offload=_offload)(_update)
case(FRAGMENT + "TestTensorFragmentUpdate::test_zero_fragments[fp32-none-2-False]",
     world_size=3, stage=2, dtype="fp32", offload="none")(_update)


# -- TestZeroBf16Fp32GradAccum -----------------------------------------------------------------
class ScaleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (self.weight * x).sum()


def _fp32_average(tmp, stage: int) -> None:
    """bf16 gradients reduced in fp32 (communication_data_type): the gradient read is the exact
    fp32 average, not rounded back to bf16 (1.0 and 1.0078125 average to 1.00390625, which
    bf16 cannot hold). With DeepSpeed's data_types.grad_accum_dtype fp32, as its test sets."""
    model = ScaleModel()
    engine, _, _, _ = zero_ext.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-6, "torch_adam": True}},
        "bf16": {"enabled": True}, "zero_optimization": {"stage": stage}},
        model_parameters=list(model.parameters()))
    local_grad = 1.0 if rank() == 0 else 1.0078125
    engine.backward(engine(torch.full((4,), local_grad, dtype=torch.bfloat16)))
    grad = safe_get_full_grad(engine.module.weight)
    assert grad.dtype == torch.float32
    assert torch.equal(grad, torch.full((4,), 1.00390625)), grad


for _stage in (2, 3):
    case(FRAGMENT + f"TestZeroBf16Fp32GradAccum::"
         f"test_safe_get_full_grad_preserves_fp32_reduced_average[{_stage}]",
         stage=_stage)(_fp32_average)


# -- zero_ext's errors -------------------------------------------------------------------------
@case(FRAGMENT + "zero_ext::misuse_is_named")
def misuse_is_named(tmp):
    """Each misuse is an error naming it, raised on every rank alike (no rank is left in a
    collective): a gradient before backward, between accumulation boundaries and after step;
    the local functions below stage 3; a value of the wrong shape; an unknown state key."""
    engine, _ = build(MyModel, fragment_config(2, gradient_accumulation_steps=2))
    weight = engine.module.linears[0].weight
    collectively(lambda: expect_zero_ext_error(lambda: safe_get_full_grad(weight),
                                               "after the backward", "accumulation"))
    engine_backward(engine, 0)
    collectively(lambda: expect_zero_ext_error(lambda: safe_get_full_grad(weight),
                                               "after the backward"))
    engine.step()
    engine_backward(engine, 0)
    grad = safe_get_full_grad(weight)
    assert grad is not None and grad.shape == weight.shape
    engine.step()
    collectively(lambda: expect_zero_ext_error(lambda: safe_get_full_grad(weight),
                                               "before engine.step()"))
    collectively(lambda: expect_zero_ext_error(lambda: safe_get_local_fp32_param(weight),
                                               "stage 3", "stage 2", "safe_*_full_*"))
    collectively(lambda: expect_zero_ext_error(
        lambda: safe_set_full_fp32_param(weight, torch.zeros(3)), "whole parameter",
        str(tuple(weight.shape))))
    collectively(lambda: expect_zero_ext_error(
        lambda: safe_get_full_optimizer_state(weight, "momentum_buffer"), "momentum_buffer",
        "exp_avg_sq"))


@case(FRAGMENT + "zero_ext::fp16_gradient_past_the_loss_scale_is_refused")
def fp16_gradient_overflow(tmp):
    """An fp16 gradient is held times the loss scale: a value that would not fit is refused on
    every rank (the step would silently be skipped as an overflow), nothing written."""
    engine, _ = build(MyModel, fragment_config(1, "fp16") | {"fp16": {"enabled": True}})
    assert engine.loss_scaler.scale == 2 ** 16
    engine_backward(engine, 0, torch.float16)
    weight = engine.module.linears[2].weight
    before = safe_get_full_grad(weight)
    collectively(lambda: expect_zero_ext_error(
        lambda: safe_set_full_grad(weight, torch.ones_like(before)), "loss scale", "65536",
        "initial_scale_power"))
    assert torch.equal(safe_get_full_grad(weight), before)
    safe_set_full_grad(weight, torch.full_like(before, 0.5))  # 32768 fits
    engine.step()
    assert engine.was_step_applied() and engine.skipped_steps == 0


@case(FRAGMENT + "zero_ext::local_functions_on_whole_kept_stage3_parameters")
def local_on_persistent(tmp):
    """At stage 3 a parameter kept whole (the default persistence threshold keeps all of
    MyModel's) is still sharded in the optimizer: its local fragments, concatenated over the
    ranks, are its full values, and its moments and gradient can be set locally; its weights
    cannot (every rank holds them whole), an error naming the full function."""
    config = fragment_config(3)
    del config["zero_optimization"]["stage3_param_persistence_threshold"]
    engine, _ = build(MyModel, config)
    named = dict(engine.module.named_parameters())
    engine_backward(engine, 0)
    grads = _gather_local(engine, named, 3, ("grad",))
    for name, param in named.items():
        assert torch.equal(grads[name]["grad"], safe_get_full_grad(param).flatten().cpu()), name
    engine.step()
    local = _gather_local(engine, named, 3, ("fp32",) + KEYS)
    for name, param in named.items():
        assert torch.equal(local[name]["fp32"], safe_get_full_fp32_param(param).flatten()), name
        for key in KEYS:
            assert torch.equal(local[name][key],
                               safe_get_full_optimizer_state(param, key).flatten()), name
    weight = named["linears.0.weight"]
    mine = safe_get_local_optimizer_state(weight, "exp_avg")
    safe_set_local_optimizer_state(weight, torch.full_like(mine, 0.25), "exp_avg")
    assert torch.equal(safe_get_local_optimizer_state(weight, "exp_avg"),
                       torch.full_like(mine, 0.25))
    collectively(lambda: expect_zero_ext_error(
        lambda: safe_set_local_fp32_param(weight, safe_get_local_fp32_param(weight)),
        "kept whole", "safe_set_full_fp32_param"))


for _stage in (1, 3):
    @case(ZERO + f"zero_ext::destroy[{_stage}]", stage=_stage)
    def destroy(tmp, stage):
        """engine.destroy() (DeepSpeed's tests end with it): the model's gradient and module
        hooks are gone, backward and step are refused; below stage 3 the model trains on its
        own again with autograd's gradients, from the weights the engine left."""
        engine = build_engine(fragment_config(stage), 3, lambda: SimpleModel(4, nlayers=2))
        model = engine.module
        engine.backward(engine(*batch(0, 0, rank(), 2, hidden=4)))
        engine.step()
        trained = {n: v.float() for n, v in engine.full_state_dict().items()}
        engine.destroy()
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
        collectively(lambda: expect_zero_ext_error(
            lambda: engine.backward(torch.zeros((), requires_grad=True)), "destroyed"))
        collectively(lambda: expect_zero_ext_error(engine.step, "destroyed"))
        if stage == 3:
            return
        assert all(torch.equal(p.detach(), trained[n]) for n, p in model.named_parameters())
        model(*batch(1, 0, rank(), 2, hidden=4)).backward()
        assert all(p.grad is not None for p in model.parameters())


for _stage in (1, 3):
    @case(ZERO + f"zero_ext::initialize_again[{_stage}]", stage=_stage)
    def initialize_again(tmp, stage):
        """initialize() on a model another live engine wraps (a notebook cell run twice): the
        earlier engine is destroyed with a warning, and the new one trains exactly as an engine
        built on a copy of the model holding the weights the earlier one left (its hooks
        fired in the new backward before: "a gradient was produced outside
        engine.backward()")."""
        import copy
        import warnings

        config = fragment_config(stage)
        engine = build_engine(config, 5, lambda: SimpleModel(4, nlayers=2), init=False)
        train_engine(engine, 2, hidden=4)
        trained = engine.full_state_dict()
        twin_model = SimpleModel(4, nlayers=2)
        twin_model.load_state_dict(copy.deepcopy(trained))
        twin = zero_ext.initialize(model=twin_model, config=config)[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = zero_ext.initialize(model=engine.module, config=config)[0]
        assert any("already wrapped by another zero_ext engine" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        collectively(lambda: expect_zero_ext_error(engine.step, "destroyed"))
        for each in (again, twin):
            train_engine(each, 2, start=2, hidden=4)
        one, two = again.full_state_dict(), twin.full_state_dict()
        assert all(torch.equal(one[n], two[n]) for n in two), "differs from the twin"
        assert not all(torch.equal(one[n], trained[n]) for n in one), "nothing trained"
        if stage == 3:
            # Destroyed by the caller, then initialized at stage 1: the parameters are made
            # whole, and nothing of the stage-3 engine runs in the new backward (its gradient
            # accumulators' hooks gathered units and re-pointed the parameters).
            third = build_engine(config, 6, lambda: SimpleModel(4, nlayers=2), init=False)
            train_engine(third, 1, hidden=4)
            left = third.full_state_dict()
            third.destroy()
            below = fragment_config(1)
            again = zero_ext.initialize(model=third.module, config=below)[0]
            twin_model = SimpleModel(4, nlayers=2)
            twin_model.load_state_dict(copy.deepcopy(left))
            twin = zero_ext.initialize(model=twin_model, config=below)[0]
            for each in (again, twin):
                train_engine(each, 2, start=1, hidden=4)
            one, two = again.full_state_dict(), twin.full_state_dict()
            assert all(torch.equal(one[n], two[n]) for n in two), "3 -> 1 differs"
            # built under zero_ext.Init: its parameters exist only as shards
            sharded = build_engine(config, 5, lambda: SimpleModel(4, nlayers=2))
            collectively(lambda: expect_zero_ext_error(
                lambda: zero_ext.initialize(model=sharded.module, config=config),
                "built under zero_ext.Init"))


for _stage in (0, 2):
    @case(ZERO + f"zero_ext::data_assignment_refused[{_stage}]", stage=_stage)
    def data_assignment_refused(tmp, stage):
        """`param.data = tensor` on a parameter kept whole, after initialize and on rank 0
        only: the parameter left its flat buffer, which the optimizer updates (it stopped
        training, silently). The next step is refused on every rank, before anything
        changes, naming the parameter and the rank. (Stage 3's whole-kept parameters are
        checked alike; its released ones refuse the assignment itself.)"""
        engine = build_engine(fragment_config(stage), 7, lambda: SimpleModel(4, nlayers=2),
                              init=False)
        train_engine(engine, 1, hidden=4)
        name = "linears.1.bias"
        param = dict(engine.module.named_parameters())[name]
        if rank() == 0:
            param.data = torch.zeros_like(param)
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()
                  if n != name}
        steps = engine.global_steps
        collectively(lambda: expect_zero_ext_error(
            lambda: train_engine(engine, 1, start=1, hidden=4),
            f"replaced these parameters' tensors (rank 0: {name})"))
        assert engine.global_steps == steps
        assert all(torch.equal(p.detach(), before[n])
                   for n, p in engine.module.named_parameters() if n != name)


@case(ZERO + "zero_ext::empty_partition_cache")
def empty_partition_cache(tmp):
    """An evaluation that runs part of a stage-3 model (the first layer alone, as an early
    exit) leaves the units prefetched after it gathered; engine.empty_partition_cache()
    releases them all, and training goes on exactly as an engine that did not empty it."""
    config = fragment_config(3, gradient_accumulation_steps=1)
    twins = [build_engine(config, 11, lambda: SimpleModel(4, nlayers=4)) for _ in range(2)]
    for engine in twins:
        train_engine(engine, 2, hidden=4)
        with torch.no_grad():
            engine.module.linears[0](batch(9, 0, rank(), 2, hidden=4)[0])
    units = twins[0].partitioned.units
    left = sum(unit.state.value != "sharded" for unit in units)
    twins[0].empty_partition_cache()
    assert left > 0, "nothing was left gathered: the case tests nothing"
    assert all(unit.state.value == "sharded" for unit in units)
    for engine in twins:
        train_engine(engine, 2, start=2, hidden=4)
    one, two = (e.full_state_dict() for e in twins)
    assert all(torch.equal(one[n], two[n]) for n in one)


# -- the engine's DeepSpeed accessors -----------------------------------------------------------
@case(ZERO + "zero_ext::accessors_and_was_step_applied")
def accessors(tmp):
    """train_batch_size(), train_micro_batch_size_per_gpu(), gradient_accumulation_steps(),
    zero_optimization_stage(), gradient_clipping(), fp16_enabled(), bfloat16_enabled(),
    global_rank and local_rank read the config as resolved and the process's place;
    was_step_applied() is False before any step, between accumulation boundaries and after a
    step skipped on an fp16 overflow, True after an applied step; global_samples counts
    train_batch_size per optimizer step, skipped ones included (DeepSpeed's engine);
    step(lr_kwargs=...) passes them to the LR schedule's step, after applied steps only."""
    model = GradientProbe()
    engine, _, _, scheduler = zero_ext.initialize(model=model, lr_scheduler=IncrementLR.of,
                                                  config={
        "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "gradient_clipping": 0.0,
        "fp16": {"enabled": True, "initial_scale_power": 4},
        "zero_optimization": {"stage": 1}}, model_parameters=list(model.parameters()))
    assert (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
            engine.gradient_accumulation_steps()) == (6 * world(), 3, 2)
    assert engine.zero_optimization_stage() == 1 and engine.gradient_clipping() == 0.0
    assert engine.global_rank == rank() and engine.local_rank == rank()  # one node
    assert engine.fp16_enabled() and not engine.bfloat16_enabled()
    applied = [engine.was_step_applied()]
    for micro, value in enumerate((0.1, 0.2, float("inf"), 0.3, 0.1, 0.2)):
        engine.backward(engine(torch.tensor(value, dtype=torch.float16)))
        engine.step(lr_kwargs={"increment": 10 + micro})
        applied.append(engine.was_step_applied())
    # Micro-steps 1, 3, 5 end the windows: (0.1, 0.2) applied, (inf, 0.3) skipped, (0.1, 0.2).
    assert applied == [False, False, True, False, False, False, True], applied
    assert engine.global_steps == 3 and engine.skipped_steps == 1
    assert engine.global_samples == 3 * 6 * world(), engine.global_samples
    assert scheduler.increments == [11, 15], scheduler.increments


@case(ZERO + "zero_ext::lr_kwargs_position_and_a_refused_keyword")
def lr_kwargs_position(tmp):
    """DeepSpeed's engine.step(lr_kwargs={"last_batch_iteration": i}) moves its schedule to
    position i (its step(last_batch_iteration=None)); a keyword the schedule's step() does not
    take is refused before anything steps (it raised after the update, which a retry applied
    twice). Reference: DeepSpeed's WarmupLR over an optimizer at the same lr."""
    from deepspeed.runtime.lr_schedules import WarmupLR as DeepSpeedWarmupLR

    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 0.1, "warmup_num_steps": 10,
              "warmup_type": "linear"}
    engine = build_engine({"train_micro_batch_size_per_gpu": 2,
                           "optimizer": {"type": "AdamW", "params": {"lr": 0.1}},
                           "scheduler": {"type": "WarmupLR", "params": params},
                           "zero_optimization": {"stage": 2}}, 7)
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    deepspeed_schedule = DeepSpeedWarmupLR(reference, **params)
    rates = []
    for step, position in enumerate((5, None, 2)):
        engine.backward(loss_of(engine(*batch(step, 0, rank()))))
        engine.step(lr_kwargs=None if position is None else {"last_batch_iteration": position})
        deepspeed_schedule.step(position)
        rates.append((engine.get_lr()[0], reference.param_groups[0]["lr"]))
    for got, want in rates:
        assert got == want, rates
    assert [want for _, want in rates] == pytest.approx([0.05, 0.06, 0.02], rel=1e-12), rates
    assert engine.lr_scheduler.state_dict() == deepspeed_schedule.state_dict()
    before = {n: p.detach().clone() for n, p in engine.named_parameters()}
    counters = (engine.global_steps, engine.micro_steps)
    engine.backward(loss_of(engine(*batch(3, 0, rank()))))
    expect_zero_ext_error(lambda: engine.step(lr_kwargs={"position": 3}),
                          "lr_kwargs={'position': 3}", "WarmupLR.step() does not take them",
                          "nothing was stepped")
    assert (engine.global_steps, engine.micro_steps) == counters
    for name, value in engine.named_parameters():
        assert torch.equal(value, before[name]), name
    engine.step()  # the same window, stepped now
    assert engine.global_steps == counters[0] + 1


@case(ZERO + "zero_ext::reduce_lr_on_plateau_is_the_scripts_to_step")
def plateau_schedule(tmp):
    """A ReduceLROnPlateau given to initialize: its step() needs the metric, which the engine
    lacks, so initialize says so and engine.step() leaves it to the script (it crashed after
    the update; DeepSpeed steps it with the batch size as the metric); given the metric with
    lr_kwargs, the engine steps it. Reference: torch's ReduceLROnPlateau on an optimizer at
    the same lr, stepped with the same metrics."""
    torch.manual_seed(7)
    model = SimpleModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, _, schedule = zero_ext.initialize(
            model=model, optimizer=optimizer, lr_scheduler=plateau,
            config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}})
    assert schedule is plateau
    assert any("ReduceLROnPlateau.step() needs arguments" in str(w.message) and
               "scheduler.step(metric)" in str(w.message) for w in caught), caught
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    reference_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(reference, patience=0,
                                                                   factor=0.5)
    rates = []
    for step, metric in enumerate((1.0, 2.0, None, 3.0)):
        engine.backward(loss_of(engine(*batch(step, 0, rank()))))
        if metric is None:
            engine.step()  # not stepped
        elif step % 2:
            engine.step(lr_kwargs={"metrics": metric})
        else:
            engine.step()
            plateau.step(metric)  # the script's own call, after evaluating
        if metric is not None:
            reference_plateau.step(metric)
        rates.append((engine.get_lr()[0], reference.param_groups[0]["lr"]))
    assert engine.global_steps == 4
    assert [got for got, _ in rates] == [want for _, want in rates] == \
        pytest.approx([0.1, 0.05, 0.05, 0.025], rel=1e-12), rates


class IncrementLR(torch.optim.lr_scheduler.LambdaLR):
    """A schedule whose step takes a keyword, as Megatron-DeepSpeed's AnnealingLR
    (`engine.step(lr_kwargs={"increment": ...})`)."""

    def __init__(self, optimizer):
        self.increments = []
        super().__init__(optimizer, lambda step: 1.0)

    @classmethod
    def of(cls, optimizer):
        return cls(optimizer)

    def step(self, increment=None):
        if increment is not None:
            self.increments.append(increment)
        super().step()


# -- test_zero.py's TestUnmanagedGradientAccumulation: the managed halves ----------------------
def _gas_config(stage: int, gas: int = 4) -> dict:
    """DeepSpeed's build_managed_gas_config (managed): micro-batch 1, 4 micro-steps per step,
    Adam at lr 1e-3, its defaults otherwise (gradient_clipping 1.0)."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}


def _managed_baseline(tmp, stage: int) -> None:
    """Only every 4th micro-step (the boundary) applies an update; global_samples counts
    train_batch_size per step."""
    engine = build_engine(_gas_config(stage), 42, lambda: SimpleModel(4, nlayers=2))
    applied = []
    for micro in range(8):
        engine.backward(engine(*batch(0, micro, rank(), 1, hidden=4)))
        engine.step()
        applied.append(engine.was_step_applied())
    assert applied == [False, False, False, True, False, False, False, True], applied
    assert engine.global_samples == 2 * engine.train_batch_size() == 2 * 4 * world()


def _varying_backward_count(tmp, stage: int, gas: int = 4) -> None:
    """DeepSpeed's managed reference of its unmanaged test: windows of 2, 5 and 3 micro-steps
    (5 past gradient_accumulation_steps) ended by set_gradient_accumulation_boundary(micro ==
    n - 1), each loss divided by n with scale_wrt_gas=False. (Its unmanaged half, with
    managed_gradient_accumulation false, is refused here.) Against plain PyTorch stepping on
    each window's mean gradient over every rank's micro-batches. Also with
    gradient_accumulation_steps 1, DeepSpeed users' usual config for windows set by hand
    (stages 2-3 then have no accumulator unless a window is held open)."""
    config = _gas_config(stage, gas)
    engine = build_engine(config, 42, lambda: SimpleModel(4, nlayers=2))
    initial = {n: v.float().clone() for n, v in engine.full_state_dict().items()}
    counts = (2, 5, 3)
    for step, n in enumerate(counts):
        for micro in range(n):
            engine.set_gradient_accumulation_boundary(micro == n - 1)
            loss = engine(*batch(step, micro, rank(), 1, hidden=4))
            engine.backward(loss / n, scale_wrt_gas=False)
            engine.step()
    assert engine.global_steps == len(counts), engine.global_steps
    got = {n: v.float() for n, v in engine.full_state_dict().items()}
    reference = reference_copy(lambda: SimpleModel(4, nlayers=2), initial)
    optimizer = ds_adam(list(reference.parameters()), config)
    for step, n in enumerate(counts):
        optimizer.zero_grad(set_to_none=True)
        losses = [reference(*batch(step, m, r, 1, hidden=4))
                  for m in range(n) for r in range(world())]
        (sum(losses) / (n * world())).backward()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
        optimizer.step()
    for name, param in reference.named_parameters():
        close(got[name], param, torch.float32, name)


for _stage in (0, 1, 2, 3):
    case(MANAGED + f"test_managed_baseline_applies_only_on_boundary[{_stage}]",
         stage=_stage)(_managed_baseline)
    case(MANAGED + f"test_unmanaged_varying_backward_count[{_stage}]",
         stage=_stage)(_varying_backward_count)
    case(MANAGED + f"test_unmanaged_varying_backward_count[{_stage}-gas1]",
         stage=_stage, gas=1)(_varying_backward_count)


for _offload in ("none", "optimizer"):
    @case(ZERO + f"zero_ext::fp16_window_held_open_past_one_micro_step[{_offload}]",
          offload=_offload)
    def held_fp16(tmp, offload):
        """gradient_accumulation_steps 1, fp16 at scale 2**8, windows of 2 micro-steps held
        open at stage 2: each micro-step's gradient fits fp16, a window's sum may not. It goes
        on in fp16, as every step of such a run (offload's host buffers are fp16): a sum past
        fp16 skips the step, with and without offload_optimizer (the weights stay finite and
        unchanged), and a sum that fits is applied."""
        zero = {"stage": 2}
        if offload == "optimizer":
            zero["offload_optimizer"] = {"device": "cpu"}
        engine = build_engine({"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
                               "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                               "fp16": {"enabled": True, "initial_scale_power": 8},
                               "zero_optimization": zero},
                              0, GradientProbe)
        weights = [safe_get_full_fp32_param(p) for p in engine.module.parameters()]
        applied = []
        for value in (200.0, 100.0):  # 2 x 200 x 2**8 > 65504 > 2 x 100 x 2**8
            for micro in range(2):
                engine.set_gradient_accumulation_boundary(micro == 1)
                engine.backward(engine(torch.tensor(value, dtype=torch.float16)))
                engine.step()
            applied.append(engine.was_step_applied())
            if value == 200.0:
                assert all(torch.equal(safe_get_full_fp32_param(p), w)
                           for p, w in zip(engine.module.parameters(), weights))
        assert applied == [False, True], applied
        assert all(torch.isfinite(safe_get_full_fp32_param(p)).all()
                   for p in engine.module.parameters())


@case(ZERO + "zero_ext::resumed_settings_warning_skips_a_schedule_stepped_outside")
def resumed_settings_warning(tmp):
    """A load whose checkpoint holds other hyperparameters than the config warns (rank 0),
    naming them; the checkpoint's win. A learning rate a torch scheduler moved, stepped outside
    the engine (as Lightning and accelerate step theirs), is not such a setting: it was said
    on every resume of such a run. Its rate comes back from the checkpoint either way."""
    def engine_at(lr: float):
        config = {**_gas_config(2, gas=1), "optimizer": {"type": "Adam", "params": {"lr": lr}}}
        return build_engine(config, 42, lambda: SimpleModel(4, nlayers=2))

    def load(engine, tag: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.load_checkpoint(tmp, tag=tag)
        return [str(w.message) for w in caught if "other optimizer settings" in str(w.message)]

    plain = engine_at(0.01)
    train_engine(plain, 1, hidden=4, micro=1)
    plain.save_checkpoint(tmp, tag="plain")
    said = load(engine_at(0.02), "plain")
    assert len(said) == (rank() == 0), said
    assert all("group 0 lr: 0.01 in the checkpoint, 0.02 configured" in s for s in said), said
    scheduled = engine_at(0.01)
    outside = torch.optim.lr_scheduler.StepLR(scheduled.optimizer, step_size=1, gamma=0.5)
    for step in range(2):
        train_engine(scheduled, 1, start=step, hidden=4, micro=1)
        outside.step()
    scheduled.save_checkpoint(tmp, tag="scheduled")
    resumed = engine_at(0.01)
    assert load(resumed, "scheduled") == []
    assert resumed.get_lr() == pytest.approx([0.0025], rel=1e-12)


@case(ZERO + "zero_ext::save_inside_a_window_held_open")
def save_inside_held_window(tmp):
    """A save inside an accumulation window (here one held open by
    set_gradient_accumulation_boundary(False), mid-window although the micro-step count is a
    multiple of gradient_accumulation_steps) writes the state of the last completed step, as
    DeepSpeed, accelerate's save_state and Lightning's ModelCheckpoint save at any batch (it
    was refused, which stopped their loops); rank 0 says the window's gradients are not in
    it. The run goes on with them: its step equals the uninterrupted run's. A load starts a
    new window from the saved step."""
    def run(save: bool):
        engine = build_engine(_gas_config(2, gas=2), 42, lambda: SimpleModel(4, nlayers=2))
        before = full_params(engine)
        engine.set_gradient_accumulation_boundary(False)
        for micro in range(3):
            if micro == 2:
                engine.set_gradient_accumulation_boundary(True)
            engine.backward(engine(*batch(0, micro, rank(), 1, hidden=4)))
            engine.step()
            if micro == 1 and save:
                assert engine.micro_steps == 2 and engine.global_steps == 0
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    engine.save_checkpoint(tmp, tag="held")
                said = [str(w.message) for w in caught if "saved in the middle" in str(w.message)]
                assert len(said) == (rank() == 0), said
                assert all(words in said[0] for words in (
                    "2 in this window so far", "last completed step (global_steps 0)",
                    "starts a new window")) if said else True, said
        assert engine.global_steps == 1
        return before, full_params(engine)

    before, saved_run = run(save=True)
    _, uninterrupted = run(save=False)
    assert all(torch.equal(saved_run[n], uninterrupted[n]) for n in uninterrupted)
    assert any(not torch.equal(saved_run[n], before[n]) for n in before)
    loaded = build_engine(_gas_config(2, gas=2), 7, lambda: SimpleModel(4, nlayers=2))
    loaded.load_checkpoint(tmp, tag="held")
    weights = full_params(loaded)
    assert all(torch.equal(weights[n], before[n]) for n in before)
    assert (loaded.global_steps, loaded.micro_steps) == (0, 0)


# -- test_ds_config_dict.py: initialize's DeepSpeed arguments ----------------------------------
CONFIG = "test_ds_config_dict.py::"


def _args_config() -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
            "optimizer": {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.0}},
            "bf16": {"enabled": True}}


def _write_config(tmp: str, config: dict) -> str:
    path = os.path.join(tmp, "ds_config.json")
    if rank() == 0:
        with open(path, "w") as f:
            json.dump(config, f)
    dist.barrier()
    return path


def _trained(engine, steps: int = 2) -> dict:
    train_engine(engine, steps, dtype=torch.bfloat16)
    return {n: v.float() for n, v in engine.full_state_dict().items()}


def _with_args(config_path: str | None = None, **kwargs):
    """initialize(args=..., model=...) on SimpleModel from seed 5."""
    torch.manual_seed(5)
    model = SimpleModel()
    return zero_ext.initialize(model=model, model_parameters=list(model.parameters()),
                               **kwargs)[0]


@case(CONFIG + "TestArgs::test_none_args")
def none_args(tmp):
    """args=None with config=: trains as config= alone (test_no_args)."""
    one = _trained(_with_args(args=None, config=_args_config()))
    two = _trained(_with_args(config=_args_config()))
    assert all(torch.equal(one[n], two[n]) for n in one)


@case(CONFIG + "TestDeprecatedDeepScaleConfig::test")
def deepscale_config(tmp):
    """args.deepscale_config (deprecated) is the config, with a DeprecationWarning; as
    DeepSpeed's engine, args.local_rank becomes this process's LOCAL_RANK."""
    path = _write_config(tmp, _args_config())
    args = argparse.ArgumentParser().parse_args(args=[])
    args.deepscale_config, args.local_rank = path, -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = _with_args(args=args)
    assert any("deepscale_config is deprecated" in str(w.message) for w in caught)
    assert args.local_rank == rank(), args.local_rank  # one node: LOCAL_RANK == RANK
    got, want = _trained(engine), _trained(_with_args(config=_args_config()))
    assert all(torch.equal(got[n], want[n]) for n in want)


@case(CONFIG + "zero_ext::deepspeed_io_loaders_and_len_through_an_epoch")
def deepspeed_io_loaders(tmp):
    """engine.deepspeed_io, DeepSpeed's: the eval route loads rank r's share of the dataset in
    order (a DistributedSampler without shuffling: [r::world], padded by wrapping) in
    micro-batches, collated by initialize's collate_fn, with DeepSpeedDataLoader's attributes
    (it did not exist). The loader of
    initialize(training_data=...) has them too (data_sampler.set_epoch is DeepSpeed scripts'
    call), and its len() holds through an epoch while the engine steps (it shrank with each
    step: an end-of-epoch test `i == len(loader) - 1` fired mid-epoch)."""
    torch.manual_seed(5)
    model = SimpleModel()
    micro, gas = 2, 2
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    samples = 4 * micro * gas * world()  # four global batches (optimizer steps) an epoch
    indices = torch.arange(samples)
    def collate(items):  # initialize's collate_fn, deepspeed_io's default too
        return [int(i) for i in items]

    engine, _, loader, _ = zero_ext.initialize(model=model, config=config,
                                               training_data=indices, collate_fn=collate)
    assert (loader.batch_size, loader.num_local_io_workers, loader.dataloader_drop_last) == \
        (micro, 0, True)
    assert engine.training_dataloader is loader
    per_rank = samples // world() // micro  # micro-batches per epoch on a rank
    for epoch in range(2):
        loader.data_sampler.set_epoch(epoch)
        lens, seen = [], []
        for i, idx in enumerate(loader):
            lens.append(len(loader))
            seen.append(torch.tensor(idx))
            x, y = batch(epoch * per_rank + i, 0, rank())
            engine.backward(loss_of(engine(x, y)))
            engine.step()
        assert lens == [per_rank] * per_rank, (epoch, lens)
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(epoch))
        share = micro * gas
        mine = torch.cat([order[g + rank() * share:g + (rank() + 1) * share]
                          for g in range(0, samples, share * world())])
        assert torch.equal(torch.cat(seen), mine), (epoch, seen)
    # A pass left after two optimizer steps: the next one's len() is what it yields, from
    # iter() on (before its first batch too).
    for i, _ in enumerate(loader):
        x, y = batch(100 + i, 0, rank())
        engine.backward(loss_of(engine(x, y)))
        engine.step()
        if i == 2 * gas - 1:
            break
    passes = iter(loader)
    assert len(loader) == per_rank - 2 * gas, len(loader)
    assert len(list(passes)) == per_rank - 2 * gas

    evaluation = list(range(11))  # 11 samples: DistributedSampler pads to 12
    # DeepSpeed's default: two worker processes (not iterated here: the harness's ranks are
    # daemonic processes, which cannot start them).
    assert engine.deepspeed_io(evaluation, route="eval").num_local_io_workers == 2
    eval_loader = engine.deepspeed_io(evaluation, route="eval", num_local_io_workers=0)
    assert eval_loader.batch_size == micro
    assert type(eval_loader.data_sampler).__name__ == "DistributedSampler"
    want = (evaluation + evaluation[:1])[rank()::world()]  # in order, as DeepSpeed's eval
    assert all(isinstance(b, list) for b in eval_loader)  # initialize's collate_fn
    assert [int(i) for b in eval_loader for i in b] == want
    assert len(eval_loader) == -(-len(want) // micro)
    assert [int(i) for b in engine.deepspeed_io(evaluation, route="eval", batch_size=3,
                                                num_local_io_workers=0) for i in b] == want


@case(CONFIG + "zero_ext::deepspeeds_positional_order_backward_value_and_dataloader")
def positional_order(tmp):
    """deepspeed.initialize(args, model=..., model_parameters=...), DeepSpeed's examples' form
    (its first parameter is args), and initialize(args, model, optimizer, model_parameters,
    training_data) positionally train as the keyword call; a model passed first is refused,
    naming model=. backward() returns the loss / gradient_accumulation_steps (DeepSpeed's
    return value, which its scripts log); engine.training_dataloader is the loader
    initialize returns (None without training_data)."""
    path = _write_config(tmp, _args_config())
    args = zero_ext.add_config_arguments(argparse.ArgumentParser()).parse_args(
        ["--deepspeed_config", path])
    want = _trained(_with_args(config=_args_config()))
    torch.manual_seed(5)
    model = SimpleModel()
    engine = zero_ext.initialize(args, model=model, model_parameters=list(model.parameters()))[0]
    got = _trained(engine)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert engine.training_dataloader is None
    torch.manual_seed(5)
    model = SimpleModel()
    data = [batch(0, m, 0) for m in range(4)]
    engine, _, loader, _ = zero_ext.initialize(None, model, None, list(model.parameters()),
                                               data, config=_args_config())
    assert engine.training_dataloader is loader and loader is not None
    got = _trained(engine)
    assert all(torch.equal(got[n], want[n]) for n in want)
    collectively(lambda: expect_zero_ext_error(
        lambda: zero_ext.initialize(SimpleModel(), config=_args_config()),
        "first positional argument is DeepSpeed's `args`", "model="))
    engine = zero_ext.initialize(model=SimpleModel(),
                                 config={**_args_config(), "gradient_accumulation_steps": 2})[0]
    x, y = batch(9, 0, rank(), dtype=torch.bfloat16)
    loss = loss_of(engine(x, y))
    returned = engine.backward(loss)
    assert returned is not None and torch.equal(returned, loss.detach() / 2), (returned, loss)
    engine.step()
    assert torch.equal(engine.backward(loss_of(engine(x, y)), scale_wrt_gas=False),
                       loss.detach())
    engine.step()


@case(CONFIG + "TestDistInit::test")
def dist_init(tmp):
    """dist_init_required=True (or False, the group being up) trains; zero_ext.init_distributed
    with a group already up leaves it as it is."""
    zero_ext.init_distributed()
    assert dist.get_world_size() == world()
    want = _trained(_with_args(config=_args_config()), 1)
    for required in (True, False):
        got = _trained(_with_args(config=_args_config(), dist_init_required=required), 1)
        assert all(torch.equal(got[n], want[n]) for n in want), required


@case(CONFIG + "zero_ext::deepspeed_config_argument")
def deepspeed_config_argument(tmp):
    """A DeepSpeed script's arguments: add_config_arguments, --deepspeed --deepspeed_config
    FILE, initialize(args=args) trains as initialize(config=the same dict); every misuse of
    the config sources is an error naming it."""
    path = _write_config(tmp, _args_config())
    parser = zero_ext.add_config_arguments(argparse.ArgumentParser())
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", path])
    assert args.deepspeed and args.deepspeed_config == path
    from_args = _trained(_with_args(args=args))
    assert args.local_rank == rank()
    from_dict = _trained(_with_args(config=_args_config()))
    assert all(torch.equal(from_args[n], from_dict[n]) for n in from_dict)
    assert all(torch.equal(from_args[n], v) for n, v in
               _trained(_with_args(config_params=_args_config())).items())
    model = SimpleModel()
    for kwargs, words in (
            ({"args": args, "config": _args_config()}, ("deepspeed_config", "one of them")),
            ({"args": parser.parse_args([])}, ("no config", "--deepspeed_config")),
            ({"config": _args_config(), "config_params": _args_config()}, ("config_params",)),
            ({"config": _args_config(), "mpu": object()}, ("mpu", "data parallel"))):
        collectively(lambda kwargs=kwargs, words=words: expect_zero_ext_error(
            lambda: zero_ext.initialize(model=model, **kwargs), *words))
    both = parser.parse_args(["--deepspeed_config", path, "--deepscale_config", path])
    collectively(lambda: expect_zero_ext_error(
        lambda: zero_ext.initialize(model=model, args=both), "deepscale_config",
        "deepspeed_config"))
    collectively(lambda: expect_zero_ext_error(
        lambda: zero_ext.init_distributed(rank=0), "torchrun"))
