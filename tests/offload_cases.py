"""What each rank runs in the offload tests (tests/test_offload.py).

Every case trains the engine_cases model twice on the same batches, with and without offload,
so the tests can ask for identical results, and rank 0 adds the single-process torch AdamW
reference of engine_cases.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import warnings

import torch

import zero_ext
from zero_ext import comm
from zero_ext.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_fp32_param
from zero_ext.zero import offload, reporting

import engine_cases

OPTIMIZER = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
PARAM = {"offload_param": {"device": "cpu", "pin_memory": True}}
# offload_optimizer.ratio: the first buckets' optimizer state on the host, the rest on the
# device (DeepSpeed's Twin-Flow).
RATIO = {"offload_optimizer": {"device": "cpu", "pin_memory": True, "ratio": 0.5}}
KINDS = {"optimizer": OPTIMIZER, "param": PARAM, "both": {**OPTIMIZER, **PARAM}, "ratio": RATIO}


def parity_cases(cases: list[tuple], steps: int) -> dict:
    """Each (stage, offload kind, dtype, accumulation, clip) trained with offload, without,
    and (rank 0) by the reference."""
    out = {}
    for stage, kind, dtype, accumulation, clip in cases:
        got = engine_cases.train_engine(stage, dtype, accumulation, steps, clip=clip,
                                        **KINDS[kind])
        got["plain"] = engine_cases.train_engine(stage, dtype, accumulation, steps, clip=clip)
        if comm.rank() == 0:
            got["reference"] = engine_cases.train_reference(dtype, accumulation, steps,
                                                            comm.world_size(), clip=clip)
        out[(stage, kind, dtype, accumulation, clip)] = got
    return out


def overflow_cases() -> dict:
    """engine_cases.fp16_overflow (inf on rank 1 at the second step) with the optimizer
    offloaded, half of it (ratio), and without for comparison."""
    return {stage: {"offload": engine_cases.fp16_overflow(stage, **OPTIMIZER),
                    "ratio": engine_cases.fp16_overflow(stage, **RATIO),
                    "plain": engine_cases.fp16_overflow(stage)} for stage in (1, 2)}


def _engine(stage: int, dtype: str, accumulation: int, clip: float = 0.5,
            without_unused: bool = False, **zero):
    model = engine_cases.build_model()
    if without_unused:
        # TinyNet.unused never gets a gradient, which holds its bucket, and every bucket
        # after it, back until the end of backward.
        model.unused = None
    cfg = engine_cases.config(stage, dtype, accumulation, comm.world_size(), clip=clip, **zero)
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg,
                                          model_parameters=engine_cases.param_groups(model))
    return model, engine


def arrival_cases() -> dict:
    """When shards step: only in engine.step(), after the all-rank decision, with clipping and
    without (the shard step counts have not moved when backward returns). Also whether
    gradient copies started before backward's end (overlap_comm at stage 2)."""
    rank, world_size = comm.rank(), comm.world_size()
    out = {}
    for clip in (0.0, 0.5):
        _, engine = _engine(2, "bf16", 2, clip=clip, without_unused=True, **OPTIMIZER)
        copies_before_end = []
        end_backward = engine.grad_buckets.end_backward
        grad_ready = engine.offload.grad_ready
        calls = []

        def counting_ready(index, grad, calls=calls, grad_ready=grad_ready):
            calls.append(index)
            grad_ready(index, grad)

        def marking_end(calls=calls, end_backward=end_backward, seen=copies_before_end):
            seen.append(len(calls))
            end_backward()

        engine.grad_buckets._on_final = counting_ready
        engine.grad_buckets.end_backward = marking_end
        steps_seen = []
        for step in range(2):
            tokens, targets = engine_cases.global_batch(step, world_size, 2)
            for micro in range(2):
                calls.clear()
                engine.backward(engine_cases.run(engine, tokens[micro, rank],
                                                 targets[micro, rank]))
                if micro == 1:
                    engine.offload.wait_for_gradients()  # and for any step still running
                    steps_seen.append([s.step.item() for s in engine.optimizer.shards])
                engine.step()
        out[clip] = {"steps_seen": steps_seen, "copies_before_end": copies_before_end,
                     "buckets": len(engine.layouts)}
    return out


def accounting_cases() -> dict:
    """Host and device bytes after a step, the host plan made before allocating, and the
    plain engine's bytes, for each offload configuration."""
    captured = []
    check = offload.check_host_memory

    def capture(plan, available=None):
        captured.append(plan)
        return check(plan, available)

    offload.check_host_memory = capture
    out = {}
    try:
        for stage, kind, dtype, accumulation in [(1, "optimizer", "fp32", 1),
                                                 (2, "optimizer", "bf16", 1),
                                                 (2, "optimizer", "bf16", 4),
                                                 (3, "optimizer", "bf16", 1),
                                                 (3, "both", "fp32", 1),
                                                 (3, "both", "bf16", 4),
                                                 (3, "param", "bf16", 1),
                                                 (2, "ratio", "bf16", 1),
                                                 (3, "ratio", "fp32", 4)]:
            row = {}
            for label, zero in (("offload", KINDS[kind]), ("plain", {})):
                captured.clear()
                _, engine = _engine(stage, dtype, accumulation, **zero)
                engine_cases.train_steps(engine, 1)
                row[label] = {"breakdown": engine.memory_breakdown(),
                              "location": engine.memory_by_location(),
                              "plan": captured[0] if captured else None,
                              "shards": sum(layout.shard_numel for layout in engine.layouts),
                              "host_shards": sum(s.layout.shard_numel for s in
                                                 engine.offload.shards) if engine.offload
                              else 0}
            out[(stage, kind, dtype, accumulation)] = row
    finally:
        offload.check_host_memory = check
    return out


def budget_cases() -> dict:
    """initialize against a faked amount of available host memory: one byte short of what the
    node's ranks need must be refused before any host buffer is allocated; exactly enough
    must pass."""
    real_available, real_buffer = offload.available_host_memory, offload.host_buffer
    plans, allocations = [], []
    check = offload.check_host_memory

    def capture(plan, available=None):
        plans.append(plan)
        return check(plan, available)

    def counting_buffer(numel, dtype, pin):
        allocations.append(numel)
        return real_buffer(numel, dtype, pin)

    offload.check_host_memory, offload.host_buffer = capture, counting_buffer
    out = {}
    try:
        offload.available_host_memory = lambda: 2**62
        _engine(3, "bf16", 1, **KINDS["both"])
        need = plans[-1].node_bytes
        out["plan"] = plans[-1]
        out["allocated_when_enough"] = len(allocations)
        allocations.clear()
        offload.available_host_memory = lambda: need - 1
        try:
            _engine(3, "bf16", 1, **KINDS["both"])
            out["short"] = "no error"
        except MemoryError as error:
            out["short"] = str(error)
        out["allocated_when_short"] = len(allocations)
        offload.available_host_memory = lambda: need
        _engine(3, "bf16", 1, **KINDS["both"])
        out["exact"] = "ok"
    finally:
        offload.available_host_memory, offload.host_buffer = real_available, real_buffer
        offload.check_host_memory = check
    out["real_available"] = offload.available_host_memory()
    return out


def model_cases() -> dict:
    """The ZeRO-3 issue's models with offload: transformers Llama (tied embeddings) at stages
    2 and 3, and Blocks built under zero_ext.Init (unit shards created straight in host
    memory); each against the same run without offload."""
    out = {}
    for stage, kind in ((2, "optimizer"), (3, "both")):
        out[f"llama{stage}"] = {"offload": engine_cases.llama(stage, **KINDS[kind]),
                                "plain": engine_cases.llama(stage)}
    for label, zero in (("offload", KINDS["both"]), ("plain", {})):
        torch.manual_seed(0)
        with zero_ext.Init():
            model = engine_cases.Blocks()
        cfg = engine_cases.config(3, "bf16", 2, comm.world_size(), **zero)
        engine, _, _, _ = zero_ext.initialize(model=model, config=cfg)
        engine_cases.train_steps(engine, 3)
        out.setdefault("init", {})[label] = engine_cases.host_params(model, engine)
    # offload_param where every parameter is kept whole (all below the persistence threshold):
    # nothing to offload, said once on rank 0; trains as without it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = {label: engine_cases.llama(3, stage3_param_persistence_threshold=10**9, **zero)
                 for label, zero in (("offload", KINDS["both"]), ("plain", {}))}
    whole["warned"] = [str(w.message) for w in caught if "nothing to offload" in str(w.message)]
    out["all_whole"] = whole
    return out


def checkpoint_cases(root: str) -> dict:
    """Checkpoints and offload: trained 2 steps, saved, trained 2 more; then a fresh engine
    with offload and one without load the checkpoint and train the same 2 steps. Both must end
    where the uninterrupted run did (the state lives on the host, the checkpoint does not
    care)."""
    out = {}
    for stage, kind, dtype in ((2, "optimizer", "bf16"), (3, "both", "fp32"),
                               (3, "ratio", "bf16")):
        path = f"{root}/stage{stage}-{kind}"
        _, engine = _engine(stage, dtype, 1, **KINDS[kind])
        train_from(engine, 0, 2)
        engine.save_checkpoint(path)
        train_from(engine, 2, 2)
        row = {"straight": engine_cases.host_params(engine.module, engine)}
        for label, zero in (("offload", KINDS[kind]), ("plain", {})):
            _, resumed = _engine(stage, dtype, 1, **zero)
            resumed.load_checkpoint(path)
            train_from(resumed, 2, 2)
            row[label] = engine_cases.host_params(resumed.module, resumed)
        out[(stage, kind)] = row
    return out


def train_from(engine, first: int, steps: int) -> None:
    rank, world_size = comm.rank(), comm.world_size()
    for step in range(first, first + steps):
        tokens, targets = engine_cases.global_batch(step, world_size, 1)
        engine.backward(engine_cases.run(engine, tokens[0, rank], targets[0, rank]))
        engine.step()


def slow_cpu_steps(engine, seconds: float) -> None:
    """Every CPU step the offload's worker thread runs starts `seconds` late, so that the next
    forward meets deferred steps still running (a missing wait would read stale weights)."""
    step = engine.optimizer.sharded_step

    def slow(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(seconds)
        return step(*args, **kwargs)

    engine.optimizer.sharded_step = slow


@contextlib.contextmanager
def gather_order(engine):
    """Records, in order, each unit the stage-3 hooks use (and whether a prefetch had gathered
    it) and each all-gather they start: [("use", unit, prefetched), ("gather", bucket), ...]. Another collective inside a forward (a
    SyncBatchNorm's all-reduce) meets the same gather on every rank only if these agree."""
    partitioned = engine.partitioned
    events, gather_all, use = [], partitioned._gather_all, partitioned.use
    units = {id(unit): index for index, unit in enumerate(partitioned.units)}

    def recorded_use(unit, phase):
        # ("use", unit, whether a prefetch had gathered it or started to)
        events.append(("use", units[id(unit)], unit.state.value != "sharded"))
        return use(unit, phase)

    def recorded_gather(*args, bucket, **kwargs):
        events.append(("gather", bucket))
        return gather_all(*args, bucket=bucket, **kwargs)

    partitioned.use, partitioned._gather_all = recorded_use, recorded_gather
    try:
        yield events
    finally:
        partitioned._gather_all = gather_all
        del partitioned.use


def deferred_cases(root: str) -> dict:
    """Stage 3, with clipping and without ("optimizer-noclip"): the units' CPU steps run behind
    the next forward, after the step's decision. With every
    worker step slowed, training must still equal the engine without offload bitwise; right
    after engine.step() returns some unit has not stepped yet; a checkpoint saved right after
    a step, loaded by an engine without offload, goes on as the uninterrupted run.

    Rank 0 then waits 0.2 s before each next forward, so its CPU steps are done when it
    prefetches, and rank 1's (slowed 50 ms each) are not: the gathers must still start at the
    same points on both (`order`), as they do when whether to prefetch never depends on a
    rank's timing."""
    out = {}
    for kind in ("optimizer", "ratio", "both", "optimizer-noclip"):
        clip = 0.0 if kind.endswith("-noclip") else 0.5
        zero = KINDS[kind.removesuffix("-noclip")]
        _, engine = _engine(3, "bf16", 1, clip=clip, **zero)
        slow_cpu_steps(engine, 0.02 if comm.rank() == 0 else 0.05)
        lagging = []
        with gather_order(engine) as order:
            for step in range(3):
                train_from(engine, step, 1)
                counts = [s.step.item() for s in engine.offload.shards]
                lagging.append(min(counts) < engine.global_steps)
                if comm.rank() == 0:
                    time.sleep(0.2)
        path = f"{root}/deferred-{kind}"
        engine.save_checkpoint(path)  # right after a step: waits for the deferred ones
        train_from(engine, 3, 2)
        timings = engine.offload.timings()
        _, plain = _engine(3, "bf16", 1, clip=clip)
        train_from(plain, 0, 5)
        _, resumed = _engine(3, "bf16", 1, clip=clip)
        resumed.load_checkpoint(path)
        train_from(resumed, 3, 2)
        out[kind] = {"offload": engine_cases.host_params(engine.module, engine),
                     "plain": engine_cases.host_params(plain.module, plain),
                     "resumed": engine_cases.host_params(resumed.module, resumed),
                     "lagging": lagging, "deferrable": len(engine._deferrable),
                     "timings": timings, "order": order}
    return out


def scheduler_warnings() -> list[str]:
    """torch's LR scheduler given to initialize, with every host shard's step deferred (and
    slowed, so it runs after the scheduler's step): the warnings torch's schedulers give."""
    torch.manual_seed(0)
    model = engine_cases.Blocks()  # no parameter kept whole: every host shard is deferred
    cfg = engine_cases.config(3, "bf16", 1, comm.world_size(), **OPTIMIZER)
    engine, _, _, _ = zero_ext.initialize(
        model=model, config=cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)))
    assert len(engine._deferrable) == len(engine.offload.shards)
    slow_cpu_steps(engine, 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_from(engine, 0, 2)
    return [str(w.message) for w in caught if "lr_scheduler" in str(w.message)]


def checks(root: str) -> dict:
    return {"overflow": overflow_cases(), "arrival": arrival_cases(),
            "accounting": accounting_cases(), "budget": budget_cases(),
            "models": model_cases(), "deferred": deferred_cases(root),
            "scheduler_warnings": scheduler_warnings()}


def timing_cases() -> dict:
    """OptimizerOffload.timings() after three steps of _Wide, with clipping off and on (every
    shard waits for the norm either way); the report line
    that wall_clock_breakdown prints, and the timings after it."""
    out = {}
    for clip in (0.0, 0.5):
        torch.manual_seed(0)
        engine, _, _, _ = zero_ext.initialize(model=_Wide(512, 8), config={
            "train_micro_batch_size_per_gpu": 64, "gradient_clipping": clip,
            "steps_per_print": 100, "wall_clock_breakdown": True,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 2**18,
                                  "overlap_comm": True, **OPTIMIZER}})
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            engine.backward(engine(torch.randn(64, 512, generator=gen)))
            engine.step()
        timings = engine.offload.timings(reset=False)
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            reporting.report(engine)  # what every steps_per_print-th step prints
        out[clip] = {"timings": timings, "shards": len(engine.optimizer.shards),
                     "report": report.getvalue(), "after_report": engine.offload.timings()}
    return out


# -- GPU (tests marked cuda) -------------------------------------------------------------------
class _Wide(torch.nn.Module):
    """Eight 1024-wide blocks: enough backward work for copies and CPU steps to overlap."""

    def __init__(self, width: int = 1024, depth: int = 8):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x.square().mean()


def cuda_overlap(clip: float, kind: str = "optimizer") -> dict:
    """On the GPU: host buffers pinned; where each shard's optimizer state lives; when the first
    shard's CPU step and gradient copy happened relative to the end of backward; and the result
    against the non-offloaded engine."""
    results = {}
    for label, zero in (("offload", KINDS[kind]), ("plain", {})):
        torch.manual_seed(0)
        model = _Wide()
        engine, _, _, _ = zero_ext.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 64, "gradient_clipping": clip,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 2**20,
                                  "overlap_comm": True, **zero}})
        marks: dict[str, list[float]] = {"step": [], "backward_end": []}
        if engine.offload is not None:
            step_shard = engine.optimizer.sharded_step

            def timed_step(*args, step_shard=step_shard, marks=marks, **kwargs):
                marks["step"].append(time.perf_counter())
                return step_shard(*args, **kwargs)

            engine.optimizer.sharded_step = timed_step
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(64, 1024, generator=gen).to(engine.device, torch.bfloat16)
            engine.backward(engine(x))
            torch.cuda.synchronize()
            marks["backward_end"].append(time.perf_counter())
            engine.step()
        pinned = None
        if engine.offload is not None:
            shard = engine.optimizer.shards[0]
            pinned = all(t.is_pinned() for t in (shard.master, shard.exp_avg, shard.exp_avg_sq,
                                                 shard.weights_16bit,
                                                 engine.offload.host_grads[0]))
        results[label] = {"params": {n: p.detach().float().cpu()
                                     for n, p in model.named_parameters()},
                          "marks": marks, "pinned": pinned,
                          "shards": len(engine.optimizer.shards),
                          "state_on": [s.exp_avg.device.type for s in engine.optimizer.shards]}
    return results


def cuda_param_offload() -> dict:
    """Stage 3 with parameters and optimizer on the host, on the GPU: shards pinned, the same
    result as without offload."""
    results = {}
    for label, zero in (("offload", KINDS["both"]), ("plain", {})):
        torch.manual_seed(0)
        model = _Wide(256, 4)
        engine, _, _, _ = zero_ext.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  **zero}})
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(8, 256, generator=gen).to(engine.device, torch.bfloat16)
            engine.backward(engine(x))
            engine.step()
        pinned = None
        if engine.partitioned is not None and engine.offload_param:
            pinned = all(s.is_pinned() for u in engine.partitioned.units for s in u.shards)
        results[label] = {"params": engine_cases.host_params(model, engine), "pinned": pinned}
    return results


def fragments_under_offload() -> dict:
    """zero_ext.utils on offloaded state (on the GPU: pinned host buffers, side-stream copies):
    per configuration, the gradients read after backward, the same gradients read again after
    fp32 weights were set (the 16-bit staging buffer may hold the gradient then), whether the
    model's weights became the ones set, and the weights after the step that follows. Every
    configuration must give what the one without offload gives."""
    results = {}
    for label, stage, zero in (("plain-2", 2, {}), ("optimizer-2", 2, KINDS["optimizer"]),
                               ("ratio-2", 2, KINDS["ratio"]), ("plain-3", 3, {}),
                               ("both-3", 3, KINDS["both"])):
        torch.manual_seed(0)
        model = _Wide(256, 4)
        engine, _, _, _ = zero_ext.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                  **zero}})
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(8, 256, generator=gen).to(engine.device, torch.bfloat16)
        engine.backward(engine(x))
        named = dict(model.named_parameters())
        grads = {n: safe_get_full_grad(p).cpu() for n, p in named.items()}
        new = {n: safe_get_full_fp32_param(p) + 0.01 for n, p in named.items()}
        for name, param in named.items():
            safe_set_full_fp32_param(param, new[name])
        again = {n: safe_get_full_grad(p).cpu() for n, p in named.items()}
        state = engine.full_state_dict()
        engine.step()
        results[label] = {
            "grads": grads, "grads_after_set": again,
            "model_is_set": all(torch.equal(state[n], new[n].cpu().to(torch.bfloat16))
                                for n in named),
            "after_step": {n: safe_get_full_fp32_param(p).cpu() for n, p in named.items()}}
    return results


def cuda_deferred() -> dict:
    """On the GPU, stage 3 with clipping: the units' CPU steps run behind the next forward, each
    slowed by 20 ms; the gathers must wait for them and for their uploads (stream order), so
    the result equals the engine without offload bitwise."""
    results = {}
    for label, zero in (("optimizer", KINDS["optimizer"]), ("ratio", KINDS["ratio"]),
                        ("plain", {})):
        torch.manual_seed(0)
        model = _Wide(512, 6)
        engine, _, _, _ = zero_ext.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 32, "gradient_clipping": 1.0,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  **zero}})
        if engine.offload is not None:
            slow_cpu_steps(engine, 0.02)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(32, 512, generator=gen).to(engine.device, torch.bfloat16)
            engine.backward(engine(x))
            engine.step()
        results[label] = {"params": engine_cases.host_params(model, engine),
                          "deferred": engine.offload.timings().cpu_step_deferred_s
                          if engine.offload is not None else None}
    return results
