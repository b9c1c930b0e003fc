"""Stage 3 with a mixture of experts whose routing differs between ranks: an expert runs only
where tokens are routed to it (transformers' Mixtral before 5.0, most research code), so one
rank runs experts another does not. Marked as a leaf module (zero_optimization.leaf_module,
zero_ext.set_z3_leaf_modules, or DeepSpeed's deepspeed.utils.set_z3_leaf_modules), the block is
gathered whole and reduced once its backward is over, the experts without a gradient counting
as zero, as DeepSpeed does. Run by tests/test_moe_stage3.py, one process group per world size;
rank 0 also trains the single-process references (torch AdamW on the whole batch, a gradient
that no token produced counted as zero, DeepSpeed's rule)."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

import zero_ext
from zero_ext import comm

VOCAB, DIM, EXPERTS, SEQ, MICRO, STEPS, LR = 29, 16, 4, 6, 2, 4, 1e-2


class Expert(nn.Module):
    """`borrowed`: a module of another unit whose weight the expert also uses (as a tied
    projection would), held in a list so that it is not registered as the expert's child."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)
        self.borrowed: list[nn.Module] = []

    def forward(self, x):
        out = self.down(F.gelu(self.up(x)))
        if self.borrowed:
            weight = self.borrowed[0].weight  # (VOCAB, DIM): the head's
            out = out + 0.1 * torch.tanh(x @ weight.t()) @ weight
        return out


class MoE(nn.Module):
    """Top-1 routing; an expert runs only on the tokens routed to it (none: not at all).
    `routed` records, per forward, how many tokens each expert got."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))
        self.routed: list[list[int]] = []

    def forward(self, x):
        flat = x.reshape(-1, DIM)
        weights = self.gate(flat).softmax(-1)
        top = weights.argmax(-1)
        out = torch.zeros_like(flat)
        counts = []
        for i, expert in enumerate(self.experts):
            index = (top == i).nonzero().flatten()
            counts.append(index.numel())
            if index.numel():
                out = out.index_add(0, index, expert(flat[index]) * weights[index, i, None])
        if torch.is_grad_enabled():
            self.routed.append(counts)
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.moe = MoE()

    def forward(self, x):
        return x + self.moe(self.norm(x))


class Net(nn.Module):
    """`checkpoint`: None, "reentrant" or "non_reentrant" activation checkpointing of each
    block. `gathered`: units still gathered when backward reaches the embedding's output.
    `twice`: the first block also runs first on the embedding's output detached (a forward of a
    leaf whose inputs need no gradient, its output feeding its second forward's input)."""

    def __init__(self, checkpoint: str | None = None, twice: bool = False):
        super().__init__()
        self.checkpoint, self.twice = checkpoint, twice
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(DIM, VOCAB)
        self.units = None
        self.gathered: list[int] = []

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        if self.twice:
            x = x + self.blocks[0](x.detach())
        if torch.is_grad_enabled() and self.units is not None:
            units = self.units
            x.register_hook(lambda grad: self.gathered.append(
                sum(u.state.value != "sharded" for u in units())))
        for block in self.blocks:
            if self.checkpoint is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, use_reentrant=self.checkpoint == "reentrant")
        return F.cross_entropy(self.head(x).view(-1, VOCAB), targets.view(-1))


def _build(checkpoint: str | None = None, twice: bool = False, frozen: bool = False,
           borrowing: bool = False) -> Net:
    """`frozen`: the experts' weights frozen, their biases trained (as LoRA trains small
    matrices beside a frozen base). `borrowing`: every expert also uses the head's weight."""
    torch.manual_seed(0)
    model = Net(checkpoint, twice)
    if borrowing:
        for block in model.blocks:
            for expert in block.moe.experts:
                expert.borrowed.append(model.head)
    if frozen:
        for name, param in model.named_parameters():
            if ".experts." in name and name.endswith(".weight"):
                param.requires_grad_(False)
    return model


def _batch(step: int, world_size: int, micro: int = MICRO):
    gen = torch.Generator().manual_seed(700 + step)
    shape = (world_size * micro, SEQ)
    return torch.randint(0, VOCAB, shape, generator=gen), \
        torch.randint(0, VOCAB, shape, generator=gen)


def _config(threshold: int = 0, accumulation: int = 1, **zero) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0,
            "gradient_accumulation_steps": accumulation,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold,
                                  **zero},
            "steps_per_print": 10**6}


def _step_with_zeros(opt: torch.optim.Optimizer) -> None:
    """torch AdamW's step with DeepSpeed's rule: a parameter no token reached has a zero
    gradient (torch would skip it), so its moments decay and its update goes on."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    opt.step()


def _reference(accumulation: int = 1, world_size: int | None = None,
               build=_build) -> dict[str, torch.Tensor]:
    """Single-process training on each step's whole batch; a parameter no token reached gets
    a zero gradient (DeepSpeed's rule: its moments decay, its update goes on)."""
    world_size = world_size or comm.world_size()
    model = build()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=LR, weight_decay=0.0)
    for step in range(STEPS):
        opt.zero_grad()
        tokens, targets = _batch(step, world_size, MICRO * accumulation)
        model(tokens, targets).backward()
        _step_with_zeros(opt)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(model: Net, config: dict, accumulation: int = 1) -> dict:
    world_size, rank = comm.world_size(), comm.rank()
    engine, *_ = zero_ext.initialize(model=model, config=config, model_parameters=[
        p for p in model.parameters() if p.requires_grad])
    units = engine.partitioned.units if engine.partitioned is not None else []
    model.units = lambda: units
    for step in range(STEPS):
        tokens, targets = _batch(step, world_size, MICRO * accumulation)
        for micro in range(accumulation):
            mine = slice((rank * accumulation + micro) * MICRO,
                         (rank * accumulation + micro + 1) * MICRO)
            # On the engine's device: tests/gpu_nccl_parity.py runs these on a GPU too.
            engine.backward(engine(tokens[mine].to(engine.device),
                                   targets[mine].to(engine.device)))
            engine.step()
    routed = [block.moe.routed for block in model.blocks]
    got = {name: value.cpu() for name, value in engine.full_state_dict().items()}
    return dict(got=got, gathered=model.gathered,
                units=len(units), leaves=[u.leaf for u in units],
                left=sum(u.state.value != "sharded" for u in units),
                routed=comm.all_gather_object(routed))


def _marked(how: str) -> Net:
    model = _build()
    if how == "zero_ext":
        zero_ext.set_z3_leaf_modules(model, [MoE])
    elif how == "deepspeed":
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, ["MoE"])
    return model


def _mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32, router_jitter_noise=0.0))


def _mixtral_case() -> dict:
    """transformers' Mixtral (its experts one module of 3-D weights, DeepSpeed's default leaf
    class): trained at stage 3 against torch AdamW on the whole batch."""
    world_size, rank = comm.world_size(), comm.rank()

    def step_loss(model, tokens):
        return model(input_ids=tokens, labels=tokens).loss

    reference = None
    if rank == 0:
        model = _mixtral()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        for step in range(STEPS):
            opt.zero_grad()
            tokens, _ = _batch(step, world_size)
            # The mean over each rank's tokens, averaged over the ranks: what the engine sees.
            sum(step_loss(model, part) for part in tokens.chunk(world_size)).div(
                world_size).backward()
            _step_with_zeros(opt)
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = _mixtral()
    engine, *_ = zero_ext.initialize(model=model, config=_config())
    for step in range(STEPS):
        tokens, _ = _batch(step, world_size)
        mine = tokens[rank * MICRO:(rank + 1) * MICRO]
        engine.backward(engine(input_ids=mine, labels=mine).loss)
        engine.step()
    names = {id(m): n for n, m in model.named_modules()}
    return dict(reference=reference, got=engine.full_state_dict(),
                leaves=[names[id(u.module)] for u in engine.partitioned.units if u.leaf])


def moe_cases() -> dict:
    """Every case on this rank; the references on rank 0 only."""
    rank = comm.rank()
    out: dict = {}
    leaf = {"leaf_module": {"classes": ["MoE"]}}
    out["reference"] = _reference() if rank == 0 else None
    out["reference_accumulated"] = _reference(accumulation=2) if rank == 0 else None
    for threshold in (0, 40):  # 40: the biases stay whole, the weights are partitioned
        out[f"config_{threshold}"] = _train(_build(), _config(threshold, **leaf))
    for how in ("zero_ext", "deepspeed"):
        if how == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            continue
        out[f"marked_{how}"] = _train(_marked(how), _config())
    out["by_name"] = _train(_build(), _config(leaf_module={
        "classes": [], "names": ["blocks.0.moe", "blocks.1.moe"], "name_suffixes": ["2.moe"]}))
    for checkpoint in ("reentrant", "non_reentrant"):
        out[f"checkpoint_{checkpoint}"] = _train(_build(checkpoint), _config(**leaf))
    out["accumulated"] = _train(_build(), _config(accumulation=2, **leaf), accumulation=2)
    # Experts with no token give no gradient, and ignore_unused_parameters false must not
    # refuse them: they count as zero.
    out["strict"] = _train(_build(), _config(ignore_unused_parameters=False, **leaf))
    # Frozen expert weights partitioned, their biases kept whole and trained: a block whose
    # expert got no token on a rank is released with its backward there too.
    out["reference_frozen"] = _reference(build=lambda: _build(frozen=True)) \
        if rank == 0 else None
    out["frozen"] = _train(_build(frozen=True), _config(40, **leaf))
    out["reference_twice"] = _reference(build=lambda: _build(twice=True)) if rank == 0 else None
    out["twice"] = _train(_build(twice=True), _config(**leaf))
    # Every parameter below stage3_param_persistence_threshold: no unit holds the leaves, and
    # ignore_unused_parameters false still counts an expert without a token as zero.
    out["strict_whole"] = _train(_build(), _config(10**6, ignore_unused_parameters=False,
                                                   **leaf))
    # Experts using another unit's weight (the head's): declared on an expert, it is gathered
    # around the leaf on every rank; undeclared, it is refused, naming the declaration.
    out["reference_borrowing"] = _reference(build=lambda: _build(borrowing=True)) \
        if rank == 0 else None
    model = _build(borrowing=True)
    for block in model.blocks:
        zero_ext.register_external_parameter(block.moe.experts[0], model.head.weight)
    out["borrowing"] = _train(model, _config(**leaf))
    try:
        _train(_build(borrowing=True), _config(**leaf))
        out["undeclared"] = None
    except RuntimeError as error:
        out["undeclared"] = str(error)
    out["mixtral"] = _mixtral_case()
    out["twice_reentrant"] = _twice_reentrant()
    return out


def _twice_reentrant() -> str | None:
    """Stage 2: one model run twice under reentrant checkpointing before one backward (two
    towers of a contrastive loss): each replay's backward accumulates the weights' gradients
    apart, and the second arrived after the first was reduced, and was lost. Now refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, 1))
    engine, *_ = zero_ext.initialize(model=model, config={
        **_config(), "zero_optimization": {"stage": 2}})
    x = torch.randn(2 * MICRO, DIM, requires_grad=True)
    towers = [torch.utils.checkpoint.checkpoint(engine, half, use_reentrant=True)
              for half in x.chunk(2)]
    try:
        engine.backward((towers[0] * towers[1]).sum())
    except RuntimeError as error:
        return str(error)
    return None
