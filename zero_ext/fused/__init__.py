"""Fused training ops: computations that, done in one pass, save memory or memory traffic.

Each op lives in its own module with its autograd and fake kernels registered through
torch.library, so eager code, torch.compile and the ZeRO engine all reach the same kernels
(csrc/ + kernels/): :func:`linear_cross_entropy`, the language-model loss without logits;
:func:`rms_norm` and :func:`layer_norm`, optionally fused with the residual add; :func:`swiglu`
and :func:`bias_gelu`, whose backward recomputes the activation from the saved inputs;
:func:`scaled_masked_softmax`, softmax + dropout whose backward regenerates the dropout mask, and
:func:`use_fused_softmax`, which puts it into a transformers model's eager attention.
:func:`apply` swaps them into transformers' Llama-family and GPT-2 models (and other modules
by class name), in place; ``zero_ext.initialize`` calls it when the config asks
(``zero_ext.fused_kernels``).
"""

from zero_ext.fused.activations import bias_gelu, swiglu

# The function shadows its module's name in this package: zero_ext.fused.apply(model).
from zero_ext.fused.apply import apply
from zero_ext.fused.attention import use_fused_softmax
from zero_ext.fused.cross_entropy import linear_cross_entropy
from zero_ext.fused.norms import layer_norm, rms_norm
from zero_ext.fused.softmax import scaled_masked_softmax

__all__ = [
    "apply",
    "bias_gelu",
    "layer_norm",
    "linear_cross_entropy",
    "rms_norm",
    "scaled_masked_softmax",
    "swiglu",
    "use_fused_softmax",
]
