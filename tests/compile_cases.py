"""What each rank runs in tests/test_compile.py: engine.compile() against the same training
eager (engine_cases' TinyNet: a tied head, a frozen and an unused parameter)."""

from __future__ import annotations

import warnings

import torch

import zero_ext
from zero_ext import comm

from engine_cases import build_model, config, train_engine, train_reference

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


def run() -> dict:
    torch._dynamo.config.cache_size_limit = 64  # one model instance per case
    out = {"calls": _calls()}
    for stage, dtype, backend in CASES:
        eager = train_engine(stage, dtype, ACCUMULATION, STEPS)
        compiled = train_engine(stage, dtype, ACCUMULATION, STEPS, compile_backend=backend)
        out[(stage, dtype, backend)] = {"eager": eager, "compiled": compiled}
        if comm.rank() == 0:
            out[(stage, dtype, backend)]["reference"] = train_reference(
                dtype, ACCUMULATION, STEPS, comm.world_size())
    return out
