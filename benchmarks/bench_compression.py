"""Compressed communication (issue 16) where the network is the bottleneck: seconds per step of
examples/train_gpt.py's GPT in bf16 on 2 namespaced nodes (tests/two_nodes.py: a veth pair,
gloo between the nodes, torchrun's c10d rendezvous), with the link capped by tc tbf and
uncapped, for
  - stage 3: uncompressed bf16 vs int8 gradients + int8 weights (qgZ + qwZ),
  - stage 2: uncompressed bf16 vs int8, int4 gradients and top-k 1% (error feedback),
the speed-up over the uncompressed step of the same stage, and each step's traffic counters
(bytes per rank per link class: what gloo's algorithms send, comm.wire_sends) next to the
arithmetic: the step's collectives as zero_ext.scaling.plan_step plans them, counted as gloo
sends them (planned_traffic(..., transport="gloo")), each compressed one by what it puts on
the wire (quantized rows: data + one fp32 scale per block; top-k: int32 index + value per
entry; a rank's own chunk not sent). The uncompressed reduce-scatter sends the ring's bytes,
(N-1)/N of the bucket (comm/pairs.py's sends from a MiB per rank, every bucket here but
stage 3's 62K-element one; gloo's own is an all-reduce, twice that), and a compressed
reduction is an all-to-all of the compressed chunks. "bound" is the uncompressed step's
counted bytes over this one's: the speed-up a step made only of moving bytes would get.
"wire" is what node
0's veth really sent per step (its tx counter: TCP/IP headers, gloo's 48-byte message
preambles, barriers and the rendezvous store included); "wire x" is the uncompressed step's
wire bytes over this one's, which "bound" predicts.

    python benchmarks/bench_compression.py                       # uncapped, 1gbit, 300mbit
    python benchmarks/bench_compression.py --quick               # smoke: 1gbit, 2 timed steps
    python benchmarks/bench_compression.py --rates 1gbit --variants s3-bf16,s3-int8
    MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_MMAP_THRESHOLD_=4294967296 \
        python benchmarks/bench_compression.py --rates uncapped   # no page faults (kflt)

Needs root (network namespaces). One thread per rank; the two nodes share this machine's cores,
so run it on an otherwise idle machine (it prints the load). About 5 minutes on 2 cores.

What it can and cannot show: at stage 2 only the gradient reduction is compressed, while the
parameter all-gather after the optimizer step stays bf16 (weights are compressed at stage 3
only), so the byte ratio, and with it the speed-up, is bounded by
(A + 1) / (A * r + 1) for A micro-steps per step and a gradient compression ratio r against
the reduce-scatter's bytes (int8: r = 0.51, 1.49x at A = 2): the printout shows that bound per
row. The model is sized so the capped link dominates the step;
what else holds a row back (the rank's CPU: gloo's and the kernel's TCP work and the
quantization, on 2 shared cores) is printed as the rank's process CPU seconds per step and the
quantization ops' CPU seconds measured on the same cores. "kflt" is the page faults per step
of the rank with most: glibc hands large freed buffers back to the kernel when enough of them
are freed at once, and the next step faults them in again, zeroed (4 KiB each); whether it
does depends on the layout of the whole heap, so it changes from run to run and is the main
reason the uncapped rows swing between runs (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import secrets
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests")]

# ~12.7M parameters, a micro-batch of 2 x 32 tokens per rank: the bf16 gathers and reductions
# of a step are ~38 MB per rank at stage 3 (~0.5 s at 1 Gbit/s), the compute ~0.1 s.
MODEL = {"vocab": 64, "block": 32, "dim": 512, "layers": 4, "heads": 8}
MICRO = 1            # sequences per rank per micro-step
ACCUMULATION = 2     # micro-steps per optimizer step, as the example configs
BLOCK = 256          # quantization block (the config's default)
DENSITY = 0.01

# name -> (stage, zero_ext.compression section or None)
VARIANTS = {
    "s3-bf16": (3, None),
    "s3-int8": (3, {"gradients": {"method": "int8", "block_size": BLOCK},
                    "weights": {"method": "int8", "block_size": BLOCK}}),
    "s2-bf16": (2, None),
    "s2-int8": (2, {"gradients": {"method": "int8", "block_size": BLOCK}}),
    "s2-int4": (2, {"gradients": {"method": "int4", "block_size": BLOCK}}),
    # DGC's momentum correction off (the default: with Adam it trained worse, docs/compression.md)
    "s2-topk": (2, {"gradients": {"method": "topk", "density": DENSITY}}),
}
BASELINE = {3: "s3-bf16", 2: "s2-bf16"}
REDUCE_BUCKET = 50_000_000  # elements: the whole model in one bucket (--bucket)
SPEEDUP_GOAL, UNCAPPED_COST_GOAL = 1.7, 0.05


def _config(variant: str, accumulation: int) -> dict:
    stage, compression = VARIANTS[variant]
    config = {"train_micro_batch_size_per_gpu": MICRO,
              "gradient_accumulation_steps": accumulation, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage, "overlap_comm": True,
                                    "reduce_bucket_size": REDUCE_BUCKET,
                                    "stage3_param_persistence_threshold": 1000},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "steps_per_print": 10**9}
    if compression:
        config["zero_ext"] = {"compression": compression}
    return config


def _build():
    import torch
    from train_gpt import GPT

    torch.manual_seed(0)
    return GPT(**MODEL)


# -- the rank's side (under torchrun) ----------------------------------------------------------
def _train(variant: str, steps: int, accumulation: int, warmup: int = 2) -> dict:
    """Times `steps` optimizer steps (after `warmup`): wall and process CPU seconds, the forward
    / backward / optimizer-step phases, and the traffic counters of the timed steps."""
    import torch

    import zero_ext
    from zero_ext import comm

    engine, _, _, _ = zero_ext.initialize(model=_build(), config=_config(variant, accumulation))
    generator = torch.Generator().manual_seed(comm.rank())
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    steps_s, cpu_s = [], []
    for step in range(warmup + steps):
        if step == warmup:
            comm.traffic.reset()
            phases = dict.fromkeys(phases, 0.0)
            sent = _link_tx_bytes()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        comm.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(accumulation):
            tokens = torch.randint(0, MODEL["vocab"], (MICRO, MODEL["block"] + 1),
                                   generator=generator)
            t1 = time.perf_counter()
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            t2 = time.perf_counter()
            engine.backward(loss)
            t3 = time.perf_counter()
            engine.step()
            t4 = time.perf_counter()
            for name, seconds in (("forward", t2 - t1), ("backward", t3 - t2),
                                  ("optimizer", t4 - t3)):
                phases[name] += seconds
        if step >= warmup:
            steps_s.append(time.perf_counter() - t0)
            cpu_s.append(time.process_time() - c0)
    wire = (_link_tx_bytes() - sent) / steps
    traffic = comm.traffic.snapshot()
    # Page faults per step of the rank with most (after the counters' snapshot: not counted).
    most = torch.tensor([(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps])
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    per_step = {name: seconds / steps for name, seconds in phases.items()}
    out = {"step": statistics.median(steps_s), "steps": steps_s, "cpu": statistics.median(cpu_s),
           "wire": wire, "faults": float(most), "loss": float(loss),
           "compression": _engine_compression(engine),
           "intra": {op: b / steps for op, b in traffic.intra_node_bytes.items()},
           "inter": {op: b / steps for op, b in traffic.inter_node_bytes.items()},
           "calls": {op: c / steps for op, c in traffic.calls.items()}} | per_step
    del engine
    return out


def _engine_compression(engine) -> str:
    """What the engine really compresses (its resolved plan, after the one-rank rule), so that
    a row's label cannot claim a compression the run did not do."""
    compression = getattr(engine, "compression", None)
    if compression is None:
        return "none"
    return f"gradients {compression.gradients}, weights {compression.weights}"


def _link_tx_bytes() -> int:
    """Bytes this node's network devices have sent (the veth to the other node; inside the
    node's network namespace /sys/class/net lists only its own): what really went on the
    wire, TCP/IP headers and the rendezvous store's traffic included."""
    return sum(int(open(f"/sys/class/net/{dev}/statistics/tx_bytes").read())
               for dev in os.listdir("/sys/class/net") if dev != "lo")


def _quant_op_seconds(numel: int = 1 << 22) -> dict:
    """CPU seconds per element of the quantization ops on this rank's core, bf16 input, as the
    compressed collectives call them (2 chunks: one per rank), median of 5; {} without them."""
    import torch

    ops = torch.ops.zero_ext
    if not hasattr(ops, "quantize_chunks"):
        return {}
    x = torch.randn(numel).to(torch.bfloat16)
    out = {}
    for bits in (8, 4):
        packed = ops.quantize_chunks(x, 2, bits, BLOCK)
        target = torch.empty(numel // 2, dtype=torch.bfloat16)
        calls = {f"quantize int{bits}": functools.partial(ops.quantize_chunks, x, 2, bits, BLOCK),
                 f"dequantize-sum int{bits}": functools.partial(
                     ops.dequantize_sum_, target, packed.view(2, 1, -1), bits, BLOCK)}
        for name, fn in calls.items():
            times = []
            for _ in range(5):
                start = time.process_time()
                fn()
                times.append(time.process_time() - start)
            out[name] = statistics.median(times) / numel
    # Top-k as comm/compressed.py sends it from a bucket on 2 ranks: the other rank's chunk
    # through zero_ext::topk_feedback_select (accumulate, select, pack), this rank's own chunk
    # delivered whole, on a residual that has sent before.
    from zero_ext.comm import compressed

    state = compressed.TopkFeedback(numel, 2)
    state.residual.copy_(torch.randn(numel) * 1e-3)
    k = math.ceil(DENSITY * numel / 2)

    def select():
        compressed._take_own_chunk(state, x)
        compressed._select_others(state, x, k)
    times = []
    for _ in range(7):
        start = time.process_time()
        select()
        times.append(time.process_time() - start)
    out["topk select"] = statistics.median(times[2:]) / numel
    return out


def worker(args) -> None:
    import torch

    from zero_ext import comm

    torch.set_num_threads(1)
    comm.init_distributed()
    out = {"variants": {name: _train(name, args.steps, args.accumulation)
                        for name in args.variants.split(",")},
           "quant_ops": _quant_op_seconds(), "world": comm.world_size()}
    if comm.rank() == 0:
        print("BENCH " + json.dumps(out), flush=True)


# -- the arithmetic ----------------------------------------------------------------------------
def planned_bytes(variant: str, world: int, accumulation: int) -> float:
    """Bytes a rank sends per step as zero_ext.scaling plans the step's collectives (packed
    quantized rows, top-k pairs, qwZ gathers as comm/compressed.py moves them), as gloo's
    algorithms send them (comm.wire_sends), as the counters count them here."""
    import torch

    from zero_ext import scaling

    with torch.device("meta"):
        model = _build()
    plan = scaling.plan_step(model, _config(variant, accumulation), world)
    return sum(scaling.planned_traffic(plan, world, transport="gloo").bytes.values())


# -- the driver --------------------------------------------------------------------------------
def _parse(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"no result line in:\n{stdout[-3000:]}")


def _run_two_nodes(rate: str | None, args, env: dict) -> dict:
    from two_nodes import TwoNodes

    rdzv = (f"-m torch.distributed.run --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d "
            f"--rdzv_endpoint=$NODE0_ADDR:29541 --rdzv_id=zxc-{secrets.token_hex(4)}")
    command = (f"{sys.executable} {rdzv} {os.path.abspath(__file__)} --worker "
               f"--steps {_steps(rate, args)} --accumulation {args.accumulation} "
               f"--bucket {args.bucket} "
               f"--variants {args.variants}")
    with TwoNodes(rate=rate) as nodes:
        results = nodes.run([command, command], timeout=args.timeout, cwd=ROOT, env=env)
    if any(r.timed_out for r in results) or "BENCH " not in results[0].stdout:
        raise RuntimeError(f"the two-node run ({rate or 'uncapped'}) failed:\n" + "\n".join(
            f"node{r.node} ({'timed out' if r.timed_out else r.returncode}):\n"
            f"{r.stderr[-3000:]}" for r in results))
    return _parse(results[0].stdout)


def _steps(rate: str | None, args) -> int:
    """Timed steps per variant: more on the uncapped link, whose steps are short and whose
    medians of 4 swung by tens of percent (top-k: -6% to +43% against bf16 in two runs)."""
    return args.uncapped_steps if rate in (None, "uncapped") else args.steps


def _malloc_settings() -> str:
    """The glibc tunables the ranks inherit (README, "Training on CPU"), or "defaults"."""
    set_ = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    return ", ".join(set_) or "defaults"


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _counted(r: dict) -> float:
    """A run's counted bytes per step and rank, both link classes."""
    return sum(r["inter"].values()) + sum(r["intra"].values())


def _print_rate(rate: str, got: dict, args) -> list[tuple]:
    """One table per link state; returns (rate, variant, speed-up) rows for the verdict."""
    rows = []
    print(f"\n{rate}: s/step = median of {_steps(rate, args)} steps of {args.accumulation} "
          "micro-steps (rank 0); CPU = rank 0's process CPU s per step; MB = 1e6 bytes per "
          "step per rank; kflt = thousands of page faults per step, the rank with most")
    print(f"{'variant':>8} {'s/step':>7} {'speedup':>7} {'CPU s':>6} {'fwd':>6} {'bwd':>6} "
          f"{'opt':>6} {'inter MB':>9} {'intra MB':>9} {'planned':>8} {'cnt/pln':>7} "
          f"{'bound':>6} {'wire MB':>8} {'wire x':>6} {'kflt':>5}")
    world = got["world"]
    for name, r in got["variants"].items():
        stage = VARIANTS[name][0]
        base = got["variants"].get(BASELINE[stage])
        speedup = base["step"] / r["step"] if base else float("nan")
        inter, intra = sum(r["inter"].values()), sum(r["intra"].values())
        planned = planned_bytes(name, world, args.accumulation)
        counted = inter + intra
        dense = _counted(base) if base else float("nan")
        print(f"{name:>8} {r['step']:>7.3f} {speedup:>6.2f}x {r['cpu']:>6.3f} "
              f"{r['forward']:>6.3f} {r['backward']:>6.3f} {r['optimizer']:>6.3f} "
              f"{inter / 1e6:>9.3f} {intra / 1e6:>9.3f} {planned / 1e6:>8.3f} "
              f"{counted / planned:>7.3f} {dense / counted:>5.2f}x {r['wire'] / 1e6:>8.3f} "
              f"{(base['wire'] if base else float('nan')) / r['wire']:>5.2f}x "
              f"{r['faults'] / 1e3:>5.1f}")
        rows.append((rate, name, speedup, r))
    ops = {op for r in got["variants"].values() for op in {**r["inter"], **r["intra"]}}
    for name, r in got["variants"].items():
        per_op = {op: r["inter"].get(op, 0) + r["intra"].get(op, 0) for op in sorted(ops)}
        print(f"  {name}: bytes per step by op: " + ", ".join(
            f"{op} {b / 1e6:.3f} MB ({r['calls'].get(op, 0):g} calls)"
            for op, b in per_op.items() if b) + f"; engine.compression: {r['compression']}")
    return rows


def _verdict(rows: list[tuple], capped: list[str], quant_ops: dict, args) -> None:
    """The issue's goals, and for a missed one the phase that holds it."""
    print("\nGoals (issue 16):")
    uncapped = {name: s for rate, name, s, _ in rows if rate == "uncapped"}
    for rate in capped:
        for stage, base in BASELINE.items():
            mine = [(name, s, r) for rt, name, s, r in rows
                    if rt == rate and VARIANTS[name][0] == stage and name != base]
            if not any(rt == rate and name == base for rt, name, _, _ in rows):
                continue  # no uncompressed run of this stage to compare with
            for name, speedup, r in mine:
                ok = speedup >= SPEEDUP_GOAL
                base_run = next(x[3] for x in rows if x[0] == rate and x[1] == base)
                line = (f"  {rate} stage {stage} {name}: {speedup:.2f}x "
                        f"({'meets' if ok else 'misses'} >= {SPEEDUP_GOAL}x; the counted bytes "
                        f"allow {_counted(base_run) / _counted(r):.2f}x, the wire bytes "
                        f"{base_run['wire'] / r['wire']:.2f}x)")
                if not ok:
                    line += "; " + _held_by(name, r, [x for x in rows if x[0] == rate],
                                            quant_ops)
                print(line)
    for name, speedup in uncapped.items():
        if name in BASELINE.values() or math.isnan(speedup):
            continue
        cost = 1 / speedup - 1
        print(f"  uncapped {name}: {cost:+.1%} step time vs uncompressed "
              f"({'meets' if cost < UNCAPPED_COST_GOAL else 'misses'} < +5%)")


def _held_by(name: str, r: dict, rate_rows: list[tuple], quant_ops: dict) -> str:
    """Where a missed speed-up went: the bytes bound, the rank's CPU, the quantization ops."""
    stage = VARIANTS[name][0]
    base = next(x[3] for x in rate_rows if x[1] == BASELINE[stage])
    said = [(f"step {base['step']:.3f} -> {r['step']:.3f} s; rank CPU {base['cpu']:.3f} -> "
             f"{r['cpu']:.3f} s/step")]
    if r["cpu"] > 0.8 * r["step"]:
        said.append("the rank is CPU-bound (process CPU >= 80% of the step: compute, gloo's and "
                    "the kernel's TCP work and the compression share 2 cores)")
    method = (VARIANTS[name][1] or {}).get("gradients", {}).get("method")
    if quant_ops and method in ("int8", "int4"):
        params = sum(p.numel() for p in _build().parameters())
        per_step = (quant_ops[f"quantize {method}"] + quant_ops[f"dequantize-sum {method}"]) * params
        said.append(f"quantize + dequantize-sum of the gradients ~{per_step:.3f} CPU s per "
                    "micro-step (ops measured on these cores)")
    if quant_ops and method == "topk":
        params = sum(p.numel() for p in _build().parameters())
        said.append(f"top-k selection ~{quant_ops['topk select'] * params:.3f} CPU s per "
                    "micro-step (zero_ext::topk_feedback_select measured on these cores)")
    if stage == 2:
        said.append(f"the optimizer step with its bf16 parameter all-gather (not compressed at "
                    f"stage 2) is {r['optimizer'] / r['step']:.0%} of the step")
    said.append(f"forward {base['forward']:.3f} -> {r['forward']:.3f}, backward "
                f"{base['backward']:.3f} -> {r['backward']:.3f}, optimizer step "
                f"{base['optimizer']:.3f} -> {r['optimizer']:.3f} s")
    return "; ".join(said)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="uncapped,1gbit,300mbit",
                        help="tbf rates of the link between the nodes (uncapped: no tbf)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=4,
                        help="timed steps per variant on a capped link")
    parser.add_argument("--uncapped-steps", type=int, default=16,
                        help="timed steps per variant on the uncapped link")
    parser.add_argument("--accumulation", type=int, default=ACCUMULATION,
                        help="micro-steps per optimizer step")
    parser.add_argument("--bucket", type=int, default=REDUCE_BUCKET,
                        help="reduce_bucket_size (elements) of every variant; the default puts "
                             "the whole model in one bucket, so a micro-step's reduction starts "
                             "after its backward")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per two-node run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the 1gbit link only, 2 timed steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    globals()["REDUCE_BUCKET"] = args.bucket  # what _config reads, here and in the workers
    if args.quick:
        args.rates, args.steps, args.uncapped_steps = "1gbit", 2, 2
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.worker:
        worker(args)
        return 0
    from two_nodes import available

    ok, why = available()
    if not ok:
        print(f"two nodes cannot be made here: {why}")
        return 1
    started = time.time()
    # PYTHONPATH: the ranks import this checkout's zero_ext whatever pip installed.
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    params = sum(p.numel() for p in _build().parameters())
    print(f"GPT {MODEL} ({params / 1e6:.2f}M parameters), bf16, micro-batch {MICRO} x "
          f"{MODEL['block']} tokens per rank, {args.accumulation} micro-steps per step, "
          f"overlap_comm on, reduce_bucket_size {args.bucket}, quantization block {BLOCK}; 2 "
          f"nodes x 1 rank, one thread per rank; glibc malloc: {_malloc_settings()}; "
          f"{_load()}")
    rows, quant_ops = [], {}
    for rate in args.rates.split(","):
        got = _run_two_nodes(None if rate == "uncapped" else rate, args, env)
        quant_ops = got["quant_ops"] or quant_ops
        rows += _print_rate(rate, got, args)
        print(f"  ({_load()}, {time.time() - started:.0f} s so far)")
    if quant_ops:
        print("\nquantization ops on rank 0's core (bf16, CPU ns per element): " + ", ".join(
            f"{op} {s * 1e9:.2f}" for op, s in quant_ops.items()))
    _verdict(rows, [r for r in args.rates.split(",") if r != "uncapped"], quant_ops, args)
    print(f"{time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
