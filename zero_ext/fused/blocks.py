"""The norms apply() swaps in, and the residual add of a transformer block fused into its norm.

``zero_ext.fused.apply`` (apply.py) decides which modules take these forwards:

* ``rms_norm`` / ``layer_norm``: a norm module's forward -> :func:`rms_norm` /
  :func:`layer_norm`; called by a fused block with the residual (the ``_RESIDUAL`` keyword),
  the same module returns ``(norm(residual + x), residual + x)`` from one pass;
* ``residual_norm``: a block whose ``h = residual + attention`` feeds the norm after the
  attention: the Llama family's decoder layers (``post_attention_layernorm``, an RMSNorm) and
  GPT-2's blocks without cross-attention (``ln_2``, a LayerNorm). One forward serves every
  family; :data:`_BLOCKS` says where each keeps its parts.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from torch import Tensor, nn

from zero_ext._plain_forward import plain_forward
from zero_ext.fused.norms import layer_norm, rms_norm
from zero_ext.fused.swap import (
    _FUSED,
    _auto_kind,
    _call_shape,
    _installed_forward,
    _named_arguments,
    _replaced,
    _runs,
    _single_input,
)

# -- norms -----------------------------------------------------------------------------------

_RESIDUAL = "_zero_ext_residual"   # the keyword a fused block passes the residual to its norm by


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _rms_norm_forward(self, *args, **kwargs):
    return _norm_forward(self, rms_norm, (self.weight,), args, kwargs)


def _layer_norm_forward(self, *args, **kwargs):
    return _norm_forward(self, layer_norm, (self.weight, getattr(self, "bias", None)), args,
                         kwargs)


def _norm_forward(self, fused, params: tuple, args: tuple, kwargs: dict):
    """``fused(x, *params, eps)`` for a call ``norm(x)``, the module's own forward for any
    other; with the residual keyword (a fused block's call) ``(norm(residual + x),
    residual + x)``: one pass where the kernel takes it, else the add and the module's own
    forward."""
    if _RESIDUAL in kwargs:
        residual = kwargs.pop(_RESIDUAL)
        x, = args
        if kwargs or residual.shape != x.shape or not _runs("fused_norm", x, *params, residual):
            summed = residual + x
            return plain_forward(self)(summed, **kwargs), summed
        return fused(x, *params, _eps(self), residual=residual)
    x = _single_input(args, kwargs)
    if x is None or not _runs("fused_norm", x, *params):
        return plain_forward(self)(*args, **kwargs)
    return fused(x, *params, _eps(self))


_NORM_FORWARDS = {"rms_norm": _rms_norm_forward, "layer_norm": _layer_norm_forward}


def _norm_missing(module: nn.Module, *, layer: bool) -> str | None:
    if not isinstance(getattr(module, "weight", None), Tensor):
        return "has no `weight` tensor (an affine scale over the last dimension)"
    if layer and isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return f"normalizes over {len(module.normalized_shape)} dimensions; the kernel over one"
    if layer and not (getattr(module, "bias", None) is None or
                      isinstance(module.bias, Tensor)):
        return "has a `bias` that is neither a tensor nor None"
    eps = _eps(module)
    if eps is None or eps <= 0:
        return "has no `variance_epsilon` or `eps` number > 0"
    return None


# -- the residual add into a block's norm ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Block:
    """Where a family's block keeps what the fused body calls. Every family apply() knows
    takes the residual stream as ``hidden_states`` and has its MLP as ``mlp``."""

    input_norm: str             # the norm before the attention
    attention: str              # the self-attention, called with the block's other arguments
    norm: str                   # the norm after it, which takes the residual add
    norm_kind: str              # the kind apply() gives that norm
    cross_attention: str | None = None  # a branch between the add and the norm: left alone
    encoder: tuple[str, ...] = ()  # the block's arguments for that branch: None, or own forward


_BLOCKS = {
    "decoder_layer": _Block("input_layernorm", "self_attn", "post_attention_layernorm",
                            "rms_norm"),
    "gpt2_block": _Block("ln_1", "attn", "ln_2", "layer_norm", cross_attention="crossattention",
                         encoder=("encoder_hidden_states", "encoder_attention_mask")),
}

_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def _block_forward(self, *args, **kwargs):
    """A block's forward with ``h = residual + attention`` fused into the norm after the
    attention: ``(norm(h), h) = norm(attention, residual)``; everything else as transformers
    5's block computes it.

    Why the whole forward and not a narrower hook: the add is a tensor ``+`` in the block's
    own code, between two module calls; no module hook can skip it (only a tensor subclass or
    a dispatch mode intercepting that ``+`` could, each a cost on every op of the block and a
    hazard for torch.compile). What changes between transformers releases is the arguments
    (``past_key_values`` is becoming ``cache``), not this body: the call is bound to the
    block's own signature (read once per function), and every argument but the hidden states
    (and GPT-2's encoder ones) passes to the attention by name, at the block's defaults where
    not given, as the block's own forward passes them; apply() takes only classes whose
    forward returns one tensor (older releases' returned tuples). Submodules run as module
    calls, so stage 3 gathers them and hooks (transformers' recording of attention weights for
    ``output_attentions``) see them. A call that does not bind, one with an argument the
    block's own forward renames (``past_key_values``), one with encoder states, or one whose
    norm is no longer apply()'s runs the block's own forward.

    Activation checkpointing: transformers 5 checkpoints a block inside its class's
    ``forward`` (``GradientCheckpointingLayer``), which this instance forward replaces; where
    the block would checkpoint, this runs the fused body through the block's own
    ``_gradient_checkpointing_func``, the positional arguments still positional (reentrant
    checkpointing takes gradients only through them), and with a KV cache in use there
    (transformers turns it off first, which is not repeated here) the block's own forward.
    """
    block = _BLOCKS[self.__dict__[_FUSED]]
    arguments = _fused_call(self, block, args, kwargs)
    if arguments is None:
        return plain_forward(self)(*args, **kwargs)
    if not _checkpoints_in_forward(self):
        return _block_body(self, block, arguments)
    if arguments.get("use_cache") or any(arguments.get(n) is not None for n in _CACHE_NAMES):
        return plain_forward(self)(*args, **kwargs)
    names = _call_shape(plain_forward(self)).positional[:len(args)]
    return self._gradient_checkpointing_func(
        functools.partial(_checkpointed_body, self, block, names, arguments), *args)


def _fused_call(block_module: nn.Module, block: _Block, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name (:func:`_named_arguments`) where the fused body takes it,
    else None."""
    if _installed_forward(getattr(block_module, block.norm)) is not _NORM_FORWARDS[
            block.norm_kind]:
        return None  # the norm was wrapped since: it would not take the residual keyword
    forward = plain_forward(block_module)
    named = _call_shape(forward).named
    if any(n in kwargs and n not in named for n in _CACHE_NAMES):
        return None  # a name the block's own forward renames (transformers' deprecate_kwarg)
    arguments = _named_arguments(forward, args, kwargs)
    if (arguments is None or not isinstance(arguments.get("hidden_states"), Tensor) or
            any(arguments.get(n) is not None for n in block.encoder)):
        return None
    return arguments


def _checkpoints_in_forward(layer: nn.Module) -> bool:
    """Whether the layer's class forward would checkpoint this call: transformers'
    ``GradientCheckpointingLayer`` wrapper, switched on, in training with gradients."""
    forward_code = getattr(type(layer).forward, "__code__", None)
    return (getattr(forward_code, "co_name", None) == "forward_with_checkpointing" and
            getattr(layer, "gradient_checkpointing", False) and layer.training and
            torch.is_grad_enabled())


def _checkpointed_body(self, block: _Block, names: tuple[str, ...], arguments: dict,
                       *args) -> Tensor:
    """The body with the checkpoint's inputs (the call's positional arguments) put back under
    their names; run again in backward, so it builds its own dict each time."""
    return _block_body(self, block, {**arguments, **dict(zip(names, args))})


def _block_body(self, block: _Block, arguments: dict) -> Tensor:
    residual = arguments.pop("hidden_states")
    for name in block.encoder:
        arguments.pop(name, None)
    attention = getattr(self, block.attention)(
        hidden_states=getattr(self, block.input_norm)(residual), **arguments)[0]
    hidden, residual = getattr(self, block.norm)(attention, **{_RESIDUAL: residual})
    return residual + self.mlp(hidden)


def _block_missing(module: nn.Module, block: _Block) -> str | None:
    absent = [n for n in (block.input_norm, block.attention, block.norm, "mlp")
              if not isinstance(getattr(module, n, None), nn.Module)]
    if absent:
        return f"has no {', '.join(f'`{n}`' for n in absent)} module"
    if block.cross_attention and getattr(module, block.cross_attention, None) is not None:
        return (f"has a cross-attention branch (`{block.cross_attention}`) whose residual add "
                f"comes before `{block.norm}`: its own forward runs it")
    returns = inspect.signature(type(module).forward).return_annotation
    if returns not in (Tensor, "torch.Tensor"):
        return f"has a forward returning {returns}, not one tensor (an older transformers)"
    norm = getattr(module, block.norm)
    if norm.__dict__.get(_FUSED) != block.norm_kind and (
            _auto_kind(norm) != block.norm_kind or
            _norm_missing(norm, layer=block.norm_kind == "layer_norm") or _replaced(norm)):
        return f"has a `{block.norm}` that apply() does not give the fused {block.norm_kind}"
    return None
