"""What each rank runs in tests/test_compression_checkpoint.py: compressed-communication state
(error-feedback residuals, top-k residual and momentum) saved, resumed at the same world size
and resharded to another.

Phase "save" runs at 4 ranks: per case, 3 steps, a checkpoint (with the sum over ranks of the
residual mass at the save) and 3 more steps, the uninterrupted run (the reference). Phase "resume" loads
at 4 ranks in new processes and trains steps 3-5; phase "reshard" loads at 2 ranks. The data
of a step is the same global batch at any world size (checkpoint_cases.train_split).
"""

from __future__ import annotations

import os

import torch
from hierarchy_cases import simulate_nodes

from zero_ext import comm

from checkpoint_cases import new_engine, reshard_config, train_split
from engine_cases import host_params

# name -> (stage, zero_ext.compression, simulated ranks per node at the save, or None)
CASES = {
    "int4_ef_stage2": (2, {"gradients": {"method": "int4", "error_feedback": True,
                                         "block_size": 16}}, None),
    "topk_momentum_stage1": (1, {"gradients": {"method": "topk", "density": 0.1,
                                               "momentum": 0.9}}, None),
    "topk_stage0": (0, {"gradients": {"method": "topk", "density": 0.1, "momentum": 0.0}},
                    None),
    # Adam's momentum sent (2 dense steps, then sparse): the save follows one carried step.
    "topk_compressed_momentum_stage2": (2, {"gradients": {
        "method": "topk", "density": 0.1, "warmup_steps": 2, "freeze_variance": True,
        "compress_momentum": True}}, None),
    # Last: two simulated nodes (two-hop residuals), stage 3 with quantized weights too.
    "int8_ef_stage3_two_nodes": (3, {"gradients": {"method": "int8", "error_feedback": True,
                                                   "block_size": 16},
                                     "weights": {"method": "int8", "block_size": 16}}, 2),
}


def _config(case: str) -> dict:
    stage, compression, _ = CASES[case]
    cfg = reshard_config((comm.world_size(), stage, False))
    cfg["zero_ext"] = {"compression": compression}
    return cfg


def _nodes(case: str, at_save_size: bool) -> None:
    """The simulated nodes of the case at its save world size; one node otherwise."""
    per_node = CASES[case][2]
    if per_node is not None and at_save_size:
        simulate_nodes(per_node)
    else:
        os.environ.pop("GROUP_RANK", None)
        os.environ.update(LOCAL_WORLD_SIZE=str(comm.world_size()), LOCAL_RANK=str(comm.rank()))
        comm.detect_topology()


def residual_mass(engine) -> dict[str, torch.Tensor]:
    """The sum over ranks of every rank's undelivered gradient mass (and top-k momentum), per
    parameter (collective): what resharding must preserve."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = {}
    for layout in engine.layouts:
        feedback = engine.compression.feedback[layout.index]
        flats = {"residual": feedback.flat_total()}
        momentum = getattr(feedback, "flat_momentum", lambda: None)()
        if momentum is not None:
            flats["momentum"] = momentum
        for kind, flat in flats.items():
            flat = flat.float().clone()
            comm.all_reduce(flat)
            for slot in layout.slots:
                name = names[id(engine._params[slot.param_index])]
                out[f"{kind}:{name}"] = flat[slot.offset:slot.offset + slot.numel].clone()
    return out


def save(root: str) -> dict:
    out = {}
    for case in CASES:
        _nodes(case, True)
        engine = new_engine(_config(case))
        norms = train_split(engine, 0, 3)
        out[case] = {"mass": residual_mass(engine)}
        out[case]["state_bytes"] = {k: (t.numel() * t.element_size(), t.numel())
                                    for k, t in engine.compression.tensors().items()}
        engine.save_checkpoint(os.path.join(root, case), tag="step3")
        norms += train_split(engine, 3, 3)  # the run goes on: saving changes nothing of it
        out[case].update(norms=norms, params=host_params(engine.module, engine))
    return out


def resume(root: str) -> dict:
    """At the save's world size: loaded and trained on, and (the control) loaded with the
    residuals dropped."""
    out = {}
    for case in CASES:
        _nodes(case, True)
        result = {}
        for label in ("resumed", "residuals_dropped"):
            engine = new_engine(_config(case))
            engine.load_checkpoint(os.path.join(root, case), tag="step3")
            if label == "residuals_dropped":
                engine.compression.reset()
            else:
                result["mass"] = residual_mass(engine)
            result[label] = {"norms": train_split(engine, 3, 3),
                             "params": host_params(engine.module, engine)}
        out[case] = result
    return out


def reshard(root: str) -> dict:
    """At another world size (and one node): the residual mass after loading."""
    out = {}
    for case in CASES:
        _nodes(case, False)
        engine = new_engine(_config(case))
        engine.load_checkpoint(os.path.join(root, case), tag="step3")
        mass = residual_mass(engine)
        norms = train_split(engine, 3, 3)
        out[case] = {"mass": mass, "norms": norms}
    return out
