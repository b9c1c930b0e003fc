"""Elastic training (issue 14): examples/train_gpt.py under torchrun --max-restarts, with a
checkpoint every 4 steps and auto-resume (zero_ext.checkpoint), loses a rank or a whole node
mid-run and finishes by itself. The reference is the same job uninterrupted: the final weights
match it, and the dataset indices every rank logged show each step's global batch trained
exactly as the reference trained it (no sample skipped or repeated; the steps after the last
checkpoint redone once, with the same data). The two-node test skips where network namespaces
can't be made (tests/two_nodes.py's reason)."""

import functools
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import warnings
from collections import defaultdict

import elastic_cases
import pytest
import torch
from safetensors.torch import load_file

import zero_ext
from zero_ext import elastic
from zero_ext.checkpoint.files import SaveLock
from zero_ext.checkpoint.format import SAVE_LOCK
from zero_ext.config import ConfigError, ZeroConfig

from dist_harness import run_group
from two_nodes import TwoNodes, available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, LR = 16, 4, 3e-3
# 88 samples (windows of 17 of 104 characters) in global batches of 8: 11 steps an epoch,
# nothing left over, so every sample is trained exactly once per epoch.
TEXT_CHARS, SAMPLES, GLOBAL_BATCH = 104, 88, 8
# The failure comes after step 11, the last of epoch 0; the newest checkpoint is step 8's, so
# steps 9-11 are redone and the resumed job crosses into epoch 1 itself.
FAULT_STEP, RESUMED_FROM = 11, 8
# Bounds that keep a hang from outliving the test (a rendezvous waits 600 s by default).
HOST_TIMEOUT_S, NODES_TIMEOUT_S = 60, 90


@functools.cache
def _inputs(tmp: str) -> str:
    """Config and data for a small, quick job; returns the train_gpt arguments."""
    config = {
        # No gradient_accumulation_steps: derived, so the global batch stays 8 at any world size.
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": LR}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
        "zero_optimization": {"stage": 2},
    }
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(ROOT, "examples", "data", "zen_of_python.txt")) as f:
        text = f.read()[:TEXT_CHARS]
    with open(os.path.join(tmp, "data.txt"), "w") as f:
        f.write(text)
    return (f"{os.path.join(ROOT, 'examples', 'train_gpt.py')} --config {tmp}/config.json "
            f"--data {tmp}/data.txt --block 16 --dim 32 --layers 1 --heads 2 --steps {STEPS}")


# A fresh rendezvous store for each attempt (see zero_ext.elastic.check_restartable_launch).
FRESH_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _torchrun_on_host(args: str, env: dict | None = None) -> str:
    # Its own session, so a timeout ends torchrun's workers too, not torchrun alone.
    proc = subprocess.Popen(f"{sys.executable} -m torch.distributed.run {args}", shell=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True,
                            env={**os.environ, **FRESH_STORE, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=HOST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after {HOST_TIMEOUT_S} s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"torchrun {args} failed:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted job: 2 ranks on one host."""
    tmp = tmp_path_factory.mktemp("elastic_reference")
    _torchrun_on_host(f"--standalone --nproc_per_node=2 {_inputs(str(tmp))} --save-dir {tmp}/ckpt "
                      f"--sample-log {tmp}/log")
    return tmp


def _weights(tmp) -> dict[str, torch.Tensor]:
    return load_file(zero_ext.consolidate(str(tmp / "ckpt"), str(tmp / "final.safetensors")))


def _log(tmp) -> dict[tuple[int, int], list[dict]]:
    """(attempt, rank) -> that process's micro-batch records, in order."""
    found = {}
    for name in os.listdir(tmp / "log"):
        attempt, rank = map(int, re.fullmatch(r"attempt(\d+)-rank(\d+)\.jsonl", name).groups())
        with open(tmp / "log" / name) as f:
            found[attempt, rank] = [json.loads(line) for line in f]
    return found


def _global_batches(records) -> dict[int, list[int]]:
    """step -> the indices trained in it over all ranks (rank order, micro-batch order)."""
    by_step = defaultdict(list)
    for r in sorted(records, key=lambda r: (r["step"], r["rank"])):
        by_step[r["step"]] += r["indices"]
    return dict(by_step)


def _check_samples(log, reference_log, resumed_world: int) -> None:
    """The interrupted job trained exactly the reference's global batches, step for step."""
    reference = _global_batches([r for records in reference_log.values() for r in records])
    assert sorted(reference) == list(range(1, STEPS + 1))
    first = [r for (attempt, _), records in log.items() if attempt == 0 for r in records]
    resumed = [r for (attempt, _), records in log.items() if attempt == 1 for r in records]
    assert {r["world"] for r in first} == {2} and {r["world"] for r in resumed} == \
        {resumed_world}, "worlds of the first and the resumed attempt"
    assert set(log) - {(0, 0), (0, 1), (1, 0), (1, 1)} == set(), sorted(log)
    # The resumed attempt starts right after the checkpoint and redoes no earlier step.
    assert min(r["step"] for r in resumed) == RESUMED_FROM + 1
    before = _global_batches(r for r in first if r["step"] <= RESUMED_FROM)
    after = _global_batches(resumed)
    assert {**before, **after} == reference
    # The steps the first attempt completed after the checkpoint were redone once, as data:
    # the same global batches (every rank of the first attempt finished them).
    redone = _global_batches(r for r in first if RESUMED_FROM < r["step"] <= FAULT_STEP)
    assert redone == {s: after[s] for s in redone}
    assert sorted(redone) == list(range(RESUMED_FROM + 1, FAULT_STEP + 1))
    # Each epoch trains every sample exactly once (11 steps of 8 = 88 samples).
    epoch_of = {r["step"]: r["epoch"] for r in [*first, *resumed]}
    for epoch in (0, 1):
        steps = [s for s, e in epoch_of.items() if e == epoch and s in reference]
        trained = [i for s in steps for i in reference[s]]
        assert len(trained) == len(set(trained)), f"epoch {epoch} repeats samples"
        if epoch == 0:
            assert sorted(trained) == list(range(SAMPLES)), "epoch 0 skips samples"


def test_killed_rank_resumes_from_the_last_checkpoint(tmp_path, reference):
    # Rank 1 SIGKILLs itself after step 11 in the first attempt; torchrun restarts both ranks,
    # which resume from step 8's checkpoint by themselves.
    out = _torchrun_on_host(
        f"--standalone --nproc_per_node=2 --max-restarts=1 {_inputs(str(tmp_path))} --save-dir "
        f"{tmp_path}/ckpt --save-every {EVERY} --auto-resume --sample-log {tmp_path}/log",
        env={"ZERO_EXT_TEST_FAULT": f"kill:{FAULT_STEP}:1"})
    assert f"resumed from {tmp_path}/ckpt/global_step{RESUMED_FROM} at step {RESUMED_FROM}" \
        in out, out[-3000:]
    _check_samples(_log(tmp_path), _log(reference), resumed_world=2)
    # Same world size, same batches on the same ranks, same reduction order: bitwise, since
    # the checkpoint holds the exact fp32 masters, moments, step counts and scheduler.
    got, want = _weights(tmp_path), _weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs from the uninterrupted run"


@pytest.mark.skipif(not available()[0], reason=available()[1] or "two nodes available")
def test_lost_node_continues_on_the_remaining_one(tmp_path, reference):
    # 2 nodes x 1 rank; rank 1 (node 1) stops after step 11 and the test kills node 1 for
    # good. Node 0's worker sees its peer's sockets close, torchrun restarts it, the
    # rendezvous drops the dead node (keep-alive 1 s x 2) and completes with node 0 alone
    # (min 1 node) after the last call (8 s: long enough that both nodes make the first
    # round on a loaded machine), which resumes step 8's checkpoint at world size 1 with 4
    # micro-steps per step instead of 2: the same global batches.
    rdzv = (f"--nnodes=1:2 --nproc_per_node=1 --max-restarts=1 --rdzv-backend=c10d "
            f"--rdzv-endpoint=$NODE0_ADDR:29513 --rdzv-id=zxel-{secrets.token_hex(4)} "
            f"--rdzv-conf=join_timeout=60,last_call_timeout=8,keep_alive_interval=1,"
            f"keep_alive_max_attempt=2")
    command = (f"{sys.executable} -m torch.distributed.run {rdzv} {_inputs(str(tmp_path))} "
               f"--save-dir {tmp_path}/ckpt --save-every {EVERY} --auto-resume "
               f"--sample-log {tmp_path}/log")
    env = {**os.environ, **FRESH_STORE, "ZERO_EXT_TEST_FAULT": f"halt:{FAULT_STEP}:1"}
    with TwoNodes() as nodes, nodes.start([command, command], cwd=ROOT, env=env) as running:
        halted = running.wait_for(f"halted after step {FAULT_STEP}", 1, NODES_TIMEOUT_S / 2)
        assert halted, f"node 1 never reached step {FAULT_STEP}:\n{running.output(1)[-3000:]}"
        assert nodes.signal_node(1, signal.SIGKILL) > 0
        node0, _ = running.wait(NODES_TIMEOUT_S / 2)
    assert not node0.timed_out and node0.returncode == 0, \
        f"node 0 did not finish alone (exit {node0.returncode}):\n{node0.stdout[-4000:]}" \
        f"{node0.stderr[-4000:]}"
    assert f"resumed from {tmp_path}/ckpt/global_step{RESUMED_FROM} at step {RESUMED_FROM} " \
        f"with 1 rank(s)" in node0.stdout, node0.stdout[-3000:]
    _check_samples(_log(tmp_path), _log(reference), resumed_world=1)
    # The same global batches, reduced in another order (one rank summing 4 micro-batches,
    # not two ranks summing 2 each and averaging through gloo), for 8 AdamW steps: measured
    # at most 1.2e-7 apart, within torch's fp32 tolerance; a real divergence is orders larger.
    # Except the attention's key bias: its gradient is zero in exact arithmetic (softmax does
    # not change when every score of a row moves by q.b), so what it gets is rounding noise,
    # which AdamW normalizes into steps of up to lr: bounded by lr x the steps since resuming
    # (measured 1.4e-5; its values are the same noise in both runs, not learned).
    got, want = _weights(tmp_path), _weights(reference)
    assert got.keys() == want.keys()
    dim = got["blocks.0.qkv.bias"].numel() // 3
    for name in want:
        if name == "blocks.0.qkv.bias":
            key = slice(dim, 2 * dim)
            bound = LR * (STEPS - RESUMED_FROM)
            assert (got[name][key] - want[name][key]).abs().max() <= bound
            got[name][key] = want[name][key]
        torch.testing.assert_close(got[name], want[name], rtol=1.3e-6, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: elastic vs reference: {m}")


@pytest.mark.parametrize("section, path, words", [
    ({"every_n_steps": 10}, "zero_ext.checkpoint.dir", "need the directory"),
    ({"dir": "c", "keep_last": 2}, "zero_ext.checkpoint.keep_last", "also set every_n_steps"),
    ({"dir": "c", "every_n_steps": 0}, "zero_ext.checkpoint.every_n_steps", ">= 1"),
    ({"dir": "c", "auto_resume": "maybe"}, "zero_ext.checkpoint.auto_resume", "true or false"),
    ({"dir": "c", "every_n_step": 10}, "zero_ext.checkpoint.every_n_step", "every_n_steps"),
])
def test_checkpoint_settings_are_validated(section, path, words):
    with pytest.raises(ConfigError) as error:
        ZeroConfig.load({"zero_ext": {"checkpoint": section}})
    assert path in str(error.value) and words in str(error.value)


@functools.cache
def _cases() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        return run_group(2, elastic_cases.run_cases, tmp, timeout=120)


def _reference_batch(step: int) -> list[int]:
    """Step `step`'s (from 1) global batch: DistributedSampler's permutation of epoch e
    (seed 0 + e), cut into batches of train_batch_size; rank 0's slice first."""
    epoch, k = divmod(step - 1, elastic_cases.SAMPLES // elastic_cases.GLOBAL_BATCH)
    order = torch.randperm(elastic_cases.SAMPLES, generator=torch.Generator().manual_seed(epoch))
    return order[k * elastic_cases.GLOBAL_BATCH:(k + 1) * elastic_cases.GLOBAL_BATCH].tolist()


def _position(epoch: int, offset: int) -> dict:
    return {"epoch": epoch, "offset": offset, "num_samples": elastic_cases.SAMPLES, "seed": 0,
            "shuffle": True}


def test_sampler_trains_global_batches_of_the_epoch_permutation():
    for result in _cases():
        assert result["batches_per_epoch"] == 5 * 2  # steps x micro-batches per step and rank
        assert result["trained"] == [_reference_batch(s) for s in range(1, 8)]
        assert result["position"] == _position(1, 16)


def test_keep_last_and_auto_resume_at_initialize():
    for result in _cases():
        assert result["kept"] == ["global_step6", "global_step7", "latest"]
        assert result["resumed_step"] == 7
        assert result["resumed_position"] == _position(1, 16)
        assert result["next_resumed"] == result["next_first"] == [_reference_batch(8)]


def test_data_position_errors_and_late_registration():
    for result in _cases():
        assert "ElasticSampler: the data position moved" in result["stale_iterator"]
        assert result["after_load"] == _position(1, 16)
        assert "41" in result["other_dataset"] and "40" in result["other_dataset"]
        assert "CheckpointError" in result["missing_state"]
        assert "'data_position'" in result["missing_state"]
        assert result["registered_later"] == _position(1, 24)


@pytest.mark.parametrize("shared, restarts, warns", [
    ("True", "1", True), ("False", "1", False), ("True", "0", False)])
def test_restartable_launch_with_the_shared_store_warns(monkeypatch, shared, restarts, warns):
    # What torchrun's agent puts in a worker's environment (local_elastic_agent.py).
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
    monkeypatch.setenv("RANK", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elastic.check_restartable_launch()
    messages = [str(w.message) for w in caught]
    assert bool(messages) == warns, messages
    if warns:
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in messages[0]
        assert "135712" in messages[0]


def test_a_save_lock_left_by_an_earlier_attempt_of_the_job_is_taken_over(tmp_path, monkeypatch):
    # Rank 0 of the failed attempt died on another node in the middle of a save; the restarted
    # job's rank 0 (here) must be able to save into the same directory.
    # Only that: torchrun's default run id "none" (static and --master_port launches) names
    # no job, and two such jobs saving into one directory must not take each other's lock.
    path = str(tmp_path / SAVE_LOCK)
    for job, taken in (("other-run", False), ("gpt-run", True), ("none", False)):
        with open(path, "w") as f:
            json.dump({"host": "node-that-died", "pid": 4242, "time": 0.0,
                       "job": "none" if job == "none" else "gpt-run"}, f)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        lock = SaveLock(path)
        if taken:
            assert "an earlier attempt of this torchrun job" in lock.acquire("save")
            lock.release()
        else:
            with pytest.raises(RuntimeError, match="another job is saving"):
                lock.acquire("save")
