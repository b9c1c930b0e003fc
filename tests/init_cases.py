"""What each rank runs in the zero_ext.Init tests (tests/test_init.py), one group per world size.

The reference is the same model built plainly (no Init) under the same seed in the same
process, and single-process torch training (engine_cases) from the same values.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import zero_ext
from zero_ext import comm

import engine_cases
from engine_cases import (
    VOCAB,
    Blocks,
    Borrow,
    config,
    global_batch,
    host_params,
    train_reference_steps,
    train_steps,
)

WIDTH, DEPTH = 48, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(WIDTH, WIDTH)
        self.down = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class SelfInitialized(nn.Module):
    """A model whose constructor initializes in every way users write: self.apply(fn) after the
    children are built (in-place nn.init calls and `.data` writes), a parent re-initializing a
    child's weight, a write through an indexed view (an embedding's padding row), a parameter
    created from random values, and no reset_parameters anywhere above the leaves."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH, padding_idx=3)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.shift = nn.Parameter(torch.randn(WIDTH) * 0.1)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.apply(self._init)
        nn.init.normal_(self.blocks[1].up.weight, std=2.0)  # a parent re-initializing a child
        with torch.no_grad():
            self.embed.weight[self.embed.padding_idx].zero_()
            self.blocks[2].down.weight.data.mul_(0.5)

    @staticmethod
    def _init(module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.05)
            if module.bias is not None:
                module.bias.data.fill_(0.01)
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, 0.3)

    def forward(self, tokens, targets):
        x = self.embed(tokens) + self.shift
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(x).float().view(-1, VOCAB), targets.view(-1))


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=16, tie_word_embeddings=True, pad_token_id=3)


def _values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}


def built_alike(build, seed: int) -> dict:
    """`build()` under zero_ext.Init and plainly, both after torch.manual_seed(seed): the
    values read back with GatheredParameters before initialize, and after initialize at
    stage 3 (fp32 and bf16)."""
    torch.manual_seed(seed)
    with zero_ext.Init():
        model = build()
    all_meta = all(p.is_meta for p in model.parameters())
    torch.manual_seed(seed)
    plain = build()
    params = list(model.parameters())
    with zero_ext.GatheredParameters(params):
        before_initialize = _values(model)
    still_meta = all(p.is_meta for p in params)
    engine, _, _, _ = zero_ext.initialize(model=model,
                                          config=config(3, "fp32", 1, comm.world_size()))
    out = {"all_meta": all_meta, "still_meta": still_meta, "plain": _values(plain),
               "before_initialize": before_initialize, "after_initialize": engine.full_state_dict()}
    torch.manual_seed(seed)
    with zero_ext.Init():
        model = build()
    with _recording_broadcasts() as sent:
        engine, _, _, _ = zero_ext.initialize(model=model,
                                              config=config(3, "bf16", 1, comm.world_size()))
    out["bf16"] = engine.full_state_dict()
    # Rank 0's buffers reach every rank as the model keeps them: on the training device, in
    # the model dtype (a broadcast of the buffers as built, before they were moved and cast,
    # sent CPU tensors, which an NCCL group refuses).
    storages = {t.untyped_storage().data_ptr() for t in sent}
    out["buffers"] = [n for n, b in model.named_buffers() if b.is_floating_point()]
    out["buffers_not_broadcast"] = [n for n, b in model.named_buffers()
                                    if b.untyped_storage().data_ptr() not in storages]
    out["broadcast_off_device"] = [tuple(t.shape) for t in sent if t.device != engine.device]
    return out


@contextlib.contextmanager
def _recording_broadcasts():
    """The tensors comm.broadcast is called with meanwhile (kept alive, so their storages
    are not reused)."""
    sent, original = [], comm.broadcast

    def recording(tensor, *args, **kwargs):
        sent.append(tensor)
        return original(tensor, *args, **kwargs)

    comm.broadcast = recording
    try:
        yield sent
    finally:
        comm.broadcast = original


class _LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage allocated inside it and alive at once. Each new storage
    is watched through a weak reference, so a free counts whichever thread makes it (a
    collective backend may drop the last reference to a tensor it was handed)."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, tuple[int, int]] = {}  # data_ptr -> (weak ref, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.numel() and \
                    t.untyped_storage().nbytes() == t.numel() * t.element_size():
                storage = t.untyped_storage()  # a new allocation (views do not fill one)
                self.watched.setdefault(storage.data_ptr(),
                                        (storage._weak_ref(), storage.nbytes()))
        live = 0
        for key, (ref, nbytes) in list(self.watched.items()):
            if torch.UntypedStorage._expired(ref):
                del self.watched[key]
            else:
                live += nbytes
        self.peak = max(self.peak, live)
        return out


def construction_peak_bytes(build) -> tuple[int, nn.Module]:
    """The most tensor bytes allocated while `build()` runs and alive at once, and the model."""
    live = _LiveBytes()
    with live:
        model = build()
    return live.peak, model


def memory_cases() -> dict:
    """Peak bytes while building SelfInitialized under Init and plainly, with the sizes a bound
    is made of: the whole model, the largest module's own parameters, and the shards."""
    model_bytes = sum(4 * p.numel() for p in SelfInitialized().parameters())
    largest = max(4 * sum(p.numel() for p in m.parameters(recurse=False))
                  for m in SelfInitialized().modules())

    def under_init():
        with zero_ext.Init():
            return SelfInitialized()

    torch.manual_seed(0)
    init_peak, model = construction_peak_bytes(under_init)
    torch.manual_seed(0)
    plain_peak, plain = construction_peak_bytes(SelfInitialized)
    with zero_ext.GatheredParameters(list(model.parameters())):
        matches_plain = all(torch.equal(a, b) for a, b in zip(model.parameters(),
                                                               plain.parameters()))
    return {"model_bytes": model_bytes, "largest_module_bytes": largest, "init_peak": init_peak,
            "plain_peak": plain_peak, "matches_plain": matches_plain}


def written_head() -> torch.Tensor:
    return torch.linspace(-0.5, 0.5, VOCAB * engine_cases.DIM).view(VOCAB, engine_cases.DIM)


def modified_after_initialize() -> dict:
    """GatheredParameters(modifier_rank=0) on a model built under Init, after initialize: rank
    0's writes become every rank's weights (and fp32 masters: training continues from them)."""
    world_size, rank = comm.world_size(), comm.rank()
    torch.manual_seed(0)
    with zero_ext.Init():
        model = Blocks()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1, world_size))
    with zero_ext.GatheredParameters([model.head.weight, model.blocks[1].weight],
                                     modifier_rank=0):
        inside = tuple(model.head.weight.shape)
        plain_class_inside = type(model.head.weight) is nn.Parameter
        if rank == 0:
            with torch.no_grad():
                # Not a constant: a head of equal rows would leave only rounding noise in the
                # gradients below it, which Adam magnifies.
                model.head.weight.copy_(written_head())
                model.blocks[1].weight[2].fill_(-1.0)
    written = engine.full_state_dict()
    train_steps(engine, 2)
    out = {"inside": inside, "plain_class_inside": plain_class_inside, "written": written,
               "released_class": type(model.head.weight).__name__,
               "params": host_params(model, engine)}
    if rank == 0:
        reference = Blocks()
        reference.load_state_dict(written)
        out["reference"] = train_reference_steps(reference, 2)
    return out


def modified_before_initialize() -> dict:
    """GatheredParameters right after construction under Init, before initialize: full values
    inside, rank 0's writes kept (DeepSpeed's pattern), then trained from."""
    world_size, rank = comm.world_size(), comm.rank()
    torch.manual_seed(0)
    with zero_ext.Init():
        model = Blocks()
    torch.manual_seed(0)
    plain = Blocks()
    with zero_ext.GatheredParameters(model.head.weight, modifier_rank=0):
        read = model.head.weight.detach().clone()
        if rank == 0:
            with torch.no_grad():
                model.head.weight[:, 0] = 0.75
    expected = plain.head.weight.detach().clone()
    expected[:, 0] = 0.75
    try:  # outside GatheredParameters the values are not there: copying in would be lost
        model.load_state_dict(plain.state_dict())
        load_error = None
    except RuntimeError as error:
        load_error = str(error)
    try:  # read-only, a write through .data on rank 0 (no version counter moves): refused
        with zero_ext.GatheredParameters(model.head.weight):
            if rank == 0:
                model.head.weight.data.view(-1)[-1] = 7.0
        read_only_error = None
    except RuntimeError as error:
        read_only_error = str(error)
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1, world_size))
    return {"read": read, "plain": plain.head.weight.detach().clone(), "expected": expected,
            "load_error": load_error, "got": engine.full_state_dict()["head.weight"],
            "read_only_error": read_only_error}


def external_under_init() -> dict:
    """register_external_parameter on a model built under Init (its tags must follow the live
    parameter): trains as single-process torch."""
    world_size = comm.world_size()
    torch.manual_seed(0)
    with zero_ext.Init():
        model = Borrow()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1, world_size))
    initial = engine.full_state_dict()
    zero_ext.register_external_parameter(model, model.a.weight)
    # Declared, a's unit is gathered as the model's forward starts, before any use of it.
    seen = []
    model.embed.register_forward_pre_hook(lambda m, a: seen.append(model.a.weight.numel()))
    train_steps(engine, 2)
    reference = Borrow()
    reference.load_state_dict(initial)
    return {"gathered_at_start": all(n > 0 for n in seen) and bool(seen),
            "params": host_params(model, engine),
            "reference": train_reference_steps(reference, 2)}


class Body(nn.Module):
    """Blocks without its loss: the head is applied by code outside the model (TRL's fused
    LM head reads `model.head.weight` directly)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return x


def outside_loss(model, hidden, targets, gather: bool):
    """The head applied outside the model's forward, gathered as TRL does under ZeRO-3."""
    with zero_ext.GatheredParameters([model.head.weight, model.head.bias], enabled=gather):
        logits = F.linear(hidden, model.head.weight, model.head.bias)
    return F.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))


def used_outside_forward() -> dict:
    """A partitioned parameter used outside any forward: an error at the first use that names
    it and the fix; gathered with GatheredParameters, it trains as single-process torch."""
    world_size, rank = comm.world_size(), comm.rank()
    torch.manual_seed(0)
    model = Body()
    reference = Body()
    reference.load_state_dict(model.state_dict())
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1, world_size))
    tokens, targets = global_batch(0, world_size, 1)
    hidden = engine(tokens[0, rank])
    out = {}
    try:
        outside_loss(model, hidden, targets[0, rank], gather=False)
    except RuntimeError as error:
        out["error"] = str(error)
    for step in range(3):
        tokens, targets = global_batch(step, world_size, 1)
        hidden = engine(tokens[0, rank])
        engine.backward(outside_loss(model, hidden, targets[0, rank], gather=True))
        engine.step()
    out["params"] = host_params(model, engine)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        tokens, targets = global_batch(step, world_size, 1)
        opt.zero_grad()
        outside_loss(reference, reference(tokens[0].reshape(-1, tokens.shape[-1])),
                     targets[0].reshape(-1, targets.shape[-1]), gather=False).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
    out["reference"] = host_params(reference)
    return out


def changed_without_modifier() -> dict:
    """A change inside GatheredParameters(modifier_rank=None) on rank 0 only: an error on every
    rank and the change undone, for a partitioned parameter and a whole-kept one; made in
    place (add_) or through `.data`, which moves no version counter, on the last element
    (in the last rank's shard, not rank 0's)."""
    world_size, rank = comm.world_size(), comm.rank()
    out = {}
    for kept, threshold, how in (("partitioned", 0, "add_"), ("whole", 10**9, "add_"),
                                 ("partitioned_data", 0, "data"), ("whole_data", 10**9, "data")):
        torch.manual_seed(0)
        with zero_ext.Init():
            model = Blocks()
        engine, _, _, _ = zero_ext.initialize(model=model, config=config(
            3, "fp32", 1, world_size, stage3_param_persistence_threshold=threshold))
        before = engine.full_state_dict()["head.weight"]
        error = None
        try:
            with zero_ext.GatheredParameters(model.head.weight):
                if rank == 0 and how == "add_":
                    with torch.no_grad():
                        model.head.weight.add_(1.0)
                elif rank == 0:
                    model.head.weight.data.view(-1)[-1] = 7.0
        except RuntimeError as caught:
            error = str(caught)
        out[kept] = {"error": error,
                     "unchanged": torch.equal(engine.full_state_dict()["head.weight"], before)}
    return out


def all_cases() -> dict:
    from transformers import LlamaForCausalLM

    return {
        "custom": built_alike(SelfInitialized, seed=3),
        "llama": built_alike(lambda: LlamaForCausalLM(tiny_llama_config()), seed=4),
        "memory": memory_cases(),
        "after": modified_after_initialize(),
        "before": modified_before_initialize(),
        "external": external_under_init(),
        "outside": used_outside_forward(),
        "unmodified": changed_without_modifier()}
