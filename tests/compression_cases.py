"""What each rank runs in tests/test_compression.py: the engine with compressed communication
(zero_ext.compression), at 2 ranks, 4 ranks, and 4 ranks made to look like 2 nodes x 2.

Each case returns raw facts (the buckets' inputs and reduced outputs, residual totals, traffic
counters, gathered weights, trained parameters), as CPU tensors; the test computes the
plain-torch references from them (quantize_dequantize below, the design's quantization rule written out in torch).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

import zero_ext
from zero_ext import comm

import engine_cases
from engine_cases import build_model, global_batch, host_params, param_groups, run

STEPS = 6
BLOCK = 64  # small blocks: a bucket's chunk spans several, a partial last one included


def quantize_dequantize(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """The design's blockwise symmetric quantization of one chunk, then dequantization (fp32):
    per block of `block` elements (the last zero-padded), absmax; scale = absmax / qmax;
    q = clamp(round_half_even(x * (qmax / absmax)), -qmax, qmax) in fp32; value = q * scale."""
    qmax = 127 if bits == 8 else 7
    numel = x.numel()
    blocks = -(-numel // block)
    padded = torch.zeros(blocks * block, dtype=torch.float32)
    padded[:numel] = x.float().flatten()
    rows = padded.view(blocks, block)
    absmax = rows.abs().amax(dim=1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    # A tensor divisor (`qmax / tensor` is reciprocal-then-multiply in torch: rounded twice).
    q = torch.round(rows * (torch.full_like(safe, qmax) / safe)).clamp(-qmax, qmax)
    q = torch.where(absmax > 0, q, torch.zeros_like(q))
    return (q * (absmax / qmax)).flatten()[:numel]


def config(stage: int, dtype: str, *, gradients: dict | None = None,
           weights: dict | None = None, accumulation: int = 1, **zero) -> dict:
    """engine_cases.config (AdamW lr 1e-2, clip 0.5, small buckets) with zero_ext.compression."""
    cfg = engine_cases.config(stage, dtype, accumulation, comm.world_size(), **zero)
    compression = {}
    if gradients is not None:
        compression["gradients"] = {"block_size": BLOCK, **gradients}
    if weights is not None:
        compression["weights"] = {"block_size": BLOCK, **weights}
    cfg["zero_ext"] = {"compression": compression}
    return cfg


class ReductionSpy:
    """Records every compressed reduction the engine starts: bucket, this rank's input (the
    pre-divided gradients), the residual mass before the call (feedback.flat_total()), the
    loss scale, and the output (read after the backward)."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[dict] = []
        compression = engine.compression
        original = compression.reduce

        def reduce(flat, out, bucket):
            feedback = compression.feedback.get(bucket)
            self.calls.append({
                "bucket": bucket, "flat": flat.detach().float().cpu().clone(),
                "total": feedback.flat_total().float().cpu() if feedback is not None else None,
                "loss_scale": engine.loss_scaler.scale if engine.loss_scaler else 1.0,
                "out": out if out is not None else flat, "step": engine.global_steps})
            return original(flat, out, bucket)

        compression.reduce = reduce

    def settle(self) -> None:
        """After a backward: the outputs are final; keep copies (the buckets are reused)."""
        for call in self.calls:
            if isinstance(call["out"], torch.Tensor):
                call["out"] = call["out"].detach().float().cpu().clone()


def _step(engine, step: int) -> None:
    world_size, rank = comm.world_size(), comm.rank()
    tokens, targets = global_batch(step, world_size, 1)
    engine.backward(run(engine, tokens[0, rank], targets[0, rank]))


def train(stage: int, dtype: str, steps: int = STEPS, **compression) -> dict:
    """Trains TinyNet with compression; returns final parameters, grad norms, and the top-k
    density each backward ran at."""
    model = build_model()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(stage, dtype, **compression),
                                          model_parameters=param_groups(model))
    norms, densities = [], []
    for step in range(steps):
        _step(engine, step)
        densities.append(engine.compression.density)
        engine.step()
        norms.append(engine.get_global_grad_norm())
    return {"params": host_params(model, engine), "norms": norms, "densities": densities}


def reductions(stage: int, dtype: str, steps: int = 3, overflow_at: int | None = None,
               accumulation: int = 1, **compression) -> dict:
    """`steps` steps with every compressed reduction recorded; `overflow_at`: at that step an
    inf enters one gradient on rank 1 only (fp16: the step is skipped on every rank). Also the
    residual totals right after each step (zero after a skipped one: reset)."""
    model = build_model()
    engine, _, _, _ = zero_ext.initialize(
        model=model, config=config(stage, dtype, accumulation=accumulation, **compression),
        model_parameters=param_groups(model))
    spy = ReductionSpy(engine)
    after_step = []
    for step in range(steps):
        handle = None
        if step == overflow_at and comm.rank() == 1:
            handle = model.fc1.weight.register_hook(
                lambda g: g.index_fill(0, torch.tensor([0], device=g.device), float("inf")))
        for micro in range(accumulation):
            _step(engine, step * accumulation + micro)
            spy.settle()
            if micro < accumulation - 1:
                engine.step()
        if handle is not None:
            handle.remove()
        engine.step()
        after_step.append({
            "skipped": engine.skipped_steps,
            "totals": {b: f.flat_total().float().cpu()
                       for b, f in engine.compression.feedback.items()},
            "residual_loss_scale": dict(engine.compression.residual_loss_scale)})
    return {"calls": spy.calls, "after_step": after_step, "world_size": comm.world_size(),
            "rank": comm.rank(), "padded": {layout.index: layout.padded_numel for layout in engine.layouts}}


class Square(nn.Module):
    """Two 256 x 256 linears (stage-3 units): buckets of 65536 elements, whose chunks at 2 and
    4 ranks are whole numbers of 256-element blocks, so the bytes compare with the ratios of
    the element sizes (the scales aside)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(256, 256, bias=False),
                                  nn.Linear(256, 256, bias=False))

    def forward(self, x):
        return self.body(x).float().square().mean()


def traffic(stage: int, dtype: str, **compression) -> dict:
    """The counters of one step (backward and step) of Square, after a first step (stage 3's
    prefetch order recorded), with 256-element blocks."""
    torch.manual_seed(0)
    model = Square()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(
        stage, dtype, reduce_bucket_size=65536, **compression))
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(comm.rank()))
    x = x.to(engine.device, engine.model_dtype)
    for step in range(2):
        if step == 1:
            comm.traffic.reset()
        engine.backward(engine(x))
        engine.step()
    return {"traffic": comm.traffic.snapshot(),
            "buckets": [layout.padded_numel for layout in engine.layouts],
            "units": len(engine.partitioned.units) if engine.partitioned is not None else 0}


class Huge(nn.Module):
    """Weights beyond fp16's range (bf16 holds them): a gather that went through fp16 would
    turn them into inf."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(40, 48), nn.Linear(48, 8))
        with torch.no_grad():
            self.body[0].weight.mul_(1e6)       # |w| up to ~1.6e5 > 65504
            self.body[1].weight[0].mul_(1e30)   # one block's absmax 1e29

    def forward(self, x):
        return self.body(x).float().abs().mean()  # up to ~1e36: square() would overflow


def quantized_weights(**zero) -> dict:
    """qwZ at stage 3, bf16: the weights each unit's forward saw (the quantized gather), the
    full weights from full_state_dict and inside GatheredParameters (whose gathers stay
    exact), each unit bucket's slots
    (to rebuild every rank's shard), and the forward's gather traffic."""
    torch.manual_seed(0)
    model = Huge()
    initial = {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}
    engine, _, _, _ = zero_ext.initialize(
        model=model, config=config(3, "bf16", weights={"method": "int8"}, **zero))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}

    def record(module, args):
        for param in module.parameters(recurse=False):
            seen[names[id(param)]] = param.detach().cpu().clone()

    handles = [m.register_forward_pre_hook(record) for m in model.body]
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(comm.rank()))
    comm.traffic.reset()
    with torch.no_grad():
        loss = engine(x.to(engine.device, torch.bfloat16))
    gather_traffic = comm.traffic.snapshot()
    for handle in handles:
        handle.remove()
    units = [([(names[id(p)], s.offset, s.numel) for s, p in zip(layout.slots, members)],
              layout.padded_numel)
             for unit in engine.partitioned.units
             for layout, members in zip(unit.layouts, unit.params)]
    with zero_ext.GatheredParameters(list(model.parameters())):
        inside = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    return {"seen": seen, "full": engine.full_state_dict(),
            "gathered": inside, "initial": initial, "units": units, "traffic": gather_traffic,
            "loss_finite": math.isfinite(loss.float().item())}


def stage0_topk() -> dict:
    """Stage 0 top-k: every rank's whole reduced buckets after one backward of each step."""
    model = build_model()
    gradients = {"method": "topk", "density": 0.2, "momentum": 0.5}
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(0, "fp32",
                                                                     gradients=gradients),
                                          model_parameters=param_groups(model))
    spy = ReductionSpy(engine)
    grads = []
    for step in range(3):
        _step(engine, step)
        spy.settle()
        grads.append([g.cpu().clone() for g in engine.grad_buckets.reduced_grads()])
        engine.step()
    return {"grads": grads, "calls": spy.calls, "params": host_params(model, engine)}


INT8 = {"method": "int8"}
INT4_EF = {"method": "int4", "error_feedback": True}
TOPK = {"method": "topk", "density": 0.3, "momentum": 0.5, "warmup_steps": 2}
# (label, stage, dtype, compression): what trains at each world size against the reference.
PARITY = [
    ("int8", 1, "fp32", {"gradients": INT8}),
    ("int8", 2, "bf16", {"gradients": INT8}),
    ("int8+qwZ", 3, "bf16", {"gradients": INT8, "weights": {"method": "int8"}}),
    ("int4+ef", 1, "fp32", {"gradients": INT4_EF}),
    ("int4+ef", 2, "fp32", {"gradients": INT4_EF}),
    ("int4+ef", 3, "bf16", {"gradients": INT4_EF}),
    ("topk", 0, "fp32", {"gradients": TOPK}),
    ("topk", 1, "fp32", {"gradients": TOPK}),
    ("topk", 2, "bf16", {"gradients": TOPK}),
]

PARITY_FOUR = [PARITY[1], PARITY[5], PARITY[7]]   # 4 ranks on one node
PARITY_NODES = [PARITY[2], PARITY[5],             # 2 simulated nodes x 2: two hops, qwZ,
                ("int8+qwZ+hpZ", 3, "bf16",        # and qwZ's gathers with hpZ's
                 {"gradients": INT8, "weights": {"method": "int8"},
                  "zero_hpz_partition_size": 2, "hierarchical_allgather": True})]


# Relative error of the whole training update (final minus initial parameters, all of them)
# against the reference's, after 6 AdamW steps (lr 1e-2, clip 0.5). Adam divides each
# element's step by its own gradient scale, so an element whose gradient is small next to its
# block's absmax (quantized to a few levels or to 0, or left in a top-k residual) moves by a
# whole lr of another size or sign: single elements may differ by 2 lr, while the update as a
# whole stays close. Measured (2, 4 and 2x2 ranks): int8 0.055-0.078, int4 with error feedback
# 0.125-0.143, top-k 30% (2 warm-up steps, momentum 0.5) 0.081-0.176; the bounds are about
# twice that. The floors say that compression did something (uncompressed fp32: 1e-5).
UPDATE_ERROR = {"int8": (1e-3, 0.15), "int8+qwZ": (1e-3, 0.15), "int8+qwZ+hpZ": (1e-3, 0.15),
                "int4+ef": (1e-3, 0.3),
                "topk": (1e-3, 0.35)}


def update_error(got: dict, reference: dict, dtype: str) -> float:
    """The relative error of a train() result's update against train_reference's."""
    model = build_model()
    if dtype == "bf16":
        model.to(torch.bfloat16)  # the reference starts from the bf16 weights
    initial = {n: p.detach().float() for n, p in model.named_parameters()}
    return engine_cases.relative_update_error(got, reference, initial)


def parity(cases) -> dict:
    out = {}
    for label, stage, dtype, compression in cases:
        out[(label, stage, dtype)] = train(stage, dtype, **compression)
    if comm.rank() == 0:
        out["reference"] = {dtype: engine_cases.train_reference(dtype, 1, STEPS,
                                                                comm.world_size())
                            for dtype in ("fp32", "bf16")}
    return out


def _traffic_cases() -> dict:
    block = {"block_size": 256}
    return {
        "bf16": traffic(2, "bf16"),
        "int8": traffic(2, "bf16", gradients={**INT8, **block}),
        "int4": traffic(2, "bf16", gradients={**INT4_EF, **block}),
        "topk": traffic(2, "bf16", gradients={"method": "topk", "density": 0.01}),
        "stage3 bf16": traffic(3, "bf16"),
        "stage3 qwZ": traffic(3, "bf16", weights={"method": "int8", **block}),
    }


def frozen_variance(stage: int, steps: int = 5) -> dict:
    """Top-k with freeze_variance (2 dense warm-up steps): per step, the density, the first
    shard's moments and the groups' hyperparameters after the step."""
    model = build_model()
    gradients = {"method": "topk", "density": 0.3, "momentum": 0.0, "warmup_steps": 2,
                 "freeze_variance": True}
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(stage, "fp32",
                                                                     gradients=gradients),
                                          model_parameters=param_groups(model))
    out = []
    for step in range(steps):
        _step(engine, step)
        density = engine.compression.density
        engine.step()
        shard = engine.optimizer.shards[0]
        out.append({"density": density, "exp_avg": shard.exp_avg.clone(),
                    "exp_avg_sq": shard.exp_avg_sq.clone(), "step": float(shard.step),
                    "groups": [(tuple(g["betas"]), g["bias_correction"],
                                g.get("variance_frozen", False))
                               for g in engine.optimizer.param_groups]})
    return {"steps": out, "params": host_params(model, engine)}


COMPRESSED_MOMENTUM = {"method": "topk", "density": 0.25, "warmup_steps": 2,
                       "freeze_variance": True, "compress_momentum": True}


def compressed_momentum(stage: int, accumulation: int, steps: int = 4) -> dict:
    """Top-k sending Adam's momentum (2 dense steps, then sparse), every reduction recorded
    with the sum of squares of the raw gradients it was made from (the gradients as autograd
    left them, hooked before the engine's own hooks), and after each step the first moment of
    every shard, the groups and the gradient norm."""
    model = build_model()
    latest: dict[int, torch.Tensor] = {}
    for p in (p for p in model.parameters() if p.requires_grad):
        p.register_post_accumulate_grad_hook(
            lambda p: latest.__setitem__(id(p), p.grad.detach().clone()))
    engine, _, _, _ = zero_ext.initialize(
        model=model, config=config(stage, "fp32", accumulation=accumulation,
                                   gradients=COMPRESSED_MOMENTUM),
        model_parameters=param_groups(model))
    spy = ReductionSpy(engine)
    recorded = engine.compression.reduce

    def reduce(flat, out, bucket):
        params = engine.grad_buckets.buckets[bucket].params
        spy_call = recorded(flat, out, bucket)
        spy.calls[-1]["raw_sq"] = float(sum(latest[id(p)].double().square().sum()
                                            for p in params if id(p) in latest))
        return spy_call

    engine.compression.reduce = reduce
    starts = []  # the engine freezes the variance and starts the momentum once
    start_momentum = engine.compression.start_momentum
    engine.compression.start_momentum = lambda *a: (starts.append(engine.global_steps),
                                                    start_momentum(*a))
    after_step = []
    for step in range(steps):
        for micro in range(accumulation):
            latest.clear()
            _step(engine, step * accumulation + micro)
            spy.settle()
            if micro < accumulation - 1:
                engine.step()
        engine.step()
        after_step.append({
            "exp_avg": {s.layout.index: s.exp_avg.clone() for s in engine.optimizer.shards},
            "groups": [(tuple(g["betas"]), g["bias_correction"], g.get("compressed_beta1"))
                       for g in engine.optimizer.param_groups],
            "norm": engine.get_global_grad_norm()})
    return {"calls": spy.calls, "after_step": after_step, "world_size": comm.world_size(),
            "rank": comm.rank(), "starts": starts}


def torch_optimizer_frozen() -> list[str]:
    """freeze_variance with a torch SGD at stage 0 (kept, replicated; an AdamW would be
    adopted): 4 steps, 2 dense; the warnings the engine gave (rank 0 warns, at the first
    sparse step only)."""
    model = build_model()
    cfg = config(0, "fp32", gradients={"method": "topk", "density": 0.25, "warmup_steps": 2,
                                       "freeze_variance": True})
    del cfg["optimizer"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, _, _ = zero_ext.initialize(
            model=model, config=cfg,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        for step in range(4):
            _step(engine, step)
            engine.step()
    return [str(w.message) for w in caught if "freeze_variance" in str(w.message)]


def torch_optimizer_refused() -> str:
    """compress_momentum with a torch optimizer stage 0 runs as it is (SGD; an AdamW would be
    adopted): initialize's error."""
    model = build_model()
    cfg = config(0, "fp32", gradients=COMPRESSED_MOMENTUM)
    del cfg["optimizer"]
    try:
        zero_ext.initialize(model=model, config=cfg,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    except ValueError as error:
        return str(error)
    return "no error"


def two_ranks() -> dict:
    """Every case at world size 2."""
    return {
        "frozen variance": frozen_variance(2),
        "parity": parity(PARITY),
        "int8": reductions(2, "fp32", steps=2, gradients=INT8),
        "int4+ef": reductions(1, "fp32", steps=3, gradients=INT4_EF),
        "int8+ef bf16 stage 3": reductions(3, "bf16", steps=2,
                                           gradients={"method": "int8", "error_feedback": True}),
        # Stage 2 reduces every micro-step: the residual carries from one to the next.
        "int4+ef stage 2 accumulation 2": reductions(2, "fp32", steps=2, accumulation=2,
                                                     gradients=INT4_EF),
        # fp16, initial scale 2**8, window 3: the overflow at step 1 is skipped (scale 128),
        # the scale doubles again before step 6's backward: residuals stored at 128 are fed
        # back at 256.
        "fp16": reductions(2, "fp16", steps=8, overflow_at=1,
                           gradients={"method": "int8", "error_feedback": True}),
        "topk": reductions(2, "fp32", steps=3,
                           gradients={"method": "topk", "density": 0.25, "momentum": 0.5}),
        "stage0 topk": stage0_topk(),
        "momentum stage 2": compressed_momentum(2, accumulation=2),
        "momentum stage 0": compressed_momentum(0, accumulation=1),
        "momentum with a torch optimizer": torch_optimizer_refused(),
        "frozen with a torch optimizer": torch_optimizer_frozen(),
        "traffic": _traffic_cases(),
        "qwZ": quantized_weights(),
    }


def four_ranks() -> dict:
    """World size 4: one node, then 2 simulated nodes x 2 ranks (two hops, hierarchical
    gathers)."""
    from hierarchy_cases import simulate_nodes

    out = {
        "parity": parity(PARITY_FOUR),
        "int8": reductions(2, "fp32", steps=2, gradients=INT8),
        "traffic": _traffic_cases(),
    }
    simulate_nodes(2)
    out["nodes"] = {
        "parity": parity(PARITY_NODES),
        "int8": reductions(2, "fp32", steps=2, gradients=INT8),
        "int8 one hop": reductions(2, "fp32", steps=2, gradients={**INT8, "two_hop": False}),
        "traffic": _traffic_cases(),
        "traffic one hop": traffic(2, "bf16", gradients={**INT8, "block_size": 256,
                                                         "two_hop": False}),
        "qwZ hierarchical": quantized_weights(hierarchical_allgather=True),
    }
    return out

