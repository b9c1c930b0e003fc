"""How a fused forward stands in for a module's: what every swap of ``zero_ext.fused.apply``
shares.

apply() (zero_ext/fused/apply.py) decides which modules take which kind; the forwards it
installs live beside the ops they call (apply.py for the MLPs and the loss, blocks.py for the
norms and the residual add in a decoder block). All of them go through this module for: the
transformers classes apply() recognises by itself, the guards a call passes before a kernel takes
it (else the module's own forward runs), the check that no other wrapper replaced a forward
first, the installing itself, and the signatures of the forwards a fused one binds its
arguments to, read once per function.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from zero_ext._plain_forward import forward_is_plain, wrap_forward

_API = "zero_ext.fused.apply"

_FUSED = "_zero_ext_fused"                   # instance attribute: the kind a module was given

# transformers' classes apply() recognises by itself (the families whose math it reproduces).
_LLAMA_FAMILY = ("Llama", "Mistral", "Qwen2", "Qwen3")
_AUTO_KINDS = {
    **{f"{family}RMSNorm": "rms_norm" for family in _LLAMA_FAMILY},
    **{f"{family}MLP": "swiglu_mlp" for family in _LLAMA_FAMILY},
    **{f"{family}ForCausalLM": "causal_lm" for family in _LLAMA_FAMILY},
    **{f"{family}DecoderLayer": "decoder_layer" for family in _LLAMA_FAMILY},
    "GPT2Block": "gpt2_block",
    "GPT2MLP": "bias_gelu_mlp",
    "GPT2LMHeadModel": "causal_lm",
}


def _is_hf(obj, *names: str) -> bool:
    """Whether ``obj`` is an instance of one of transformers' classes ``names`` (by name and
    package, so that transformers stays optional here)."""
    cls = type(obj)
    return cls.__name__ in names and cls.__module__.startswith("transformers.")


def _auto_kind(module: nn.Module) -> str | None:
    """The kind apply() gives ``module`` by itself (its switch on), None for other classes."""
    if type(module) is nn.LayerNorm and module.elementwise_affine:
        return "layer_norm"
    return _AUTO_KINDS.get(type(module).__name__) if _is_hf(module, *_AUTO_KINDS) else None


# -- call-time guards ------------------------------------------------------------------------

def _has_kernel(op: str, device_type: str) -> bool:
    """Whether zero_ext was built with ``op``'s kernel for this device type (the CPU build has
    no CUDA kernels). A dispatcher table lookup,
    cheap enough per call and traceable by torch.compile."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"zero_ext::{op}", device_type.upper())


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _device_takes(x: Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether the kernels take ``x``'s dtype on its device: one of ``dtypes``, and fp64 only on
    the CPU (the CUDA kernels are fp32 / bf16 / fp16; fp64 is for gradcheck)."""
    return x.dtype in dtypes and not (x.dtype == torch.float64 and x.device.type != "cpu")


def _runs(op: str, x: Tensor, *params: Tensor | None) -> bool:
    """Whether ``op`` takes ``x`` with ``params`` as they come: its kernel exists on x's device
    for x's dtype, the parameters share x's dtype (the kernels take one dtype), and autocast is
    off (the ops have no autocast rules; the module's own forward knows what autocast should
    do)."""
    return (_device_takes(x, _KERNEL_DTYPES) and _has_kernel(op, x.device.type)
            and not torch.is_autocast_enabled(x.device.type)
            and all(p is None or p.dtype == x.dtype for p in params))


def _single_input(args: tuple, kwargs: dict) -> Tensor | None:
    """The input tensor of a call ``module(x)``; None for any other call (then the module's own
    forward runs, whatever its other arguments mean)."""
    return args[0] if len(args) == 1 and not kwargs and isinstance(args[0], Tensor) else None


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
    forward.fused = fused  # what _installed_forward reads
    setattr(module, _FUSED, kind)
    wrap_forward(module, types.MethodType(forward, module))


def _installed_forward(module: nn.Module) -> Callable | None:
    """The fused forward :func:`_install` put on ``module``, if its forward is still that one
    (not wrapped since by something else)."""
    return getattr(getattr(module.forward, "__func__", None), "fused", None)


# -- the signatures fused forwards bind their calls to ---------------------------------------

@dataclasses.dataclass(frozen=True)
class _CallShape:
    """What a fused forward reads of its fallback's signature. inspect.signature of
    transformers' decorated forwards costs ~50 us, binding ~12 us: a step's forward paid both."""

    signature: inspect.Signature
    named: frozenset[str]         # the parameters a keyword argument binds to by its name
    var_keyword: str | None       # the ``**kwargs`` parameter, which takes the other keywords
    positional: tuple[str, ...]   # the parameters positional arguments fill, in order
    defaults: types.MappingProxyType  # the named parameters' defaults


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
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    shape = _CallShape(
        signature,
        frozenset(p.name for p in params if p.kind in kinds),
        next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None),
        tuple(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)),
        types.MappingProxyType({p.name: p.default for p in params
                                if p.kind in kinds and p.default is not p.empty}))
    try:
        _CALL_SHAPES[key] = shape
    except TypeError:
        pass
    return shape


def _named_arguments(forward: Callable, args: tuple, kwargs: dict) -> dict | None:
    """The call ``forward(*args, **kwargs)`` as one dict, parameter name -> value, the
    parameters not given at their defaults (what the forward's body would see), other keywords
    as given; None for a call that would not bind (positional arguments past the named
    parameters, one given twice, an unknown keyword): the forward itself then takes it, and
    raises what it raises."""
    shape = _call_shape(forward)
    if len(args) > len(shape.positional) or any(n in kwargs for n in shape.positional[:len(args)]):
        return None
    if shape.var_keyword is None and not shape.named.issuperset(kwargs):
        return None
    return {**shape.defaults, **dict(zip(shape.positional, args)), **kwargs}
