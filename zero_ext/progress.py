"""What a training run shows while it runs: a progress bar on rank 0 and a periodic report line.

Owned by the engine (ZeroEngine.monitor), which tells it about every forward (to count tokens)
and every optimizer step. On rank 0:

  progress bar   step/total, loss, lr, tokens/s and ETA, redrawn in place on a terminal;
                 ZERO_EXT_PROGRESS=1 forces it on (e.g. under a pipe), =0 off.
  report line    every `steps_per_print` steps: samples/s, tokens/s, an estimate of model
                 TFLOP/s per rank, grad norm, loss scale and every rank's peak memory; with
                 `wall_clock_breakdown` the time spent per phase.

The report gathers every rank's peak memory, so it is collective: the engine calls it on all
ranks at the same step. The FLOP estimate is the usual 6 x trainable parameters per token
(forward and backward, no attention term), 8 x when activation checkpointing recomputes the
forward; tokens are the elements of the first integer tensor of each forward's inputs (the
token ids of a language model), so it is absent for models fed no integer tensor.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterable

import torch

from zero_ext import comm

__all__ = ["TrainingMonitor", "count_tokens", "format_bytes", "format_duration", "peak_memory"]


def count_tokens(args: Iterable, kwargs: dict) -> int:
    """Elements of the first integer tensor among a forward's inputs (its token ids), else 0;
    inside lists, tuples and dicts too (Lightning passes the whole batch as one argument)."""
    stack = list(kwargs.values())[::-1] + list(args)[::-1]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, (list, tuple)):
            stack.extend(reversed(value))
        elif torch.is_tensor(value) and not value.is_floating_point() and \
                not value.is_complex() and value.dtype != torch.bool:
            return value.numel()
    return 0


def peak_memory(device: torch.device) -> int:
    """Peak bytes this process used: allocated GPU memory on CUDA, resident memory on CPU.

    On Linux, the resident peak of this process's own memory (VmHWM in /proc/self/status), not
    getrusage's ru_maxrss: that one carries over exec, so a rank started by a large process
    (pytest, a notebook, multiprocessing's spawn from a big parent) reported its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, else KiB


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _si(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class TrainingMonitor:
    """Counts samples, tokens and time between reports; draws the bar; formats the line."""

    def __init__(self, *, rank: int, world_size: int, device: torch.device,
                 trainable_params: int, samples_per_micro_step: int,
                 model_params: int | None = None, total_steps: int | None = None):
        self.rank, self.world_size, self.device = rank, world_size, device
        # Every parameter the model computes with (frozen ones too), and those it trains.
        self.trainable_params = trainable_params
        self.model_params = trainable_params if model_params is None else model_params
        self.samples_per_micro_step = samples_per_micro_step
        self.total_steps = total_steps
        self.recompute = False  # activation checkpointing: the forward runs twice
        forced = os.environ.get("ZERO_EXT_PROGRESS")
        self.bar = rank == 0 and (forced == "1" if forced in ("0", "1") else sys.stderr.isatty())
        # A trainer (HF, Lightning, accelerate) shows its own output and logs metrics(): no
        # bar and no report line of ours on top of it.
        self.external = False
        self.events = None  # DeepSpeed's monitors (zero_ext/monitor_events.py), set by the engine
        self._start = time.perf_counter()
        self._steps_at_start: int | None = None
        self._since = {"samples": 0, "tokens": 0, "time": time.perf_counter()}
        self._time_bar = time.perf_counter()
        self._bar_tokens = 0

    # -- DeepSpeed's engine.monitor: scripts write their own events through it -----------------
    @property
    def enabled(self) -> bool:
        """Whether a tensorboard or csv_monitor section is enabled (on every rank)."""
        return self.events is not None and self.events.enabled

    def write_events(self, events) -> None:
        """DeepSpeed's `engine.monitor.write_events([(name, value, step), ...])`: written by
        rank 0 to every enabled monitor."""
        if self.events is not None:
            self.events.write_events(events)

    def forward(self, args, kwargs) -> None:
        """One micro-batch forward on this rank."""
        tokens = count_tokens(args, kwargs) * self.world_size  # the same shape on every rank
        self._since["tokens"] += tokens
        self._bar_tokens += tokens

    def micro_step(self) -> None:
        self._since["samples"] += self.samples_per_micro_step

    def step(self, global_step: int, loss: torch.Tensor | None, lr: float) -> None:
        """After an optimizer step (skipped or not): redraw the bar. `loss` is read (a device
        sync) only when the bar is shown."""
        if self._steps_at_start is None:
            self._steps_at_start = global_step - 1
        if not self.bar:
            return
        loss = loss.float().item() if loss is not None else float("nan")
        now = time.perf_counter()
        done = global_step - self._steps_at_start
        elapsed = now - self._start
        rate = self._bar_tokens / max(now - self._time_bar, 1e-9)
        self._bar_tokens, self._time_bar = 0, now
        parts = []
        if self.total_steps:
            fraction = min(global_step / self.total_steps, 1.0)
            filled = int(20 * fraction)
            parts.append(f"step {global_step}/{self.total_steps} "
                         f"[{'#' * filled}{'.' * (20 - filled)}]")
        else:
            parts.append(f"step {global_step}")
        parts.append(f"loss {loss:.4f}  lr {lr:.2e}")
        if rate:
            parts.append(f"{_si(rate)} tok/s")
        if self.total_steps and done > 0 and global_step < self.total_steps:
            parts.append(f"ETA {format_duration(elapsed / done * (self.total_steps - global_step))}")
        end = "\n" if self.total_steps and global_step >= self.total_steps else ""
        sys.stderr.write("\r[zero_ext] " + "  ".join(parts) + "\033[K" + end)
        sys.stderr.flush()

    def _window(self) -> tuple[float, float, float | None, list[int]]:
        """Collective (every rank's peak memory): samples/s, tokens/s, model TFLOP/s per rank
        (None without counted tokens) since the previous window, and the peaks by rank."""
        peaks = comm.all_gather_object(peak_memory(self.device))
        now = time.perf_counter()
        seconds = max(now - self._since["time"], 1e-9)
        samples_per_s = self._since["samples"] / seconds
        tokens_per_s = self._since["tokens"] / seconds
        self._since = {"samples": 0, "tokens": 0, "time": now}
        tflops = None
        if tokens_per_s:
            # Per parameter and token: 2 FLOPs forward, 2 for its input's gradient, 2 more for
            # its own gradient where it trains (6N when every parameter trains, 4N + 2N_trained
            # for a LoRA fine-tune), and the forward again under activation checkpointing.
            flops_per_token = (6 if self.recompute else 4) * self.model_params \
                + 2 * self.trainable_params
            tflops = flops_per_token * tokens_per_s / self.world_size / 1e12
        return samples_per_s, tokens_per_s, tflops, peaks

    def metrics(self) -> dict[str, float]:
        """Collective: the window's figures as a trainer's logger takes them (the same dict on
        every rank), for trainers that show their own output (see `external`)."""
        samples_per_s, tokens_per_s, tflops, peaks = self._window()
        out = {"zero_ext/samples_per_s": samples_per_s}
        if tflops is not None:
            out["zero_ext/tokens_per_s"] = tokens_per_s
            out["zero_ext/tflops_per_rank"] = tflops
        out["zero_ext/peak_memory_gib"] = max(peaks) / 2**30
        out.update({f"zero_ext/peak_memory_gib_rank{r}": b / 2**30 for r, b in enumerate(peaks)})
        return out

    def report(self, *, global_step: int, loss: float, lr: float, grad_norm: float | None,
               loss_scale: float | None, breakdown: str | None) -> str | None:
        """Collective: the report line (rank 0; None elsewhere)."""
        samples_per_s, tokens_per_s, tflops, peaks = self._window()
        if self.rank != 0:
            return None
        norm = f"{grad_norm:.4f}" if grad_norm is not None else "n/a"
        line = (f"[zero_ext] step {global_step}  loss {loss:.4f}  lr {lr:.3e}  grad norm "
                f"{norm}")
        if loss_scale is not None:
            line += f"  loss scale {loss_scale:g}"
        line += f"  {samples_per_s:.1f} samples/s"
        if tflops is not None:
            line += f"  {tokens_per_s:.0f} tokens/s  {tflops:.3g} TFLOP/s per rank"
        line += "  peak memory " + ", ".join(
            f"r{r} {format_bytes(b)}" for r, b in enumerate(peaks))
        if breakdown:
            line += "  | " + breakdown
        if self.bar:
            sys.stderr.write("\r\033[K")  # the line replaces the bar, which redraws after it
            sys.stderr.flush()
        return line
