"""examples/train_gpt.py across two namespaced "nodes" (tests/two_nodes.py: 2 nodes x 1 rank,
torchrun's c10d rendezvous, gloo between the hosts) ends with the same model as one node with
2 ranks (where the gradients are summed in zero_ext's shared-memory arena). Skips where network
namespaces can't be made (not root, no `ip`/`unshare`)."""

import os
import re
import secrets
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import zero_ext

from two_nodes import TwoNodes, available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4  # a few optimizer steps: each run takes ~6 s on 2 CPU cores
# Bounds that keep the test under ~70 s even if a run hangs (a rendezvous that never completes
# would otherwise wait out torchrun's 600 s join timeout).
HOST_TIMEOUT_S, NODES_TIMEOUT_S = 30, 40


def _train_args(save_dir) -> str:
    return (f"{os.path.join(ROOT, 'examples', 'train_gpt.py')} --config "
            f"{os.path.join(ROOT, 'examples', 'configs', 'zero2.json')} --steps {STEPS} "
            f"--save-dir {save_dir}")


def _final_loss(stdout: str) -> float:
    match = re.search(rf"stage 2, 2 rank\(s\), {STEPS} steps .*loss [\d.]+ -> ([\d.]+)", stdout)
    assert match, f"no final loss line in:\n{stdout[-3000:]}"
    return float(match.group(1))


def _weights(save_dir, out) -> dict[str, torch.Tensor]:
    return load_file(zero_ext.consolidate(str(save_dir), str(out)))


@pytest.mark.skipif(not available()[0], reason=available()[1] or "two nodes available")
def test_two_nodes_train_like_one_node(tmp_path):
    # Its own session, so a timeout ends torchrun's workers too, not torchrun alone.
    host = subprocess.Popen(
        f"{sys.executable} -m torch.distributed.run --nproc_per_node=2 "
        f"{_train_args(tmp_path / 'one')}", shell=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        host_out, host_err = host.communicate(timeout=HOST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(host.pid, signal.SIGKILL)
        host.communicate()
        pytest.fail(f"the one-node run was still running after {HOST_TIMEOUT_S} s")
    assert host.returncode == 0, f"one-node run failed:\n{host_err[-3000:]}"

    rdzv = (f"--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d "
            f"--rdzv_endpoint=$NODE0_ADDR:29511 --rdzv_id=zx2n-{secrets.token_hex(4)}")
    # The probe prints what every rank on this node sees as its host (the same UTS namespace).
    command = (f"{sys.executable} -c 'import socket; print(\"host\", socket.gethostname())' && "
               f"{sys.executable} -m torch.distributed.run {rdzv} {_train_args(tmp_path / 'two')}")
    with TwoNodes() as nodes:
        results = nodes.run([command, command], timeout=NODES_TIMEOUT_S, cwd=ROOT)
    for r in results:
        assert not r.timed_out, (f"node{r.node} still running after {NODES_TIMEOUT_S} s:\n"
                                 f"{r.stdout[-2000:]}{r.stderr[-3000:]}")
        assert r.returncode == 0, f"node{r.node} exited {r.returncode}:\n{r.stderr[-3000:]}"
    hosts = [m.group(1) if (m := re.search(r"^host (\S+)$", r.stdout, re.MULTILINE)) else None
             for r in results]
    assert hosts == ["node0", "node1"], f"the nodes' hostnames, as their ranks see them: {hosts}"

    # The same data shards per rank and the same gradients, but summed by gloo between the
    # nodes and in the shared-memory arena on one node, whose rounding differs in the last
    # bits; 4 AdamW steps carry that into the weights (measured: at most 4.9e-7 on weights
    # of magnitude <= 1, 25 of 29 tensors not bitwise equal). torch's fp32 tolerance
    # (rtol 1.3e-6, atol 1e-5) leaves a 20x margin; a real divergence is orders larger.
    # Printed to 3 decimals: equal but for a rounding boundary.
    assert _final_loss(results[0].stdout) == pytest.approx(_final_loss(host_out), abs=1e-3)
    one = _weights(tmp_path / "one", tmp_path / "one.safetensors")
    two = _weights(tmp_path / "two", tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1.3e-6, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: two nodes vs one: {m}")


def test_tbf_burst_follows_tc_tbf_rule():
    # tc-tbf(8): at least rate / HZ bytes (HZ 250 here: 1 Gbit/s -> 500,000), and a whole
    # 64 KiB TCP segmentation packet with its headers (below that tbf segments in software).
    from two_nodes import tbf_burst

    assert tbf_burst("1gbit") == "500000b"
    assert tbf_burst("300mbit") == "150000b"
    assert tbf_burst("20mbit") == f"{128 << 10}b"
    with pytest.raises(ValueError, match="300mbit"):
        tbf_burst("300mbps")


@pytest.mark.skipif(not available()[0], reason=available()[1] or "two nodes available")
def test_a_capped_link_gets_the_rates_bucket():
    with TwoNodes(rate="1gbit") as nodes:
        for ns, veth in zip(nodes.namespaces, nodes.veths):
            shown = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev",
                                    veth], capture_output=True, text=True, check=True).stdout
            assert re.search(r"\btbf\b.* rate 1Gbit burst 500000b ", shown), shown
