"""Stage 3 with frozen parameters (a LoRA fine-tune): the frozen base weights are partitioned
like the trained ones, gathered around their unit's forward and backward, and released once
backward has computed their inputs' gradients. Run by tests/test_frozen_stage3.py, one process
group per world size."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import zero_ext
from zero_ext import comm
from zero_ext.estimate import estimate_from_config

VOCAB, DIM, RANK, SEQ, MICRO, STEPS = 37, 24, 4, 5, 2, 4


class LoraLinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update, as PEFT's LoRA layer."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(DIM, DIM)
        self.A = nn.Linear(DIM, RANK, bias=False)
        self.B = nn.Linear(RANK, DIM, bias=False)
        nn.init.normal_(self.B.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc = LoraLinear()
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + self.out(torch.tanh(self.fc(self.norm(x))))


class LoraNet(nn.Module):
    """A frozen embedding, three blocks (block 1 entirely frozen: a unit with no gradients of
    its own, whose input gradients still flow; block 2 trains only its adapters, whose
    gradients are reduced before backward reaches its base weight's input-gradient matmul),
    a trainable head. `checkpoint`: None, or
    "reentrant" / "non_reentrant" activation checkpointing of each block (the embedding's
    output then requires grad, as transformers' enable_input_require_grads sets it)."""

    def __init__(self, checkpoint: str | None = None):
        super().__init__()
        self.checkpoint = checkpoint
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(DIM, VOCAB)
        for name, param in self.named_parameters():
            if name.startswith(("embed.", "blocks.1.", "blocks.2.norm.")) or ".base." in name \
                    or ".out." in name:
                param.requires_grad_(False)
        self.seen_in_backward: list[int] = []  # gathered units when backward reaches embed

    def forward(self, tokens, targets):
        # Its output requires grad, as transformers' enable_input_require_grads sets it for
        # reentrant checkpointing; the hook on it runs after the first block's input hooks.
        x = self.embed(tokens).requires_grad_(torch.is_grad_enabled())
        if torch.is_grad_enabled() and hasattr(self, "engine_units"):
            x.register_hook(self._count_gathered)
        x = x * 1.0
        for block in self.blocks:
            if self.checkpoint is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, use_reentrant=self.checkpoint == "reentrant")
        return F.cross_entropy(self.head(x).view(-1, VOCAB), targets.view(-1))

    def _count_gathered(self, grad):
        self.seen_in_backward.append(
            sum(u.state.value != "sharded" for u in self.engine_units()))
        return grad


def _config(world_size: int) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "steps_per_print": 10**6}


def _batch(step: int, world_size: int):
    gen = torch.Generator().manual_seed(500 + step)
    shape = (world_size * MICRO, SEQ)
    return torch.randint(0, VOCAB, shape, generator=gen), \
        torch.randint(0, VOCAB, shape, generator=gen)


def _build(checkpoint=None) -> LoraNet:
    torch.manual_seed(0)
    return LoraNet(checkpoint)


def _engine(model: LoraNet, world_size: int):
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = zero_ext.initialize(model=model, config=_config(world_size),
                                          model_parameters=trainable)
    model.engine_units = lambda: engine.partitioned.units
    return engine


def _train(engine, steps: range, world_size: int, rank: int) -> list[list[int]]:
    """Trains; returns, per step, the units still gathered after backward and after step."""
    left = []
    for step in steps:
        tokens, targets = _batch(step, world_size)
        mine = slice(rank * MICRO, (rank + 1) * MICRO)
        engine.backward(engine(tokens[mine], targets[mine]))
        after_backward = sum(u.state.value != "sharded" for u in engine.partitioned.units)
        engine.step()
        left.append([after_backward,
                     sum(u.state.value != "sharded" for u in engine.partitioned.units)])
    return left


def _reference(world_sizes: list[int]) -> dict[str, torch.Tensor]:
    """Single-process training on the whole batch of each step (its global batch at the
    step's world size), torch AdamW."""
    model = _build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            weight_decay=0.0)
    for step, world_size in enumerate(world_sizes):
        opt.zero_grad()
        model(*_batch(step, world_size)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def frozen_cases(save_dir: str | None = None, load_dir: str | None = None,
                 saved_world_size: int | None = None) -> dict:
    """Training against the reference with and without activation checkpointing, what a rank
    holds, the estimator's figure, and a checkpoint saved to `save_dir` / loaded from
    `load_dir` (saved there at `saved_world_size` ranks)."""
    world_size, rank = comm.world_size(), comm.rank()
    out = {"reference": _reference([world_size] * STEPS)}
    for checkpoint in (None, "reentrant", "non_reentrant"):
        model = _build(checkpoint)
        engine = _engine(model, world_size)
        left = _train(engine, range(STEPS), world_size, rank)
        out[f"trained_{checkpoint}"] = dict(
            got=engine.full_state_dict(), left=left, seen=model.seen_in_backward)
        if checkpoint is None:
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            out["frozen_partitioned"] = [
                n for n in frozen if model.get_parameter(n).numel() == 0]
            out["frozen_names"] = frozen
            out["params_bytes"] = engine.memory_breakdown()["params"]
            out["monitor"] = (engine.monitor.model_params, engine.monitor.trainable_params)
            out["estimated_params"] = estimate_from_config(
                _build(), _config(world_size), world_size).device.params
            out["frozen_shard_numel"] = sum(
                layout.shard_numel for layout in engine.frozen_layouts)
            out["frozen_padded_numel"] = sum(
                layout.padded_numel for layout in engine.frozen_layouts)
            if save_dir is not None:
                engine.save_checkpoint(save_dir, tag="frozen")
                path = os.path.join(save_dir, "16bit")
                engine.save_16bit_model(path)
                out["saved"] = engine.full_state_dict()
    if load_dir is not None:
        # Saved at another world size: load, compare, and train on as the uninterrupted run.
        model = _build()
        with torch.no_grad():  # different starting values, which the load must replace
            for param in model.parameters():
                param.add_(1.0)
        engine = _engine(model, world_size)
        engine.load_checkpoint(load_dir, tag="frozen")
        out["loaded"] = engine.full_state_dict()
        _train(engine, range(STEPS, STEPS + 2), world_size, rank)
        out["resumed"] = engine.full_state_dict()
        out["reference_resumed"] = _reference([saved_world_size] * STEPS + [world_size] * 2)
        # The 16-bit model the other world size wrote, as pretrained weights.
        model = _build()
        engine = _engine(model, world_size)
        engine.load_weights(os.path.join(load_dir, "16bit"))
        out["pretrained"] = engine.full_state_dict()
    return out if rank == 0 else {"left": out["trained_None"]["left"]}
