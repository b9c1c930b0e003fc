"""What the engine tells its user about the run, as opposed to what it does to train.

- `PhaseTimers`: wall-clock totals per phase (forward, backward, reduce, step) between report
  lines, under wall_clock_breakdown.
- `after_step` / `report`: the engine's figures for progress.py's TrainingMonitor (and the
  monitor events of DeepSpeed's tensorboard / csv_monitor sections) after every optimizer step,
  and every steps_per_print steps the report line (loss, lr, grad norm, loss
  scale, the phases' times and offload's).
- `training_metrics`: the same window's figures keyed for a trainer's logger.
- `memory_breakdown` / `memory_by_location`: the bytes this rank holds, by kind and by place;
  zero_ext.estimate predicts these figures, and the tests hold the two equal.

ZeroEngine (engine.py) calls these with itself: they read its counters, buffers and timers and
decide nothing about training, so the step's logic reads without them and the accounting's
rules stand in one place. Every function that gathers peak memory is collective.
"""

from __future__ import annotations

import time

import torch

__all__ = ["PhaseTimers", "after_step", "memory_breakdown", "memory_by_location", "report",
           "training_metrics"]


class PhaseTimers:
    """Wall-clock totals per phase since the last report (wall_clock_breakdown); on CUDA each
    span synchronizes the device, so a phase's time includes the kernels it queued."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = device
        self.totals: dict[str, float] = {}

    def time(self, name: str):
        timers = self

        class _Span:
            def __enter__(self):
                if timers.enabled and timers.device.type == "cuda":
                    torch.cuda.synchronize(timers.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                if timers.enabled:
                    if timers.device.type == "cuda":
                        torch.cuda.synchronize(timers.device)
                    timers.totals[name] = timers.totals.get(name, 0.0) + (
                        time.perf_counter() - self.start)

        return _Span()

    def report(self) -> str:
        text = "  ".join(f"{k} {1e3 * v:.1f}ms" for k, v in self.totals.items())
        self.totals.clear()
        return text


def after_step(engine) -> None:
    """After an optimizer step (skipped or not): the progress bar, and every steps_per_print
    steps the report line, unless a trainer shows the run (log_externally). Collective on the
    steps that report."""
    engine.monitor.step(engine.global_steps, engine._last_loss, engine.get_lr()[0])
    if engine.monitor.enabled:  # DeepSpeed's monitor events (zero_ext/monitor_events.py)
        samples = engine.global_samples
        events = [("Train/Samples/lr", engine.get_lr()[0], samples)]
        if engine.loss_scaler is not None:
            events.append(("Train/Samples/loss_scale", engine.loss_scaler.scale, samples))
        engine.monitor.write_events(events)
    every = engine.config.steps_per_print
    if every and not engine.monitor.external and engine.global_steps % every == 0:
        report(engine)


def report(engine) -> None:
    """Collective (every rank gives its peak memory): rank 0 prints the report line."""
    loss = engine._last_loss.float().item() if engine._last_loss is not None else float("nan")
    breakdown = engine._timers.report() if engine.config.wall_clock_breakdown else None
    if breakdown is not None and engine.offload is not None:
        breakdown += f"  {engine.offload.timings()}"
    line = engine.monitor.report(
        global_step=engine.global_steps, loss=loss, lr=engine.get_lr()[0],
        grad_norm=engine.get_global_grad_norm(), breakdown=breakdown,
        loss_scale=engine.loss_scaler.scale if engine.loss_scaler else None)
    if line is not None:
        print(line, flush=True)


def training_metrics(engine) -> dict[str, float]:
    """Collective: ZeroEngine.training_metrics() (its docstring lists the keys)."""
    out = engine.monitor.metrics()
    if engine.loss_scaler is not None:
        out["zero_ext/loss_scale"] = float(engine.loss_scaler.scale)
    out["zero_ext/skipped_steps"] = float(engine.skipped_steps)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        out["zero_ext/grad_norm"] = float(grad_norm)
    return out


def memory_breakdown(engine) -> dict[str, int]:
    """ZeroEngine.memory_breakdown(): bytes by kind, summing to what this rank holds."""
    params = sum(f.numel() * f.element_size() for f in engine.flat_params)
    if engine.partitioned is not None:
        params += engine.partitioned.nbytes()
    if engine.replicated_optimizer is None:
        state = engine.optimizer.nbytes()
    else:
        state = {"optimizer": sum(t.numel() * t.element_size()
                                  for per_param in engine.optimizer.state.values()
                                  for t in per_param.values() if torch.is_tensor(t))}
    breakdown = {"params": params, "grads": engine.grad_buckets.nbytes(), **state}
    compression = sum(t.numel() * t.element_size()
                      for feedback in engine.compression.feedback.values()
                      for t in feedback.tensors().values())
    if compression:  # error-feedback residuals, top-k state (zero/compression.py)
        breakdown["compression"] = compression
    if engine.offload is not None:
        # Host gradient copies and 16-bit upload buffers: values still sum to the total.
        breakdown["offload_buffers"] = engine.offload.host_nbytes()
    return breakdown


def memory_by_location(engine) -> dict[str, int]:
    """ZeroEngine.memory_by_location(): memory_breakdown's total as "device" and "host"."""
    breakdown = memory_breakdown(engine)
    host = engine.offload.host_nbytes() if engine.offload is not None else 0
    if engine.offload_optimizer:
        host += sum(engine.optimizer.nbytes(engine.offload.shards).values())
    if engine.offload_param:
        host += engine.partitioned.shard_nbytes()
    host += engine._offloaded_states.nbytes()  # engine.offload_states() until reloaded
    return {"device": sum(breakdown.values()) - host, "host": host}
