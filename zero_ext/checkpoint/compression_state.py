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

A checkpoint saved without compression (or with another method) loads with empty residuals.
"""

from __future__ import annotations

import dataclasses

import torch

from zero_ext import comm
from zero_ext.checkpoint.files import TensorEntry

__all__ = ["TOTAL_KINDS", "check", "entries", "layouts_metadata", "metadata", "restore",
           "totals"]

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
                       if any(_flat(fb, kind) is not None for fb in _feedback(engine).values())]}


def _flat(feedback, kind: str) -> torch.Tensor | None:
    if kind == "ef_total":
        return feedback.flat_total()
    momentum = getattr(feedback, "flat_momentum", None)
    return momentum() if momentum is not None else None


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
            flat = _flat(feedback, kind)
            if flat is None:
                continue
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


def check(engine, index, own_file: str | None, names: list[str]) -> str | None:
    """Before anything changes: a problem with what restore() would read, or None."""
    if not _feedback(engine) or own_file is None or not _exact_fits(engine, index, names):
        return None
    reader = index.reader(own_file)
    missing = sorted(_EXACT + key for key in engine.compression.tensors()
                     if _EXACT + key not in reader)
    return f"{own_file} lacks the compression state {missing[:4]}" if missing else None


@torch.no_grad()
def restore(engine, index, own_file: str | None, names: list[str]) -> str:
    """Sets the engine's compression state from the checkpoint; returns how: "exact",
    "resharded" or "empty" (the same on every rank: it depends only on the metadata)."""
    feedback = _feedback(engine)
    if not feedback:
        return "empty"
    compression = engine.compression
    compression.variance_settled = False  # the loaded optimizer's, found at the next step
    if own_file is not None and _exact_fits(engine, index, names):
        reader = index.reader(own_file)
        compression.load_tensors({key: reader.read(_EXACT + key).to(tensor.device)
                                  for key, tensor in compression.tensors().items()})
        return "exact"
    compression.reset()
    saved = index.metadata.get("compression")
    kinds = saved["totals"] if saved is not None else []
    if "ef_total" not in kinds:
        return "empty"
    # A parameter frozen when saved had no residual (loading.py's _unfrozen_since): zero.
    trained = {name for layout in index.layouts for name, _, _ in layout["slots"]}
    for layout in engine.layouts:
        fb = feedback.get(layout.index)
        if fb is None:
            continue
        flats = {}
        for kind in kinds:
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
    return "resharded"
