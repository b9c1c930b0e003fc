"""Llama-2-7B (random weights, bf16) on one GPU: ZeRO stage 3 with the optimizer offloaded to the
host and activation checkpointing, sequence length 4096. Prints tokens/s, MFU, peak memory and
where the time went.

    python examples/train_llama_offload.py --batch 4                  # on an H100 (80 GB)
    python examples/train_llama_offload.py --batch 16
    python examples/train_llama_offload.py --batch 16 --json llama7b_b16.json
    python examples/train_llama_offload.py --batch 16 --stage 2       # stage 2 instead of 3
    python examples/train_llama_offload.py --batch 4 --offload-param --cpu-checkpointing
    python examples/train_llama_offload.py --batch 4 --ratio 0.5      # half the optimizer on GPU
    python examples/train_llama_offload.py --batch 4 --number-checkpoints 24  # 8 layers kept
    python examples/train_llama_offload.py --batch 8 --no-offload     # the all-on-GPU ceiling
    python examples/train_llama_offload.py --model 13b --batch 8 --ratio 0.6  # Llama-2-13B
    python examples/train_llama_offload.py --tiny                     # CPU smoke run (seconds)

The model is transformers' LlamaForCausalLM built from Llama-2-7B's shape (hidden 4096,
intermediate 11008, 32 layers, 32 heads, vocab 32000); nothing is downloaded. It is built and
randomly initialized on the GPU, which takes seconds where the host needs minutes and keeps the
13.5 GB of bf16 weights out of host memory. Batches are random tokens. The run is --steps
optimizer steps (default 10), of which the first --warmup (default 2) are left out of every
figure. No gradient clipping by default (--clip 1.0 to clip). No shard steps before the step's
all-rank decision (are the gradients finite? the clipping factor), which needs every gradient:
at stage 3 the CPU step runs behind the next forward, each unit's step awaited by its gather;
at stage 2 it is exposed in engine.step().
--ratio R keeps only the share R of the optimizer state on the host (offload_optimizer.ratio,
DeepSpeed's Twin-Flow): the rest, the buckets backward finishes last, steps on the GPU, whose
free memory it uses (12 bytes per parameter moved), and the CPU step shrinks to R of itself.

Figures (one block, and the same in --json):
  s/step, tokens/s  wall clock over the timed steps, one device sync at each end
  MFU               6 x parameters x tokens per step / s per step / --peak-tflops (default 989,
                    the H100 SXM's dense bf16 peak); the recomputed forward is not counted
  peak GPU memory   torch.cuda.max_memory_allocated over the training steps (the peak is reset
                    after setup, so building the model does not count; what setup left
                    allocated, weights and optimizer state, does)
  peak host memory  over the training steps too: this process's peak resident set (VmHWM,
                    reset through /proc/self/clear_refs; pinned buffers included) and the
                    node's peak in use (MemTotal - MemAvailable, sampled every 50 ms)
  model state       zero_ext.estimate's device and host bytes for this configuration (model
                    states only, no activations), beside what setup left allocated on the
                    device and the process's resident peak after setup
  breakdown         per step: forward, backward and engine.step() as the device's stream saw
                    them (CUDA events, no syncs inside a step); the offload's gradient copies
                    out, CPU AdamW and uploads, and the parts of the CPU step that ran before
                    backward ended, after engine.step() returned (behind the next forward),
                    and inside engine.step() (exposed)

benchmarks/bench_offload.py runs this script as its zero_ext row and compares it with FSDP2 and
DeepSpeed ZeRO-Offload on the same shape; it reuses the functions below.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096}
LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
              "max_position_embeddings": 4096}
MODELS = {"7b": ("Llama-2-7B shape", LLAMA2_7B), "13b": ("Llama-2-13B shape", LLAMA2_13B)}
# The CPU smoke shape: the same code paths in seconds.
TINY = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 4096,
        "max_position_embeddings": 128}


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The run's shape and measurement options, shared with benchmarks/bench_offload.py."""
    parser.add_argument("--tiny", action="store_true",
                        help="2-layer, hidden-256 Llama, seq 128, batch 2: a CPU smoke run")
    parser.add_argument("--model", choices=sorted(MODELS), default="7b",
                        help="the Llama-2 shape (random weights; ignored with --tiny)")
    parser.add_argument("--batch", type=int, default=None,
                        help="micro batch (default 4; 2 with --tiny)")
    parser.add_argument("--seq", type=int, default=None,
                        help="sequence length (default 4096; 128 with --tiny)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps in all")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of figures")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak, for MFU (H100 SXM: 989)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the CPU optimizer step (default: "
                             "torch's choice, one per core)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")


def resolve_shape(args: argparse.Namespace) -> None:
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (128 if args.tiny else 4096)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): the "
                         "figures come from the steps after the warm-up")


def shape_of(args: argparse.Namespace) -> tuple[str, dict]:
    """The run's model: its name and LlamaConfig shape."""
    return ("tiny Llama", TINY) if args.tiny else MODELS[args.model]


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def build_llama(tiny: bool, dtype: torch.dtype, on: torch.device, shape: dict | None = None):
    """LlamaForCausalLM of the 7B (or tiny, or another LlamaConfig `shape`) shape, seeded
    random weights of `dtype` on `on`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or (TINY if tiny else LLAMA2_7B)
    config = LlamaConfig(**shape, use_cache=False)
    torch.manual_seed(0)
    with torch.device(on):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model


def token_batch(step: int, batch: int, seq: int, vocab: int, on: torch.device) -> torch.Tensor:
    """Random tokens drawn on the device itself: a copy from pageable host memory could wait
    for the device, inside the step being timed."""
    generator = torch.Generator(device=on).manual_seed(1000 + step)
    return torch.randint(vocab, (batch, seq), generator=generator, device=on)


class PhaseClock:
    """Marks on the device's timeline: CUDA events on the current stream (read after the run,
    so no sync is added inside a step), the host clock on CPU."""

    def __init__(self, on: torch.device):
        self.cuda = on.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


class NodeMemoryWatch:
    """The node's peak memory in use (MemTotal - MemAvailable), sampled on a thread."""

    def __init__(self, interval: float = 0.05):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    @staticmethod
    def in_use() -> int:
        fields = {}
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                name, value = line.split(":", 1)
                fields[name] = int(value.split()[0]) * 1024
        return fields["MemTotal"] - fields["MemAvailable"]

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.in_use())

    def __enter__(self):
        self.peak = self.in_use()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.in_use())


def reset_peak_memory(on: torch.device) -> None:
    """Peaks from now on: the device allocator's, and this process's resident high-water mark
    (writing 5 to clear_refs resets VmHWM; where that is refused the peak covers setup too)."""
    if on.type == "cuda":
        torch.cuda.reset_peak_memory_stats(on)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM) since reset_peak_memory()."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line in /proc/self/status: peak host memory needs Linux")


def run_steps(args, on: torch.device, params: int, vocab: int, forward, backward, step,
              after_warmup=None) -> dict:
    """Runs args.steps steps of forward(tokens) -> loss, backward(loss), step() and returns the
    figures of the steps after the warm-up (`after_warmup()` runs between the two)."""
    clock = PhaseClock(on)
    sync = torch.cuda.synchronize if on.type == "cuda" else (lambda: None)
    marks, losses = [], []
    sync()
    reset_peak_memory(on)
    with NodeMemoryWatch() as node:
        for index in range(args.steps):
            if index == args.warmup:
                sync()
                if after_warmup is not None:
                    after_warmup()
                start = time.perf_counter()
            tokens = token_batch(index, args.batch, args.seq, vocab, on)
            t0 = clock.mark()
            loss = forward(tokens)
            t1 = clock.mark()
            backward(loss)
            t2 = clock.mark()
            step()
            t3 = clock.mark()
            losses.append(loss.detach())
            if index >= args.warmup:
                marks.append((t0, t1, t2, t3))
        sync()
        wall = time.perf_counter() - start
    timed = args.steps - args.warmup
    per_step = wall / timed
    tokens_per_step = args.batch * args.seq

    def phase(a: int, b: int) -> float:
        return sum(clock.seconds(m[a], m[b]) for m in marks) / timed

    return {
        "params": params, "batch": args.batch, "seq": args.seq, "timed_steps": timed,
        "s_per_step": per_step, "tokens_per_s": tokens_per_step / per_step,
        "mfu": 6 * params * tokens_per_step / per_step / (args.peak_tflops * 1e12),
        "peak_tflops": args.peak_tflops, "threads": torch.get_num_threads(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(on) if on.type == "cuda" else None,
        "peak_host_rss_bytes": peak_rss(),
        "peak_node_bytes": node.peak,
        "forward_s": phase(0, 1), "backward_s": phase(1, 2), "step_s": phase(2, 3),
        "first_loss": losses[0].float().item(), "last_loss": losses[-1].float().item(),
        "device": torch.cuda.get_device_name(on) if on.type == "cuda" else "cpu",
    }


def format_result(title: str, result: dict) -> str:
    """The result block printed by this script and by each row of bench_offload.py."""
    gb = 1e9
    lines = [title,
             (f"  tokens/s            {result['tokens_per_s']:,.0f}  ({result['batch']} x "
              f"{result['seq']} tokens per step, {result['timed_steps']} timed steps on "
              f"{result['device']}, {result['threads']} CPU threads)"),
             f"  s/step              {result['s_per_step']:.3f}",
             (f"  MFU                 {100 * result['mfu']:.3g}%  (6 x "
              f"{result['params'] / 1e9:.3f}B params x tokens / step time / "
              f"{result['peak_tflops']:g} TFLOP/s)")]
    if result["peak_gpu_bytes"] is not None:
        lines.append(f"  peak GPU memory     {result['peak_gpu_bytes'] / gb:.1f} GB "
                     "(max allocated)")
    lines.append(f"  peak host memory    {result['peak_host_rss_bytes'] / gb:.2f} GB process "
                 f"(VmHWM), {result['peak_node_bytes'] / gb:.2f} GB node (in use)")
    lines.append(f"  per step            forward {result['forward_s']:.3f} s, backward "
                 f"{result['backward_s']:.3f} s, step {result['step_s']:.3f} s")
    if "cpu_step_s" in result:
        lines.append(f"  offload per step    grad copy-out {result['grad_copy_s']:.3f} s, CPU "
                     f"step {result['cpu_step_s']:.3f} s ({result['cpu_step_hidden_s']:.3f} s "
                     f"behind backward, {result['cpu_step_deferred_s']:.3f} s behind the next "
                     f"forward, {result['cpu_step_exposed_s']:.3f} s exposed), "
                     f"upload {result['upload_s']:.3f} s")
    if "estimate_device_bytes" in result:
        measured = result["device_state_bytes"]
        lines.append(
            "  model state         estimator: device "
            f"{result['estimate_device_bytes'] / gb:.2f} GB, host "
            f"{result['estimate_host_bytes'] / gb:.2f} GB; measured after setup: device "
            + (f"{measured / gb:.2f} GB allocated" if measured is not None else "n/a")
            + f", host {result['host_rss_after_setup_bytes'] / gb:.2f} GB process (VmHWM)")
    lines.append(f"  loss                {result['first_loss']:.4f} -> "
                 f"{result['last_loss']:.4f}")
    return "\n".join(lines)


def write_json(path: str | None, result: dict) -> None:
    """Through a temporary file: a run killed while writing leaves the previous (complete)
    JSON, which the benchmarks rewrite after each row."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--stage", type=int, default=3, choices=(2, 3))
    parser.add_argument("--offload-param", action="store_true",
                        help="stage 3: keep the parameter shards in host memory too")
    parser.add_argument("--cpu-checkpointing", action="store_true",
                        help="checkpointed blocks' inputs go to host memory in forward")
    parser.add_argument("--no-pin", action="store_true", help="pageable host buffers")
    parser.add_argument("--clip", type=float, default=0.0, help="gradient clipping norm")
    parser.add_argument("--number-checkpoints", type=int, default=None, metavar="N",
                        help="checkpoint only the first N decoder layers (activation_checkpointing"
                             ".number_checkpoints): the rest keep their activations, using "
                             "spare GPU memory to skip their recomputation")
    parser.add_argument("--ratio", type=float, default=1.0,
                        help="offload_optimizer.ratio: the share of the optimizer state on the "
                             "host (the rest steps on the GPU)")
    parser.add_argument("--no-offload", action="store_true",
                        help="every state on the device: the ceiling the offload runs are "
                             "judged against")
    args = parser.parse_args()
    resolve_shape(args)
    if args.no_offload and (args.offload_param or args.ratio != 1.0 or args.cpu_checkpointing):
        parser.error("--no-offload keeps every state on the device: leave out --offload-param, "
                     "--ratio and --cpu-checkpointing")
    if args.offload_param and args.stage != 3:
        parser.error("--offload-param needs --stage 3 (stage 2 keeps parameters whole on the "
                     "device)")

    import zero_ext
    from zero_ext import checkpointing
    from zero_ext.estimate import estimate_from_config

    on = device()
    name, shape = shape_of(args)
    model = build_llama(args.tiny, torch.bfloat16, on, shape)
    params = sum(p.numel() for p in model.parameters())
    checkpointing.apply(model)
    pin = not args.no_pin
    zero = {"stage": args.stage, "overlap_comm": True}
    if not args.no_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin, "ratio": args.ratio}
    if args.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config = {
        "train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": args.clip,
        "bf16": {"enabled": True}, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "activation_checkpointing": {"cpu_checkpointing": args.cpu_checkpointing,
                                     "number_checkpoints": args.number_checkpoints},
        "zero_optimization": zero}
    # The estimator's model-state bytes for this configuration, before the engine exists (its
    # figures do not count activations: compare them with the state measured after setup).
    predicted = estimate_from_config(model, config, 1)
    engine, _, _, _ = zero_ext.initialize(model=model, config=config)
    state = {"device_state_bytes": torch.cuda.memory_allocated(on) if on.type == "cuda"
             else None, "host_rss_after_setup_bytes": peak_rss(),
             "estimate_device_bytes": predicted.device.total,
             "estimate_host_bytes": predicted.host.total}
    offloaded = engine.offload is not None

    result = run_steps(
        args, on, params, model.config.vocab_size,
        forward=lambda tokens: engine(input_ids=tokens, labels=tokens).loss,
        backward=engine.backward, step=engine.step,
        # the warm-up's figures are dropped
        after_warmup=engine.offload.timings if offloaded else None)
    result.update(impl="zero_ext", model=name, stage=args.stage, offload=offloaded,
                  offload_param=args.offload_param, cpu_checkpointing=args.cpu_checkpointing,
                  clip=args.clip, ratio=args.ratio if offloaded else 0.0,
                  number_checkpoints=args.number_checkpoints,
                  shards=len(engine.optimizer.shards), **state)
    if offloaded:
        offload = engine.offload.timings()
        timed = result["timed_steps"]
        result.update(host_shards=len(engine.offload.shards),
                      grad_copy_s=offload.grad_copy_s / timed,
                      cpu_step_s=offload.cpu_step_s / timed,
                      cpu_step_hidden_s=offload.cpu_step_hidden_s / timed,
                      cpu_step_deferred_s=offload.cpu_step_deferred_s / timed,
                      cpu_step_exposed_s=offload.cpu_step_exposed_s / timed,
                      upload_s=offload.upload_s / timed, hidden_fraction=offload.hidden_fraction)
    extras = [f"stage {args.stage}", "no offload" if not offloaded else
              "offload_optimizer" + (" (pin_memory)" if pin else "")
              + (f" ratio {args.ratio:g}" if args.ratio < 1 else "")]
    if args.offload_param:
        extras.append("offload_param")
    extras.append("activation checkpointing" + (" (cpu)" if args.cpu_checkpointing else "")
                  + (f" of the first {args.number_checkpoints} layers"
                     if args.number_checkpoints else ""))
    if args.clip:
        extras.append(f"clip {args.clip:g}")
    print(format_result(f"[train_llama_offload] zero_ext, {name}: {', '.join(extras)}", result),
          flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
