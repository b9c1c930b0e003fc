"""A training step at world size 1: zero_ext stages 2 and 3 against FSDP2 and plain PyTorch on
the Llama 1.3B shape, side by side in one run (issue 12's step benchmark).

    python benchmarks/bench_step.py                          # one GPU: four rows, 3 + 50 steps
    python benchmarks/bench_step.py --steps 23 --json step.json
    python benchmarks/bench_step.py --impls zero_ext_s3,fsdp2
    python benchmarks/bench_step.py --tiny                   # CPU (gloo): the same code, seconds

The model is transformers' LlamaForCausalLM built from a LlamaConfig (hidden 2048, intermediate
5504, 24 layers, 16 heads, vocab 32000: 1.345B parameters, untied head), random weights, SDPA
attention, no activation checkpointing; sequence 2048, batch 8, random tokens. Rows, one after
the other in this process (each torn down, and checked to be freed, before the next):
  torch        fp32 weights, forward under torch.autocast(bfloat16), AdamW(fused=True)
  fsdp2        fp32 weights, fully_shard per decoder layer and at the root, bf16 parameters in
               compute, fp32 gradient reduction (bench_offload.shard_fsdp2), AdamW(fused=True)
  zero_ext_s2  bf16 weights, zero_ext stage 2 with fp32 master weights and AdamW state
  zero_ext_s3  the same at stage 3 with prefetch on: stage3_prefetch_bucket_size of two decoder
               layers (DeepSpeed's default, 5e7 elements, is less than one layer of this shape,
               50.6M, and then nothing is ever prefetched)
All rows: lr 1e-4, weight decay 0.01, no clipping, one process group of one rank (NCCL on a GPU,
gloo on CPU).

Figures per row, over the steps after --warmup (examples/train_llama_offload.run_steps):
  tokens/s, s/step     wall clock, one device sync at each end
  MFU                  6 x params x tokens / s / --peak-tflops (989: dense bf16 of the H100 and
                       H200 SXM), every parameter counted (embedding too), as the anchor's was
  MFU+attn             (6 x params + 12 x layers x hidden x seq) x tokens / s / peak: PaLM's
                       count (its appendix B), the QK^T and AV matmuls forward and backward as
                       if not causal (causal SDPA skips about half of that work)
  peak / reserved      torch.cuda.max_memory_allocated / max_memory_reserved over those steps
                       (reset after setup: weights and optimizer state count, building does not)
  reserved/alloc       the two peaks' ratio after all the steps: the caching allocator's
                       overhead (fragmentation, blocks cached) at the peak
On CPU the peak is the process's resident high-water mark (VmHWM), and no goal is judged.
--json is rewritten after each row (the rows so far); SIGINT (a caller's timeout) ends the row
under way, recorded as interrupted, and the table and JSON of what completed are still written
(exit code 130).
Goals (issue 12): stage 2's step within 5% of plain PyTorch's; stage 3 at least FSDP2's tokens/s
at no more peak allocated memory; reserved/allocated at most 1.15 for the zero_ext rows.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_offload  # benchmarks/ is not a package: this script's folder is on sys.path
from bench_offload import llama  # examples/train_llama_offload.py

SHAPE_1B3 = {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
             "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
             "max_position_embeddings": 2048, "attn_implementation": "sdpa"}
TINY = {**llama.TINY, "attn_implementation": "sdpa"}
IMPLS = ("torch", "fsdp2", "zero_ext_s2", "zero_ext_s3")
GOALS = {"s2_step_vs_torch": 1.05, "s3_tokens_vs_fsdp2": 1.0, "reserved_over_allocated": 1.15}
LR, WEIGHT_DECAY = 1e-4, 0.01


def flops_per_token(params: int, shape: dict, seq: int) -> dict[str, float]:
    """Training FLOPs per token: 6 x params (forward 2, backward 4 per parameter and token),
    and that plus PaLM's attention term, 12 x layers x hidden x seq."""
    dense = 6.0 * params
    attention = 12.0 * shape["num_hidden_layers"] * shape["hidden_size"] * seq
    return {"6P": dense, "6P+attention": dense + attention}


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)


def _optimizer_step(optimizer):
    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _backward(loss):
    loss.backward()


def build_torch(args, on, shape):
    model = llama.build_llama(args.tiny, torch.float32, on, shape)
    optimizer = _adamw(model.parameters())

    def forward(tokens):
        with torch.autocast(on.type, dtype=torch.bfloat16):
            return model(input_ids=tokens, labels=tokens).loss
    return model, forward, _backward, _optimizer_step(optimizer), [optimizer]


def build_fsdp2(args, on, shape):
    model = llama.build_llama(args.tiny, torch.float32, on, shape)
    bench_offload.shard_fsdp2(model, on, offload=False)
    optimizer = _adamw(model.parameters())
    return (model, bench_offload._loss(model), _backward, _optimizer_step(optimizer),
            [optimizer])


def build_zero_ext(args, on, shape, stage: int):
    import zero_ext

    model = llama.build_llama(args.tiny, torch.bfloat16, on, shape)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    engine, _, _, _ = zero_ext.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": 0.0,
        "bf16": {"enabled": True}, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
        "zero_optimization": {"stage": stage, "overlap_comm": True,
                              "stage3_prefetch_bucket_size": 2 * layer}})
    return model, bench_offload._loss(engine), engine.backward, engine.step, [engine]


BUILDERS = {"torch": build_torch, "fsdp2": build_fsdp2,
            "zero_ext_s2": lambda *a: build_zero_ext(*a, stage=2),
            "zero_ext_s3": lambda *a: build_zero_ext(*a, stage=3)}


def _allocated(on: torch.device) -> int:
    return torch.cuda.memory_allocated(on) if on.type == "cuda" else 0


def _free(on: torch.device) -> None:
    """What the last row dropped goes back to the device before the next row is built."""
    gc.collect()
    if on.type == "cuda":
        torch.cuda.synchronize(on)
        torch.cuda.empty_cache()


def measure_row(impl: str, args, on: torch.device, shape: dict, params: int) -> dict:
    """One row: build, run_steps, then tear down; `released` says whether the model and its
    wrappers were freed (else the rows after it carry its memory)."""
    before = _allocated(on)
    try:
        model, forward, backward, step, keep = BUILDERS[impl](args, on, shape)
    except Exception as error:  # noqa: BLE001  (e.g. FSDP2 where this torch lacks it: say why)
        failed = f"setup failed: {type(error).__name__}: {error}"[:400]
    else:
        failed = None
    if failed:  # outside the except clause, whose traceback holds what was built
        _free(on)
        return {"impl": impl, "skipped": failed}
    refs = [weakref.ref(model)] + [weakref.ref(k) for k in keep]
    try:
        result = llama.run_steps(args, on, params, shape["vocab_size"], forward=forward,
                                 backward=backward, step=step)
    except Exception as error:  # noqa: BLE001  (an OOM or a failure: the other rows still run)
        result = {"skipped": f"{type(error).__name__}: {error}"[:400]}
    else:
        flops = flops_per_token(params, shape, args.seq)
        result["mfu_attention"] = result["mfu"] * flops["6P+attention"] / flops["6P"]
        if on.type == "cuda":
            result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(on)
            result["reserved_over_allocated"] = (result["peak_reserved_bytes"]
                                                 / result["peak_gpu_bytes"])
    del model, forward, backward, step, keep
    _free(on)
    return {"impl": impl, **result, "allocated_before_bytes": before,
            "left_behind_bytes": _allocated(on) - before,
            "released": all(ref() is None for ref in refs)}


def table(rows: list[dict]) -> str:
    """The rows side by side, with tokens/s against plain PyTorch and FSDP2."""
    ran = {r["impl"]: r for r in rows if "skipped" not in r}
    gb = 1e9
    lines = [("| row | s/step | tokens/s | vs torch | vs FSDP2 | MFU | MFU+attn | peak GB "
              "| peak reserved GB | reserved/alloc | loss |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['impl']} | not run: {r['skipped']} ||||||||||")
            continue
        ratios = [f"{r['tokens_per_s'] / ran[b]['tokens_per_s']:.3f}x" if b in ran else "n/a"
                  for b in ("torch", "fsdp2")]
        alloc = r["peak_gpu_bytes"] if r["peak_gpu_bytes"] is not None \
            else r["peak_host_rss_bytes"]
        reserved = f"{r['peak_reserved_bytes'] / gb:.2f}" if "peak_reserved_bytes" in r else "-"
        ratio = f"{r['reserved_over_allocated']:.3f}" if "reserved_over_allocated" in r else "-"
        lines.append(
            f"| {r['impl']} | {r['s_per_step']:.4f} | {r['tokens_per_s']:,.0f} | {ratios[0]} | "
            f"{ratios[1]} | {100 * r['mfu']:.1f}% | {100 * r['mfu_attention']:.1f}% | "
            f"{alloc / gb:.2f} | {reserved} | {ratio} | {r['first_loss']:.3f} -> "
            f"{r['last_loss']:.3f} |")
    return "\n".join(lines)


def goals(rows: list[dict], on_gpu: bool) -> list[str]:
    """Issue 12's goals for this benchmark, each PASS / FAIL, or why it is not judged."""
    ran = {r["impl"]: r for r in rows if "skipped" not in r}
    if not on_gpu:
        return ["goals: judged on a GPU only (CPU figures say nothing about them)"]
    out = []
    if {"zero_ext_s2", "torch"} <= ran.keys():
        slower = ran["zero_ext_s2"]["s_per_step"] / ran["torch"]["s_per_step"]
        out.append(f"stage 2 step time <= {GOALS['s2_step_vs_torch']:.2f}x plain PyTorch: "
                   f"{slower:.3f}x {'PASS' if slower <= GOALS['s2_step_vs_torch'] else 'FAIL'}")
    if {"zero_ext_s3", "fsdp2"} <= ran.keys():
        s3, fsdp2 = ran["zero_ext_s3"], ran["fsdp2"]
        speed = s3["tokens_per_s"] / fsdp2["tokens_per_s"]
        memory = s3["peak_gpu_bytes"] / fsdp2["peak_gpu_bytes"]
        ok = speed >= GOALS["s3_tokens_vs_fsdp2"] and memory <= 1.0
        out.append(f"stage 3 tokens/s >= {GOALS['s3_tokens_vs_fsdp2']:.1f}x FSDP2 at no more "
                   f"peak allocated: {speed:.3f}x, memory {memory:.3f}x {'PASS' if ok else 'FAIL'}")
    for impl in ("zero_ext_s2", "zero_ext_s3"):
        if impl in ran:
            ratio = ran[impl]["reserved_over_allocated"]
            limit = GOALS["reserved_over_allocated"]
            out.append(f"{impl} reserved/allocated <= {limit} after {ran[impl]['timed_steps']} "
                       f"timed steps: {ratio:.3f} {'PASS' if ratio <= limit else 'FAIL'}")
    return out or ["goals: not judged (rows missing)"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    llama.add_shape_arguments(parser)
    parser.set_defaults(steps=None, warmup=None)
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated, of {', '.join(IMPLS)}")
    args = parser.parse_args()
    if not args.tiny:
        args.batch, args.seq = args.batch or 8, args.seq or 2048
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps or (args.warmup + (2 if args.tiny else 50))
    llama.resolve_shape(args)
    chosen = set(args.impls.split(","))
    if chosen - set(IMPLS):
        parser.error(f"--impls: unknown {sorted(chosen - set(IMPLS))}; choose from "
                     f"{', '.join(IMPLS)}")
    # Always in IMPLS' order: a stage-3 engine is not freed when dropped (its gradient
    # accumulators' hooks hold it), so zero_ext_s3 comes last.
    args.impls = [impl for impl in IMPLS if impl in chosen]
    return args


def _interrupt_once(signum, frame) -> None:
    """SIGINT (the caller's timeout) raises KeyboardInterrupt once; later ones are ignored while
    main writes out what completed (timeout(1) may signal the process and then its group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGINT, _interrupt_once)
    on = llama.device()
    shape = TINY if args.tiny else SHAPE_1B3
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", None), ("RANK", "0"),
                        ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value or str(bench_offload._free_port()))
    bench_offload._init_one_rank(on)
    with torch.device("meta"):
        params = sum(p.numel() for p in llama.build_llama(args.tiny, torch.float32,
                                                          torch.device("meta"), shape)
                     .parameters())
    flops = flops_per_token(params, shape, args.seq)
    print(f"[bench_step] {'tiny Llama' if args.tiny else 'Llama 1.3B shape'}: {params / 1e9:.3f}B "
          f"params, batch {args.batch} x seq {args.seq}, {args.steps - args.warmup} timed steps "
          f"after {args.warmup}; on {on}; torch {torch.__version__}; FLOPs/token "
          f"{flops['6P']:.4g} (6P), {flops['6P+attention']:.4g} (+attention)", flush=True)
    rows = []

    def report() -> dict:
        return {"shape": shape, "params": params, "batch": args.batch, "seq": args.seq,
                "warmup": args.warmup, "steps": args.steps, "device": str(on),
                "torch": torch.__version__, "peak_tflops": args.peak_tflops,
                "flops_per_token": flops, "rows": rows, "goals": goals(rows, on.type == "cuda")}

    interrupted = False
    try:
        for impl in args.impls:
            rows.append(measure_row(impl, args, on, shape, params))
            print(f"  {impl}: " + (rows[-1].get("skipped") or
                                   f"{rows[-1]['tokens_per_s']:,.0f} tokens/s"), flush=True)
            llama.write_json(args.json, report())  # the rows so far: a kill later leaves them
    except KeyboardInterrupt:  # the caller's timeout: keep what completed, say what did not
        interrupted = True
        done = {r["impl"] for r in rows}
        pending = [impl for impl in args.impls if impl not in done]
        rows += [{"impl": impl, "interrupted": True,
                  "skipped": ("interrupted (SIGINT, e.g. the caller's timeout) while running"
                              if i == 0 else "not started (interrupted)")}
                 for i, impl in enumerate(pending)]
        print(f"  {pending[0] if pending else 'bench_step'}: interrupted", flush=True)
    final = report()
    print(table(rows))
    print("\n".join(final["goals"]), flush=True)
    llama.write_json(args.json, final)
    if interrupted:  # the process group may be mid-collective: no orderly teardown
        sys.exit(130)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
