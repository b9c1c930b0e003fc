"""Throughput and error of the blockwise quantization ops (zero_ext.ops.quantize_chunks,
dequantize_sum_), to pick the default block size by measurement, and of top-k selection with
error feedback (zero_ext.ops.topk_feedback_select).

    python benchmarks/bench_quant.py                       # CPU, and CUDA when a GPU is present
    python benchmarks/bench_quant.py --sizes 1M 16M --blocks 256 --device cpu
    python benchmarks/bench_quant.py --only topk --sizes 12M --device cpu

For each device, size and block size it prints GB/s of
  - quantize int8 / int4, without and with error feedback (fp8 residual read and written),
  - dequantize_sum_ of 4 senders' int8 / int4 rows into fp32 (the reduce-scatter receive side),
counted as the bytes the op must move (input + output [+ residual in and out]), next to the same
work written in plain torch ops and to torch's copy_ of the same number of bytes (memcpy: the
physical limit); ratios are op / copy and op / torch. quantize_chunks allocates its output on
every call, as callers use it; on CPU that costs fresh pages (page faults) which copy_ into
preallocated buffers does not pay. Then the relative L2 quantization error
||x - dequant(quant(x))|| / ||x|| per block size on Gaussian and heavy-tailed (Student t, 2
degrees of freedom: rare huge gradients that inflate a block's scale) data. The "topk select"
rows (CPU: the op has no CUDA kernel) time one send of a bf16 gradient in 2 chunks at density
1%, with and without momentum, as ns per element and GB/s of the bytes the op must move
(gradient, residual and momentum read and written, the residual read again, the packed rows),
against the same step in torch ops (compressed.py's path for other devices: accumulate, then
top_magnitudes). Run it on a quiet machine: every figure is the fastest of several timed runs
after a warm-up.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from zero_ext import ops
from zero_ext.comm import compressed

QMAX = {8: 127, 4: 7}
SENDERS = 4


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CUDA_CALLS = 10  # calls per timing on CUDA (one call of a 16M row is ~10 us)


def _time(fn, device: str, repeats: int) -> float:
    """Seconds of one call, the fastest of `repeats` timings after a warm-up call: on a machine
    shared with other jobs the slower runs are the disturbed ones. On CUDA each timing is
    CUDA_CALLS calls back to back between two events (one call between host clock reads and a
    synchronize would time the launch and the synchronize as much as the kernel)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(CUDA_CALLS):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / CUDA_CALLS)
            continue
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_quantize(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization in plain torch ops (one chunk, numel a multiple of block):
    what a Python implementation without a fused kernel costs."""
    qmax = QMAX[bits]
    blocks = x.float().view(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scale = absmax / qmax
    q = torch.round(blocks * (qmax / absmax)).nan_to_num_(0.0).clamp_(-qmax, qmax).to(torch.int8)
    if bits == 4:
        nib = q.view(-1).to(torch.uint8) & 0xF
        q = nib[0::2] | (nib[1::2] << 4)
    return q, scale


def torch_dequantize_sum(q: list[torch.Tensor], scales: list[torch.Tensor], bits: int,
                         block: int, out: torch.Tensor) -> None:
    acc = torch.zeros(out.numel(), device=out.device)
    for qi, si in zip(q, scales):
        if bits == 4:
            lo = (qi & 0xF).to(torch.int8)
            hi = (qi >> 4).to(torch.int8)
            qi = torch.stack([lo, hi], dim=1).view(-1)
            qi = torch.where(qi >= 8, qi - 16, qi)
        acc += (qi.float().view(-1, block) * si).view(-1)
    out.copy_(acc)


def _row_bytes(n: int, bits: int, block: int) -> int:
    return ops.quantized_row_bytes(n, bits, block)


def throughput(device: str, n: int, block: int, repeats: int) -> list[str]:
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    # copy_gbs(nbytes) copies nbytes // 2 bytes (read + written: nbytes moved); the largest
    # request is the dequant-sum's (SENDERS int8 rows and the fp32 output) or quantize's with EF.
    rows = [_row_bytes(n, bits, block) for bits in (8, 4)]
    largest = max(max(SENDERS * row + 4 * n, n * 2 + row + 2 * n) for row in rows)
    copy_src = torch.empty(largest // 2 + 1, dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(copy_src)
    lines = []

    def copy_gbs(nbytes: int) -> float:
        src, dst = copy_src[: nbytes // 2], copy_dst[: nbytes // 2]
        # A slice past the buffer's end is cut short silently: the figure would count bytes
        # never copied.
        assert src.numel() == dst.numel() == nbytes // 2, (nbytes, copy_src.numel())
        return nbytes / _time(lambda: dst.copy_(src), device, repeats) / 1e9

    for bits in (8, 4):
        row = _row_bytes(n, bits, block)
        residual = torch.zeros(n, dtype=torch.float8_e4m3fn, device=device)
        residual_scale = torch.zeros(1, device=device)
        plain_bytes = n * 2 + row
        ef_bytes = plain_bytes + 2 * n
        t_plain = _time(partial(ops.quantize_chunks, x, 1, bits, block), device, repeats)
        t_ef = _time(partial(ops.quantize_chunks, x, 1, bits, block, residual=residual,
                             residual_scale=residual_scale), device, repeats)
        t_torch = _time(partial(torch_quantize, x, bits, block), device, repeats)
        copy = copy_gbs(plain_bytes)
        copy_ef = copy_gbs(ef_bytes)
        gbs, gbs_ef = plain_bytes / t_plain / 1e9, ef_bytes / t_ef / 1e9
        lines.append(
            f"  quantize int{bits:<2}     {gbs:7.2f} GB/s  copy {copy:7.2f} ({gbs / copy:4.2f}x)  "
            f"torch {plain_bytes / t_torch / 1e9:6.2f} ({t_torch / t_plain:5.1f}x faster)  "
            f"| with EF {gbs_ef:7.2f} GB/s ({gbs_ef / copy_ef:4.2f}x copy)")

        packed = torch.stack([ops.quantize_chunks(torch.randn(n, device=device), 1, bits, block)
                              for _ in range(SENDERS)])
        out = torch.empty(n, device=device)
        sum_bytes = SENDERS * row + 4 * n
        t_sum = _time(partial(ops.dequantize_sum_, out, packed, bits, block), device, repeats)
        qs = [torch_quantize(torch.randn(n, device=device), bits, block) for _ in range(SENDERS)]
        t_torch_sum = _time(partial(torch_dequantize_sum, [q for q, _ in qs],
                                    [s for _, s in qs], bits, block, out), device, repeats)
        copy = copy_gbs(sum_bytes)
        gbs = sum_bytes / t_sum / 1e9
        lines.append(
            f"  dequant-sum{SENDERS} int{bits:<2} {gbs:7.2f} GB/s  copy {copy:7.2f} "
            f"({gbs / copy:4.2f}x)  torch {sum_bytes / t_torch_sum / 1e9:6.2f} "
            f"({t_torch_sum / t_sum:5.1f}x faster)")
    return lines


TOPK_CHUNKS = 2
TOPK_DENSITY = 0.01


def topk_throughput(n: int, repeats: int) -> list[str]:
    """The op against the torch path on one send of steady-state residuals (a few sends first:
    the residual's distribution after selections, not a fresh Gaussian's)."""
    g = (torch.randn(n) * 1e-3).to(torch.bfloat16)
    k = compressed._topk_k(TOPK_DENSITY, n // TOPK_CHUNKS)
    lines = []
    for momentum in (0.0, 0.9):
        state = {}
        for name in ("op", "torch"):
            v = torch.randn(n) * 1e-3
            u = torch.zeros(n) if momentum else None
            if name == "op":
                fn = partial(ops.topk_feedback_select, v, g, TOPK_CHUNKS, k, momentum=u,
                             momentum_factor=momentum)
            else:
                fn = partial(compressed._select_with_feedback_torch, v, g, TOPK_CHUNKS, k,
                             torch.bfloat16, u, momentum)
            for _ in range(3):
                fn()
            state[name] = _time(fn, "cpu", repeats)
        moved = n * (2 + 8 + 4 + (8 if momentum else 0)) + TOPK_CHUNKS * k * 6
        t = state["op"]
        lines.append(
            f"  topk select {'momentum' if momentum else 'plain':<8} {t / n * 1e9:6.2f} ns/elem "
            f"{moved / t / 1e9:6.2f} GB/s  torch {state['torch'] / n * 1e9:6.2f} ns/elem "
            f"({state['torch'] / t:5.1f}x faster)")
    return lines


def _heavy_tailed(n: int, gen: torch.Generator) -> torch.Tensor:
    # Student t with 2 degrees of freedom: normal / sqrt(chi2_2 / 2), chi2_2 = -2 log U.
    z = torch.randn(n, generator=gen)
    u = torch.rand(n, generator=gen).clamp_min_(1e-12)
    return z / torch.sqrt(-torch.log(u))


def quantization_error(blocks: list[int], n: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    data = {"gaussian": torch.randn(n, generator=gen), "student-t2": _heavy_tailed(n, gen)}
    lines = [f"  {'block':>6} " + " ".join(f"{name + ' int' + str(b):>18}"
                                           for name in data for b in (8, 4))
             + "   bytes/elem int8  int4"]
    for block in blocks:
        cells = []
        for x in data.values():
            for bits in (8, 4):
                out = torch.empty(n)
                ops.dequantize_(out, ops.quantize_chunks(x, 1, bits, block), bits, block)
                cells.append(f"{((out - x).norm() / x.norm()).item():18.5f}")
        overhead = [_row_bytes(n, bits, block) / n for bits in (8, 4)]
        lines.append(f"  {block:>6} " + " ".join(cells)
                     + f"   {overhead[0]:15.4f} {overhead[1]:5.4f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "4M", "16M", "64M"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[64, 128, 256, 512, 2048])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--error-numel", default="4M")
    parser.add_argument("--only", choices=["quant", "topk"],
                        help="only the quantization rows, or only the top-k rows")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if args.only != "quant" and "cpu" in devices:
        print(f"== topk select, cpu ({torch.get_num_threads()} threads); bf16 gradient, "
              f"{TOPK_CHUNKS} chunks, density {TOPK_DENSITY}")
        for size in args.sizes:
            print(f"{size} elements:")
            for line in topk_throughput(_parse_size(size), args.repeats):
                print(line)
    if args.only == "topk":
        return
    for device in devices:
        where = (f"{torch.get_num_threads()} threads" if device == "cpu"
                 else torch.cuda.get_device_name())
        print(f"== {device} ({where}); input bf16, dequant-sum output fp32, {SENDERS} senders")
        for size in args.sizes:
            n = _parse_size(size)
            for block in args.blocks:
                print(f"{size} elements, block {block}:")
                for line in throughput(device, n, block, args.repeats):
                    print(line)
    print("== relative L2 error ||x - dequant(quant(x))|| / ||x|| (fp32 input), and wire bytes per "
          "element")
    for line in quantization_error(args.blocks, _parse_size(args.error_numel)):
        print(line)


if __name__ == "__main__":
    main()
