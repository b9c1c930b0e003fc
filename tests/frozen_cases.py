"""Stage 3 with frozen parameters (a LoRA fine-tune): the frozen base weights are partitioned
like the trained ones, gathered around their unit's forward and backward, and released once
backward has computed their inputs' gradients. Run by tests/test_frozen_stage3.py, one process
group per world size; qlora_cases does the same for a QLoRA base's 4-bit weights."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import zero_ext
from zero_ext import comm
from zero_ext.estimate import estimate_from_config

VOCAB, DIM, RANK, SEQ, MICRO, STEPS = 37, 24, 4, 5, 2, 4
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


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


class Body(nn.Module):
    """A frozen embedding, three blocks, a frozen final norm: a unit holding units (as a
    PeftModel's base_model holds the model), whose own forward the model bypasses, calling its
    parts directly (as PEFT does), so its frozen parameters need units of their own."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.norm = nn.LayerNorm(DIM)

    def forward(self, tokens):
        raise AssertionError("bypassed, as PeftModel bypasses its base_model's forward")


class LoraNet(nn.Module):
    """The body's blocks: block 1 entirely frozen (a unit with no gradients of its own, whose
    input gradients still flow), block 2 training only its adapters (whose gradients are
    reduced before backward reaches its base weight's input-gradient matmul); a trainable
    head. `checkpoint`: None, or "reentrant" / "non_reentrant" activation checkpointing of
    each block. `input_grads`: the embedding's output requires grad (as transformers'
    enable_input_require_grads sets it for reentrant checkpointing)."""

    def __init__(self, checkpoint: str | None = None, input_grads: bool = True):
        super().__init__()
        self.checkpoint, self.input_grads = checkpoint, input_grads
        self.body = Body()
        self.head = nn.Linear(DIM, VOCAB)
        for name, param in self.named_parameters():
            if name.startswith(("body.embed.", "body.norm.", "body.blocks.1.",
                                "body.blocks.2.norm.")) or ".base." in name or ".out." in name:
                param.requires_grad_(False)
        self.seen_in_backward: list[int] = []  # gathered units when backward reaches embed

    def forward(self, tokens, targets):
        x = self.body.embed(tokens)
        if self.input_grads:
            x = x.requires_grad_(torch.is_grad_enabled())
            if torch.is_grad_enabled() and hasattr(self, "engine_units"):
                # Runs after the first block's input hooks (they are on x * 1.0).
                x.register_hook(self._count_gathered)
            x = x * 1.0
        self.embedded = x  # what an adversarial step takes the gradient of
        for block in self.body.blocks:
            if self.checkpoint is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, use_reentrant=self.checkpoint == "reentrant")
        return F.cross_entropy(self.head(self.body.norm(x)).view(-1, VOCAB), targets.view(-1))

    def _count_gathered(self, grad):
        self.seen_in_backward.append(
            sum(u.state.value != "sharded" for u in self.engine_units()))
        return grad


class CrossNet(LoraNet):
    """Every block also takes the embedding's output through a frozen linear of its own (a
    decoder block's cross-attention on the encoder's output, as in T5): that tensor's gradient
    completes only with the first block's backward. `later_gathered`: per block, once backward
    computed the gradient of its input x, how many of it and the blocks after it are still
    gathered (hooked after the engine's hooks, by `watch`). `in_place`: the second block halves
    that input in place first (legal: no one saved it), as a block may modify its inputs."""

    def __init__(self, in_place: bool = False):
        super().__init__()
        self.in_place = in_place
        for i, block in enumerate(self.body.blocks):
            block.cross = nn.Linear(DIM, DIM).requires_grad_(False)
            block.forward = functools.partial(self._cross_forward, block, in_place and i == 1)
        self.later_gathered: list[int] = []

    @staticmethod
    def _cross_forward(block, halves, x, memory):
        if halves:
            memory.mul_(0.5)
        return Block.forward(block, x) + block.cross(memory)

    def forward(self, tokens, targets):
        memory = self.body.embed(tokens).requires_grad_(torch.is_grad_enabled()) * 1.0
        x = memory * 1.0 if self.in_place else memory
        for block in self.body.blocks:
            x = block(x, memory)
        return F.cross_entropy(self.head(self.body.norm(x)).view(-1, VOCAB), targets.view(-1))

    def watch(self, units) -> None:
        blocks = self.body.blocks
        for i, block in enumerate(blocks):
            later = {id(b) for b in blocks[i:]}

            def count(grad, later=later):
                self.later_gathered.append(sum(u.state.value != "sharded" for u in units
                                               if id(u.module) in later))

            def hook(module, args, count=count):
                if torch.is_grad_enabled():
                    args[0].register_hook(count)

            block.register_forward_pre_hook(hook)


def _config(world_size: int, **zero) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  **zero},
            "steps_per_print": 10**6}


def _batch(step: int, world_size: int):
    gen = torch.Generator().manual_seed(500 + step)
    shape = (world_size * MICRO, SEQ)
    return torch.randint(0, VOCAB, shape, generator=gen), \
        torch.randint(0, VOCAB, shape, generator=gen)


def _build(checkpoint=None, input_grads: bool = True) -> LoraNet:
    torch.manual_seed(0)
    return LoraNet(checkpoint, input_grads)


def _build_cross(in_place: bool = False) -> CrossNet:
    torch.manual_seed(0)
    return CrossNet(in_place)


def _engine(model: LoraNet, world_size: int, config: dict | None = None):
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = zero_ext.initialize(model=model, config=config or _config(world_size),
                                          model_parameters=trainable)
    model.engine_units = lambda: engine.partitioned.units
    return engine


def _train(engine, steps: range, world_size: int, rank: int,
           grad_first: bool = False) -> list[list[int]]:
    """Trains; returns, per step, the units still gathered after backward and after step.
    `grad_first`: each step first takes torch.autograd.grad of a forward's loss (as an
    adversarial-perturbation step does), which must change nothing."""
    left = []
    for step in steps:
        tokens, targets = _batch(step, world_size)
        mine = slice(rank * MICRO, (rank + 1) * MICRO)
        if grad_first:
            loss = engine(tokens[mine], targets[mine])
            torch.autograd.grad(loss, [engine.module.embedded])
        engine.backward(engine(tokens[mine], targets[mine]))
        after_backward = sum(u.state.value != "sharded" for u in engine.partitioned.units)
        engine.step()
        left.append([after_backward,
                     sum(u.state.value != "sharded" for u in engine.partitioned.units)])
    return left


def _reference(world_sizes: list[int], build=_build) -> dict[str, torch.Tensor]:
    """Single-process training on the whole batch of each step (its global batch at the
    step's world size), torch AdamW."""
    model = build()
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
            # A frozen part of the body runs outside any forward (as generate() calls a
            # PeftModel's embedding): its own unit is gathered around it.
            tokens, _ = _batch(0, world_size)
            with torch.no_grad():
                out["embedded_outside"] = model.body.embed(tokens).cpu()
            out["tokens"] = tokens
            if save_dir is not None:
                engine.save_checkpoint(save_dir, tag="frozen")
                engine.save_checkpoint(save_dir, tag="excluded", exclude_frozen_parameters=True)
                path = os.path.join(save_dir, "16bit")
                engine.save_16bit_model(path)
                out["saved"] = engine.full_state_dict()
    out.update(_special_cases(world_size, rank))
    out["qlora"] = qlora_cases(save_dir, load_dir) if HAS_BITSANDBYTES else None
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
        # Saved without the frozen shards: they keep the model's values, the rest loads.
        model = _build()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)
        engine = _engine(model, world_size)
        engine.load_checkpoint(load_dir, tag="excluded")
        out["loaded_excluded"] = engine.full_state_dict()
        # A block frozen when saved and trained now: its saved values, fresh moments.
        model = _build()
        model.body.blocks[1].requires_grad_(True)
        engine = _engine(model, world_size)
        engine.load_checkpoint(load_dir, tag="frozen")
        out["loaded_unfrozen"] = engine.full_state_dict()
    if rank == 0:
        return out
    return {"left": out["trained_None"]["left"], "gathered_raise": out["gathered_raise"],
            "modifier_raise": out["modifier_raise"],
            "threshold_left": out["threshold_left"], "grad_first_left": out["grad_first_left"],
            "cross_left": out["cross_left"], "qlora": out["qlora"],
            "stale_eval": out["stale_eval"], "data_assigned": out["data_assigned"]}


class WeightNormNet(nn.Module):
    """Blocks under torch's weight_norm (a vocoder's layout): a forward pre-hook of the model's
    own, registered before initialize, that reads each block's weights."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's: weight_norm is deprecated
            self.blocks = nn.ModuleList(nn.utils.weight_norm(nn.Linear(DIM, DIM))
                                        for _ in range(6))
        self.head = nn.Linear(DIM, VOCAB)
        self.gathered: list[int] = []  # units gathered after each block's forward

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
            units = getattr(self, "engine_units", None)
            if units is not None:
                self.gathered.append(sum(u.state.value != "sharded" for u in units()))
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def _build_weight_norm() -> WeightNormNet:
    torch.manual_seed(0)
    return WeightNormNet()


def _special_cases(world_size: int, rank: int) -> dict:
    out = {}
    # weight_norm's pre-hook runs after the unit's gather: each block is gathered for its own
    # forward and released after, within the live limit (run first, on the released weights,
    # it gathered every block and held all of them to the end of the forward).
    model = _build_weight_norm()
    unit = sum(p.numel() for p in model.blocks[0].parameters())
    engine = _engine(model, world_size, _config(world_size, stage3_max_live_parameters=2 * unit,
                                                stage3_prefetch_bucket_size=unit))
    _train(engine, range(STEPS), world_size, rank)
    out["weight_norm"] = dict(got=engine.full_state_dict(), gathered=max(model.gathered),
                              reference=_reference([world_size] * STEPS, _build_weight_norm))
    # Small trainable parameters kept whole (norms, LoRA matrices under the threshold) need
    # the frozen base weights' backward: with the embedding's output not requiring grad, no
    # input gradient tells when the first block's backward ends.
    model = _build(input_grads=False)
    engine = _engine(model, world_size, _config(world_size,
                                                stage3_param_persistence_threshold=50))
    out["threshold_left"] = _train(engine, range(STEPS), world_size, rank)
    out["threshold"] = engine.full_state_dict()
    # An input every block takes (an encoder's output): each block is released once its own
    # share of that input's gradient is computed, not after the first block's backward.
    model = _build_cross()
    engine = _engine(model, world_size)
    model.watch(engine.partitioned.units)
    out["cross_left"] = _train(engine, range(STEPS), world_size, rank)
    out["cross"] = dict(got=engine.full_state_dict(), later=model.later_gathered,
                        reference=_reference([world_size] * STEPS, _build_cross))
    engine = _engine(_build_cross(in_place=True), world_size)
    _train(engine, range(STEPS), world_size, rank)
    out["cross_in_place"] = dict(
        got=engine.full_state_dict(),
        reference=_reference([world_size] * STEPS, functools.partial(_build_cross, True)))
    # torch.autograd.grad through the model before each engine.backward ends no backward.
    model = _build()
    engine = _engine(model, world_size)
    out["grad_first_left"] = _train(engine, range(STEPS), world_size, rank, grad_first=True)
    out["grad_first"] = engine.full_state_dict()
    # An evaluation forward with autograd on and no backward: the next backward cannot tell it
    # from a forward it will still reach, so the frozen units stay gathered to its end; rank 0
    # says so once, with the count (and never in the steps around it).
    model = _build()
    engine = _engine(model, world_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(engine, range(1), world_size, rank)
        tokens, targets = _batch(9, world_size)
        engine(tokens[rank * MICRO:(rank + 1) * MICRO], targets[rank * MICRO:(rank + 1) * MICRO])
        _train(engine, range(1, 4), world_size, rank)
    out["stale_eval"] = dict(seen=model.seen_in_backward, warnings=[
        str(w.message) for w in caught if "stayed gathered" in str(w.message)])
    # The estimator, for a bf16 run of the fp32-built model, and for fp32 with both offloads.
    for name, extra in (("bf16", {"bf16": {"enabled": True}}),
                        ("offload", {"zero_optimization": {
                            "stage": 3, "stage3_param_persistence_threshold": 0,
                            "offload_param": {"device": "cpu"},
                            "offload_optimizer": {"device": "cpu"}}})):
        config = {**_config(world_size), **extra}
        engine = _engine(_build(), world_size, config)
        estimate = estimate_from_config(_build(), config, world_size)
        out[f"estimate_{name}"] = (estimate.device.params + estimate.host.params,
                                   estimate.host.total,
                                   engine.memory_breakdown()["params"],
                                   engine.memory_by_location()["host"])
    # A rank raising inside GatheredParameters: the others raise too, instead of waiting in
    # the context's exit for it.
    model = _build()
    engine = _engine(model, world_size)
    try:
        with zero_ext.GatheredParameters([model.body.embed.weight]):
            if rank == 0:
                raise KeyError("raised on rank 0 inside")
    except (KeyError, RuntimeError) as error:
        out["gathered_raise"] = f"{type(error).__name__}: {error}"
    # The same where rank 0 modifies a parameter kept whole and rank 1 raises: every rank
    # keeps rank 0's value (rank 0 kept it alone before).
    model = _build()
    engine = _engine(model, world_size, _config(world_size,
                                                stage3_param_persistence_threshold=1000))
    whole = model.body.blocks[0].norm.weight
    try:
        with zero_ext.GatheredParameters([whole], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    whole.fill_(7.0)
            else:
                raise KeyError("raised on rank 1 inside")
    except (KeyError, RuntimeError):
        pass
    out["modifier_raise"] = whole.detach().clone()
    # A frozen weight of the body that two of its modules hold (an output projection tied to
    # the embedding, as a PeftModel's base_model holds both) stays whole: the projection's
    # forward, outside the model's (as generate() runs it), reads it.
    model = _build()
    model.body.tied = nn.Linear(DIM, VOCAB, bias=False)
    model.body.tied.weight = model.body.embed.weight
    _engine(model, world_size)
    with torch.no_grad():
        out["tied_head"] = model.body.tied(torch.ones(1, DIM)).cpu()
    out["tied_embed"] = model.body.embed.weight.detach().clone()
    out["data_assigned"] = _data_assigned(world_size, rank)
    return out


def _assigned_values(name: str, param: torch.Tensor) -> torch.Tensor:
    """What the modifier rank assigns to `name` with `param.data = ...` (a loaded weight)."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(param.shape, generator=gen, dtype=param.dtype)


def _build_assigned(names: list[str]) -> LoraNet:
    model = _build(input_grads=False)
    with torch.no_grad():
        for name in names:
            param = model.get_parameter(name)
            param.copy_(_assigned_values(name, param))
    return model


# Partitioned trainable and frozen weights, a trainable norm kept whole in a persistent bucket
# (threshold 50), and a frozen norm kept whole outside any bucket.
_ASSIGNED = ["head.weight", "body.blocks.1.fc.base.weight", "body.blocks.0.norm.weight",
             "body.blocks.2.norm.weight"]


def _data_assigned(world_size: int, rank: int) -> dict:
    """`param.data = tensor` after initialize: inside GatheredParameters(modifier_rank=0) the
    modifier's tensor is every rank's (the other ranks assign other values); inside a
    read-only one (rank 0 assigns) and on a released parameter it is an error on every rank
    (it was thrown away silently: the next gather read the old shards)."""
    out = {}
    model = _build(input_grads=False)
    engine = _engine(model, world_size, _config(world_size,
                                                stage3_param_persistence_threshold=50))
    params = [model.get_parameter(name) for name in _ASSIGNED]
    with zero_ext.GatheredParameters(params, modifier_rank=0):
        for name, param in zip(_ASSIGNED, params):
            param.data = _assigned_values(name, param) if rank == 0 else \
                torch.zeros_like(param)
    kept = engine.full_state_dict()
    out["modifier"] = {name: kept[name] for name in _ASSIGNED}
    _train(engine, range(STEPS), world_size, rank)
    out["modifier_trained"] = engine.full_state_dict()
    if rank == 0:
        out["modifier_reference"] = _reference(
            [world_size] * STEPS, functools.partial(_build_assigned, _ASSIGNED))
    before = engine.full_state_dict()
    weight = model.body.blocks[2].out.weight
    try:
        with zero_ext.GatheredParameters([weight]):
            if rank == 0:
                weight.data = torch.ones_like(weight)
        out["read_only"] = "no error"
    except RuntimeError as error:
        out["read_only"] = str(error)
    # Another shape under a modifier rank: dropped on every rank, the rest of its changes kept.
    try:
        with zero_ext.GatheredParameters([weight, model.head.bias], modifier_rank=0):
            if rank == 0:
                weight.data = torch.ones(DIM, 2)
                model.head.bias.data.fill_(3.0)
        out["misfit"] = "no error"
    except RuntimeError as error:
        out["misfit"] = str(error)
    try:
        weight.data = torch.ones(DIM, DIM)
        out["released"] = "no error"
    except RuntimeError as error:
        out["released"] = str(error)
    out["released_numel"] = weight.numel()
    after = engine.full_state_dict()
    out["unchanged"] = [name for name, value in before.items()
                        if name != "head.bias" and torch.equal(after[name], value)]
    out["names"] = sorted(before)
    out["bias"] = after["head.bias"]
    return out



def qlora_cases(save_dir: str | None = None, load_dir: str | None = None) -> dict:
    """QLoRA at stage 3, the base's 4-bit codes stored in the training dtype
    (bnb_4bit_quant_storage), fp32 and bf16: training as at stage 2 (which keeps the base
    whole), the bytes of codes each rank holds, evaluation and generate() with the base
    partitioned, the estimator, and (bf16) a checkpoint saved to `save_dir` and loaded from
    `load_dir` (saved there at another world size)."""
    out = {name: _qlora(dtype, save_dir, load_dir) for name, dtype in (
        ("fp32", torch.float32), ("bf16", torch.bfloat16))}
    out["uint8_warnings"] = _qlora(torch.uint8, save_dir, load_dir)
    return out


def _qlora(dtype: torch.dtype, save_dir: str | None = None, load_dir: str | None = None):
    """One QLoRA run per stage (see qlora_cases); `dtype` uint8: the warning a bf16 engine
    gives for codes stored in uint8 (kept whole)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft_script import LORA, quantized_base

    world_size, rank = comm.world_size(), comm.rank()
    vocab, scratch = 64, os.path.join(save_dir or load_dir, f"qlora_{world_size}")
    config = {**_config(world_size), "bf16": {"enabled": dtype != torch.float32}}

    def build(storage=dtype):  # in training mode, as Trainer puts it (from_pretrained: eval)
        torch.manual_seed(0)
        return get_peft_model(quantized_base(vocab, scratch, storage), LoraConfig(**LORA)).train()

    def engine_for(model, stage):
        zero = {**config["zero_optimization"], "stage": stage}
        return _engine(model, world_size, {**config, "zero_optimization": zero})

    if dtype == torch.uint8:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine_for(build(), 3)
        return [str(w.message) for w in caught if "quant_storage" in str(w.message)]

    def batch(step):
        tokens = torch.randint(0, vocab, (world_size * MICRO, 12),
                               generator=torch.Generator().manual_seed(700 + step))
        return tokens[rank * MICRO:(rank + 1) * MICRO]

    def split(engine):  # the 4-bit codes (bit for bit) and the adapters of a full state dict
        state = engine.full_state_dict()
        codes = {k: state[k].view(torch.uint8) for k, p in engine.module.named_parameters()
                 if type(p).__name__ == "Params4bit"}
        return codes, {k: v.float() for k, v in state.items() if "lora" in k}

    def gathered(engine):
        return sum(u.state.value != "sharded" for u in engine.partitioned.units) \
            if engine.partitioned is not None else 0

    out = {}
    for stage in (2, 3):
        model = build()
        engine = engine_for(model, stage)
        packed = {id(p) for p in model.parameters() if type(p).__name__ == "Params4bit"}
        # Bytes of 4-bit codes this rank holds: whole parameters, and its part of each shard.
        held = sum(p.numel() * p.element_size() for p in model.parameters()
                   if id(p) in packed)
        for param, layout, slot in engine.bucket_slots():
            if id(param) in packed and stage == 3:
                start, end = layout.shard_range(rank)
                overlap = min(end, slot.offset + slot.numel) - max(start, slot.offset)
                held += max(overlap, 0) * param.element_size()
        losses, left = [], []
        for step in range(STEPS):
            tokens = batch(step)
            loss = engine(input_ids=tokens, labels=tokens).loss
            engine.backward(loss)
            after_backward = gathered(engine)
            engine.step()
            left.append([after_backward, gathered(engine)])
            losses.append(loss.item())
        tokens = batch(STEPS)
        with torch.no_grad():  # training mode: bitsandbytes' own kernel, not its CPU repacking
            logits = engine(input_ids=tokens).logits.float()
        engine.eval()
        with torch.no_grad():
            eval_logits = engine(input_ids=tokens).logits.float()
        generated = model.generate(input_ids=tokens[:1, :4], max_new_tokens=4, do_sample=False)
        engine.train()
        codes, adapters = split(engine)
        out[stage] = {"losses": losses, "left": left, "logits": logits, "codes": codes,
                      "eval_logits": eval_logits, "generated": generated, "held": held,
                      "adapters": adapters, "monitor": engine.monitor.model_params}
        if stage == 3:
            out[stage].update(
                estimated=estimate_from_config(build(), config, world_size).device.params,
                params_bytes=engine.memory_breakdown()["params"])
            if save_dir is not None and dtype == torch.bfloat16:
                engine.save_checkpoint(save_dir, tag="qlora")
    if load_dir is not None and dtype == torch.bfloat16:
        model = build()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora" in name:
                    param.add_(1.0)
        engine = engine_for(model, 3)
        engine.load_checkpoint(load_dir, tag="qlora")
        out["loaded"], out["loaded_adapters"] = split(engine)
    return out
