"""Fused training ops: computations that, done in one pass, save memory or memory traffic.

Each op lives in its own module with its autograd and fake kernels registered through
torch.library, so eager code, torch.compile and the ZeRO engine all reach the same kernels
(csrc/ + kernels/): :func:`linear_cross_entropy`, the language-model loss without logits;
:func:`rms_norm` and :func:`layer_norm`, optionally fused with the residual add; :func:`swiglu`
and :func:`bias_gelu`, whose backward recomputes the activation from the saved inputs.
"""

from zero_ext.fused.activations import bias_gelu, swiglu
from zero_ext.fused.cross_entropy import linear_cross_entropy
from zero_ext.fused.norms import layer_norm, rms_norm

__all__ = ["bias_gelu", "layer_norm", "linear_cross_entropy", "rms_norm", "swiglu"]
