"""DeepSpeed's monitors: TensorBoard and CSV files of (name, value, step) events.

`engine.monitor.write_events([(name, value, step), ...])` is DeepSpeed scripts' call for their
own figures (a loss, an evaluation score); the engine writes ``Train/Samples/lr`` and, under
fp16, ``Train/Samples/loss_scale`` after every optimizer step (skipped ones too), at
``global_samples``, as DeepSpeed's engine does. Only rank 0 writes, into
``<output_path>/<job_name>/`` of each enabled section (``tensorboard``, ``csv_monitor``):
TensorBoard's event file (torch.utils.tensorboard), flushed after each write; one CSV file per
event name (``Train/Samples/lr`` -> ``Train_Samples_lr.csv``, a ``step,<last part of the
name>`` header, then a row per event), DeepSpeed's layout.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable

__all__ = ["EventWriters"]


class EventWriters:
    """The enabled monitors of a config, on rank `rank` (each writes on rank 0 only)."""

    def __init__(self, tensorboard, csv_monitor, rank: int):
        self.enabled = tensorboard.enabled or csv_monitor.enabled  # DeepSpeed's monitor.enabled
        self._writer = None
        self._csv_dir = None
        self._csv_files: set[str] = set()
        if rank != 0:
            return
        if tensorboard.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                log_dir=_job_dir(tensorboard.output_path, tensorboard.job_name))
        if csv_monitor.enabled:
            self._csv_dir = _job_dir(csv_monitor.output_path, csv_monitor.job_name)

    def write_events(self, events: Iterable[tuple[str, float, int]]) -> None:
        """Writes each (name, value, step); nothing on ranks other than 0."""
        events = list(events)
        if self._writer is not None:
            for name, value, step in events:
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self._csv_dir is not None:
            for name, value, step in events:
                self._write_csv(name, value, step)

    def _write_csv(self, name: str, value, step: int) -> None:
        filename = name.replace("/", "_").replace(" ", "_")
        with open(os.path.join(self._csv_dir, filename + ".csv"), "a+", newline="",
                  encoding="utf-8") as f:
            writer = csv.writer(f)
            if filename not in self._csv_files:
                self._csv_files.add(filename)
                writer.writerow(["step", name.rsplit("/", 1)[-1]])
            writer.writerow([step, value])


def _job_dir(output_path: str, job_name: str) -> str:
    path = os.path.join(output_path, job_name)
    os.makedirs(path, exist_ok=True)
    return path
