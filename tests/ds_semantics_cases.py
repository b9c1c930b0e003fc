"""What each rank runs in tests/test_ds_semantics.py: DeepSpeed behaviours that need an engine
(default clipping, bf16.check_grad_overflow, ignore_unused_parameters, the fp16 minimum scale,
fp16.auto_cast), all in one process group."""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

import zero_ext
from zero_ext import comm

import engine_cases


def _config(stage: int, dtype: str, **extra) -> dict:
    """engine_cases.config without gradient_clipping (DeepSpeed's default applies), plus
    `extra` top-level keys."""
    cfg = engine_cases.config(stage, dtype, 1, comm.world_size())
    del cfg["gradient_clipping"]
    cfg.update(extra)
    return cfg


def _inf_grad_hook(model, rank_only: int | None = 1):
    """An inf in fc1.weight's gradient on `rank_only` (every rank when None); the handle."""
    if rank_only is not None and comm.rank() != rank_only:
        return None
    return model.fc1.weight.register_hook(
        lambda g: g.index_fill(0, torch.tensor([0], device=g.device), float("inf")))


def _step(engine, step: int) -> None:
    tokens, targets = engine_cases.global_batch(step, comm.world_size(), 1)
    rank = comm.rank()
    engine.backward(engine_cases.run(engine, tokens[0, rank], targets[0, rank]))
    engine.step()


def default_clipping() -> dict:
    """DeepSpeed's default gradient_clipping (1.0) with the key left out; no report line with
    steps_per_print left out (DeepSpeed's None)."""
    model = engine_cases.build_model()
    cfg = engine_cases.config(2, "fp32", 1, comm.world_size())
    del cfg["gradient_clipping"], cfg["steps_per_print"]
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg,
                                          model_parameters=engine_cases.param_groups(model))
    norms, printed = [], io.StringIO()
    with contextlib.redirect_stdout(printed):
        for step in range(3):
            _step(engine, step)
            norms.append(engine.get_global_grad_norm())
    out = {"params": engine_cases.host_params(model, engine), "norms": norms,
           "stdout": printed.getvalue()}
    if comm.rank() == 0:
        for clip in (1.0, 0.0):
            out[f"reference_clip{clip:g}"] = engine_cases.train_reference(
                "fp32", 1, 3, comm.world_size(), clip=clip)
    return out


def bf16_nonfinite(stage: int, check: bool | None) -> dict:
    """bf16 with an inf in one gradient on rank 1 at the second step, bf16.check_grad_overflow
    `check` (None: the key left out)."""
    model = engine_cases.build_model()
    bf16 = {"enabled": True} if check is None else {"enabled": True, "check_grad_overflow": check}
    engine, _, _, _ = zero_ext.initialize(model=model, config=_config(stage, "bf16", bf16=bf16))
    _step(engine, 0)
    before = engine_cases.host_params(model, engine)
    handle = _inf_grad_hook(model)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _step(engine, 1)
        except FloatingPointError as exc:
            error = str(exc)
    if handle is not None:
        handle.remove()
    after = engine_cases.host_params(model, engine)
    return {
        "error": error,
        "unchanged": all(torch.equal(before[n], after[n]) for n in before),
        "finite": all(bool(torch.isfinite(p).all()) for p in after.values()),
        "skipped": engine.skipped_steps, "global_steps": engine.global_steps,
        "warnings": [str(w.message) for w in caught
                     if str(w.message).startswith("zero_ext: the gradient norm is")],
    }


class _Routed(nn.Module):
    """Two branches; `use_b` decides whether `b` takes part (set per rank / micro-step)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.use_b = True

    def forward(self, x):
        y = self.a(x)
        return (self.b(y) if self.use_b else y).square().mean()


def unused_parameters(stage: int, accumulation: int, ignore: bool, b_on: str) -> dict:
    """_Routed at `stage` with ignore_unused_parameters `ignore`; `b` takes part on "all"
    ranks and micro-steps, only on rank 0 ("rank0"), or only in the first micro-step
    ("first_micro")."""
    torch.manual_seed(0)
    model = _Routed()
    world_size, rank = comm.world_size(), comm.rank()
    engine, _, _, _ = zero_ext.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": stage, "ignore_unused_parameters": ignore}})
    gen = torch.Generator().manual_seed(3)
    try:
        for _ in range(2):
            for micro in range(accumulation):
                model.use_b = (b_on == "all" or (b_on == "rank0" and rank == 0)
                               or (b_on == "first_micro" and micro == 0))
                x = torch.randn(world_size, 2, 4, generator=gen)[rank]
                engine.backward(engine(x.to(engine.device)))
                engine.step()
    except RuntimeError as exc:
        return {"error": str(exc), "global_steps": engine.global_steps}
    return {"error": None, "global_steps": engine.global_steps}


def fp16_min_scale(stage: int, raise_at_min: bool) -> dict:
    """fp16 whose gradients overflow at every step on every rank, from a scale of 2 with the
    minimum 1 and hysteresis 2: the scale each step leaves, and the error (or warnings)."""
    model = engine_cases.build_model()
    fp16 = {"enabled": True, "initial_scale_power": 1, "min_loss_scale": 1, "hysteresis": 2,
            "raise_error_at_min_scale": raise_at_min}
    engine, _, _, _ = zero_ext.initialize(model=model, config=_config(stage, "fp16", fp16=fp16))
    _inf_grad_hook(model, rank_only=None)
    scales, error = [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            try:
                _step(engine, step)
            except zero_ext.loss_scaler.LossScaleAtMinimumError as exc:
                error = (step, str(exc))
                break
            scales.append(engine.loss_scaler.scale)
    return {"scales": scales, "error": error, "skipped": engine.skipped_steps,
            "warnings": sum("raise_error_at_min_scale is false" in str(w.message)
                            for w in caught)}


class _Dtypes(nn.Module):
    """Records the dtypes its forward receives (positional x and nested, keyword extra)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.seen = None

    def forward(self, x, nested, extra=None):
        self.seen = {"x": x.dtype, "nested_list": nested["list"][0].dtype,
                     "nested_int": nested["ids"].dtype,
                     "extra": extra.dtype if extra is not None else None}
        return self.linear(x).float().mean()


def auto_cast(enabled: bool) -> dict:
    """fp16 at stage 1 with fp16.auto_cast `enabled`, fed fp32 inputs."""
    torch.manual_seed(0)
    model = _Dtypes()
    engine, _, _, _ = zero_ext.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
        "fp16": {"enabled": True, "auto_cast": enabled}, "zero_optimization": {"stage": 1}})
    device = engine.device
    x = torch.randn(2, 4, device=device)
    nested = {"list": [torch.randn(2, device=device)], "ids": torch.arange(2, device=device)}
    try:
        engine.backward(engine(x, nested, extra=torch.randn(2, device=device)))
        engine.step()
    except RuntimeError as exc:
        return {"error": str(exc), "seen": None}
    return {"error": None, "seen": {k: str(v) for k, v in model.seen.items()}}


def all_cases() -> dict:
    """Every case above, in one group (start-up dominates on 2 cores)."""
    out = {"clipping": default_clipping()}
    for stage in (0, 3):
        for check in (None, True, False):
            out[("bf16", stage, check)] = bf16_nonfinite(stage, check)
    for args in ((1, 1, False, "all"), (1, 1, True, "rank0"), (1, 1, False, "rank0"),
                 (2, 2, False, "first_micro"), (3, 1, False, "rank0"), (0, 2, False, "rank0")):
        out[("unused",) + args] = unused_parameters(*args)
    for stage in (0, 1):
        for raise_at_min in (True, False):
            out[("min_scale", stage, raise_at_min)] = fp16_min_scale(stage, raise_at_min)
    for enabled in (True, False):
        out[("auto_cast", enabled)] = auto_cast(enabled)
    return out
