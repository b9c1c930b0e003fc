"""Time zero_ext.fused's norms (fused with the residual add) and activations against eager
PyTorch and torch.compile of the same eager code, forward and forward + backward, on CPU or
CUDA.

    python benchmarks/bench_norms.py                          # bf16, H = 1024 .. 16384
    python benchmarks/bench_norms.py --dtype float32 --hidden 4096 --tokens 4M --ops rms swiglu
    python benchmarks/bench_norms.py --device cuda --tokens 64M     # on the GPU (synchronized)

The norms compute ``h = x + residual; y = norm(h)`` and return (y, h), as a pre-norm
transformer block uses them, and the backward sends a gradient through both; swiglu is
``silu(gate) * up`` and gelu ``gelu(x + bias, approximate="tanh")``. The rows are
``tokens / H`` so every H moves the same bytes. Each figure is the fastest of --repeats timed
calls after warm-up (the slower runs are the ones disturbed by other jobs); ratios are
eager / fused and compile / fused (above 1: the fused op is faster); with --no-compile the
compile column repeats eager.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from zero_ext.fused import bias_gelu, layer_norm, rms_norm, swiglu

# name: (fused, eager, number of [rows, H] inputs, number of [H] inputs)
OPS = {
    "rms": (lambda x, r, w: rms_norm(x, w, 1e-6, residual=r),
            lambda x, r, w: (F.rms_norm(x + r, (x.shape[-1],), w, 1e-6), x + r), 2, 1),
    "layer": (lambda x, r, w, b: layer_norm(x, w, b, 1e-5, residual=r),
              lambda x, r, w, b: (F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-5), x + r), 2, 2),
    "swiglu": (swiglu, lambda g, u: F.silu(g) * u, 2, 0),
    "gelu": (lambda x, b: bias_gelu(x, b, "tanh"),
             lambda x, b: F.gelu(x + b, approximate="tanh"), 1, 1),
}


def _time(fn, repeats: int, device: str) -> float:
    def now() -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter()

    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = now()
        fn()
        best = min(best, now() - start)
    return best


def _case(impl, inputs, backward: bool):
    leaves = [t.detach().requires_grad_(backward) for t in inputs]

    def run():
        outs = impl(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if backward:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            for t in leaves:
                t.grad = None

    return run


def _inputs(rows: int, hidden: int, n_rows: int, n_vectors: int, device: str,
            dtype: torch.dtype, gen: torch.Generator | None) -> list[torch.Tensor]:
    """n_rows [rows, hidden] inputs and n_vectors [hidden] ones. On CUDA drawn on the device in
    `dtype` with `gen` (a CPU randn of 64M elements, then an upload, costs seconds each)."""
    if device == "cpu":
        return ([torch.randn(rows, hidden).to(device, dtype) for _ in range(n_rows)]
                + [(torch.rand(hidden) + 0.5).to(device, dtype) for _ in range(n_vectors)])
    return ([torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
             for _ in range(n_rows)]
            + [torch.rand(hidden, device=device, dtype=dtype, generator=gen).add_(0.5)
               for _ in range(n_vectors)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--tokens", default="4M", help="rows * H elements per call (K/M suffix)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-compile", action="store_true",
                        help="leave torch.compile out (each case compiles anew: slow)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (1 gives steadier figures on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    units = {"K": 1 << 10, "M": 1 << 20}
    tokens = int(args.tokens[:-1]) * units[args.tokens[-1]] if args.tokens[-1] in units \
        else int(args.tokens)
    dtype = getattr(torch, args.dtype)
    where = (f"CPU, {torch.get_num_threads()} threads" if args.device == "cpu"
             else torch.cuda.get_device_name())
    print(f"{where}, {args.dtype}, {tokens} elements per call; "
          f"ms (fastest of {args.repeats}), ratios eager/fused and compile/fused")
    print(f"{'op':<16}{'H':>6}{'rows':>6}{'fused':>9}{'eager':>9}{'compile':>9}"
          f"{'e/f':>7}{'c/f':>7}")
    gen = torch.Generator(args.device).manual_seed(0) if args.device != "cpu" else None
    for name in args.ops:
        fused, eager, n_rows, n_vectors = OPS[name]
        for backward in (False, True):
            for hidden in args.hidden:
                rows = max(1, tokens // hidden)
                inputs = _inputs(rows, hidden, n_rows, n_vectors, args.device, dtype, gen)
                # A fresh compile per case: each shape compiles its own kernels anyway, and
                # dynamo's cache per function would hit its recompile limit.
                torch._dynamo.reset()
                compiled = eager if args.no_compile else torch.compile(eager, dynamic=False)
                times = [_time(_case(impl, inputs, backward), args.repeats, args.device) * 1e3
                         for impl in (fused, eager, compiled)]
                label = f"{name} {'fwd+bwd' if backward else 'fwd'}"
                print(f"{label:<16}{hidden:>6}{rows:>6}{times[0]:>9.3f}{times[1]:>9.3f}"
                      f"{times[2]:>9.3f}{times[1] / times[0]:>7.2f}{times[2] / times[0]:>7.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
