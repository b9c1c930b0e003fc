"""Compressed communication's state in checkpoints: error-feedback residuals and top-k momentum
(zero_ext/zero/compression.py), saved so a resumed run goes on as if never interrupted, and
resharded when it resumes at another world size.

Each rank's residuals say what it has not yet delivered of the gradients it sent: they are
per rank, not a shard of anything, and their layout depends on the world size and the nodes
(which chunks a rank quantizes, the second hop's partial sums). So a checkpoint holds them
twice:

  exact    every rank's own tensors, as they are (fp8 residuals, scales, fp32 top-k state),
           in its shard file under "compression.<bucket>.<name>". Loaded when the world size,
           the nodes, the buckets and the compression plan are all the same: the resumed run
           is the uninterrupted one, bit for bit.
  totals   the sum over ranks of what they hold, in the bucket's flat coordinates, divided by
           the loss scale it was stored at ("<bucket>.ef_total"; top-k's momentum as
           "<bucket>.ef_momentum"), saved as a shard like the master weights (one
           reduce-scatter at save). At any other world size, nodes or bucket layout each rank
           reads the whole bucket's total by parameter name and takes its share
           (feedback.from_flat_total): no residual mass is lost or counted twice, though which
           rank carries which part changes. 4 bytes per parameter over the whole checkpoint.

A checkpoint saved without error feedback loads with empty residuals. One saved with another
method (int8 <-> int4 <-> top-k) is resharded from its totals: a residual is undelivered gradient
in the bucket's flat coordinates whatever method made it, so this engine's feedback takes it as
at another world size. What this engine has no place for (top-k's momentum under int8 / int4
or top-k without momentum; every residual when it keeps no error feedback) is dropped, and the
load says so once (`plan`, before anything is written: the same on every rank).
"""

from __future__ import annotations

import dataclasses

import torch

from zero_ext import comm
from zero_ext.checkpoint.files import TensorEntry
from zero_ext.checkpoint.format import CheckpointError

__all__ = ["TOTAL_KINDS", "Restore", "entries", "layouts_metadata", "metadata", "plan",
           "restore", "totals"]

TOTAL_KINDS = ("ef_total", "ef_momentum")
_EXACT = "compression."


def _feedback(engine) -> dict:
    compression = getattr(engine, "compression", None)
    return compression.feedback if compression is not None else {}


def metadata(engine) -> dict | None:
    """What decides whether the exact state fits an engine: the plan, the world size and the
    nodes (two-hop residuals depend on them). None when nothing is kept."""
    if not _feedback(engine):
        return None
    return {"plan": dataclasses.asdict(engine.compression.plan),
            "world_size": engine.world_size,
            "nodes": list(comm.current_topology().node_of_rank),
            "totals": [kind for kind in TOTAL_KINDS
                       if any(_keeps(fb, kind) for fb in _feedback(engine).values())]}


def _keeps(feedback, kind: str) -> bool:
    """Whether `feedback` holds state of total `kind`: every feedback a residual, top-k with a
    momentum (DGC's; momentum 0 keeps none) its momentum."""
    return kind == "ef_total" or getattr(feedback, "momentum", None) is not None


def _flat(feedback, kind: str) -> torch.Tensor:
    return feedback.flat_total() if kind == "ef_total" else feedback.flat_momentum()


def totals(engine) -> dict[str, torch.Tensor]:
    """Collective (every rank, the same buckets): "<bucket>.<kind>" -> this rank's shard of the
    sum over ranks of every rank's residual mass (and momentum) in the bucket's flat
    coordinates, in loss-scale-free units (fp32)."""
    out = {}
    compression = getattr(engine, "compression", None)
    for layout in engine.layouts:
        feedback = _feedback(engine).get(layout.index)
        if feedback is None:
            continue
        scale = compression.residual_loss_scale.get(layout.index, 1.0)
        for kind in TOTAL_KINDS:
            if not _keeps(feedback, kind):
                continue
            flat = _flat(feedback, kind)
            shard = torch.empty(layout.shard_numel, dtype=torch.float32, device=flat.device)
            comm.reduce_scatter(shard, (flat.float() / scale).contiguous(), bucket=layout.index)
            out[f"{layout.index}.{kind}"] = shard.cpu()
    return out


def entries(engine, shard_totals: dict[str, torch.Tensor]) -> list[TensorEntry]:
    """This rank's shard-file tensors: its exact state and its shards of the totals."""
    compression = getattr(engine, "compression", None)
    state = compression.tensors() if compression is not None else {}
    out = [TensorEntry(_EXACT + key, t.dtype, tuple(t.shape),
                       lambda t=t: t.detach().cpu()) for key, t in state.items()]
    out += [TensorEntry(key, t.dtype, tuple(t.shape), lambda t=t: t)
            for key, t in shard_totals.items()]
    return out


def _exact_fits(engine, index, names: list[str]) -> bool:
    """Whether the saved exact state is this engine's: same plan, world size, nodes and
    buckets (parameter by parameter)."""
    saved, mine = index.metadata.get("compression"), metadata(engine)
    return saved is not None and mine is not None and all(
        saved[key] == mine[key] for key in ("plan", "world_size", "nodes")) \
        and index.metadata["layouts"] == layouts_metadata(engine, names)


def layouts_metadata(engine, names: list[str]) -> list[dict]:
    """The buckets as checkpoint metadata records them (parameters by name, offsets)."""
    return [{"index": layout.index, "group": layout.group, "padded_numel": layout.padded_numel,
             "slots": [[names[s.param_index], s.offset, list(s.shape)] for s in layout.slots]}
            for layout in engine.layouts]


def _method(plan: dict | None) -> str:
    """A compression plan (metadata's, or an engine's as a dict) as the load's warning names it."""
    method = (plan or {}).get("gradients", "none")
    if method == "topk":
        return f"top-k (momentum {plan.get('momentum', 0.0)})"
    if method in ("int8", "int4"):
        return f"{method} {'with' if plan.get('error_feedback') else 'without'} error feedback"
    return "no gradient compression"


@dataclasses.dataclass(frozen=True)
class Restore:
    """How restore() sets the engine's compression state: decided by plan() from the
    checkpoint's metadata and this engine alone (the same on every rank), every file it reads
    verified, before the load writes anything."""

    how: str                        # "exact", "resharded" or "empty"
    kinds: tuple[str, ...] = ()     # the totals read ("resharded")
    dropped: str | None = None      # saved state this engine has no place for (warned)


def plan(engine, index, own_file: str | None, names: list[str]) -> Restore:
    """What restore() will do, checked: the exact state in `own_file` (present, in its
    shapes), or the totals of every bucket in every shard file that holds them (verified
    against the manifest). Raises CheckpointError naming what is missing."""
    feedback = _feedback(engine)
    saved = index.metadata.get("compression")
    saved_kinds = [kind for kind in (saved or {}).get("totals", []) if kind in TOTAL_KINDS]
    compression = getattr(engine, "compression", None)
    mine = _method(dataclasses.asdict(compression.plan) if compression is not None else None)
    if not feedback:
        dropped = None
        if "ef_total" in saved_kinds:
            dropped = (f"its error-feedback residuals (the gradient not yet delivered when it "
                       f"was saved, with {_method(saved['plan'])}): this engine keeps none "
                       f"({mine}{' on one rank' if engine.world_size == 1 else ''})")
        return Restore("empty", dropped=dropped)
    if own_file is not None and _exact_fits(engine, index, names):
        reader = index.reader(own_file)
        live = engine.compression.tensors()
        missing = sorted(_EXACT + key for key in live if _EXACT + key not in reader)
        if missing:
            raise CheckpointError(f"{index.path}/{own_file} lacks the compression state "
                                  f"{missing[:4]}")
        shapes = [f"{key}: {tuple(reader.shape(_EXACT + key))} there, {tuple(t.shape)} here"
                  for key, t in live.items() if tuple(reader.shape(_EXACT + key)) != t.shape]
        if shapes:
            raise CheckpointError(f"{index.path}/{own_file}: the compression state has other "
                                  f"shapes than this engine's ({shapes[:4]})")
        return Restore("exact")
    if "ef_total" not in saved_kinds:
        return Restore("empty")
    kinds = tuple(kind for kind in saved_kinds
                  if any(_keeps(fb, kind) for fb in feedback.values()))
    dropped = None
    if "ef_momentum" in saved_kinds and "ef_momentum" not in kinds:
        dropped = (f"its top-k momentum (saved with {_method(saved['plan'])}): this engine runs "
                   f"{mine}, which keeps no momentum; the residuals (undelivered gradient) "
                   f"are kept")
    # Every rank reads the whole bucket's totals, from every shard that holds a piece of them.
    pieces = {(file, tensor) for name in _resharded_names(engine, index, names)
              for file, tensor, _, _ in index.pieces(name, 0, index.numel(name))}
    index.verify_files(sorted({file for file, _ in pieces}))
    for file, tensor in sorted(pieces):
        absent = [f"{tensor}.{kind}" for kind in kinds
                  if f"{tensor}.{kind}" not in index.reader(file)]
        if absent:
            raise CheckpointError(f"{index.path}/{file} lacks the compression totals "
                                  f"{absent} its metadata lists")
    return Restore("resharded", kinds, dropped)


def _resharded_names(engine, index, names: list[str]) -> list[str]:
    """The parameters whose totals the resharded path reads: those in this engine's buckets
    with feedback that trained when saved (one frozen then had no residual: zero)."""
    trained = {name for layout in index.layouts for name, _, _ in layout["slots"]}
    feedback = _feedback(engine)
    return [names[slot.param_index] for layout in engine.layouts if layout.index in feedback
            for slot in layout.slots if names[slot.param_index] in trained]


@torch.no_grad()
def restore(engine, index, own_file: str | None, names: list[str], how: Restore) -> None:
    """Sets the engine's compression state from the checkpoint as plan() decided (how.how:
    "exact", "resharded" or "empty", the same on every rank)."""
    feedback = _feedback(engine)
    if not feedback:
        return
    compression = engine.compression
    compression.variance_settled = False  # the loaded optimizer's, found at the next step
    if how.how == "exact":
        reader = index.reader(own_file)
        compression.load_tensors({key: reader.read(_EXACT + key).to(tensor.device)
                                  for key, tensor in compression.tensors().items()})
        return
    compression.reset()
    if how.how == "empty":
        return
    # A parameter frozen when saved had no residual (loading.py's _unfrozen_since): zero.
    trained = set(_resharded_names(engine, index, names))
    for layout in engine.layouts:
        fb = feedback.get(layout.index)
        if fb is None:
            continue
        flats = {}
        for kind in how.kinds:
            if not _keeps(fb, kind):
                continue
            flat = torch.zeros(layout.padded_numel, dtype=torch.float32)
            for slot in layout.slots:
                if names[slot.param_index] not in trained:
                    continue
                index.read_into(kind, names[slot.param_index], 0,
                                flat[slot.offset:slot.offset + slot.numel])
            flats[kind] = flat
        extra = {"momentum": flats["ef_momentum"]} if "ef_momentum" in flats else {}
        fb.from_flat_total(flats["ef_total"], engine.world_size, **extra)
        # Loss-scale-free units: the next reduction rescales them to its scale.
        compression.residual_loss_scale[layout.index] = 1.0
