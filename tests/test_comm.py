"""zero_ext.comm's collectives against sums computed here from every rank's inputs, over the
shared-memory transport and over gloo's own collectives."""

import functools
import os
import subprocess
import sys

import pytest
import torch

from zero_ext import comm

import comm_cases
from dist_harness import run_group


@functools.cache
def _results(world_size, shm):
    import os

    previous = os.environ.get("ZERO_EXT_CPU_SHM")
    os.environ["ZERO_EXT_CPU_SHM"] = "1" if shm else "0"  # inherited by the spawned ranks
    try:
        return run_group(world_size, comm_cases.run_cases)
    finally:
        if previous is None:
            del os.environ["ZERO_EXT_CPU_SHM"]
        else:
            os.environ["ZERO_EXT_CPU_SHM"] = previous


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "gloo"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_collectives_match_sums_of_every_rank_input(world_size, shm):
    results = [r["collectives"] for r in _results(world_size, shm)]
    assert all(r["arena"] == shm for r in results)
    for key in results[0]:
        if not isinstance(key, tuple):
            continue
        inputs = [r[key]["input"] for r in results]
        dtype = inputs[0].dtype
        total = torch.stack([x.double() for x in inputs]).sum(0)
        # Each partial sum may round once in the tensor's dtype: bound the error by that
        # many units of roundoff on the sum of magnitudes.
        eps = torch.finfo(dtype).eps
        bound = world_size * eps * torch.stack([x.double().abs() for x in inputs]).sum(0)
        n = inputs[0].numel() // world_size
        for rank, result in enumerate(results):
            assert ((result[key]["all_reduce"].double() - total).abs() <= bound).all()
            part = slice(rank * n, (rank + 1) * n)
            assert ((result[key]["reduce_scatter"].double() - total[part]).abs()
                    <= bound[part]).all()
            expected = torch.cat([x[r * n:(r + 1) * n] for r, x in enumerate(inputs)])
            assert torch.equal(result[key]["all_gather"], expected)
        # Every rank holds the very same all-reduced bits.
        assert all(torch.equal(r[key]["all_reduce"], results[0][key]["all_reduce"])
                   for r in results)


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "gloo"])
def test_traffic_counts_ring_elements(shm):
    traffic = _results(3, shm)[0]["collectives"]["traffic"]
    assert traffic.calls == {"all_reduce": 1, "reduce_scatter": 1, "all_gather": 1}
    # Ring sense at 3 ranks: all-reduce 2n(N-1)/N, reduce-scatter and all-gather n(N-1)/N.
    expected = {"all_reduce": 2 * 10 * 2 / 3, "reduce_scatter": 30 * 2 / 3,
                "all_gather": 30 * 2 / 3}
    assert traffic.elements == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "gloo"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_all_to_all_moves_chunk_j_to_rank_j(world_size, shm):
    results = [r["all_to_all"] for r in _results(world_size, shm)]
    for key in results[0]:
        if not isinstance(key, tuple):
            continue
        chunks = [r[key]["input"].chunk(world_size) for r in results]
        for rank, result in enumerate(results):
            expected = torch.cat([chunks[sender][rank] for sender in range(world_size)])
            assert torch.equal(result[key]["output"], expected), (key, rank)
            assert torch.equal(result[key]["output_async"], expected), (key, rank)


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_to_all_counts_each_chunk_on_the_link_it_crosses(world_size):
    """The last rank alone on node 1: the others send it one chunk across nodes and their
    other chunks within; it sends every chunk across. bf16 10 per chunk, then 3 bytes."""
    for rank, result in enumerate(_results(world_size, True)):
        traffic = result["all_to_all"]["traffic"]
        chunk = 10 * 2 + 3
        others = world_size - 1
        inter = others * chunk if rank == world_size - 1 else chunk
        assert traffic.calls == {"all_to_all": 2}
        assert traffic.bytes == {"all_to_all": others * chunk}
        assert traffic.inter_node_bytes == {"all_to_all": inter}
        assert traffic.intra_node_bytes == ({"all_to_all": others * chunk - inter}
                                            if others * chunk > inter else {})
        assert traffic.elements == {"all_to_all": others * 13}


def test_all_to_all_on_one_rank_copies():
    x = torch.arange(12, dtype=torch.uint8)
    y = torch.zeros_like(x)
    assert comm.all_to_all(y, x) is None
    assert torch.equal(y, x)
    with pytest.raises(ValueError, match="zero_ext.comm.all_to_all: .* same numel"):
        comm.all_to_all(torch.empty(5), torch.empty(6))


def _start(code: str, env: dict) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with torchrun's variables replaced by `env`."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=False)


def test_partial_launch_environment_says_how_to_launch():
    result = _start("from zero_ext import comm; comm.init_distributed()",
                    {"RANK": "0", "WORLD_SIZE": "2"})
    assert result.returncode != 0
    assert "RANK, WORLD_SIZE set but MASTER_ADDR, MASTER_PORT missing" in result.stderr
    assert "torchrun --nproc_per_node" in result.stderr


def test_plain_python_runs_as_one_rank():
    result = _start("from zero_ext import comm; comm.init_distributed(); "
                    "print(comm.world_size(), comm.rank(), comm.backend())",
                    {"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0", "gloo"]


def test_nccl_without_gpus_is_refused_with_the_fix():
    result = _start("from zero_ext import comm; comm.init_distributed('nccl')",
                    {"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    assert "NCCL backend needs CUDA GPUs and this process sees none" in result.stderr
    assert "use gloo" in result.stderr
