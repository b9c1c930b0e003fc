"""Time and peak memory of zero_ext's fused training ops against the unfused PyTorch they replace.

    python benchmarks/bench_kernels.py                          # every size below, CPU, fp32
    python benchmarks/bench_kernels.py --sizes 4096x128256x1024 --impls fused eager
    python benchmarks/bench_kernels.py --peak fused 4096 16384 1024   # one JSON line (the test)
    python benchmarks/bench_kernels.py --step               # a Llama step: off/on/compile/on-own-add
    python benchmarks/bench_kernels.py --impls fused --workspace-mib 8 64   # workspace choices
    python benchmarks/bench_kernels.py --device cuda --dtype bfloat16 --sizes 8192x128256x4096

Fused linear cross-entropy (zero_ext.fused.linear_cross_entropy) against eager
``F.cross_entropy(hidden @ weight.T, target)`` and ``torch.compile`` of that eager function, for
N tokens x V classes x H hidden, forward + backward (gradients of hidden and weight), mean
reduction. "fused" computes the gradients in the forward; "recompute" is the same op's
recomputing backward (reduction="none", then the mean), the path before the one-pass one. Each
(implementation, size) runs in a fresh Python process, so one run's freed memory cannot hide the
next one's peak.

Peak extra memory is read from the kernel, not from torch: torch's CPU allocator keeps no
statistics, but it takes every tensor from malloc and frees it back, so the process's resident
set is an upper bound on live tensors. In the child, after the inputs exist and a tiny warm-up
has loaded the libraries, ``malloc_trim(0)`` hands freed heap pages back to the kernel (so
reusing them later faults them in again and counts), writing 5 to ``/proc/self/clear_refs``
resets the high-water mark VmHWM to the current RSS (the baseline), and after forward + backward
``VmHWM - baseline - bytes(returned gradients)`` is the peak memory beyond the inputs and the
results: logits, buffers and temporaries. Times are the fastest of --repeats runs (after one
untimed run that also compiles), on the machine's default torch thread count. With ``--device
cuda`` the peak comes from torch's CUDA allocator instead (``max_memory_allocated`` beyond what
was allocated before the call, less the returned gradients) and the times are synchronized.

``--step``: a whole training step (forward with labels, backward, torch AdamW) of a small
transformers LlamaForCausalLM with a 32000-token vocabulary, unfused, with every kernel swapped
in by zero_ext.fused.apply, and torch.compile'd unfused; tokens/s and the peak memory of forward
+ backward beyond the model and optimizer state, each in a fresh process as above.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from zero_ext.fused import linear_cross_entropy
from zero_ext.progress import peak_memory

SIZES = ["1024x32000x512", "2048x50257x768", "4096x128256x1024"]
IMPLS = ["fused", "recompute", "eager", "compile"]


def _eager(hidden, weight, target):
    return F.cross_entropy(hidden @ weight.T, target)


def _recompute(hidden, weight, target):
    return linear_cross_entropy(hidden, weight, target, reduction="none").mean()


def _loss_fn(impl: str, workspace_bytes: int | None = None):
    if impl == "fused":
        return lambda h, w, t: linear_cross_entropy(h, w, t, workspace_bytes=workspace_bytes)
    if impl == "recompute":
        return _recompute
    if impl == "eager":
        return _eager
    if impl == "compile":
        return torch.compile(_eager)
    raise ValueError(f"bench_kernels: unknown implementation {impl!r}")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"bench_kernels: /proc/self/status has no {field}")


def _reset_peak() -> int:
    """Hands freed heap pages back to the kernel and restarts VmHWM from the current RSS (see the
    module docstring); returns that baseline in bytes."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _inputs(n: int, v: int, h: int, device: str = "cpu", dtype=torch.float32):
    if torch.device(device).type != "cpu":
        # Drawn on the device in the target dtype: CPU randn of the largest case (525M
        # elements), then an upload, takes seconds of a short GPU session.
        gen = torch.Generator(device).manual_seed(0)
        hidden = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
        weight = torch.randn(v, h, generator=gen, device=device, dtype=dtype).mul_(h ** -0.5)
        target = torch.randint(0, v, (n,), generator=gen, device=device)
        return hidden, weight.requires_grad_(), target
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen).mul_(h ** -0.5).to(device, dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, target


def _peak_meter(device: str):
    """(start, peak) for one measured call: on CPU VmHWM past the trimmed resident set (module
    docstring), on CUDA the allocator's peak past what is allocated when it starts."""
    if device == "cpu":
        return _reset_peak, lambda: peak_memory(torch.device("cpu"))

    def start() -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    return start, torch.cuda.max_memory_allocated


def _now(device: str) -> float:
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_and_time(impl: str, n: int, v: int, h: int, repeats: int,
                  workspace_bytes: int | None = None, device: str = "cpu",
                  dtype: str = "float32") -> dict:
    """In this process: forward + backward of one implementation; peak extra bytes and seconds.

    Call it in a fresh process (``--peak``): see the module docstring for why and how."""
    fn = _loss_fn(impl, workspace_bytes)
    dtype_ = getattr(torch, dtype)
    small = _inputs(8, 16, 8, device, dtype_)
    torch.autograd.grad(fn(*small), small[:2])  # loads kernels, thread pool, compiles
    hidden, weight, target = _inputs(n, v, h, device, dtype_)

    def step():
        return torch.autograd.grad(fn(hidden, weight, target), (hidden, weight))

    if impl == "compile" or device != "cpu":
        step()  # compiles for this shape (on CUDA: warms cuBLAS) before the measured call
    start, peak_now = _peak_meter(device)
    base = start()
    t0 = _now(device)
    grads = step()
    seconds = _now(device) - t0
    peak = peak_now()
    returned = sum(g.numel() * g.element_size() for g in grads)
    del grads
    for _ in range(repeats - 1):
        t0 = _now(device)
        step()
        seconds = min(seconds, _now(device) - t0)
    return {"impl": impl, "n": n, "v": v, "h": h, "workspace_bytes": workspace_bytes,
            "device": device, "dtype": dtype,
            "seconds": seconds,
            "peak_extra_bytes": peak - base - returned,
            "hidden_bytes": hidden.numel() * hidden.element_size(),
            "logits_bytes": n * v * 4}


def _in_fresh_process(*args: str) -> dict:
    """This script run with `args` in a new Python process: the JSON line it prints last."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:  # show why: captured, the child's traceback would be lost
        tail = "\n".join(out.stderr.splitlines()[-40:])
        print(f"bench_kernels: child {' '.join(args)} exited {out.returncode}; last lines of "
              f"its stderr:\n{tail}", file=sys.stderr, flush=True)
        raise RuntimeError(f"bench_kernels: child {' '.join(args)} exited {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(impl: str, n: int, v: int, h: int, repeats: int = 1,
            workspace_bytes: int | None = None, device: str = "cpu",
            dtype: str = "float32") -> dict:
    """peak_and_time in a fresh Python process (what the memory test calls)."""
    workspace = [] if workspace_bytes is None else ["--workspace-bytes", str(workspace_bytes)]
    return _in_fresh_process("--peak", impl, str(n), str(v), str(h), "--repeats", str(repeats),
                             "--device", device, "--dtype", dtype, *workspace)


# -- a Llama training step with the kernels on and off (--step) --------------------------------
# "on-own-add": "on" with the decoder layers' own forwards (the residual add a tensor add before
# the fused norm): what the residual add in the norm's pass changes, in the same run.
STEP_IMPLS = ["off", "on", "compile", "on-own-add"]
# Tiny, but with a real vocabulary: the logits (and their gradient) of 32000 classes dominate a
# step's activations, as in a full-size model; runs on 2 CPU cores in a few seconds a step.
STEP_SHAPE = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000}


def llama_step(impl: str, batch: int, seq: int, steps: int, dtype: str) -> dict:
    """In this process: `steps` training steps (forward with labels, backward, AdamW) of a
    STEP_SHAPE LlamaForCausalLM, unfused ("off"), with zero_ext.fused.apply ("on"; "on-own-add"
    without the residual add in the norm) or torch.compile'd unfused ("compile"); tokens/s of
    the fastest step, the peak memory of a forward + backward beyond the model and optimizer
    state (VmHWM reset before each step: the activations, logits and gradients, what the
    kernels change), and the first timed loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import zero_ext.fused

    torch.manual_seed(0)
    config = LlamaConfig(**STEP_SHAPE, max_position_embeddings=seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    swapped = zero_ext.fused.apply(model) if impl.startswith("on") else {}
    if impl == "on-own-add":
        for layer in model.model.layers:
            del layer.forward  # the instance forward apply() gave it
        swapped["residual_norm"] = 0
    forward = torch.compile(model) if impl == "compile" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq),
                        generator=torch.Generator().manual_seed(1))

    def step() -> tuple[float, int]:
        """One step: its loss, and the peak resident bytes of its forward and backward."""
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        peak = peak_memory(torch.device("cpu"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), peak

    step()  # allocates the optimizer state; compiles
    times, cpu_times, losses, peaks = [], [], [], []
    for _ in range(steps):
        base = _reset_peak()  # the model, the AdamW state, no gradients
        t0, c0 = time.perf_counter(), time.process_time()
        loss, peak = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(loss)
        peaks.append(peak - base)
    # CPU seconds (all threads) as well as wall time: on a machine shared with other jobs the
    # wall time varies by 2x between runs, the work a step does much less.
    return {"impl": impl, "dtype": dtype, "tokens": batch * seq, "swapped": swapped,
            "tokens_per_s": batch * seq / min(times), "step_s": min(times),
            "cpu_s": min(cpu_times),
            "peak_extra_bytes": max(peaks), "loss": losses[0],
            "logits_bytes": batch * seq * config.vocab_size * 4}


def step_report(impls: list[str], batch: int, seq: int, steps: int, dtype: str) -> None:
    """Each implementation's llama_step in a fresh process (its peak memory is its own)."""
    print(f"Llama training step (hidden {STEP_SHAPE['hidden_size']}, "
          f"{STEP_SHAPE['num_hidden_layers']} layers, vocabulary {STEP_SHAPE['vocab_size']}), "
          f"batch {batch} x seq {seq}, CPU {dtype}, {torch.get_num_threads()} threads, "
          f"fastest of {steps} steps; peak = forward + backward beyond the model and AdamW state")
    results = {}
    for impl in impls:
        r = results[impl] = _in_fresh_process("--step-one", impl, "--batch", str(batch),
                                              "--seq", str(seq), "--steps", str(steps),
                                              "--dtype", dtype)
        line = (f"  {impl:8s} {r['tokens_per_s']:6.0f} tokens/s  step {r['step_s']:6.2f} s "
                f"({r['cpu_s']:6.2f} CPU s)  peak {r['peak_extra_bytes'] / 2**20:5.0f} MiB  loss "
                f"{r['loss']:.6f}")
        if impl != "off" and "off" in results:
            off = results["off"]
            line += (f"  vs off: speed {r['tokens_per_s'] / off['tokens_per_s']:.2f}x, CPU time "
                     f"{r['cpu_s'] / off['cpu_s']:.2f}x, memory "
                     f"{r['peak_extra_bytes'] / max(off['peak_extra_bytes'], 1):.2f}x")
        if r["swapped"]:
            line += f"  swapped {r['swapped']}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="NxVxH")
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workspace-mib", nargs="+", type=float, default=[None],
                        help="fused's workspace_bytes in MiB, one run each (default: the op's)")
    parser.add_argument("--peak", nargs=4, metavar=("IMPL", "N", "V", "H"),
                        help="measure one implementation in this process, print one JSON line")
    parser.add_argument("--step", nargs="*", choices=STEP_IMPLS, metavar="IMPL",
                        help=f"time a Llama training step instead ({' '.join(STEP_IMPLS)}; "
                             "all without a value)")
    parser.add_argument("--step-one", choices=STEP_IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="the cross-entropy's device (--step runs on CPU)")
    parser.add_argument("--workspace-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step_one:
        print(json.dumps(llama_step(args.step_one, args.batch, args.seq, args.steps,
                                    args.dtype)))
        return
    if args.step is not None:
        step_report(args.step or STEP_IMPLS, args.batch, args.seq, args.steps, args.dtype)
        return
    if args.peak:
        impl, n, v, h = args.peak
        print(json.dumps(peak_and_time(impl, int(n), int(v), int(h), args.repeats,
                                       args.workspace_bytes, args.device, args.dtype)))
        return
    where = (f"CPU, {torch.get_num_threads()} threads" if args.device == "cpu"
             else torch.cuda.get_device_name())
    print(f"linear cross-entropy, {where}, {args.dtype}, forward + backward; peak = memory "
          "beyond inputs and returned gradients")
    for size in args.sizes:
        n, v, h = (int(x) for x in size.split("x"))
        results = {}
        for impl in args.impls:
            for mib in args.workspace_mib if impl == "fused" else [None]:
                name = impl if mib is None else f"{impl}@{mib:g}MiB"
                workspace = None if mib is None else int(mib * 2**20)
                results[name] = measure(impl, n, v, h, args.repeats, workspace, args.device,
                                        args.dtype)
        hidden_mb = next(iter(results.values()))["hidden_bytes"] / 2**20
        print(f"N={n} V={v} H={h}: hidden {hidden_mb:.1f} MiB, fp32 logits "
              f"{n * v * 4 / 2**20:.0f} MiB")
        for impl, r in results.items():
            peak = r["peak_extra_bytes"]
            line = (f"  {impl:14s} {r['seconds'] * 1e3:9.1f} ms  peak {peak / 2**20:8.1f} MiB "
                    f"({peak / r['hidden_bytes']:.2f}x hidden)")
            fused = next((name for name in results if name.startswith("fused")), None)
            if fused is not None and impl != fused:
                f = results[fused]
                line += (f"  {fused}/{impl}: time {f['seconds'] / r['seconds']:.2f}x, memory "
                         f"{f['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):.3f}x")
            print(line, flush=True)


if __name__ == "__main__":
    main()
