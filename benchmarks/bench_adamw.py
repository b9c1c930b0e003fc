"""AdamW step throughput: zero_ext against torch (for-loop, foreach, fused) and DeepSpeed.

    python benchmarks/bench_adamw.py                       # CPU, and CUDA when a GPU is present
    python benchmarks/bench_adamw.py --device cpu --cpu-params 64M --threads 16
    python benchmarks/bench_adamw.py --device cuda --cuda-params 256M

Two cases, on the same tensors for every implementation:
  fp32      fp32 params, grads and state: 28 bytes of traffic per parameter.
  offload   the CPU-offload / mixed-precision step: fp32 master params and state, bf16 grads in,
            bf16 params out (also 28 bytes per parameter). zero_ext does it in one pass; the
            torch baseline is what a user would write: cast the grads up, fused step, cast the
            params down. DeepSpeed's CPU Adam runs the same composition around its own step.
Each line prints params/s, effective GB/s (28 B/param over the step time), the fraction of a
memory-bandwidth ceiling measured in the same run (the faster of a large tensor copy and a large
in-place add, which shares AdamW's read-modify-write pattern), and the
ratio to the baseline of that case (torch fused for fp32, the torch composition for offload).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import zero_ext

BYTES_PER_PARAM = 28
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.01


def parse_count(text: str) -> int:
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def split_sizes(total: int, pieces: int) -> list[int]:
    """Uneven tensor sizes, like a model's, summing to `total`."""
    weights = [1 + (i % 7) for i in range(pieces)]
    sizes = [total * w // sum(weights) for w in weights]
    sizes[0] += total - sum(sizes)
    return sizes


def timer(device: str) -> Callable[[Callable[[], None], int], float]:
    """Seconds per call of fn, the median of `repeats` timed calls after warm-up."""

    def measure(fn: Callable[[], None], repeats: int) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return measure


def bandwidth_ceiling(device: str, numel: int, measure) -> tuple[float, float]:
    """Bytes/s of a large copy (read + write) and of an in-place add (2 reads + 1 write).

    The in-place add has AdamW's access pattern: every written line was read first, so a CPU
    pays no read-for-ownership on it, which a plain copy pays on its destination.
    """
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    copy = 2 * 4 * numel / measure(lambda: dst.copy_(src), 10)
    in_place = 3 * 4 * numel / measure(lambda: dst.add_(src), 10)
    return copy, in_place


class Tensors:
    """Params (fp32), their grads and bf16 copies, split into uneven tensors."""

    def __init__(self, total: int, pieces: int, device: str):
        gen = torch.Generator(device=device).manual_seed(0)
        self.sizes = split_sizes(total, pieces)
        self.params = [torch.nn.Parameter(torch.randn(n, device=device, generator=gen) * 0.02)
                       for n in self.sizes]
        self.grads32 = [torch.randn(n, device=device, generator=gen) * 1e-3 for n in self.sizes]
        self.grads16 = [g.to(torch.bfloat16) for g in self.grads32]
        self.copies16 = [torch.empty(n, device=device, dtype=torch.bfloat16) for n in self.sizes]

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p) for p in self.params]


def zero_ext_step(t: Tensors, mixed: bool) -> Callable[[], None]:
    m, v = t.zeros(), t.zeros()
    steps = [torch.tensor(0.0) for _ in t.params]
    params = [p.data for p in t.params]
    grads = t.grads16 if mixed else t.grads32
    copies = t.copies16 if mixed else []

    def step():
        zero_ext.ops.adamw_step_(params, grads, m, v, steps, copies, lr=LR, beta1=BETAS[0],
                                 beta2=BETAS[1], eps=EPS, weight_decay=WD)

    return step


def deepspeed_step(t: Tensors, mixed: bool, device: str) -> Callable[[], None] | None:
    try:
        if device == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam as DSAdam
        else:
            from deepspeed.ops.adam import FusedAdam as DSAdam
        opt = DSAdam(t.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)
    except Exception as error:  # not installed, or its JIT build failed here
        print(f"  (DeepSpeed {'CPU Adam' if device == 'cpu' else 'FusedAdam'} unavailable: "
              f"{type(error).__name__}: {str(error).splitlines()[0][:100]})")
        return None
    return optimizer_step(t, mixed, opt)


def optimizer_step(t: Tensors, mixed: bool, opt) -> Callable[[], None]:
    """A torch-API optimizer's step; in the offload case wrapped in the casts a user writes."""
    if not mixed:
        for p, g in zip(t.params, t.grads32):
            p.grad = g
        return lambda: opt.step()
    for p in t.params:
        p.grad = torch.empty_like(p)
    grads = [p.grad for p in t.params]

    def step():  # cast grads up, step, cast params down
        torch._foreach_copy_(grads, t.grads16)
        opt.step()
        torch._foreach_copy_(t.copies16, [p.data for p in t.params])

    return step


def run(device: str, total: int, pieces: int, repeats: int, with_deepspeed: bool) -> list[dict]:
    measure = timer(device)
    copy, in_place = bandwidth_ceiling(device, min(total, 2**28), measure)
    ceiling = max(copy, in_place)
    name = torch.cuda.get_device_name() if device == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads, {zero_ext._C.cpu_isa_selected()} kernels"
    print(f"\n{device}: {total / 2**20:.0f}M params in {pieces} tensors on {name}; "
          f"bandwidth ceiling {ceiling / 1e9:.1f} GB/s (copy {copy / 1e9:.1f}, in-place add "
          f"{in_place / 1e9:.1f})")
    t = Tensors(total, pieces, device)
    rows = []
    for case, mixed in (("fp32", False), ("offload", True)):
        # Built one at a time, just before timing, so each holds its state only while measured
        # and DeepSpeed (whose import reconfigures the process) comes last.
        factories: dict[str, Callable[[], Callable[[], None] | None]] = {
            "zero_ext": lambda: zero_ext_step(t, mixed),
            "torch fused": lambda: optimizer_step(t, mixed, torch.optim.AdamW(
                t.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)),
            "torch foreach": lambda: optimizer_step(t, mixed, torch.optim.AdamW(
                t.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=True)),
            "torch for-loop": lambda: optimizer_step(t, mixed, torch.optim.AdamW(
                t.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)),
        }
        if with_deepspeed:
            factories["deepspeed"] = lambda: deepspeed_step(t, mixed, device)
        seconds = {}
        for impl, factory in factories.items():
            fn = factory()
            if fn is not None:
                seconds[impl] = measure(fn, repeats)
            del fn
        baseline = seconds["torch fused"]
        print(f"  case {case}" + (" (torch rows: cast up, step, cast down)" if mixed else ""))
        for impl, s in seconds.items():
            gbps = BYTES_PER_PARAM * total / s / 1e9
            row = dict(device=device, case=case, impl=impl, seconds=s,
                       gparams_per_s=total / s / 1e9, gb_per_s=gbps,
                       of_ceiling=gbps * 1e9 / ceiling, vs_baseline=baseline / s)
            rows.append(row)
            print(f"    {impl:<15} {s * 1e3:9.2f} ms  {row['gparams_per_s']:7.3f} Gparam/s  "
                  f"{gbps:7.1f} GB/s  {100 * row['of_ceiling']:5.1f}% of ceiling  "
                  f"{row['vs_baseline']:5.2f}x torch fused{' composition' if mixed else ''}")
        for p in t.params:
            p.grad = None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--cpu-params", default="64M")
    parser.add_argument("--cuda-params", default="256M")
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-deepspeed", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("\ncuda: no GPU here, skipped")
            continue
        total = parse_count(args.cpu_params if device == "cpu" else args.cuda_params)
        run(device, total, args.tensors, args.repeats, not args.no_deepspeed)


if __name__ == "__main__":
    main()
