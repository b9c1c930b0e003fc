"""Optimizers other than AdamW passed to initialize at stages 1-3 (zero/client_optimizer.py):
each runs on this rank's fp32 master shards and trains as the same torch optimizer on the whole
batch in one process (the reference, trained on rank 0). Run by tests/test_client_optimizer.py,
one process group per world size; the checkpoint case saves at one world size and resumes at
another (the group of the other world size reads what this one wrote)."""

from __future__ import annotations

import os

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


# Stage 1 steps the same shards as stage 2 (only the gradients' reduction differs): two
# optimizers there suffice.
STAGES = {name: (1, 2, 3) if name in ("sgd_nesterov", "adagrad") else (2, 3)
          for name in OPTIMIZERS}


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


def _groups(model: nn.Module, lr: float) -> list[dict]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight")
                                                           and "norm" not in n)]
    return [{"params": weights}, {"params": rest, "lr": lr / 2}]


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
    cls, kwargs = OPTIMIZERS[name]
    model = _model()
    opt = cls(_groups(model, kwargs["lr"]), **kwargs)
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
    cls, kwargs = OPTIMIZERS[name]
    model = _model()
    opt = cls(_groups(model, kwargs["lr"]), **kwargs)
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
    # A checkpoint: the group of world size 2 saves after 2 steps, the others resume it.
    save = os.path.join(checkpoint_dir, "adagrad")
    if world_size == 2:
        engine, _, _ = _engine("adagrad", _config(2))
        _train(engine, 2)
        engine.save_checkpoint(save, tag="t")
    else:
        engine, _, _ = _engine("adagrad", _config(3))
        engine.load_checkpoint(save, tag="t")
        _train(engine, 2, first_step=2)
        out["got"]["resumed"] = _weights(engine)
        if comm.rank() == 0:
            out["reference"]["resumed"] = _reference("adagrad", 2, resumed_by=world_size)
    return out


class BlockScaled(torch.optim.Optimizer):
    """Sign descent with one scale per block of 4 elements: state that is neither per element
    nor a scalar (as a blockwise-quantized moment's scales are)."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                flat = p.grad.reshape(-1)
                pad = (-flat.numel()) % 4
                blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 4)
                self.state[p]["absmax"] = blocks.abs().amax(1)
                p.add_(p.grad.sign(), alpha=-group["lr"])


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
        "compress_momentum": _error(lambda: init(
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            {**_config(2), "zero_ext": {"compression": {"gradients": {
                "method": "topk", "freeze_variance": True, "warmup_steps": 2,
                "compress_momentum": True}}}})),
    }
    # Allowed when asked for, warning what it means; its state cannot be resharded, so the
    # save is refused, on every rank, before anything is written.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, _, _ = init(lambda m: BlockScaled(m.parameters()),
                               {**_config(2), "zero_allow_untested_optimizer": True})
    errors["untested_warning"] = " ".join(str(w.message) for w in caught
                                          if "flat fp32 shards" in str(w.message))
    before = _weights(engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(engine, 1)
    errors["unsaveable_warning"] = " ".join(str(w.message) for w in caught
                                            if "save_checkpoint will refuse" in str(w.message))
    errors["untested_moved"] = any(not torch.equal(before[n], w)
                                   for n, w in _weights(engine).items())
    errors["unsaveable"] = _error(lambda: engine.save_checkpoint(
        os.path.join(checkpoint_dir, f"block{comm.world_size()}"), tag="t"))
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
