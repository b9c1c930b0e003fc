"""What each rank runs in the engine tests, and the single-process reference it is compared with.

The reference is plain PyTorch in one process: the same seeded model trained on the whole
global batch of each step (every rank's micro-batches of every micro-step together), with
torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW on fp32 master weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import zero_ext
from zero_ext import comm

VOCAB, DIM, HIDDEN, SEQ, MICRO = 37, 24, 29, 5, 2
UNUSED_NUMEL = 3 * 5 + 5  # TinyNet.unused, which never receives a gradient


class TinyNet(nn.Module):
    """Embedding, layer norm, odd-sized linears, a head tied to the embedding, a frozen
    parameter used in forward, and a parameter never used (it receives no gradient)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.frozen_shift = nn.Parameter(torch.randn(DIM) * 0.1, requires_grad=False)
        self.unused = nn.Linear(3, 5)

    def forward(self, tokens, targets):
        x = self.embed(tokens) + self.frozen_shift
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        logits = self.head(x).float()
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def run(engine, tokens, targets):
    """The engine's forward on this rank's micro-batch, moved to the engine's device (the
    tests run on CUDA tensors where a GPU is present)."""
    return engine(tokens.to(engine.device), targets.to(engine.device))


def host_params(model: nn.Module, engine=None) -> dict[str, torch.Tensor]:
    """Full parameter values on the CPU, gathered by the engine where it partitions them."""
    full = engine.full_state_dict() if engine is not None else None
    return {n: (full[n] if full is not None else p.detach()).float().cpu().clone()
            for n, p in model.named_parameters()}


def model_loss(model, tokens, targets):
    """The test models' forward: they return their loss."""
    return model(tokens, targets)


def train_steps(engine, steps: int, loss_fn=model_loss) -> None:
    """`steps` optimizer steps of the engine on this rank's part of each global batch."""
    world_size, rank = comm.world_size(), comm.rank()
    for step in range(steps):
        tokens, targets = global_batch(step, world_size, 1)
        engine.backward(loss_fn(engine, tokens[0, rank].to(engine.device),
                                targets[0, rank].to(engine.device)))
        engine.step()


def train_reference_steps(model: nn.Module, steps: int, loss_fn=model_loss,
                          eps: float = 1e-8) -> dict:
    """The single-process reference of train_steps: the whole global batch of each step, torch
    AdamW (lr 1e-2, weight decay 0.1, as config() sets) after clipping at 0.5."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=eps)
    for step in range(steps):
        tokens, targets = global_batch(step, comm.world_size(), 1)
        opt.zero_grad()
        loss_fn(model, tokens[0].reshape(-1, SEQ), targets[0].reshape(-1, SEQ)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    return host_params(model)


def build_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def param_groups(model: nn.Module) -> list[dict]:
    """Decay for matrices, none for biases and norms, as users set it up."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def global_batch(step: int, world_size: int, accumulation: int):
    """All samples of optimizer step `step`: [accumulation, world_size, MICRO, SEQ]."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (accumulation, world_size, MICRO, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (accumulation, world_size, MICRO, SEQ), generator=gen)
    return tokens, targets


def config(stage: int, dtype: str, accumulation: int, world_size: int, clip: float = 0.5,
           **zero) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        # Small buckets: several buckets, one parameter spanning ranks' shards. Stages 0 and 2
        # reduce while backward runs (overlap_comm), stage 1 reduces synchronously and
        # all-gathers its buckets in several pieces (allgather_bucket_size).
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 700,
                              "overlap_comm": stage != 1,
                              "allgather_bucket_size": 200 if stage == 1 else 10**8,
                              # Stage 3 partitions even this model's small parameters.
                              "stage3_param_persistence_threshold": 0, **zero},
        "steps_per_print": 10**6,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1,
                       "loss_scale_window": 3}
    return cfg


def train_engine(stage: int, dtype: str, accumulation: int, steps: int, clip: float = 0.5,
                 compile_backend: str | None = None, **zero) -> dict:
    """Trains with zero_ext on this rank; returns final params, norms and engine facts.
    `zero` adds zero_optimization keys (e.g. offload sections); `compile_backend`: the model
    is compiled with engine.compile(backend=...) after initialize."""
    world_size, rank = comm.world_size(), comm.rank()
    model = build_model()
    engine, optimizer, _, _ = zero_ext.initialize(
        model=model, config=config(stage, dtype, accumulation, world_size, clip=clip, **zero),
        model_parameters=param_groups(model))
    if compile_backend is not None:
        engine.compile(backend=compile_backend)
    norms = []
    for step in range(steps):
        tokens, targets = global_batch(step, world_size, accumulation)
        for micro in range(accumulation):
            loss = run(engine, tokens[micro, rank], targets[micro, rank])
            engine.backward(loss)
            engine.step()
        norms.append(engine.get_global_grad_norm())
    return {
        "params": host_params(model, engine),
        "norms": norms,
        "global_steps": engine.global_steps,
        "micro_steps": engine.micro_steps,
        # Buckets, and those whose optimizer state steps on the host (offload_optimizer).
        "buckets": len(engine.layouts),
        "host_stepped": len(engine.offload.shards) if engine.offload is not None else 0,
        # Stage 3: the order units ran in was the same every step, so prefetch stayed on.
        "prefetching": engine.partitioned is None or engine.partitioned.prefetch.order is not None,
    }


def train_reference(dtype: str, accumulation: int, steps: int, world_size: int,
                    clip: float = 0.5) -> dict:
    """Single process, whole global batch per step, torch AdamW on fp32 master weights
    (clip 0: no clipping, as the engine's gradient_clipping)."""
    model = build_model()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model.to(torch_dtype)
    groups = param_groups(model)
    params = [p for g in groups for p in g["params"]]
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    master_groups, i = [], 0
    for g in groups:
        n = len(g["params"])
        master_groups.append({**{k: v for k, v in g.items() if k != "params"},
                              "params": masters[i:i + n]})
        i += n
    opt = torch.optim.AdamW(master_groups, lr=1e-2, weight_decay=0.1, foreach=False)
    norms = []
    for step in range(steps):
        tokens, targets = global_batch(step, world_size, accumulation)
        loss = model(tokens.reshape(-1, SEQ), targets.reshape(-1, SEQ))
        model.zero_grad(set_to_none=True)
        loss.backward()
        for p, m in zip(params, masters):
            # A parameter that got no gradient steps with zeros, as the engine (and DeepSpeed)
            # treats it: decay and moments still move.
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
        norms.append(torch.nn.utils.clip_grad_norm_(masters, clip or math.inf).item())
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, masters):
                p.copy_(m)
    return {"params": {n: p.detach().float().clone() for n, p in model.named_parameters()},
            "norms": norms}


def assert_matches_reference(got: dict, reference: dict, dtype: str, label: str) -> None:
    """A train_engine result against train_reference's: grad norms and final parameters."""
    # The pre-clip global norm checks the reduction itself (Adam's update barely depends on
    # the gradient's scale, so a wrong averaging factor would hide in the parameters).
    norm_rtol = 1e-5 if dtype == "fp32" else 2e-2
    assert_close(torch.tensor(got["norms"], dtype=torch.float64),
                 torch.tensor(reference["norms"], dtype=torch.float64), rtol=norm_rtol,
                 atol=0.0, msg=f"{label} grad norms")
    if dtype == "fp32":
        for name, ref in reference["params"].items():
            assert_close(got["params"][name], ref, rtol=1e-5,
                         atol=1e-5 * ref.abs().max().item(), msg=f"{label} {name}")
        return
    # bf16: the reduction order differs (per-rank sums vs one backward) and Adam turns
    # rounding noise in near-zero gradients into whole lr-sized steps of either sign, so
    # single elements can differ by 2*lr. What must agree is the training update as a whole:
    # its error is a small fraction of its size (a wrong shard, a lost micro-step or a
    # missing all-gather each make it tens of percent).
    initial = dict(build_model().to(torch.bfloat16).float().named_parameters())
    error = relative_update_error(got["params"], reference["params"], initial)
    assert error < 0.05, f"{label}: relative error of the bf16 update {error:.3g}"


def relative_update_error(got: dict, reference: dict, initial: dict) -> float:
    """|update - reference update| / |reference update| over all parameters, each update the
    final values (by name) minus `initial`."""
    update = torch.cat([(got[n] - initial[n]).flatten() for n in initial])
    ref_update = torch.cat([(reference[n] - initial[n]).flatten() for n in initial])
    return ((update - ref_update).norm() / ref_update.norm()).item()


def parity_cases(cases: list[tuple], steps: int) -> dict:
    """Runs every (stage, dtype, accumulation) case on this rank; rank 0 adds the reference."""
    out = {}
    for stage, dtype, accumulation in cases:
        got = train_engine(stage, dtype, accumulation, steps)
        if comm.rank() == 0:
            got["reference"] = train_reference(dtype, accumulation, steps, comm.world_size())
        out[(stage, dtype, accumulation)] = got
    return out


def layout_numels(engine) -> tuple[int, int]:
    """(padded elements of all buckets, elements of trainable parameters)."""
    padded = sum(layout.padded_numel for layout in engine.layouts)
    used = sum(layout.used_numel for layout in engine.layouts)
    return padded, used


def memory_and_traffic(stage: int) -> dict:
    """bf16 model, one step at accumulation 1 and one micro-step at accumulation 2: bytes held
    per kind and the collectives' traffic of one step."""
    world_size, rank = comm.world_size(), comm.rank()
    out = {}
    for accumulation in (1, 2):
        model = build_model()
        engine, _, _, _ = zero_ext.initialize(
            model=model, config=config(stage, "bf16", accumulation, world_size))
        tokens, targets = global_batch(0, world_size, accumulation)
        comm.traffic.reset()
        with _whole_buckets_alive(engine) as alive:
            engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
        after_backward = engine.memory_breakdown()
        engine.step()
        if accumulation == 1:
            out["traffic"] = comm.traffic.snapshot()
            out["whole_buckets_alive"] = alive[0]
        out[accumulation] = {"after_backward": after_backward,
                             "after_step": engine.memory_breakdown(),
                             "numels": layout_numels(engine)}
        out["buckets"] = len(engine.layouts)
        out["shards"] = [layout.shard_numel for layout in engine.layouts]
    return out


@contextlib.contextmanager
def _whole_buckets_alive(engine):
    """Yields a list whose one item becomes the most gradient buckets held whole at once (their
    flat buffer, before the reduction's result is taken) during the backward run meanwhile,
    counted after each bucket's launch."""
    buckets, alive = engine.grad_buckets, [0]
    launch = buckets._launch

    def counting(bucket):
        launch(bucket)
        alive[0] = max(alive[0], sum(b.flat is not None for b in buckets.buckets))

    buckets._launch = counting
    try:
        yield alive
    finally:
        del buckets._launch


def fp16_overflow(stage: int = 2, **zero) -> dict:
    """fp16 with an inf injected into one gradient on rank 1 only, at the second step."""
    world_size, rank = comm.world_size(), comm.rank()
    model = build_model()
    engine, _, _, _ = zero_ext.initialize(model=model,
                                          config=config(stage, "fp16", 1, world_size, **zero))
    record = []
    for step in range(6):
        tokens, targets = global_batch(step, world_size, 1)
        handle = None
        if step == 1 and rank == 1:
            handle = model.fc1.weight.register_hook(
                lambda g: g.index_fill(0, torch.tensor([0], device=g.device), float("inf")))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
        engine.step()
        if handle is not None:
            handle.remove()
        unchanged = all(torch.equal(before[n], p) for n, p in model.named_parameters())
        record.append(dict(scale=engine.loss_scaler.scale, skipped=engine.skipped_steps,
                           unchanged=unchanged, global_steps=engine.global_steps))
    return {"record": record}


def mismatched_models() -> str:
    """Rank 1 builds a different model; initialize must raise on every rank, not hang."""
    model = build_model()
    if comm.rank() == 1:
        model.fc1 = nn.Linear(DIM, HIDDEN + 1)
    try:
        zero_ext.initialize(model=model, config=config(2, "fp32", 1, comm.world_size()))
    except RuntimeError as error:
        return str(error)
    return "no error"


def deepspeed_example() -> dict:
    """The snippet from DeepSpeed's examples, as written."""
    from zero_ext import initialize_engine

    model = build_model()
    engine, optimizer, _, _ = initialize_engine(model=model, config={
        "train_batch_size": 256, "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW"}})
    tokens, targets = global_batch(0, 1, 1)
    engine.backward(run(engine, tokens[0, 0], targets[0, 0]))
    engine.step()
    group = optimizer.param_groups[0]
    return dict(micro=engine.batch.train_micro_batch_size_per_gpu, lr=group["lr"],
                betas=tuple(group["betas"]), eps=group["eps"],
                weight_decay=group["weight_decay"], steps=engine.global_steps)


def communication_dtype() -> dict:
    """bf16 model reducing in fp32 (communication_data_type): bytes per element of each
    collective."""
    world_size, rank = comm.world_size(), comm.rank()
    cfg = config(2, "bf16", 1, world_size)
    cfg["communication_data_type"] = "fp32"
    engine, _, _, _ = zero_ext.initialize(model=build_model(), config=cfg)
    tokens, targets = global_batch(0, world_size, 1)
    comm.traffic.reset()
    engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
    engine.step()
    t = comm.traffic.snapshot()
    return {op: t.bytes[op] / t.elements[op] for op in ("reduce_scatter", "all_gather")}


def engine_checks() -> dict:
    return {"overflow": fp16_overflow(), "mismatch": mismatched_models(),
            "example": deepspeed_example(), "adopted": adopted_torch_optimizer(),
            "replicated_sgd": replicated_sgd(), "comm_dtype": communication_dtype(),
            "schedules": schedules_and_loaders(),
            "memory": memory_cases()}


def memory_cases() -> dict:
    out = {stage: memory_and_traffic(stage) for stage in (0, 1, 2)}
    out["launch_order"] = launch_order_cases()  # in this group: one start-up fewer
    return out


def adopted_torch_optimizer() -> dict:
    """A torch.optim.AdamW passed to initialize: its groups and hyperparameters are adopted."""
    world_size, rank = comm.world_size(), comm.rank()
    model = build_model()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2, weight_decay=0.1)
    cfg = config(2, "fp32", 1, world_size)
    del cfg["optimizer"]
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg, optimizer=opt)
    for step in range(3):
        tokens, targets = global_batch(step, world_size, 1)
        engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
        engine.step()
    out = {"params": host_params(model)}
    if rank == 0:
        out["reference"] = train_reference("fp32", 1, 3, world_size)
    return out


def schedules_and_loaders() -> dict:
    """LR schedules (config and user callable), skipped fp16 steps, the dataloader, logging."""
    import contextlib
    import io

    world_size, rank = comm.world_size(), comm.rank()
    out = {}
    cfg = config(2, "fp16", 1, world_size)
    cfg["scheduler"] = {"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 4,
        "warmup_type": "linear"}}
    cfg["steps_per_print"] = 2
    model = build_model()
    engine, optimizer, _, scheduler = zero_ext.initialize(model=model, config=cfg)
    lrs, printed = [], io.StringIO()
    with contextlib.redirect_stdout(printed):
        for step in range(5):
            tokens, targets = global_batch(step, world_size, 1)
            handle = None
            if step == 2:  # overflow on every rank's view after the reduction
                handle = model.fc2.weight.register_hook(lambda g: g * float("inf"))
            engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
            engine.step()
            if handle is not None:
                handle.remove()
            lrs.append(engine.get_lr()[0])
    out["config_schedule"] = dict(lrs=lrs, skipped=engine.skipped_steps,
                                  scheduler_is_ours=scheduler is engine.lr_scheduler,
                                  printed=printed.getvalue())

    model = build_model()
    engine, _, _, _ = zero_ext.initialize(
        model=model, config=config(1, "fp32", 1, world_size),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    lrs = [engine.get_lr()[0]]
    for step in range(3):
        tokens, targets = global_batch(step, world_size, 1)
        engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
        engine.step()
        lrs.append(engine.get_lr()[0])
    out["callable_schedule"] = lrs

    data = torch.utils.data.TensorDataset(torch.arange(16 * SEQ).view(16, SEQ) % VOCAB,
                                          torch.zeros(16, SEQ, dtype=torch.long))
    _, _, loader, _ = zero_ext.initialize(model=build_model(),
                                          config=config(0, "fp32", 1, world_size),
                                          training_data=data)
    batches = list(loader)
    out["loader"] = dict(batches=len(batches), shape=tuple(batches[0][0].shape),
                         first_rows=[int(b[0][0, 0]) for b in batches])
    return out


def replicated_sgd() -> dict:
    """Stage 0 with a torch.optim.SGD the user built: runs as it is, on reduced gradients."""
    world_size, rank = comm.world_size(), comm.rank()

    def sgd(params):
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)

    model = build_model()
    cfg = config(0, "fp32", 2, world_size)
    del cfg["optimizer"]
    engine, optimizer, _, _ = zero_ext.initialize(model=model, config=cfg,
                                                  optimizer=sgd(param_groups(model)))
    for step in range(3):
        tokens, targets = global_batch(step, world_size, 2)
        for micro in range(2):
            engine.backward(run(engine, tokens[micro, rank], targets[micro, rank]))
            engine.step()
    out = {"params": host_params(model),
           "same_optimizer": optimizer is engine.optimizer}
    if rank == 0:
        ref_model = build_model()
        ref = sgd(param_groups(ref_model))
        params = [p for g in ref.param_groups for p in g["params"]]
        for step in range(3):
            tokens, targets = global_batch(step, world_size, 2)
            ref.zero_grad(set_to_none=True)
            ref_model(tokens.reshape(-1, SEQ), targets.reshape(-1, SEQ)).backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            ref.step()
        out["reference"] = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    return out


def stage3_checks() -> dict:
    """Stage 3 specifics: units, released parameters, one step's traffic, eval under no_grad,
    a forward without backward."""
    world_size, rank = comm.world_size(), comm.rank()
    model = build_model()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1, world_size))
    name_of = {m: n for n, m in model.named_modules()}
    layouts = []
    for unit in engine.partitioned.units:
        layouts += [(name_of[unit.module], layout.padded_numel) for layout in unit.layouts]
    layouts += [(None, layout.padded_numel) for layout in engine.persistent_layouts]
    tokens, targets = global_batch(0, world_size, 1)

    def released():
        return all(p.numel() == 0 for unit in engine.partitioned.units
                   for members in unit.params for p in members)

    released_at_start = released()
    # A tensor autograd saves for backward that views a unit's gathered buffer (checked while
    # that buffer is alive) would pin it: releasing the unit would then free nothing. Saved
    # Parameters are fine: release points them elsewhere.
    pinned, checked = [], [0]

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter):
            live = {f.untyped_storage().data_ptr() for unit in engine.partitioned.units
                    for f in unit.fulls if f is not None}
            checked[0] += bool(live)
            if tensor.untyped_storage().data_ptr() in live:
                pinned.append(tuple(tensor.shape))
        return tensor

    comm.traffic.reset()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = run(engine, tokens[0, rank], targets[0, rank])
    with _whole_buckets_alive(engine) as whole_buckets_alive:
        engine.backward(loss)
    released_after_backward = released()
    engine.step()
    traffic = comm.traffic.snapshot()
    params_bytes_between_steps = engine.memory_breakdown()["params"]

    plain = build_model()
    plain.load_state_dict(engine.full_state_dict())
    engine.eval()
    with torch.no_grad():
        eval_loss = run(engine, tokens[0, rank], targets[0, rank]).item()
    plain_loss = plain(tokens[0, rank], targets[0, rank]).item()
    engine.train()
    run(engine, tokens[0, rank], targets[0, rank])  # forward only, the graph dropped
    engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
    engine.step()
    return dict(layouts=layouts, traffic=traffic, pinned=pinned, checked=checked[0],
                released=(
        released_at_start, released_after_backward, released()),
        params_bytes=params_bytes_between_steps, eval_loss=eval_loss, plain_loss=plain_loss,
        steps=engine.global_steps, autocast_error=_autocast_update_error(),
        whole_buckets_alive=whole_buckets_alive[0], buckets=len(engine.grad_buckets.buckets))


def _autocast_loss(model, tokens, targets):
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
        return model(tokens, targets)


def _autocast_update_error(steps: int = 2) -> float:
    """An fp32 model at stage 3 with the forward under torch.autocast (bf16), as the config's
    error for `torch_autocast` tells users to run it: two steps against single-process
    training under the same autocast. Returns the relative error of the whole update (its
    linears compute in bf16, so elements differ by rounding)."""
    model = build_model()
    engine, _, _, _ = zero_ext.initialize(model=model,
                                          config=config(3, "fp32", 1, comm.world_size()))
    train_steps(engine, steps, loss_fn=_autocast_loss)
    reference = train_reference_steps(build_model(), steps, loss_fn=_autocast_loss)
    return relative_update_error(host_params(model, engine), reference,
                                 host_params(build_model()))


class TwiceNet(nn.Module):
    """One linear applied twice in a forward (a stage-3 unit gathered and reduced once)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens, targets):
        x = self.fc(F.gelu(self.fc(self.embed(tokens))))
        return F.cross_entropy(self.head(x).float().view(-1, VOCAB), targets.view(-1))


class PassThroughNet(nn.Module):
    """Blocks that return a tensor they were given along with their output, as every T5Block
    returns the position bias: its gradient is complete only after the last block's backward,
    when the earlier blocks' gradients have long been reduced."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.bias = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(_PassThroughBlock() for _ in range(3))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        bias = self.bias(x)
        for block in self.blocks:
            x, bias = block(x, bias)
        return F.cross_entropy(self.head(x).float().view(-1, VOCAB), targets.view(-1))


class _PassThroughBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x, bias):
        return torch.tanh(self.fc(x)) + bias, bias


class TwoTowers(nn.Module):
    """CLIP's layout: a text tower registered before a vision tower that the forward runs
    first, the loss reading both; backward reaches the text blocks first, the reverse of the
    buckets' index order (reverse registration)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.text = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(3))
        self.vision = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(3))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        vision = text = x
        for block in self.vision:
            vision = vision + torch.tanh(block(vision))
        for block in self.text:
            text = text + torch.tanh(block(text))
        return F.cross_entropy(self.head(vision + text).float().view(-1, VOCAB),
                               targets.view(-1))


def launch_order_cases() -> dict:
    """TwoTowers at stages 2 and 3 for three steps, against single-process training; `held`,
    at each tower block's backward (before it), per step: the buckets complete but not yet
    reduced (their gradients, and at stage 3 their units, held meanwhile) and the units
    gathered."""
    world_size, rank = comm.world_size(), comm.rank()
    out = {}
    for stage in (2, 3):
        model, reference = _model_and_reference(TwoTowers)
        # One unit prefetched, none kept for reuse (DeepSpeed's defaults gather them all).
        engine, _, _, _ = zero_ext.initialize(model=model, config=config(
            stage, "fp32", 1, world_size, stage3_prefetch_bucket_size=1,
            stage3_max_reuse_distance=0))
        buckets, held = engine.grad_buckets, []

        def watch(module, grad_output, engine=engine, buckets=buckets, held=held):
            held[-1].append((
                sum(b.state.value == "ready" for b in buckets.buckets),
                _gathered_units(engine) if engine.partitioned is not None else 0))

        for block in [*model.text, *model.vision]:
            block.register_full_backward_pre_hook(watch)
        for step in range(3):
            held.append([])
            tokens, targets = global_batch(step, world_size, 1)
            engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
            engine.step()
        out[stage] = dict(got=host_params(model, engine), held=held,
                          reference=train_reference_steps(reference, 3))
    return out


def _model_and_reference(cls):
    """Two instances of `cls` from seed 0: one for the engine, one for the torch reference."""
    torch.manual_seed(0)
    model = cls()
    torch.manual_seed(0)
    return model, cls()


def _gathered_units(engine) -> int:
    return sum(unit.state.value != "sharded" for unit in engine.partitioned.units)


def _trained_alike(cls, before_backward=None, after_backward=None) -> dict:
    """Three steps of `cls` at stage 3 and of its single-process reference; `seen`: what
    before_backward(engine, tokens, targets) (a list) and after_backward(engine) returned at
    each step."""
    world_size, rank = comm.world_size(), comm.rank()
    model, reference = _model_and_reference(cls)
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1, world_size))
    seen = []
    for step in range(3):
        tokens, targets = global_batch(step, world_size, 1)
        if before_backward is not None:
            seen += before_backward(engine, tokens[0, rank], targets[0, rank])
        engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
        if after_backward is not None:
            seen.append(after_backward(engine))
        engine.step()
    return dict(got=host_params(model, engine), seen=seen,
                reference=train_reference_steps(reference, 3))


def stage3_special_cases() -> dict:
    """A module called twice per forward (against single-process training), and
    GatheredParameters reading and modifying partitioned parameters (bf16 masters)."""
    world_size, rank = comm.world_size(), comm.rank()
    out = {}

    out["twice"] = _trained_alike(TwiceNet)
    out["pass_through"] = _trained_alike(PassThroughNet, after_backward=_gathered_units)

    # Evaluation (no_grad, inference_mode: generation before RL training) before the first
    # step and between steps: nothing stays gathered after it, and training is unchanged.
    def evaluate(engine, tokens, targets):
        gathered = []
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                for _ in range(2):
                    run(engine, tokens, targets)
            gathered.append(_gathered_units(engine))
        return gathered

    out["evaluation"] = _trained_alike(Blocks, before_backward=evaluate)

    # A backward inside GatheredParameters (a loss reading a weight directly, as fused
    # cross-entropies do): the held unit stays gathered to the context's exit (its backward
    # released it, and the exit then failed reading the released weight), training unchanged.
    model, reference = _model_and_reference(Blocks)
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1, world_size))
    seen = []
    for step in range(3):
        tokens, targets = global_batch(step, world_size, 1)
        with zero_ext.GatheredParameters([model.blocks[1].weight]):
            engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
            seen.append(tuple(model.blocks[1].weight.shape))
        seen.append(model.blocks[1].weight.numel())
        engine.step()
    out["backward_inside"] = dict(got=host_params(model, engine), seen=seen,
                                  reference=train_reference_steps(reference, 3))

    # torch's reentrant checkpoint runs the blocks without autograd in the forward: still the
    # training step's order, recorded whole, so prefetch stays on (and no warning says not).
    torch.manual_seed(0)
    model = ReentrantBlocks()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1, world_size))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(engine, 3)
    order = engine.partitioned.prefetch.order
    out["reentrant"] = dict(forward=None if order is None else len(order["forward"]),
                            units=len(engine.partitioned.units),
                            warned=[str(w.message) for w in caught if "order" in str(w.message)])

    model = build_model()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "bf16", 1, world_size))
    full = engine.full_state_dict()
    with zero_ext.GatheredParameters([model.fc1.weight, model.embed.weight]):
        inside = (tuple(model.fc1.weight.shape), torch.equal(model.fc1.weight.cpu(),
                                                             full["fc1.weight"]))
    released = model.fc1.weight.numel() == 0
    with zero_ext.GatheredParameters([model.fc1.weight, model.embed.weight], modifier_rank=0):
        if rank == 0:
            with torch.no_grad():
                model.fc1.weight.fill_(0.5)
                model.embed.weight[0].fill_(1.0)
    after = engine.full_state_dict()
    tokens, targets = global_batch(0, world_size, 1)
    engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
    engine.step()
    stepped = engine.full_state_dict()["fc1.weight"]
    out["gathered"] = dict(
        inside=inside, released=released, released_after=model.fc1.weight.numel() == 0,
        fc1_all_half=bool((after["fc1.weight"] == 0.5).all()),
        embed_row=bool((after["embed.weight"][0] == 1.0).all()),
        # One AdamW step (lr 1e-2) from 0.5, not from the old random values.
        stepped_near_half=bool(((stepped.float() - 0.5).abs() <= 0.02).all()))

    # A forward inside GatheredParameters keeps the gathered values readable after it, and a
    # modifier context nested in a read-only one keeps its change without an error.
    model = build_model()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(3, "fp32", 1, world_size))
    tokens, targets = global_batch(0, world_size, 1)
    with zero_ext.GatheredParameters([model.fc1.weight]):
        before = model.fc1.weight.detach().clone()
        with torch.no_grad():
            run(engine, tokens[0, rank], targets[0, rank])
        read_after_forward = torch.equal(model.fc1.weight, before)
    nested_error = None
    try:
        with zero_ext.GatheredParameters([model.fc1.weight, model.fc2.weight]):
            with zero_ext.GatheredParameters([model.fc1.weight], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        model.fc1.weight.fill_(0.75)
    except RuntimeError as error:
        nested_error = str(error)
    out["contexts"] = dict(read_after_forward=read_after_forward, nested_error=nested_error,
                           nested_kept=bool((engine.full_state_dict()["fc1.weight"] == 0.75)
                                            .all()),
                           left_gathered=_gathered_units(engine))

    # Rank 0 loads values into every parameter, as DeepSpeed's loading pattern does: the
    # frozen one (a LoRA base weight; kept whole, outside the optimizer) is everyone's too.
    for stage in (1, 3):
        model = build_model()
        model.fc1.weight.requires_grad_(False)
        engine, _, _, _ = zero_ext.initialize(model=model,
                                              config=config(stage, "fp32", 1, world_size))
        with zero_ext.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    for param in model.parameters():
                        param.fill_(0.25)
        out[f"loaded_stage{stage}"] = {
            name: bool((value == 0.25).all()) for name, value in
            engine.full_state_dict().items()}
    return out


def llama(stage: int, **zero) -> dict:
    """A tiny transformers LlamaForCausalLM (random init, tied embeddings, built from a config)
    trained with zero_ext (`zero`: extra zero_optimization keys); rank 0 adds single-process
    training on the whole batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    world_size, rank = comm.world_size(), comm.rank()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=16, tie_word_embeddings=True)

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)

    def lm_loss(model, tokens, _):
        return model(input_ids=tokens, labels=tokens).loss

    model = build()
    engine, _, _, _ = zero_ext.initialize(model=model,
                                          config=config(stage, "fp32", 1, world_size, **zero))
    train_steps(engine, 3, lm_loss)
    out = {"params": host_params(model, engine), "units": len(engine.partitioned.units)
           if engine.partitioned is not None else 0}
    if rank == 0:
        out["reference"] = train_reference_steps(build(), 3, lm_loss)
    return out


def llama_cases() -> dict:
    return {stage: llama(stage) for stage in (2, 3)}


def llama_under_init() -> dict:
    """A tiny LlamaForCausalLM built under zero_ext.Init: its weights come from the model's own
    _init_weights one unit at a time, its rotary buffers are computed, and it trains as the
    same model built normally and given those initial weights (rank 0's reference)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=16, tie_word_embeddings=True)

    def lm_loss(model, tokens, _):
        return model(input_ids=tokens, labels=tokens).loss

    torch.manual_seed(0)
    with zero_ext.Init():
        model = LlamaForCausalLM(cfg)
    all_meta = all(p.is_meta for p in model.parameters())
    # Adam's eps at 1e-5, not 1e-8: with transformers 5.25 some of layer 1's MLP gradients are
    # near zero, where m / (sqrt(v) + 1e-8) turns the reduction order's 1e-7 into moves of a
    # few per cent of lr (the update 1.4e-5 from the reference at 4 ranks; 4.9e-7 at 1e-5).
    adam_eps = 1e-5
    cfg_engine = config(3, "fp32", 1, comm.world_size())
    cfg_engine["optimizer"]["params"]["eps"] = adam_eps
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg_engine)
    initial = engine.full_state_dict()
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    train_steps(engine, 3, lm_loss)
    out = {"all_meta": all_meta, "initial": initial, "buffers": buffers,
           "params": host_params(model, engine)}
    if comm.rank() == 0:
        reference = LlamaForCausalLM(cfg)
        out["plain_buffers"] = {n: b.detach().clone() for n, b in reference.named_buffers()}
        reference.load_state_dict(initial)
        out["reference"] = train_reference_steps(reference, 3, lm_loss, eps=adam_eps)
    return out


class Blocks(nn.Module):
    """An embedding, four blocks in a ModuleList, a head; `swap` runs blocks 1 and 2 out of
    order (control flow that changes the module order)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens, targets, swap=False):
        x = self.embed(tokens)
        for i in ((0, 2, 1, 3) if swap else (0, 1, 2, 3)):
            x = x + F.gelu(self.blocks[i](x))
        return F.cross_entropy(self.head(x).float().view(-1, VOCAB), targets.view(-1))


class ReentrantBlocks(Blocks):
    """Blocks whose linear blocks run under torch.utils.checkpoint(use_reentrant=True), as
    transformers' gradient checkpointing does."""

    def forward(self, tokens, targets, swap=False):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(
                lambda h, block=block: F.gelu(block(h)), x, use_reentrant=True)
        return F.cross_entropy(self.head(x).float().view(-1, VOCAB), targets.view(-1))


def _blocks_watching_ahead(world_size: int, prefetch: int, aheads: tuple[int, ...]):
    """Blocks at stage 3 with this stage3_prefetch_bucket_size, and per distance in `aheads` a
    list to which each block's forward appends the state of the block that far ahead."""
    torch.manual_seed(0)
    model = Blocks()
    engine, _, _, _ = zero_ext.initialize(
        model=model, config=config(3, "fp32", 1, world_size,
                                   stage3_prefetch_bucket_size=prefetch))
    units = {id(u.module): u for u in engine.partitioned.units}
    seen = tuple([] for _ in aheads)
    for states, ahead in zip(seen, aheads):
        for i in range(len(model.blocks) - ahead):
            model.blocks[i].register_forward_pre_hook(
                lambda module, args, states=states, ahead=ahead, i=i: states.append(
                    units[id(model.blocks[i + ahead])].state.value))
    return model, engine, seen


def prefetch_cases() -> dict:
    """What the next block's state is when a block starts its forward, step by step, with
    prefetch on and off; and what happens when the order changes."""
    import warnings

    world_size, rank = comm.world_size(), comm.rank()
    out = {}
    # "below_a_unit": a bucket smaller than any block (as DeepSpeed's 5e7 default is against
    # a 7B decoder layer): the next block is still gathered ahead, the one after it is not.
    for name, prefetch in (("on", 10**9), ("off", 0), ("below_a_unit", 1)):
        model, engine, (seen, seen_two_ahead) = _blocks_watching_ahead(world_size, prefetch,
                                                                       (1, 2))
        steps, steps_two_ahead = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(4):
                seen.clear()
                seen_two_ahead.clear()
                tokens, targets = global_batch(step, world_size, 1)
                loss = engine(tokens[0, rank].to(engine.device),
                              targets[0, rank].to(engine.device), swap=step >= 2)
                engine.backward(loss)
                engine.step()
                steps.append(list(seen))
                steps_two_ahead.append(list(seen_two_ahead))
        out[name] = dict(states=steps, two_ahead=steps_two_ahead,
                         warnings=[str(w.message) for w in caught],
                         params=host_params(model, engine))

    # Inference between training steps (an evaluation in another order, a generation calling
    # part of the model, an evaluation in the training order) runs on its own cursor: the
    # training forwards after it still prefetch, and the in-order evaluation prefetches too.
    # "plain": the same training, without prefetch or inference.
    for name, prefetch in (("inference", 10**9), ("plain", 0)):
        model, engine, (seen,) = _blocks_watching_ahead(world_size, prefetch, (1,))
        training, inference = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(4):
                tokens, targets = global_batch(step, world_size, 1)
                tokens, targets = tokens[0, rank], targets[0, rank]
                seen.clear()
                engine.backward(engine(tokens, targets))
                engine.step()
                training.append(list(seen))
                if prefetch:
                    with torch.no_grad():
                        engine(tokens, targets, swap=True)
                        model.blocks[2](torch.zeros(DIM))
                        seen.clear()
                        engine(tokens, targets)
                        inference.append(list(seen))
        out[name] = dict(training=training, inference=inference,
                         warnings=[str(w.message) for w in caught],
                         params=host_params(model, engine))
    return out


def freed_cases() -> dict:
    """Whether a dropped engine frees its model (and with it every parameter and state
    buffer) at each stage: a sweep that builds one engine after another must not keep the
    earlier ones alive."""
    import gc
    import weakref

    world_size, rank = comm.world_size(), comm.rank()
    alive = {}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = Blocks()
        engine, optimizer, _, _ = zero_ext.initialize(
            model=model, config=config(stage, "fp32", 1, world_size))
        tokens, targets = global_batch(0, world_size, 1)
        engine.backward(engine(tokens[0, rank], targets[0, rank]))
        engine.step()
        refs = [weakref.ref(model), weakref.ref(engine)]
        del model, engine, optimizer
        gc.collect()
        alive[stage] = [ref() is not None for ref in refs]
    return alive


def init_cases() -> dict:
    """Blocks built under zero_ext.Init at stage 3: nothing allocated while building, no tensor
    as large as the model while initializing, then training as a plain model from the same
    initial weights."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                # Floating-point tensors that fill their storage: new allocations of values
                # (the CPU collectives view pieces of their shared arena; metadata goes
                # through pickled byte tensors).
                if isinstance(t, torch.Tensor) and not t.is_meta and t.is_floating_point() \
                        and t.untyped_storage().nbytes() == t.numel() * t.element_size():
                    self.numel = max(self.numel, t.numel())
            return out

    world_size, rank = comm.world_size(), comm.rank()
    torch.manual_seed(0)
    with zero_ext.Init():
        model = Blocks()
    all_meta = all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    largest = LargestTensor()
    comm.all_gather(torch.zeros(world_size), torch.zeros(1))  # the CPU collectives' arena first
    with largest:
        engine, _, _, _ = zero_ext.initialize(model=model,
                                              config=config(3, "fp32", 1, world_size))
    initial = engine.full_state_dict()
    train_steps(engine, 3)
    out = dict(all_meta=all_meta, total=total, largest=largest.numel,
               largest_layout=max(layout.padded_numel for layout in engine.layouts),
               params=host_params(model, engine))
    if rank == 0:
        reference = Blocks()
        reference.load_state_dict(initial)
        out["reference"] = train_reference_steps(reference, 3)
    out["llama"] = llama_under_init()
    try:
        with zero_ext.Init():
            bad = TinyNet()
        # A parameter put on the meta device by hand has no values to take.
        bad.unused.weight = nn.Parameter(torch.empty(5, 3, device="meta"))
        zero_ext.initialize(model=bad, config=config(3, "fp32", 1, world_size))
    except ValueError as error:
        out["meta_parameter_error"] = str(error)
    return out


def unit_classes_cases() -> dict:
    """stage3_unit_classes picks the units: here every Linear (the embedding stays whole)."""
    world_size = comm.world_size()
    torch.manual_seed(0)
    model = Blocks()
    torch.manual_seed(0)
    reference = Blocks()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(
        3, "fp32", 1, world_size, stage3_unit_classes=["Linear"]))
    name_of = {m: n for n, m in model.named_modules()}
    units = sorted(name_of[u.module] for u in engine.partitioned.units)
    train_steps(engine, 2)
    out = dict(units=units, params=host_params(model, engine),
               reference=train_reference_steps(reference, 2))
    try:
        zero_ext.initialize(model=Blocks(), config=config(
            3, "fp32", 1, world_size, stage3_unit_classes=["LlamaDecoderLayer"]))
    except ValueError as error:
        out["missing_error"] = str(error)
    return out


def reuse_cases() -> dict:
    """TwiceNet's linear runs twice per forward: with stage3_max_reuse_distance it stays
    gathered between the two calls (from the second step, once the order is known)."""
    world_size, rank = comm.world_size(), comm.rank()
    out = {}
    for name, distance in (("reuse", 10**9), ("no_reuse", 0)):
        torch.manual_seed(0)
        model = TwiceNet()
        engine, _, _, _ = zero_ext.initialize(model=model, config=config(
            3, "fp32", 1, world_size, stage3_max_reuse_distance=distance))
        calls = []
        for step in range(2):
            tokens, targets = global_batch(step, world_size, 1)
            comm.traffic.reset()
            engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
            calls.append(comm.traffic.calls["all_gather"])
            engine.step()
        out[name] = dict(calls=calls, params=host_params(model, engine))
    return out


def resident_bytes_cases() -> dict:
    """Parameter bytes this rank holds (unit shards, whole-kept buckets, gathered units) seen
    from hooks all through forward and backward, prefetching one block ahead."""
    world_size, rank = comm.world_size(), comm.rank()
    torch.manual_seed(0)
    model = Blocks()
    probe = zero_ext.initialize(model=Blocks(), config=config(3, "fp32", 1, world_size))[0]
    block = max(u.numel for u in probe.partitioned.units
                if u.module in list(probe.module.blocks))
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(
        3, "fp32", 1, world_size, stage3_prefetch_bucket_size=block))
    seen = {"forward": [], "backward": []}

    def sample(phase):
        seen[phase].append(engine.memory_breakdown()["params"])

    def after_forward(module, args, out):
        sample("forward")
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: sample("backward"))

    for module in model.modules():
        module.register_forward_pre_hook(lambda m, a: sample("forward"))
        module.register_forward_hook(after_forward)
    for step in range(2):
        for phase in seen.values():
            phase.clear()
        tokens, targets = global_batch(step, world_size, 1)
        engine.backward(run(engine, tokens[0, rank], targets[0, rank]))
        engine.step()
    unit_bytes = [4 * u.numel for u in engine.partitioned.units]
    shards = sum(4 * s.numel() for u in engine.partitioned.units for s in u.shards)
    whole = sum(4 * f.numel() for f in engine.flat_params)
    return dict(seen=seen, between=engine.memory_breakdown()["params"], base=shards + whole,
                unit_bytes=unit_bytes, full_model=sum(unit_bytes) + whole)


class Borrow(nn.Module):
    """The model's own forward uses `a.weight` outside `a` (a parameter used by a module other
    than its owner)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.a = nn.Linear(DIM, DIM)
        self.b = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens, targets):
        x = self.a(self.embed(tokens))
        x = self.b(x) + F.linear(x, self.a.weight)
        return F.cross_entropy(self.head(x).float().view(-1, VOCAB), targets.view(-1))


def external_parameter_cases() -> dict:
    """Borrow's forward uses a.weight outside `a`: found and gathered by itself (as DeepSpeed
    registers external parameters), or declared with register_external_parameter; both train
    as single-process torch."""
    world_size = comm.world_size()
    out = {}
    for declared in (False, True):
        torch.manual_seed(0)
        model = Borrow()
        torch.manual_seed(0)
        reference = Borrow()
        engine, _, _, _ = zero_ext.initialize(model=model,
                                              config=config(3, "fp32", 1, world_size))
        if declared:
            zero_ext.register_external_parameter(model, model.a.weight)
        train_steps(engine, 3)
        out[declared] = dict(params=host_params(model, engine),
                             reference=train_reference_steps(reference, 3))
        # A forward that raises (a target out of range) leaves no unit held for the next one.
        tokens, targets = global_batch(0, world_size, 1)
        try:
            run(engine, tokens[0, comm.rank()], targets[0, comm.rank()] + VOCAB)
        except (IndexError, RuntimeError):
            pass
        out[declared]["holders_after_error"] = [u.holders for u in engine.partitioned.units]
    return out


class Wide(nn.Module):
    """Eight wide linear blocks and tiny activations: parameter memory dominates."""

    def __init__(self, width: int = 1024, depth: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return x.pow(2).mean()


def cuda_peak_memory() -> dict:
    """Stage 3 on CUDA tensors: how far torch.cuda.max_memory_allocated rises above what a
    rank holds between steps, during one forward and backward (one block prefetched)."""
    world_size = comm.world_size()
    torch.manual_seed(0)
    model = Wide()
    unit_bytes = 4 * (1024 * 1024 + 1024)
    engine, _, _, _ = zero_ext.initialize(model=model, config=config(
        3, "fp32", 1, world_size, stage3_prefetch_bucket_size=unit_bytes // 4))
    x = torch.randn(2, 1024, device=engine.device)
    for _ in range(2):  # the second step runs with the recorded order and prefetch
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.backward(engine(x))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        engine.step()
    return dict(rise=peak - before, unit_bytes=unit_bytes, units=len(model.blocks))


def cuda_offload_states() -> dict:
    """engine.offload_states() on CUDA tensors, stages 2 and 3 in bf16: how far
    torch.cuda.memory_allocated falls (against the bytes moved), whether the host copies are
    pinned, and whether training goes on bit for bit as a twin engine that never offloaded."""
    out = {}
    for stage in (2, 3):
        engines = []
        for _ in range(2):
            torch.manual_seed(0)
            engine, _, _, _ = zero_ext.initialize(model=Wide(), config=config(
                stage, "bf16", 1, comm.world_size()))
            engines.append(engine)
        engine, twin = engines
        x = torch.randn(2, 1024, device=engine.device, dtype=torch.bfloat16)
        for e in engines:
            e.backward(e(x))
            e.step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        engine.offload_states(non_blocking=True)
        torch.cuda.synchronize()
        freed = before - torch.cuda.memory_allocated()
        moved = engine.memory_by_location()["host"]
        pinned = all(s.exp_avg.is_pinned() for s in engine.optimizer.shards)
        engine.reload_states(non_blocking=True)
        for e in engines:
            e.backward(e(x))
            e.step()
        same = all(torch.equal(a, b) for a, b in zip(engine.full_state_dict().values(),
                                                     twin.full_state_dict().values()))
        out[stage] = dict(freed=freed, moved=moved, pinned=pinned, same=same)
    return out


def batch_norm_cases() -> dict:
    """A BatchNorm model under bf16: its parameters cast, its running statistics kept fp32
    (DeepSpeed's casting), which torch's batch_norm refuses on the CPU: initialize says so
    with the fix, and with data_types.buffer_dtype "bf16" the model trains."""
    out = {}
    for data_types in ({}, {"buffer_dtype": "bf16"}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM), nn.Linear(DIM, 1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine, _, _, _ = zero_ext.initialize(model=model, config={
                "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                "data_types": data_types, "zero_optimization": {"stage": 2}})
        try:
            engine.backward(engine(torch.randn(4, DIM).bfloat16()).float().pow(2).mean())
            engine.step()
            trained = None
        except RuntimeError as error:
            trained = str(error)
        out[json.dumps(data_types)] = dict(
            warned=[str(w.message) for w in caught if "batch_norm" in str(w.message)],
            error=trained, stats=str(model[1].running_mean.dtype))
    return out


def generation_cases() -> dict:
    """transformers' generate() at stage 3 with ranks finishing at different lengths (as
    sampled completions do): every rank keeps forwarding until all have finished, else the
    one still generating waits in a gather for the others (a stall, here after 15 s)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    conf = config(3, "fp32", 1, comm.world_size())
    conf["zero_ext"] = {"stall_timeout_s": 15}
    engine, _, _, _ = zero_ext.initialize(model=model, config=conf)
    prompt = torch.arange(4).view(1, 4) + comm.rank()
    new = 2 + 4 * comm.rank()
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    return {"generated": out.shape[1] - prompt.shape[1], "asked": new}


def retrain_cases(out_dir: str) -> dict:
    """ZeroTrainer.train() twice on one model (the learning rates each run logged, and whether
    the second moved the weights), and twice with model_init (whether each train() trained the
    model it built, and how many it built); a run of 6 steps saved at step 3 and resumed with
    max_steps=9, and an uninterrupted run of 9 (the learning rates each logged, and the length
    of the resumed run's schedule)."""
    import transformers

    from zero_ext.integrations.transformers import ZeroTrainer

    def tiny():
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1))

    rates = []

    class Logged(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "learning_rate" in logs:
                rates[-1].append(logs["learning_rate"])

    data = [{"input_ids": torch.arange(8) % 16, "labels": torch.arange(8) % 16}] * 8
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
        lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True)
    trainer = ZeroTrainer(model=tiny(), args=args, train_dataset=data,
                          zero_config={"zero_optimization": {"stage": 2}}, callbacks=[Logged()])
    before = None
    for _ in range(2):
        rates.append([])
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
    moved = any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    # The config's cosine schedule reads its base rate from the groups when built: the second
    # train() builds it again from the rate the first started from, not the one it ended at.
    cosine = []
    trainer = ZeroTrainer(model=tiny(), args=args, train_dataset=data, callbacks=[Logged()],
                          zero_config={"zero_optimization": {"stage": 2}, "scheduler": {
                              "type": "WarmupCosineLR", "params": {
                                  "total_num_steps": "auto", "warmup_num_steps": 1}}})
    for _ in range(2):
        rates.append([])
        trainer.train()
        cosine.append(rates.pop())
    built = []
    trainer = ZeroTrainer(model_init=lambda: built.append(tiny()) or built[-1], args=args,
                          train_dataset=data, zero_config={})
    model_init = []
    for _ in range(2):
        trainer.train()
        model_init.append(trainer.engine.module is trainer.model is built[-1])
    # The config's schedule, its length "auto": the Trainer's max_steps.
    schedule = {"zero_optimization": {"stage": 2}, "scheduler": {
        "type": "WarmupDecayLR",
        "params": {"total_num_steps": "auto", "warmup_num_steps": 1, "warmup_max_lr": "auto"}}}
    resumed_total = None
    for max_steps, resume, run in ((6, None, "saved"), (9, "saved/checkpoint-3", "saved"),
                                   (9, None, "uninterrupted")):
        rates.append([])
        args = transformers.TrainingArguments(
            output_dir=f"{out_dir}/{run}", per_device_train_batch_size=2, max_steps=max_steps,
            learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=3,
            report_to="none", use_cpu=True, disable_tqdm=True)
        trainer = ZeroTrainer(model=tiny(), args=args, train_dataset=data, zero_config=schedule,
                              callbacks=[Logged()])
        trainer.train(resume_from_checkpoint=resume and f"{out_dir}/{resume}")
        if resume:
            resumed_total = trainer.engine.lr_scheduler.total_num_steps
    # A subclass's create_scheduler (halving the rate each step), without a scheduler section:
    # with the config's AdamW and with the Trainer's own optimizer (optim="sgd").
    class Halving(ZeroTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    self.optimizer, lambda step: 0.5 ** step)
            return self.lr_scheduler

    overridden = {}
    for optim in ("adamw_torch", "sgd"):
        rates.append([])
        args = transformers.TrainingArguments(
            output_dir=f"{out_dir}/halving", per_device_train_batch_size=2, max_steps=3,
            learning_rate=1e-2, optim=optim, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True)
        trainer = Halving(model=tiny(), args=args, train_dataset=data, callbacks=[Logged()],
                          zero_config={"zero_optimization": {"stage": 2}})
        trainer.train()
        overridden[optim] = {"rates": rates[-1],
                             "group_lr": trainer.engine.optimizer.param_groups[0]["lr"]}
    # ReduceLROnPlateau, halving the rate at every evaluation that does not raise the eval
    # loss (mode "max"), with the config's AdamW: the plain Trainer's run is the reference.
    plateau = {}
    for name, cls in (("plain", transformers.Trainer), ("zero", ZeroTrainer)):
        rates.append([])
        args = transformers.TrainingArguments(
            output_dir=f"{out_dir}/plateau", per_device_train_batch_size=2, max_steps=4,
            learning_rate=1e-2, lr_scheduler_type="reduce_lr_on_plateau",
            lr_scheduler_kwargs={"mode": "max", "patience": 0, "factor": 0.5},
            eval_strategy="steps", eval_steps=1, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True)
        extra = {"zero_config": {"zero_optimization": {"stage": 2}, "optimizer": {
            "type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}} \
            if cls is ZeroTrainer else {}
        torch.manual_seed(0)
        trainer = cls(model=tiny(), args=args, train_dataset=data, eval_dataset=data[:2],
                      callbacks=[Logged()], **extra)
        trainer.train()
        plateau[name] = {"rates": rates.pop(), "losses": [
            e["loss"] for e in trainer.state.log_history if "loss" in e]}
    return {"rates": rates[:2], "moved": moved, "model_init": model_init, "built": len(built),
            "resumed_rates": rates[3], "uninterrupted_rates": rates[4],
            "resumed_total": resumed_total, "overridden": overridden, "cosine": cosine,
            "plateau": plateau}
