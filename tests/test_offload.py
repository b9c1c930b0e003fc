"""CPU offload of optimizer state and stage-3 parameters: parity, timing of the steps, bytes.

On a machine without a GPU the "device" and the host are both CPU memory; the copies, events
and CPU steps still run through the same code. Tests marked cuda need a GPU.
"""

import atexit
import functools
import os
import shutil
import tempfile

import pytest
import torch
from torch.testing import assert_close

import zero_ext
from zero_ext.zero import offload

import engine_cases
import offload_cases
from dist_harness import run_group

STEPS = 3
KINDS = [(1, "optimizer"), (2, "optimizer"), (3, "optimizer"), (3, "both"), (3, "param"),
         (1, "ratio"), (2, "ratio"), (3, "ratio")]
# World size 2 runs every kind at both dtypes, accumulation 1 and 4, clipping on and off (the
# shards step after the global norm either way).
EVERY = [(stage, kind, dtype, accumulation, clip) for stage, kind in KINDS
         for dtype in ("fp32", "bf16") for accumulation in (1, 4) for clip in (0.5, 0.0)]
# The other world sizes a covering set: each kind meets both dtypes, both accumulations and
# clipping on and off.
COVERING = [
    (1, "optimizer", "fp32", 1, 0.5), (1, "optimizer", "bf16", 4, 0.0),
    (2, "optimizer", "fp32", 4, 0.0), (2, "optimizer", "bf16", 1, 0.5),
    (3, "optimizer", "fp32", 1, 0.5), (3, "optimizer", "bf16", 4, 0.0),
    (3, "both", "fp32", 4, 0.0), (3, "both", "bf16", 1, 0.5),
    (3, "param", "fp32", 4, 0.5), (3, "param", "bf16", 1, 0.0),
    (1, "ratio", "bf16", 4, 0.5), (2, "ratio", "fp32", 1, 0.0), (2, "ratio", "bf16", 4, 0.5),
    (3, "ratio", "bf16", 1, 0.0), (3, "ratio", "fp32", 4, 0.5),
]
# (world size, transport, cases): "gloo" runs gloo's asynchronous collectives, the path NCCL
# shares, instead of comm's shared-memory arena.
GROUPS = [(1, "shm", COVERING), (2, "shm", EVERY), (3, "shm", COVERING), (3, "gloo", COVERING)]
PARAMS = [(w, t, case) for w, t, cases in GROUPS for case in cases]


@functools.cache
def _parity(world_size, transport):
    cases = next(cases for w, t, cases in GROUPS if (w, t) == (world_size, transport))
    os.environ["ZERO_EXT_CPU_SHM"] = "1" if transport == "shm" else "0"
    try:
        return run_group(world_size, offload_cases.parity_cases, cases, STEPS)
    finally:
        del os.environ["ZERO_EXT_CPU_SHM"]


@pytest.mark.parametrize("world_size, transport, case", PARAMS, ids=[
    f"w{w}-{t}-stage{s}-{k}-{d}-acc{a}-clip{c}" for w, t, (s, k, d, a, c) in PARAMS])
def test_offload_matches_the_engine_without_offload_and_torch_adamw(world_size, transport,
                                                                    case):
    results = _parity(world_size, transport)
    reference = results[0][case]["reference"]
    _, kind, dtype, accumulation, _ = case
    for rank, result in enumerate(results):
        got = result[case]
        assert got["global_steps"] == STEPS and got["micro_steps"] == STEPS * accumulation
        if kind == "ratio":  # some buckets step on the host and some on the device
            assert 0 < got["host_stepped"] < got["buckets"], (rank, got["buckets"])
        elif kind != "param":
            assert got["host_stepped"] == got["buckets"], rank
        # The same arithmetic in the same order as without offload: bitwise equal.
        assert got["norms"] == got["plain"]["norms"], rank
        for name, value in got["plain"]["params"].items():
            assert torch.equal(got["params"][name], value), (rank, name)
        engine_cases.assert_matches_reference(got, reference, dtype, f"rank {rank}")


@functools.cache
def _checks(world_size):
    root = tempfile.mkdtemp(prefix="zero_ext-offload-")
    atexit.register(shutil.rmtree, root, True)
    return run_group(world_size, offload_cases.checks, root)


@pytest.mark.parametrize("stage", [1, 2])
def test_fp16_overflow_on_one_rank_skips_with_offload_as_without(stage):
    for rank, result in enumerate(_checks(2)):
        record = result["overflow"][stage]["offload"]["record"]
        assert record == result["overflow"][stage]["plain"]["record"], rank
        assert result["overflow"][stage]["ratio"]["record"] == record, rank
        assert [r["skipped"] for r in record] == [0, 1, 1, 1, 1, 1], rank
        assert record[1]["unchanged"] and not record[0]["unchanged"], rank
        assert [r["scale"] for r in record] == [256, 128, 128, 128, 128, 256], rank


def test_shards_never_step_before_engine_step_decides():
    for result in _checks(2):
        arrival, deferred = result["arrival"][0.0], result["arrival"][0.5]
        # Before engine.step() of step k (0-based) the counts read k, with clipping and without:
        # no shard steps before the all-rank decision (finite? clip factor?).
        for seen in (arrival, deferred):
            assert seen["steps_seen"] == [[0.0] * seen["buckets"], [1.0] * seen["buckets"]]
        # overlap_comm: at the boundary micro-step some buckets were already handed to the
        # offload (their host copies started) before backward ended; none in between.
        assert arrival["buckets"] > 2
        assert arrival["copies_before_end"][1] > 0 and arrival["copies_before_end"][3] > 0
        assert arrival["copies_before_end"][0] == arrival["copies_before_end"][2] == 0


def test_llama_and_init_built_models_train_alike_with_offload():
    for rank, result in enumerate(_checks(2)):
        models = result["models"]
        for stage in (2, 3):
            got, plain = models[f"llama{stage}"]["offload"], models[f"llama{stage}"]["plain"]
            assert got["units"] == plain["units"]
            for name, value in plain["params"].items():
                assert torch.equal(got["params"][name], value), (rank, stage, name)
            for name, ref in models["llama2"]["plain"].get("reference", {}).items():
                assert_close(got["params"][name], ref, rtol=1e-5,
                             atol=1e-5 * ref.abs().max().item(), msg=f"rank {rank} {name}")
        init = models["init"]
        for name, value in init["plain"].items():
            assert torch.equal(init["offload"][name], value), (rank, name)
        whole = models["all_whole"]
        assert whole["offload"]["units"] == whole["plain"]["units"] == 0
        for name, value in whole["plain"]["params"].items():
            assert torch.equal(whole["offload"]["params"][name], value), (rank, name)
        assert len(whole["warned"]) == (1 if rank == 0 else 0), whole["warned"]


@pytest.mark.parametrize("kind", ["optimizer", "ratio", "both", "optimizer-noclip"])
def test_stage3_cpu_steps_after_the_norm_run_behind_the_next_forward(kind):
    for rank, result in enumerate(_checks(2)):
        got = result["deferred"][kind]
        assert got["deferrable"] > 0, rank
        # engine.step() returned with unit steps still running (each was slowed by 20 ms) ...
        assert all(got["lagging"]), (rank, got["lagging"])
        timings = got["timings"]
        assert timings.cpu_step_deferred_s > 0.0, (rank, timings)
        assert timings.cpu_step_hidden_s + timings.cpu_step_deferred_s + \
            timings.cpu_step_exposed_s == pytest.approx(timings.cpu_step_s, rel=1e-9)
        # ... yet every gather waited for its unit: bitwise the engine without offload, and
        # so is the run resumed from a checkpoint saved right after a step.
        for name, value in got["plain"].items():
            assert torch.equal(got["offload"][name], value), (rank, name)
            assert torch.equal(got["resumed"][name], value), (rank, name)
        # Every rank started the same gathers at the same points, rank 0's CPU steps done
        # before its forwards and rank 1's still running.
        assert got["order"] == _checks(2)[0]["deferred"][kind]["order"], rank
        assert {event[0] for event in got["order"]} == {"use", "gather"}, got["order"]
        # ... and still prefetched in the forwards after a step: a unit whose CPU step was
        # deferred is gathered once the unit before it has queued its forward.
        assert sum(event[0] == "use" and event[2] for event in got["order"]) >= 6, got["order"]


def test_deferred_steps_do_not_make_torch_schedulers_warn_of_a_skipped_step():
    for rank, result in enumerate(_checks(2)):
        assert result["scheduler_warnings"] == [], (rank, result["scheduler_warnings"])


def test_checkpoints_resume_exactly_with_offload_and_load_without_it(tmp_path):
    for rank, result in enumerate(run_group(2, offload_cases.checkpoint_cases, str(tmp_path))):
        for case, row in result.items():
            for label in ("offload", "plain"):
                for name, value in row["straight"].items():
                    assert torch.equal(row[label][name], value), (rank, case, label, name)


def test_memory_breakdown_splits_host_and_device_bytes():
    for key, row in _checks(2)[0]["accounting"].items():
        _, kind, dtype, accumulation = key
        offloaded, plain = row["offload"], row["plain"]
        assert plain["plan"] is None and plain["location"]["host"] == 0, key
        # What was budgeted before allocating is exactly what the host holds.
        assert offloaded["plan"].rank_bytes == offloaded["location"]["host"] > 0, key
        total = sum(offloaded["breakdown"].values())
        assert sum(offloaded["location"].values()) == total, key
        shards = offloaded["shards"]
        model_bytes = 4 if dtype == "fp32" else 2
        if kind == "optimizer":
            # Master and moments (12 bytes per shard element), the host gradient copy and,
            # for a 16-bit model whose gradients are accumulated in fp32, a separate upload
            # buffer (else the new weights are staged in the gradient copy): all of it in host
            # memory ...
            grad_bytes = 4 if accumulation > 1 else model_bytes
            staging = 0 if dtype == "fp32" or grad_bytes == model_bytes else model_bytes
            assert offloaded["location"]["host"] == (12 + grad_bytes + staging) * shards, key
            # ... and none of the optimizer state left on the device.
            plain_state = sum(plain["breakdown"][k] for k in ("master", "exp_avg",
                                                              "exp_avg_sq"))
            assert offloaded["location"]["device"] == plain["location"]["device"] - plain_state
        elif kind == "ratio":
            # The first buckets' state and gradient copies on the host, as under full offload
            # but for their elements only; the rest of the state stays where the plain engine
            # keeps it.
            host = offloaded["host_shards"]
            assert 0 < host < shards, key
            grad_bytes = 4 if accumulation > 1 else model_bytes
            staging = 0 if dtype == "fp32" or grad_bytes == model_bytes else model_bytes
            assert offloaded["location"]["host"] == (12 + grad_bytes + staging) * host, key
            plain_master = 0 if dtype == "fp32" else 4
            assert offloaded["location"]["device"] == \
                plain["location"]["device"] - (plain_master + 8) * host, key
        elif kind == "param":
            # Only the units' shards move; the device keeps the persistent buckets.
            assert offloaded["location"]["host"] < model_bytes * shards, key
            assert offloaded["location"]["device"] < plain["location"]["device"], key


def test_host_memory_budget_refuses_before_allocating_with_the_numbers():
    for rank, result in enumerate(_checks(2)):
        budget = result["budget"]
        plan = budget["plan"]
        # Page-locked only where CUDA exists to pin for (pin_memory is true in the config).
        assert plan.local_ranks == 2 and plan.pinned == torch.cuda.is_available()
        assert plan.node_bytes == 2 * plan.rank_bytes > 0
        assert budget["allocated_when_enough"] > 0  # the count would see allocations
        assert budget["allocated_when_short"] == 0, rank
        message = budget["short"]
        assert message.startswith("zero_ext offload: host memory is short"), message
        gib = f"{plan.node_bytes / 2**30:.2f} GiB"
        assert f"2 ranks on this node need {gib}" in message
        assert f"{(plan.node_bytes - 1) / 2**30:.2f} GiB is available" in message
        fixes = ["more ranks", "fewer ranks per node", "stage 3"]
        if plan.pinned:
            fixes.append("pin_memory false")
        assert ("pin_memory" in message) == plan.pinned
        for fix in fixes:
            assert fix in message, fix
        assert budget["exact"] == "ok"
        assert budget["real_available"] > 0


def test_host_memory_check_compares_the_node_total_not_one_rank():
    plan = offload.HostMemoryPlan(local_ranks=4, pinned=False)
    plan.add("Adam moments", 3 * 2**30)
    plan.add("fp32 master weights", 2**30)
    offload.check_host_memory(plan, available=16 * 2**30)  # 4 ranks x 4 GiB: just fits
    with pytest.raises(MemoryError) as error:
        offload.check_host_memory(plan, available=16 * 2**30 - 1)
    message = str(error.value)
    assert "Each rank needs 4.00 GiB of host memory (Adam moments 3.00 GiB, fp32 master " \
        "weights 1.00 GiB); 4 ranks on this node need 16.00 GiB" in message
    assert "pin_memory" not in message  # nothing pinned, no such advice


def test_the_real_available_figure_is_read_from_the_system():
    available = offload.available_host_memory()
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo
                     if line.startswith("MemTotal:"))
    assert 0 < available <= total


def test_timings_split_the_cpu_step_at_the_end_of_backward():
    results = run_group(1, offload_cases.timing_cases)[0]
    for clip, result in results.items():
        timings, shards = result["timings"], result["shards"]
        assert shards > 2
        assert timings.steps == 3 and timings.shards_stepped == 3 * shards, clip
        for name in ("grad_copy_s", "cpu_step_s", "cpu_step_hidden_s", "cpu_step_exposed_s",
                     "upload_s"):
            assert getattr(timings, name) >= 0.0, (clip, name)
        assert timings.cpu_step_s > 0.0 and timings.grad_copy_s > 0.0, clip
        assert timings.cpu_step_hidden_s + timings.cpu_step_exposed_s == pytest.approx(
            timings.cpu_step_s, rel=1e-9), clip
        # The report line carries the same figures, and takes them.
        assert f"cpu step {1e3 * timings.cpu_step_s:.1f}ms" in result["report"], clip
        assert "grad copy-out" in result["report"] and "upload" in result["report"], clip
        assert result["after_report"].steps == 0 and result["after_report"].cpu_step_s == 0.0
    # No shard steps while backward goes on (before the step's decision), with clipping or
    # without; at stage 2 nothing is deferred either: all of it in engine.step().
    for clip in (0.0, 0.5):
        assert results[clip]["timings"].cpu_step_hidden_s == 0.0, clip
        assert results[clip]["timings"].hidden_fraction == 0.0, clip


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["optimizer", "ratio"])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_cuda_offload_steps_after_backward_and_pins_host_buffers(clip, kind):
    result = run_group(1, offload_cases.cuda_overlap, clip, kind)[0]
    offloaded, plain = result["offload"], result["plain"]
    assert offloaded["pinned"] and offloaded["shards"] > 2
    where = offloaded["state_on"]
    if kind == "ratio":  # the first buckets on the host, the rest on the GPU
        host = where.count("cpu")
        assert 0 < host < len(where) and where == ["cpu"] * host + ["cuda"] * (len(where) - host)
    else:
        assert set(where) == {"cpu"}
    steps, ends = offloaded["marks"]["step"], offloaded["marks"]["backward_end"]
    # No shard steps before the step's decision, which needs every gradient's norm first.
    assert steps[0] > ends[0]
    # The CPU AdamW and the CUDA AdamW round each operation alike.
    for name, value in plain["params"].items():
        assert_close(offloaded["params"][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_stage3_parameter_offload_pins_shards_and_matches():
    result = run_group(1, offload_cases.cuda_param_offload)[0]
    assert result["offload"]["pinned"]
    for name, value in result["plain"]["params"].items():
        assert_close(result["offload"]["params"][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensor_fragments_under_offload_match_the_engine_without():
    """zero_ext.utils reads and writes offloaded state through pinned buffers and side-stream
    copies: the gradients read, read again after fp32 weights were set, the model's weights
    and the step after equal the engine's without offload (tests/offload_cases.py)."""
    result = run_group(1, offload_cases.fragments_under_offload)[0]
    for label, got in result.items():
        plain = result["plain-" + label[-1]]
        assert got["model_is_set"], label
        for key in ("grads", "grads_after_set", "after_step"):
            for name, value in plain[key].items():
                assert torch.equal(got[key][name], value), (label, key, name)
        for name, value in got["grads"].items():
            assert torch.equal(got["grads_after_set"][name], value), (label, name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_stage3_deferred_cpu_steps_are_awaited_by_the_gathers():
    result = run_group(1, offload_cases.cuda_deferred)[0]
    for kind in ("optimizer", "ratio"):
        assert result[kind]["deferred"] > 0.0, kind
        for name, value in result["plain"]["params"].items():
            assert_close(result[kind]["params"][name], value, rtol=0, atol=0, msg=(kind, name))


def test_cpu_step_threads_share_this_processes_cores_among_the_nodes_ranks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert offload.cpu_step_threads(0.8) == 12       # int(16 * 0.8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert offload.cpu_step_threads(0.8) == 3        # int(16 / 4 * 0.8)
    assert offload.cpu_step_threads(1.0) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert offload.cpu_step_threads(0.8) == 1        # never none


@pytest.mark.parametrize("value", [-0.1, 1.5, "half", True])
def test_cpuadam_cores_perc_must_be_a_share(value):
    # DeepSpeed's bounds, [0, 1]; 0 leaves the CPU step one thread (cpu_step_threads).
    with pytest.raises(ValueError, match="cpuadam_cores_perc: expected a number in \\[0, 1\\]"):
        zero_ext.ZeroConfig.load({"zero_optimization": {
            "stage": 2, "offload_optimizer": {"device": "cpu", "cpuadam_cores_perc": value}}})


@pytest.mark.parametrize("numels, ratio, expected", [
    ([10, 10, 10, 10], 1.0, 4),    # everything on the host
    ([10, 10, 10, 10], 0.5, 2),    # 20 of 40 elements: exact
    ([10, 10, 10, 10], 0.3, 1),    # target 12: 10 is 2 away, 20 is 8 away
    ([10, 10, 10, 10], 0.01, 1),   # never no bucket at all
    ([30, 10], 0.5, 1),            # target 20: 30 and 40 are 10 and 20 away
    ([10, 10], 0.75, 2),           # target 15: a tie takes more to the host
    ([], 0.5, 0),
])
def test_ratio_puts_the_first_buckets_closest_to_the_share_on_the_host(numels, ratio,
                                                                        expected):
    assert offload.host_stepped_buckets(numels, ratio) == expected


@pytest.mark.parametrize("zero, message", [
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": -0.5}},
     "offload_optimizer.ratio: expected a number in \\[0, 1\\], got -0.5"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 1.5}},
     "offload_optimizer.ratio: expected a number in \\[0, 1\\], got 1.5"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5},
      "offload_param": {"device": "cpu"}},
     ("offload_optimizer.ratio: 0.5 keeps part of the optimizer on the device, but "
      "offload_param keeps the weights it would update on the host")),
    ({"stage": 3, "offload_param": {"device": "cpu", "ratio": 0.5}},
     ("offload_param.ratio: ratio splits the optimizer state .* belongs under "
      "offload_optimizer")),
])
def test_ratio_errors_say_what_is_wrong(zero, message):
    with pytest.raises(ValueError, match=message):
        zero_ext.ZeroConfig.load({"zero_optimization": zero})


def test_ratio_round_trips_as_deepspeed_writes_it():
    zero = zero_ext.ZeroConfig.load({"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}}).zero_optimization
    assert zero.offload_optimizer.ratio == 0.3
    assert zero.to_dict()["offload_optimizer"]["ratio"] == 0.3


class _FakeCudart:
    """cudaHostRegister / cudaHostUnregister as the CUDA runtime answers them, recorded."""

    def __init__(self, error: int = 0):
        self.error, self.registered, self.unregistered = error, [], []

    def cudaHostRegister(self, ptr, size, flags):
        self.registered.append((ptr, size, flags))
        return self.error

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(("unregister", ptr))
        return 0

    def synchronize(self, device=None):  # stands in for torch.cuda.synchronize
        self.unregistered.append(("synchronize", device))


@pytest.mark.parametrize("numel, dtype", [(202_383_360 // 64, torch.float32), (1, torch.bfloat16),
                                          (4096 // 2, torch.bfloat16), (12_345, torch.float32)])
def test_pinned_host_buffers_lock_their_own_pages_not_a_power_of_two(monkeypatch, numel, dtype):
    # The CUDA side is faked (no GPU here): what is checked is which bytes get registered.
    import gc
    import mmap

    cudart = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "synchronize", cudart.synchronize)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # the training device
    buffer = offload.host_buffer(numel, dtype, pin=True)
    assert buffer.shape == (numel,) and buffer.dtype == dtype and buffer.is_contiguous()
    nbytes = numel * buffer.element_size()
    page = mmap.PAGESIZE
    [(ptr, size, flags)] = cudart.registered
    assert flags == 1  # cudaHostRegisterPortable: pinned for every device's context
    # Whole pages, starting at the buffer, just enough of them (torch's pinned allocator would
    # take the next power of two), all inside the buffer's own allocation.
    assert ptr == buffer.data_ptr() and ptr % page == 0
    assert size == -(-nbytes // page) * page < nbytes + page
    storage = buffer.untyped_storage()
    assert storage.data_ptr() <= ptr and ptr + size <= storage.data_ptr() + storage.nbytes()
    buffer.fill_(1)  # usable as it is
    del buffer, storage
    gc.collect()
    # No copy may still use the pages when they go: the training device (current when the
    # buffer was made; the finalizer may run on another thread) is synchronized first.
    assert cudart.unregistered == [("synchronize", 3), ("unregister", ptr)]


def test_a_refused_page_lock_says_how_to_do_without(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(error=2))
    with pytest.raises(RuntimeError, match="page-locking .* failed \\(cudaError 2\\).*"
                                           "Set pin_memory false"):
        offload.host_buffer(1000, torch.float32, pin=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not offload.host_buffer(1000, torch.float32, pin=True).is_pinned()
