"""Stage 3's leaf modules: gathered whole, never split into units, their backward over once
their inputs' gradients are computed.

A mixture of experts runs only the experts its tokens were routed to, and the routing differs
between ranks. Were its experts units of their own, a rank would gather the experts its tokens
chose and another rank others: different collectives, a stall or a crash. Marked as a leaf,
the block's parameters are gathered together around it on every rank; its experts that got no
gradient on a rank count as zero there once the block's backward is over, so every rank reduces
the same buckets at the same point of backward (DeepSpeed's leaf modules, the same way).

A module is a leaf when its `_z3_leaf` attribute is true (set by `set_z3_leaf_modules` here or
by DeepSpeed's `deepspeed.utils.set_z3_leaf_modules`, which sets the same attribute) or when
`zero_optimization.leaf_module` names it (`mark_configured_leaves`, applied when the units are
planned, as DeepSpeed applies it at initialize).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

from zero_ext.config import DEEPSPEED_LEAF_MODULE_CLASSES, LeafModuleConfig

__all__ = ["enclosing_leaves", "is_leaf", "leaf_parameters", "mark_configured_leaves",
           "outermost_leaves", "set_z3_leaf_modules"]


def is_leaf(module: nn.Module) -> bool:
    return bool(getattr(module, "_z3_leaf", False))


def enclosing_leaves(model: nn.Module) -> dict[int, nn.Module]:
    """id of every module inside a leaf (the leaf itself included) -> the outermost leaf
    holding it: where a hook must sit to run on every rank (an expert inside runs on some)."""
    outer: dict[int, nn.Module] = {}
    for module in model.modules():  # parents before their children
        if is_leaf(module) and id(module) not in outer:
            for inner in module.modules():
                outer[id(inner)] = module
    return outer


def outermost_leaves(model: nn.Module) -> list[nn.Module]:
    """The leaves not inside another leaf."""
    return list({id(leaf): leaf for leaf in enclosing_leaves(model).values()}.values())


def leaf_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the model's leaves: a gradient none of them got on a rank
    (an expert without a token) counts as zero, as DeepSpeed gives them zeros."""
    return list({id(p): p for leaf in outermost_leaves(model) for p in leaf.parameters()
                 if p.requires_grad}.values())


def _qualified_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _of_classes(module: nn.Module, classes: Iterable[type | str]) -> bool:
    return any(isinstance(module, c) if isinstance(c, type)
               else c in (type(module).__name__, _qualified_name(module)) for c in classes)


def set_z3_leaf_modules(model: nn.Module, leaf_module_classes: list[type | str],
                        raise_if_not_found: bool = True) -> list[nn.Module]:
    """Marks every module of `model` that is an instance of one of `leaf_module_classes`
    (classes, or class names plain or with their module) as a stage-3 leaf, and returns them:
    DeepSpeed's function of the same name and meaning (it sets the same attribute, so either
    one's marks count). Call it before zero_ext.initialize. A mixture-of-experts block whose
    experts run only where tokens are routed must be a leaf at stage 3."""
    if not isinstance(leaf_module_classes, (list, tuple, set)) or not all(
            isinstance(c, (type, str)) for c in leaf_module_classes):
        raise TypeError(f"zero_ext.set_z3_leaf_modules: expected a list of module classes or "
                        f"class names, got {leaf_module_classes!r}")
    found = [m for m in model.modules() if _of_classes(m, leaf_module_classes)]
    if not found and raise_if_not_found:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"zero_ext.set_z3_leaf_modules: no module of {leaf_module_classes} in "
                         f"the model; its classes are {present}")
    for module in found:
        module._z3_leaf = True
    return found


def mark_configured_leaves(model: nn.Module, config: LeafModuleConfig) -> list[nn.Module]:
    """Marks the modules `zero_optimization.leaf_module` names as leaves, as DeepSpeed does
    at initialize; entries matching no module are warned about, but DeepSpeed's default
    classes (transformers' MoE blocks, absent from most models)."""
    named = list(model.named_modules())
    by_class = [m for _, m in named if _of_classes(m, config.classes)]
    by_name = [m for n, m in named if n in config.names]
    by_suffix = [m for n, m in named if n and any(n.endswith(s) for s in config.name_suffixes)]
    unmatched = [c for c in config.classes if c not in DEEPSPEED_LEAF_MODULE_CLASSES
                 and not any(_of_classes(m, [c]) for _, m in named)]
    unmatched += [n for n in config.names if n not in dict(named)]
    unmatched += [s for s in config.name_suffixes
                  if not any(n and n.endswith(s) for n, _ in named)]
    if unmatched:
        warnings.warn(f"zero_optimization.leaf_module: {unmatched} match no module of the "
                      "model and mark nothing; check the class and module names (print(model) "
                      "shows them)", stacklevel=3)
    for module in by_class + by_name + by_suffix:
        module._z3_leaf = True
    return by_class + by_name + by_suffix
