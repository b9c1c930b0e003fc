"""Training-step time, memory and traffic: zero_ext ZeRO stages 0-2 against DDP, torch's
ZeroRedundancyOptimizer and DeepSpeed, on a small GPT, all in one torchrun launch.

    torchrun --nproc_per_node=2 benchmarks/bench_zero.py                  # CPU, gloo, fp32
    torchrun --nproc_per_node=2 benchmarks/bench_zero.py --dtype bf16
    torchrun --nproc_per_node=1 benchmarks/bench_zero.py
    torchrun --nproc_per_node=1 benchmarks/bench_zero.py --json zero_ws1.json   # on a GPU: NCCL
    torchrun --nproc_per_node=2 benchmarks/bench_zero.py --layers 8 --d-model 512 --breakdown
    torchrun --nproc_per_node=2 benchmarks/bench_zero.py --impls ddp,zero_ext --bucket 1e6
    torchrun --nproc_per_node=2 benchmarks/bench_zero.py --impls ddp,zero_ext --compile inductor
    torchrun --nproc_per_node=2 benchmarks/bench_zero.py --optimizer adagrad  # a client optimizer

Every implementation trains the same model (same seed, same initial weights) on the same
synthetic token batches (seeded per rank) with AdamW (--optimizer adagrad: torch's Adagrad
everywhere, zero_ext and DeepSpeed running it on their shards) at lr 1e-4, weight decay 0.01,
one after the other, each freed before the next:
  ddp             DistributedDataParallel (gradient_as_bucket_view) + torch.optim.AdamW, fused
                  when this torch supports it on the device, else foreach. The baseline.
  ddp+zero-redund DDP + torch.distributed.optim.ZeroRedundancyOptimizer(AdamW, same kind).
  zero_ext s0-s3  zero_ext.initialize with zero_optimization.stage 0, 1, 2, 3 and overlap_comm.
                  At the default --bucket (5e7 elements) the default model is one bucket, so its
                  gradient reduction starts only after the whole backward, where DDP's default
                  buckets (25 MiB, the first 1 MiB) overlap part of it; --bucket 1e6 gives
                  zero_ext four buckets.
  deepspeed s0-s2 deepspeed.initialize with the same config, where it runs here (else the row
                  says why not). Imported last: importing DeepSpeed reconfigures the process.
With --compile BACKEND every implementation's model is torch.compile'd in place before it
trains (DDP: model.compile() inside the DDP wrapper; zero_ext and DeepSpeed: engine.compile()),
so compiled rows compare with compiled rows; the compilation falls in the warm-up steps.
Each runs --warmup steps, then --steps timed steps, and the whole sequence repeats --rounds times
(rebuilt each time), so that load from elsewhere on a shared machine falls on several
implementations rather than on one. A step is forward + backward + optimizer step. Ranks meet at
a barrier before and after the timed loop only; rank 0 stamps the clock after every step (after
torch.cuda.synchronize on a GPU) and reports the median over all rounds' timed steps, and on CPU
the medians of its two host-side phases, forward+backward and optimizer step.

Columns:
  step ms      median step time on rank 0; vs DDP is that over DDP's median step.
  samples/s    global: micro batch x world size / median step.
  state MiB    model-state bytes on the rank holding most, measured after backward and before
               the optimizer step (gradients present, optimizer state allocated): params +
               grads + fp32 master copy + exp_avg + exp_avg_sq. zero_ext: the sum of
               engine.memory_breakdown(). DDP and ZeroRedundancyOptimizer: parameters, .grad and
               optimizer-state tensors, each storage counted once (DDP's bucket views are the
               .grad storage). DeepSpeed: every tensor storage reachable from Python that the
               implementation created (gc scan against the set that existed before it), which
               is the same quantity as long as DeepSpeed keeps its buffers in Python attributes.
  peak MiB     GPU: torch.cuda.max_memory_allocated over warm-up and timed steps (activations
               included), reset between implementations. CPU: the process's peak RSS
               (VmHWM) over the same span, per rank, after resetting the high-water mark
               through /proc/self/clear_refs; it includes the ~0.3 GiB of libraries. From the
               first round, before DeepSpeed's import adds its own libraries.
  comm         elements (and MiB) each rank sends per step, ring-algorithm sense.
               zero_ext: measured by zero_ext.comm.traffic over the last timed step.
               DDP: theory, all-reduce of the fp32 gradients: 2 psi (N-1)/N elements.
               ZeroRedundancyOptimizer: theory, that all-reduce plus the broadcast of every
               parameter from its owner: psi (0 at N = 1).
               DeepSpeed: theory of its stage (0: all-reduce 2 psi (N-1)/N; 1-2: reduce-scatter
               + all-gather, 2 psi (N-1)/N) in its training dtype.
  psi is the number of parameters (the tied embedding / LM head counted once).

--dtype bf16 is mixed precision, and not the same recipe on both sides: zero_ext and DeepSpeed
get {"bf16": {"enabled": true}}, i.e. bf16 weights, activations, gradients and gradient
reductions, with the fp32 master weights and AdamW moments in the optimizer (sharded at stages
1-2); DDP and ZeroRedundancyOptimizer keep fp32 parameters, gradients and reductions and run the
forward under torch.autocast(bfloat16), which casts weights to bf16 per op.

The project's goal, printed with pass/fail at the end: on CPU, zero_ext stages 1 and 2 within
10% of DDP's step time (ratio <= 1.10); at world size 1 on a GPU, stage 2 within 5% of plain
PyTorch AdamW (DDP at world size 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import zero_ext

LR, WEIGHT_DECAY = 1e-4, 0.01
MIB = 2**20


# -- the model --------------------------------------------------------------------------------
@dataclass(kw_only=True)
class GPTConfig:
    vocab: int     # token ids, and the tied embedding / LM head's rows
    seq: int       # context length (learned positions)
    d_model: int
    layers: int    # transformer blocks
    heads: int     # attention heads; d_model must divide by it


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.heads
        self.ln_attn = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp_in = nn.Linear(d, 4 * d)
        self.mlp_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(batch, seq, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(batch, seq, d))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x))))


class GPT(nn.Module):
    """Token embedding + learned positions, pre-LN blocks, final LayerNorm, tied LM head.
    forward(tokens, targets) returns the mean next-token cross-entropy."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab, cfg.d_model)
        self.positions = nn.Embedding(cfg.seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.lm_head.weight = self.tokens.weight
        for module in self.modules():  # GPT-2's init; N(0, 1) embeddings would blow up the logits
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_final(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# -- measuring --------------------------------------------------------------------------------
def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def live_storages(device: torch.device) -> dict[int, int]:
    """data_ptr -> bytes of every storage on `device` that a Python-visible tensor holds."""
    out = {}
    with warnings.catch_warnings():  # isinstance() wakes deprecated module attributes up
        warnings.simplefilter("ignore")
        tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.device == device and t.numel() > 0:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                continue
            out[storage.data_ptr()] = storage.nbytes()
    return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the process's RSS high-water mark (VmHWM, what peak_memory reads)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then it is the peak since the process started


@dataclass
class Comm:
    """Elements and bytes each rank sends per step, per collective."""

    elements: dict[str, float]
    bytes: dict[str, float]
    calls: dict[str, int] = field(default_factory=dict)
    measured: bool = False

    def describe(self) -> str:
        kind = "measured" if self.measured else "theory"
        parts = [f"{op} " + (f"{self.calls[op]}x " if op in self.calls else "")
                 + f"{count(n)} el/{count(self.bytes[op], 'B')}" for op, n in self.elements.items()]
        return f"comm {kind}: " + (", ".join(parts) if parts else "none")


def count(n: float, unit: str = "") -> str:
    """12 el, 3.717M el; 16 B, 14.18 MiB."""
    if unit == "B":
        return f"{n / MIB:.2f} MiB" if n >= MIB / 10 else f"{n:.0f} B"
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n:.0f}"


def ring_theory(psi: int, world: int, element_size: int, collectives: dict[str, float]) -> Comm:
    """Per-rank ring traffic of the given collectives, each as a multiple of psi elements
    (all_reduce 2(N-1)/N, reduce_scatter and all_gather (N-1)/N, broadcast 1 when N > 1)."""
    factor = {"all_reduce": 2 * (world - 1) / world, "reduce_scatter": (world - 1) / world,
              "all_gather": (world - 1) / world, "broadcast": 1.0 if world > 1 else 0.0}
    elements = {op: psi * times * factor[op] for op, times in collectives.items()}
    return Comm(elements, {op: n * element_size for op, n in elements.items()})


# -- the implementations ----------------------------------------------------------------------
@dataclass
class Trainer:
    """One implementation, built and ready to train."""

    forward_backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer_step: Callable[[], None]
    state_bytes: Callable[[], int]        # model-state bytes on this rank, now
    comm: Callable[[], Comm]              # after the last timed step
    note: str
    cleanup: Callable[[], None] = lambda: None


@dataclass(kw_only=True)
class Setup:
    """What every implementation is built from."""

    cfg: GPTConfig
    device: torch.device
    micro_batch: int
    bf16: bool
    bucket_numel: int
    torch_adamw: dict          # {"fused": True} or {"foreach": True}
    breakdown: bool
    optimizer: str = "adamw"   # or "adagrad": torch's Adagrad in every row (see --optimizer)
    total_steps: int           # warm-up + timed: where the engines' own progress lines go
    compile: str | None = None  # torch.compile backend for every implementation's model

    def model(self) -> GPT:
        torch.manual_seed(0)  # every implementation starts from the same weights
        return GPT(self.cfg).to(self.device)

    def torch_optimizer(self) -> tuple[type, dict]:
        """The torch optimizer class and its arguments every row runs (AdamW: zero_ext's and
        DeepSpeed's config section instead; Adagrad: passed to them as a client optimizer)."""
        if self.optimizer == "adagrad":
            return torch.optim.Adagrad, {"lr": LR, "weight_decay": WEIGHT_DECAY,
                                         "foreach": True}
        return torch.optim.AdamW, {"lr": LR, "weight_decay": WEIGHT_DECAY, **self.torch_adamw}

    def client(self, model: nn.Module):
        """zero_ext's and DeepSpeed's optimizer argument: None with AdamW (the config's)."""
        cls, kwargs = self.torch_optimizer()
        return None if self.optimizer == "adamw" else cls(model.parameters(), **kwargs)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_ddp(setup: Setup, shard_optimizer: bool) -> Trainer:
    model = setup.model()
    if setup.compile:
        model.compile(backend=setup.compile)
    psi, world = num_params(model), dist.get_world_size()
    ddp = DistributedDataParallel(
        model, device_ids=[setup.device.index] if setup.device.type == "cuda" else None,
        gradient_as_bucket_view=True)
    cls, kwargs = setup.torch_optimizer()
    if shard_optimizer:
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
        local = opt.optim
        theory = ring_theory(psi, world, 4, {"all_reduce": 1, "broadcast": 1})
    else:
        opt = local = cls(model.parameters(), **kwargs)
        theory = ring_theory(psi, world, 4, {"all_reduce": 1})

    def forward_backward(tokens, targets):
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.bf16):
            loss = ddp(tokens, targets)
        loss.backward()
        return loss

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def state_bytes():
        params = list(model.parameters())
        moments = [v for s in local.state.values() for v in s.values()]
        return storage_bytes(params + [p.grad for p in params] + moments)

    kind = next(k for k in ("fused", "foreach") if kwargs.get(k))
    note = (f"torch.optim.{cls.__name__}({kind}=True)" + (" sharded by ZeroRedundancyOptimizer"
                                                 if shard_optimizer else "")
            + ("; fp32 params, autocast bf16" if setup.bf16 else ""))
    return Trainer(forward_backward, optimizer_step, state_bytes, lambda: theory, note)


def zero_config(setup: Setup, stage: int) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": setup.micro_batch,
        "gradient_accumulation_steps": 1,
        **({"optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}}}
           if setup.optimizer == "adamw" else {}),
        "zero_optimization": {"stage": stage, "reduce_bucket_size": setup.bucket_numel,
                              "overlap_comm": True},
        # The engines' progress line: after the last step with --breakdown, else never.
        "steps_per_print": setup.total_steps + (0 if setup.breakdown else 1),
    }
    if setup.bf16:
        config["bf16"] = {"enabled": True}
    return config


def build_zero_ext(setup: Setup, stage: int) -> Trainer:
    config = zero_config(setup, stage)
    if setup.breakdown:
        config["wall_clock_breakdown"] = True  # totals over all steps, printed after the last
    model = setup.model()
    engine, _, _, _ = zero_ext.initialize(model=model, config=config, model_parameters=None,
                                          optimizer=setup.client(model))
    if setup.compile:
        engine.compile(backend=setup.compile)

    def forward_backward(tokens, targets):
        loss = engine(tokens, targets)
        engine.backward(loss)
        return loss

    def comm():
        snap = zero_ext.comm.traffic.snapshot()
        return Comm(snap.elements, snap.bytes, snap.calls, measured=True)

    buckets = len(engine.layouts)
    return Trainer(forward_backward, engine.step,
                   lambda: sum(engine.memory_breakdown().values()), comm,
                   f"{buckets} bucket{'s' * (buckets > 1)} of <= {setup.bucket_numel:.3g} el"
                   + (", bf16 weights+grads, fp32 master" if setup.bf16 else ""))


def build_deepspeed(setup: Setup, stage: int) -> Trainer:
    import deepspeed  # here, not at the top: only when its rows run, after the others

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    before = live_storages(setup.device)
    model = setup.model()
    psi, world = num_params(model), dist.get_world_size()
    client = setup.client(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=zero_config(setup, stage),
        **({"optimizer": client} if client is not None else
           {"model_parameters": model.parameters()}))
    if setup.compile:
        engine.compile(backend=setup.compile)

    def forward_backward(tokens, targets):
        loss = engine(tokens, targets)
        engine.backward(loss)
        return loss

    def state_bytes():
        gc.collect()
        return sum(n for ptr, n in live_storages(setup.device).items() if ptr not in before)

    collectives = {"all_reduce": 1} if stage == 0 else {"reduce_scatter": 1, "all_gather": 1}
    theory = ring_theory(psi, world, 2 if setup.bf16 else 4, collectives)
    opt = type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__
    return Trainer(forward_backward, engine.step, state_bytes, lambda: theory,
                   f"DeepSpeed {deepspeed.__version__}, {type(engine.optimizer).__name__}"
                   f"({opt}); state from a gc scan",
                   cleanup=lambda: engine.destroy() if hasattr(engine, "destroy") else None)


# -- running ----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(trainer: Trainer, batches, warmup: int, steps: int, device: torch.device) -> dict:
    """Warm-up, then timed steps: rank 0's per-step and per-phase seconds, this rank's figures."""
    state = None
    for i in range(warmup):
        trainer.forward_backward(*batches[i])
        if i == warmup - 1:  # gradients present; optimizer state made by the steps before
            state = trainer.state_bytes()
        trainer.optimizer_step()
    # Phases are host-side spans: on a GPU, without a synchronize between them, they show
    # launch time, so only the step total is reported there.
    step_times, fwd_bwd_times = [], []
    synchronize(device)
    dist.barrier()
    last = time.perf_counter()
    for i in range(warmup, warmup + steps):
        if i == warmup + steps - 1:
            zero_ext.comm.traffic.reset()
        loss = trainer.forward_backward(*batches[i])
        mid = time.perf_counter()
        trainer.optimizer_step()
        synchronize(device)
        now = time.perf_counter()
        step_times.append(now - last)
        fwd_bwd_times.append(mid - last)
        last = now
    dist.barrier()
    return {"step_times": step_times, "fwd_bwd_times": fwd_bwd_times, "state": state,
            "loss": loss.detach().float().item(), "comm": trainer.comm()}


def measure(build: Callable[[], Trainer], setup: Setup, batches, args) -> dict:
    """Builds one implementation, trains it, frees it. Every rank returns the same keys."""
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(setup.device)
    trainer, error = None, None
    try:
        trainer = build()
    # DeepSpeed missing, or its op builds or its backend failing here, skips the row.
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    errors = [e for e in gather(error) if e is not None]
    if errors:  # every rank skips together, or the next collective would hang
        return {"error": errors[0]}
    result = train(trainer, batches, args.warmup, args.steps, setup.device)
    result.update(peak=zero_ext.progress.peak_memory(setup.device), note=trainer.note,
                  threads=torch.get_num_threads())
    trainer.cleanup()
    del trainer
    result.update(state=gather(result["state"]), peak=gather(result["peak"]))
    return result


def summarize(name: str, rounds: list[dict], setup: Setup) -> dict:
    """One row from an implementation's rounds: medians over all their timed steps."""
    if "error" in rounds[0]:
        return {"impl": name, "error": rounds[0]["error"]}
    steps = [t for r in rounds for t in r["step_times"]]
    fwd_bwd = [t for r in rounds for t in r["fwd_bwd_times"]]
    opt = [s - f for s, f in zip(steps, fwd_bwd)]
    seconds = statistics.median(steps)
    comm, world = rounds[-1]["comm"], dist.get_world_size()
    phases = None if setup.device.type == "cuda" else {
        "fwd+bwd": 1e3 * statistics.median(fwd_bwd), "opt step": 1e3 * statistics.median(opt)}
    return {
        "impl": name, "step_ms": 1e3 * seconds, "step_ms_all": [1e3 * t for t in steps],
        "phase_ms": phases, "samples_per_s": setup.micro_batch * world / seconds,
        "state_bytes_per_rank": rounds[0]["state"],
        "peak_bytes_per_rank": rounds[0]["peak"],  # later rounds' RSS includes DeepSpeed's import
        "comm_elements": sum(comm.elements.values()), "comm_bytes": sum(comm.bytes.values()),
        "comm_measured": comm.measured, "comm_detail": comm.describe(),
        "loss_rank0": rounds[-1]["loss"], "threads": rounds[-1]["threads"],
        "note": rounds[-1]["note"]}


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def pick_torch_adamw(device: torch.device) -> dict:
    """fused=True where this torch has a fused AdamW for the device, else foreach=True."""
    try:
        param = nn.Parameter(torch.zeros(4, device=device))
        param.grad = torch.ones_like(param)
        torch.optim.AdamW([param], fused=True).step()
        return {"fused": True}
    except (RuntimeError, ValueError, NotImplementedError):
        return {"foreach": True}


def add_ratios(rows: list[dict]) -> None:
    """vs_ddp: each row's median step over DDP's (None without a DDP row)."""
    baseline = next((r["step_ms"] for r in rows if r["impl"] == "ddp" and "error" not in r),
                    None)
    for r in rows:
        if "error" not in r:
            r["vs_ddp"] = r["step_ms"] / baseline if baseline else None


def print_table(rows: list[dict], device: torch.device) -> None:
    peak_name = "peak alloc MiB" if device.type == "cuda" else "RSS peak MiB"
    print(f"\n{'impl':<16}{'step ms':>9}{'samples/s':>11}{'vs DDP':>8}{'state MiB':>11}"
          f"{peak_name:>16}{'comm el/step':>14}{'comm MiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<16}  unavailable: {r['error']}")
            continue
        ratio = f"{r['vs_ddp']:.2f}x" if r["vs_ddp"] else "-"
        comm_kind = "" if r["comm_measured"] else "*"
        peaks = "/".join(f"{b / MIB:.0f}" for b in r["peak_bytes_per_rank"])
        print(f"{r['impl']:<16}{r['step_ms']:9.1f}{r['samples_per_s']:11.1f}{ratio:>8}"
              f"{max(r['state_bytes_per_rank']) / MIB:11.2f}{peaks:>16}"
              f"{r['comm_elements'] / 1e6:13.3f}M{r['comm_bytes'] / MIB:9.2f}{comm_kind}")
    print("(* theory, not measured; peak MiB per rank, rank 0 first)")
    for r in rows:
        if "error" not in r:
            spread = f"steps {min(r['step_ms_all']):.0f}-{max(r['step_ms_all']):.0f} ms"
            if r["phase_ms"]:
                spread += ", median " + ", ".join(f"{k} {v:.1f}" for k, v in r["phase_ms"].items())
            print(f"  {r['impl']:<15} {r['note']}; {spread}; loss {r['loss_rank0']:.4f}; "
                  f"{r['comm_detail']}")


def print_goal(rows: list[dict], device: torch.device, world: int) -> None:
    by_name = {r["impl"]: r for r in rows if "error" not in r}
    if device.type == "cpu":
        names, limit, what = ["zero_ext s1", "zero_ext s2"], 1.10, "CPU: zero_ext s1/s2 vs DDP"
    elif world == 1:
        names, limit, what = ["zero_ext s2"], 1.05, "GPU, world size 1: zero_ext s2 vs DDP+AdamW"
    else:
        print("\nGoal: none stated for GPUs at world size > 1")
        return
    if "ddp" not in by_name:
        print("\nGoal: not evaluated without the ddp row")
        return
    ratios = {n: by_name[n]["vs_ddp"] for n in names if n in by_name}
    ok = len(ratios) == len(names) and all(v <= limit for v in ratios.values())
    detail = ", ".join(f"{n} {v:.3f}x" for n, v in ratios.items()) or "not measured"
    print(f"\nGoal ({what} step time <= {limit:.2f}x): {detail} -> {'PASS' if ok else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--bucket", type=float, default=5e7,
                        help="zero_ext/DeepSpeed reduce_bucket_size, elements")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each implementation is built and timed, in turn")
    parser.add_argument("--impls", default="ddp,ddp+zero-redund,zero_ext,deepspeed",
                        help="comma-separated families to run")
    parser.add_argument("--breakdown", action="store_true",
                        help="zero_ext wall_clock_breakdown: its phase totals at the last step")
    parser.add_argument("--json", help="write the rows here (rank 0)")
    parser.add_argument("--optimizer", choices=["adamw", "adagrad"], default="adamw",
                        help="adagrad: torch's Adagrad in every row, given to zero_ext and "
                             "DeepSpeed as a client optimizer (stepping their fp32 shards)")
    parser.add_argument("--compile", metavar="BACKEND",
                        help="torch.compile every implementation's model with this backend")
    args = parser.parse_args()
    if min(args.steps, args.rounds) < 1 or args.warmup < 2:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 2 (model state is measured "
                     "in the last warm-up step, after torch's AdamW has made its state)")

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    cfg = GPTConfig(vocab=args.vocab, seq=args.seq, d_model=args.d_model, layers=args.layers,
                    heads=args.heads)
    setup = Setup(cfg=cfg, device=device, micro_batch=args.micro_batch, bf16=args.dtype == "bf16",
                  bucket_numel=int(args.bucket), torch_adamw=pick_torch_adamw(device),
                  breakdown=args.breakdown, optimizer=args.optimizer,
                  total_steps=args.warmup + args.steps, compile=args.compile)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own data
    batches = []
    for _ in range(args.warmup + args.steps):
        tokens = torch.randint(0, cfg.vocab, (args.micro_batch, cfg.seq + 1), device=device,
                               generator=gen)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))

    families = set(args.impls.split(","))
    unknown = families - {"ddp", "ddp+zero-redund", "zero_ext", "deepspeed"}
    if unknown:
        parser.error(f"--impls: unknown {sorted(unknown)}")
    impls: list[tuple[str, Callable[[], Trainer]]] = []
    if "ddp" in families:
        impls.append(("ddp", lambda: build_ddp(setup, shard_optimizer=False)))
    if "ddp+zero-redund" in families:
        impls.append(("ddp+zero-redund", lambda: build_ddp(setup, shard_optimizer=True)))
    for family, build in (("zero_ext", build_zero_ext), ("deepspeed", build_deepspeed)):
        if family in families:
            stages = range(4) if family == "zero_ext" else range(3)  # DeepSpeed's 3: not here
            impls += [(f"{family} s{s}", lambda b=build, s=s: b(setup, s)) for s in stages]

    if rank == 0:
        psi = num_params(GPT(cfg))
        where = (torch.cuda.get_device_name(device) if use_cuda else
                 f"CPU, {torch.get_num_threads()} thread(s) per rank, {os.cpu_count()} cores")
        print(f"GPT d_model {cfg.d_model}, {cfg.layers} layers, {cfg.heads} heads, vocab "
              f"{cfg.vocab}, seq {cfg.seq}: {psi / 1e6:.2f}M params; micro batch "
              f"{args.micro_batch} x {world} rank(s), {args.dtype}, "
              f"{dist.get_backend()}, {where}; torch {torch.__version__}; "
              f"{args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed steps"
              + (f"; every model torch.compile'd ({args.compile})" if args.compile else ""),
              flush=True)
    # Rounds interleave the implementations in time, so a burst of load from elsewhere on
    # the machine lands on several of them rather than on one.
    results: dict[str, list[dict]] = {name: [] for name, _ in impls}
    for round_index in range(args.rounds):
        for name, build in impls:
            if results[name] and "error" in results[name][0]:
                continue
            results[name].append(measure(build, setup, batches, args))
            r = results[name][-1]
            if rank == 0:
                print(f"  round {round_index + 1}/{args.rounds} {name}: " + (
                    f"{1e3 * statistics.median(r['step_times']):.1f} ms/step" if "error" not in r
                    else "unavailable"), flush=True)
    rows = [summarize(name, results[name], setup) for name, _ in impls]
    add_ratios(rows)
    if rank == 0:
        print_table(rows, device)
        print_goal(rows, device, world)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": vars(cfg), "world_size": world, "dtype": args.dtype,
                               "device": str(device), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
