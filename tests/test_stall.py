"""Misuse that used to hang until the 30-minute collective timeout (or exchange garbage without
hanging) ends within seconds, with the same CollectiveStallError on every rank that names the
rank, the collective (op, sequence number) and the zero_ext call that issued it.

One group of two ranks runs every case (tests/stall_cases.py, stall timeout 1.5 s), restarting
its process group after each; a few cases run again on gloo's own collectives (no shared-memory
arena) with the ZERO_EXT_CHECK_COLLECTIVES debug switch.
"""

import functools
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import stall_cases

from dist_harness import run_group

SHM = ["save_checkpoint_on_rank0_only", "load_checkpoint_on_rank0_only",
       "save_16bit_model_on_rank0_only", "uneven_batches_then_save",
       "stage3_block_skipped_on_one_rank", "submodule_used_on_one_rank", "stuck_in_user_code",
       "busy_in_user_code_progresses", "accumulation_differs", "lr_differs", "frozen_rank",
       "slow_collective_progresses", "heartbeat_error_keeps_beating",
       "long_checkpoint_write_progresses", "sigterm_inside_a_store_call"]
GLOO = ["stage3_block_skipped_on_one_rank", "save_checkpoint_on_rank0_only", "stuck_in_user_code",
        "equal_size_collectives_differ", "gathers_of_different_sizes"]


@functools.cache
def _outcomes() -> list[dict]:
    return run_group(2, stall_cases.run_cases, SHM, GLOO, timeout=300)


def _raised_everywhere(key, error="CollectiveStallError") -> str:
    """The one report every rank raised for case `key`, within a few stall timeouts."""
    outcomes = [ranks[key] for ranks in _outcomes()]
    assert [o["error"] for o in outcomes] == [error, error], outcomes
    assert outcomes[0]["message"] == outcomes[1]["message"]
    message = outcomes[0]["message"]
    assert message.startswith("zero_ext")
    return message


def _names_collective(message: str, call: str) -> None:
    assert call in message, message
    assert "#" in message and "Likely cause" in message, message


@pytest.mark.parametrize("case, call", [
    ("save_checkpoint_on_rank0_only", "ZeroEngine.save_checkpoint"),
    ("load_checkpoint_on_rank0_only", "ZeroEngine.load_checkpoint"),
    ("save_16bit_model_on_rank0_only", "ZeroEngine.save_16bit_model"),
])
def test_a_collective_call_on_rank0_only_raises_on_every_rank(case, call):
    message = _raised_everywhere(("shm", case))
    _names_collective(message, call)
    # Rank 1 went on training: the report names both sides of the mismatch.
    assert "rank 0 #" in message and "rank 1 #" in message
    assert "ZeroEngine.backward" in message or "ZeroEngine.forward" in message


def test_uneven_batch_counts_then_save_raise_on_every_rank():
    message = _raised_everywhere(("shm", "uneven_batches_then_save"))
    assert "ranks issued different collectives" in message
    assert "ZeroEngine.backward" in message  # rank 0's extra step
    assert "all_gather_object" in message    # rank 1's save


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_stage3_block_skipped_on_one_rank_is_caught_at_the_first_differing_gather(transport):
    # Units of equal size: the sizes agree, the buckets do not.
    message = _raised_everywhere((transport, "stage3_block_skipped_on_one_rank"))
    _names_collective(message, "PartitionedParameters.start_gather in ZeroEngine.forward")
    assert "all_gather(96 x float32, bucket" in message
    assert "LayerDrop" in message


def test_a_submodule_used_on_one_rank_only_raises_on_every_rank():
    message = _raised_everywhere(("shm", "submodule_used_on_one_rank"))
    _names_collective(message, "ZeroEngine.forward")
    assert "rank 0 #" in message and "rank 1 #" in message


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_a_rank_stuck_in_user_code_is_named_and_interrupted(transport):
    key = (transport, "stuck_in_user_code")
    message = _raised_everywhere(key)
    host = socket.gethostname()
    assert message.startswith(f"zero_ext: rank(s) 1 on {host} did not arrive at collective #")
    _names_collective(message, "in ZeroEngine.step")
    assert "in user code at stuck_in_user_code (stall_cases.py" in message
    # Rank 1 was interrupted in its sleep loop (60 s) soon after rank 0's stall timeout.
    assert max(ranks[key]["seconds"] for ranks in _outcomes()) < 15


def test_equal_size_collectives_that_differ_are_caught_by_the_heartbeats_on_gloo():
    key = ("gloo", "equal_size_collectives_differ")
    message = _raised_everywhere(key)
    assert message.startswith("zero_ext: ranks issued different collectives at #")
    assert "all_reduce(64 x float32, bucket 0)" in message
    assert "all_reduce(64 x float32, bucket 1)" in message
    # Within a few heartbeat periods, not the case's 30 s loop.
    assert max(ranks[key]["seconds"] for ranks in _outcomes()) < 10


def test_gloo_gathers_of_different_sizes_are_named_instead_of_aborting_the_process():
    message = _raised_everywhere(("gloo", "gathers_of_different_sizes"))
    assert message.startswith("zero_ext: ranks issued different collectives at #")
    assert "all_gather(524288 x float32)" in message  # 1 MiB from each of 2 ranks
    assert "all_gather(1048576 x float32)" in message


def test_the_plain_gloo_path_with_the_debug_switch_names_both_collectives():
    message = _raised_everywhere(("gloo", "save_checkpoint_on_rank0_only"))
    assert "comparing fingerprints" in message
    assert "ZeroEngine.save_checkpoint" in message and "ZeroEngine.backward" in message


@pytest.mark.parametrize("case, key, values", [
    ("accumulation_differs", "gradient_accumulation_steps", "rank 0 1, rank 1 2"),
    ("lr_differs", "optimizer.param_groups[0].lr", "rank 0 0.001, rank 1 0.002"),
])
def test_settings_that_differ_across_ranks_are_refused_at_initialize(case, key, values):
    message = _raised_everywhere(("shm", case), error="ValueError")
    assert message.startswith("zero_ext.initialize: the settings differ across ranks")
    assert f"{key}: {values}" in message


def test_a_frozen_rank_is_reported_as_stopped():
    message = _raised_everywhere(("shm", "frozen_rank"))
    assert message.startswith(f"zero_ext: rank(s) 1 on {socket.gethostname()} stopped "
                              "responding while rank 0")
    _names_collective(message, "ZeroEngine.save_checkpoint")


def test_sigterm_inside_a_store_call_raises_the_report_not_the_stores_error():
    outcomes = [ranks[("shm", "sigterm_inside_a_store_call")] for ranks in _outcomes()]
    assert [o["error"] for o in outcomes] == ["CollectiveStallError"] * 2, outcomes
    for o in outcomes:
        assert "all_reduce(4 x float32) issued by" in o["message"], o["message"]
        assert "when it was sent SIGTERM" in o["message"], o["message"]


def test_a_slow_collective_every_rank_joined_does_not_trip():
    outcomes = [ranks[("shm", "slow_collective_progresses")] for ranks in _outcomes()]
    assert [o["error"] for o in outcomes] == [None, None], outcomes
    for o in outcomes:
        assert o["value"]["values"] == ["fast", "slow"]
        assert o["value"]["seconds"] > 2 * stall_cases.STALL_TIMEOUT_S
    # Rank 0 waited past the stall timeout, diagnosed, and found only slowness.
    assert outcomes[0]["value"]["progress_checks"] >= 1


def test_a_heartbeat_that_meets_an_unexpected_error_keeps_beating():
    # A heartbeat thread that died would make its live rank read as stopped (a rank in CI was
    # once reported stopped while it still took part in collectives).
    outcomes = [ranks[("shm", "heartbeat_error_keeps_beating")] for ranks in _outcomes()]
    assert [o["error"] for o in outcomes] == [None, None], outcomes
    assert outcomes[1]["value"]["failed"] == [True] and outcomes[1]["value"]["errors"] == 1
    assert outcomes[0]["value"]["values"] == ["fast", "slow"]
    assert outcomes[0]["value"]["seconds"] > 2 * stall_cases.STALL_TIMEOUT_S
    assert outcomes[0]["value"]["progress_checks"] >= 1


def test_a_rank_busy_writing_a_long_checkpoint_does_not_trip():
    # Progress, not a flat timeout: the waiting rank sees the busy rank's heartbeats go on.
    outcomes = [ranks[("shm", "long_checkpoint_write_progresses")] for ranks in _outcomes()]
    assert [o["error"] for o in outcomes] == [None, None], outcomes
    assert outcomes[1]["value"]["seconds"] > 2 * stall_cases.STALL_TIMEOUT_S
    assert outcomes[0]["value"]["progress_checks"] >= 1


def test_a_rank_computing_in_its_own_code_does_not_trip():
    # A rank busy in user code (its main thread using CPU) makes progress; one asleep in user
    # code is stuck (test_a_rank_stuck_in_user_code_is_named_and_interrupted).
    outcomes = [ranks[("shm", "busy_in_user_code_progresses")] for ranks in _outcomes()]
    assert [o["error"] for o in outcomes] == [None, None], outcomes
    assert outcomes[0]["value"]["seconds"] > 2 * stall_cases.STALL_TIMEOUT_S
    assert outcomes[0]["value"]["progress_checks"] >= 1


UNBOUNDED_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "unbounded_watch_cases.py")


@functools.cache
def _unbounded() -> dict[str, dict]:
    """tests/unbounded_watch_cases.py's five scenarios from one process (~40 s), on gloo with the
    watch on NCCL's path; ZERO_EXT_TEST_UNBOUNDED_BACKEND=nccl runs them over NCCL (a GPU)."""
    backend = os.environ.get("ZERO_EXT_TEST_UNBOUNDED_BACKEND", "gloo")
    run = subprocess.run([sys.executable, UNBOUNDED_SCRIPT, "--backend", backend, "blocked",
                          "host_free", "sigterm", "frozen", "busy"],
                         capture_output=True, text=True, timeout=400, check=True)
    results = [json.loads(line) for line in run.stdout.strip().splitlines()]
    return {r["scenario"]: r for r in results}


def _report(text: str) -> str:
    """The stall report's headline in a rank's stderr (raised, or written as it ended)."""
    match = re.search(r"^(?:RAISED|CollectiveStallError): (zero_ext: .*)$", text, re.MULTILINE)
    assert match, text[-3000:]
    return match.group(1)


def test_unbounded_backend_a_rank_blocked_outside_python_ends_with_the_report():
    # NCCL's semantics: the rank's main thread is blocked in C++ behind the stalled collective
    # (a CUDA synchronize), where no signal handler runs: the watch ends the process itself.
    result = _unbounded()["blocked"]
    rank0, rank1 = result["stderr"]
    assert result["exits"][0] == 1 and result["seconds"][0] < 30, result
    assert "main thread did not raise this stall report within 5 s" in rank0, rank0[-3000:]
    assert "(it is at StepAgreement.agree in ZeroEngine.step, blocked outside Python" in rank0
    assert "ending the process with status 1" in rank0
    headline = _report(rank0)
    assert re.match(r"zero_ext: rank\(s\) 1 on \S+ did not arrive at collective #\d+ "
                    r"all_reduce\(.*\) issued by StepAgreement.agree in ZeroEngine.step", headline)
    # The waiting rank's line says which collective it has in flight.
    assert re.search(r"rank 0 on \S+ \(entered \d+ collectives, completed \d+\): inside "
                     r"zero_ext \(StepAgreement.agree in ZeroEngine.step\) for [\d.]+ s; its "
                     r"collective #\d+ in flight \(issued, not completed\) for [\d.]+ s", rank0)
    # The idle rank raised the same report, and handling it (it stays alive here) ended
    # nothing: it was still running when killed, seconds after rank 0 ended.
    assert _report(rank1) == headline
    assert result["exits"][1] == -9 and "did not raise this stall report" not in rank1, result


def test_unbounded_backend_a_rank_free_on_the_host_raises_the_report():
    result = _unbounded()["host_free"]
    rank0, rank1 = result["stderr"]
    assert rank0.startswith("RAISED: ") and rank1.startswith("RAISED: "), result
    assert _report(rank0) == _report(rank1)
    assert "rank(s) 1 on" in _report(rank0) and "did not arrive" in _report(rank0)
    assert all(s is not None and s < 30 for s in result["seconds"]), result


def test_unbounded_backend_sigterm_names_the_collective_in_flight():
    # torchrun ends a node's workers with SIGTERM when one failed: a rank whose collective is
    # in flight says so instead of dying silently.
    result = _unbounded()["sigterm"]
    rank0 = result["stderr"][0]
    assert result["exits"][0] == 1, result
    assert re.search(r"RAISED: zero_ext: rank 0 on \S+ waited [\d.]+ s in collective #\d+ "
                     r"all_reduce\(8 x float32\) issued by a direct zero_ext.comm call when it "
                     r"was sent SIGTERM", rank0), rank0[-3000:]


def test_unbounded_backend_a_frozen_rank_is_named_and_the_waiting_rank_ends():
    result = _unbounded()["frozen"]
    assert result["exits"][0] == 1 and result["seconds"][0] < 30, result
    assert re.match(r"zero_ext: rank\(s\) 1 on \S+ stopped responding while rank 0",
                    _report(result["stderr"][0]))


def test_unbounded_backend_a_rank_computing_in_its_code_is_progress_not_a_stall():
    result = _unbounded()["busy"]
    assert result["exits"] == [0, 0], result
    assert "zero_ext: rank" not in "".join(result["stderr"]), result["stderr"]
    checks = int(re.search(r"PROGRESS_CHECKS (\d+)", result["stderr"][0]).group(1))
    assert checks >= 1, result["stderr"]
