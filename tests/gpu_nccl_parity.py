"""World-size-2 engine parity on ONE GPU: NCCL first, each rank its own NCCL_HOSTID; gloo on
CUDA tensors where NCCL fails. On a machine without a GPU: gloo on CPU tensors (how
tests/test_gpu_check.py runs it). benchmarks/gpu_check.sh runs it on the GPU machine.

    python tests/gpu_nccl_parity.py                      # GPU: nccl, then gloo if needed
    python tests/gpu_nccl_parity.py --backends gloo --json parity.json

NCCL refuses two ranks on one GPU as duplicates ("Duplicate GPU detected"); a distinct
NCCL_HOSTID per rank makes each rank look like a host of its own, so NCCL connects them through
its network transport over the loopback interface (sockets) instead. Each attempt is two fresh
processes, bounded by --timeout seconds (a hung NCCL init is killed, and gloo is tried next).

Inside each attempt both ranks train engine_cases.TinyNet with zero_ext (stages 1-3, fp32 and
bf16, with offload_optimizer / offload_param, gradient accumulation) and rank 0 compares every
case with the single-process reference on the whole batch (engine_cases.train_reference, on
CPU): fp32 parameters and gradient norms at 1e-5 relative, bf16 within its rounding
(engine_cases.assert_matches_reference); then four with compressed communication (int8, int8
with qwZ, int4 with error feedback, top-k), each within its CPU test's bound on the relative
error of the update (compression_cases.UPDATE_ERROR); and two with a mixture of experts
routed differently per rank, its blocks leaf modules (moe_cases, stage 3, fp32 at 1e-5). It
prints one line per attempt as it ends, and rewrites --json after each (the attempts so far;
one under way stands there as not run), so a kill at any point leaves what was measured; SIGINT (a caller's timeout) ends the
attempt under way, recorded as interrupted. Exit code 0 when an attempt ran and every case in
it passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3
OFFLOAD_OPTIMIZER = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
OFFLOAD_BOTH = {**OFFLOAD_OPTIMIZER, "offload_param": {"device": "cpu", "pin_memory": True}}
# (stage, dtype, gradient accumulation steps, extra zero_optimization keys)
CASES = [(1, "fp32", 1, {}), (2, "fp32", 2, {}), (3, "fp32", 1, {}),
         (3, "fp32", 1, OFFLOAD_OPTIMIZER), (1, "bf16", 1, OFFLOAD_OPTIMIZER),
         (2, "bf16", 1, OFFLOAD_OPTIMIZER), (3, "bf16", 2, OFFLOAD_BOTH)]


# Compressed communication (issue 16) over the same group, each against single-process
# training by the bound its CPU test holds it to (compression_cases.UPDATE_ERROR): int8
# gradients, int8 gradients + int8 weights (qwZ), int4 with error feedback, top-k.
COMPRESSED = [("int8", 2, "bf16"), ("int8+qwZ", 3, "bf16"), ("int4+ef", 3, "bf16"),
              ("topk", 2, "bf16")]


def case_label(stage: int, dtype: str, accumulation: int, zero: dict) -> str:
    offload = "+".join(sorted(zero)) or "no offload"
    return f"stage {stage} {dtype} accumulation {accumulation} {offload}"


def rank_main(backend: str, out_path: str) -> None:
    """One rank: join the group, train every case, and on rank 0 check them and write out."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, HERE)
    import engine_cases

    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(0)  # both ranks on the one GPU; the engine uses the current one
    dist.init_process_group(backend, device_id=torch.device("cuda", 0) if backend == "nccl"
                            else None)
    results, references = {}, {}
    for stage, dtype, accumulation, zero in CASES:
        label = case_label(stage, dtype, accumulation, zero)
        got = engine_cases.train_engine(stage, dtype, accumulation, STEPS, **zero)
        if rank != 0:
            continue
        key = (dtype, accumulation)
        if key not in references:
            references[key] = engine_cases.train_reference(dtype, accumulation, STEPS, 2)
        try:
            engine_cases.assert_matches_reference(got, references[key], dtype, label)
            results[label] = "pass"
        except AssertionError as error:
            results[label] = f"FAIL: {str(error)[:600]}"
    results.update(_compressed_cases())
    results.update(_moe_cases())
    if rank == 0:
        where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        with open(out_path, "w") as f:
            json.dump({"backend": backend, "device": where, "cases": results}, f, indent=1)
    dist.destroy_process_group()


def _moe_cases() -> dict[str, str]:
    """A mixture of experts routed differently per rank, its blocks leaf modules (stage 3,
    fp32; moe_cases), against single-process training; on rank 0 each one's outcome."""
    import moe_cases
    from torch.testing import assert_close

    leaf = {"leaf_module": {"classes": ["MoE"]}}
    trained = {"moe leaf stage 3 fp32": moe_cases._train(
        moe_cases._build(), moe_cases._config(**leaf)),
        "moe leaf stage 3 fp32 non-reentrant checkpointing": moe_cases._train(
        moe_cases._build("non_reentrant"), moe_cases._config(**leaf))}
    if int(os.environ["RANK"]) != 0:
        return {}
    reference, outcomes = moe_cases._reference(), {}
    for label, got in trained.items():
        try:
            for name, value in reference.items():
                assert_close(got["got"][name], value, rtol=1e-5, atol=1e-5, msg=name)
            outcomes[label] = "pass"
        except AssertionError as error:
            outcomes[label] = f"FAIL: {str(error)[:600]}"
    return outcomes


def _compressed_cases() -> dict[str, str]:
    """COMPRESSED's cases trained on this rank; on rank 0 each one's outcome by label."""
    import compression_cases as cases

    chosen = [case for case in cases.PARITY if case[:3] in COMPRESSED]
    trained = cases.parity(chosen)
    if "reference" not in trained:
        return {}
    outcomes = {}
    for label, stage, dtype, _ in chosen:
        error = cases.update_error(trained[(label, stage, dtype)]["params"],
                                   trained["reference"][dtype]["params"], dtype)
        bound = cases.UPDATE_ERROR[label][1]
        outcomes[f"compressed {label} stage {stage} {dtype}"] = "pass" if error < bound else \
            f"FAIL: relative error of the update {error:.3g}, bound {bound}"
    return outcomes


def attempt(backend: str, timeout: float, workdir: str) -> dict:
    """Two rank processes of this script over `backend`; what rank 0 wrote, or why nothing."""
    sys.path.insert(0, HERE)
    from launch import QUIET_ENV, free_port

    out_path = os.path.join(workdir, f"{backend}.json")
    port = str(free_port())
    with contextlib.ExitStack() as stack:
        procs, logs = [], []
        for rank in range(2):
            env = {**os.environ, **QUIET_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": "2"}
            if backend == "nccl":
                # A host of its own per rank, reached over loopback sockets.
                env.update(NCCL_HOSTID=f"zero_ext-parity-rank{rank}", NCCL_IB_DISABLE="1")
                env.setdefault("NCCL_SOCKET_IFNAME", "lo")
            logs.append(stack.enter_context(
                open(os.path.join(workdir, f"{backend}.rank{rank}.log"), "w+")))
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank",
                                           backend, out_path], env=env, stdout=logs[-1],
                                          stderr=subprocess.STDOUT))
        start = time.monotonic()
        try:
            codes = _wait_all(procs, start + timeout)
        except KeyboardInterrupt:  # the caller's timeout (SIGINT): say how far this one got
            codes, interrupted = None, True
            _kill(procs)
        else:
            interrupted = False
        seconds = time.monotonic() - start
        tails = []
        for log in logs:
            log.seek(0)
            tails.append(log.read()[-1500:])
    if interrupted:
        return {"backend": backend, "ran": False, "seconds": seconds, "interrupted": True,
                "why": "interrupted (SIGINT, e.g. the caller's timeout)", "log_tails": tails}
    if codes is None:
        return {"backend": backend, "ran": False, "seconds": seconds,
                "why": f"no result within {timeout:.0f} s (killed)", "log_tails": tails}
    if any(codes) or not os.path.exists(out_path):
        return {"backend": backend, "ran": False, "seconds": seconds,
                "why": f"exit codes {codes}", "log_tails": tails}
    with open(out_path) as f:
        return {**json.load(f), "ran": True, "seconds": seconds}


def _wait_all(procs, deadline: float) -> list[int] | None:
    """The exit codes; None (all killed) past the deadline, or once one rank failed and the
    other is still waiting for it a few seconds later."""
    failed_at = None
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 5:
            break
        time.sleep(0.2)
    _kill(procs)
    return None if failed_at is None else [p.returncode for p in procs]


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _report(a: dict, on_gpu: bool) -> None:
    """The one-line result of an attempt (and its failed cases), printed as soon as it ends."""
    tensors = "CUDA tensors, one GPU" if on_gpu else "CPU tensors"
    if not a["ran"]:
        print(f"{a['backend']} ({tensors}): did not run: {a['why']} after "
              f"{a['seconds']:.0f} s; last output of rank 0:\n{a['log_tails'][0][-800:]}",
              flush=True)
        return
    failed = {k: v for k, v in a["cases"].items() if v != "pass"}
    print(f"{a['backend']} ({tensors}, {a['device']}): ran in {a['seconds']:.0f} s, "
          f"{len(a['cases']) - len(failed)}/{len(a['cases'])} cases pass", flush=True)
    for label, outcome in failed.items():
        print(f"  {label}: {outcome}", flush=True)


def _write(path: str | None, attempts: list[dict]) -> None:
    """The attempts so far, rewritten after each one: a kill later leaves what was measured."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(attempts, f, indent=1)
        os.replace(path + ".tmp", path)


def _interrupt_once(signum, frame) -> None:
    """SIGINT raises KeyboardInterrupt once; later ones are ignored while it cleans up and
    writes out (timeout(1) signals this process and then its whole group: two in a row)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2], sys.argv[3])
        return 0
    signal.signal(signal.SIGINT, _interrupt_once)
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=None,
                        help="comma-separated, tried in order until one runs every case "
                             "(default: nccl,gloo with a GPU, gloo without)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per attempt")
    parser.add_argument("--json", default=None, help="write every attempt's results here")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    backends = (args.backends or ("nccl,gloo" if on_gpu else "gloo")).split(",")
    attempts = []
    with tempfile.TemporaryDirectory() as workdir:
        for backend in backends:
            # Until it ends, the attempt under way stands in the JSON as not (yet) run.
            _write(args.json, attempts + [{"backend": backend, "ran": False, "seconds": None,
                                           "why": "still running when the JSON was last "
                                                  "written (killed?)", "log_tails": [""]}])
            attempts.append(attempt(backend, args.timeout, workdir))
            _write(args.json, attempts)
            _report(attempts[-1], on_gpu)
            if attempts[-1]["ran"] or attempts[-1].get("interrupted"):
                break  # it ran: its failures, if any, are the engine's, not the transport's
    ok = attempts[-1]["ran"] and all(v == "pass" for v in attempts[-1]["cases"].values())
    print(f"parity over {attempts[-1]['backend'] if attempts[-1]['ran'] else 'no backend'}: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
