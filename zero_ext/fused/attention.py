"""Eager attention with the fused scaled masked softmax + dropout, for transformers models.

transformers' ``eager_attention_forward`` computes ``softmax(QK^T * scaling + mask)`` then
dropout as separate passes, saving the softmax output and the dropout mask for backward;
:func:`zero_ext_eager_attention` is the same function (the attention-interface signature,
registered with ``AttentionInterface`` as ``"zero_ext_eager"``) with those steps replaced by
:func:`zero_ext.fused.softmax.scaled_masked_softmax`, which saves the softmax output only.
Models on SDPA or flash attention are left alone: attention itself stays on torch's fused
kernels, which never materialize the scores at all. :func:`use_fused_softmax` switches a model
that runs eager attention; ``zero_ext.fused.apply`` calls it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zero_ext.fused.softmax import scaled_masked_softmax
from zero_ext.fused.swap import _runs

__all__ = ["ATTENTION_NAME", "use_fused_softmax", "zero_ext_eager_attention"]

ATTENTION_NAME = "zero_ext_eager"

# Model types whose eager attention is the plain ``eager_attention_forward`` (scores * scaling +
# additive mask, softmax, dropout, @ V), which zero_ext_eager_attention reproduces. Others (logit
# soft-capping, attention sinks, GPT-2's reorder_and_upcast_attn) keep their own eager code.
SUPPORTED_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})


def zero_ext_eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """transformers' eager attention on [batch, heads, q, d] query and [batch, kv_heads, k, d]
    key / value (grouped-query heads repeated), returning ``(attn_output [batch, q, heads, d],
    attn_weights [batch, heads, q, k])`` as ``eager_attention_forward`` does."""
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"zero_ext.fused.zero_ext_eager_attention: {unsupported!r} is not supported (the "
                "fused softmax has no soft-capping or sinks); keep this model on "
                "attn_implementation='eager'")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    scores = torch.matmul(query, key.transpose(2, 3))
    if _runs("scaled_masked_softmax", scores):
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(scores.dtype)
        weights = scaled_masked_softmax(scores, mask, scale=scaling, dropout_p=dropout,
                                        training=module.training)
    else:
        # No kernel for this device or dtype, or autocast on (the scores then come in another
        # dtype than the query): eager attention's own steps.
        weights = _eager_softmax(scores, mask, scaling, query.dtype, dropout, module.training)
    weights = weights.to(value.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def _eager_softmax(scores: Tensor, mask: Tensor | None, scaling: float, dtype: torch.dtype,
                   dropout: float, training: bool) -> Tensor:
    """transformers' eager steps: scores * scaling + mask, softmax in fp32 cast to the query's
    dtype, dropout."""
    scores = scores * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    return torch.nn.functional.dropout(weights, p=dropout, training=training)


def _register() -> None:
    """Makes "zero_ext_eager" a name transformers accepts, with eager's additive float mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, zero_ext_eager_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def use_fused_softmax(model: nn.Module) -> int:
    """Switches a transformers model on eager attention to :func:`zero_ext_eager_attention`.

    Only a ``PreTrainedModel`` whose ``config._attn_implementation`` is ``"eager"`` and whose
    model type computes the plain eager attention (``SUPPORTED_MODEL_TYPES``) is switched; any
    other model (SDPA, flash, soft-capping, ...) is left as it is. Returns the number of attention
    modules that now run the fused softmax (0 when nothing was switched). Idempotent.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return 0
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        return 0
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return 0
    if getattr(config, "reorder_and_upcast_attn", False):
        return 0  # GPT-2's upcast path is its own eager code
    if config._attn_implementation == "eager":
        _register()
        model.set_attn_implementation(ATTENTION_NAME)
    if config._attn_implementation != ATTENTION_NAME:
        return 0
    return sum(1 for m in model.modules()
               if type(m).__name__.endswith("Attention") and getattr(m, "config", None) is config)
