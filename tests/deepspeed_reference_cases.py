"""zero_ext trained side by side with DeepSpeed itself, in the same processes, on the same data.

The DeepSpeed conformance suite (ds_conformance_cases*.py) ports DeepSpeed's own tests and
checks their intent against plain PyTorch; these cases run DeepSpeed (the version the README's
test command installs, on its CPU accelerator over the same gloo group) and zero_ext from one
ds_config and compare what a user sees: the loss, the learning rate, the loss scale, skipped
steps, the reported gradient norm at every step, and at the end the fp32 master weights and
Adam's two moments (or a client optimizer's own state) of every parameter
(`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`, DeepSpeed's and zero_ext's of
the same name).

Where the two differ on purpose (docs/deepspeed-compat.md), the case checks the difference as
documented: `fp16_scale_growth_step` measures DeepSpeed dividing the gradient of a step on
which the loss scale grows by twice the scale its backward used, and zero_ext not.

DeepSpeed refuses fp16 on a CPU without oneDNN fp16 (`is_fp16_supported`); the cases lift that
check, so DeepSpeed's fp16 path runs on torch's CPU fp16 kernels, the ones zero_ext runs.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import zero_ext
from zero_ext import utils as zx_utils

# world size -> {case id: case()}
CASES: dict[int, dict[str, Callable[[], None]]] = {}

IN, HIDDEN, OUT, MICRO = 12, 16, 5, 3
# fp32 masters and Adam's moments after a few steps: DeepSpeed's and zero_ext's AdamW are the
# same arithmetic, the reductions run in another order (measured: 1.7e-7 relative)
STATE_RTOL = 2e-6
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's, read by safe_get_full_optimizer_state


def deepspeed():
    """DeepSpeed, with its CPU accelerator's fp16 check lifted (see the module's docstring)."""
    # the README's test command installs DeepSpeed: a missing one fails here
    import deepspeed as ds
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at its first
    # initialize (82 s on 2 cores) that training here never calls: not built (the module by its
    # name: `deepspeed.comm.torch` as an attribute is the torch package)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        accelerator.is_fp16_supported = lambda: True
        accelerator.supported_dtypes = lambda: [torch.float32, torch.bfloat16, torch.float16]
    return ds


class Model(nn.Module):
    """Three linear layers (376 + 272 + 85 elements: no chunk of a world size of 2 or 3 divides
    them evenly) with GELU, and the loss inside forward as DeepSpeed's examples have it.

    `buffers`: also an fp32 buffer `scale` (1 + k/1000: 16-bit dtypes round it) multiplying the
    first activations, as rotary `inv_freq` enters a forward, and a buffer `offset` made in
    bf16 that the class lists for fp32 (transformers' `_keep_in_fp32_modules_strict`)."""

    _keep_in_fp32_modules_strict = ("offset",)

    def __init__(self, frozen_first_bias: bool = False, buffers: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN),
                                     nn.Linear(HIDDEN, OUT)])
        if frozen_first_bias:
            self.layers[0].bias.requires_grad_(False)
        self.register_buffer("scale", 1 + torch.arange(HIDDEN) / 1000 if buffers else None)
        self.register_buffer("offset",
                             torch.linspace(-0.3, 0.3, OUT).bfloat16() if buffers else None)

    def forward(self, x, y):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0 and self.scale is not None:
                x = (x * self.scale).to(x.dtype)
            if i < len(self.layers) - 1:
                x = nn.functional.gelu(x)
        if self.offset is not None:
            x = x.float() + self.offset
        return (x.float() - y).pow(2).mean()


@dataclass
class Trace:
    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    scales: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    skipped: int = 0
    global_steps: int = 0
    buffers: dict = field(default_factory=dict)  # the model's, by name, at the end
    # per parameter name: (fp32 master, *its optimizer state of `state_keys`: Adam's moments
    # unless asked otherwise), at the end (and after each step where asked)
    state: dict = field(default_factory=dict)
    states: list = field(default_factory=list)
    state_keys: tuple = MOMENTS


def batches(micro_steps: int, spikes: dict[int, float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches: drawn for every rank from one seed, so that both frameworks
    and the whole-batch view agree; `spikes` scales a micro-step's inputs (fp16 overflow)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(100 + world_size)
    out = []
    for step in range(micro_steps):
        x = torch.randn(world_size, MICRO, IN, generator=generator)[rank]
        y = torch.randn(world_size, MICRO, OUT, generator=generator)[rank]
        out.append((x * spikes.get(step, 1.0), y))
    return out


def _dtype(config: dict) -> torch.dtype:
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float32


def _full_state(framework: str, engine, keys: tuple[str, ...] = MOMENTS) -> dict:
    if framework == "deepspeed":
        from deepspeed import utils as api
    else:
        api = zx_utils
    state = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            state[name] = (param.detach().float().clone(),)
            continue
        master = api.safe_get_full_fp32_param(param)  # collective at stages 1-3
        if master is None:  # DeepSpeed at stage 0: the torch optimizer holds the state
            opt_state = engine.optimizer.state[param]
            state[name] = (param.detach().float().clone(),
                           *(opt_state[key].clone() for key in keys))
            continue
        tensors = [master] + [api.safe_get_full_optimizer_state(param, key) for key in keys]
        state[name] = tuple(t.detach().float().clone() for t in tensors)
    return state


def _micro_step(engine, x, y, dtype: torch.dtype, trace: Trace) -> bool:
    """One forward, backward and step() on (x, y), recorded in `trace`; whether the step ended
    an accumulation window."""
    loss = engine(x.to(dtype), y)
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    trace.losses.append(loss.item())
    if boundary:
        trace.lrs.append(list(engine.get_lr()))
        trace.scales.append(getattr(engine.optimizer, "loss_scale", None)
                            if dtype == torch.float16 else None)
        norm = engine.get_global_grad_norm()
        trace.grad_norms.append(None if norm is None else float(norm))
    return boundary


def _finish(trace: Trace, framework: str, engine, keys: tuple[str, ...] = MOMENTS) -> Trace:
    trace.skipped, trace.global_steps = engine.skipped_steps, engine.global_steps
    trace.buffers = {name: buffer.detach().clone()
                     for name, buffer in engine.module.named_buffers()}
    trace.state, trace.state_keys = _full_state(framework, engine, keys), keys
    return trace


def train(framework: str, config: dict, data, model_kwargs: dict | None = None,
          every_step_state: bool = False, client_optimizer: Callable | None = None,
          load_dir: str | None = None, save: tuple[int, str] | None = None,
          zero_ext_init: bool = False, state_keys: tuple[str, ...] | None = None) -> Trace:
    """Trains Model() under `framework` ("deepspeed" or "zero_ext") on this rank's `data`.

    `load_dir`: engine.load_checkpoint(load_dir) first. `save` (micro-steps, directory):
    engine.save_checkpoint(directory) after that many micro-steps, the trace starting after it.
    `zero_ext_init`: zero_ext's model is built under zero_ext.Init (DeepSpeed's plainly).

    `client_optimizer(model)`: what `initialize` is given instead of the config's optimizer;
    Adam's moments are then not compared: with a client optimizer of two param groups at stages
    1-2, DeepSpeed's `safe_get_full_optimizer_state` raised "exp_avg not found in optimizer state
    fragment" for a bias on one rank while the other waited in its all-reduce. `state_keys`:
    the optimizer state read at the end instead (a client optimizer's own keys)."""
    if state_keys is None:
        state_keys = () if client_optimizer else MOMENTS
    initialize = deepspeed().initialize if framework == "deepspeed" else zero_ext.initialize
    with zero_ext.Init(enabled=zero_ext_init and framework == "zero_ext"):
        model = Model(**(model_kwargs or {}))
    optimizer = client_optimizer(model) if client_optimizer else None
    engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=copy.deepcopy(config))
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
    dtype = _dtype(config)
    trace = Trace()
    for index, (x, y) in enumerate(data):
        if save is not None and index == save[0]:
            engine.save_checkpoint(save[1])
            trace = Trace()
        if _micro_step(engine, x, y, dtype, trace) and every_step_state:
            trace.states.append(_full_state(framework, engine, state_keys))
    _finish(trace, framework, engine, state_keys)
    if save is not None and save[0] == len(data):
        engine.save_checkpoint(save[1])
    return trace


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(ds: Trace, zx: Trace) -> None:
    """Asserts that zero_ext's run `zx` is DeepSpeed's `ds`."""
    assert len(ds.losses) == len(zx.losses)
    for step, (a, b) in enumerate(zip(ds.losses, zx.losses)):
        assert abs(a - b) <= 1e-6 * abs(a), f"micro-step {step}: loss {b} != DeepSpeed's {a}"
    assert len(zx.lrs) == len(ds.lrs) and all(
        len(a) == len(b) and all(abs(x - y) <= 1e-12 * abs(x) for x, y in zip(a, b))
        for a, b in zip(ds.lrs, zx.lrs)), f"learning rates {zx.lrs} != DeepSpeed's {ds.lrs}"
    assert zx.scales == ds.scales, f"loss scales {zx.scales} != DeepSpeed's {ds.scales}"
    assert (zx.skipped, zx.global_steps) == (ds.skipped, ds.global_steps), (
        f"skipped/global steps {zx.skipped}/{zx.global_steps} != DeepSpeed's "
        f"{ds.skipped}/{ds.global_steps}")
    assert len(ds.grad_norms) == len(zx.grad_norms)
    compared = 0
    for step, (a, b) in enumerate(zip(ds.grad_norms, zx.grad_norms)):
        if a is None:
            continue  # DeepSpeed reports none at stage 0
        if a == math.inf:  # an overflow
            assert b == math.inf, f"step {step}: gradient norm {b} where DeepSpeed reports inf"
            continue
        assert b is not None and abs(a - b) <= 1e-5 * abs(a), (
            f"step {step}: gradient norm {b} != DeepSpeed's {a}")
        compared += 1
    assert compared or all(a is None for a in ds.grad_norms), "no finite gradient norm compared"
    assert ds.buffers.keys() == zx.buffers.keys(), (ds.buffers.keys(), zx.buffers.keys())
    for name, a in ds.buffers.items():
        b = zx.buffers[name]
        assert a.dtype == b.dtype and torch.equal(a, b), (
            f"buffer {name}: {b.dtype} {b} where DeepSpeed has {a.dtype} {a}")
    assert ds.state.keys() == zx.state.keys() and ds.state_keys == zx.state_keys
    for name, tensors in ds.state.items():
        assert len(tensors) == len(zx.state[name]), (name, len(tensors), len(zx.state[name]))
        for what, a, b in zip(("weight", *ds.state_keys), tensors, zx.state[name]):
            assert a.shape == b.shape, (name, what, a.shape, b.shape)
            error = _relative(b, a)
            assert error <= STATE_RTOL, f"{name} {what}: {error:.2e} relative to DeepSpeed's"


def case(case_id: str, world_sizes: tuple[int, ...] = (2, 3)):
    def register(fn):
        for world_size in world_sizes:
            table = CASES.setdefault(world_size, {})
            assert case_id not in table, f"duplicate case id {case_id}"
            table[case_id] = fn
        return fn

    return register


def side_by_side(config: dict, micro_steps: int = 8, spikes: dict | None = None,
                 deepspeed_keys: dict | None = None,
                 **kwargs) -> tuple[Trace, Trace]:
    """Trains `config` under both; `deepspeed_keys` are added to DeepSpeed's config only (what
    zero_ext does by default and DeepSpeed when asked)."""
    data = batches(micro_steps, spikes or {})
    ds = train("deepspeed", dict(config, **(deepspeed_keys or {})), data, **kwargs)
    zx = train("zero_ext", config, data, **kwargs)
    compare(ds, zx)
    return ds, zx


def run_cases(world_size: int, only: str = "") -> dict[str, str | None]:
    """Every case of this world size on this rank: None where it passed, else the traceback."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported
    results = {}
    for case_id, fn in CASES[world_size].items():
        if only not in case_id:
            continue
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
            results[case_id] = None
        except BaseException:  # noqa: BLE001 - the case's failure is its result
            results[case_id] = traceback.format_exc()
        dist.barrier()
        if os.environ.get("ZERO_EXT_CASE_TIMES") and dist.get_rank() == 0:
            print(f"{time.perf_counter() - start:6.2f}s {case_id}", flush=True)
    return results


# -- the cases --------------------------------------------------------------------------------
ADAMW = {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.1, "torch_adam": True}}
BASE = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 1.0, "optimizer": ADAMW,
        "scheduler": {"type": "WarmupDecayLR",
                      "params": {"warmup_num_steps": 3, "total_num_steps": 20,
                                 "warmup_max_lr": 2e-2}}}
# Differs on purpose: at stages 2-3 zero_ext sums a window's reduced gradient shards in fp32
# whatever data_types.grad_accum_dtype says, which DeepSpeed does when it is "fp32" (its
# default is the model's dtype); stage 1 accumulates .grad in the model's dtype in both.
SUMS_IN_FP32 = {0: {}, 1: {}, 2: {"data_types": {"grad_accum_dtype": "fp32"}},
                3: {"data_types": {"grad_accum_dtype": "fp32"}}}
# micro-step 3's inputs x50: a gradient norm near 120, where clipping at 1.0 binds
CLIP_SPIKE = {3: 50.0}


def _fp32(stage: int):
    side_by_side(dict(BASE, zero_optimization={"stage": stage}), spikes=CLIP_SPIKE)


for _stage in range(4):
    case(f"fp32_stage{_stage}")(lambda stage=_stage: _fp32(stage))


# 16-bit cases run at 2 ranks only: at 3 the two frameworks sum three 16-bit gradients in
# another order, which rounds differently (fp32 cases run at 3 as well, for uneven chunks).
PRECISIONS = {"fp32": ({}, (2, 3)), "bf16": ({"bf16": {"enabled": True}}, (2,))}


def _accumulation(stage: int, precision: str):
    config = dict(BASE, zero_optimization={"stage": stage}, **PRECISIONS[precision][0],
                  gradient_accumulation_steps=2,
                  scheduler={"type": "WarmupCosineLR",
                             "params": {"warmup_num_steps": 2, "total_num_steps": 10}})
    side_by_side(config, micro_steps=12, spikes=CLIP_SPIKE, deepspeed_keys=SUMS_IN_FP32[stage])


for _precision, (_, _sizes) in PRECISIONS.items():
    for _stage in (1, 2, 3):
        case(f"{_precision}_accumulation_cosine_stage{_stage}", _sizes)(
            lambda stage=_stage, precision=_precision: _accumulation(stage, precision))


def _fp16_overflows(stage: int, accumulation: int):
    # fp16 inputs x1e3 overflow the scaled gradients: with DeepSpeed's default hysteresis of 2
    # the first overflow skips the step and keeps the scale, the second halves it
    config = dict(BASE, zero_optimization={"stage": stage}, gradient_accumulation_steps=accumulation,
                  fp16={"enabled": True, "initial_scale_power": 12, "loss_scale_window": 100})
    micro_steps = 8 * accumulation
    spikes = {2 * accumulation: 1e3, 5 * accumulation - 1: 1e3, 3 * accumulation: 50.0}
    ds, _ = side_by_side(config, micro_steps=micro_steps, spikes=spikes,
                         deepspeed_keys=SUMS_IN_FP32[stage] if accumulation > 1 else {})
    assert ds.skipped >= 2 and min(ds.scales) < 4096, (ds.skipped, ds.scales)  # it overflowed


for _stage in (1, 2, 3):
    case(f"fp16_overflow_hysteresis_stage{_stage}", (2,))(
        lambda stage=_stage: _fp16_overflows(stage, 1))
case("fp16_overflow_hysteresis_accumulation_stage2", (2,))(lambda: _fp16_overflows(2, 2))


def _monitor_files(stage: int):
    """tensorboard and csv_monitor (zero_ext used to ignore both sections): after fp16 steps
    with overflows (the scale halved, steps skipped) and an accumulation window, rank 0's
    files hold DeepSpeed's events: the same CSV files (name, header, steps, values) and the
    same TensorBoard scalars; the script's own event (engine.monitor.write_events) too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shared = _shared_dir()
    config = dict(BASE, zero_optimization={"stage": stage}, gradient_accumulation_steps=2,
                  fp16={"enabled": True, "initial_scale_power": 12, "hysteresis": 1})
    spikes = {4: 1e3, 9: 1e3}
    outputs = {}
    for framework in ("deepspeed", "zero_ext"):
        out = os.path.join(shared, framework)
        monitors = {"tensorboard": {"enabled": True, "output_path": out},
                    "csv_monitor": {"enabled": True, "output_path": out, "job_name": "csv"}}
        trace = train(framework, dict(config, **monitors, **SUMS_IN_FP32[stage]),
                      batches(12, spikes))
        assert trace.skipped == 2, trace.skipped  # both spikes overflowed
        initialize = deepspeed().initialize if framework == "deepspeed" else zero_ext.initialize
        engine = initialize(model=Model(), config=dict(BASE, **monitors))[0]
        assert engine.monitor.enabled
        engine.monitor.write_events([("Eval/score", 0.25, 7)])
        outputs[framework] = out
    dist.barrier()
    if dist.get_rank() != 0:
        return
    # one writer (rank 0's) per engine: the training run's and the one above
    assert len(os.listdir(os.path.join(outputs["zero_ext"], "DeepSpeedJobName"))) == 2
    ds_csv, zx_csv = (os.path.join(outputs[f], "csv") for f in ("deepspeed", "zero_ext"))
    assert sorted(os.listdir(zx_csv)) == sorted(os.listdir(ds_csv)) == [
        "Eval_score.csv", "Train_Samples_loss_scale.csv", "Train_Samples_lr.csv"]
    for name in os.listdir(ds_csv):
        with open(os.path.join(ds_csv, name)) as a, open(os.path.join(zx_csv, name)) as b:
            want, got = a.read().splitlines(), b.read().splitlines()
        assert got[0] == want[0] and len(got) == len(want), (name, got, want)
        for ours, theirs in zip(got[1:], want[1:]):
            (s1, v1), (s2, v2) = ours.split(","), theirs.split(",")
            assert int(s1) == int(s2) and math.isclose(float(v1), float(v2), rel_tol=1e-12), \
                (name, got, want)
    scalars = {}
    for framework in outputs:
        events = EventAccumulator(os.path.join(outputs[framework], "DeepSpeedJobName"))
        events.Reload()
        scalars[framework] = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                              for tag in events.Tags()["scalars"]}
    assert scalars["zero_ext"] == scalars["deepspeed"], scalars
    shutil.rmtree(shared, ignore_errors=True)


# The events are the engine's, whatever the stage: one stage (suite time).
case("monitor_files_fp16_stage1", (2,))(lambda: _monitor_files(1))


def _offload(stage: int, precision: str):
    # torch's AdamW on DeepSpeed's side too (zero_force_ds_cpu_optimizer false): DeepSpeed's own
    # CPU Adam is other arithmetic (up to 1e-3 apart from torch's AdamW in exp_avg here)
    config = dict(BASE, zero_optimization={"stage": stage, "offload_optimizer": {"device": "cpu"}},
                  zero_force_ds_cpu_optimizer=False, **PRECISIONS[precision][0])
    side_by_side(config, spikes=CLIP_SPIKE)


for _precision, (_, _sizes) in PRECISIONS.items():
    for _stage in (2, 3):
        case(f"{_precision}_offload_optimizer_stage{_stage}", _sizes)(
            lambda stage=_stage, precision=_precision: _offload(stage, precision))


def _client_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Biases without weight decay, as the HF Trainer groups them."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)


def _client_optimizer_groups(stage: int, frozen: bool, precision: str):
    config = {"train_batch_size": MICRO * dist.get_world_size() * 2,
              "gradient_accumulation_steps": 2, "zero_optimization": {"stage": stage},
              **PRECISIONS[precision][0], "gradient_clipping": 0.5,
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}}
    side_by_side(config, micro_steps=10, client_optimizer=_client_optimizer,
                 model_kwargs={"frozen_first_bias": frozen}, deepspeed_keys=SUMS_IN_FP32[stage])


for _precision, (_, _sizes) in PRECISIONS.items():
    for _stage in (1, 2, 3):
        for _frozen in (False, True):
            case(f"{_precision}_client_optimizer_groups{'_frozen_bias' * _frozen}_stage{_stage}",
                 _sizes)(lambda stage=_stage, frozen=_frozen, precision=_precision:
                         _client_optimizer_groups(stage, frozen, precision))


def _adagrad(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(model.parameters(), lr=5e-2, lr_decay=1e-2, weight_decay=1e-2,
                               initial_accumulator_value=0.1)


def _sgd_nesterov(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9, nesterov=True,
                           weight_decay=1e-2)


# name -> (the client optimizer, its per-element state compared at the end)
CLIENT_OPTIMIZERS = {"adagrad": (_adagrad, ("sum",)),
                     "sgd_nesterov": (_sgd_nesterov, ("momentum_buffer",))}


def _client_optimizer_not_adam(stage: int, name: str):
    """A torch optimizer other than Adam passed to initialize steps the fp32 master shards in
    both: Adagrad, which DeepSpeed's ZeRO takes as it is (and rebuilds on its flat partitions
    from the optimizer's defaults: one param group here), and SGD with Nesterov momentum, which
    it takes with zero_allow_untested_optimizer (zero_ext without: the key is harmless there).
    Clipping binds at the spike; the masters and the optimizer's own state are compared."""
    build, keys = CLIENT_OPTIMIZERS[name]
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    ds, _ = side_by_side(config, micro_steps=5, spikes=CLIP_SPIKE, client_optimizer=build,
                         state_keys=keys)
    assert max(ds.grad_norms) > 2 * config["gradient_clipping"], ds.grad_norms  # it clipped


for _stage in (2, 3):
    for _name in CLIENT_OPTIMIZERS:
        case(f"fp32_client_optimizer_{_name}_stage{_stage}")(
            lambda stage=_stage, name=_name: _client_optimizer_not_adam(stage, name))


def _fp16_scale_growth_step(stage: int):
    """Differs on purpose (docs/deepspeed-compat.md): on the step where the dynamic loss scale
    grows, DeepSpeed (stages 1-3) updates the scale before unscaling, so that step's gradient
    is divided by twice the scale its backward multiplied by; zero_ext unscales by the scale
    the backward used. Clipping off, so nothing cancels it."""
    config = dict(BASE, zero_optimization={"stage": stage}, gradient_clipping=0.0,
                  fp16={"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2})
    data = batches(4, {})
    ds = train("deepspeed", config, data, every_step_state=True)
    zx = train("zero_ext", config, data, every_step_state=True)
    assert ds.scales == zx.scales == [256.0, 256.0, 512.0, 512.0], (ds.scales, zx.scales)
    growth = 2
    beta1 = 0.9
    checked = 0
    for name, before in zx.states[growth - 1].items():
        checked += 1
        ds_before = ds.states[growth - 1][name][1]
        assert _relative(ds_before, before[1]) <= STATE_RTOL, (name, "before the growth step")
        m_prev, m_zx, m_ds = before[1], zx.states[growth][name][1], ds.states[growth][name][1]
        # zero_ext: m = b1 m_prev + (1 - b1) g; DeepSpeed: the same with g / 2
        predicted_ds = (m_zx + beta1 * m_prev) / 2
        assert _relative(m_ds, predicted_ds) <= 1e-5, (name, "DeepSpeed's halved gradient")
        assert _relative(m_ds, m_zx) > 1e-2, (name, "the growth step does not differ")
    assert checked == sum(p.numel() > 0 for p in Model().parameters()), checked
    # zero_ext's gradient at the growth step is the true one: its reported norm is DeepSpeed's
    # (stages 1-2 report it with the scale the backward used; stage 3 with the grown scale)
    expected = ds.grad_norms[growth] * (2 if stage == 3 else 1)
    assert abs(zx.grad_norms[growth] - expected) <= 1e-5 * expected, (
        zx.grad_norms[growth], ds.grad_norms[growth])
    for step in range(growth):
        assert abs(zx.grad_norms[step] - ds.grad_norms[step]) <= 1e-5 * ds.grad_norms[step]


for _stage in (1, 2, 3):
    case(f"fp16_scale_growth_step_differs_stage{_stage}", world_sizes=(2,))(
        lambda stage=_stage: _fp16_scale_growth_step(stage))


def _buckets(stage: int):
    # many small buckets (and at stage 3 nothing kept whole): the chunks of each bucket are
    # uneven at 3 ranks
    config = dict(BASE, zero_optimization={"stage": stage, "reduce_bucket_size": 100,
                                           "allgather_bucket_size": 100,
                                           "stage3_param_persistence_threshold": 0,
                                           "stage3_prefetch_bucket_size": 100})
    side_by_side(config, spikes=CLIP_SPIKE)


for _stage in (1, 2, 3):
    case(f"fp32_small_buckets_stage{_stage}")(lambda stage=_stage: _buckets(stage))


def _static_loss_scale(stage: int):
    config = dict(BASE, zero_optimization={"stage": stage}, fp16={"enabled": True,
                                                                  "loss_scale": 512})
    side_by_side(config, spikes=CLIP_SPIKE)


for _stage in (1, 2, 3):
    case(f"fp16_static_loss_scale_stage{_stage}", (2,))(
        lambda stage=_stage: _static_loss_scale(stage))


def _no_sync(stage: int, precision: str):
    """engine.no_sync() (stages 0-1): of each window's three backwards the first two reduce
    nothing; the window's last reduces the three together."""
    config = dict(BASE, zero_optimization={"stage": stage}, **PRECISIONS[precision][0])
    data = batches(9, CLIP_SPIKE)
    traces = []
    for framework in ("deepspeed", "zero_ext"):
        initialize = deepspeed().initialize if framework == "deepspeed" else zero_ext.initialize
        engine, _, _, _ = initialize(model=Model(), config=copy.deepcopy(config))
        trace = Trace()
        for index, (x, y) in enumerate(data):
            if index % 3 < 2:
                with engine.no_sync():
                    loss = engine(x.to(_dtype(config)), y)
                    engine.backward(loss)
                trace.losses.append(loss.item())
                continue
            _micro_step(engine, x, y, _dtype(config), trace)
        traces.append(_finish(trace, framework, engine))
    compare(*traces)


def _stage0_16bit_initial_step():
    """Differs on purpose: DeepSpeed's stage-0 16-bit optimizer (FP16_UnfusedOptimizer over a
    torch optimizer) runs one step with zero gradients when it is built
    (initialize_optimizer_states): AdamW's decay at the config's lr, before any schedule,
    shrinks its fp32 masters by (1 - lr * weight_decay), and Adam's step count starts at 1
    (bias correction one step behind from then on). zero_ext's masters are the model's
    weights and its count 0 until the first step."""
    config = dict(BASE, zero_optimization={"stage": 0}, bf16={"enabled": True})
    torch.manual_seed(0)
    ds_engine, _, _, _ = deepspeed().initialize(model=Model(), config=copy.deepcopy(config))
    torch.manual_seed(0)
    zx_engine, _, _, _ = zero_ext.initialize(model=Model(), config=copy.deepcopy(config))
    decay = 1 - ADAMW["params"]["lr"] * ADAMW["params"]["weight_decay"]
    ds_masters = [p for group in ds_engine.optimizer.fp32_groups for p in group]
    ds_weights = [p for p in ds_engine.module.parameters() if p.requires_grad]
    assert len(ds_masters) == len(ds_weights)
    for master, weight in zip(ds_masters, ds_weights):
        torch.testing.assert_close(master, weight.detach().float() * decay, rtol=1e-6,
                                   atol=0)
    assert {int(state["step"]) for state in ds_engine.optimizer.optimizer.state.values()} \
        == {1}
    for shard in zx_engine.optimizer.shards:
        assert torch.equal(shard.master, shard.weights_16bit.float())
        assert float(shard.step) == 0.0


case("bf16_stage0_deepspeeds_initial_step", (2,))(_stage0_16bit_initial_step)


# (DeepSpeed's bf16 at stage 0 keeps its Adam state on fp32 copies `_full_state` cannot reach)
for _precision, (_, _sizes) in PRECISIONS.items():
    for _stage in (0, 1) if _precision == "fp32" else (1,):
        case(f"{_precision}_no_sync_stage{_stage}", _sizes)(
            lambda stage=_stage, precision=_precision: _no_sync(stage, precision))


def _shared_dir() -> str:
    """A new directory, the same on every rank (rank 0 makes it)."""
    made = [tempfile.mkdtemp(prefix="zero-ext-ds-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(made, src=0)
    return made[0]


def _resume(stage: int, precision: str, **kwargs):
    """A DeepSpeed run saved after 4 steps and resumed by zero_ext (engine.load_checkpoint on
    DeepSpeed's directory) trains the next 4 as DeepSpeed goes on, and as DeepSpeed resuming
    the same checkpoint does: losses, learning rates, loss scales, counters, norms, and the
    final masters and moments."""
    config = dict(BASE, zero_optimization={"stage": stage}, **PRECISIONS[precision][0])
    config.update(kwargs.pop("config", {}))
    config = {k: v for k, v in config.items() if v is not None}
    spikes = kwargs.pop("spikes", CLIP_SPIKE)
    data = batches(8, spikes)
    directory = _shared_dir()
    try:
        ds = train("deepspeed", config, data, save=(4, directory), **kwargs)
        ds_resumed = train("deepspeed", config, data[4:], load_dir=directory, **kwargs)
        zx = train("zero_ext", config, data[4:], load_dir=directory, **kwargs)
        compare(ds, zx)
        compare(ds_resumed, zx)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)


for _precision, (_, _sizes) in PRECISIONS.items():
    for _stage in (1, 2, 3):
        case(f"{_precision}_resumes_deepspeed_checkpoint_stage{_stage}", _sizes)(
            lambda stage=_stage, precision=_precision: _resume(stage, precision))
for _stage in (1, 2, 3):
    # DeepSpeed records frozen parameters' shapes from stage 2 on; at 1 only the module has them
    case(f"bf16_resumes_deepspeed_checkpoint_frozen_bias_stage{_stage}", (2,))(
        lambda stage=_stage: _resume(stage, "bf16", model_kwargs={"frozen_first_bias": True}))
    # two param groups; at stage 3 split into sub-groups of 100 elements, each its own flat
    case(f"fp32_resumes_deepspeed_checkpoint_two_groups_stage{_stage}")(
        lambda stage=_stage: _resume(stage, "fp32", client_optimizer=_client_optimizer,
                                     config={"optimizer": None, "zero_optimization": {
                                         "stage": stage, "sub_group_size": 100}}))
for _stage in (1, 2, 3):
    # the loss scaler's state: an overflow before the save leaves one hysteresis; the overflow
    # after it halves the scale only if that was restored
    case(f"fp16_resumes_deepspeed_checkpoint_loss_scaler_stage{_stage}", (2,))(
        lambda stage=_stage: _resume(stage, "fp32", config={"fp16": {
            "enabled": True, "initial_scale_power": 12, "loss_scale_window": 100}},
            spikes={1: 1e3, 6: 1e3}))


def _resume_loss_scale_sequence(stage: int):
    """The loss scales and skipped steps of 11 steps after a DeepSpeed fp16 checkpoint, resumed
    by zero_ext, by DeepSpeed and as DeepSpeed went on: saved 3 clean steps after an overflow
    (window 3: the scale grows on the first step after the save only if those clean steps
    were restored; the growth refills the hysteresis, so of the overflows at steps 7, 9 and 10
    the first only skips), growing again after 3 clean steps. Only the scales and counters: on
    a growth step DeepSpeed halves the gradient (docs/deepspeed-compat.md,
    `fp16_scale_growth_step_differs`)."""
    config = dict(BASE, zero_optimization={"stage": stage},
                  fp16={"enabled": True, "initial_scale_power": 12, "loss_scale_window": 3})
    data = batches(16, {1: 1e3, 7: 1e3, 9: 1e3, 10: 1e3})
    directory = _shared_dir()
    try:
        ds = train("deepspeed", config, data, save=(5, directory))
        ds_resumed = train("deepspeed", config, data[5:], load_dir=directory)
        zx = train("zero_ext", config, data[5:], load_dir=directory)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)
    assert zx.scales == ds_resumed.scales == ds.scales, (zx.scales, ds_resumed.scales, ds.scales)
    assert ds.scales == [8192.0] * 4 + [4096.0] + [2048.0] * 4 + [4096.0] * 2, ds.scales
    assert (zx.skipped, zx.global_steps) == (ds_resumed.skipped, ds_resumed.global_steps) == (
        ds.skipped, ds.global_steps), (zx.skipped, ds_resumed.skipped, ds.skipped)


for _stage in (1, 2, 3):
    case(f"fp16_resumes_deepspeed_loss_scale_sequence_stage{_stage}", (2,))(
        lambda stage=_stage: _resume_loss_scale_sequence(stage))


def _fp16_resumes_unscaled_checkpoint(precision: str):
    """A bf16 or fp32 DeepSpeed checkpoint holds a static LossScaler of 1.0, no fp16 state:
    zero_ext's fp16 engine keeps the scaler its config makes (it started at 1.0, growing once
    per loss_scale_window clean steps), as when it loads a zero_ext checkpoint without fp16.
    DeepSpeed would train on at a static 1.0 (docs/deepspeed-compat.md)."""
    directory = _shared_dir()
    try:
        train("deepspeed", dict(BASE, zero_optimization={"stage": 2}, **PRECISIONS[precision][0]),
              batches(3, {}), save=(3, directory))
        config = dict(BASE, zero_optimization={"stage": 2},
                      fp16={"enabled": True, "initial_scale_power": 12})
        engine, _, _, _ = zero_ext.initialize(model=Model(), config=copy.deepcopy(config))
        fresh = dict(engine.loss_scaler.state_dict())
        engine.load_checkpoint(directory)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)
    assert engine.global_steps == 3 and engine.loss_scaler.state_dict() == fresh == {
        "scale": 4096.0, "clean_steps": 0, "hysteresis_left": 2}, engine.loss_scaler.state_dict()


for _precision in PRECISIONS:
    case(f"fp16_resumes_{_precision}_deepspeed_checkpoint_with_its_own_loss_scaler", (2,))(
        lambda precision=_precision: _fp16_resumes_unscaled_checkpoint(precision))


def _data_position_and_deepspeed_checkpoint():
    """DeepSpeed saves no data position (its data_sampler entry is curriculum learning's), so
    an engine whose ElasticSampler (initialize(training_data=...)) is registered refuses the
    load, unchanged, instead of going on from its own step count (3 global batches into its
    order, silently). Built after the load, the sampler starts at the first batch, as
    DeepSpeed's loader does after a resume."""
    from zero_ext.checkpoint.format import CheckpointError

    config = dict(BASE, zero_optimization={"stage": 2})
    data = [(torch.randn(IN), torch.randn(OUT)) for _ in range(8 * MICRO * dist.get_world_size())]
    directory = _shared_dir()
    try:
        train("deepspeed", config, batches(3, {}), save=(3, directory))
        engine, _, loader, _ = zero_ext.initialize(model=Model(), config=copy.deepcopy(config),
                                                   training_data=data)
        try:
            engine.load_checkpoint(directory)
        except CheckpointError as error:
            refused = str(error)
        else:
            refused = None
        unchanged = (engine.global_steps, loader.batch_sampler.position())
        engine, _, _, _ = zero_ext.initialize(model=Model(), config=copy.deepcopy(config))
        engine.load_checkpoint(directory)
        sampler = zero_ext.ElasticSampler(data, engine)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)
    assert refused is not None and "'data_position'" in refused and \
        "after load_checkpoint" in refused, refused
    assert unchanged == (0, (0, 0)), unchanged
    assert (engine.global_steps, sampler.position()) == (3, (0, 0))


case("deepspeed_checkpoint_refused_by_a_registered_data_position", (2,))(
    _data_position_and_deepspeed_checkpoint)


def _resume_weights_only():
    """load_optimizer_states=False on a DeepSpeed fp16 checkpoint: the weights are DeepSpeed's
    fp32 masters; the moments, step counts and loss scaler stay as a fresh engine's (DeepSpeed
    skips its optimizer files then, scaler included)."""
    config = dict(BASE, zero_optimization={"stage": 2},
                  fp16={"enabled": True, "initial_scale_power": 12, "loss_scale_window": 100})
    data = batches(4, {1: 1e3})  # an overflow: DeepSpeed's scaler has one hysteresis left
    directory = _shared_dir()
    try:
        ds = train("deepspeed", config, data, save=(4, directory))  # saved after the 4th
        engine, _, _, _ = zero_ext.initialize(model=Model(), config=copy.deepcopy(config))
        fresh_scaler = dict(engine.loss_scaler.state_dict())
        engine.load_checkpoint(directory, load_optimizer_states=False)
        state = _full_state("zero_ext", engine)
        steps = {float(shard.step) for shard in engine.optimizer.shards}
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)
    assert ds.skipped == 1 and engine.loss_scaler.state_dict() == fresh_scaler, (
        ds.skipped, engine.loss_scaler.state_dict(), fresh_scaler)
    assert steps == {0.0} and engine.global_steps == 4, (steps, engine.global_steps)
    for name, (master, exp_avg, exp_avg_sq) in state.items():
        assert _relative(master, ds.state[name][0]) <= STATE_RTOL, name
        assert exp_avg.abs().max() == 0 and exp_avg_sq.abs().max() == 0, name


case("fp16_resumes_deepspeed_checkpoint_weights_only_stage2", (2,))(_resume_weights_only)


def _resume_clears_error_feedback():
    """A DeepSpeed checkpoint loaded into an engine that has trained with error feedback: the
    residuals it kept (the undelivered part of gradients of its own, earlier run) are dropped,
    as a zero_ext checkpoint saved without feedback drops them; it trains on as a fresh engine
    loading the same checkpoint does, exactly."""
    config = dict(BASE, zero_optimization={"stage": 2})
    compressed = dict(config, zero_ext={"compression": {"gradients": {
        "method": "int4", "error_feedback": True, "block_size": 8}}})
    data = batches(6, {})
    directory = _shared_dir()
    try:
        train("deepspeed", config, data[:2], save=(2, directory))
        fresh = train("zero_ext", compressed, data[2:], load_dir=directory)
        engine, _, _, _ = zero_ext.initialize(model=Model(), config=copy.deepcopy(compressed))
        for x, y in data[:2]:
            _micro_step(engine, x, y, torch.float32, Trace())
        engine.load_checkpoint(directory)
        trace = Trace()
        for x, y in data[2:]:
            _micro_step(engine, x, y, torch.float32, trace)
        _finish(trace, "zero_ext", engine)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)
    assert trace.losses == fresh.losses, (trace.losses, fresh.losses)
    for name, tensors in fresh.state.items():
        for what, a, b in zip(("weight", *MOMENTS), tensors, trace.state[name]):
            assert torch.equal(a, b), (name, what, _relative(b, a))


case("int4_error_feedback_cleared_by_a_deepspeed_checkpoint_stage2", (2,))(
    _resume_clears_error_feedback)


def flip_record_byte(path: str) -> None:
    """Inverts one byte in the middle of the largest tensor storage record of a torch.save zip
    file, as bit rot or a bad copy would."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename),
                     key=lambda r: r.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)  # the local header: name and extra field lengths
        name, extra = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(record.header_offset + 30 + name + extra + record.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


def _corrupted_checkpoint():
    """A byte of rank 1's optimizer file changed: DeepSpeed writes no checksums, but torch's zip
    records carry CRC-32s. Refused on every rank before anything is written (the engine as it
    was), instead of resuming from wrong moments."""
    from zero_ext.checkpoint.format import CheckpointError

    config = dict(BASE, zero_optimization={"stage": 2})
    directory = _shared_dir()
    try:
        train("deepspeed", config, batches(4, {}), save=(4, directory))
        engine, _, _, _ = zero_ext.initialize(model=Model(), config=copy.deepcopy(config))
        before = _full_state("zero_ext", engine)
        if dist.get_rank() == 0:
            flip_record_byte(os.path.join(directory, "global_step4",
                                          "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
        dist.barrier()
        try:
            engine.load_checkpoint(directory)
            outcome = "loaded"
        except CheckpointError as error:
            outcome = str(error)
        after = _full_state("zero_ext", engine)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is corrupt" in outcome, outcome
    # Found by the one rank that checks that file (each file's CRC-32s are read once, not by
    # every rank), refused on every rank.
    assert "fails its CRC-32 check" in outcome and "failed on 1 of 2 ranks" in outcome, outcome
    for name, tensors in before.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[name])), name
    assert engine.global_steps == 0


case("fp32_refuses_a_corrupted_deepspeed_checkpoint_stage2", (2,))(_corrupted_checkpoint)


def _buffers(stage: int, precision: str, data_types: dict, scale: str, offset: str,
             zero_ext_init: bool = False):
    """Under fp16/bf16 the parameters are cast, the buffers kept as they came or cast to
    data_types.buffer_dtype, and the ones a model lists for fp32 (or keep_in_fp32_modules
    names) held in fp32 (`offset`, made in bf16, brought up): the two buffers' dtypes end
    `scale` and `offset`, in both frameworks. zero_ext.Init builds buffers as the model's code
    makes them, then the same rules apply."""
    config = dict(BASE, zero_optimization={"stage": stage}, data_types=data_types,
                  **{precision: {"enabled": True, "initial_scale_power": 12}
                     if precision == "fp16" else {"enabled": True}})
    _, zx = side_by_side(config, model_kwargs={"buffers": True}, zero_ext_init=zero_ext_init)
    assert (zx.buffers["scale"].dtype, zx.buffers["offset"].dtype) == (
        getattr(torch, scale), getattr(torch, offset)), zx.buffers


for _stage in (1, 3):
    for _precision in ("bf16", "fp16"):
        case(f"{_precision}_buffers_kept_stage{_stage}", (2,))(
            lambda stage=_stage, precision=_precision:
            _buffers(stage, precision, {}, "float32", "float32"))
case("bf16_buffers_kept_zero_ext_init_stage3", (2,))(
    lambda: _buffers(3, "bf16", {}, "float32", "float32", zero_ext_init=True))
case("bf16_buffer_dtype_stage2", (2,))(
    lambda: _buffers(2, "bf16", {"buffer_dtype": "bf16", "param_dtype": "bf16"},
                     "bfloat16", "float32"))
case("fp16_buffer_dtype_keep_in_fp32_modules_stage2", (2,))(
    lambda: _buffers(2, "fp16", {"buffer_dtype": "fp16", "keep_in_fp32_modules": ["sc*le"]},
                     "float32", "float16"))


def _set_train_batch_size(stage: int, precision: str):
    """engine.set_train_batch_size between steps, as a batch-size ramp-up does: 4 steps of one
    micro-batch per rank, then 2 of two, then 3 of one (DeepSpeed's engine alike). The changes
    come where DeepSpeed's micro-step count is a multiple of the new accumulation: elsewhere
    its next window is shorter (docs/deepspeed-compat.md), zero_ext's whole."""
    config = dict(BASE, zero_optimization={"stage": stage}, **PRECISIONS[precision][0])
    world = dist.get_world_size()
    data = batches(11, CLIP_SPIKE)
    traces, samples = [], []
    for framework in ("deepspeed", "zero_ext"):
        initialize = deepspeed().initialize if framework == "deepspeed" else zero_ext.initialize
        engine, _, _, _ = initialize(model=Model(),
                                     config=copy.deepcopy(dict(config, **SUMS_IN_FP32[stage]) if
                                                          framework == "deepspeed" else config))
        trace = Trace()
        for index, (x, y) in enumerate(data):
            if index in (4, 8):
                engine.set_train_batch_size(MICRO * world * (2 if index == 4 else 1))
            _micro_step(engine, x, y, _dtype(config), trace)
        traces.append(_finish(trace, framework, engine))
        samples.append((engine.global_samples, engine.gradient_accumulation_steps(),
                        engine.train_batch_size()))
    compare(*traces)
    assert traces[1].global_steps == 4 + 2 + 3, traces[1].global_steps
    assert samples[0] == samples[1], samples


for _precision, (_, _sizes) in PRECISIONS.items():
    for _stage in (1, 2, 3):
        case(f"{_precision}_set_train_batch_size_stage{_stage}", _sizes)(
            lambda stage=_stage, precision=_precision: _set_train_batch_size(stage, precision))


def _set_train_micro_batch_size(stage: int, precision: str):
    """engine.set_train_micro_batch_size between steps: 4 steps of micro-batches of MICRO, 3 of
    2 x MICRO (two of the same data joined), then 2 of MICRO, two micro-batches per step
    throughout (DeepSpeed's engine alike); then both engines' checkpoints resumed by zero_ext
    keep global_samples."""
    config = dict(BASE, gradient_accumulation_steps=2, zero_optimization={"stage": stage},
                  **PRECISIONS[precision][0])
    data = batches(26, CLIP_SPIKE)
    joined = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
              for a, b in zip(data[8:20:2], data[9:20:2])]
    data = data[:8] + joined + data[20:24]
    traces, sizes, engines = [], [], {}
    for framework in ("deepspeed", "zero_ext"):
        initialize = deepspeed().initialize if framework == "deepspeed" else zero_ext.initialize
        engine, _, _, _ = initialize(model=Model(),
                                     config=copy.deepcopy(dict(config, **SUMS_IN_FP32[stage]) if
                                                          framework == "deepspeed" else config))
        engines[framework] = engine
        trace = Trace()
        for index, (x, y) in enumerate(data):
            if index in (8, 14):
                engine.set_train_micro_batch_size(MICRO * (2 if index == 8 else 1))
            _micro_step(engine, x, y, _dtype(config), trace)
        traces.append(_finish(trace, framework, engine))
        sizes.append((engine.train_micro_batch_size_per_gpu(),
                      engine.gradient_accumulation_steps(), engine.train_batch_size(),
                      engine.global_samples))
    compare(*traces)
    world = dist.get_world_size()
    assert traces[1].global_steps == 4 + 3 + 2, traces[1].global_steps
    # 4 steps of 2 x MICRO x world samples, 3 of 4 x MICRO x world, 2 of 2 x MICRO x world
    samples = (4 * 2 + 3 * 4 + 2 * 2) * MICRO * world
    assert sizes[0] == sizes[1] == (MICRO, 2, MICRO * 2 * world, samples), sizes
    # Resumed from either framework's checkpoint, zero_ext counts on from the saved count
    # (not 9 steps x the config's batch).
    for framework, saved in engines.items():
        directory = _shared_dir()
        try:
            saved.save_checkpoint(directory)
            resumed, _, _, _ = zero_ext.initialize(model=Model(), config=copy.deepcopy(config))
            resumed.load_checkpoint(directory)
            assert (resumed.global_steps, resumed.global_samples) == (9, samples), (
                framework, resumed.global_steps, resumed.global_samples)
        finally:
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(directory, ignore_errors=True)


for _stage in (1, 2, 3):
    case(f"fp32_set_train_micro_batch_size_stage{_stage}", PRECISIONS["fp32"][1])(
        lambda stage=_stage: _set_train_micro_batch_size(stage, "fp32"))


def _set_train_batch_size_refusals():
    """Refused as DeepSpeed refuses (a batch that is no multiple of micro x world size), and
    where zero_ext cannot keep its word: inside a window, and under the ElasticSampler that
    initialize(training_data=...) builds for the old batch sizes (set_train_micro_batch_size
    too, and a micro batch that is no positive int, which DeepSpeed takes as it comes)."""
    world = dist.get_world_size()
    config = dict(BASE, zero_optimization={"stage": 2})
    for framework in ("deepspeed", "zero_ext"):
        initialize = deepspeed().initialize if framework == "deepspeed" else zero_ext.initialize
        engine, _, _, _ = initialize(model=Model(), config=copy.deepcopy(config))
        try:
            engine.set_train_batch_size(MICRO * world + 1)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{framework} took a batch of {MICRO * world + 1}")
    x, y = batches(1, {})[0]
    engine.set_train_batch_size(MICRO * world * 2)
    engine.backward(engine(x, y))  # the first micro-batch of a window of two
    engine.step()
    try:
        engine.set_train_batch_size(MICRO * world)
    except RuntimeError as error:
        assert "inside an accumulation window" in str(error), error
    else:
        raise AssertionError("set_train_batch_size inside a window was taken")
    engine.backward(engine(x, y))
    engine.step()
    assert engine.global_steps == 1 and engine.gradient_accumulation_steps() == 2
    data = [(torch.randn(IN), torch.randn(OUT)) for _ in range(8 * MICRO * world)]
    engine, _, _, _ = zero_ext.initialize(model=Model(), config=copy.deepcopy(config),
                                          training_data=data)
    for resize in (lambda: engine.set_train_batch_size(MICRO * world * 2),
                   lambda: engine.set_train_micro_batch_size(MICRO * 2)):
        try:
            resize()
        except RuntimeError as error:
            assert "ElasticSampler" in str(error), error
        else:
            raise AssertionError("a batch resize under an ElasticSampler was taken")
    for bad in (0, True, 2.0):
        try:
            engine.set_train_micro_batch_size(bad)
        except ValueError as error:
            assert "positive int" in str(error), error
        else:
            raise AssertionError(f"set_train_micro_batch_size({bad!r}) was taken")


case("set_train_batch_size_refusals", (2,))(_set_train_batch_size_refusals)
