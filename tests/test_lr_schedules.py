"""zero_ext.lr_schedules: DeepSpeed's schedules as torch LRSchedulers, checked against the
formulas of DeepSpeed 0.19's deepspeed/runtime/lr_schedules.py written out independently here.

Position k = number of scheduler.step() calls since construction; DeepSpeed's
last_batch_iteration is i = k - 1 (it starts at -1 when the scheduler is built)."""

import inspect
import math

import pytest
import torch
from torch import nn

from zero_ext.config import SCHEDULER_DEFAULTS, ConfigError, SchedulerConfig
from zero_ext.lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler

STEPS = 40


def make_optimizer(kind="sgd", lrs=(0.05,)):
    groups = [{"params": [nn.Parameter(torch.zeros(3))], "lr": lr} for lr in lrs]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0])
    return torch.optim.AdamW(groups, lr=lrs[0])


def lr_sequence(scheduler, optimizer, steps=STEPS, group=0):
    """The group's lr after construction and after each of ``steps`` step() calls."""
    out = [optimizer.param_groups[group]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        out.append(optimizer.param_groups[group]["lr"])
    return out


# Reference formulas, one DeepSpeed iteration i at a time.

def ref_warmup_lr(i, lo, hi, w, kind):
    w = max(2, w)
    if i < 0:
        return lo
    if i >= w:
        return hi
    frac = math.log(i + 1) / math.log(w) if kind == "log" else i / w
    return lo + (hi - lo) * frac


def ref_warmup_decay_lr(i, lo, hi, w, kind, total):
    w2 = max(2, w)
    if i < w2:
        return ref_warmup_lr(i, lo, hi, w, kind)
    return lo + (hi - lo) * max(0.0, (total - i) / max(1, total - w2))


def ref_warmup_cosine_lr(i, base, min_ratio, w, kind, total, cos_min):
    w = max(2, w)
    if i < 0:
        return 0.0
    if i < w:
        frac = math.log(i + 1) / math.log(w) if kind == "log" else i / w
        return base * (min_ratio + (1 - min_ratio) * frac)
    progress = min(1.0, (i - w + 1) / max(1, total - w))
    return base * max(0.0, cos_min + (1 - cos_min) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("kind", ["log", "linear"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_warmup_lr(kind, opt):
    optimizer = make_optimizer(opt)
    scheduler = WarmupLR(optimizer, warmup_min_lr=0.01, warmup_max_lr=0.1,
                         warmup_num_steps=10, warmup_type=kind)
    expected = [ref_warmup_lr(k - 1, 0.01, 0.1, 10, kind) for k in range(STEPS + 1)]
    assert lr_sequence(scheduler, optimizer) == pytest.approx(expected, rel=1e-12)


def test_warmup_lr_spot_values():
    optimizer = make_optimizer()
    scheduler = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=1.0,
                         warmup_num_steps=10, warmup_type="linear")
    seq = lr_sequence(scheduler, optimizer, steps=12)
    # i = -1 and i = 0 both give the minimum; i = 5 is halfway; from i = 10 on, the maximum.
    assert seq[0] == 0.0 and seq[1] == 0.0
    assert seq[6] == pytest.approx(0.5)
    assert seq[11] == seq[12] == 1.0
    optimizer = make_optimizer()
    scheduler = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=100)
    seq = lr_sequence(scheduler, optimizer, steps=10)
    assert seq[10] == pytest.approx(math.log(10) / math.log(100)) == pytest.approx(0.5)
    assert scheduler.last_batch_iteration == 9 and scheduler.last_epoch == 10


def test_warmup_lr_max_defaults_to_each_groups_lr():
    for group, base in [(0, 0.2), (1, 0.04)]:
        optimizer = make_optimizer(lrs=(0.2, 0.04))
        scheduler = WarmupLR(optimizer, warmup_num_steps=4, warmup_type="linear")
        expected = [ref_warmup_lr(k - 1, 0.0, base, 4, "linear") for k in range(11)]
        assert lr_sequence(scheduler, optimizer, steps=10, group=group) == pytest.approx(expected)
    assert scheduler.get_last_lr() == pytest.approx([0.2, 0.04])


def test_per_group_lists():
    optimizer = make_optimizer(lrs=(0.1, 0.1))
    scheduler = WarmupDecayLR(optimizer, total_num_steps=20, warmup_min_lr=[0.0, 0.01],
                              warmup_max_lr=[0.1, 0.02], warmup_num_steps=5)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([
        ref_warmup_decay_lr(6, 0.0, 0.1, 5, "log", 20),
        ref_warmup_decay_lr(6, 0.01, 0.02, 5, "log", 20)])
    with pytest.raises(ConfigError, match=r"^WarmupLR\.warmup_min_lr: expected one value per "
                                          r"parameter group \(2\), got a list of 3"):
        WarmupLR(make_optimizer(lrs=(0.1, 0.1)), warmup_min_lr=[0.0, 0.0, 0.0])


@pytest.mark.parametrize("kind", ["log", "linear"])
@pytest.mark.parametrize("warmup,total", [(10, 30), (1, 5), (10, 10)])
def test_warmup_decay_lr(kind, warmup, total):
    optimizer = make_optimizer("adamw")
    scheduler = WarmupDecayLR(optimizer, total_num_steps=total, warmup_min_lr=0.01,
                              warmup_max_lr=0.1, warmup_num_steps=warmup, warmup_type=kind)
    expected = [ref_warmup_decay_lr(k - 1, 0.01, 0.1, warmup, kind, total)
                for k in range(STEPS + 1)]
    seq = lr_sequence(scheduler, optimizer)
    assert seq == pytest.approx(expected, rel=1e-12)
    assert seq[-1] == pytest.approx(0.01)  # decayed back to warmup_min_lr past total_num_steps


def test_warmup_decay_lr_spot_values():
    optimizer = make_optimizer()
    scheduler = WarmupDecayLR(optimizer, total_num_steps=20, warmup_min_lr=0.0,
                              warmup_max_lr=1.0, warmup_num_steps=10, warmup_type="linear")
    seq = lr_sequence(scheduler, optimizer, steps=25)
    assert seq[11] == 1.0  # i = 10: end of warmup, (20 - 10) / (20 - 10)
    assert seq[16] == pytest.approx(0.5)  # i = 15: halfway down
    assert seq[21] == 0.0 and seq[25] == 0.0  # i >= 20: zero


@pytest.mark.parametrize("kind", ["log", "linear"])
@pytest.mark.parametrize("warmup,total", [(10, 30), (1, 5), (10, 10)])
def test_warmup_cosine_lr(kind, warmup, total):
    for group, base in [(0, 0.05), (1, 0.2)]:
        optimizer = make_optimizer("adamw", lrs=(0.05, 0.2))
        scheduler = WarmupCosineLR(optimizer, total_num_steps=total, warmup_min_ratio=0.1,
                                   warmup_num_steps=warmup, cos_min_ratio=0.05, warmup_type=kind)
        expected = [ref_warmup_cosine_lr(k - 1, base, 0.1, warmup, kind, total, 0.05)
                    for k in range(STEPS + 1)]
        seq = lr_sequence(scheduler, optimizer, group=group)
        assert seq == pytest.approx(expected, rel=1e-12)
        assert seq[-1] == pytest.approx(base * 0.05)  # held at cos_min_ratio after the end


def test_warmup_cosine_lr_spot_values():
    optimizer = make_optimizer(lrs=(2.0,))
    scheduler = WarmupCosineLR(optimizer, total_num_steps=12, warmup_min_ratio=0.0,
                               warmup_num_steps=2, cos_min_ratio=0.0, warmup_type="linear")
    seq = lr_sequence(scheduler, optimizer, steps=14)
    assert seq[0] == 0.0  # DeepSpeed's ratio before the first step is 0
    assert seq[2] == pytest.approx(1.0)  # i = 1: 1/2 of the warmup
    assert seq[7] == pytest.approx(1.0)  # i = 6: (6 - 2 + 1) / 10 = half of the cosine
    assert seq[13] == seq[14] == 0.0
    assert scheduler.get_lr_ratio() == 0.0


@pytest.mark.parametrize("make", [
    lambda opt: WarmupLR(opt, warmup_min_lr=0.001, warmup_max_lr=0.01, warmup_num_steps=8),
    lambda opt: WarmupDecayLR(opt, total_num_steps=20, warmup_num_steps=8, warmup_type="linear"),
    lambda opt: WarmupCosineLR(opt, total_num_steps=20, warmup_num_steps=8),
], ids=["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
def test_state_dict_round_trip_resumes_the_sequence(make):
    optimizer = make_optimizer("adamw")
    scheduler = make(optimizer)
    full = lr_sequence(scheduler, optimizer, steps=25)

    optimizer = make_optimizer("adamw")
    scheduler = make(optimizer)
    first = lr_sequence(scheduler, optimizer, steps=11)
    saved_scheduler, saved_optimizer = scheduler.state_dict(), optimizer.state_dict()

    resumed_optimizer = make_optimizer("adamw")
    resumed = make(resumed_optimizer)
    resumed.load_state_dict(saved_scheduler)
    resumed_optimizer.load_state_dict(saved_optimizer)
    rest = lr_sequence(resumed, resumed_optimizer, steps=14)
    assert first + rest[1:] == full


def test_loads_deepspeed_state_dict():
    # A DeepSpeed scheduler saves only {"last_batch_iteration": i}.
    optimizer = make_optimizer()
    scheduler = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=10,
                         warmup_type="linear")
    scheduler.load_state_dict({"last_batch_iteration": 4})
    assert scheduler.last_batch_iteration == 4
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # i = 5


@pytest.mark.parametrize("cls", [WarmupDecayLR, WarmupCosineLR])
def test_a_resumed_schedule_keeps_its_own_length(cls):
    # A run resumed with a longer max_steps (the Trainer fills total_num_steps from it) decays
    # over the new length, as under DeepSpeed, whose schedules load their position only: the
    # checkpoint's total of 10 made the resumed run's rate reach its end at step 10 of 16.
    def make(optimizer, total):
        return cls(optimizer, total_num_steps=total, warmup_num_steps=2)

    optimizer = make_optimizer("adamw")
    short = make(optimizer, 10)
    lr_sequence(short, optimizer, steps=6)
    resumed_optimizer = make_optimizer("adamw")
    resumed_optimizer.load_state_dict(optimizer.state_dict())  # torch's order: then the schedule
    resumed = make(resumed_optimizer, 16)
    # zero_ext checkpoints written before held the settings too, or torch's counters; all load
    # the position only
    for saved in (short.state_dict(), {**short.__dict__, "optimizer": None},
                  {"last_epoch": 6, "_step_count": 7}):
        resumed.load_state_dict({k: v for k, v in saved.items() if k != "optimizer"})
        assert resumed.total_num_steps == 16 and resumed.last_batch_iteration == 5
    uninterrupted_optimizer = make_optimizer("adamw")
    uninterrupted = make(uninterrupted_optimizer, 16)
    full = lr_sequence(uninterrupted, uninterrupted_optimizer, steps=16)
    assert resumed.get_last_lr() == pytest.approx([full[6]], rel=1e-12)
    rest = lr_sequence(resumed, resumed_optimizer, steps=10)
    assert rest[1:] == pytest.approx(full[7:], rel=1e-12) and rest[-1] < rest[-2]


def test_build_scheduler_from_config():
    optimizer = make_optimizer()
    config = SchedulerConfig(type="warmupcosinelr", params={"total_num_steps": 30,
                                                             "warmup_num_steps": 10})
    scheduler = build_scheduler(config, optimizer)
    assert isinstance(scheduler, WarmupCosineLR)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    assert (scheduler.cos_min_ratio, scheduler.warmup_type) == (0.0001, "log")
    expected = [ref_warmup_cosine_lr(k - 1, 0.05, 0.0, 10, "log", 30, 0.0001) for k in range(41)]
    assert lr_sequence(scheduler, optimizer) == pytest.approx(expected, rel=1e-12)
    assert isinstance(build_scheduler(SchedulerConfig(type="WarmupLR"), optimizer), WarmupLR)
    with pytest.raises(TypeError, match="expected a zero_ext.config.SchedulerConfig"):
        build_scheduler({"type": "WarmupLR"}, optimizer)


@pytest.mark.parametrize("cls", [WarmupLR, WarmupDecayLR, WarmupCosineLR])
def test_signature_defaults_match_the_config(cls):
    signature = inspect.signature(cls.__init__)
    accepted = {name: p.default for name, p in signature.parameters.items()
                if name not in ("self", "optimizer")}
    defaults = SCHEDULER_DEFAULTS[cls.__name__]
    assert list(accepted) == list(defaults)
    required = [name for name, default in accepted.items() if default is inspect.Parameter.empty]
    assert required == (["total_num_steps"] if cls is not WarmupLR else [])
    for name in required:
        with pytest.raises(ConfigError, match=f"^params.{name}: required by {cls.__name__}"):
            SchedulerConfig(type=cls.__name__)
    for name in accepted.keys() - set(required):
        assert accepted[name] == defaults[name], name


@pytest.mark.parametrize("make,message", [
    (lambda opt: WarmupLR(opt, warmup_type="cosine"),
     r"^WarmupLR\.warmup_type: expected one of 'log', 'linear', got 'cosine' \(str\)"),
    (lambda opt: WarmupLR(opt, warmup_num_steps=0),
     r"^WarmupLR\.warmup_num_steps: expected an integer >= 1, got 0 \(int\)"),
    (lambda opt: WarmupLR(opt, warmup_min_lr=-1.0),
     r"^WarmupLR\.warmup_min_lr: expected a number >= 0, got -1\.0 \(float\)"),
    (lambda opt: WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=5,
                                cos_min_ratio=1.5),
     r"^WarmupCosineLR\.cos_min_ratio: expected a number in \[0, 1\], got 1\.5 \(float\)"),
    (lambda opt: WarmupDecayLR(opt, total_num_steps="auto"),
     r"^WarmupDecayLR\.total_num_steps: 'auto' is filled in by the Hugging Face Trainer"),
])
def test_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make(make_optimizer())


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="WarmupLR: expected a torch.optim.Optimizer"):
        WarmupLR(object())


# -- DeepSpeed's own classes as the reference for stepping, state and construction ------------
def _deepspeed_pair(cls, lr=0.1, **params):
    """(zero_ext's scheduler, its optimizer), (DeepSpeed's, its optimizer) over SGD at `lr`."""
    from deepspeed.runtime import lr_schedules as ds

    pairs = []
    for make in (cls, getattr(ds, cls.__name__)):
        optimizer = make_optimizer("sgd", lrs=(lr,))
        pairs.append((make(optimizer, **params), optimizer))
    return pairs


_PARAMS = {WarmupLR: {"warmup_max_lr": 0.1, "warmup_num_steps": 10},
           WarmupDecayLR: {"total_num_steps": 20, "warmup_num_steps": 4},
           WarmupCosineLR: {"total_num_steps": 20, "warmup_num_steps": 4}}


@pytest.mark.parametrize("cls", [WarmupLR, WarmupDecayLR, WarmupCosineLR])
def test_step_to_a_position_and_state_dicts_are_deepspeeds(cls):
    # step(i) and step(last_batch_iteration=i) move to position i, as DeepSpeed's step does
    # (torch's step(epoch) semantics put it one behind); the state dict is DeepSpeed's
    # {"last_batch_iteration": i}, which each side loads from the other.
    (ours, our_optimizer), (theirs, their_optimizer) = _deepspeed_pair(cls, **_PARAMS[cls])
    for position in (None, 5, None, None, 2, 17, None):
        kwargs = {} if position is None else {"last_batch_iteration": position}
        ours.step(**kwargs) if position is None or position % 2 else ours.step(position)
        theirs.step(**kwargs)
        assert our_optimizer.param_groups[0]["lr"] == pytest.approx(
            their_optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15), position
        assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), rel=1e-12)
        assert ours.state_dict() == theirs.state_dict()
    (fresh, _), (other, _) = _deepspeed_pair(cls, **_PARAMS[cls])
    other.load_state_dict(ours.state_dict())
    fresh.load_state_dict(theirs.state_dict())
    assert fresh.last_batch_iteration == other.last_batch_iteration == 18
    ours.last_batch_iteration = 3  # DeepSpeed's attribute, writable
    theirs.last_batch_iteration = 3
    ours.step(), theirs.step()
    assert our_optimizer.param_groups[0]["lr"] == pytest.approx(
        their_optimizer.param_groups[0]["lr"], rel=1e-12)


@pytest.mark.parametrize("cls", [WarmupLR, WarmupDecayLR, WarmupCosineLR])
def test_built_at_a_position_leaves_the_groups_and_steps_on_from_it(cls):
    # DeepSpeed's constructor argument: the groups keep their learning rate, the next step()
    # goes to the position after it.
    (ours, our_optimizer), (theirs, their_optimizer) = _deepspeed_pair(
        cls, last_batch_iteration=6, **_PARAMS[cls])
    assert our_optimizer.param_groups[0]["lr"] == their_optimizer.param_groups[0]["lr"] == 0.1
    for _ in range(3):
        ours.step(), theirs.step()
        assert our_optimizer.param_groups[0]["lr"] == pytest.approx(
            their_optimizer.param_groups[0]["lr"], rel=1e-12)
    assert ours.last_batch_iteration == 9
    with pytest.raises(ConfigError, match="last_batch_iteration: expected an integer >= -1"):
        cls(make_optimizer(), last_batch_iteration=-2, **_PARAMS[cls])


@pytest.mark.parametrize("cls,params", [
    (WarmupLR, {"warmup_num_steps": 4}),
    (WarmupDecayLR, {"total_num_steps": 20, "warmup_num_steps": 4, "warmup_max_lr": None}),
    (WarmupCosineLR, {"total_num_steps": 20, "warmup_num_steps": 4})])
def test_base_rates_follow_torchs_initial_lr_rule(cls, params):
    # The base rate is the group's initial_lr, which the first scheduler built on the
    # optimizer sets (torch's rule): inside torch's SequentialLR, whose members are all built
    # up front (each moving lr), the schedule runs at the optimizer's rate, 0.1. DeepSpeed's
    # reads lr when built, 0.01 after LinearLR's start factor: the one documented difference.
    optimizer = make_optimizer("sgd", lrs=(0.1,))
    first = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=2)
    second = cls(optimizer, **params)
    chained = torch.optim.lr_scheduler.SequentialLR(optimizer, [first, second], milestones=[2])
    rates = []
    for _ in range(12):
        optimizer.step()
        chained.step()
        rates.append(optimizer.param_groups[0]["lr"])
    alone_optimizer = make_optimizer("sgd", lrs=(0.1,))
    alone = cls(alone_optimizer, **params)
    want = []
    for _ in range(10):
        alone_optimizer.step()
        alone.step()
        want.append(alone_optimizer.param_groups[0]["lr"])
    assert rates[2:] == pytest.approx(want, rel=1e-12), (rates, want)
    assert optimizer.param_groups[0]["initial_lr"] == 0.1


@pytest.mark.parametrize("cls", [WarmupLR, WarmupDecayLR, WarmupCosineLR])
def test_built_at_a_position_leaves_a_tensor_lr_as_it_was(cls):
    parameter = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([parameter], lr=torch.tensor(0.1))
    scheduler = cls(optimizer, last_batch_iteration=6, **_PARAMS[cls])
    assert optimizer.param_groups[0]["lr"].item() == pytest.approx(0.1)
    scheduler.step()
    assert scheduler.last_batch_iteration == 7


def test_total_steps_below_the_warmup_warns_and_runs_as_deepspeed():
    """DeepSpeed 0.19 warns and clamps (WarmupDecayLR._get_gamma's max(0, ...), WarmupCosineLR's
    min(1, ...) progress): after the warmup the rate is at once the decay's floor."""
    lrs = {}
    for cls, extra in ((WarmupDecayLR, {"warmup_max_lr": 0.1}), (WarmupCosineLR, {})):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        with pytest.warns(UserWarning, match=f"{cls.__name__}.total_num_steps = 5 is less than "
                                             "warmup_num_steps = 10"):
            scheduler = cls(opt, total_num_steps=5, warmup_num_steps=10, warmup_type="linear",
                            **extra)
        lrs[cls] = []
        for _ in range(13):  # the rates of iterations 0-12, as DeepSpeed's steps set them
            opt.step()
            scheduler.step()
            lrs[cls].append(opt.param_groups[0]["lr"])
    warmup = [0.1 * i / 10 for i in range(10)]
    assert lrs[WarmupDecayLR] == pytest.approx(warmup + [0.0] * 3, abs=1e-12)
    assert lrs[WarmupCosineLR] == pytest.approx(warmup + [0.1 * 1e-4] * 3, abs=1e-12)
