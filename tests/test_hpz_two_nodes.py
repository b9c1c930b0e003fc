"""hpZ with hierarchical all-gathers across two real (namespaced) nodes, 2 ranks each
(tests/two_nodes.py, torchrun's c10d rendezvous, gloo between the hosts): examples/train_gpt.py
with examples/configs/zero3_hpz.json ends with exactly the weights of the flat path
(examples/configs/zero3.json) on the same nodes; its backward all-gathers send no byte across
nodes, and its other all-gathers send 2/3 of the flat ring's bytes across (hierarchical: each
node receives (M-1)/M of a gather instead of (N-1)/N, M = 2 nodes, N = 4 ranks). The topology
comes from torchrun's GROUP_RANK / LOCAL_WORLD_SIZE. Skips where network namespaces can't be
made."""

import json
import os
import re
import secrets
import sys

import pytest
import torch
from safetensors.torch import load_file

import zero_ext

from two_nodes import TwoNodes, available

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
EXAMPLES = os.path.join(ROOT, "examples")
STEPS = 3
NODES_TIMEOUT_S = 150  # both runs, one after the other: ~30 s on 2 idle cores, ~75 s on loaded ones


def _run(config: str, save_dir, port: int) -> str:
    rdzv = (f"--nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d "
            f"--rdzv_endpoint=$NODE0_ADDR:{port} --rdzv_id=zxhpz-{secrets.token_hex(4)}")
    return (f"{sys.executable} -m torch.distributed.run {rdzv} "
            f"{os.path.join(TESTS, 'hpz_traffic_probe.py')} "
            f"{os.path.join(EXAMPLES, 'train_gpt.py')} --config "
            f"{os.path.join(EXAMPLES, 'configs', config)} --steps {STEPS} --save-dir {save_dir}")


def _errors(stderr: str) -> str:
    """The lines that say what failed (torchrun's summary alone names only a signal)."""
    return "\n".join(line for line in stderr.splitlines()
                     if re.search(r"Error|Traceback|terminate|what\(\)|abort", line))[-6000:]


def _traffic(stdouts: list[str]) -> dict[int, dict]:
    """Every rank's `traffic {json}` report (found wherever it starts: a node's two ranks
    write to one stream)."""
    decoder, reports = json.JSONDecoder(), []
    for out in stdouts:
        for match in re.finditer(r"traffic (?=\{)", out):
            reports.append(decoder.raw_decode(out, match.end())[0])
    return {report["rank"]: report for report in reports}


def _final_loss(stdouts: list[str]) -> str:
    """Rank 0's report line, from whichever node it ran on."""
    for stdout in stdouts:
        match = re.search(rf"stage 3, 4 rank\(s\), {STEPS} steps .*loss ([\d.]+ -> [\d.]+)",
                          stdout)
        if match:
            return match.group(1)
    raise AssertionError(f"no final loss line in:\n{stdouts}")


@pytest.mark.skipif(not available()[0], reason=available()[1] or "two nodes available")
def test_hpz_across_two_nodes_equals_the_flat_path_without_backward_bytes_across(tmp_path):
    runs = {"flat": ("zero3.json", 29531), "hpz": ("zero3_hpz.json", 29532)}
    commands = " && ".join(f"echo '== {name}' && {_run(config, tmp_path / name, port)}"
                           for name, (config, port) in runs.items())
    with TwoNodes() as nodes:
        results = nodes.run([commands, commands], timeout=NODES_TIMEOUT_S, cwd=ROOT)
    for r in results:
        assert not r.timed_out, (f"node{r.node} still running after {NODES_TIMEOUT_S} s:\n"
                                 f"{r.stdout[-2000:]}{r.stderr[-3000:]}")
        assert r.returncode == 0, (f"node{r.node} exited {r.returncode}:\n{_errors(r.stderr)}"
                                   f"\n{r.stdout[-1000:]}")
    # Each node's output: the flat run's lines, then hpZ's.
    parts = [dict(zip(("flat", "hpz"), re.split(r"^== hpz$", r.stdout, flags=re.MULTILINE)))
             for r in results]
    traffic = {name: _traffic([p[name] for p in parts]) for name in runs}
    assert sorted(traffic["flat"]) == sorted(traffic["hpz"]) == [0, 1, 2, 3], traffic
    # Ranks 1 and 3 end each node's block: the flat ring crosses nodes from them only.
    for rank in range(4):
        flat, hpz = traffic["flat"][rank], traffic["hpz"][rank]
        assert hpz["backward"]["inter_node_bytes"] == 0.0
        flat_backward = sum(flat["backward"].values())
        assert flat_backward > 0
        # Half of every unit within the node instead of 3/4 over the ring (fp32 units).
        assert hpz["backward"]["intra_node_bytes"] == pytest.approx(flat_backward * 2 / 3,
                                                                    rel=1e-12)
        assert (flat["backward"]["inter_node_bytes"] > 0) == (rank % 2 == 1)
    elsewhere = {name: sum(t[r]["elsewhere"]["inter_node_bytes"] for r in range(4))
                 for name, t in traffic.items()}
    assert elsewhere["hpz"] == pytest.approx(elsewhere["flat"] * 2 / 3, rel=1e-12), elsewhere

    # Gathers move values, never add them: the same bits as the flat path.
    assert _final_loss([p["hpz"] for p in parts]) == _final_loss([p["flat"] for p in parts])
    flat = load_file(zero_ext.consolidate(str(tmp_path / "flat"), str(tmp_path / "f.st")))
    hpz = load_file(zero_ext.consolidate(str(tmp_path / "hpz"), str(tmp_path / "h.st")))
    assert flat.keys() == hpz.keys()
    for name in flat:
        assert torch.equal(hpz[name], flat[name]), name
