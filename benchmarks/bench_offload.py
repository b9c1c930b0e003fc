"""Optimizer offload on one GPU: zero_ext against FSDP2 with CPUOffloadPolicy and DeepSpeed
ZeRO-Offload, on the Llama-2-7B shape (bf16, sequence 4096, activation checkpointing).

    python benchmarks/bench_offload.py --batch 4                      # on an H100, 125 GB host
    python benchmarks/bench_offload.py --batch 16 --json offload_b16.json
    python benchmarks/bench_offload.py --batch 4 --impls zero_ext,fsdp2
    python benchmarks/bench_offload.py --tiny                         # CPU smoke run (gloo)

Each implementation runs in its own process, one after the other, so that its peak GPU and
host memory are its own, and trains the same model (examples/train_llama_offload.py builds it,
random weights from one seed) on the same random token batches, 10 steps of which the first 2
are warm-up, without gradient clipping:
  zero_ext   examples/train_llama_offload.py itself (its --json figures): bf16 weights, ZeRO
             stage 3 (--zero-stage), offload_optimizer with pinned buffers, zero_ext's
             activation checkpointing. The CPU AdamW of each shard runs after the step's
             all-rank decision, the stage-3 units' behind the next forward. --zero-ratio R
             keeps only the share R of the optimizer state on the host and steps the rest on
             the GPU.
  fsdp2      the anchor's setup: an fp32 model, fully_shard per decoder layer and at the root
             with CPUOffloadPolicy (sharded fp32 parameters, gradients and AdamW state on the
             host, pinned), MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32),
             transformers' gradient checkpointing, torch.optim.AdamW(fused=True) on the CPU
             parameters after backward.
  deepspeed  deepspeed.initialize with bf16, ZeRO stage 2 (--ds-stage), offload_optimizer cpu
             (pinned), so DeepSpeedCPUAdam; transformers' gradient checkpointing. Where
             `import deepspeed` fails the row says why.
Each row's figures are those of examples/train_llama_offload.py (its docstring defines them);
the table adds the ratio of tokens/s to FSDP2's. On a GPU the end checks the issue's goals:
tokens/s >= 1.5x FSDP2, MFU >= 40% at batch 16, host peak <= 100 GB, faster than DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import train_llama_offload as llama  # the example is the zero_ext row

IMPLS = ("zero_ext", "fsdp2", "deepspeed")
GOALS = {"speedup": 1.5, "mfu_b16": 0.40, "host_gb": 100.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_one_rank(on: torch.device) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl" if on.type == "cuda" else "gloo", rank=0, world_size=1)


def _loss(model):
    return lambda tokens: model(input_ids=tokens, labels=tokens).loss


def _hf_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def shard_fsdp2(model, on: torch.device, offload: bool) -> None:
    """The anchors' FSDP2 setup (also benchmarks/bench_step.py's FSDP2 row): fully_shard per
    decoder layer and at the root, bf16 parameters in compute, fp32 gradient reduction; with
    `offload`, CPUOffloadPolicy (pinned on a GPU)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                reduce_dtype=torch.float32)}
    if offload:
        policy["offload_policy"] = CPUOffloadPolicy(pin_memory=on.type == "cuda")
    for layer in model.model.layers:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)


def run_fsdp2(args, on: torch.device) -> dict:
    _init_one_rank(on)
    model = llama.build_llama(args.tiny, torch.float32, on, llama.shape_of(args)[1])
    params = sum(p.numel() for p in model.parameters())
    _hf_checkpointing(model)
    shard_fsdp2(model, on, offload=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = llama.run_steps(args, on, params, model.config.vocab_size, forward=_loss(model),
                             backward=lambda loss: loss.backward(), step=step)
    return {**result, "impl": "fsdp2"}


def run_deepspeed(args, on: torch.device) -> dict:
    try:
        import deepspeed
    except Exception as error:  # noqa: BLE001  (any import failure: the row says which)
        return {"impl": "deepspeed", "skipped": f"import deepspeed failed: "
                f"{type(error).__name__}: {error}"}
    model = llama.build_llama(args.tiny, torch.bfloat16, on, llama.shape_of(args)[1])
    params = sum(p.numel() for p in model.parameters())
    _hf_checkpointing(model)
    # Timed apart from the steps: on a fresh machine it compiles DeepSpeed's CPU Adam.
    began = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config={
        "train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": 0.0,
        "bf16": {"enabled": True}, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "zero_optimization": {"stage": args.ds_stage, "overlap_comm": True,
                              "offload_optimizer": {"device": "cpu",
                                                    "pin_memory": on.type == "cuda"}}})
    initialize_s = time.perf_counter() - began
    result = llama.run_steps(args, on, params, model.config.vocab_size,
                             forward=_loss(engine), backward=engine.backward, step=engine.step)
    return {**result, "impl": "deepspeed", "stage": args.ds_stage,
            "optimizer": type(engine.optimizer.optimizer).__name__,
            "version": deepspeed.__version__, "initialize_s": initialize_s}


def _shape_flags(args) -> list[str]:
    flags = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--peak-tflops", str(args.peak_tflops)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return flags + (["--tiny"] if args.tiny else ["--model", args.model])


def run_row(impl: str, args, out_dir: str) -> dict:
    """One implementation in a fresh process; its figures, or why there are none."""
    path = os.path.join(out_dir, f"{impl}.json")
    if impl == "zero_ext":
        cmd = [sys.executable, os.path.join(ROOT, "examples", "train_llama_offload.py"),
               "--stage", str(args.zero_stage), "--ratio", str(args.zero_ratio)]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--run", impl,
               "--ds-stage", str(args.ds_stage)]
    cmd += _shape_flags(args) + ["--json", path]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                              timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "skipped": f"no result within --row-timeout {args.row_timeout}s"}
    if proc.returncode != 0 or not os.path.exists(path):
        # -9 is the kernel's OOM killer, the usual end of a host that is too small.
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"impl": impl, "skipped": f"exit code {proc.returncode}: {tail[0][:300]}",
                "stderr": proc.stderr[-4000:]}
    with open(path) as f:
        return json.load(f)


def _shape(row: dict) -> tuple | None:
    """What a row trained (parameters, batch, sequence): rows are compared only with rows of
    the same shape (files from several calls may hold the 7B at two batches and the 13B)."""
    return (row["params"], row["batch"], row["seq"]) if "skipped" not in row else None


def _baselines(rows: list[dict], row: dict) -> dict[str, dict]:
    """The other implementations' measured rows of `row`'s shape, by implementation."""
    return {r["impl"]: r for r in rows if "skipped" not in r and r["impl"] != "zero_ext"
            and _shape(r) == _shape(row)}


def table(rows: list[dict]) -> str:
    gb = 1e9
    lines = [("| impl | s/step | tokens/s | vs FSDP2 | MFU | peak GPU GB | host GB (process / "
              "node) | forward s | backward s | step s |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['impl']} | not run: {r['skipped']} |||||||||")
            continue
        base = _baselines(rows, r).get("fsdp2")
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
        gpu = f"{r['peak_gpu_bytes'] / gb:.1f}" if r["peak_gpu_bytes"] is not None else "n/a"
        lines.append(
            f"| {_name(r)} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | {ratio} | "
            f"{100 * r['mfu']:.3g}% | {gpu} | {r['peak_host_rss_bytes'] / gb:.2f} / "
            f"{r['peak_node_bytes'] / gb:.2f} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | "
            f"{r['step_s']:.3f} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, each with pass/fail, for every zero_ext row against the rows of its
    own shape (GPU runs only; CPU figures say nothing)."""
    ours_rows = [r for r in rows if r["impl"] == "zero_ext" and "skipped" not in r]
    if not ours_rows:
        return ["goals: no zero_ext figures"]
    out = []
    for ours in ours_rows:
        by = _baselines(rows, ours)
        label = f"{_name(ours)}, batch {ours['batch']}: "
        if "fsdp2" in by:
            speedup = ours["tokens_per_s"] / by["fsdp2"]["tokens_per_s"]
            out.append(f"{label}tokens/s >= {GOALS['speedup']}x FSDP2: {speedup:.2f}x "
                       f"{'PASS' if speedup >= GOALS['speedup'] else 'FAIL'}")
        if ours["batch"] >= 16:
            out.append(f"{label}MFU >= {100 * GOALS['mfu_b16']:.0f}% at batch 16: "
                       f"{100 * ours['mfu']:.1f}% "
                       f"{'PASS' if ours['mfu'] >= GOALS['mfu_b16'] else 'FAIL'}")
        host = max(ours["peak_host_rss_bytes"], ours["peak_node_bytes"]) / 1e9
        out.append(f"{label}host peak <= {GOALS['host_gb']:.0f} GB (process or node, the "
                   f"larger): {host:.1f} GB {'PASS' if host <= GOALS['host_gb'] else 'FAIL'}")
        if "deepspeed" in by:
            faster = ours["tokens_per_s"] / by["deepspeed"]["tokens_per_s"]
            out.append(f"{label}faster than DeepSpeed ZeRO-Offload: {faster:.2f}x "
                       f"{'PASS' if faster > 1.0 else 'FAIL'}")
    return out


def _name(row: dict) -> str:
    """A row's implementation, with its offload ratio when below 1, its clipping norm and how
    many layers it checkpointed, where set."""
    notes = [f"ratio {row['ratio']:g}"] if row.get("ratio", 1.0) < 1.0 else []
    notes += [f"clip {row['clip']:g}"] if row.get("clip") else []
    notes += [f"{row['number_checkpoints']} layers checkpointed"] \
        if row.get("number_checkpoints") else []
    return row["impl"] + (f" ({', '.join(notes)})" if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    llama.add_shape_arguments(parser)
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--zero-stage", type=int, default=3, choices=(2, 3))
    parser.add_argument("--zero-ratio", type=float, default=1.0,
                        help="zero_ext row: offload_optimizer.ratio (share of the optimizer "
                             "state on the host; the rest steps on the GPU)")
    parser.add_argument("--ds-stage", type=int, default=2, choices=(2, 3))
    parser.add_argument("--row-timeout", type=int, default=540,
                        help="seconds one implementation may take (the default leaves a "
                             "device call's 600 s room to write what was measured)")
    parser.add_argument("--run", choices=IMPLS[1:], help=argparse.SUPPRESS)  # a row's process
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="run nothing: the table and goals of rows written earlier (a "
                             "row's --json, or this script's), e.g. rows run in separate "
                             "device calls")
    args = parser.parse_args()
    llama.resolve_shape(args)
    if args.from_json:
        rows = []
        for path in args.from_json:
            with open(path) as f:
                data = json.load(f)
            rows += data.get("rows", [data])
        print(table(rows))
        on_gpu = [r for r in rows if "skipped" not in r and r["device"] != "cpu"]
        for line in goals(rows) if on_gpu else []:
            print("goal: " + line)
        return

    if args.run:
        on = llama.device()
        result = (run_fsdp2 if args.run == "fsdp2" else run_deepspeed)(args, on)
        llama.write_json(args.json, result)
        if "skipped" not in result:
            print(llama.format_result(f"[bench_offload] {args.run}", result), flush=True)
        return

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {', '.join(IMPLS)}")
    shape = "tiny Llama (2 layers, hidden 256)" if args.tiny else llama.shape_of(args)[0]
    print(f"[bench_offload] {shape}, batch {args.batch} x {args.seq}, {args.steps} steps "
          f"({args.warmup} warm-up), torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for impl in impls:
            row = run_row(impl, args, out_dir)
            rows.append(row)
            if "skipped" in row:
                print(f"[bench_offload] {impl}: not run: {row['skipped']}", flush=True)
            else:
                print(llama.format_result(f"[bench_offload] {impl}", row), flush=True)
            if args.json:  # the rows so far: a call killed later keeps them
                llama.write_json(args.json, {"rows": rows})
    print()
    print(table(rows))
    if torch.cuda.is_available():
        for line in goals(rows):
            print("goal: " + line)
    else:
        print("On CPU these figures exercise the code paths; they say nothing about the GPU "
              "goals.")
    if args.json:
        llama.write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
