"""Node-aware collectives and stage-3 hpZ (zero_hpz_partition_size), at 4 ranks on one host
made to look like 2 nodes x 2 ranks (torchrun's GROUP_RANK / LOCAL_RANK / LOCAL_WORLD_SIZE set
as two torchrun agents would set them): one process group runs every case
(tests/hierarchy_cases.py).

References: the flat all-gather (bitwise), single-process training with torch AdamW on the
whole batch (engine_cases.train_reference), and the ring model's byte counts worked out here
from the unit sizes. The real two-node run is tests/test_hpz_two_nodes.py.
"""

import hierarchy_cases
import pytest
import torch

from dist_harness import run_group
from engine_cases import assert_matches_reference

NODES, PER_NODE = 2, 2
N = NODES * PER_NODE
BF16 = 2  # bytes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_group(N, hierarchy_cases.run_cases, str(tmp_path_factory.mktemp("hpz")),
                     timeout=300)


def _crosses(rank: int) -> bool:
    """Whether `rank`'s successor in the ring over all ranks is on another node."""
    return rank // PER_NODE != ((rank + 1) % N) // PER_NODE


def test_node_groups_and_hierarchical_gather_equal_the_flat_gather(outcomes):
    for rank, out in enumerate(outcomes):
        gathers = out["gathers"]
        assert gathers["nodes"] == (0, 0, 1, 1)
        assert gathers["same_groups"] == (True, True) and gathers["other_layout"]
        for dtype in ("torch.float32", "torch.bfloat16"):
            flat, flat_traffic = gathers[("flat", dtype)]
            hier, hier_traffic = gathers[("hierarchical", dtype)]
            within, _ = gathers[("node", dtype)]
            assert torch.equal(hier, flat)
            n = flat.numel() // N
            node = rank // PER_NODE
            assert torch.equal(within, flat[node * PER_NODE * n:(node + 1) * PER_NODE * n])
            size = flat.element_size()
            # Flat ring over 4 ranks: all of a rank's (N-1)/N * output crosses to the next.
            sent = flat.numel() * (N - 1) / N * size
            assert flat_traffic.inter_node_bytes == ({"all_gather": sent} if _crosses(rank)
                                                     else {})
            assert flat_traffic.intra_node_bytes == ({} if _crosses(rank)
                                                     else {"all_gather": sent})
            # Across nodes (ring of NODES over NODES * n), then within (PER_NODE over N * n).
            assert hier_traffic.inter_node_bytes == {
                "all_gather": NODES * n * (NODES - 1) / NODES * size}
            assert hier_traffic.intra_node_bytes == {
                "all_gather": N * n * (PER_NODE - 1) / PER_NODE * size}


def test_inter_node_bytes_fall_as_the_ring_model_says(outcomes):
    """Per rank, one stage-3 step in bf16: hpZ's backward gathers send nothing across nodes
    (half of every unit within the node instead of 3/4 over the ring); the hierarchical
    forward gather sends 1/4 of every unit across nodes from every rank, where the flat ring
    sends 3/4 from the two ranks at the node boundary: 2P instead of 3P bytes summed."""
    inter_sum = {"flat": 0.0, "hpz+hierarchical": 0.0}
    for rank, out in enumerate(outcomes):
        traffic = out["traffic"]
        unit = traffic["gathered_numel"]
        ring = unit * (N - 1) / N * BF16
        flat = traffic["flat"]
        link = "inter_node_bytes" if _crosses(rank) else "intra_node_bytes"
        for phase in ("forward", "backward"):
            assert getattr(flat[phase], link)["all_gather"] == ring
        hpz = traffic["hpz"]
        assert getattr(hpz["forward"], link)["all_gather"] == ring
        assert "all_gather" not in hpz["backward"].inter_node_bytes
        assert hpz["backward"].intra_node_bytes["all_gather"] == unit / PER_NODE * BF16
        # The gradients' reduce-scatter is hpZ's untouched flat ring.
        assert hpz["backward"].bytes["reduce_scatter"] == flat["backward"].bytes[
            "reduce_scatter"]
        both = traffic["hpz+hierarchical"]
        assert both["forward"].inter_node_bytes["all_gather"] == unit / N * BF16
        assert both["forward"].intra_node_bytes["all_gather"] == unit / PER_NODE * BF16
        assert "all_gather" not in both["backward"].inter_node_bytes
        assert both["forward"].bytes["all_gather"] == flat["forward"].bytes["all_gather"]
        inter_sum["flat"] += flat["forward"].inter_node_bytes.get("all_gather", 0.0)
        inter_sum["hpz+hierarchical"] += both["forward"].inter_node_bytes["all_gather"]
        assert flat["secondary_bytes"] == 0
    unit = outcomes[0]["traffic"]["gathered_numel"]
    assert inter_sum == {"flat": 2 * unit * (N - 1) / N * BF16,
                         "hpz+hierarchical": N * unit / N * BF16}


def test_secondary_copy_costs_one_block_share_of_every_unit(outcomes):
    for out in outcomes:
        traffic = out["traffic"]
        # Every unit bucket (TinyNet.unused included: never run, still copied) over the
        # PER_NODE ranks of a block, in bf16.
        assert traffic["hpz"]["secondary_bytes"] == traffic["unit_numel"] / PER_NODE * BF16


def test_host_memory_plan_counts_the_secondary_copy_under_offload_param(outcomes):
    for out in outcomes:
        plan = out["host_plan"]
        assert plan["secondary"] > 0
        assert plan["planned"] == plan["host"], plan


@pytest.mark.parametrize("case", [(1, "hierarchical"), (2, "hierarchical"), (3, "hpz"),
                                  (3, "hpz+hierarchical+offload_param")])
def test_bitwise_the_flat_path_and_parity_with_one_process(outcomes, case):
    """bf16, gradient accumulation 2, optimizer offload (and parameter offload): the same bits
    as the flat path on every rank, and the single-process reference's training update."""
    for out in outcomes:
        got = out["parity"][case]
        assert got["node_aware"]["norms"] == got["flat"]["norms"]
        for name, value in got["flat"]["params"].items():
            assert torch.equal(got["node_aware"]["params"][name], value), name
    assert_matches_reference(outcomes[0]["parity"][case]["node_aware"],
                             outcomes[0]["parity"]["reference"], "bf16", str(case))


def test_first_steps_after_loading_a_checkpoint_use_fresh_copies(outcomes):
    """DeepSpeed #7606: with hpZ, the step after load_checkpoint (an eval forward between)
    must train on the loaded weights: bitwise the flat path's uninterrupted run."""
    for out in outcomes:
        resumed = out["resumed"]
        for name, value in resumed["flat"].items():
            assert torch.equal(resumed["hpz"][name], value), name


@pytest.mark.parametrize("case", ["load", "read_qwz"])
def test_weights_loaded_or_read_between_forward_and_backward_as_the_flat_path(outcomes, case):
    for out in outcomes:
        flat, hpz = out["mid_step"][(case, "flat")], out["mid_step"][(case, "hpz")]
        for name, value in flat.items():
            assert torch.equal(hpz[name], value), name


def test_the_topology_names_what_described_it_each_time(outcomes):
    layout = f"{N} ranks on {NODES} node(s) with 2, 2 rank(s)"
    assert outcomes[0]["sources"] == [f"{layout} (from torchrun's GROUP_RANK)",
                                      f"{layout} (from LOCAL_WORLD_SIZE)"]


def test_layouts_hpz_cannot_serve_are_refused_on_every_rank(outcomes):
    errors = [out["errors"] for out in outcomes]
    assert all(e == errors[0] for e in errors)
    e = errors[0]
    for key in ("hpz 4 > 2 per node", "hpz 3 on 2 per node"):
        assert "zero_hpz_partition_size" in e[key] and "must divide the ranks per node (2" in \
            e[key] and "use 2 or a divisor of it (1, 2)" in e[key], e[key]
    assert e["uneven nodes"].startswith("4 ranks on 2 node(s) with 3, 1 rank(s)")
    for key, option in (("uneven hpz", "zero_hpz_partition_size"),
                        ("uneven hierarchical", "hierarchical_allgather")):
        assert option in e[key] and "the same number of ranks on every node" in e[key] and \
            "with 3, 1 rank(s)" in e[key], e[key]
    assert "disagree on node 1" in e["inconsistent torchrun"] and \
        "LOCAL_WORLD_SIZE [2, 3]" in e["inconsistent torchrun"]


def test_two_hop_groups_are_made_when_the_engine_is_built_not_mid_step(outcomes):
    # Within a node: [0, 1], [2, 3]; across nodes: one rank of each local index, [0, 2], [1, 3].
    expected = [("build", [[0, 1], [2, 3]]), ("build", [[0, 2], [1, 3]])]
    for out in outcomes:
        groups = out["groups"]
        assert sorted(groups["int8 two-hop"]) == expected, groups
        assert sorted(groups["stage 3 hierarchical"]) == expected, groups
