"""Time zero_ext.fused.rms_norm / layer_norm (fused with the residual add) against eager PyTorch
and torch.compile of the same eager code, forward and forward + backward, on CPU.

    python benchmarks/bench_norms.py                          # bf16, H = 1024 .. 16384
    python benchmarks/bench_norms.py --dtype float32 --hidden 4096 --tokens 4M

Every variant computes ``h = x + residual; y = norm(h)`` and returns (y, h), as a pre-norm
transformer block uses them; the backward sends a gradient through both. The rows are
``tokens / H`` so every H moves the same bytes. Each figure is the fastest of --repeats timed
calls after warm-up (the slower runs are the ones disturbed by other jobs); ratios are
eager / fused and compile / fused (above 1: the fused op is faster).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from zero_ext.fused import layer_norm, rms_norm


def _eager(kind, x, r, w, b):
    h = x + r
    if kind == "rms":
        return F.rms_norm(h, (h.shape[-1],), w, 1e-6), h
    return F.layer_norm(h, (h.shape[-1],), w, b, 1e-5), h


def _fused(kind, x, r, w, b):
    if kind == "rms":
        return rms_norm(x, w, 1e-6, residual=r)
    return layer_norm(x, w, b, 1e-5, residual=r)


def _time(fn, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _case(impl, kind, inputs, grads, backward: bool):
    leaves = [t.detach().requires_grad_(backward) for t in inputs]

    def run():
        y, h = impl(kind, *leaves)
        if backward:
            torch.autograd.backward((y, h), grads)
            for t in leaves:
                t.grad = None

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--tokens", default="4M", help="rows * H elements per call (K/M suffix)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    units = {"K": 1 << 10, "M": 1 << 20}
    tokens = int(args.tokens[:-1]) * units[args.tokens[-1]] if args.tokens[-1] in units \
        else int(args.tokens)
    dtype = getattr(torch, args.dtype)
    print(f"CPU, {torch.get_num_threads()} threads, {args.dtype}, {tokens} elements per call; "
          f"ms (fastest of {args.repeats}), ratios eager/fused and compile/fused")
    print(f"{'op':<28}{'H':>6}{'rows':>6}{'fused':>9}{'eager':>9}{'compile':>9}"
          f"{'e/f':>7}{'c/f':>7}")
    for kind in ("rms", "layer"):
        for backward in (False, True):
            for hidden in args.hidden:
                # One compiled function per case: each shape compiles its own kernels anyway,
                # and a shared one would hit dynamo's recompile limit.
                compiled = torch.compile(_eager, dynamic=False)
                rows = max(1, tokens // hidden)
                x, r = (torch.randn(rows, hidden).to(dtype) for _ in range(2))
                w = (torch.rand(hidden) + 0.5).to(dtype)
                b = torch.randn(hidden).to(dtype)
                grads = [torch.randn(rows, hidden).to(dtype) for _ in range(2)]
                inputs = (x, r, w, b)
                times = [_time(_case(impl, kind, inputs, grads, backward), args.repeats)
                         for impl in (_fused, _eager, compiled)]
                name = f"{kind}_norm+residual {'fwd+bwd' if backward else 'fwd'}"
                fused, eager, comp = (t * 1e3 for t in times)
                print(f"{name:<28}{hidden:>6}{rows:>6}{fused:>9.3f}{eager:>9.3f}{comp:>9.3f}"
                      f"{eager / fused:>7.2f}{comp / fused:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
