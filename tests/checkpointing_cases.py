"""Models and case functions of the activation-checkpointing tests: a GPT-style model, the
saved-activation measure, and what each rank runs under the engine (tests/test_checkpointing.py).

A checkpointed block keeps only its inputs for backward. The measure counts what autograd keeps:
the bytes of distinct storages saved for backward (parameters excluded), seen by an outermost
pair of saved-tensor hooks; inside a checkpointed segment torch's own hooks keep placeholders,
and with cpu_checkpointing zero_ext's hooks take the segment's inputs to the host.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import zero_ext
from zero_ext import checkpointing, comm

VOCAB, SEQ, MICRO = 50, 16, 2


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, as in GPT-2. The MLP is a container: at stage 3
    its layers are gather units of their own, inside the block's unit, which a recomputation of
    the block must gather (they are not gathered yet when it starts)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 nn.Linear(4 * dim, dim))

    def forward(self, x, *, causal: bool = True):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        if causal:
            scores = scores.masked_fill(
                torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.mlp(x)


class GPT(nn.Module):
    """Token and position embeddings, blocks in a ModuleList, final norm, head. With
    `explicit`, forward calls zero_ext.checkpointing.checkpoint around each block itself
    (the block's own hooks then run inside the segment and again when it is recomputed)."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 4, seq: int = SEQ,
                 explicit: bool = False):
        super().__init__()
        self.explicit = explicit
        self.wte = nn.Embedding(VOCAB, dim)
        self.wpe = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens, targets):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = checkpointing.checkpoint(block, x, causal=True) if self.explicit else \
                block(x, causal=True)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def build_gpt(seed: int = 0, **kwargs) -> GPT:
    torch.manual_seed(seed)
    return GPT(**kwargs)


def batch(step: int, rows: int, device="cpu", seq: int = SEQ):
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (rows, seq), generator=gen)
    targets = torch.randint(0, VOCAB, (rows, seq), generator=gen)
    return tokens.to(device), targets.to(device)


def saved_activation_bytes(mode: str, **gpt) -> dict:
    """One forward of the GPT-style model in `mode` ("none", "checkpoint", "cpu"): the bytes of
    distinct storages autograd keeps for backward, how many blocks' inputs are still alive
    after forward, what cpu_checkpointing moved, and the gradients of the backward after."""
    model = build_gpt(**gpt)
    if mode != "none":
        checkpointing.apply(model)
    checkpointing.configure(cpu_checkpointing=mode == "cpu")
    checkpointing.counters.reset()
    inputs = []
    for block in model.blocks:
        block.register_forward_pre_hook(
            lambda module, args: inputs.append(StorageWeakRef(args[0].untyped_storage())))
    storages: dict[int, int] = {}

    def count(tensor):
        if not isinstance(tensor, nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens, targets = batch(0, 8)
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            loss = model(tokens, targets)
        alive = sum(not ref.expired() for ref in inputs)
        moved = checkpointing.counters.bytes_to_host
        loss.backward()
    finally:
        checkpointing.configure()
    return {"saved": sum(storages.values()), "inputs_alive": alive, "to_host": moved,
            "block_input_bytes": 8 * SEQ * model.wte.embedding_dim * 4,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


# -- under the engine, on every rank --------------------------------------------------------------
def engine_config(stage: int, **activation_checkpointing) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000,
                              "stage3_param_persistence_threshold": 0},
        "activation_checkpointing": activation_checkpointing,
        "steps_per_print": 10**6,
    }


def train(model: nn.Module, stage: int, steps: int, loss_fn, **activation_checkpointing) -> dict:
    """`steps` engine steps of `model` on this rank's rows of each batch; the final full
    parameters and what stage 3 left behind."""
    rank, world_size = comm.rank(), comm.world_size()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, _, _ = zero_ext.initialize(
            model=model, config=engine_config(stage, **activation_checkpointing))
        checkpointing.counters.reset()
        released = []
        for step in range(steps):
            tokens, targets = batch(step, MICRO * world_size)
            rows = slice(rank * MICRO, (rank + 1) * MICRO)
            comm.traffic.reset()
            engine.backward(loss_fn(engine, tokens[rows], targets[rows]))
            calls = dict(comm.traffic.calls)  # a recomputation gathers nothing again
            if engine.partitioned is not None:
                released.append(all(p.numel() == 0 for unit in engine.partitioned.units
                                    for members in unit.params for p in members))
            engine.step()
    out = {"params": {n: v.float().clone() for n, v in engine.full_state_dict().items()},
           "released": released, "calls": calls, "to_host": checkpointing.counters.bytes_to_host,
           "warnings": [str(w.message) for w in caught], "device": engine.device.type}
    if engine.partitioned is not None and engine.partitioned.prefetch.order is not None:
        units = {id(u.module): n for n, u in _unit_names(model, engine)}
        out["order"] = {phase: [units[id(u.module)] for u in seq]
                        for phase, seq in engine.partitioned.prefetch.order.items()}
    checkpointing.configure()
    return out


def _unit_names(model, engine):
    name_of = {id(m): n for n, m in model.named_modules()}
    return [(name_of[id(u.module)], u) for u in engine.partitioned.units]


def gpt_loss(engine, tokens, targets):
    return engine(tokens.to(engine.device), targets.to(engine.device))


def gpt_runs(stage: int) -> dict:
    """The GPT-style model trained without checkpointing, with apply() (the blocks' hooks
    outside the segment), with explicit checkpoint() calls (hooks inside, run again by the
    recomputation) and with apply() and cpu_checkpointing."""
    out = {}
    for mode in ("none", "apply", "explicit", "apply+cpu"):
        model = build_gpt(explicit=mode == "explicit")
        if mode.startswith("apply"):
            checkpointing.apply(model)
        extra = {"cpu_checkpointing": True} if mode.endswith("cpu") else {}
        if mode == "apply":
            extra = {"partition_activations": True}  # accepted, said once, no effect
        out[mode] = train(model, stage, 3, gpt_loss, **extra)
    return out


def llama_runs() -> dict:
    """A tiny transformers LlamaForCausalLM at stage 3, with and without apply()."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=SEQ)

    def lm_loss(engine, tokens, _):
        return engine(input_ids=tokens.to(engine.device), labels=tokens.to(engine.device)).loss

    out = {}
    for mode in ("none", "apply+cpu"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        if mode != "none":
            out["blocks"] = checkpointing.apply(model)
        out[mode] = train(model, 3, 2, lm_loss,
                          **({"cpu_checkpointing": True} if mode != "none" else {}))
    return out


class LinearBlocks(nn.Module):
    """Blocks that are bare nn.Linear modules: stage 3 gives such a unit its own linear
    function unless apply() replaced its forward first."""

    def __init__(self, dim: int = 16, depth: int = 3):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens, targets):
        x = self.wte(tokens)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return F.cross_entropy(self.head(x).view(-1, VOCAB), targets.reshape(-1))


def linear_block_runs() -> dict:
    """LinearBlocks at stage 3 without checkpointing and with apply() before initialize, two
    steps each; how many segments ran checkpointed."""
    out = {}
    for mode in ("none", "apply"):
        torch.manual_seed(0)
        model = LinearBlocks()
        if mode == "apply":
            checkpointing.apply(model)
        checkpointing.profile_report()
        out[mode] = train(model, 3, 2, gpt_loss, profile=True)
        out[mode]["segments"] = len(checkpointing.profile_report())
    return out


def settings_across_initialize() -> dict:
    """configure() before initialize (Megatron-DeepSpeed's order), then an engine whose config
    has no activation_checkpointing section, then one whose section sets one key: the settings
    after each."""
    def settings():
        return {key: getattr(checkpointing._config, key)
                for key in ("cpu_checkpointing", "profile", "number_checkpoints")}

    checkpointing.configure(cpu_checkpointing=True, profile=True, number_checkpoints=2)
    out = {}
    for name, section in (("without_section", None), ("with_section", {"profile": False})):
        config = engine_config(2)
        if section is None:
            del config["activation_checkpointing"]
        else:
            config["activation_checkpointing"] = section
        zero_ext.initialize(model=build_gpt(), config=config)
        out[name] = settings()
    checkpointing.configure()
    return out


def engine_cases() -> dict:
    return {"stage2": gpt_runs(2), "stage3": gpt_runs(3), "llama": llama_runs(),
            "linear_blocks": linear_block_runs(), "settings": settings_across_initialize()}


def cuda_peak_memory() -> dict:
    """On the GPU: how far torch.cuda.max_memory_allocated rises above the model during one
    forward and backward of a GPT-style model, without checkpointing, with it, and with
    cpu_checkpointing; and the gradients of each."""
    out = {}
    for mode in ("none", "checkpoint", "cpu"):
        model = build_gpt(dim=256, heads=8, depth=8, seq=512).cuda()
        if mode != "none":
            checkpointing.apply(model)
        checkpointing.configure(cpu_checkpointing=mode == "cpu")
        tokens, targets = batch(0, 16, "cuda", seq=512)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(tokens, targets).backward()
        torch.cuda.synchronize()
        out[mode] = {"rise": torch.cuda.max_memory_allocated() - before,
                     "grads": {n: p.grad.cpu() for n, p in model.named_parameters()}}
        checkpointing.configure()
    return out
