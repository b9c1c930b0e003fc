"""What each rank runs in tests/test_compile.py: engine.compile() against the same training
eager (engine_cases' TinyNet: a tied head, a frozen and an unused parameter)."""

from __future__ import annotations

import gc
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import zero_ext
from zero_ext import checkpointing, comm

from engine_cases import (
    VOCAB,
    build_model,
    config,
    global_batch,
    host_params,
    run,
    train_engine,
    train_reference,
)

STEPS, ACCUMULATION = 3, 2
# (stage, dtype, backend): aot_eager traces the forward and its backward graph as inductor
# does but runs torch's kernels (fast to compile); one inductor case per precision.
CASES = [(0, "fp32", "aot_eager"), (1, "fp32", "aot_eager"), (2, "fp32", "aot_eager"),
         (3, "fp32", "aot_eager"), (3, "fp32", "inductor"), (2, "bf16", "inductor")]


def _calls() -> dict:
    """The engine.compile calls DeepSpeed scripts make, and what each does here."""
    out = {}
    model = build_model()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1,
                                                                      comm.world_size()))
    out["before"] = engine.is_compiled
    for name, kwargs in (("schedule", {"schedule": [(0, [])]}),
                         ("compiled_autograd", {"compiled_autograd_enabled": True})):
        try:
            engine.compile(backend="aot_eager", **kwargs)
            out[name] = None
        except ValueError as error:
            out[name] = str(error)
    out["after_refusals"] = engine.is_compiled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.compile(backend="aot_eager", compile_kwargs={"backend": "inductor"})
    out["warnings"] = [str(w.message) for w in caught]
    out["after"] = engine.is_compiled
    out["module_is_model"] = engine.module is model
    out["compiled_call"] = getattr(model, "_compiled_call_impl", None) is not None
    engine.compile(backend="inductor")  # a second call does nothing
    return out


class Checkpointed(nn.Module):
    """Three residual MLP blocks, each a zero_ext.checkpointing.checkpoint segment."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(),
                                                  nn.Linear(3 * dim, dim)) for _ in range(3))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + checkpointing.checkpoint(block, h)
        return F.cross_entropy(self.head(h).view(-1, VOCAB), targets.view(-1))


CHECKPOINTED = [(3, False), (3, True)]  # (stage, cpu_checkpointing), compiled with aot_eager


def checkpointed(stage: int, cpu: bool, compiled: bool) -> dict:
    """3 steps of Checkpointed; what checkpointing counted (segments run, bytes to the host)."""
    torch.manual_seed(0)
    model = Checkpointed()
    cfg = config(stage, "fp32", 1, comm.world_size())
    cfg["activation_checkpointing"] = {"cpu_checkpointing": cpu}
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg)
    if compiled:
        engine.compile(backend="aot_eager")
    checkpointing.counters.reset()
    unraisable, hook = [], sys.unraisablehook  # errors in __del__ and the like, else only printed
    sys.unraisablehook = lambda info: unraisable.append(f"{info.exc_type.__name__}: "
                                                        f"{info.exc_value} in {info.object}")
    try:
        for step in range(STEPS):
            tokens, targets = global_batch(step, comm.world_size(), 1)
            rank = comm.rank()
            engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
            engine.step()
        gc.collect()
    finally:
        sys.unraisablehook = hook
    counted = checkpointing.counters
    return {"params": host_params(model, engine), "segments": counted.segments,
            "bytes_to_host": counted.bytes_to_host, "unraisable": unraisable}


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), \
            nn.Linear(3 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class Deep(nn.Module):
    """12 residual blocks: more than Dynamo's default recompile limit (8)."""

    def __init__(self, dim: int = 16, blocks: int = 12):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(blocks))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return F.cross_entropy(self.head(h).view(-1, VOCAB), targets.view(-1))


def deep_compiled_calls(limit: int) -> list[int]:
    """Compiled graphs run per step of Deep at stage 3 (graph breaks at each unit's gather),
    under a recompile limit of `limit`: a model Dynamo stopped compiling runs fewer."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    calls = [0]

    def counting(graph, inputs):
        def run_counted(*args):
            calls[0] += 1
            return graph(*args)
        return make_boxed_func(run_counted)

    torch.manual_seed(0)
    model = Deep()
    cfg = config(3, "fp32", 1, comm.world_size())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every block a unit
    engine = zero_ext.initialize(model=model, config=cfg)[0]
    torch._dynamo.reset()
    engine.compile(backend=aot_autograd(fw_compiler=counting))
    per_step = []
    with torch._dynamo.config.patch(cache_size_limit=limit):
        for step in range(4):
            tokens, targets = global_batch(step, comm.world_size(), 1)
            rank = comm.rank()
            engine.backward(engine(tokens[0, rank], targets[0, rank]))
            engine.step()
            per_step.append(calls[0])
            calls[0] = 0
    engine.destroy()
    return per_step


def unit_modules(compiled: bool) -> list[str]:
    """Stage 3's units of Deep, passed to initialize as it is or torch.compile'd."""
    torch.manual_seed(0)
    model = Deep(blocks=3)
    names = {module: name for name, module in model.named_modules()}
    cfg = config(3, "fp32", 1, comm.world_size())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    given = torch.compile(model, backend="aot_eager") if compiled else model
    engine = zero_ext.initialize(model=given, config=cfg)[0]
    units = [names[unit.module] for unit in engine.partitioned.units]
    engine.destroy()
    return units


def cases() -> dict:
    out = {"deep": {limit: deep_compiled_calls(limit) for limit in (8, 64)},
           "units": {compiled: unit_modules(compiled) for compiled in (False, True)}}
    torch._dynamo.config.cache_size_limit = 64  # one model instance per case
    out["calls"] = _calls()
    for stage, cpu in CHECKPOINTED:
        out[("checkpointed", stage, cpu)] = {compiled: checkpointed(stage, cpu, compiled)
                                             for compiled in (False, True)}
    for stage, dtype, backend in CASES:
        eager = train_engine(stage, dtype, ACCUMULATION, STEPS)
        compiled = train_engine(stage, dtype, ACCUMULATION, STEPS, compile_backend=backend)
        out[(stage, dtype, backend)] = {"eager": eager, "compiled": compiled}
        if comm.rank() == 0:
            out[(stage, dtype, backend)]["reference"] = train_reference(
                dtype, ACCUMULATION, STEPS, comm.world_size())
    return out
