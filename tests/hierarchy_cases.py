"""What each rank runs in tests/test_hpz.py: node-aware collectives and stage-3 hpZ at 4 ranks
on one host, as 2 simulated nodes x 2 ranks (torchrun's variables set as on two nodes)."""

from __future__ import annotations

import os

import torch

import zero_ext
from zero_ext import comm

import engine_cases


def simulate_nodes(ranks_per_node: int, group_rank: int | None = None) -> comm.Topology:
    """torchrun's variables as `ranks_per_node` ranks per node would set them; detected again
    (collective)."""
    rank = comm.rank()
    os.environ.update(LOCAL_WORLD_SIZE=str(ranks_per_node), LOCAL_RANK=str(rank % ranks_per_node),
                      GROUP_RANK=str(rank // ranks_per_node if group_rank is None else group_rank))
    return comm.detect_topology()


def gathers() -> dict:
    """Hierarchical and intra-node all-gathers against the flat one, with their counters."""
    topology = simulate_nodes(2)
    rank, size = comm.rank(), comm.world_size()
    out = {"nodes": topology.node_of_rank}
    for dtype in (torch.float32, torch.bfloat16):
        n = 37
        mine = (torch.arange(n, dtype=torch.float32) + 1000 * rank).to(dtype)
        flat = torch.empty(n * size, dtype=dtype)
        comm.traffic.reset()
        comm.all_gather(flat, mine)
        out[("flat", str(dtype))] = (flat, comm.traffic.snapshot())
        hier = torch.empty(n * size, dtype=dtype)
        comm.traffic.reset()
        comm.hierarchical_all_gather(hier, mine)
        out[("hierarchical", str(dtype))] = (hier, comm.traffic.snapshot())
        within = torch.empty(n * 2, dtype=dtype)
        comm.traffic.reset()
        comm.all_gather(within, mine, group=topology.node_group("test"))
        out[("node", str(dtype))] = (within, comm.traffic.snapshot())
    # Detected again (another initialize) on the same group and layout: the same groups, not
    # new communicators each time; another layout gets its own.
    node_group = topology.node_group("test")
    again = simulate_nodes(2)
    out["same_groups"] = (again is topology, again.node_group("test") is node_group)
    other = simulate_nodes(1)
    out["other_layout"] = other is not topology and other.nodes == 4
    simulate_nodes(2)
    return out


def bitwise_and_parity(steps: int = 3) -> dict:
    """Stages 1-3, bf16, gradient accumulation 2, optimizer offload (stage 3 also with
    parameter offload): the flat path, hierarchical all-gathers and (stage 3) hpZ, each
    trained on 2 simulated nodes x 2 ranks; rank 0 adds the single-process reference."""
    simulate_nodes(2)
    offload_optimizer = {"offload_optimizer": {"device": "cpu"}}
    offload_both = {**offload_optimizer, "offload_param": {"device": "cpu"}}
    cases = {
        (1, "hierarchical"): (offload_optimizer, {"hierarchical_allgather": True}),
        (2, "hierarchical"): (offload_optimizer, {"hierarchical_allgather": True}),
        (3, "hpz"): (offload_optimizer, {"zero_hpz_partition_size": 2}),
        (3, "hpz+hierarchical+offload_param"): (
            offload_both, {"zero_hpz_partition_size": 2, "hierarchical_allgather": True}),
    }
    out = {}
    flat = {}
    for (stage, label), (offload, keys) in cases.items():
        if (stage, str(offload)) not in flat:
            flat[(stage, str(offload))] = engine_cases.train_engine(stage, "bf16", 2, steps,
                                                                    **offload)
        out[(stage, label)] = {
            "flat": flat[(stage, str(offload))],
            "node_aware": engine_cases.train_engine(stage, "bf16", 2, steps, **offload, **keys)}
    if comm.rank() == 0:
        out["reference"] = engine_cases.train_reference("bf16", 2, steps, comm.world_size())
    return out


def _phases(engine, model, tokens, targets) -> dict:
    """One training step's traffic, by phase (forward, backward, step)."""
    out = {}
    comm.traffic.reset()
    loss = engine_cases.run(engine, tokens, targets)
    out["forward"] = comm.traffic.snapshot()
    comm.traffic.reset()
    engine.backward(loss)
    out["backward"] = comm.traffic.snapshot()
    comm.traffic.reset()
    engine.step()
    out["step"] = comm.traffic.snapshot()
    return out


def traffic() -> dict:
    """One stage-3 step's counters (bf16) by phase on 2 simulated nodes x 2 ranks: flat, hpZ,
    and hpZ with hierarchical forward gathers; with the padded sizes of the units gathered
    (every unit but TinyNet.unused, which never runs)."""
    simulate_nodes(2)
    rank, size = comm.rank(), comm.world_size()
    tokens, targets = engine_cases.global_batch(0, size, 1)
    out = {}
    for label, keys in (("flat", {}), ("hpz", {"zero_hpz_partition_size": 2}),
                        ("hpz+hierarchical", {"zero_hpz_partition_size": 2,
                                              "hierarchical_allgather": True})):
        model = engine_cases.build_model()
        engine, _, _, _ = zero_ext.initialize(
            model=model, config=engine_cases.config(3, "bf16", 1, size, **keys))
        out[label] = _phases(engine, model, tokens[0, rank], targets[0, rank])
        out["gathered_numel"] = sum(layout.padded_numel for unit in engine.partitioned.units
                                    if unit.module is not model.unused
                                    for layout in unit.layouts)
        out["unit_numel"] = sum(layout.padded_numel for unit in engine.partitioned.units
                                for layout in unit.layouts)
        out[label]["secondary_bytes"] = engine.partitioned.secondary.nbytes() \
            if engine.partitioned.secondary is not None else 0
    return out


def _error(fn) -> str | None:
    try:
        fn()
    except comm.TopologyError as error:
        return str(error)
    return None


def errors() -> dict:
    """Layouts hpZ and the hierarchical gather refuse, each raised on every rank."""
    rank, size = comm.rank(), comm.world_size()

    def build(stage: int, **keys):
        model = engine_cases.build_model()
        zero_ext.initialize(model=model, config=engine_cases.config(stage, "fp32", 1, size,
                                                                    **keys))

    out = {}
    simulate_nodes(2)
    out["hpz 4 > 2 per node"] = _error(lambda: build(3, zero_hpz_partition_size=4))
    out["hpz 3 on 2 per node"] = _error(lambda: build(3, zero_hpz_partition_size=3))
    # Three ranks on the first node, one on the second: a layout torchrun can launch.
    os.environ.update(LOCAL_WORLD_SIZE=str(3 if rank < 3 else 1),
                      LOCAL_RANK=str(rank if rank < 3 else 0), GROUP_RANK=str(rank // 3))
    out["uneven nodes"] = comm.detect_topology().describe()
    out["uneven hpz"] = _error(lambda: build(3, zero_hpz_partition_size=2))
    out["uneven hierarchical"] = _error(lambda: build(1, hierarchical_allgather=True))
    # Ranks of one node that disagree on the node's size.
    os.environ.update(LOCAL_WORLD_SIZE=str(2 if rank < 3 else 3), LOCAL_RANK=str(rank % 2),
                      GROUP_RANK=str(rank // 2))
    out["inconsistent torchrun"] = _error(comm.detect_topology)
    simulate_nodes(2)
    return out


def resumed(root: str) -> dict:
    """DeepSpeed #7606 (the first step after loading a checkpoint gathered stale secondary
    copies): hpZ trains step 0, saves, trains steps 1-2, runs an eval forward, loads the
    checkpoint and trains steps 1-2 again; the flat path trains steps 0-2 once. Bitwise."""
    simulate_nodes(2)
    rank, size = comm.rank(), comm.world_size()

    def train(engine, steps):
        for step in steps:
            tokens, targets = engine_cases.global_batch(step, size, 1)
            engine.backward(engine_cases.run(engine, tokens[0, rank], targets[0, rank]))
            engine.step()

    out = {}
    for label, keys in (("flat", {}), ("hpz", {"zero_hpz_partition_size": 2})):
        model = engine_cases.build_model()
        engine, _, _, _ = zero_ext.initialize(
            model=model, config=engine_cases.config(3, "bf16", 1, size, **keys),
            model_parameters=engine_cases.param_groups(model))
        train(engine, [0])
        if label == "hpz":
            engine.save_checkpoint(root, tag="step1")
            train(engine, [1, 2])
            tokens, targets = engine_cases.global_batch(5, size, 1)
            with torch.no_grad():
                engine_cases.run(engine, tokens[0, rank], targets[0, rank])
            engine.load_checkpoint(root, tag="step1")
        train(engine, [1, 2])
        out[label] = engine_cases.host_params(model, engine)
    return out


def mid_step(root: str) -> dict:
    """Weights rewritten or read between a forward and its backward, flat path and hpZ, for
    the bitwise comparison: load_checkpoint (the forward refreshed hpZ's copies from the weights
    before the load; its backward must gather the loaded ones, as the flat path does), and
    under qwZ a read-only GatheredParameters (its exact gather must not replace the copies the
    forward's dequantized gather left, which its backward computes with)."""
    simulate_nodes(2)
    rank, size = comm.rank(), comm.world_size()
    out = {}
    for case, extra in (("load", {}), ("read_qwz", {"zero_quantized_weights": True})):
        for label, keys in (("flat", {}), ("hpz", {"zero_hpz_partition_size": 2})):
            model = engine_cases.build_model()
            engine, _, _, _ = zero_ext.initialize(
                model=model, config=engine_cases.config(3, "bf16", 1, size, **keys, **extra),
                model_parameters=engine_cases.param_groups(model))
            for step in (0, 1):
                tokens, targets = engine_cases.global_batch(step, size, 1)
                loss = engine_cases.run(engine, tokens[0, rank], targets[0, rank])
                if step == 0 and case == "load":
                    engine.save_checkpoint(root, tag=f"mid-{label}")
                elif step == 1 and case == "load":
                    engine.load_checkpoint(root, tag=f"mid-{label}")
                elif step == 1:
                    with zero_ext.GatheredParameters(list(model.parameters())):
                        pass
                engine.backward(loss)
                engine.step()
            out[(case, label)] = engine_cases.host_params(model, engine)
    return out


def sources_named() -> list[str]:
    """What describe() (in every topology error) says the layout came from, detected from
    torchrun's variables, then from LOCAL_WORLD_SIZE alone: the same layout, reused."""
    simulate_nodes(2)
    said = [comm.detect_topology().describe()]
    group_rank = os.environ.pop("GROUP_RANK")
    said.append(comm.detect_topology().describe())
    os.environ["GROUP_RANK"] = group_rank
    comm.detect_topology()
    return said


def host_plan() -> dict:
    """offload_param with hpZ: the host-memory plan checked before allocating (captured)
    against the host bytes the engine then holds (the secondary shards live there too)."""
    from zero_ext.zero import offload

    simulate_nodes(2)
    captured, check = [], offload.check_host_memory
    offload.check_host_memory = lambda plan, available=None: (captured.append(plan),
                                                              check(plan, available))[1]
    try:
        model = engine_cases.build_model()
        engine, _, _, _ = zero_ext.initialize(model=model, config=engine_cases.config(
            3, "bf16", 1, comm.world_size(), offload_param={"device": "cpu"},
            offload_optimizer={"device": "cpu"}, zero_hpz_partition_size=2))
        engine_cases.train_steps(engine, 1)
    finally:
        offload.check_host_memory = check
    return {"planned": captured[0].rank_bytes, "host": engine.memory_by_location()["host"],
            "secondary": engine.partitioned.secondary.nbytes()}


def groups_made_when_built() -> dict:
    """Process groups made while initialize() builds the engine and while it trains 2 steps,
    counted at torch.distributed's door, on a freshly detected 2 x 2 topology (no group made
    yet): the two hops of qgZ's reduce-scatter and of the stage-3 gathers. Under NCCL a group
    made mid-step is a communicator set up inside a backward hook, outside the stall watch."""
    import torch.distributed as dist

    made, phase = [], ["build"]
    original = dist.new_subgroups_by_enumeration

    def counting(blocks, *args, **kwargs):
        made.append((phase[0], [list(b) for b in blocks]))
        return original(blocks, *args, **kwargs)

    out = {}
    dist.new_subgroups_by_enumeration = counting
    try:
        for label, stage, keys, compression in (
                ("int8 two-hop", 2, {}, {"gradients": {"method": "int8"}}),
                ("stage 3 hierarchical", 3, {"hierarchical_allgather": True}, {})):
            simulate_nodes(1)  # another layout: the 2 x 2 one below starts without groups
            simulate_nodes(2)
            made.clear()
            phase[0] = "build"
            model = engine_cases.build_model()
            cfg = engine_cases.config(stage, "bf16", 1, comm.world_size(), **keys)
            cfg["zero_ext"] = {"compression": compression}
            engine, _, _, _ = zero_ext.initialize(model=model, config=cfg)
            phase[0] = "train"
            engine_cases.train_steps(engine, 2)
            out[label] = list(made)
    finally:
        dist.new_subgroups_by_enumeration = original
        simulate_nodes(2)
    return out


def run_cases(root: str) -> dict:
    return {"gathers": gathers(), "errors": errors(), "traffic": traffic(),
            "parity": bitwise_and_parity(), "resumed": resumed(root), "mid_step": mid_step(root),
            "host_plan": host_plan(), "sources": sources_named(),
            "groups": groups_made_when_built()}
