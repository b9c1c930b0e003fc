"""Optimizers backed by zero_ext's C++ ops, usable anywhere a torch.optim optimizer is."""

from zero_ext.optim.adamw import AdamW

__all__ = ["AdamW"]
