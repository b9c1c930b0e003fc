"""Functions the test harness's own tests run on every rank (test_dist_harness.py)."""

import time

import torch.distributed as dist


def sleeping_until_killed(seconds: float) -> None:
    time.sleep(seconds)


def one_rank_raises_while_the_other_sleeps() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 gives up")
    sleeping_until_killed(600)
