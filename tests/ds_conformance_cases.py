"""DeepSpeed's own unit tests, ported as a black-box conformance suite: shared models, data,
the single-process reference, and the registry every ported case joins.

DeepSpeed's tests (tests/unit/runtime/zero/, runtime/half_precision/, checkpoint/,
test_ds_initialize.py, test_ds_config_dict.py in deepspeedai/DeepSpeed) assert on DeepSpeed's
internals (optimizer classes, partition tensors, loss-scaler fields). The ports keep each case's
intent and check it from the outside: parameters against plain PyTorch trained in one process
on the whole batch, checkpoint round trips that must continue training bit-for-bit, and the
numbers DeepSpeed's tests write down (loss-scale sequences, activations of known weights).

Each case is a function of one scratch directory, run on every rank of one process group per
world size (ds_conformance_cases_train.py and ds_conformance_cases_state.py register them;
`run_cases` runs them all); it raises AssertionError (or whatever zero_ext raised) to fail.
Cases issue their collectives first and assert afterwards, so a failing case leaves the ranks
in step for the next one.
"""

from __future__ import annotations

import functools
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import zero_ext

HIDDEN = 10
# DeepSpeed's defaults that the references assume (deepspeed/runtime/constants.py and
# ops/adam/fused_adam.py, DeepSpeed 0.19): gradient_clipping 1.0; "Adam"/"AdamW" build FusedAdam
# in adam_w_mode (decoupled weight decay) with lr 1e-3, betas (0.9, 0.999), eps 1e-8 and
# weight_decay 0.
DS_GRADIENT_CLIPPING = 1.0
DS_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

# world size -> {test id: case(scratch_dir)}; the test id names DeepSpeed's file and test.
CASES: dict[int, dict[str, Callable[[str], None]]] = {}


def case(test_id: str, world_size: int = 2, **bound):
    """Registers a case under DeepSpeed's test id; `bound` keyword arguments are fixed (one
    registration per parametrization)."""

    def register(fn):
        table = CASES.setdefault(world_size, {})
        assert test_id not in table, f"duplicate case id {test_id}"
        table[test_id] = functools.partial(fn, **bound) if bound else fn
        return fn

    return register


def load_all_cases() -> None:
    """Imports the case modules, which register their cases (world size 0: no process group,
    run in the calling process)."""
    import ds_conformance_cases_api  # noqa: F401
    import ds_conformance_cases_context  # noqa: F401
    import ds_conformance_cases_fragment  # noqa: F401
    import ds_conformance_cases_no_sync  # noqa: F401
    import ds_conformance_cases_offload_states  # noqa: F401
    import ds_conformance_cases_precision  # noqa: F401
    import ds_conformance_cases_single  # noqa: F401
    import ds_conformance_cases_state  # noqa: F401
    import ds_conformance_cases_train  # noqa: F401
    import ds_conformance_cases_zero_to_fp32  # noqa: F401


def run_cases(world_size: int, workdir: str, only: str = "") -> dict[str, str | None]:
    """Every case of this world size (whose id holds `only`) on this rank: None where it
    passed, else the traceback."""
    load_all_cases()
    torch.manual_seed(0)
    results = {}
    for index, (test_id, fn) in enumerate(CASES[world_size].items()):
        if only not in test_id:
            continue
        scratch = os.path.join(workdir, f"ws{world_size}-{index}")
        os.makedirs(scratch, exist_ok=True)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(scratch)
            results[test_id] = None
        except BaseException:  # noqa: BLE001 - the case's failure is its result
            results[test_id] = traceback.format_exc()
        try:
            dist.barrier()
        except RuntimeError:
            # A rank left the case while another was inside a collective: the group's pairs
            # are gone, so the cases not run yet fail with this case named.
            broken = f"not run: the process group broke during {test_id}"
            for rest in CASES[world_size]:
                results.setdefault(rest, broken) if only in rest else None
            return results
        if os.environ.get("ZERO_EXT_CASE_TIMES") and dist.get_rank() == 0:
            print(f"{time.perf_counter() - start:6.2f}s {test_id}", flush=True)
    return results


def collectively(fn) -> None:
    """Runs `fn` (rank-dependent code, such as one rank writing a gathered weight) and fails on
    every rank if it failed on any, so that no rank walks into a collective the others left."""
    error = None
    try:
        fn()
    except Exception as caught:  # noqa: BLE001 - re-raised below, on every rank
        error = caught
    failed = [None] * dist.get_world_size()
    dist.all_gather_object(failed, None if error is None else repr(error))
    if error is not None:
        raise error
    if any(failed):
        raise AssertionError(f"failed on another rank: {failed}")


# -- models -------------------------------------------------------------------------------
class SimpleModel(nn.Module):
    """DeepSpeed's tests' SimpleModel: linear layers then cross-entropy over HIDDEN classes;
    empty_grad adds a layer that forward never uses (its parameters get no gradient)."""

    def __init__(self, hidden: int = HIDDEN, nlayers: int = 1, empty_grad: bool = False):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(nlayers))
        if empty_grad:
            self.unused = nn.Linear(hidden, hidden)
        self.cross_entropy = nn.CrossEntropyLoss()

    def forward(self, x, y):
        for linear in self.linears:
            x = linear(x)
        return self.cross_entropy(x.float(), y)


class LoudModel(SimpleModel):
    """SimpleModel on inputs scaled by 20: gradient norms well above 1, so a clipping threshold
    of 1.0 (DeepSpeed's default) acts on every step."""

    def forward(self, x, y):
        return super().forward(x * 20, y)


def batch(step: int, micro: int, rank: int, size: int = 2, dtype=torch.float32,
          hidden: int = HIDDEN):
    """Rank `rank`'s micro-batch `micro` of optimizer step `step`: the same on every process."""
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    x = torch.randn(size, hidden, generator=gen).to(dtype)
    y = torch.randint(0, hidden, (size,), generator=gen)
    return x, y


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def loss_of(output):
    """The loss of a model's output: itself, element 1 of a tuple/list, or output["loss"]."""
    if isinstance(output, dict):
        return output["loss"]
    if isinstance(output, (tuple, list)):
        return output[1]
    return output


# -- training -------------------------------------------------------------------------------
def train_engine(engine, steps: int, *, gas: int = 1, micro: int = 2, dtype=torch.float32,
                 start: int = 0, loss_fn=loss_of, toggle=None, hidden: int = HIDDEN) -> list:
    """`steps` optimizer steps of DeepSpeed's training loop (forward, backward, step per
    micro-batch) on this rank's batches; returns the losses."""
    losses = []
    for step in range(start, start + steps):
        for m in range(gas):
            if toggle is not None:
                toggle(engine.module, step * gas + m)
            x, y = batch(step, m, rank(), micro, dtype, hidden)
            loss = loss_fn(engine(x, y))
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float().item())
    return losses


def train_reference(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, *,
                    gas: int = 1, micro: int = 2, clip: float = 0.0, start: int = 0,
                    loss_fn=loss_of, toggle=None, scheduler=None, hidden: int = HIDDEN,
                    world_size: int | None = None) -> list[float]:
    """The single-process reference of train_engine: each micro-step's loss is the mean of every
    rank's micro-batch loss (what averaging gradients over ranks computes), divided by the
    accumulation steps. As in DeepSpeed's ZeRO optimizers, a parameter of the optimizer that
    got no gradient in a window steps with a zero gradient. Returns each step's gradient norm
    before clipping."""
    world_size = world_size or world()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norms = []
    for step in range(start, start + steps):
        optimizer.zero_grad(set_to_none=True)
        for m in range(gas):
            if toggle is not None:
                toggle(model, step * gas + m)
            losses = [loss_fn(model(*batch(step, m, r, micro, torch.float32, hidden)))
                      for r in range(world_size)]
            (sum(losses) / (world_size * gas)).backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norms.append(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
                     .item())
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return norms


def build_engine(config: dict, seed: int | None, factory: Callable[[], nn.Module] = SimpleModel,
                 init: bool | None = None):
    """The model built from `seed` (None: the RNG as it is) under zero_ext.Init when `init`
    (by default at stage 3), initialized with DeepSpeed's arguments; the engine."""
    if seed is not None:
        torch.manual_seed(seed)
    if init is None:
        init = config.get("zero_optimization", {}).get("stage") == 3
    if init:
        with zero_ext.Init(config=config):
            model = factory()
    else:
        model = factory()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
    return engine


def full_params(engine) -> dict[str, torch.Tensor]:
    """Collective: the engine's whole parameters, fp32, on the CPU."""
    state = engine.full_state_dict()
    return {n: state[n].float().clone() for n, _ in engine.module.named_parameters()}


def reference_copy(model_factory: Callable[[], nn.Module], state: dict) -> nn.Module:
    """A plain fp32 model of the same architecture starting from `state`."""
    model = model_factory().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
    return model


def ds_adam(params, config: dict):
    """The torch optimizer DeepSpeed builds for an "Adam"/"AdamW" config section: AdamW (adam_w
    mode, DeepSpeed's default) with FusedAdam's defaults for what the section leaves out."""
    section = config["optimizer"]
    hp = {**DS_ADAM, **section.get("params", {})}
    hp["betas"] = tuple(hp["betas"])
    if section["type"].lower() == "adam" and not hp.pop("adam_w_mode", True):
        return torch.optim.Adam(params, **hp)
    hp.pop("adam_w_mode", None)
    return torch.optim.AdamW(params, **hp)


def adam_config(stage: int = 0, lr: float = 1e-3, **extra) -> dict:
    """DeepSpeed's usual test config at 2 samples per rank, with gradient_clipping and
    weight_decay given explicitly (the cases that test DeepSpeed's defaults leave them out)."""
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
            "optimizer": {"type": "Adam", "params": {"lr": lr, "weight_decay": 0.0}},
            "zero_optimization": {"stage": stage}, **extra}


def ds_clip(config: dict) -> float:
    return config.get("gradient_clipping", DS_GRADIENT_CLIPPING)


def assert_params_close(got: dict, ref: dict, label: str = "", dtype=torch.float32,
                        initial: dict | None = None) -> None:
    """fp32: element-wise. 16-bit: the training update as a whole (Adam turns rounding noise in
    tiny gradients into lr-sized steps of either sign, so single elements may differ): its
    error must be a small fraction of its size."""
    assert set(got) == set(ref), f"{label}: parameter names {sorted(got)} != {sorted(ref)}"
    if dtype == torch.float32 or initial is None:
        for name, r in ref.items():
            tol = 1e-5 * max(1.0, r.abs().max().item())
            assert_close(got[name], r, rtol=1e-5, atol=tol, msg=f"{label} {name}")
        return
    update = torch.cat([(got[n] - initial[n]).flatten() for n in ref])
    ref_update = torch.cat([(ref[n] - initial[n]).flatten() for n in ref])
    error = ((update - ref_update).norm() / ref_update.norm()).item()
    assert error < 0.05, f"{label}: relative error of the 16-bit update {error:.3g}"


def named(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def parity(model_factory: Callable[[], nn.Module], config: dict, *, steps: int = 3,
           init=False, model_parameters=None, optimizer=None, ref_optimizer=None,
           ref_groups=None, toggle=None, loss_fn=loss_of, dtype=None, label: str = "",
           prepare=None, hidden: int = HIDDEN, compare_as=None) -> dict:
    """Builds the model (under zero_ext.Init when `init`), initializes the engine with DeepSpeed's
    arguments, trains `steps` steps and compares the parameters with the single-process
    reference started from the engine's initial values. `model_parameters`/`optimizer`/
    `ref_groups` may be callables of the model; `compare_as` is the precision to compare at
    (default: the model's). Returns what the caller may check further."""
    gas = config.get("gradient_accumulation_steps", 1)
    micro = config.get("train_micro_batch_size_per_gpu")
    if micro is None:
        micro = config["train_batch_size"] // (gas * world())
    if dtype is None:
        dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else (
            torch.float16 if config.get("fp16", {}).get("enabled") else torch.float32)
    torch.manual_seed(1234)
    if init:
        with zero_ext.Init(config=config):
            model = model_factory()
    else:
        model = model_factory()
    if prepare is not None:
        prepare(model)
    engine, engine_optimizer, _, scheduler = zero_ext.initialize(
        model=model, config=config, model_parameters=of_model(model_parameters, model),
        optimizer=of_model(optimizer, model))
    initial = full_params(engine)
    train_engine(engine, steps, gas=gas, micro=micro, dtype=dtype, loss_fn=loss_fn,
                 toggle=toggle, hidden=hidden)
    got = full_params(engine)
    # The reference does not skip: an fp16 overflow here is a failure of the case's setup.
    assert engine.skipped_steps == 0, f"{label}: {engine.skipped_steps} steps skipped"

    reference = reference_copy(model_factory, initial)
    groups = ref_groups(reference) if ref_groups is not None else [
        p for p in reference.parameters() if p.requires_grad]
    ref_opt = (ref_optimizer or (lambda ps: ds_adam(ps, config)))(groups)
    ref_norms = train_reference(reference, ref_opt, steps, gas=gas, micro=micro,
                                clip=ds_clip(config), loss_fn=loss_fn, toggle=toggle,
                                hidden=hidden)
    assert_params_close(got, named(reference), label, compare_as or dtype, initial)
    return {"engine": engine, "optimizer": engine_optimizer, "scheduler": scheduler,
            "initial": initial, "params": got, "reference": reference, "ref_norms": ref_norms}


def model_fn(fn):
    """Marks a callable of the model, which parity() calls with the model it builds (as
    opposed to an optimizer factory, which zero_ext.initialize must call itself)."""
    fn._model_fn = True
    return fn


def of_model(arg, model):
    return arg(model) if getattr(arg, "_model_fn", False) else arg


def expect_zero_ext_error(fn, *words) -> str:
    """Runs fn, which must raise an error whose message starts with "zero_ext" and holds every
    word; returns the message."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the test is about which error
        text = str(error)
        assert text.startswith(("zero_ext", "[")), \
            f"error does not say it comes from zero_ext: {text!r}"
        for word in words:
            assert word in text, f"{word!r} not in the error: {text!r}"
        return text
    raise AssertionError("no error was raised")
