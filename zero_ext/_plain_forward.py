"""The forward that computes a module's own math, for the parts of zero_ext that replace forwards.

Two parts of zero_ext put forwards on module instances: ``zero_ext.fused.apply`` wraps a module
in a fused forward that falls back to the module's own for what its kernel does not take, and
stage 3 (``zero_ext.zero.params``) gives each plain ``nn.Linear`` a forward that computes the
same product but lets the release free the weight. Either may come first (the config switch
applies the fused kernels before the engine exists; a user may apply them after). Each goes
through this module instead of knowing the other's attributes:

* a wrapper installs itself with :func:`wrap_forward`; what it falls back to is
  :func:`plain_forward`;
* a substitute that computes the same as the plain forward goes in with
  :func:`replace_plain_forward`: under a wrapper it becomes the wrapper's fallback, otherwise the
  forward itself; :func:`forward_is_plain` still holds after it, so a later wrapper wraps it.

Anything else that replaced ``forward`` on the instance (a LoRA shim, a checkpointing wrapper)
is foreign: :func:`forward_is_plain` is false, and :func:`plain_forward` returns it as the best
guess at the module's own.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["forward_is_plain", "plain_forward", "replace_plain_forward", "wrap_forward"]

# Instance attribute: the plain forward (a bound method) once wrap_forward or
# replace_plain_forward has set one. copy.deepcopy copies it with the instance, and keeps it the
# same object as the instance's forward where it was (forward_is_plain's identity test).
_PLAIN = "_zero_ext_plain_forward"


def plain_forward(module: nn.Module) -> Callable:
    """The forward that computes ``module``'s own math: the one registered under a wrapper or
    substituted, else whatever ``module.forward`` is."""
    plain = module.__dict__.get(_PLAIN)
    return module.forward if plain is None else plain


def forward_is_plain(module: nn.Module) -> bool:
    """Whether ``module.forward`` is its plain forward: the class's, or a substitute put in by
    :func:`replace_plain_forward` (not a wrapper, not a forward replaced by anything else)."""
    forward = module.__dict__.get("forward")
    return forward is None or forward is module.__dict__.get(_PLAIN)


def wrap_forward(module: nn.Module, wrapper: Callable) -> None:
    """Makes ``wrapper`` (bound to ``module``) its forward; the forward it had stays
    :func:`plain_forward`. The caller checks :func:`forward_is_plain` first: wrapping a foreign
    forward would make that the fallback."""
    module.__dict__[_PLAIN] = module.forward
    module.forward = wrapper


def replace_plain_forward(module: nn.Module, forward: Callable) -> None:
    """Makes ``forward`` (bound to ``module``, computing what its plain forward computes) the
    plain forward: a wrapper's fallback where :func:`wrap_forward` put one, else the forward."""
    if not forward_is_plain(module) and _PLAIN in module.__dict__:
        module.__dict__[_PLAIN] = forward
        return
    module.forward = forward
    module.__dict__[_PLAIN] = forward
