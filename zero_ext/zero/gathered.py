"""GatheredParameters: the full values of chosen parameters inside a `with` block, at any
stage and before initialize (zero_ext.Init), read-only or written by one rank for all.

The stage-3 gathers themselves are PartitionedParameters' (hold_layouts / scatter_modified,
through the engine); Init's are construction.py's. This module is the context's policy: what
counts as a change, which rank's values every rank keeps, and the one all-rank decision at exit
(a rank that raised inside, or changed what it only read, makes every rank raise).
"""

from __future__ import annotations

import torch
from torch import nn

from zero_ext import comm
from zero_ext.zero.construction import gather_init_params, release_init_params
from zero_ext.zero.params import _engine_of, _name_of, register_external_parameter

__all__ = ["GatheredParameters"]


class GatheredParameters:
    """`with zero_ext.GatheredParameters(params, modifier_rank=None, fwd_module=None,
    enabled=True):` (DeepSpeed's signature; `fwd_module`: the parameters are registered as
    external parameters of that module, see register_external_parameter) the full values of
    `params` inside, at any stage, and before initialize for a model built under zero_ext.Init
    (collective: every rank enters with the same parameters).

    With `modifier_rank=r`, what rank r changed inside is everyone's on exit: it is broadcast
    into every rank's parameters, stage-3 shards and fp32 master weights (or Init shards), and
    into the parameters an engine keeps whole without training them (frozen, or in no
    optimizer group). Parameters that neither an engine nor Init manages are left as they are.

    `param.data = tensor` inside (the loading idiom) writes the tensor's values into the
    parameter, as `param.data.copy_(tensor)` does, for the parameters an engine manages: the
    parameter keeps its storage (the unit's gathered buffer, a flat buffer) and the tensor
    must have its shape and dtype (another is an error at exit on every rank, the
    assignment dropped); without modifier_rank it is a change like any other (undone, and an
    error on every rank).
    """

    def __init__(self, params, modifier_rank: int | None = None,
                 fwd_module: nn.Module | None = None, enabled: bool = True):
        if isinstance(params, torch.Tensor) or params is None:
            params = [params]
        # None entries are passed over, as DeepSpeed's context passes over what it does not
        # manage (`[layer.weight, layer.bias]` of a layer without a bias).
        self.params = [p for p in params if p is not None] if enabled else []
        if fwd_module is not None:  # DeepSpeed's: `fwd_module`'s forward uses them from now on
            for param in self.params:
                register_external_parameter(fwd_module, param)
        self.modifier_rank = modifier_rank
        self._by_engine: dict = {}
        self._held: dict = {}  # per engine, the stage-3 units held open (PartitionedParameters)
        self._init_gathered: list[nn.Parameter] = []
        self._whole: list[nn.Parameter] = []  # untrained parameters of an engine's model
        self._before: dict = {}
        # The tensor each managed parameter points at on entry: for one not partitioned (a
        # view of its flat buffer, or its own) what a `.data =` inside is written back into;
        # partitioned ones go back to their unit's gathered buffer (PartitionedParameters).
        self._entered: list[tuple[nn.Parameter, torch.Tensor]] = []

    def __enter__(self):
        managed = []
        for param in self.params:
            engine = _engine_of(param)
            if engine is not None:
                self._by_engine.setdefault(engine, set()).add(param._zero_ext_layout)
                managed.append(param)
            elif _engine_of(param, "_zero_ext_whole") is not None:
                self._whole.append(param)
                managed.append(param)
        for engine, layouts in self._by_engine.items():
            self._held[engine] = engine.hold_layouts(layouts)
        self._entered = [(p, p.data) for p in managed]
        if self.modifier_rank is None:
            # No rank may change them: a change is found at exit (the version counter, and the
            # values: a copy of whole-kept ones, which no release would discard, a fingerprint
            # of partitioned ones; see _snapshot) and undone.
            self._before = {id(p): _snapshot(p) for p in managed}
        self._init_gathered = gather_init_params(self.params)
        # Gathered from zero_ext.Init's shards (before initialize): checked as partitioned ones
        # are, their release undoing any change a read-only context refuses.
        self._entered += [(p, p.data) for p in self._init_gathered]
        if self.modifier_rank is None:
            self._before.update({id(p): (p, p._version, _fingerprint(p))
                                 for p in self._init_gathered})
        _open_contexts.append(self)
        return self

    def __exit__(self, *exc):
        _open_contexts.remove(self)
        raised = exc[0] is not None
        # `.data =` assignments are taken back on every rank, before anything is compared or
        # broadcast; with a modifier rank, their values written where the parameter's live.
        assigned = self._take_back_assignments()
        if self.modifier_rank is None:
            changed = [f"{name} (`.data =` {misfit or 'a tensor'})" for name, misfit in assigned]
            changed += [name for name in self._undo_changes()
                        if name not in {n for n, _ in assigned}]
        else:  # every rank raises after the broadcast
            changed = [f"{name}: {misfit}" for name, misfit in assigned if misfit is not None]
        views = [(raised, changed)]
        collective = bool(self._by_engine or self._whole or self._init_gathered)
        broken = _broken_group(exc[0])
        if collective and not broken:
            # Every rank learns whether another raised inside (no broadcast then waits for
            # a rank that left) or changed what it only read: one all-reduce of two flags,
            # and the details only when there are some.
            views = _exchange(raised, changed)
        failed = [rank for rank, (r, _) in enumerate(views) if r]
        modifier = self.modifier_rank
        if modifier is not None and (broken or modifier in failed):
            # Every rank keeps the same values: the modifier's where it got through the
            # context, else those of the first rank that did (none: no broadcast at all).
            survivors = [] if broken else [r for r in range(len(views)) if r not in failed]
            modifier = survivors[0] if survivors else None
        for engine, layouts in self._by_engine.items():
            if modifier is not None:
                engine.scatter_modified(layouts, modifier)
            engine.unhold_layouts(self._held[engine])
        if modifier is not None:
            with torch.no_grad():
                for param in self._whole:  # in the caller's order, the same on every rank
                    comm.broadcast(param.data, src=modifier)
            # An enclosing read-only context takes these values as its own starting point:
            # the change was made the way that keeps it, on every rank alike.
            for outer in _open_contexts:
                for param in self.params:
                    if id(param) in outer._before:
                        outer._before[id(param)] = _snapshot(param)
        release_init_params(self._init_gathered, modifier)
        if raised:
            return False
        if failed:
            kept = "" if modifier is None else f"; every rank kept rank {modifier}'s values"
            raise RuntimeError(
                f"zero_ext.GatheredParameters: rank {failed[0]} raised inside the context (its "
                f"error says why), so this rank raises too{kept}")
        if any(c for _, c in views):
            detail = "; ".join(f"rank {r}: {', '.join(c)}" for r, (_, c) in enumerate(views)
                               if c)
            if self.modifier_rank is not None:
                raise RuntimeError(
                    "zero_ext.GatheredParameters: `param.data = tensor` with a tensor of another "
                    f"shape or dtype than the parameter's ({detail}); a parameter's shape and "
                    "dtype are fixed by the buffers zero_ext keeps it in, so the assignment is "
                    f"dropped on every rank (the rest of rank {modifier}'s changes are kept). "
                    "Assign a tensor of the parameter's shape and dtype "
                    "(`param.data.copy_(tensor)` converts the dtype), or give the model its new "
                    "shapes before initialize")
            raise RuntimeError(
                "zero_ext.GatheredParameters: parameters were changed inside "
                f"GatheredParameters(modifier_rank=None) ({detail}); the change is undone on "
                "every rank. Pass modifier_rank=<the rank whose values to keep> to keep it")
        return False

    @torch.no_grad()
    def _take_back_assignments(self) -> list[tuple[str, str | None]]:
        """Points each managed parameter given another tensor inside (`param.data = tensor`)
        back at the storage its engine keeps its values in; with a modifier rank, the tensor's
        values are written there when it has the parameter's shape and dtype (every rank does:
        the broadcast then gives all the modifier's). Returns, per parameter assigned to, its
        name and, for a tensor of another shape or dtype, what was assigned to what."""
        assigned = []
        for param, entered in self._entered:
            home = _engine_of(param).partitioned.gathered_view(param) \
                if _is_partitioned(param) else entered
            current = param.data
            # (Read-only: an assignment made before entering, in an enclosing context, is that
            # context's to judge.)
            if home is None or _same_view(current, home) or \
                    (self.modifier_rank is None and _same_view(current, entered)):
                continue
            param.data = home
            misfit = None
            if current.shape != home.shape or current.dtype != home.dtype:
                misfit = f"{current.dtype} {tuple(current.shape)} for {home.dtype} " \
                    f"{tuple(home.shape)}"
            elif self.modifier_rank is not None:
                home.copy_(current)
            assigned.append((_name_of(param), misfit))
        return assigned

    def _undo_changes(self) -> list[str]:
        changed = []
        with torch.no_grad():
            for param, version, values in self._before.values():
                if isinstance(values, tuple):  # partitioned: a fingerprint; the release
                    if param._version == version and _fingerprint(param) == values:
                        continue                   # discards the change
                    changed.append(_name_of(param))
                    continue
                if param._version == version and (values is None or torch.equal(param, values)):
                    continue
                changed.append(_name_of(param))
                if values is not None:
                    param.copy_(values)
        return changed


_open_contexts: list[GatheredParameters] = []  # entered and not exited, innermost last


def _exchange(raised: bool, changed: list[str]) -> list[tuple[bool, list[str]]]:
    """Every rank's (raised, changed) in rank order: one all-reduce of two flags when no rank
    raised or changed anything (then every rank's is (False, [])), else gathered."""
    device = torch.device("cuda", torch.cuda.current_device()) \
        if comm.backend() == "nccl" else torch.device("cpu")
    flags = torch.tensor([float(raised), float(bool(changed))], device=device)
    comm.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    if not bool(flags.any()):
        return [(False, [])] * comm.world_size()
    return comm.all_gather_object((raised, changed))


def _broken_group(error_type) -> bool:
    """Whether an error says the process group itself failed (a collective stalled): no
    further collective could complete."""
    from zero_ext.comm.watch import CollectiveStallError

    return error_type is not None and issubclass(error_type, CollectiveStallError)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same elements of the same storage."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() \
        and a.dtype == b.dtype and a.device == b.device


def _snapshot(param: torch.Tensor) -> tuple:
    """What a read-only GatheredParameters compares at exit: the version counter (which
    writes through `param.data` do not move), and the values: of a parameter kept whole, a
    copy (to undo a change); of a partitioned one, whose release discards any change, a
    fingerprint of its gathered values (no copy of the whole parameter)."""
    if not _is_partitioned(param):
        return param, param._version, param.detach().clone()
    return param, param._version, _fingerprint(param)


def _fingerprint(tensor: torch.Tensor, chunk: int = 1 << 22) -> tuple[int, int]:
    """Two sums over a tensor's bits (as 32-bit words, or bytes): any write of other values
    changes them but for a vanishing chance. In chunks, so the int64 temporaries stay small."""
    flat = tensor.detach().reshape(-1)
    try:
        words = flat.view(torch.int32)
    except RuntimeError:  # a size or offset not a multiple of 4 bytes
        words = flat.view(torch.uint8)
    total = squares = 0
    for start in range(0, words.numel(), chunk):
        part = words[start:start + chunk].to(torch.int64)
        total += int(part.sum())
        squares += int((part * part).sum())
    return total, squares


def _is_partitioned(param: torch.Tensor) -> bool:
    engine = _engine_of(param)
    return engine is not None and engine.partitioned is not None and \
        engine.partitioned.owns(param._zero_ext_layout)
