"""What each rank runs in tests/test_scaling.py: real training steps at each stage, with
zero_ext.comm's traffic counters read over one steady-state step, beside the scaling model's
plan of that step for the same model (built on the meta device) and config. 4 ranks as 2
simulated nodes x 2 (tests/hierarchy_cases.py), so hpZ and hierarchical gathers run too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hierarchy_cases import simulate_nodes
from torch import nn

import zero_ext
from zero_ext import comm, scaling
from zero_ext.scaling_measure import measure_network

VOCAB, DIM, SEQ, MICRO = 41, 20, 6, 2


class Stack(nn.Module):
    """An embedding tied to the head, a stack of odd-sized blocks (stage-3 units), a final norm
    on the root (kept whole at stage 3)."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 3 * DIM - 1),
                                                  nn.GELU(), nn.Linear(3 * DIM - 1, DIM))
                                    for _ in range(layers))
        self.final = nn.Parameter(torch.ones(DIM))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x * self.final).float()
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


# (stage, dtype, accumulation, extra keys): every gradient path and the post-step gathers cut
# into pieces (stage 1), an fp32 reduction of a bf16 model (stage 2), units and whole
# parameters side by side (stage 3).
CASES = {
    "stage0": (0, "fp32", 1, {}),
    "stage1_accumulating": (1, "fp32", 2, {"allgather_bucket_size": 300}),
    "stage2_bf16_fp32_reduce": (2, "bf16", 2, {}),
    "stage3": (3, "fp32", 1, {"stage3_param_persistence_threshold": 30}),
    "stage3_accumulating": (3, "bf16", 2, {"stage3_param_persistence_threshold": 0}),
    "stage3_hpz": (3, "bf16", 1, {"stage3_param_persistence_threshold": 30,
                                  "zero_hpz_partition_size": 2}),
    "stage3_hierarchical": (3, "fp32", 1, {"stage3_param_persistence_threshold": 30,
                                           "hierarchical_allgather": True}),
    "stage1_hierarchical": (1, "fp32", 1, {"hierarchical_allgather": True}),
    # Compressed communication (a fifth element: zero_ext.compression): int8 gradients in two
    # hops and int8 weights at stage 3 (blocks that do not divide the chunks: padded rows),
    # int4 flat at stage 2, top-k at stages 0 and 1.
    "stage3_int8_two_hop_qwz": (3, "bf16", 1, {"stage3_param_persistence_threshold": 30}, {
        "gradients": {"method": "int8", "error_feedback": True, "block_size": 48},
        "weights": {"method": "int8", "block_size": 40}}),
    "stage2_int4_flat": (2, "bf16", 2, {}, {
        "gradients": {"method": "int4", "two_hop": False, "block_size": 64}}),
    "stage0_topk": (0, "fp32", 1, {}, {"gradients": {"method": "topk", "density": 0.05}}),
    "stage1_topk": (1, "bf16", 1, {}, {"gradients": {"method": "topk", "density": 0.05}}),
}
PER_NODE = 2


def config(stage: int, dtype: str, accumulation: int, world_size: int, **zero) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accumulation,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 700, **zero},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
        if stage == 2:
            cfg["communication_data_type"] = "fp32"
    return cfg


def measured_and_planned(name: str) -> dict:
    """Traffic of the second optimizer step of a real run, and the plan's, on this rank."""
    stage, dtype, accumulation, zero, *compression = CASES[name]
    world_size, rank = comm.world_size(), comm.rank()
    cfg = config(stage, dtype, accumulation, world_size, **zero)
    if compression:
        cfg["zero_ext"] = {"compression": compression[0]}
    torch.manual_seed(0)
    engine, _, _, _ = zero_ext.initialize(model=Stack(), config=cfg)
    generator = torch.Generator().manual_seed(1)
    for step in range(2):
        if step == 1:
            comm.traffic.reset()
        for _ in range(accumulation):
            tokens = torch.randint(0, VOCAB, (world_size, MICRO, SEQ + 1), generator=generator)
            loss = engine(tokens[rank, :, :-1], tokens[rank, :, 1:])
            engine.backward(loss)
            engine.step()
    measured = comm.traffic.snapshot()
    with torch.device("meta"):
        model = Stack()
    plan = scaling.plan_step(model, cfg, world_size, gpus_per_node=PER_NODE)
    planned = scaling.planned_traffic(plan, world_size)
    return {"measured": measured, "planned": planned}


def network_fit() -> dict:
    """The shipped network benchmark on this group, at small sizes."""
    return measure_network(sizes=(2**12, 2**16, 2**18), min_seconds=0.01, min_runs=2,
                           max_runs=4)


def run_cases() -> dict:
    simulate_nodes(PER_NODE)
    out = {name: measured_and_planned(name) for name in CASES}
    out["network"] = network_fit()
    return out
