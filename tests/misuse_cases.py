"""What each rank runs in tests/test_misuse.py: misuse that used to train silently wrong, and the
initialize() patterns DeepSpeed users write, each against plain PyTorch or DeepSpeed's contract.

One group per world size runs every case (process start-up dominates); a case that expects an
error catches it and returns its message, so the group goes on to the next case.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import zero_ext
from zero_ext import comm

import engine_cases
from engine_cases import global_batch, run

OFFLOAD = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}


def _engine(stage: int, accumulation: int = 1, clip: float = 0.0, **zero):
    model = engine_cases.build_model()
    cfg = engine_cases.config(stage, "fp32", accumulation, comm.world_size(), clip=clip, **zero)
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg,
                                          model_parameters=engine_cases.param_groups(model))
    return model, engine


def _micro_batch(step: int, micro: int = 0, accumulation: int = 1):
    tokens, targets = global_batch(step, comm.world_size(), accumulation)
    return tokens[micro, comm.rank()], targets[micro, comm.rank()]


def _state(engine) -> dict[str, torch.Tensor]:
    """Everything a step may change: full weights, and this rank's masters, moments and step
    counts (wherever offload keeps them)."""
    out = {f"param.{n}": v for n, v in engine_cases.host_params(engine.module, engine).items()}
    for i, shard in enumerate(engine.optimizer.shards):
        for name in ("master", "exp_avg", "exp_avg_sq", "step"):
            out[f"shard{i}.{name}"] = getattr(shard, name).detach().cpu().clone()
    return out


def _error(fn) -> str:
    try:
        fn()
    except Exception as error:  # noqa: BLE001  (the test reads type and message)
        return f"{type(error).__name__}: {error}"
    return "no error"


def offload_nan(stage: int) -> dict:
    """offload_optimizer without clipping or fp16: one good step; then a forward between
    backward() and step() (it must see the weights of before the backward); then a NaN loss
    on rank 1 only, whose step is skipped on every rank and changes nothing."""
    _, engine = _engine(stage, **OFFLOAD)
    engine_cases.train_steps(engine, 1)
    tokens, targets = _micro_batch(1)
    with torch.no_grad():
        before = run(engine, tokens, targets)
    engine.backward(run(engine, tokens, targets))
    with torch.no_grad():
        between = run(engine, tokens, targets)
    engine.step()
    saved = _state(engine)
    tokens, targets = _micro_batch(2)
    loss = run(engine, tokens, targets)
    if comm.rank() == 1:
        loss = loss * float("nan")
    engine.backward(loss)
    error = _error(engine.step)
    return {"before": before, "between": between, "saved": saved, "after": _state(engine),
            "error": error, "skipped": engine.skipped_steps,
            "host_stepped": len(engine.offload.shards),
            "deferrable": len(engine._deferrable)}


def backward_twice(stage: int) -> dict:
    """gradient_accumulation_steps 1, two backwards, one step: refused on every rank, weights
    and optimizer state unchanged."""
    _, engine = _engine(stage)
    engine_cases.train_steps(engine, 1)
    saved = _state(engine)

    def two_backwards_one_step():
        for micro in range(2):
            engine.backward(run(engine, *_micro_batch(1, micro, 2)))
        engine.step()

    return {"error": _error(two_backwards_one_step), "saved": saved, "after": _state(engine),
            "global_steps": engine.global_steps}


def pytorch_style_accumulation(stage: int) -> dict:
    """gradient_accumulation_steps 2 with PyTorch's loop (two backwards, then one step), which
    would never reach a boundary: refused at the first step()."""
    _, engine = _engine(stage, accumulation=2)
    for micro in range(2):
        engine.backward(run(engine, *_micro_batch(0, micro, 2)))
    return {"error": _error(engine.step), "global_steps": engine.global_steps}


def skipped_step(stage: int) -> dict:
    """Rank 1 skips engine.step() once (a rank-dependent branch): the next micro-step must
    raise on every rank, naming each rank's step. (Above stage 0 the skipped step's
    collectives no longer pair up across ranks, which comm's watch reports.)"""
    _, engine = _engine(stage)
    engine_cases.train_steps(engine, 1)
    errors = []
    for step in (1, 2):
        def micro_step(step=step):
            engine.backward(run(engine, *_micro_batch(step)))
            if step != 1 or comm.rank() != 1:
                engine.step()

        errors.append(_error(micro_step))
    return {"errors": errors, "global_steps": engine.global_steps}


def dict_loss() -> str:
    """A forward returning a dict (as transformers models do), passed to backward."""
    _, engine = _engine(2)
    tokens, targets = _micro_batch(0)
    return _error(lambda: engine.backward({"loss": run(engine, tokens, targets)}))


class _Float64Head(nn.Module):
    """An fp32 model with one fp64 layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2, dtype=torch.float64)


def wrong_dtype_layer() -> dict:
    """An fp64 (or fp16) layer in a model trained in fp32 (no fp16/bf16 section)."""
    out = {}
    for label, dtype in (("fp64", torch.float64), ("fp16", torch.float16)):
        model = _Float64Head()
        model.head.to(dtype)
        out[label] = _error(lambda model=model: zero_ext.initialize(
            model=model, config={"train_micro_batch_size_per_gpu": 1,
                                 "zero_optimization": {"stage": 2}}))
    return out


def meta_model_below_stage3() -> str:
    """A model built on torch's meta device (not under zero_ext.Init) at stage 2."""
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    return _error(lambda: zero_ext.initialize(
        model=model, config={"train_micro_batch_size_per_gpu": 1,
                             "zero_optimization": {"stage": 2}}))


# -- initialize() patterns (the optimizer and scheduler as in DeepSpeed's initialize) ----------
def _config_without_optimizer(stage: int, clip: float = 0.5) -> dict:
    cfg = engine_cases.config(stage, "fp32", 1, comm.world_size(), clip=clip)
    del cfg["optimizer"]
    return cfg


def _train(engine, steps: int = 3) -> dict:
    lrs = []
    for step in range(steps):
        engine.backward(run(engine, *_micro_batch(step)))
        engine.step()
        lrs.append(engine.get_lr()[0])
    return {"params": engine_cases.host_params(engine.module, engine), "lrs": lrs}


def _reference(make_optimizer, make_scheduler=None, steps: int = 3, clip: float = 0.5,
               leave_out: tuple[str, ...] = ()) -> dict:
    """Plain PyTorch in one process on the whole global batch of each step: the optimizer
    (and scheduler) the user built, over every trainable parameter but `leave_out`."""
    model = engine_cases.build_model()
    params = [p for n, p in model.named_parameters() if p.requires_grad and n not in leave_out]
    opt = make_optimizer(params)
    scheduler = make_scheduler(opt) if make_scheduler else None
    lrs = []
    for step in range(steps):
        tokens, targets = global_batch(step, comm.world_size(), 1)
        model.zero_grad(set_to_none=True)
        model(tokens[0].reshape(-1, engine_cases.SEQ),
              targets[0].reshape(-1, engine_cases.SEQ)).backward()
        for p in params:
            # No gradient steps with zeros, as in the engine (and DeepSpeed): decay still
            # applies (engine_cases.train_reference does the same).
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    return {"params": engine_cases.host_params(model), "lrs": lrs}


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _warmup_schedule(opt):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)


def callable_optimizer() -> dict:
    """optimizer=callable: called with the model's parameters, as DeepSpeed does."""
    model = engine_cases.build_model()
    engine, _, _, _ = zero_ext.initialize(model=model, config=_config_without_optimizer(2),
                                          optimizer=_adamw)
    return _train(engine)


def client_schedules() -> dict:
    """A client LR scheduler built on the client optimizer drives the engine's learning rate:
    transformers' warm-up schedule and torch's LambdaLR alike."""
    out = {}
    for label, make in (("transformers", _warmup_schedule),
                        ("lambda", lambda opt: torch.optim.lr_scheduler.LambdaLR(
                            opt, lambda step: 0.5 ** step))):
        model = engine_cases.build_model()
        opt = _adamw(model.parameters())
        engine, _, _, scheduler = zero_ext.initialize(
            model=model, config=_config_without_optimizer(2), optimizer=opt,
            lr_scheduler=make(opt))
        out[label] = {**_train(engine), "returned_is_engines": scheduler is engine.lr_scheduler}
        if comm.rank() == 0:
            out[label]["reference"] = _reference(_adamw, make)
    return out


def optimizer_with_model_parameters() -> dict:
    """optimizer together with model_parameters: DeepSpeed builds nothing from
    model_parameters when the optimizer is an instance; the optimizer's groups are trained."""
    model = engine_cases.build_model()
    opt = _adamw(model.parameters())
    engine, _, _, _ = zero_ext.initialize(model=model, config=_config_without_optimizer(2),
                                          optimizer=opt, model_parameters=model.parameters())
    return _train(engine)


def parameter_in_no_group() -> dict:
    """A trainable parameter in no group: not optimized (stays as it was), one warning naming
    it."""
    model = engine_cases.build_model()
    initial = model.fc2.bias.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, _, _ = zero_ext.initialize(
            model=model, config=engine_cases.config(2, "fp32", 1, comm.world_size(), clip=0.0),
            model_parameters=[p for n, p in model.named_parameters()
                              if p.requires_grad and n != "fc2.bias"])
        trained = _train(engine)
    out = {**trained, "initial": initial,
           "warnings": [str(w.message) for w in caught if "fc2.bias" in str(w.message)]}
    if comm.rank() == 0:
        out["reference"] = _reference(_adamw, clip=0.0, leave_out=("fc2.bias",))
    return out


def forwarded_attributes() -> dict:
    """Attributes the engine does not have come from the module, as DeepSpeedEngine's
    __getattr__ forwards them."""
    model = engine_cases.build_model()
    model.custom_flag = 7
    engine, _, _, _ = zero_ext.initialize(model=model, config=engine_cases.config(
        1, "fp32", 1, comm.world_size()))
    return {"flag": engine.custom_flag, "submodule_is": engine.fc1 is model.fc1,
            "missing": _error(lambda: engine.no_such_attribute),
            "own_config": engine.config is not None and not isinstance(engine.config, dict)}


def world2() -> dict:
    """Every case of the two-rank group."""
    return {
        "offload_nan": {stage: offload_nan(stage) for stage in (2, 3)},
        "backward_twice": {stage: backward_twice(stage) for stage in (0, 1, 2, 3)},
        "pytorch_style": {stage: pytorch_style_accumulation(stage) for stage in (0, 2)},
        "skipped_step": {0: skipped_step(0)},
        "dict_loss": dict_loss(),
        "wrong_dtype": wrong_dtype_layer(),
        "meta_stage2": meta_model_below_stage3(),
        "callable_optimizer": callable_optimizer(),
        "client_schedules": client_schedules(),
        "optimizer_with_model_parameters": optimizer_with_model_parameters(),
        "parameter_in_no_group": parameter_in_no_group(),
        "forwarded_attributes": forwarded_attributes(),
        "reference": _reference(_adamw) if comm.rank() == 0 else None,
    }
