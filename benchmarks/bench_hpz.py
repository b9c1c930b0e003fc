"""Stage 3 across two nodes x 2 ranks: the flat path, hpZ (zero_hpz_partition_size = 2) and hpZ
with the hierarchical all-gather, at link rates capped with tc tbf (tests/two_nodes.py:
network namespaces joined by a veth pair, gloo between them, torchrun's c10d rendezvous).
Prints seconds per step and, from zero_ext's traffic counters, the bytes each node sends to
the other per step (all-gathers and reduce-scatters apart).

    python benchmarks/bench_hpz.py                          # 200mbit and uncapped
    python benchmarks/bench_hpz.py --rates 200mbit --steps 4

Needs root (network namespaces). The two "nodes" share this machine's cores (4 ranks of one
thread each); run it on an otherwise idle machine. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests")]

MODEL = {"vocab": 64, "block": 64, "dim": 256, "layers": 3, "heads": 4}
MICRO = 8
VARIANTS = {"flat": {}, "hpz": {"zero_hpz_partition_size": 2},
            "hpz+hierarchical": {"zero_hpz_partition_size": 2, "hierarchical_allgather": True}}


def worker(variant: str, steps: int, warmup: int = 2) -> None:
    """One rank under torchrun: `warmup` steps, then `steps` timed; one JSON line."""
    import torch
    from train_gpt import GPT

    import zero_ext
    from zero_ext import comm

    torch.manual_seed(0)
    model = GPT(**MODEL)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "overlap_comm": True,
                                    "stage3_param_persistence_threshold": 1000,
                                    **VARIANTS[variant]},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "steps_per_print": 10**9}
    engine, _, _, _ = zero_ext.initialize(model=model, config=config)
    gen = torch.Generator().manual_seed(comm.rank())

    def step():
        tokens = torch.randint(0, MODEL["vocab"], (MICRO, MODEL["block"] + 1), generator=gen)
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        engine.step()

    for _ in range(warmup):
        step()
    comm.barrier()
    comm.traffic.reset()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    comm.barrier()
    seconds = (time.perf_counter() - started) / steps
    traffic = comm.traffic.snapshot()
    line = "result " + json.dumps({
        "rank": comm.rank(), "seconds": seconds,
        "inter": {op: b / steps for op, b in traffic.inter_node_bytes.items()},
        "intra": {op: b / steps for op, b in traffic.intra_node_bytes.items()}}) + "\n"
    os.write(sys.stdout.fileno(), line.encode())


def _results(stdouts: list[str]) -> list[dict]:
    decoder, found = json.JSONDecoder(), []
    for out in stdouts:
        for match in re.finditer(r"result (?=\{)", out):
            found.append(decoder.raw_decode(out, match.end())[0])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="200mbit,none", help="tbf rates; none: uncapped")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    from two_nodes import TwoNodes, available

    ok, why = available()
    if not ok:
        sys.exit(f"bench_hpz: two nodes cannot be made here: {why}")
    print(f"GPT {MODEL}, micro-batch {MICRO}, stage 3, 2 nodes x 2 ranks (gloo), "
          f"{args.steps} timed steps after 2", flush=True)
    print("| link | variant | s/step | node->node all-gather MB/step | node->node reduce-scatter "
          "MB/step | within-node all-gather MB/step |")
    print("|---|---|---:|---:|---:|---:|")
    for rate in args.rates.split(","):
        with TwoNodes(rate=None if rate == "none" else rate) as nodes:
            for port, variant in enumerate(VARIANTS, start=29561):
                rdzv = (f"--nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d "
                        f"--rdzv_endpoint=$NODE0_ADDR:{port} --rdzv_id=bh{secrets.token_hex(4)}")
                command = (f"{sys.executable} -m torch.distributed.run {rdzv} "
                           f"{os.path.abspath(__file__)} --worker {variant} --steps {args.steps}")
                runs = nodes.run([command, command], timeout=600, cwd=ROOT)
                results = _results([r.stdout for r in runs])
                if len(results) != 4:
                    sys.exit(f"bench_hpz: {variant} at {rate} failed:\n"
                             + "\n".join(r.stderr[-2000:] for r in runs))
                # Per node (ranks 0-1 and 2-3 under torchrun), the larger of the two.
                def node_mb(link: str, op: str, results=results) -> float:
                    return max(sum(r[link].get(op, 0.0) for r in results
                                   if r["rank"] // 2 == node) for node in (0, 1)) / 1e6

                seconds = max(r["seconds"] for r in results)
                print(f"| {rate} | {variant} | {seconds:.3f} | "
                      f"{node_mb('inter', 'all_gather'):.2f} | "
                      f"{node_mb('inter', 'reduce_scatter'):.2f} | "
                      f"{node_mb('intra', 'all_gather'):.2f} |", flush=True)


if __name__ == "__main__":
    main()
