"""zero_ext.fused.apply: puts the fused ops into a model's modules, in place.

Called by users (``zero_ext.fused.apply(model)``), by ``zero_ext.initialize`` when the config's
``zero_ext.fused_kernels.enabled`` is true, and by the HF Trainer integration. Each swapped
module gets its own ``forward`` (an instance attribute, never a class patch), so other models in
the process keep theirs, and the engine's stage-3 hooks, which live in ``Module.__call__``, still
gather a module's parameters around the fused forward. What is swapped (docs/fused.md):

* ``rms_norm``: transformers' Llama, Mistral, Qwen2 and Qwen3 RMSNorm -> :func:`rms_norm`;
* ``layer_norm``: ``torch.nn.LayerNorm`` (one normalized dimension, affine) -> :func:`layer_norm`;
* ``swiglu_mlp``: their MLPs, ``down(silu(gate(x)) * up(x))`` -> :func:`swiglu` between the
  projections, which stay module calls;
* ``bias_gelu_mlp``: GPT-2's MLP, the ``c_fc`` bias folded into :func:`bias_gelu`;
* ``residual_norm`` (with the norms): their decoder layers, whose residual add before the
  post-attention norm becomes part of that norm's pass (:func:`rms_norm` with ``residual=``);
* ``causal_lm``: their ``*ForCausalLM`` / ``GPT2LMHeadModel``: in training with labels (or
  with Liger-Kernel's ``skip_logits=True``, which the HF Trainer passes), the ``lm_head`` call
  returns transformers' causal-LM loss from :func:`linear_cross_entropy`, and the output's
  ``logits`` is None (the logits are never materialised). Because the loss is
  computed inside the head's own call, stage 3 gathers the head's weight (tied or not) for it,
  and its gradient reaches the buckets like any other.

Other classes are left alone, as is anything a kernel would compute differently (Gemma's
``(1 + weight)`` norm, logit soft-capping, a gated MLP whose activation is not SiLU) and any
module whose ``forward`` was already replaced by another wrapper. ``modules={"ClassName":
kind}`` swaps further classes by name. At call time a fused forward falls back to the module's
own for what its kernel does not take: a device without the kernel, mixed dtypes, autocast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import weakref
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zero_ext._plain_forward import forward_is_plain, plain_forward, wrap_forward
from zero_ext.fused.activations import bias_gelu, swiglu
from zero_ext.fused.attention import ATTENTION_NAME, use_fused_softmax
from zero_ext.fused.cross_entropy import linear_cross_entropy
from zero_ext.fused.norms import layer_norm, rms_norm

__all__ = ["COUNT_KEYS", "MODULE_KINDS", "apply"]

_API = "zero_ext.fused.apply"

COUNT_KEYS = ("cross_entropy", "rms_norm", "layer_norm", "swiglu", "bias_gelu", "softmax",
              "residual_norm")
"""The keys of :func:`apply`'s result: modules swapped per fused op."""

# transformers' classes apply() recognises by itself (the families whose math it reproduces).
_LLAMA_FAMILY = ("Llama", "Mistral", "Qwen2", "Qwen3")
_AUTO_KINDS = {
    **{f"{family}RMSNorm": "rms_norm" for family in _LLAMA_FAMILY},
    **{f"{family}MLP": "swiglu_mlp" for family in _LLAMA_FAMILY},
    **{f"{family}ForCausalLM": "causal_lm" for family in _LLAMA_FAMILY},
    **{f"{family}DecoderLayer": "decoder_layer" for family in _LLAMA_FAMILY},
    "GPT2MLP": "bias_gelu_mlp",
    "GPT2LMHeadModel": "causal_lm",
}

_FUSED = "_zero_ext_fused"                   # instance attribute: the kind a module was given
_TARGET = "_zero_ext_target"                 # lm_head attribute during a fused loss forward
_HEAD = "lm_head"                            # the kind marker of a causal LM's head


# -- call-time guards ------------------------------------------------------------------------

def _has_kernel(op: str, device_type: str) -> bool:
    """Whether zero_ext was built with ``op``'s kernel for this device type (the CPU build has
    no CUDA kernels). A dispatcher table lookup,
    cheap enough per call and traceable by torch.compile."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"zero_ext::{op}", device_type.upper())


def _runs(op: str, x: Tensor, *params: Tensor | None) -> bool:
    """Whether ``op`` takes ``x`` with ``params`` as they come: its kernel exists on x's device,
    the parameters share x's dtype (the kernels take one dtype), and autocast is off (the ops
    have no autocast rules; the module's own forward knows what autocast should do)."""
    return (_has_kernel(op, x.device.type) and not torch.is_autocast_enabled(x.device.type)
            and all(p is None or p.dtype == x.dtype for p in params))


def _single_input(args: tuple, kwargs: dict) -> Tensor | None:
    """The input tensor of a call ``module(x)``; None for any other call (then the module's own
    forward runs, whatever its other arguments mean)."""
    return args[0] if len(args) == 1 and not kwargs and isinstance(args[0], Tensor) else None


# -- norms -----------------------------------------------------------------------------------

def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _rms_norm_forward(self, *args, **kwargs):
    if _RESIDUAL in kwargs:
        return _residual_rms_norm(self, *args, **kwargs)
    x = _single_input(args, kwargs)
    if x is None or not _runs("fused_norm", x, self.weight):
        return plain_forward(self)(*args, **kwargs)
    return rms_norm(x, self.weight, _eps(self))


def _residual_rms_norm(self, x: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
    """``(norm(residual + x), residual + x)``, the call a fused decoder layer makes: one pass
    where the kernel takes it, else the add and the module's own forward."""
    residual = kwargs.pop(_RESIDUAL)
    if (kwargs or residual.shape != x.shape or
            not _runs("fused_norm", x, self.weight, residual)):
        summed = residual + x
        return plain_forward(self)(summed, **kwargs), summed
    return rms_norm(x, self.weight, _eps(self), residual=residual)


def _layer_norm_forward(self, *args, **kwargs):
    x = _single_input(args, kwargs)
    bias = getattr(self, "bias", None)
    if x is None or not _runs("fused_norm", x, self.weight, bias):
        return plain_forward(self)(*args, **kwargs)
    return layer_norm(x, self.weight, bias, _eps(self))


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


# -- the residual add into a decoder layer's post-attention norm -----------------------------

_RESIDUAL = "_zero_ext_residual"   # the keyword a fused layer passes the residual to its norm by


def _takes_residual(norm: nn.Module) -> bool:
    """Whether ``norm``'s forward is still apply()'s RMSNorm (which takes ``_RESIDUAL``): not
    wrapped since by something that would not pass the keyword on."""
    return getattr(getattr(norm.forward, "__func__", None), "fused", None) is _rms_norm_forward


def _decoder_layer_forward(self, *args, **kwargs):
    """A Llama-family decoder layer's forward with ``h = residual + attention`` fused into the
    post-attention norm's pass: ``(norm(h), h) = post_attention_layernorm(attention,
    residual)``; everything else as transformers 5's layer computes it.

    Why the whole forward and not a narrower hook: the add is a tensor ``+`` in the layer's
    own code, between two module calls; no module hook can skip it (only a tensor subclass or
    a dispatch mode intercepting that ``+`` could, each a cost on every op of the layer and a
    hazard for torch.compile). What changes between transformers releases is the arguments
    (``past_key_values`` is becoming ``cache``), not this body: the layer's arguments pass to
    ``self_attn`` exactly as given, never named here, and apply() takes only classes whose
    forward returns one tensor (older releases' layers returned tuples). Submodules run as
    module calls, so stage 3 gathers them and hooks (transformers' recording of attention
    weights for ``output_attentions``) see them. A call with more than the hidden states
    positional, or whose norm is no longer apply()'s, runs the layer's own forward.

    Activation checkpointing: transformers 5 checkpoints a layer inside its class's
    ``forward`` (``GradientCheckpointingLayer``), which this instance forward replaces; where
    the layer would checkpoint, this runs the fused body through the layer's own
    ``_gradient_checkpointing_func``, and with a KV cache in use there (transformers turns it
    off first, which is not repeated here) the layer's own forward.
    """
    norm = self.post_attention_layernorm
    if len(args) != 1 or not isinstance(args[0], Tensor) or not _takes_residual(norm):
        return plain_forward(self)(*args, **kwargs)
    if _checkpoints_in_forward(self):
        if kwargs.get("use_cache") or any(kwargs.get(n) is not None for n in _CACHE_NAMES):
            return plain_forward(self)(*args, **kwargs)
        return self._gradient_checkpointing_func(
            functools.partial(_decoder_layer_body, self, **kwargs), *args)
    return _decoder_layer_body(self, *args, **kwargs)


_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def _checkpoints_in_forward(layer: nn.Module) -> bool:
    """Whether the layer's class forward would checkpoint this call: transformers'
    ``GradientCheckpointingLayer`` wrapper, switched on, in training with gradients."""
    forward_code = getattr(type(layer).forward, "__code__", None)
    return (getattr(forward_code, "co_name", None) == "forward_with_checkpointing" and
            getattr(layer, "gradient_checkpointing", False) and layer.training and
            torch.is_grad_enabled())


def _decoder_layer_body(self, residual: Tensor, **kwargs) -> Tensor:
    norm = self.post_attention_layernorm
    attention = self.self_attn(hidden_states=self.input_layernorm(residual), **kwargs)[0]
    hidden, residual = norm(attention, **{_RESIDUAL: residual})
    return residual + self.mlp(hidden)


def _decoder_layer_missing(module: nn.Module) -> str | None:
    absent = [n for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
              if not isinstance(getattr(module, n, None), nn.Module)]
    if absent:
        return f"has no {', '.join(f'`{n}`' for n in absent)} module"
    returns = inspect.signature(type(module).forward).return_annotation
    if returns not in (Tensor, "torch.Tensor"):
        return f"has a forward returning {returns}, not one tensor (an older transformers)"
    norm = module.post_attention_layernorm
    if norm.__dict__.get(_FUSED) != "rms_norm" and (
            _auto_kind(norm) != "rms_norm" or _norm_missing(norm, layer=False) or
            _replaced(norm)):
        return "has a `post_attention_layernorm` that apply() does not give the fused RMSNorm"
    return None


# -- MLPs ------------------------------------------------------------------------------------

def _is_hf(obj, *names: str) -> bool:
    """Whether ``obj`` is an instance of one of transformers' classes ``names`` (by name and
    package, so that transformers stays optional here)."""
    cls = type(obj)
    return cls.__name__ in names and cls.__module__.startswith("transformers.")


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or _is_hf(act, "SiLUActivation")


def _gelu_approximate(act) -> str | None:
    """``F.gelu``'s ``approximate`` for the GeLU module ``act``; None for anything else."""
    if isinstance(act, nn.GELU):
        return act.approximate
    if _is_hf(act, "NewGELUActivation", "GELUTanh"):
        return "tanh"
    if _is_hf(act, "GELUActivation"):
        return "none"
    return None


def _swiglu_mlp_forward(self, *args, **kwargs):
    x = _single_input(args, kwargs)
    if x is None or not _runs("swiglu", x):
        return plain_forward(self)(*args, **kwargs)
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _swiglu_mlp_missing(module: nn.Module) -> str | None:
    absent = [n for n in ("gate_proj", "up_proj", "down_proj")
              if not isinstance(getattr(module, n, None), nn.Module)]
    if absent:
        return f"has no {', '.join(f'`{n}`' for n in absent)} module"
    if not _is_silu(getattr(module, "act_fn", None)):
        return (f"has `act_fn` {type(getattr(module, 'act_fn', None)).__name__}, not SiLU "
                "(torch.nn.SiLU or transformers' SiLUActivation)")
    return None


def _is_conv1d(layer) -> bool:
    return _is_hf(layer, "Conv1D")


def _fc_weight_ok(layer) -> bool:
    """Whether ``layer`` is a plain projection whose product apply() can compute itself:
    transformers' Conv1D (weight [in, out]) or exactly torch.nn.Linear, with a bias."""
    return ((_is_conv1d(layer) or type(layer) is nn.Linear)
            and isinstance(getattr(layer, "bias", None), Tensor))


def _bias_gelu_mlp_forward(self, *args, **kwargs):
    x = _single_input(args, kwargs)
    fc = self.c_fc
    # A c_fc wrapped after apply (a LoRA layer) must run as a module: the product below
    # would skip its adapter.
    if x is None or not _fc_weight_ok(fc) or not _runs("bias_gelu", x, fc.weight, fc.bias):
        return plain_forward(self)(*args, **kwargs)
    product = x.matmul(fc.weight) if _is_conv1d(fc) else F.linear(x, fc.weight)
    out = self.c_proj(bias_gelu(product, fc.bias, _gelu_approximate(self.act)))
    dropout = getattr(self, "dropout", None)
    return out if dropout is None else dropout(out)


def _bias_gelu_mlp_missing(module: nn.Module) -> str | None:
    if not _fc_weight_ok(getattr(module, "c_fc", None)):
        return ("has no `c_fc` that is transformers' Conv1D or exactly torch.nn.Linear with a "
                "bias")
    if not isinstance(getattr(module, "c_proj", None), nn.Module):
        return "has no `c_proj` module"
    if _gelu_approximate(getattr(module, "act", None)) is None:
        return (f"has `act` {type(getattr(module, 'act', None)).__name__}, not a GeLU "
                "(torch.nn.GELU, transformers' GELUActivation, NewGELUActivation or GELUTanh)")
    return None


# -- causal LM loss --------------------------------------------------------------------------

@dataclasses.dataclass
class _LossTarget:
    """What the head needs to return transformers' causal-LM loss instead of the logits."""

    labels: Tensor | None         # unshifted labels, shifted here as ForCausalLMLoss does
    shift_labels: Tensor | None   # already shifted labels (the kwarg), used as given
    ignore_index: int
    num_items_in_batch: Tensor | int | None  # divide the sum by it (gradient accumulation)
    loss: Tensor | None = None    # set by the head


def _causal_lm_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                    target: _LossTarget) -> Tensor:
    """transformers' ``ForCausalLMLoss(hidden @ weight.T + bias, labels, ...)``: labels shifted
    left with ``ignore_index`` padding (or ``shift_labels`` as given), the mean over tokens not
    ignored, or the sum over ``num_items_in_batch``; fp32 as transformers upcasts the logits."""
    shifted = target.shift_labels
    if shifted is None:
        shifted = F.pad(target.labels, (0, 1), value=target.ignore_index)[..., 1:]
    shifted = shifted.reshape(-1).to(hidden.device)
    # Under autocast the head's weight keeps its dtype: the loss is computed in it.
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    count = target.num_items_in_batch
    loss = linear_cross_entropy(hidden, weight, shifted, bias, ignore_index=target.ignore_index,
                                reduction="mean" if count is None else "sum",
                                out_dtype=torch.float32)
    if count is None:
        return loss
    return loss / (count.to(loss.device) if isinstance(count, Tensor) else count)


def _lm_head_forward(self, *args, **kwargs):
    target = self.__dict__.pop(_TARGET, None)
    hidden = _single_input(args, kwargs)
    if target is None or hidden is None:
        return plain_forward(self)(*args, **kwargs)
    target.loss = _causal_lm_loss(hidden, self.weight, self.bias, target)
    return target.loss


@dataclasses.dataclass(frozen=True)
class _CallShape:
    """What :func:`_fused_loss_call` reads of a forward's signature. inspect.signature of
    transformers' decorated forwards costs ~50 us, binding ~12 us: a step's forward paid both."""

    signature: inspect.Signature
    named: frozenset[str]         # the parameters a keyword argument binds to by its name
    var_keyword: str | None       # the ``**kwargs`` parameter, which takes the other keywords


# Under the forward's function: a bound method's signature is its function's for every instance,
# and a forward replaced since (a wrapper, a substitute plain forward) is another function, so
# nothing goes stale. Weak keys: a dropped class or closure takes its entry with it.
_CALL_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _call_shape(forward: Callable) -> _CallShape:
    key = getattr(forward, "__func__", forward)
    try:
        return _CALL_SHAPES[key]
    except (KeyError, TypeError):  # TypeError: a callable without weak references
        pass
    signature = inspect.signature(forward)
    params = signature.parameters.values()
    shape = _CallShape(
        signature,
        frozenset(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)),
        next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None))
    try:
        _CALL_SHAPES[key] = shape
    except TypeError:
        pass
    return shape


def _fusable_head(model: nn.Module) -> bool:
    """Whether the model's head is still the plain Linear apply() gave the loss to (not wrapped
    since, e.g. by a LoRA layer) and its device has the kernel."""
    head = model._modules.get("lm_head")
    return type(head) is nn.Linear and head.__dict__.get(_FUSED) == _HEAD and \
        _has_kernel("fused_linear_cross_entropy_fwd", head.weight.device.type)


def _fused_loss_call(model: nn.Module, args: tuple, kwargs: dict):
    """``(args, kwargs, target)`` for the model's own forward. ``target`` is set when the head
    computes the loss, which Liger-Kernel's ``skip_logits`` rule decides (the HF Trainer passes
    the kwarg): True, or None in training with labels; every logit kept, the head fusable. The
    labels are then None in the arguments; ``skip_logits`` never reaches the model's forward."""
    kwargs = dict(kwargs)
    skip = kwargs.pop("skip_logits", None)
    if skip is False or (skip is None and not model.training) or not _fusable_head(model):
        return args, kwargs, None
    shape = _call_shape(plain_forward(model))
    if args:
        bound = shape.signature.bind(*args, **kwargs)
        arguments = bound.arguments
        extra = arguments.get(shape.var_keyword, {})
    else:  # keywords only (the HF Trainer's call): bound as they come
        bound = None
        arguments = kwargs
        extra = {k: v for k, v in kwargs.items() if k not in shape.named}
    labels, shifted = arguments.get("labels"), extra.get("shift_labels")
    if skip and labels is None and shifted is None:
        raise ValueError(f"{_API}: skip_logits=True asks {type(model).__name__} for the loss "
                         "without logits, but no labels (or shift_labels) were given; pass them, "
                         "or skip_logits=False for the logits")
    keep = arguments.get("logits_to_keep", 0)
    if (skip is None and labels is None) or not (keep is None or isinstance(keep, int) and
                                                 keep == 0):
        return args, kwargs, None
    target = _LossTarget(labels, shifted, extra.get("ignore_index", -100),
                         extra.get("num_items_in_batch"))
    arguments["labels"] = None
    return (args, kwargs, target) if bound is None else (bound.args, bound.kwargs, target)


def _causal_lm_forward(self, *args, **kwargs):
    args, kwargs, target = _fused_loss_call(self, args, kwargs)
    if target is None:
        return plain_forward(self)(*args, **kwargs)
    head = self.lm_head
    setattr(head, _TARGET, target)
    try:
        output = plain_forward(self)(*args, **kwargs)
    finally:
        head.__dict__.pop(_TARGET, None)
    if target.loss is None:
        raise RuntimeError(f"{_API}: {type(self).__name__}.forward did not call self.lm_head "
                           "on the hidden states, so the fused loss was not computed; leave "
                           "this class out of modules= (or pass cross_entropy=False)")
    # The head's result stands where the logits were; transformers' loss was skipped (labels
    # None). A tuple (return_dict=False) thus already reads (loss, ...), without logits; an
    # output object keeps its type, with the loss and without logits.
    if isinstance(output, tuple):
        return output
    fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
    return type(output)(loss=target.loss, **fields)


def _causal_lm_missing(module: nn.Module) -> str | None:
    head = module._modules.get("lm_head")
    if type(head) is not nn.Linear:
        return (f"has `lm_head` {type(head).__name__}, not exactly torch.nn.Linear (a wrapped or "
                "quantized head computes something the fused loss would not)")
    if "labels" not in inspect.signature(module.forward).parameters:
        return "has a forward without a `labels` argument"
    config = getattr(module, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"transforms the logits (config.{name}), which the fused loss would skip"
    loss_function = getattr(module, "loss_function", None)
    if getattr(loss_function, "__name__", None) != "ForCausalLMLoss":
        return ("computes its loss with something other than transformers' ForCausalLMLoss "
                f"({getattr(loss_function, '__name__', loss_function)!r})")
    return _replaced(head, "lm_head")


# -- installing ------------------------------------------------------------------------------

def _replaced(module: nn.Module, what: str = "it") -> str | None:
    """Why ``module`` cannot take a fused forward: another wrapper replaced its forward already
    (wrapping that wrapper could skip what it does). A forward that computes the module's own
    math (zero_ext._plain_forward: stage 3's partitioned Linear forward) is kept as the
    fallback."""
    if forward_is_plain(module) or module.__dict__.get(_FUSED):
        return None
    forward = module.__dict__["forward"]
    return (f"has its forward replaced on the instance already ({what}: "
            f"{getattr(forward, '__qualname__', forward)!r}); apply the fused kernels before "
            "wrapping the module")


def _install(module: nn.Module, kind: str, fused: Callable) -> None:
    """Makes ``fused`` the forward of this instance; the forward it had stays the fallback
    (:func:`zero_ext._plain_forward.plain_forward`). Bound methods are copied with their
    instance by copy.deepcopy (a reference model copied from a fused one runs its own modules);
    the signature stays the old forward's, which the HF Trainer inspects."""
    signature = inspect.signature(module.forward)

    def forward(self, *args, **kwargs):
        return fused(self, *args, **kwargs)

    forward.__signature__ = signature.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *signature.parameters.values()])
    forward.__doc__ = f"zero_ext.fused ({kind}): {fused.__name__}, else the module's own forward"
    forward.fused = fused  # what _takes_residual reads
    setattr(module, _FUSED, kind)
    wrap_forward(module, types.MethodType(forward, module))


@dataclasses.dataclass(frozen=True)
class _Kind:
    """One kind of swap: which result key counts it, which switch of apply() selects it, what
    a module must have for it, and its fused forward."""

    count: str
    switch: str
    missing: Callable[[nn.Module], str | None]
    forward: Callable


_KINDS = {
    "rms_norm": _Kind("rms_norm", "norms", functools.partial(_norm_missing, layer=False),
                      _rms_norm_forward),
    "layer_norm": _Kind("layer_norm", "norms", functools.partial(_norm_missing, layer=True),
                        _layer_norm_forward),
    "swiglu_mlp": _Kind("swiglu", "activations", _swiglu_mlp_missing, _swiglu_mlp_forward),
    "bias_gelu_mlp": _Kind("bias_gelu", "activations", _bias_gelu_mlp_missing,
                           _bias_gelu_mlp_forward),
    "causal_lm": _Kind("cross_entropy", "cross_entropy", _causal_lm_missing,
                       _causal_lm_forward),
    # Not nameable in modules=: the layer's forward is rewritten, which no probe can check.
    "decoder_layer": _Kind("residual_norm", "norms", _decoder_layer_missing,
                           _decoder_layer_forward),
}
MODULE_KINDS = tuple(kind for kind in _KINDS if kind != "decoder_layer")
"""The kinds ``modules=`` (and the config's ``zero_ext.fused_kernels.modules``) may name."""


def _auto_kind(module: nn.Module) -> str | None:
    if type(module) is nn.LayerNorm and module.elementwise_affine:
        return "layer_norm"
    return _AUTO_KINDS.get(type(module).__name__) if _is_hf(module, *_AUTO_KINDS) else None


def _kind_formula(module: nn.Module, kind_name: str, x: Tensor) -> Tensor:
    """What the fused forward of ``kind_name`` computes, in eager torch, on ``module``'s own
    parameters and submodules."""
    if kind_name == "rms_norm":
        return F.rms_norm(x, (x.shape[-1],), module.weight, _eps(module))
    if kind_name == "layer_norm":
        return F.layer_norm(x, (x.shape[-1],), module.weight, getattr(module, "bias", None),
                            _eps(module))
    if kind_name == "swiglu_mlp":
        return module.down_proj(F.silu(module.gate_proj(x)) * module.up_proj(x))
    out = module.c_proj(F.gelu(module.c_fc(x), approximate=_gelu_approximate(module.act)))
    dropout = getattr(module, "dropout", None)
    return out if dropout is None else dropout(out)


def _probe_input_width(module: nn.Module, kind_name: str) -> int:
    if kind_name in ("rms_norm", "layer_norm"):
        return module.weight.shape[-1]
    if kind_name == "swiglu_mlp":
        return module.gate_proj.weight.shape[1]
    fc = module.c_fc
    return fc.weight.shape[0] if _is_conv1d(fc) else fc.weight.shape[1]


def _probe_mismatch(module: nn.Module, kind_name: str) -> str | None:
    """For a class named in ``modules=``: whether its own forward computes the kind's formula,
    compared on a random input (a Gemma-style ``(1 + weight)`` norm named "rms_norm" differs).
    Not run where it cannot be: a causal LM (its forward is the whole model), parameters not
    materialised (meta, stage-3 placeholders)."""
    params = list(module.parameters())
    if kind_name == "causal_lm" or not params or any(
            p.is_meta or p.numel() == 0 for p in params):
        return None
    first = params[0]
    width = _probe_input_width(module, kind_name)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, width, generator=g) * 2 + 0.5).to(first.device, first.dtype)
    outputs = []
    for compute in (lambda: module.forward(x), lambda: _kind_formula(module, kind_name, x)):
        with torch.no_grad(), torch.random.fork_rng(devices=[first.device]
                                                    if first.device.type == "cuda" else []):
            torch.manual_seed(0)  # the same dropout mask in both
            out = compute()
        if not isinstance(out, Tensor):
            return f"returns {type(out).__name__}, not one tensor"
        outputs.append(out.float())
    own, formula = outputs
    if own.shape != formula.shape:
        return (f"returns shape {tuple(own.shape)} where the {kind_name!r} formula gives "
                f"{tuple(formula.shape)}")
    tolerance = (1e-4 if first.dtype in (torch.float32, torch.float64) else 3e-2) * \
        (1 + formula.abs().max().item())
    difference = (own - formula).abs().max().item()
    if difference <= tolerance:
        return None
    return (f"computes something else than the {kind_name!r} formula (on a random input its "
            f"forward differs from it by {difference:.3g}; e.g. a (1 + weight) scale)")


def _check_requested(model: nn.Module, modules: Mapping[str, str] | None) -> dict[str, str]:
    if modules is None:
        return {}
    if not isinstance(modules, Mapping):
        raise TypeError(f"{_API}: modules must map class names to kinds, e.g. "
                        f"{{'MyRMSNorm': 'rms_norm'}}; got {type(modules).__name__}")
    present = {type(m).__name__ for m in model.modules()}
    for name, kind in modules.items():
        if kind not in MODULE_KINDS:
            raise ValueError(f"{_API}: modules[{name!r}] = {kind!r} is not a kind; expected one "
                             f"of {', '.join(map(repr, MODULE_KINDS))}")
        if name not in present:
            raise ValueError(f"{_API}: modules names class {name!r}, but the model has no "
                             f"module of that class; its classes are {sorted(present)}. Give "
                             "the class name as type(module).__name__ spells it")
    return dict(modules)


def apply(model: nn.Module, *, cross_entropy: bool = True, norms: bool = True,
          activations: bool = True, softmax: bool = True,
          modules: Mapping[str, str] | None = None) -> dict[str, int]:
    """Swaps zero_ext's fused ops into ``model``'s modules in place; returns how many modules
    each op took over, keyed by :data:`COUNT_KEYS`.

    ``cross_entropy``, ``norms`` and ``activations`` select the automatic swaps of the
    transformers families above (and of ``torch.nn.LayerNorm``); ``softmax`` switches a
    transformers model on eager attention to :func:`zero_ext.fused.use_fused_softmax`'s (its
    attention modules counted; SDPA and flash attention are left as they are). ``modules`` maps
    further class
    names to a kind of :data:`MODULE_KINDS`, swapped whatever the switches say; a named class
    that lacks what its kind needs is a ValueError. A module swapped before is left as it is,
    so a second call swaps nothing more.

    Kinds and what a class needs for them (each module keeps its parameters; only its forward
    changes): ``"rms_norm"``: ``weight`` and ``variance_epsilon`` or ``eps``, computing
    ``weight * x / sqrt(mean(x**2) + eps)``; ``"layer_norm"``: ``weight``, ``bias`` (or None),
    ``eps``; ``"swiglu_mlp"``: ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``,
    computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; ``"bias_gelu_mlp"``: ``c_fc``
    (Conv1D or nn.Linear, with bias), a GeLU ``act``, ``c_proj`` and optionally ``dropout``,
    computing ``dropout(c_proj(act(c_fc(x))))``; ``"causal_lm"``: an nn.Linear ``lm_head``
    whose output the forward passes unchanged to transformers' ``ForCausalLMLoss`` (the
    ``self.loss_function``) with ``labels``. apply() checks the attributes, and runs each
    named norm or MLP once on a random input against the kind's formula in eager torch (where
    its parameters exist: not on the meta device, not as stage-3 placeholders); the causal LM's
    formula is the caller's word.
    """
    requested = _check_requested(model, modules)
    switches = {"cross_entropy": cross_entropy, "norms": norms, "activations": activations}
    counts = dict.fromkeys(COUNT_KEYS, 0)
    # Every module is checked before any is swapped: an error leaves the model as it was.
    for module, kind_name in list(_planned(model, requested, switches)):
        kind = _KINDS[kind_name]
        if kind_name == "causal_lm":
            _install(module.lm_head, _HEAD, _lm_head_forward)
        _install(module, kind_name, kind.forward)
        counts[kind.count] += 1
    if softmax:
        config = getattr(model, "config", None)
        switched_before = getattr(config, "_attn_implementation", None) == ATTENTION_NAME
        switched = use_fused_softmax(model)
        counts["softmax"] = 0 if switched_before else switched
    return counts


def _planned(model: nn.Module, requested: Mapping[str, str], switches: Mapping[str, bool]):
    """The (module, kind) pairs apply() swaps: modules not swapped before, of a requested class
    (an error if one lacks what its kind needs) or of a class it knows with its switch on."""
    for module in model.modules():
        if module.__dict__.get(_FUSED):
            continue
        name = type(module).__name__
        kind_name = requested.get(name) or _auto_kind(module)
        if kind_name is None:
            continue
        kind = _KINDS[kind_name]
        missing = kind.missing(module) or _replaced(module)
        if name in requested and not missing:
            missing = _probe_mismatch(module, kind_name)
        if name in requested and missing:
            raise ValueError(f"{_API}: modules[{name!r}] = {kind_name!r}, but {name} {missing}; "
                             "remove the entry, or name a class that has it")
        if not missing and (name in requested or switches[kind.switch]):
            yield module, kind_name
