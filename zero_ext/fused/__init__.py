"""Fused training ops: computations that, done in one pass, save memory or memory traffic.

Each op lives in its own module with its autograd and fake kernels registered through
torch.library, so eager code, torch.compile and the ZeRO engine all reach the same kernels
(csrc/ + kernels/). Now: :func:`linear_cross_entropy`, the language-model loss without logits.
"""

from zero_ext.fused.cross_entropy import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
