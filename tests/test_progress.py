"""The training experience: rank 0's progress bar and report line (zero_ext/progress.py)."""

import functools
import re
import subprocess
import sys

import pytest
import torch

from zero_ext.progress import count_tokens, format_bytes, format_duration

import engine_cases
import progress_cases
from dist_harness import run_group
from engine_cases import SEQ


def test_count_tokens_takes_the_first_integer_input():
    ids = torch.zeros(3, 7, dtype=torch.long)
    assert count_tokens((torch.randn(2, 2), ids), {}) == 21
    assert count_tokens((), {"input_ids": ids, "labels": ids[:, :2]}) == 21
    assert count_tokens((torch.randn(4), torch.ones(2, dtype=torch.bool)), {}) == 0


def test_formats():
    assert format_bytes(512) == "512B" and format_bytes(3 * 2**20) == "3.0MiB"
    assert format_bytes(5 * 2**40) == "5120.0GiB"
    assert format_duration(75) == "1m15s" and format_duration(3 * 3600 + 120) == "3h02m"


def test_cpu_peak_memory_is_this_process_not_its_parent():
    """A rank started by a large process (pytest after many tests, a notebook) reported the
    parent's peak: getrusage's ru_maxrss carries over exec. The parent here touches 1.5 GiB
    and then starts a Python that imports zero_ext (a few hundred MiB) and reads its peak."""
    child = ("import torch; from zero_ext.progress import peak_memory; "
             "print(peak_memory(torch.device('cpu')))")
    parent = ("import subprocess, sys; big = bytearray(1536 << 20); big[::4096] = b'x' * "
              "len(big[::4096]); print(subprocess.run([sys.executable, '-c', sys.argv[1]], "
              "capture_output=True, text=True, check=True).stdout.strip())")
    out = subprocess.run([sys.executable, "-c", parent, child], capture_output=True, text=True,
                         check=True).stdout
    peak = int(out.strip())
    assert 32 << 20 < peak < 1024 << 20, format_bytes(peak)


@functools.cache
def _run():
    return run_group(2, progress_cases.captured_run)


def test_bar_on_rank_0_only_with_step_total_loss_lr_and_eta():
    results = _run()
    bar = results[0]["stderr"]
    for step in range(1, 5):
        assert f"step {step}/4 [" in bar
    assert "ETA" in bar and "tok/s" in bar and "loss " in bar and "lr " in bar
    assert "step 4/4 [####################]" in bar
    assert results[1]["stderr"] == "" and results[1]["stdout"] == ""


def _flops_per_token(result: dict) -> float:
    """2 FLOPs per parameter forward, 2 for its input's gradient, 2 for its own where it
    trains: TinyNet's frozen shift (24 elements, outside any unit) trains no gradient."""
    assert result["model_params"] == sum(
        p.numel() for p in engine_cases.build_model().parameters())
    return 4 * result["model_params"] + 2 * result["trainable"]


def test_report_line_every_steps_per_print_with_flops_and_every_rank_memory():
    results = _run()
    lines = [line for line in results[0]["stdout"].splitlines() if line.startswith("[zero_ext]")]
    assert [re.search(r"step (\d+) ", line).group(1) for line in lines] == ["2", "4"]
    for line in lines:
        assert re.search(r"peak memory r0 [\d.]+MiB, r1 [\d.]+MiB", line), line
        assert "grad norm" in line and "samples/s" in line
        assert all(f" {phase} " in line for phase in ("forward", "backward", "step")), line
        tokens_per_s = float(re.search(r"([\d.]+) tokens/s", line).group(1))
        tflops = float(re.search(r"([\d.e+-]+) TFLOP/s per rank", line).group(1))
        samples_per_s = float(re.search(r"([\d.]+) samples/s", line).group(1))
        # Tokens are the ids of every rank's micro-batch: SEQ per sample.
        assert tokens_per_s == pytest.approx(samples_per_s * SEQ, rel=0.02)
        want = _flops_per_token(results[0]) * tokens_per_s / 2 / 1e12
        assert tflops == pytest.approx(want, rel=0.01)


def test_under_a_trainer_no_output_of_ours_and_the_figures_as_metrics():
    results = _run()
    # Nothing printed after log_externally(), although steps_per_print=2 reached step 6.
    for r in results:
        assert (len(r["stdout"]), len(r["stderr"])) == r["printed"]
    metrics = results[0]["metrics"]
    assert results[1]["metrics"].keys() == metrics.keys()
    for key in ("zero_ext/peak_memory_gib", "zero_ext/peak_memory_gib_rank0",
                "zero_ext/peak_memory_gib_rank1"):
        assert results[1]["metrics"][key] == metrics[key]
    assert metrics["zero_ext/peak_memory_gib"] == max(
        metrics["zero_ext/peak_memory_gib_rank0"], metrics["zero_ext/peak_memory_gib_rank1"]) > 0
    assert metrics["zero_ext/tokens_per_s"] == pytest.approx(
        metrics["zero_ext/samples_per_s"] * SEQ, rel=0.02)
    assert metrics["zero_ext/tflops_per_rank"] == pytest.approx(
        _flops_per_token(results[0]) * metrics["zero_ext/tokens_per_s"] / 2 / 1e12, rel=1e-6)
    assert metrics["zero_ext/grad_norm"] == results[0]["grad_norm"]
    assert metrics["zero_ext/skipped_steps"] == results[0]["skipped"] == 0
    assert "zero_ext/loss_scale" not in metrics  # fp32: no loss scaling


def test_transformers_gradient_checkpointing_counts_the_recomputed_forward():
    # A recomputed forward costs a forward again (6N, not 4N, per token and parameter): only
    # zero_ext's own checkpointing said so before.
    assert run_group(2, progress_cases.recompute_flags) == [{False: False, True: True}] * 2
