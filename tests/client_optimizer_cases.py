"""Optimizers other than AdamW passed to initialize at stages 1-3 (zero/client_optimizer.py):
each runs on this rank's fp32 master shards and trains as the same torch optimizer on the whole
batch in one process (the reference, trained on rank 0). Run by tests/test_client_optimizer.py,
one process group per world size; the checkpoint case saves at one world size and resumes at
another (the group of the other world size reads what this one wrote)."""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import zero_ext
from zero_ext import comm

DIM, MICRO, STEPS = 12, 2, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(DIM, 2 * DIM)
        self.mid = nn.Linear(2 * DIM, 2 * DIM)
        self.out = nn.Linear(2 * DIM, DIM, bias=False)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x, y):
        h = self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))
        return F.mse_loss(self.norm(h), y)


# name -> (optimizer class, keyword arguments); each group of the model's parameters (the
# weights, the rest) gets the first, half its lr in the second.
OPTIMIZERS = {
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                       "weight_decay": 0.01}),
    "sgd_dampening": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.05, "lr_decay": 0.01,
                                      "initial_accumulator_value": 0.1}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    "adam_amsgrad": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01}),
    "nadam": (torch.optim.NAdam, {"lr": 0.01, "decoupled_weight_decay": True,
                                  "weight_decay": 0.1}),
    "radam": (torch.optim.RAdam, {"lr": 0.01}),
    "adamax": (torch.optim.Adamax, {"lr": 0.01}),
    "adadelta": (torch.optim.Adadelta, {"lr": 1.0}),
}


# Groups that keep different state: SGD's second group without momentum (no momentum_buffer).
OPTIMIZERS["sgd_mixed"] = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})
SECOND_GROUP = {"sgd_mixed": {"momentum": 0.0}}

# Stage 1 steps the same shards as stage 2 (only the gradients' reduction differs): two
# optimizers there suffice.
STAGES = {name: (1, 2, 3) if name in ("sgd_nesterov", "adagrad") else (2, 3)
          for name in OPTIMIZERS}


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


def _groups(model: nn.Module, lr: float, second: dict | None = None) -> list[dict]:
    """The weights, then the rest at half the rate (and `second`'s settings)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight")
                                                           and "norm" not in n)]
    return [{"params": weights}, {"params": rest, "lr": lr / 2, **(second or {})}]


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[name]
    return cls(_groups(model, kwargs["lr"], SECOND_GROUP.get(name)), **kwargs)


def _batch(step: int, world_size: int):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world_size * MICRO, DIM, generator=gen)
    return x, torch.randn(world_size * MICRO, DIM, generator=gen)


def _config(stage: int, clip: float = 0.0, accumulation: int = 1, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": clip,
            "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200,
                                  "stage3_param_persistence_threshold": 0},
            "steps_per_print": 10**6, **extra}


def _reference(name: str, world_size: int, steps: int = STEPS, clip: float = 0.0,
               accumulation: int = 1, schedule: bool = False, resumed_by: int = 0) -> dict:
    """The same optimizer in one process on the whole batch (the mean over ranks' micro-batches
    and the accumulation window), clipped as DeepSpeed clips (the global norm, 1e-6 added);
    `resumed_by`: the steps after the second are the batches of that many ranks."""
    model = _model()
    opt = _optimizer(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if schedule else None
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accumulation):
            size = resumed_by if resumed_by and step >= 2 else world_size
            x, y = _batch(step * accumulation + micro, size)
            (model(x, y) / accumulation).backward()
        if clip > 0:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
            coef = clip / (float(norm) + 1e-6)
            if coef < 1.0:
                for p in model.parameters():
                    p.grad.mul_(coef)
        opt.step()
        if sched is not None:
            sched.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(engine, steps: int, first_step: int = 0, accumulation: int = 1) -> None:
    rank, world_size = comm.rank(), comm.world_size()
    for step in range(first_step, first_step + steps):
        for micro in range(accumulation):
            x, y = _batch(step * accumulation + micro, world_size)
            rows = slice(rank * MICRO, (rank + 1) * MICRO)
            dtype = engine.model_dtype  # bf16 runs take bf16 inputs
            engine.backward(engine(x[rows].to(dtype), y[rows].to(dtype)))
            engine.step()


def _weights(engine) -> dict:
    from zero_ext.utils import safe_get_full_fp32_param
    return {n: safe_get_full_fp32_param(p).detach().clone()
            for n, p in engine.module.named_parameters()}


def _engine(name: str, config: dict, schedule: bool = False):
    model = _model()
    opt = _optimizer(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if schedule else None
    engine, optimizer, _, scheduler = zero_ext.initialize(model=model, optimizer=opt,
                                                          lr_scheduler=sched, config=config)
    return engine, optimizer, scheduler


def client_optimizer_cases(checkpoint_dir: str) -> dict:
    """Every case at this world size; rank 0's results hold the references."""
    world_size = comm.world_size()
    out: dict = {"got": {}, "reference": {}}
    for name in OPTIMIZERS:
        for stage in STAGES[name]:
            engine, _, _ = _engine(name, _config(stage))
            _train(engine, STEPS)
            out["got"][f"{name}_stage{stage}"] = _weights(engine)
        if comm.rank() == 0:
            out["reference"][name] = _reference(name, world_size)
    # offload_optimizer with DeepSpeed's zero_force_ds_cpu_optimizer false: the optimizer steps
    # the host shards, one bucket at a time as its gradients arrive (stage 3: behind the next
    # forward; with offload_param too).
    for name, stage, extra in (("sgd_nesterov", 2, {}), ("rmsprop", 3, {}),
                               ("adam_amsgrad", 3, {"offload_param": {"device": "cpu"}})):
        config = {**_config(stage), "zero_force_ds_cpu_optimizer": False}
        config["zero_optimization"].update({"offload_optimizer": {"device": "cpu"}, **extra})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine, _, _ = _engine(name, config)
            # How many parameters each of the optimizer's step() calls sees in its groups.
            inner, seen = engine.optimizer.optimizer, []
            step = inner.step
            inner.step = lambda inner=inner, seen=seen, step=step: (seen.append(sum(
                len(g["params"]) for g in inner.param_groups)), step())[1]
            _train(engine, STEPS)
        out["got"][f"{name}_offload{stage}"] = _weights(engine)
        out[f"{name}_offload{stage}_seen"] = (seen, len(engine.optimizer.client.shards))
        # The host memory budgeted for its state before the first step, and what it holds.
        plan = engine._host_memory_plan.per_rank
        out[f"{name}_offload{stage}_state_bytes"] = (
            {k: v for k, v in plan.items() if k.endswith("state") or k.startswith("exp_avg")},
            engine.optimizer.client.nbytes(), sum(s.master.numel()
                                                  for s in engine.optimizer.client.shards))
        # Stepped one shard at a time: not mistaken for state bound to the shards.
        out[f"{name}_offload{stage}_warnings"] = [str(w.message) for w in caught
                                                  if "bucket layout only" in str(w.message)]
    # bf16: the master shards step, the model's bf16 weights are written from them.
    for stage in (1, 3):
        engine, _, _ = _engine("sgd_nesterov", _config(stage, bf16={"enabled": True}))
        _train(engine, STEPS)
        with zero_ext.GatheredParameters(list(engine.module.parameters())):
            out[f"bf16_stage{stage}"] = {
                "masters": _weights(engine),
                "weights": {n: p.detach().clone() for n, p in engine.module.named_parameters()}}
    # Clipping, accumulation and an LR schedule on the user's optimizer.
    engine, optimizer, _ = _engine("sgd_nesterov", _config(2, clip=0.05, accumulation=2),
                                           schedule=True)
    _train(engine, STEPS, accumulation=2)
    out["got"]["clip_accumulate_schedule"] = _weights(engine)
    out["lr"] = [g["lr"] for g in optimizer.param_groups]
    out["mom"] = engine.get_mom()  # SGD's momentum, as DeepSpeed reports it
    if comm.rank() == 0:
        out["reference"]["clip_accumulate_schedule"] = _reference(
            "sgd_nesterov", world_size, clip=0.05, accumulation=2, schedule=True)
    # The optimizer's state lives in the shards: as much of it as one rank's share (centered
    # RMSprop with momentum: three fp32 tensors per element, a step count per shard), read
    # back whole as DeepSpeed's safe_get_full_optimizer_state reads it.
    engine, optimizer, _ = _engine("rmsprop", _config(3))
    _train(engine, 1)
    out["state_bytes"] = optimizer.nbytes()["optimizer"]
    out["shards"] = len(optimizer.shards)
    out["shard_numel"] = sum(s.master.numel() for s in optimizer.shards)
    from zero_ext.utils import safe_get_full_optimizer_state
    out["square_avg"] = safe_get_full_optimizer_state(engine.module.mid.weight, "square_avg")
    out["errors"] = _refusals(engine, checkpoint_dir)
    out["counting"] = counting_cases(checkpoint_dir)
    # Checkpoints: the group of world size 2 saves after 2 steps at stage 2, the others resume
    # at stage 3 (Adagrad; SGD whose groups keep different state).
    for name in ("adagrad", "sgd_mixed"):
        save = os.path.join(checkpoint_dir, name)
        if world_size == 2:
            engine, _, _ = _engine(name, _config(2))
            _train(engine, 2)
            engine.save_checkpoint(save, tag="t")
            continue
        engine, _, _ = _engine(name, _config(3))
        engine.load_checkpoint(save, tag="t")
        _train(engine, 2, first_step=2)
        out["got"][f"resumed_{name}"] = _weights(engine)
        if comm.rank() == 0:
            out["reference"][f"resumed_{name}"] = _reference(name, 2, resumed_by=world_size)
    return out


class _PerParameter(torch.optim.Optimizer):
    """A toy optimizer: `update(p, group)` for each parameter with a gradient."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group)


class BlockScaled(_PerParameter):
    """Sign descent with one scale per block of 4 elements: state that is neither per element
    nor a scalar (as a blockwise-quantized moment's scales are)."""

    def update(self, p, group):
        flat = p.grad.reshape(-1)
        blocks = torch.cat([flat, flat.new_zeros((-flat.numel()) % 4)]).view(-1, 4)
        self.state[p]["absmax"] = blocks.abs().amax(1)
        p.add_(p.grad.sign(), alpha=-group["lr"])


class CountingSGD(torch.optim.Optimizer):
    """Element-wise, but not one of torch's: SGD with a bf16 momentum, whose rate falls with a
    counter it keeps in its own parameter groups (as Prodigy keeps `d` there), and scalar
    state of three kinds (a Python int, a 0-d and a 1-element 1-d tensor)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr, "k": 0})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["k"] += 1
            if group.pop("one_shot", False):  # a request it takes once, then forgets
                group["one_shots"] = group.get("one_shots", 0) + 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["buf"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["n"], state["t0"] = 0, torch.zeros(())
                    state["t1"] = torch.zeros(1, dtype=torch.float64)
                state["buf"].mul_(0.5).add_(p.grad.to(torch.bfloat16))
                state["n"] += 1
                state["t0"] += 1
                state["t1"] += 0.5
                p.add_(state["buf"].float(), alpha=-group["lr"] / group["k"])


class Listing(_PerParameter):
    """Keeps a list in its state: not a tensor, not a number."""

    def update(self, p, group):
        self.state[p].setdefault("seen", []).append(1)
        p.add_(p.grad, alpha=-group["lr"])


class PerShardNorm(_PerParameter):
    """Keeps each tensor's gradient norm, a per-tensor statistic: one per shard under ZeRO."""

    def update(self, p, group):
        state = self.state[p]
        state["norm"] = torch.linalg.vector_norm(p.grad)
        # A Python float that the update reads: a resume must give it back to the last bit.
        state["decay"] = state.get("decay", 1.0) * 0.9 + 1 / 30
        p.add_(p.grad, alpha=-group["lr"] * state["decay"])


class Lars(torch.optim.SGD):
    """A subclass with a step of its own (a per-tensor trust ratio): not SGD on shards."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    trust = p.norm() / (p.grad.norm() + 1e-9)
                    p.add_(p.grad, alpha=-group["lr"] * float(trust))


class ScheduleFree(_PerParameter):
    """The schedule-free protocol: train() and eval() move the weights between sequences."""

    def update(self, p, group):
        p.add_(p.grad, alpha=-group["lr"])

    def train(self):
        pass

    def eval(self):
        pass


class NamedSGD(torch.optim.SGD):
    """A subclass that only names SGD differently: SGD's step, exact on shards."""


def _adamw_8bit(params):
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(params, lr=0.01, min_8bit_size=16)


def _counting_reference(world_sizes: list[int], zero_lr_after: int) -> dict:
    """CountingSGD on the whole batch; the second group's lr set to 0 by the user after
    `zero_lr_after` steps."""
    model = _model()
    opt = CountingSGD(_groups(model, 0.1), lr=0.1)
    for step, world_size in enumerate(world_sizes):
        if step == zero_lr_after:
            opt.param_groups[1]["lr"] = 0.0
        opt.zero_grad()
        model(*_batch(step, world_size)).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def counting_cases(checkpoint_dir: str) -> dict:
    """CountingSGD (with zero_allow_untested_optimizer) at stage 3: its own group counter and
    the user's write to its groups after initialize reach the step; its bf16 and scalar state
    saved by 2 ranks resumes at this world size. Rank 0 holds the references."""
    world_size = comm.world_size()
    config = {**_config(3), "zero_allow_untested_optimizer": True}
    out: dict = {}
    model = _model()
    user = CountingSGD(_groups(model, 0.1), lr=0.1)
    engine, optimizer, _, _ = zero_ext.initialize(model=model, optimizer=user, config=config)
    _train(engine, 2)
    user.param_groups[1]["lr"] = 0.0  # the object the user passed, now on the shards
    _train(engine, 2, first_step=2)
    out["got"] = _weights(engine)
    out["k"] = [g["k"] for g in optimizer.param_groups]
    # A one-shot key set on the engine's group, which the optimizer's step removes: taken once.
    optimizer.param_groups[0]["one_shot"] = True
    _train(engine, 2, first_step=4)
    out["one_shots"] = [g.get("one_shots", 0) for g in optimizer.param_groups]
    out["one_shot_left"] = ["one_shot" in g for g in optimizer.param_groups]
    save = os.path.join(checkpoint_dir, "counting")
    if world_size == 2:
        model = _model()
        engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                              optimizer=CountingSGD(_groups(model, 0.1)))
        _train(engine, 2)
        engine.save_checkpoint(save, tag="t")
    else:
        model = _model()
        engine, optimizer, _, _ = zero_ext.initialize(model=model, config=config,
                                                      optimizer=CountingSGD(_groups(model, 0.1)))
        engine.load_checkpoint(save, tag="t")
        state = next(iter(optimizer.optimizer.state.values()))
        out["loaded_state"] = {k: (type(v).__name__, str(getattr(v, "dtype", "")),
                                   tuple(getattr(v, "shape", ())), float(v))
                               if not torch.is_tensor(v) or v.numel() == 1 else
                               (type(v).__name__, str(v.dtype))
                               for k, v in state.items()}
        _train(engine, 2, first_step=2)
        out["resumed"] = _weights(engine)
    if comm.rank() == 0:
        out["reference"] = _counting_reference([world_size] * 4, zero_lr_after=2)
        out["reference_resumed"] = _counting_reference([2, 2] + [world_size] * 2,
                                                       zero_lr_after=99)
    # State bound to the shards: a per-tensor statistic (one per shard, on one rank at stage 3
    # with several buckets, or one per rank at stage 2 with one bucket, where only the ranks'
    # comparison finds it) and per-block scales. Saved by each rank as it is: resumed at the
    # same world size and buckets, it trains on as the uninterrupted run; at another world
    # size, refused.
    bound = [("norm3", PerShardNorm, 3, 200), ("norm2", PerShardNorm, 2, 10**6),
             ("block3", BlockScaled, 3, 200)]
    if importlib.util.find_spec("bitsandbytes") is not None:
        # bitsandbytes' 8-bit AdamW (a QLoRA recipe's paged/8-bit optimizer): uint8 moments
        # with per-block scales over each shard (8-bit down to 16 elements here).
        bound.append(("bnb8", _adamw_8bit, 2, 200))
    for name, cls, stage, bucket in bound:
        single = {**config, "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket,
                                                  "stage3_param_persistence_threshold": 0}}

        def start(single=single, cls=cls):
            model = _model()
            return zero_ext.initialize(model=model, config=single,
                                       optimizer=cls(model.parameters()))[0]
        path = os.path.join(checkpoint_dir, f"{name}_{world_size}")
        engine = start()
        _train(engine, 2)
        engine.save_checkpoint(path, tag="t")
        _train(engine, 2, first_step=2)
        uninterrupted = _weights(engine)
        engine = start()
        engine.load_checkpoint(path, tag="t")
        _train(engine, 2, first_step=2)
        resumed = _weights(engine)
        out[f"bound_{name}"] = max((resumed[n] - uninterrupted[n]).abs().max().item()
                                   for n in resumed)
        out[f"bound_{name}_dtypes"] = sorted({
            str(v.dtype) for state in engine.optimizer.optimizer.state.values()
            for v in state.values() if torch.is_tensor(v)})
        if world_size != 2:  # the 2-rank group's checkpoint, at this world size
            saved = os.path.join(checkpoint_dir, f"{name}_2")
            out[f"bound_{name}_elsewhere"] = _error(
                lambda start=start, saved=saved: start().load_checkpoint(saved, tag="t"))
    # A schedule-free optimizer (train() / eval() switch its weights): refused.
    out["schedule_free"] = _error(lambda: zero_ext.initialize(
        model=_model(), config=config, optimizer=ScheduleFree(_model().parameters())))
    # Subclasses: one with a step of its own needs the key; one without runs as SGD.
    out["lars"] = _error(lambda: zero_ext.initialize(
        model=_model(), config=_config(2), optimizer=Lars(_model().parameters(), lr=0.1)))
    model = _model()
    engine, _, _, _ = zero_ext.initialize(model=model, config=_config(2),
                                          optimizer=NamedSGD(model.parameters(), lr=0.1))
    out["named_sgd"] = type(engine.optimizer.optimizer).__name__
    # A parameter frozen when saved and trained now has no state for its optimizer.
    model = _model()
    model.norm.requires_grad_(False)
    engine, _, _, _ = zero_ext.initialize(model=model, config=_config(2), optimizer=torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9))
    _train(engine, 1)
    path = os.path.join(checkpoint_dir, f"frozen{world_size}")
    engine.save_checkpoint(path, tag="t")
    model = _model()
    engine, _, _, _ = zero_ext.initialize(model=model, config=_config(2), optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9))
    out["unfrozen"] = _error(lambda: engine.load_checkpoint(path, tag="t"))
    return out


def _error(fn) -> str:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the message is the result
        return f"{type(error).__name__}: {error}"
    return "no error"


def _refusals(sgd_engine, checkpoint_dir: str) -> dict:
    """What initialize and the checkpoints refuse, each message as raised."""
    import warnings

    def init(optimizer_factory, config):
        model = _model()
        return zero_ext.initialize(model=model, optimizer=optimizer_factory(model),
                                   config=config)

    errors = {
        "lbfgs": _error(lambda: init(lambda m: torch.optim.LBFGS(m.parameters()), _config(2))),
        "untested": _error(lambda: init(lambda m: BlockScaled(m.parameters()), _config(2))),
        "offload": _error(lambda: init(
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            {**_config(2), "zero_optimization": {
                "stage": 2, "offload_optimizer": {"device": "cpu"}}})),
        "offload_untested": _error(lambda: init(
            lambda m: CountingSGD(m.parameters()),
            {**_config(2), "zero_allow_untested_optimizer": True,
             "zero_force_ds_cpu_optimizer": False, "zero_optimization": {
                 "stage": 2, "offload_optimizer": {"device": "cpu"}}})),
        "compress_momentum": _error(lambda: init(
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            {**_config(2), "zero_ext": {"compression": {"gradients": {
                "method": "topk", "freeze_variance": True, "warmup_steps": 2,
                "compress_momentum": True}}}})),
    }
    # Allowed when asked for, warning what it means, and at its first step that its per-block
    # state binds its checkpoints to these shards.
    untested = {**_config(2), "zero_allow_untested_optimizer": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, _, _ = init(lambda m: BlockScaled(m.parameters()), untested)
        before = _weights(engine)
        _train(engine, 1)
    messages = [str(w.message) for w in caught]
    errors["untested_warning"] = " ".join(m for m in messages if "flat fp32 shards" in m)
    errors["bound_warning"] = " ".join(m for m in messages if "bucket layout only" in m)
    errors["untested_moved"] = any(not torch.equal(before[n], w)
                                   for n, w in _weights(engine).items())
    # State that is not data a checkpoint holds (a list): the save is refused, on every rank,
    # before anything is written, and said at the first step.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, _, _ = init(lambda m: Listing(m.parameters()), untested)
        _train(engine, 1)
    errors["unsaveable_warning"] = " ".join(str(w.message) for w in caught
                                            if "save_checkpoint will refuse" in str(w.message))
    errors["unsaveable"] = _error(lambda: engine.save_checkpoint(
        os.path.join(checkpoint_dir, f"listing{comm.world_size()}"), tag="t"))
    # An optimizer's state is not another's: AdamW's moments into SGD and back.
    adamw_dir = os.path.join(checkpoint_dir, f"adamw{comm.world_size()}")
    adamw, _, _, _ = zero_ext.initialize(model=_model(), config=_config(2))
    _train(adamw, 1)
    adamw.save_checkpoint(adamw_dir, tag="t")
    errors["adamw_into_rmsprop"] = _error(lambda: sgd_engine.load_checkpoint(adamw_dir, tag="t"))
    rms_dir = os.path.join(checkpoint_dir, f"rmsprop{comm.world_size()}")
    sgd_engine.save_checkpoint(rms_dir, tag="t")
    errors["rmsprop_into_adamw"] = _error(lambda: adamw.load_checkpoint(rms_dir, tag="t"))
    sgd_engine.load_checkpoint(adamw_dir, tag="t", load_optimizer_states=False)
    errors["weights_only"] = "loaded"
    return errors
