"""zero_ext.comm's collectives against sums computed here from every rank's inputs, over the
shared-memory transport and over gloo's own collectives."""

import functools
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from zero_ext import comm

import comm_cases
from dist_harness import run_group


@functools.cache
def _results(world_size, shm):
    """One group per (world size, transport): comm_cases.run_cases on every rank."""
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


@pytest.mark.parametrize("world_size", [2, 3])
def test_broadcast_of_dtypes_gloo_has_no_type_for_copies_the_bits(world_size):
    """uint16, uint32, float8, bool and complex tensors (a model's buffers), broadcast into
    a non-contiguous view: gloo refused uint16 ("Invalid scalar type")."""
    for result in _results(world_size, False):
        for dtype in (torch.uint16, torch.uint32, torch.float8_e4m3fn, torch.bool,
                      torch.complex64):
            want = comm_cases.odd_broadcast_input(world_size - 1, dtype).view(torch.uint8)
            assert torch.equal(result["collectives"]["odd_broadcasts"][str(dtype)], want), dtype


def test_shared_memory_counts_ring_elements():
    traffic = _results(3, True)[0]["collectives"]["traffic"]
    assert traffic.calls == {"all_reduce": 1, "reduce_scatter": 1, "all_gather": 1}
    # Ring sense at 3 ranks: all-reduce 2n(N-1)/N, reduce-scatter and all-gather n(N-1)/N.
    expected = {"all_reduce": 2 * 10 * 2 / 3, "reduce_scatter": 30 * 2 / 3,
                "all_gather": 30 * 2 / 3}
    assert traffic.elements == pytest.approx(expected, rel=1e-12)


# -- gloo: the counters against gloo's algorithms and against the sockets ----------------------
def _gloo_chunks(nbytes: int, esize: int, size: int) -> list[int]:
    """The bytes of each rank's chunk in gloo's ring all-reduce (gloo/allreduce.cc): 2 or more
    segments per rank, a multiple of `size` in all, each at most 1 MiB rounded to whole
    elements, so the last chunks are short or empty."""
    most = esize * max(1, (1 << 20) // esize)
    segments = max(math.ceil(nbytes / most), 2 * size)
    segments = math.ceil(segments / size) * size
    segment = math.ceil(math.ceil(nbytes / segments) / esize) * esize
    per_rank = segments // size
    return [min(nbytes, (c + 1) * per_rank * segment) - min(nbytes, c * per_rank * segment)
            for c in range(size)]


def _gloo_sends(op: str, nbytes: int, esize: int, size: int, me: int, root: int = 0) -> dict:
    """{receiving rank: bytes} of rank `me`, from the algorithms as gloo documents them: the
    all-reduce's ring passes to rank - 1 every chunk but this rank's (reduce-scatter phase),
    then every chunk but rank - 1's (all-gather phase); zero_ext's reduce-scatter is that
    all-reduce of the input below 1 MiB per rank, and from there sends chunk j to rank j
    (comm/pairs.py); the all-gather's ring passes N - 1 input chunks to rank + 1;
    the broadcast's binomial tree sends the tensor to each rank whose parent this is (with
    the root renumbered 0, rank v's parent is v less its highest bit)."""
    if size == 1:
        return {}
    if op == "reduce_scatter" and nbytes // size >= 1 << 20:
        return {peer: nbytes // size for peer in range(size) if peer != me}
    if op in ("all_reduce", "reduce_scatter"):
        chunks = _gloo_chunks(nbytes, esize, size)
        return {(me - 1) % size: 2 * nbytes - chunks[me] - chunks[(me - 1) % size]}
    if op == "all_gather":
        return {(me + 1) % size: nbytes * (size - 1) // size}
    if op == "all_to_all":
        return {peer: nbytes // size for peer in range(size) if peer != me}
    virtual = (me - root) % size
    children = [v for v in range(1, size) if v - (1 << (v.bit_length() - 1)) == virtual]
    return {(v + root) % size: nbytes for v in children}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gloo_counters_follow_gloo_algorithms(world_size):
    results = [r["wire"]["counted"] for r in _results(world_size, False)]
    for key in results[0]:
        op, root, dtype, numel = key
        esize = 2 if dtype == "torch.bfloat16" else 4
        for rank, counted in enumerate(r[key] for r in results):
            expected = sum(_gloo_sends(op, numel * esize, esize, world_size, rank,
                                       root).values())
            assert counted.calls == {op: 1}, key
            assert counted.bytes.get(op, 0) == expected, (key, rank)
            assert counted.elements[op] == expected / esize, (key, rank)
        if op == "all_reduce":  # each segment passes N - 1 hops in each phase
            total = sum(r[key].bytes.get(op, 0) for r in results)
            assert total == 2 * (world_size - 1) * numel * esize, key


# gloo's TCP transport frames each message with 48-byte preambles (gloo/transport/tcp/
# pair.cc): its sender writes two (the send notification, and the one before the data) and
# its receiver one (the receive notification). A rank here sends and receives at most
# 4(N - 1) messages per collective (the all-reduce of 24 KiB: 2N segments, 2N - 2 passed in
# each of two phases), so at most 4(N - 1) x 3 x 48 bytes it sends are not the tensor's.
def _framing_bound(world_size: int) -> int:
    return 4 * (world_size - 1) * 3 * 48


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gloo_counters_match_the_bytes_on_the_sockets(world_size):
    """What each rank's TCP sockets sent in one collective (tcp_bytes: kernel counters, TCP
    payload), by the rank at the other end, against the counters and the algorithms."""
    results = [r["wire"]["measured"] for r in _results(world_size, False)]
    for (op, root) in results[0]:
        for rank, (sent, counted) in enumerate(r[(op, root)] for r in results):
            expected = _gloo_sends(op, comm_cases.MEASURED_BYTES, 4, world_size, rank, root)
            framing = sum(sent.values()) - counted.bytes.get(op, 0)
            assert 0 <= framing <= _framing_bound(world_size), (op, root, rank, sent, counted)
            for peer in range(world_size):
                extra = sent.get(peer, 0) - expected.get(peer, 0)
                assert 0 <= extra <= _framing_bound(world_size), (op, root, rank, peer, sent)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gloo_counters_put_each_byte_on_the_link_to_its_receiver(world_size):
    """The last rank alone on node 1: a byte crosses nodes when its receiver (rank - 1 for the
    all-reduce, rank + 1 for the all-gather, the children of rank 0's broadcast) is on the
    other side."""
    node = [0] * (world_size - 1) + [1]
    for rank, result in enumerate(_results(world_size, False)):
        for op, counted in result["wire"]["links"].items():
            numel = -(-1200 // world_size) * world_size if op != "all_reduce" else 1200
            sends = _gloo_sends(op, numel * 4, 4, world_size, rank)
            inter = sum(b for peer, b in sends.items() if node[peer] != node[rank])
            assert counted.inter_node_bytes.get(op, 0) == inter, (op, rank)
            assert counted.intra_node_bytes.get(op, 0) == sum(sends.values()) - inter, (op, rank)


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


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gloo_collectives_in_segments(world_size):
    """Chunks of several segments (comm/pairs.py) arrive whole, reduce-scatter's sums are the
    sums (integers: exactly, as fp64 sums rounded once to the dtype), and collectives in
    flight at once each get their own messages (seen failing, the process aborted in gloo,
    when every collective used the same tag)."""
    results = [r["paired"] for r in _results(world_size, False)]
    for dtype in ("torch.uint8", "torch.bfloat16", "torch.float16", "torch.float32"):
        inputs = [r[dtype]["input"].view(world_size, -1) for r in results]
        total = sum(x.double() for x in inputs)
        for rank, result in enumerate(results):
            assert torch.equal(result[dtype]["all_to_all"].view(world_size, -1),
                               torch.stack([x[rank] for x in inputs])), (dtype, rank)
            assert torch.equal(result[dtype]["all_gather"],
                               torch.cat([x[0] for x in inputs])), (dtype, rank)
            if dtype != "torch.uint8":
                assert torch.equal(result[dtype]["reduce_scatter"],
                                   total[rank].to(inputs[0].dtype)), (dtype, rank)
    total = sum(r["random"]["input"].double() for r in results).view(world_size, -1)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["random"]["reduce_scatter"].double(), total[rank],
                                   rtol=1e-6, atol=1e-5)
        # Into the input's own shard: the same sum (its chunk read before it is written).
        assert torch.equal(result["random"]["into_its_shard"],
                           result["random"]["reduce_scatter"]), rank
    for rank, result in enumerate(results):
        for k, output in enumerate(result["in_flight"]):
            # all-gather: every rank's value k; the all-to-all (k = 2): chunk i from rank i;
            # the reduce-scatter (k = 4): the sum of every rank's value.
            expected = torch.tensor([1000.0 * r + k for r in range(world_size)])
            if k == 4:
                assert torch.equal(output, torch.full_like(output, float(expected.sum())))
                continue
            assert torch.equal(output.view(world_size, -1),
                               expected[:, None].expand(world_size, output.numel()
                                                        // world_size)), (rank, k)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_gloo_reduce_scatter_is_counted_by_the_path_it_takes(size):
    """From a MiB per rank, gloo's reduce-scatter of CPU tensors sends chunk j to rank j
    (comm/pairs.py): n/N to each peer. CUDA tensors on gloo ("gloo-device") and smaller
    chunks take gloo's all-reduce: its ring, 2n(N-1)/N, all to rank - 1."""
    esize = 4
    for nbytes, paired in ((size << 20, True), ((size << 20) - size * esize, False)):
        for me in range(size):
            ring = _gloo_sends("all_reduce", nbytes, esize, size, me)
            device = dict(comm.wire_sends("reduce_scatter", nbytes, esize, size, me,
                                          "gloo-device"))
            cpu = dict(comm.wire_sends("reduce_scatter", nbytes, esize, size, me, "gloo"))
            assert device == ring, (nbytes, me)
            assert cpu == ({peer: nbytes / size for peer in range(size) if peer != me}
                           if paired else ring), (nbytes, me)


def test_every_ranks_host_is_known_from_the_start():
    """init_distributed's topology all-gather tells the watch every rank's host, so a node cut
    off in the first seconds is named (the heartbeats learn a few hosts per period: before, a
    partition at step 2 left node 1 knowing only itself)."""
    host = socket.gethostname()
    for hosts in run_group(3, comm_cases.hosts_at_start):
        assert hosts == {0: host, 1: host, 2: host}, hosts


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


# A batch script's own process under Slurm (sbatch --ntasks=4 running `python train.py`
# directly): srun's step variables are absent, so it is one process, not rank 0 of 4.
@pytest.mark.parametrize("batch", [{}, {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}],
                         ids=["plain", "slurm-batch-script"])
def test_plain_python_runs_as_one_rank(batch):
    result = _start("from zero_ext import comm; comm.init_distributed(); "
                    "print(comm.world_size(), comm.rank(), comm.backend())",
                    {"CUDA_VISIBLE_DEVICES": "", **batch})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0", "gloo"]


# What DeepSpeed's MPI and Slurm runners start (`mpirun -n 4 python train.py`, `srun -n 4
# ...`): no RANK. Each process used to start a one-rank group and train alone.
@pytest.mark.parametrize("launcher, env", [
    ("Open MPI", {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}),
    ("Slurm's srun", {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4"}),
])
def test_mpi_or_srun_launch_without_master_address_says_what_to_set(launcher, env):
    result = _start("from zero_ext import comm; comm.init_distributed(); "
                    "print(comm.world_size())", {"CUDA_VISIBLE_DEVICES": "", **env})
    assert result.returncode != 0, result.stdout
    rank, size = next(iter(env.values())), "4"
    assert f"{launcher} started this process as rank {rank} of {size}" in result.stderr
    assert "MASTER_ADDR and MASTER_PORT are not set" in result.stderr
    assert "Export MASTER_ADDR=<the first node's address>" in result.stderr
    # srun's variables stay set in a shell `srun --pty` opened: said where they could mislead
    assert ("In a shell that `srun --pty` opened" in result.stderr) == ("srun" in launcher)


def test_mpi_launched_ranks_form_one_group_and_count_their_node():
    """Two processes as Open MPI starts them (with the address DeepSpeed's runner exports):
    one group of 2 (joined by zero_ext.Init, as by initialize), and the host memory and CPU threads are split by the 2 ranks of the node
    (the topology's count: no LOCAL_WORLD_SIZE here, as under DeepSpeed's own launcher)."""
    code = ("import os, torch, zero_ext; from zero_ext import comm; "
            "from zero_ext.zero import offload\n"
            "with zero_ext.Init():  # joins the launcher's group, as initialize does\n"
            "    torch.nn.Linear(4, 4)\n"
            "print(comm.world_size(), comm.rank(), os.environ['LOCAL_RANK'], "
            "offload.local_ranks())")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                          "MASTER_PORT")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ranks = [subprocess.Popen(
        [sys.executable, "-c", code], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**clean, "CUDA_VISIBLE_DEVICES": "", "OMPI_COMM_WORLD_RANK": str(r),
             "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in ranks]
    for r, (process, (out, err)) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, err
        assert out.split() == ["2", str(r), str(r), "2"], (out, err)


def test_nccl_without_gpus_is_refused_with_the_fix():
    result = _start("from zero_ext import comm; comm.init_distributed('nccl')",
                    {"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    assert "NCCL backend needs CUDA GPUs and this process sees none" in result.stderr
    assert "use gloo" in result.stderr


@pytest.mark.parametrize("bound, local_rank, current, gpus, expected", [
    (None, "1", 0, 2, 1),      # init_process_group("nccl") without set_device: LOCAL_RANK's GPU
    (None, "0", 0, 2, None),   # rank 0 is on its GPU already
    (None, "1", 1, 2, None),   # the user set the device
    (None, "3", 0, 1, None),   # one GPU per process (CUDA_VISIBLE_DEVICES): stays on it
    (None, None, 0, 2, None),  # no LOCAL_RANK: nothing to go by
    (0, "1", 0, 2, 0),         # the group is bound to a device: that one, whatever LOCAL_RANK
])
def test_a_users_process_group_puts_each_rank_on_its_local_ranks_gpu(
        monkeypatch, bound, local_rank, current, gpus, expected):
    # DeepSpeed's engine sets the device from LOCAL_RANK; a script written for it may call
    # init_process_group("nccl") and never torch.cuda.set_device. (CUDA faked: no GPU here.)
    import types

    import torch.distributed as dist

    from zero_ext.comm import collectives

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "group", types.SimpleNamespace(
        WORLD=types.SimpleNamespace(bound_device_id=bound)))
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    collectives._use_local_rank_device()
    assert chosen == ([] if expected is None else [expected])
