"""The multi-process harness says where the ranks that did not finish were: a hang or a frozen
rank in CI leaves its threads' stacks in the failure report."""

import time

import harness_cases
import pytest

from dist_harness import run_group


def test_a_failed_group_reports_the_stacks_of_the_ranks_still_running():
    with pytest.raises(RuntimeError) as failure:
        run_group(2, harness_cases.one_rank_raises_while_the_other_sleeps)
    text = str(failure.value)
    assert "ValueError: rank 1 gives up" in text
    assert "--- rank 0 was still running; its threads' stacks ---" in text
    rank0 = text.split("--- rank 0 was still running")[1]
    assert "in sleeping_until_killed" in rank0
    assert "in one_rank_raises_while_the_other_sleeps" in rank0
    assert "rank 1 was still running" not in text  # it ended with its error


def test_a_group_past_its_timeout_reports_every_ranks_stacks():
    start = time.monotonic()
    with pytest.raises(TimeoutError) as failure:
        run_group(2, harness_cases.sleeping_until_killed, 600, timeout=9)  # ranks start in ~3 s
    text = str(failure.value)
    assert "timed out after 9s; ranks still running: [0, 1]" in text
    for rank in (0, 1):
        assert f"--- rank {rank} was still running; its threads' stacks ---" in text
    assert text.count("in sleeping_until_killed") == 2
    assert time.monotonic() - start < 30
