"""What each rank runs in the estimator tests: an engine per case, measured with
engine.memory_breakdown() at the moments zero_ext.estimate describes, beside the estimate of the
same model built on the meta device from the same config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import zero_ext
from zero_ext import comm
from zero_ext.estimate import estimate_from_config

from engine_cases import DIM, VOCAB, config, global_batch, param_groups, run

WIDTHS = (29, 13, 41)  # uneven blocks: stage-3 units of different sizes
PERSISTENCE = 30       # norms and the narrower biases stay whole at stage 3
PREFETCH = 600         # elements; smaller than a block: prefetch fetches the next one only
STEPS = 2              # the second step prefetches in the order the first recorded


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, width)
        self.down = nn.Linear(width, DIM)

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    """Every kind of parameter the estimator must place: a head tied to the embedding (kept
    whole at stage 3), blocks of uneven widths in a ModuleList (the units), a parameter on the
    root (whole), a frozen one (outside the engine's buffers), and parameters below the
    persistence threshold. Every trainable parameter gets a gradient each step."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(w) for w in WIDTHS)
        self.gain = nn.Parameter(torch.ones(DIM))
        self.shift = nn.Parameter(torch.randn(DIM) * 0.1, requires_grad=False)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens, targets):
        x = self.embed(tokens) + self.shift
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x * self.gain).float()
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


# zero_ext.compression sections by name (a sixth element of a case).
COMPRESSION = {
    "int8_ef": {"gradients": {"method": "int8", "error_feedback": True}},
    "int4": {"gradients": {"method": "int4"}},
    "topk": {"gradients": {"method": "topk", "momentum": 0.9}},
    "topk_no_momentum": {"gradients": {"method": "topk", "momentum": 0.0}},
}


# data_types sections by name (a sixth element of a case, in place of a compression name).
DATA_TYPES = {"fp32_accum": {"grad_accum_dtype": "fp32"}}


def case_config(stage: int, dtype: str, accumulation: int, comm_dtype: str | None,
                offload: str | None, compression: str | None = None) -> dict:
    """engine_cases.config with this module's stage-3 keys; `offload` is None, "optimizer",
    "ratio" (half the optimizer state offloaded), "param" (parameters only) or "both"
    (optimizer and parameters);
    `compression` names a COMPRESSION section (or a DATA_TYPES one)."""
    cfg = config(stage, dtype, accumulation, comm.world_size(),
                 stage3_param_persistence_threshold=PERSISTENCE,
                 stage3_prefetch_bucket_size=PREFETCH)
    if comm_dtype is not None:
        cfg["communication_data_type"] = comm_dtype
    if offload not in (None, "param"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if offload == "ratio":
        cfg["zero_optimization"]["offload_optimizer"]["ratio"] = 0.5
    if offload in ("both", "param"):
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    if compression in DATA_TYPES:
        cfg["data_types"] = DATA_TYPES[compression]
    elif compression is not None:
        cfg["zero_ext"] = {"compression": COMPRESSION[compression]}
    return cfg


def build(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack()


def measure(stage: int, dtype: str, accumulation: int, comm_dtype: str | None,
            offload: str | None, compression: str | None = None) -> dict:
    """The estimate (of a meta-device model and of the real one) and what the engine holds:
    grads after every engine.backward of the second step (before its engine.step), the rest
    after that step; at stage 3 also the parameter bytes seen inside forward and backward."""
    world_size, rank = comm.world_size(), comm.rank()
    cfg = case_config(stage, dtype, accumulation, comm_dtype, offload, compression)
    with torch.device("meta"):
        meta = build()
    estimate = estimate_from_config(meta, cfg, world_size, param_groups=param_groups(meta))
    model = build()
    groups = param_groups(model)
    same_for_real_model = estimate == estimate_from_config(model, cfg, world_size,
                                                           param_groups=groups)
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg, model_parameters=groups)
    seen = []

    def sample(*_):
        seen.append(engine.memory_breakdown()["params"])

    def after_forward(module, args, out):
        sample()
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(sample)

    if stage == 3:
        for module in model.modules():
            module.register_forward_pre_hook(sample)
            module.register_forward_hook(after_forward)
    grads = []
    for step in range(STEPS):
        tokens, targets = global_batch(step, world_size, accumulation)
        grads.clear()
        for micro in range(accumulation):
            engine.backward(run(engine, tokens[micro, rank], targets[micro, rank]))
            grads.append(engine.memory_breakdown()["grads"])
            engine.step()
    after_step = engine.memory_breakdown()
    by_location = engine.memory_by_location() if offload is not None else None
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    unit_numels = [u.numel for u in engine.partitioned.units] if engine.partitioned else []
    return {"estimate": estimate, "same_for_real_model": same_for_real_model, "grads": grads,
            "after_step": after_step, "by_location": by_location, "frozen": frozen,
            "params_seen": seen,
            "largest_unit": max(unit_numels, default=0),
            "second_unit": sorted(unit_numels)[-2] if len(unit_numels) > 1 else 0}


def estimate_cases(cases: list[tuple]) -> dict:
    return {case: measure(*case) for case in cases}
