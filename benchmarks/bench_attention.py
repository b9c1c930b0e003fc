"""Time and peak memory of zero_ext's scaled masked softmax + dropout, alone and inside attention,
against eager PyTorch, torch.compile of the eager code, and SDPA, forward + backward on CPU.

    python benchmarks/bench_attention.py                                 # every shape, fp32
    python benchmarks/bench_attention.py --shapes 4x12x512x64 --dtype bfloat16 --parts softmax

Shapes are BxHxLxD (batch, heads, sequence, head dimension). ``softmax`` times
``dropout(softmax(scale * scores + mask))`` on [B, H, L, L] scores with HF's additive causal mask
([1, 1, L, L]) and p = 0.1: zero_ext.fused.scaled_masked_softmax ("fused") against the eager
ops ("eager") and ``torch.compile`` of them ("compile"). ``attention`` times the whole attention
of q, k, v [B, H, L, D]: transformers' eager_attention_forward written out ("eager"), the same
with the fused softmax (zero_ext.fused.attention.zero_ext_eager_attention, "fused"), and
``F.scaled_dot_product_attention`` with the same mask and dropout ("sdpa"). Each (part, impl,
shape) runs in a fresh process; the peak extra memory (beyond inputs and returned gradients) is
measured as benchmarks/bench_kernels.py measures it, from VmHWM after malloc_trim and a reset.
Times are the fastest of --repeats forward + backward calls after a warm-up.
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
from bench_kernels import _status_kib
from torch import nn

from zero_ext.fused.attention import zero_ext_eager_attention
from zero_ext.fused.softmax import scaled_masked_softmax

SHAPES = ["8x12x256x64", "4x12x512x64", "1x16x1024x64"]
PARTS = {"softmax": ["fused", "eager", "compile"], "attention": ["fused", "eager", "sdpa"]}
DROPOUT = 0.1


def _causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    """HF's eager mask: 0 where attended, the dtype's minimum above the diagonal."""
    upper = torch.ones(length, length, dtype=torch.bool).triu(1)
    return torch.zeros(length, length, dtype=dtype).masked_fill(
        upper, torch.finfo(dtype).min)[None, None]


def _eager_softmax(scores, mask, scale):
    weights = torch.softmax(scores * scale + mask, dim=-1, dtype=torch.float32)
    return F.dropout(weights.to(scores.dtype), DROPOUT, training=True)


def _softmax_fn(impl: str):
    if impl == "fused":
        return lambda s, mask, scale: scaled_masked_softmax(s, mask, scale=scale,
                                                            dropout_p=DROPOUT)
    return torch.compile(_eager_softmax, dynamic=False) if impl == "compile" else _eager_softmax


def _eager_attention(module, q, k, v, mask, scaling, dropout):
    weights = _eager_softmax(torch.matmul(q, k.transpose(2, 3)), mask, scaling)
    return torch.matmul(weights, v).transpose(1, 2).contiguous()


def _attention_fn(impl: str):
    module = nn.Module()  # training mode, as the attention interface's module argument
    if impl == "fused":
        return lambda q, k, v, mask, s: zero_ext_eager_attention(module, q, k, v, mask, s,
                                                                 DROPOUT)[0]
    if impl == "sdpa":
        return lambda q, k, v, mask, s: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=DROPOUT, scale=s).transpose(1, 2).contiguous()
    return lambda q, k, v, mask, s: _eager_attention(module, q, k, v, mask, s, DROPOUT)


def _inputs(part: str, b: int, h: int, length: int, d: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(b, h, length, length)] if part == "softmax" else [(b, h, length, d)] * 3
    leaves = [torch.randn(*s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    return leaves, _causal_mask(length, dtype), d ** -0.5


def peak_and_time(part: str, impl: str, shape: str, dtype: torch.dtype, repeats: int) -> dict:
    """In this process: forward + backward of one implementation; peak extra bytes and seconds.
    Call it in a fresh process (``--child``), as bench_kernels.peak_and_time."""
    fn = (_softmax_fn if part == "softmax" else _attention_fn)(impl)
    b, h, length, d = (int(x) for x in shape.split("x"))
    leaves, mask, scale = _inputs(part, b, h, length, d, dtype)

    def step():
        out = fn(*leaves, mask, scale)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    step()  # loads the kernels, compiles
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    grads = step()
    seconds = time.perf_counter() - t0
    returned = sum(g.numel() * g.element_size() for g in grads)
    peak = _status_kib("VmHWM")
    del grads
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step()
        seconds = min(seconds, time.perf_counter() - t0)
    return {"part": part, "impl": impl, "shape": shape, "seconds": seconds,
            "peak_extra_bytes": (peak - base) * 1024 - returned,
            "scores_bytes": b * h * length * length * leaves[0].element_size()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="BxHxLxD")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("PART", "IMPL", "SHAPE"),
                        help="measure one case in this process, print one JSON line")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.child:
        print(json.dumps(peak_and_time(*args.child, dtype, args.repeats)))
        return
    print(f"CPU, {torch.get_num_threads()} threads, {args.dtype}, dropout {DROPOUT}, forward + "
          "backward; ms (fastest of --repeats) and peak MiB beyond inputs and gradients")
    for part in args.parts:
        for shape in args.shapes:
            row = []
            for impl in PARTS[part]:
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", part, impl, shape,
                     "--dtype", args.dtype, "--repeats", str(args.repeats)],
                    capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                mib = r["peak_extra_bytes"] / 2 ** 20
                row.append(f"{impl} {r['seconds'] * 1e3:8.1f} ms {mib:7.1f} MiB")
            scores = r["scores_bytes"] / 2 ** 20
            print(f"{part:<10}{shape:<14}scores {scores:6.1f} MiB | " + " | ".join(row),
                  flush=True)


if __name__ == "__main__":
    main()
