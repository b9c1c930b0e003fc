"""The scaling model (zero_ext/scaling.py) against real two-node runs: seconds per step of
examples/train_gpt.py's GPT at ZeRO stages 1-3 on 2 nodes x 1 rank (tests/two_nodes.py:
network namespaces joined by a veth pair, gloo between them, torchrun's c10d rendezvous),
at link rates capped with tc tbf, next to the model's prediction from
  - the network as the shipped benchmark measures it over the same link, in the same job
    (zero_ext.scaling_measure, as `python -m zero_ext.estimate --measure-network` runs it),
  - the compute measured here first: the same model, config and micro-batch on one rank
    (forward, backward and optimizer step timed apart, per stage; two such one-rank runs at
    once, as the two nodes' ranks share this machine's cores),
  - the step's collectives as the scaling model plans them (their bytes as gloo's algorithms
    send them checked against the traffic counters of the timed steps, printed),
  - the collectives' work on the ranks' own cores (Cluster.host): gloo moves every byte
    through the kernel on the cores the compute needs, so that part cannot hide behind
    compute; measured by the same network benchmark on the same link (the machine's CPU
    seconds per collective, per rank: scaling_measure's host_fits).

    python benchmarks/bench_two_nodes.py                       # uncapped, 200mbit, 1gbit
    python benchmarks/bench_two_nodes.py --rates 200mbit --steps 4

Needs root (network namespaces). Each rank runs one thread (the two "nodes" share this
machine's cores); run it on an otherwise idle machine. About 90 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests")]

MODEL = {"vocab": 64, "block": 64, "dim": 256, "layers": 3, "heads": 4}
MICRO = 8            # sequences per rank per micro-step
STAGES = (1, 2, 3)


def _config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, "overlap_comm": True,
                                  "stage3_param_persistence_threshold": 1000},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "steps_per_print": 10**9}


def _build():
    import torch
    from train_gpt import GPT

    torch.manual_seed(0)
    return GPT(**MODEL)


def _train(stage: int, steps: int, warmup: int = 2) -> dict:
    """Times `steps` steps (after `warmup`) of this rank; forward, backward and step apart, and
    the traffic counters of the last step."""
    import torch

    import zero_ext
    from zero_ext import comm

    engine, _, _, _ = zero_ext.initialize(model=_build(), config=_config(stage))
    generator = torch.Generator().manual_seed(comm.rank())
    phases = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for step in range(warmup + steps):
        tokens = torch.randint(0, MODEL["vocab"], (MICRO, MODEL["block"] + 1),
                               generator=generator)
        comm.traffic.reset()
        if comm.world_size() > 1:
            comm.barrier()
        t0 = time.perf_counter()
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if step >= warmup:
            for name, seconds in (("forward", t1 - t0), ("backward", t2 - t1),
                                  ("optimizer", t3 - t2), ("step", t3 - t0)):
                phases[name].append(seconds)
    traffic = comm.traffic.snapshot()
    return {name: statistics.median(times) for name, times in phases.items()} | {
        "bytes": traffic.bytes, "calls": traffic.calls}


def worker(args) -> None:
    """Under torchrun (or alone, for the one-rank compute): every stage, and the network."""
    import torch

    from zero_ext import comm
    from zero_ext.scaling_measure import measure_network

    torch.set_num_threads(1)
    comm.init_distributed()
    out = {"stages": {stage: _train(stage, args.steps) for stage in STAGES}}
    if comm.world_size() > 1:
        out["network"] = measure_network()
    if comm.rank() == 0:
        print("BENCH " + json.dumps(out), flush=True)


def _parse(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"no result line in:\n{stdout[-3000:]}")


def _worker_command(steps: int) -> str:
    return f"{sys.executable} {os.path.abspath(__file__)} --worker --steps {steps}"


def _predict(stage: int, measured_network: dict, compute: dict):
    import torch

    from zero_ext import scaling
    from zero_ext.scaling_measure import cluster_from_measurement

    with torch.device("meta"):
        model = _build()
    plan = scaling.plan_step(model, _config(stage), 2, gpus_per_node=1)
    cluster = cluster_from_measurement(measured_network, 2, 1, scaling.Link(1e12, 0.0))
    work = scaling.Compute(forward=compute["forward"], backward=compute["backward"],
                           optimizer=compute["optimizer"])
    gloo = sum(scaling.planned_traffic(plan, 2, transport="gloo").bytes.values())
    return scaling.predict_step(plan, cluster, work, stage=stage), gloo


def _one_rank_compute(steps: int, env: dict) -> dict:
    """Each phase's compute on one rank alone (world size 1: no communication), two such
    processes at once, as the two nodes' ranks share this machine's cores; their mean."""
    procs = [subprocess.Popen(_worker_command(steps), shell=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for _ in range(2)]
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"the one-rank run failed:\n{err[-3000:]}")
        runs.append(_parse(out)["stages"])
    compute = {stage: {phase: statistics.mean(run[stage][phase] for run in runs)
                       for phase in ("forward", "backward", "optimizer")}
               for stage in runs[0]}
    print("compute on one rank, two at once (s): " + "; ".join(
        f"stage {s}: forward {c['forward']:.4f} backward {c['backward']:.4f} optimizer "
        f"{c['optimizer']:.4f}" for s, c in compute.items()))
    return compute


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="uncapped,200mbit,1gbit",
                        help="tbf rates of the link between the nodes (uncapped: no tbf)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per stage")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    from two_nodes import TwoNodes, available

    ok, why = available()
    if not ok:
        print(f"two nodes cannot be made here: {why}")
        return 1
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"GPT {MODEL}, micro-batch {MICRO} x {MODEL['block']} tokens per rank, fp32, "
          "overlap_comm on; one thread per rank")
    header = (f"{'link':>9} {'stage':>5} {'measured s':>10} {'predicted s':>11} "
              f"{'measured/predicted':>18} {'bytes/step (counted = planned)':>31}")
    rows = []
    for rate in args.rates.split(","):
        cap = None if rate == "uncapped" else rate
        # The baseline right before the two-node run, so both see the same machine.
        compute = _one_rank_compute(args.steps, env)
        rdzv = (f"-m torch.distributed.run --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d "
                f"--rdzv_endpoint=$NODE0_ADDR:29531 --rdzv_id=zxb-{secrets.token_hex(4)}")
        command = _worker_command(args.steps).replace(
            f"{sys.executable} ", f"{sys.executable} {rdzv} ", 1)
        with TwoNodes(rate=cap) as nodes:
            results = nodes.run([command, command], timeout=600, cwd=ROOT, env=env)
        if any(r.timed_out for r in results) or "BENCH " not in results[0].stdout:
            raise RuntimeError("the two-node run failed:\n" + "\n".join(
                f"node{r.node} ({r.returncode}):\n{r.stderr[-3000:]}" for r in results))
        for r in results:
            if r.returncode:  # after the results were in: said, not hidden
                last = [line for line in r.stderr.splitlines() if "terminate" in line
                        or "Error" in line][:1]
                print(f"note: node{r.node} exited {r.returncode} after the run ({last})")
        measured = _parse(results[0].stdout)
        network = measured["network"]
        print(f"{rate}: network fit: " + "; ".join(
            f"{op} alpha {f['alpha_s'] * 1e6:.0f} us, {8 / f['beta_s_per_byte'] / 1e6:.0f} "
            "Mbit/s" for op, f in network["fits"].items()))
        print(f"{rate}: CPU per collective per rank: " + "; ".join(
            f"{op} {f['alpha_s'] * 1e6:.0f} us + {f['beta_s_per_byte'] * 1e9:.2f} ns/B "
            f"({f['beta_s_per_byte'] / network['fits'][op]['beta_s_per_byte']:.2f} "
            "core at the fitted rate)" for op, f in network["host_fits"].items()))
        for stage in STAGES:
            got = measured["stages"][str(stage)]
            predicted, planned = _predict(stage, network, compute[str(stage)])
            counted = sum(got["bytes"].values())
            rows.append((rate, stage, got["step"], predicted.seconds, counted, planned))
            print(f"  stage {stage}: measured forward {got['forward']:.4f} backward "
                  f"{got['backward']:.4f} optimizer step {got['optimizer']:.4f}; predicted "
                  f"communication {predicted.communication:.4f}, exposed {predicted.exposed:.4f}")
    print(header)
    for rate, stage, got, predicted, counted, planned in rows:
        same = "=" if round(counted) == round(planned) else "!="
        print(f"{rate:>9} {stage:>5} {got:>10.4f} {predicted:>11.4f} {got / predicted:>18.3f} "
              f"{counted:>14.0f} {same} {planned:<14.0f}")
    worst = max(abs(got / predicted - 1) for _, _, got, predicted, _, _ in rows)
    print(f"largest deviation {worst:.1%}; {time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
