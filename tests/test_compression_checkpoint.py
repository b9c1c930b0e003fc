"""Compressed communication's state in checkpoints (zero_ext/checkpoint/compression_state.py):
error-feedback residuals and top-k state resume exactly at the same world size and keep their
mass when resharded 4 -> 2 ranks. Ranks run tests/compression_checkpoint_cases.py."""

from __future__ import annotations

import functools
import math
import shutil
import tempfile

import compression_checkpoint_cases as cases
import pytest
import torch

from dist_harness import run_group

CASES = list(cases.CASES)


@functools.cache
def _runs():
    root = tempfile.mkdtemp(prefix="zero_ext_ckpt_compress_")
    try:
        saved = run_group(4, cases.save, root)
        resumed = run_group(4, cases.resume, root)
        resharded = run_group(2, cases.reshard, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return saved, resumed, resharded


@pytest.mark.parametrize("case", CASES)
def test_resume_at_the_same_world_size_is_the_uninterrupted_run(case):
    saved, resumed, _ = _runs()
    for rank in range(4):
        reference, got = saved[rank][case], resumed[rank][case]["resumed"]
        # Steps 3-5 of the uninterrupted run: every norm and weight, bit for bit.
        assert got["norms"] == reference["norms"][3:], (rank, got["norms"], reference["norms"])
        for name, value in reference["params"].items():
            assert torch.equal(got["params"][name], value), (rank, name)
        # The residuals themselves came back (each rank's own, so the sums agree exactly).
        for key, mass in saved[rank][case]["mass"].items():
            assert torch.equal(resumed[rank][case]["mass"][key], mass), (rank, key)


@pytest.mark.parametrize("case", CASES)
def test_the_residuals_matter_to_the_resumed_run(case):
    # The control: the same load with the residuals dropped trains differently, so the
    # equality above holds because the state was restored.
    saved, resumed, _ = _runs()
    assert any(m.abs().sum() > 0 for m in saved[0][case]["mass"].values())
    dropped = resumed[0][case]["residuals_dropped"]
    reference = saved[0][case]
    assert dropped["norms"] != reference["norms"][3:]
    assert any(not torch.equal(dropped["params"][n], v) for n, v in reference["params"].items())


@pytest.mark.parametrize("case", CASES)
def test_reshard_4_to_2_keeps_the_residual_mass(case):
    saved, _, resharded = _runs()
    before, after = saved[0][case]["mass"], resharded[0][case]["mass"]
    assert set(before) == set(after)
    topk = "topk" in case
    for key, value in before.items():
        got = after[key]
        if topk:
            # fp32 state: each new rank holds total / 2, summed back exactly up to rounding.
            torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-9)
        else:
            # Each new rank re-encodes its share in fp8 e4m3 (3 mantissa bits): relative
            # error at most 2^-4 per element, plus the per-chunk scale's reach.
            error = (got - value).norm() / value.norm().clamp_min(1e-30)
            assert error < 0.07, (key, float(error))
    assert all(math.isfinite(n) for n in resharded[0][case]["norms"])


def test_error_feedback_costs_at_most_a_byte_per_element():
    saved, _, _ = _runs()
    state = saved[0]["int4_ef_stage2"]["state_bytes"]
    # Besides the residuals: one fp64 per bucket, the loss scale they were stored at.
    nbytes = sum(b for k, (b, _) in state.items() if not k.endswith(".loss_scale"))
    elements = sum(n for k, (b, n) in state.items() if k.endswith(".residual"))
    scales = sum(b for k, (b, n) in state.items() if k.endswith("residual_scale"))
    # fp8 residuals (1 byte each) plus one fp32 scale per chunk (4 ranks: 4 per bucket).
    assert nbytes == elements + scales
    assert scales == 4 * 4 * len([k for k in state if k.endswith(".residual")])
