"""Ported cases: the engine's no_sync() context, zero_grad(), get_mom(), the step's loss scale
and outcome as DeepSpeed's optimizer shows them (engine.optimizer.loss_scale, .cur_scale,
.overflow, ._global_grad_norm), and data_types.grad_accum_dtype.

From DeepSpeed's tests/unit/runtime/test_no_sync_ctxt.py, whose cases check that no_sync is
refused at stages 2-3, inside itself and around step(), and that two contexts separated by
zero_grad() see the same losses and gradients. The ports check that too and, against
single-process plain PyTorch (torch.optim.AdamW on the whole batch), that what the gradients
gathered under no_sync train is the window's whole gradient: PyTorch DDP's idiom of all but the
last backward of a window inside no_sync, at gradient_accumulation_steps 1 and 2.
"""

from __future__ import annotations

import warnings

import torch
from torch.testing import assert_close

import zero_ext
from zero_ext.utils import safe_get_full_fp32_param, safe_get_full_grad

from ds_conformance_cases import (
    SimpleModel,
    batch,
    build_engine,
    case,
    collectively,
    ds_adam,
    expect_zero_ext_error,
    rank,
    reference_copy,
    world,
)
from ds_conformance_cases_fragment import close
from ds_conformance_cases_precision import GradientProbe

NO_SYNC = "test_no_sync_ctxt.py::TestNoSyncCtxt::"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HIDDEN = 8


def _config(stage: int, dtype: str, gas: int = 1) -> dict:
    """DeepSpeed's no_sync test config: micro-batch 1 (2 here), Adam at lr 1e-3; fp16 starts
    at scale 2**8."""
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": stage}}
    if dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8}
    elif dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def _model():
    return SimpleModel(HIDDEN, nlayers=2)


def _loss(engine, step: int, micro: int, dtype: torch.dtype):
    return engine(*batch(step, micro, rank(), 2, dtype, hidden=HIDDEN))


def _windows(engine, dtype: torch.dtype, gas: int, quiet: int, steps: int = 2) -> None:
    """`steps` windows of `gas` micro-steps, each micro-step's backward preceded by `quiet`
    backwards of other micro-batches inside no_sync (DDP's idiom when gas is 1)."""
    for step in range(steps):
        for micro in range(gas):
            with engine.no_sync():
                for extra in range(quiet):
                    engine.backward(_loss(engine, step, 10 + 10 * micro + extra, dtype))
            engine.backward(_loss(engine, step, micro, dtype))
            engine.step()


def _windows_of(gas: int, quiet: int, steps: int = 2) -> list[tuple[int, list[int]]]:
    """What _windows trains: per step, its batch index and the micro-batches of its window."""
    return [(step, [m for micro in range(gas)
                    for m in [10 + 10 * micro + e for e in range(quiet)] + [micro]])
            for step in range(steps)]


def _reference(initial: dict, config: dict, gas: int, windows) -> tuple[dict, float]:
    """`windows` ((step, micro-batches) each) in one process: every rank's micro-batches, each
    loss over gas (the engine's backward divides by gradient_accumulation_steps) and averaged
    over the ranks. The parameters after, and the last window's gradient norm before
    clipping."""
    reference = reference_copy(_model, initial)
    optimizer = ds_adam(list(reference.parameters()), config)
    for step, micros in windows:
        optimizer.zero_grad(set_to_none=True)
        losses = [reference(*batch(step, m, r, 2, hidden=HIDDEN))
                  for m in micros for r in range(world())]
        (sum(losses) / (gas * world())).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)  # DeepSpeed's
        optimizer.step()
    return dict(reference.named_parameters()), norm.item()


def _check(engine, initial: dict, want: dict, dtype: torch.dtype) -> None:
    """fp32: the weights at 1e-5. 16-bit: the fp32 master weights' update since `initial`
    against the reference's, within 10% of it as a whole (Adam's first steps move every
    entry by about lr, so weights within 5% would not tell the right gradient from another)."""
    for name, param in engine.module.named_parameters():
        reference = want[name].detach()
        if dtype == torch.float32:
            close(param, reference, dtype, name)
            continue
        update = safe_get_full_fp32_param(param).cpu() - initial[name]
        expected = reference - initial[name]
        error = ((update - expected).norm() / expected.norm()).item()
        assert error < 0.1, f"{name}: the update is {error:.3g} off the reference's"


def _zero_stage(tmp, stage: int, dtype: str) -> None:
    """Stages 2-3 refuse no_sync, naming the stage (DeepSpeed: AssertionError). Stages 0-1:
    2 windows of 3 backwards, the first 2 inside no_sync, train as plain PyTorch on the 3
    micro-batches of every rank (fp32 1e-5; 16-bit: _check)."""
    config = _config(stage, dtype)
    engine = build_engine(config, 42, _model)
    if stage >= 2:
        def enter():
            with engine.no_sync():
                pass
        collectively(lambda: expect_zero_ext_error(enter, "no_sync", f"stage {stage}"))
        return
    initial = {n: v.float().clone() for n, v in engine.full_state_dict().items()}
    _windows(engine, DTYPES[dtype], gas=1, quiet=2)
    assert engine.global_steps == 2 and engine.micro_steps == 2, \
        (engine.global_steps, engine.micro_steps)  # no_sync's backwards are not micro-steps
    want, norm = _reference(initial, config, 1, _windows_of(gas=1, quiet=2))
    _check(engine, initial, want, DTYPES[dtype])
    if dtype == "fp32":  # the gradient's scale too (Adam and clipping hide a uniform one)
        assert_close(engine.get_global_grad_norm(), norm, rtol=1e-5, atol=0)


for _stage in (0, 1, 2, 3):
    for _dtype in DTYPES:
        case(NO_SYNC + f"test_zero_stage[{_dtype}-{_stage}]", stage=_stage,
             dtype=_dtype)(_zero_stage)


def _accumulation(tmp, stage: int) -> None:
    """gradient_accumulation_steps 2, one backward inside no_sync before each micro-step's:
    the window's 4 micro-batches per rank, each loss over 2, in fp32 at 1e-5."""
    config = _config(stage, "fp32", gas=2)
    engine = build_engine(config, 42, _model)
    initial = {n: v.float().clone() for n, v in engine.full_state_dict().items()}
    _windows(engine, torch.float32, gas=2, quiet=1)
    assert engine.global_steps == 2 and engine.micro_steps == 4
    got = engine.full_state_dict()
    want, norm = _reference(initial, config, 2, _windows_of(gas=2, quiet=1))
    for name, value in want.items():
        close(got[name], value, torch.float32, name)
    assert_close(engine.get_global_grad_norm(), norm, rtol=1e-5, atol=0)


for _stage in (0, 1):
    case(NO_SYNC + f"zero_ext::accumulation_steps_2[{_stage}]", stage=_stage)(_accumulation)


def _engine_step(tmp, stage: int, dtype: str) -> None:
    """engine.step() inside no_sync is refused (DeepSpeed: AssertionError), and changes
    nothing: the weights are the initial ones."""
    engine = build_engine(_config(stage, dtype), 42, _model)
    before = {n: v.clone() for n, v in engine.full_state_dict().items()}
    with engine.no_sync():
        engine.backward(_loss(engine, 0, 0, DTYPES[dtype]))
        collectively(lambda: expect_zero_ext_error(engine.step, "inside engine.no_sync()"))
    after = engine.full_state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert engine.micro_steps == 0 and engine.global_steps == 0


def _multiple_ctxts(tmp, stage: int, dtype: str) -> None:
    """Two contexts over the same micro-batches, engine.zero_grad() between: the same losses
    and the same (local, unreduced) gradients. zero_ext's addition: the second context's
    gradients, reduced by a backward outside, train as plain PyTorch on those micro-batches
    and the last one only (zero_grad dropped the first context's)."""
    dt = DTYPES[dtype]
    config = _config(stage, dtype)
    engine = build_engine(config, 42, _model)
    initial = {n: v.float().clone() for n, v in engine.full_state_dict().items()}
    params = list(engine.module.parameters())
    runs = []
    for _ in range(2):
        engine.zero_grad()
        losses, grads = [], []
        with engine.no_sync():
            for micro in range(10, 12):
                loss = _loss(engine, 0, micro, dt)
                losses.append(loss.item())
                engine.backward(loss)
                grads.append([p.grad.clone() for p in params])
        runs.append((losses, grads))
    assert runs[0][0] == runs[1][0], runs
    assert all(torch.equal(a, b) for x, y in zip(runs[0][1], runs[1][1]) for a, b in zip(x, y))
    engine.backward(_loss(engine, 0, 0, dt))
    engine.step()
    _check(engine, initial, _reference(initial, config, 1, _windows_of(1, 2, steps=1))[0], dt)


for _stage in (0, 1):
    for _dtype in DTYPES:
        case(NO_SYNC + f"test_engine_step[{_dtype}-{_stage}]", stage=_stage,
             dtype=_dtype)(_engine_step)
        case(NO_SYNC + f"test_multiple_ctxts[{_dtype}-{_stage}]", stage=_stage,
             dtype=_dtype)(_multiple_ctxts)


@case(NO_SYNC + "test_reentry")
def reentry(tmp):
    """no_sync inside no_sync is refused (DeepSpeed: AssertionError); the outer one still
    holds, and ends."""
    engine = build_engine(_config(1, "fp32"), 42, _model)

    def nested():
        with engine.no_sync():
            pass

    with engine.no_sync():
        collectively(lambda: expect_zero_ext_error(nested, "re-entry"))
        assert engine._no_sync
    assert not engine._no_sync


def _unreduced_last(tmp, stage: int) -> None:
    """zero_ext's: a backward inside no_sync after the backward that ended the window (and
    reduced it) is refused before it runs, naming no_sync (its gradient would never be
    reduced); the window's step is then as if it had not been tried. A save while no_sync's
    gradients wait writes the last step's state, saying those gradients are not in it (rank
    0). A step whose window had backwards inside no_sync only (none
    reduced them) is refused on every rank with the count of backwards, and drops their
    gradients: the next window trains as plain PyTorch on its own micro-batches alone."""
    config = _config(stage, "fp32")
    engine = build_engine(config, 42, _model)
    initial = {n: v.float().clone() for n, v in engine.full_state_dict().items()}
    engine.backward(_loss(engine, 0, 0, torch.float32))
    with engine.no_sync():
        collectively(lambda: expect_zero_ext_error(
            lambda: engine.backward(_loss(engine, 0, 1, torch.float32)), "no_sync",
            "never be reduced"))
    engine.step()
    with engine.no_sync():
        engine.backward(_loss(engine, 1, 5, torch.float32))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.save_checkpoint(tmp)
        said = [str(w.message) for w in caught if "engine.no_sync() not reduced" in str(w.message)]
        assert len(said) == (rank() == 0), said
    collectively(lambda: expect_zero_ext_error(engine.step, "exactly one engine.backward()"))
    assert engine.global_steps == 1
    engine.backward(_loss(engine, 1, 0, torch.float32))
    engine.step()
    got = engine.full_state_dict()
    want, _ = _reference(initial, config, 1, [(0, [0]), (1, [0])])
    for name, value in want.items():
        close(got[name], value, torch.float32, name)


for _stage in (0, 1):
    case(NO_SYNC + f"zero_ext::backward_inside_after_the_last_is_refused[{_stage}]",
         stage=_stage)(_unreduced_last)


@case(NO_SYNC + "zero_ext::boundary_changed_between_backward_and_step")
def boundary_changed(tmp):
    """gradient_accumulation_steps 2, stage 1: a backward made the window's last by
    window_ending_here, then step() outside it (no boundary any more) is refused, consuming
    nothing; stepping inside the context then applies that window: plain PyTorch on the one
    micro-batch (its loss over 2)."""
    config = _config(1, "fp32", gas=2)
    engine = build_engine(config, 42, _model)
    initial = {n: v.float().clone() for n, v in engine.full_state_dict().items()}
    with engine.window_ending_here(True):
        engine.backward(_loss(engine, 0, 0, torch.float32))
    collectively(lambda: expect_zero_ext_error(engine.step, "boundary changed"))
    with engine.window_ending_here(True):
        engine.step()
    assert engine.global_steps == 1
    want, _ = _reference(initial, config, 2, [(0, [0])])
    got = engine.full_state_dict()
    for name, value in want.items():
        close(got[name], value, torch.float32, name)


class Switched(torch.nn.Module):
    """Two linears; the second takes part only while `both`."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)
        self.both = True

    def forward(self, x, y):
        x = self.first(x)
        if self.both:
            x = self.second(x)
        return torch.nn.functional.cross_entropy(x, y)


@case(NO_SYNC + "zero_ext::zero_grad_forgets_which_parameters_had_gradients")
def zero_grad_unused(tmp):
    """ignore_unused_parameters false, stage 0: a backward inside no_sync gives both linears a
    gradient, zero_grad() drops it, and the window's own backward reaches the first alone:
    the step refuses, naming the second (its only gradient was dropped)."""
    config = {**_config(0, "fp32"),
              "zero_optimization": {"stage": 0, "ignore_unused_parameters": False}}
    engine = build_engine(config, 42, Switched)
    with engine.no_sync():
        engine.backward(engine(*batch(0, 1, rank(), 2, hidden=HIDDEN)))
    engine.zero_grad()
    engine.module.both = False
    engine.backward(engine(*batch(0, 0, rank(), 2, hidden=HIDDEN)))
    collectively(lambda: expect_zero_ext_error(engine.step, "no gradient", "second.weight"))


# -- the optimizer's loss scale and step outcome, get_mom ---------------------------------------
@case("test_ds_initialize.py::zero_ext::optimizer_loss_scale_overflow_and_norm")
def optimizer_step_outcome(tmp):
    """fp16 at scale 2**4 with hysteresis 1, stage 1, GradientProbe (every gradient is the
    value given): engine.optimizer.loss_scale and cur_scale follow DeepSpeed's rule (halved by
    each overflow), overflow says whether the last boundary step's norm was non-finite, and
    _global_grad_norm is its norm with the loss scale divided out (sqrt(2) x the value: two
    parameters). Setting cur_scale sets the scale the next backward multiplies by. bf16: 1.0,
    and setting it is refused."""
    engine = build_engine({"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
                           "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                           "fp16": {"enabled": True, "initial_scale_power": 4, "hysteresis": 1},
                           "zero_optimization": {"stage": 1}}, 0, GradientProbe)
    optimizer = engine.optimizer
    assert (optimizer.loss_scale, optimizer.cur_scale, optimizer.overflow) == (16.0, 16.0, False)
    seen = []
    for value in (0.5, float("inf"), 0.25):
        engine.backward(engine(torch.tensor(value, dtype=torch.float16)))
        engine.step()
        seen.append((optimizer.loss_scale, optimizer.cur_scale, optimizer.overflow))
        if value != float("inf"):
            assert_close(optimizer._global_grad_norm, value * 2 ** 0.5, rtol=1e-6, atol=0)
        else:
            assert optimizer._global_grad_norm == float("inf")
    assert seen == [(16.0, 16.0, False), (8.0, 8.0, True), (8.0, 8.0, False)], seen
    optimizer.cur_scale = 4.0
    value = torch.tensor(0.5, dtype=torch.float16, requires_grad=True)
    engine.backward(engine(value))  # d(loss x scale)/d value = scale x sum of the parameters
    want = 4.0 * sum(p.detach().float().sum() for p in engine.module.parameters())
    assert_close(value.grad.float(), want, rtol=1e-2, atol=0)
    engine.step()
    bf16 = build_engine({"train_micro_batch_size_per_gpu": 1,
                         "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                         "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
                        0, GradientProbe)
    assert bf16.optimizer.loss_scale == 1.0 and bf16.optimizer.cur_scale == 1.0

    def set_bf16():
        bf16.optimizer.cur_scale = 2.0
    collectively(lambda: expect_zero_ext_error(set_bf16, "fp16"))


@case("test_ds_initialize.py::zero_ext::get_mom")
def get_mom(tmp):
    """get_mom(): each group's betas for Adam (DeepSpeed's defaults (0.9, 0.999), and a group
    of its own), SGD's momentum for a torch SGD at stage 0."""
    engine = build_engine({"train_micro_batch_size_per_gpu": 2,
                           "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                           "zero_optimization": {"stage": 2}}, 42, _model)
    assert [tuple(m) for m in engine.get_mom()] == [(0.9, 0.999)], engine.get_mom()
    grouped = _model()
    engine, *_ = zero_ext.initialize(
        model=grouped, config={"train_micro_batch_size_per_gpu": 2,
                               "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                               "zero_optimization": {"stage": 1}},
        model_parameters=[{"params": list(grouped.linears[0].parameters())},
                          {"params": list(grouped.linears[1].parameters()),
                           "betas": (0.8, 0.99)}])
    assert [tuple(m) for m in engine.get_mom()] == [(0.9, 0.999), (0.8, 0.99)]
    plain = _model()
    engine, *_ = zero_ext.initialize(
        model=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.5),
        config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0}})
    assert engine.get_mom() == [0.5], engine.get_mom()


# -- data_types.grad_accum_dtype ----------------------------------------------------------------
def _accumulated_gradient(stage: int, accum: str | None, gas: int = 8) -> float:
    """GradientProbe in bf16 (every gradient is the value given, over gas): a window of 1.0
    then gas - 1 micro-steps of 2**-9, reduced in fp32; the gradient the step would apply."""
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
              "bf16": {"enabled": True}, "communication_data_type": "fp32",
              "zero_optimization": {"stage": stage}}
    if accum is not None:
        config["data_types"] = {"grad_accum_dtype": accum}
    engine = build_engine(config, 0, GradientProbe)
    for micro in range(gas):
        value = 1.0 if micro == 0 else 2.0 ** -9
        engine.backward(engine(torch.tensor(value, dtype=torch.bfloat16)))
        if micro < gas - 1:
            engine.step()
    grad = safe_get_full_grad(engine.module.linear.weight).item()
    engine.step()
    return grad


def _grad_accum_fp32(tmp, stage: int) -> None:
    """DeepSpeed's data_types.grad_accum_dtype "fp32" with bf16: the window's gradients sum in
    fp32, (1 + 7 x 2**-9) / 8 exactly. bf16 .grad (the default at stages 0-1, DeepSpeed's too)
    rounds each 2**-12 added to 0.125 away (a quarter of bf16's spacing there): 0.125; stage 2
    sums its shards in fp32 either way."""
    exact = (1 + 7 * 2.0 ** -9) / 8
    assert _accumulated_gradient(stage, "fp32") == exact
    assert _accumulated_gradient(stage, None) == (exact if stage >= 2 else 0.125)


for _stage in (0, 1, 2):
    case(f"test_bf16.py::zero_ext::grad_accum_dtype_fp32[{_stage}]",
         stage=_stage)(_grad_accum_fp32)


@case("test_bf16.py::zero_ext::grad_accum_dtype_fp32_with_no_sync_and_zero_grad")
def fp32_window_dropped(tmp):
    """Stage 1, fp32 accumulation, gradient_accumulation_steps 1: a backward of 1.0 inside
    no_sync goes into the fp32 window, engine.zero_grad() drops it, and the next backward's
    0.5 is the whole gradient; without zero_grad the window's 1.0 is added (1.5)."""
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
              "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}}
    engine = build_engine(config, 0, GradientProbe)
    seen = []
    for drop in (True, False):
        with engine.no_sync():
            engine.backward(engine(torch.tensor(1.0, dtype=torch.bfloat16)))
        assert all(p.grad is None for p in engine.module.parameters())  # in the window
        if drop:
            engine.zero_grad()
        engine.backward(engine(torch.tensor(0.5, dtype=torch.bfloat16)))
        seen.append(safe_get_full_grad(engine.module.linear.weight).item())
        engine.step()
    assert seen == [0.5, 1.5], seen
