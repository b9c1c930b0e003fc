"""zero_ext.integrations.trl: TRL's trainers (SFT, DPO, GRPO, reward) on a zero_ext engine.

ZeroTrainer calls :func:`adapt_trainer` once its engine exists; everything TRL-specific lives
here, so that the Trainer integration stays library-neutral.
"""

from __future__ import annotations

__all__ = ["adapt_trainer", "is_trl_trainer"]


def is_trl_trainer(trainer) -> bool:
    """Whether `trainer` is (a subclass of) one of TRL's trainers; decided from the class
    hierarchy alone, so that trl is never imported for a plain Trainer."""
    return any(cls.__module__.startswith("trl.") for cls in type(trainer).__mro__)


def adapt_trainer(trainer) -> None:
    """TRL-specific adaptation of a trainer whose engine was just created."""
    if not is_trl_trainer(trainer):
        return
