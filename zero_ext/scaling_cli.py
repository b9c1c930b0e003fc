"""The scaling model's part of `python -m zero_ext.estimate` (zero_ext/estimate.py calls it):
the flags that describe a cluster and the per-step compute, the step-time table by stage and
node count, and the pick; and `--measure-network` (run under torchrun).

    python -m zero_ext.estimate --params 7B --network 100Gbps,5us --nodes 1,2,4,16,128 \\
        --tokens-per-gpu 16384
    torchrun --nnodes=2 --nproc_per_node=1 ... -m zero_ext.estimate --measure-network \\
        --save-network net.json
    python -m zero_ext.estimate --hf-config config.json --network net.json --nodes 2 \\
        --gpus-per-node 1 --compute-time 0.8
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap

from zero_ext import scaling
from zero_ext.scaling import Cluster, Compute, Link

__all__ = ["add_arguments", "run", "wanted"]

DEFAULT_INTRA = "450GB/s,2us"   # NVLink 4 (H100/H200): 450 GB/s per GPU each way
DEFAULT_PEAK_TFLOPS = 989.0     # H100/H200 SXM bf16 dense
DEFAULT_MFU = 0.4


def add_arguments(parser: argparse.ArgumentParser, model_group) -> None:
    from zero_ext.estimate import _arg, _parse_positive, _parse_sizes

    model_group.add_argument(
        "--measure-network", action="store_true",
        help="time all-reduce, all-gather and reduce-scatter between the ranks of this job "
             "(run under torchrun across the nodes) and fit alpha and beta for --network")
    group = parser.add_argument_group(
        "step time (the scaling model: docs/scaling.md)",
        "With --network, predicts seconds per optimizer step for each stage and node count "
        "and says which configuration to pick; --world-sizes is then nodes x GPUs per node.")
    group.add_argument("--network", metavar="BW[,LAT]|JSON",
                       help="each node's network bandwidth and latency, e.g. 100Gbps,5us (5us "
                            "when left out), or the JSON --measure-network --save-network wrote")
    group.add_argument("--save-network", metavar="JSON",
                       help="with --measure-network: where rank 0 writes the fits")
    group.add_argument("--nodes", type=_arg(_parse_sizes), default=[1], metavar="N,N,...",
                       help="node counts to tabulate (default 1)")
    group.add_argument("--gpus-per-node", type=_arg(_parse_positive), default=8, metavar="P",
                       help="GPUs (ranks) per node (default 8)")
    group.add_argument("--intra-node", default=DEFAULT_INTRA, metavar="BW[,LAT]",
                       help=f"link within a node per GPU (default {DEFAULT_INTRA}, NVLink 4)")
    group.add_argument("--compute-time", type=float, metavar="S",
                       help="measured forward + backward seconds of one micro-step on one "
                            "rank (split 1:2 between them)")
    group.add_argument("--tokens-per-gpu", type=float, metavar="T",
                       help="tokens each GPU processes per optimizer step; compute is then "
                            "6 x parameters x T FLOPs at --peak-tflops x --mfu")
    group.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, metavar="F",
                       help=f"peak TFLOP/s per GPU (default {DEFAULT_PEAK_TFLOPS:g}, H100/H200 "
                            "bf16 dense)")
    group.add_argument("--mfu", type=float, default=DEFAULT_MFU, metavar="U",
                       help=f"model FLOPs utilization reached (default {DEFAULT_MFU})")
    group.add_argument("--hpz", type=_arg(_parse_positive), metavar="K",
                       help="also tabulate stage 3 with zero_hpz_partition_size K (ZeRO++ hpZ)")
    group.add_argument("--gpu-memory", metavar="GB",
                       help="device memory per GPU, e.g. 141GB: configurations whose model "
                            "states do not fit are not picked")


def wanted(args) -> bool:
    return args.network is not None


def measure(args) -> int:
    """--measure-network: run under torchrun; rank 0 prints (and saves) the fits."""
    from zero_ext import comm
    from zero_ext.scaling_measure import format_measurement, measure_network, save

    comm.init_distributed()
    measured = measure_network()
    if comm.rank() == 0:
        print(format_measurement(measured))
        if args.save_network:
            save(measured, args.save_network)
            print(f"written to {args.save_network}; use it as --network {args.save_network}")
    return 0


def run(args, parser, model, base: dict, stages: list[int], source: str) -> int:
    """The step-time table for `model` under config dict `base` at each stage and node count."""
    from zero_ext.estimate import _at_stage, estimate_from_config

    if args.compute_time is None and args.tokens_per_gpu is None:
        parser.error("--network needs the compute per step: --compute-time S (measured "
                     "forward + backward of one micro-step) or --tokens-per-gpu T (FLOPs at "
                     "--peak-tflops x --mfu)")
    try:
        intra = scaling.parse_network(args.intra_node)
    except ValueError as error:
        parser.error(f"--intra-node: {error}")
    if "overlap_comm" not in base["zero_optimization"]:
        # Who asks how fast a configuration can be wants gradient reduction behind backward.
        base = {**base, "zero_optimization": {**base["zero_optimization"], "overlap_comm": True}}
    if args.stages is None and len(stages) > 1:
        stages = [s for s in stages if s >= 1]  # stage 0 only when asked: 1 moves the same bytes
    capacity = _parse_bytes(args.gpu_memory, parser) if args.gpu_memory else None
    params = model if isinstance(model, int) else sum(p.numel() for p in model.parameters())
    rows, notes = [], []
    for nodes in args.nodes:
        cluster = _cluster(args, parser, nodes, intra)
        world = cluster.world_size
        predictions, memory = [], {}
        for stage in stages:
            # hpZ's block is at most a node (a divisor of its GPUs, as the engine requires).
            hpzs = [1] + ([math.gcd(args.hpz, args.gpus_per_node)]
                          if stage == 3 and args.hpz and args.hpz > 1 else [])
            for hpz in hpzs:
                config = _at_stage(base, stage)
                if hpz > 1:
                    config["zero_optimization"]["zero_hpz_partition_size"] = hpz
                plan = scaling.plan_step(model, config, world, gpus_per_node=args.gpus_per_node,
                                         largest_unit=args.largest_unit)
                compute = _compute(args, params, 1 + max(c.micro_step for c in plan))
                p = scaling.predict_step(plan, cluster, compute, stage=stage, hpz=hpz)
                predictions.append(p)
                held = estimate_from_config(model, config, world, largest_unit=args.largest_unit)
                # hpZ's secondary copy: the parameters sharded over hpz ranks, not all.
                memory[p.label] = held.device.total + (held.device.params * world // hpz
                                                       if hpz > 1 else 0)
        pick, reason = scaling.recommend(predictions, memory, capacity)
        rows.append((nodes, world, [(p, capacity is not None and memory[p.label] > capacity)
                                    for p in predictions], pick))
        notes.append(f"{world} GPUs: {reason}")
    print(_table(rows, source, args))
    for note in notes:
        print(textwrap.fill(note, 100, subsequent_indent="  "))
    return 0


def _cluster(args, parser, nodes: int, intra: Link) -> Cluster:
    if args.network.endswith(".json"):
        from zero_ext.scaling_measure import cluster_from_measurement
        try:
            with open(args.network) as f:
                measured = json.load(f)
            return cluster_from_measurement(measured, nodes, args.gpus_per_node, intra)
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--network {args.network}: not a measurement --measure-network "
                         f"--save-network wrote ({error})")
    try:
        return Cluster(nodes, args.gpus_per_node, scaling.parse_network(args.network), intra)
    except ValueError as error:
        parser.error(f"--network: {error}")


def _compute(args, params: int, micro_steps: int) -> Compute:
    if args.compute_time is not None:
        return Compute(forward=args.compute_time / 3, backward=2 * args.compute_time / 3)
    flops = args.peak_tflops * 1e12 * args.mfu
    return Compute.from_flops(params, args.tokens_per_gpu / micro_steps, flops)


def _table(rows, source: str, args) -> str:
    labels = [p.label for p, _ in rows[0][2]]
    header = ["nodes", "GPUs"] + [f"{label} s" for label in labels] + \
        ["exposed comm (best)", "pick"]
    lines = []
    for nodes, world, predictions, pick in rows:
        best = min((p for p, _ in predictions), key=lambda p: p.seconds)
        lines.append([str(nodes), str(world)]
                     + [f"{p.seconds:.3f}{'!' if too_big else ''}" for p, too_big in predictions]
                     + [f"{best.exposed / best.seconds:.0%}", pick])
    widths = [max(len(r[i]) for r in lines + [header]) for i in range(len(header))]
    compute = (f"compute {args.compute_time:g} s per micro-step" if args.compute_time is not None
               else f"{args.tokens_per_gpu:g} tokens/GPU/step at {args.peak_tflops:g} TFLOP/s "
                    f"x MFU {args.mfu:g}")
    title = (f"{source}; network {args.network} per node, {args.gpus_per_node} GPUs/node, "
             f"intra-node {args.intra_node}; {compute}; overlap_comm "
             f"{'true unless the config says otherwise' if not args.config else 'as configured'}")
    legend = "seconds per optimizer step, predicted" + (
        f" (!: model states do not fit {args.gpu_memory} per GPU)" if args.gpu_memory else "")
    out = [textwrap.fill(title, 100), legend]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header] + lines]
    return "\n".join(out)


_BYTES = {"gb": 1e9, "gib": 2**30, "tb": 1e12, "mb": 1e6, "mib": 2**20}


def _parse_bytes(text: str, parser) -> int:
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    unit = text[len(number):].strip().lower()
    try:
        return int(float(number) * _BYTES[unit])
    except (ValueError, KeyError):
        parser.error(f"--gpu-memory {text!r}: write a size with its unit, e.g. 141GB or 80GiB")
