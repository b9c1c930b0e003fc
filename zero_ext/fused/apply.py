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
* ``residual_norm`` (with the norms): their decoder layers and GPT-2's blocks without
  cross-attention, whose residual add before the norm after the attention becomes part of that
  norm's pass (:func:`rms_norm` / :func:`layer_norm` with ``residual=``; blocks.py);
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
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zero_ext._plain_forward import plain_forward
from zero_ext.fused.activations import bias_gelu, swiglu
from zero_ext.fused.attention import ATTENTION_NAME, use_fused_softmax
from zero_ext.fused.blocks import (
    _BLOCKS,
    _block_forward,
    _block_missing,
    _eps,
    _layer_norm_forward,
    _norm_missing,
    _rms_norm_forward,
)
from zero_ext.fused.cross_entropy import linear_cross_entropy
from zero_ext.fused.swap import (
    _API,
    _FUSED,
    _auto_kind,
    _call_shape,
    _device_takes,
    _has_kernel,
    _install,
    _is_hf,
    _replaced,
    _runs,
    _single_input,
)

__all__ = ["COUNT_KEYS", "MODULE_KINDS", "apply"]

COUNT_KEYS = ("cross_entropy", "rms_norm", "layer_norm", "swiglu", "bias_gelu", "softmax",
              "residual_norm")
"""The keys of :func:`apply`'s result: modules swapped per fused op."""

_TARGET = "_zero_ext_target"                 # lm_head attribute during a fused loss forward
_HEAD = "lm_head"                            # the kind marker of a causal LM's head


# -- MLPs ------------------------------------------------------------------------------------

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


# The fused cross-entropy's dtypes (fp16 has no kernel: an fp16 model keeps its own loss).
_HEAD_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _fusable_head(model: nn.Module) -> bool:
    """Whether the model's head is still the plain Linear apply() gave the loss to (not wrapped
    since, e.g. by a LoRA layer) and its device has the kernel for its dtype. Decided before
    the labels are taken from the call: after, the model's own loss cannot run any more."""
    head = model._modules.get("lm_head")
    return type(head) is nn.Linear and head.__dict__.get(_FUSED) == _HEAD and \
        _device_takes(head.weight, _HEAD_DTYPES) and \
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
    # None). A tuple (return_dict=False) thus reads (loss, ...): None goes in where the logits
    # were, so every later entry keeps its place ((loss, logits, past_key_values, ...), as
    # Liger-Kernel's fused forwards return it); an output object keeps its type, with the loss
    # and without logits.
    if isinstance(output, tuple):
        return (output[0], None, *output[1:])
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
    # Not nameable in modules=: the block's forward is rewritten, which no probe can check.
    **{name: _Kind("residual_norm", "norms", functools.partial(_block_missing, block=block),
                   _block_forward) for name, block in _BLOCKS.items()},
}
MODULE_KINDS = tuple(kind for kind in _KINDS if kind not in _BLOCKS)
"""The kinds ``modules=`` (and the config's ``zero_ext.fused_kernels.modules``) may name."""


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
        cuda = [first.device] if first.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            # The same dropout mask in both, from the generators forked here only
            # (torch.manual_seed would also reseed every other CUDA device, for good)
            torch.default_generator.manual_seed(0)
            for device in cuda:
                index = device.index if device.index is not None else torch.cuda.current_device()
                torch.cuda.default_generators[index].manual_seed(0)
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
