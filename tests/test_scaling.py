"""The scaling model (zero_ext/scaling.py, `python -m zero_ext.estimate --network`): its planned
traffic equals zero_ext.comm's counters on real runs at every stage, with hpZ and hierarchical
gathers (one group of 4 gloo ranks as 2 nodes x 2, tests/scaling_cases.py); its alpha-beta
times and overlap rules equal the formulas worked by hand; the pick moves from stage 3 to
stage 1/2 as the network slows, where the analytic communication times say it must; the CLI
names bad input and the fix."""

import functools
import math
from dataclasses import replace

import pytest

from zero_ext import scaling
from zero_ext.estimate import main
from zero_ext.scaling import Cluster, Compute, Link, PlannedCollective
from zero_ext.scaling_measure import cluster_from_measurement, fit

import scaling_cases
from dist_harness import run_group

WORLD = 4


@functools.cache
def _results() -> list[dict]:
    return run_group(WORLD, scaling_cases.run_cases, timeout=300)


@pytest.mark.parametrize("case", list(scaling_cases.CASES))
def test_planned_traffic_equals_the_counters_of_a_real_step(case):
    for rank, result in enumerate(_results()):
        measured, planned = result[case]["measured"], result[case]["planned"]
        assert planned.calls == measured.calls, f"rank {rank}"
        # Ring-sense bytes are n(N-1)/N: exact once multiplied back by N/(N-1).
        assert {op: round(b * WORLD / (WORLD - 1)) for op, b in planned.bytes.items()} == \
            {op: round(b * WORLD / (WORLD - 1)) for op, b in measured.bytes.items()}
        assert planned.bytes == pytest.approx(measured.bytes, rel=1e-12, abs=0)
    stage3 = _results()[0]["stage3"]["planned"]
    assert stage3.calls["all_gather"] > stage3.calls["reduce_scatter"]  # units gathered twice


def test_the_shipped_network_benchmark_fits_every_collective():
    measured = _results()[0]["network"]
    assert measured["world_size"] == WORLD
    assert {op for op, _, _ in measured["samples"]} == {"all_reduce", "all_gather",
                                                        "reduce_scatter"}
    for op, f in measured["fits"].items():
        assert f["alpha_s"] >= 0 and f["beta_s_per_byte"] > 0, op
    cluster = cluster_from_measurement(measured, 1, WORLD, Link(1e9, 0))
    assert cluster.fitted["all_gather"] == cluster.network
    # gloo on CPU: each collective's work on the cores (its process's CPU seconds), measured
    # too: every run costs its ranks CPU time.
    assert {op for op, _, _ in measured["host_samples"]} == set(measured["fits"])
    assert all(seconds > 0 for _, _, seconds in measured["host_samples"])
    assert set(measured["host_fits"]) == set(measured["fits"])


def test_the_measured_core_work_of_collectives_enters_the_prediction():
    # A measurement as measure_network returns it over 2 ranks: all-gather moves 100 MB/s of
    # ring bytes and costs each rank 0.5 s of CPU per 100 MB (a CPU transport on a capped
    # link, where the kernel's TCP work per byte is several times an uncapped link's).
    measured = {"world_size": 2, "fits": {"all_gather": {"alpha_s": 0.0, "beta_s_per_byte": 1e-8}},
                "host_fits": {"all_gather": {"alpha_s": 0.0, "beta_s_per_byte": 5e-9}}}
    cluster = cluster_from_measurement(measured, 2, 1, Link(1e12, 0.0))
    assert cluster.host["all_gather"] == Link(2e8, 0.0)
    # Three prefetched gathers of 10^6 fp32 (2 MB of ring bytes each: 0.02 s on the link,
    # 0.01 s on the cores) in a forward of 0.03 s compute. The first is exposed (0.02); the
    # other two run behind the compute, whose core also does their 2 x 0.01 s of CPU work:
    # 0.02 + max(0.03 + 0.02, 0.04) = 0.07 (without the core work: 0.02 + 0.04 = 0.06).
    plan = [PlannedCollective("all_gather", 10**6, 4, "forward", True) for _ in range(3)]
    p = scaling.predict_step(plan, cluster, Compute(forward=0.03, backward=0.0), stage=3)
    assert p.seconds == pytest.approx(0.07)
    measured.pop("host_fits")  # NCCL / no CPU measured: the link alone
    p = scaling.predict_step(plan, cluster_from_measurement(measured, 2, 1, Link(1e12, 0.0)),
                             Compute(forward=0.03, backward=0.0), stage=3)
    assert p.seconds == pytest.approx(0.06)


def test_fit_recovers_alpha_and_beta():
    points = [(x, 3e-5 + x / 2.5e8) for x in (1e4, 1e5, 1e6, 8e6)]
    f = fit(points)
    assert f["alpha_s"] == pytest.approx(3e-5, rel=1e-9)
    assert f["beta_s_per_byte"] == pytest.approx(1 / 2.5e8, rel=1e-9)
    # Measured at 2 ranks: an all-reduce's alpha spreads over its 2 ring steps.
    measured = {"world_size": 2, "fits": {op: f for op in ("all_reduce", "all_gather")}}
    cluster = cluster_from_measurement(measured, 2, 1, Link(1e9, 0))
    assert cluster.fitted["all_reduce"].latency == pytest.approx(1.5e-5)
    assert cluster.fitted["all_gather"].latency == pytest.approx(3e-5)
    c = PlannedCollective("all_reduce", 1000, 4, "step", False)
    assert scaling.collective_seconds(c, cluster) == pytest.approx(3e-5 + 4000 / 2.5e8)


CLUSTER = Cluster(nodes=4, gpus_per_node=8, network=Link(12.5e9, 5e-6),
                  intra=Link(450e9, 2e-6))


@pytest.mark.parametrize("op, steps, factor", [("all_gather", 31, 1), ("reduce_scatter", 31, 1),
                                               ("all_reduce", 62, 2)])
def test_alpha_beta_of_a_ring_across_nodes(op, steps, factor):
    n, size = 10**6, 2
    c = PlannedCollective(op, n, size, "step", False)
    expected = steps * 5e-6 + factor * n * size * 31 / 32 / 12.5e9
    assert scaling.collective_seconds(c, CLUSTER) == pytest.approx(expected, rel=1e-12)


def _bare_plan(**zero):
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 10**6, **zero}}
    return scaling.plan_step(32 * 8000, config, 32, gpus_per_node=8, largest_unit=8000)


def test_hpz_gathers_run_within_the_node():
    flat, hpz = _bare_plan(), _bare_plan(zero_hpz_partition_size=8)
    backward = [c for c in hpz if c.op == "all_gather" and c.phase == "backward"]
    assert len(backward) == 32 and {(c.group, c.group_size) for c in backward} == {("node", 8)}
    assert [c for c in hpz if c not in backward] == [
        c for c in flat if not (c.op == "all_gather" and c.phase == "backward")]
    padded = backward[0].numel
    assert padded == 8192  # 8000 padded to a multiple of 32 ranks x 16
    assert scaling.collective_seconds(backward[0], CLUSTER) == pytest.approx(
        7 * 2e-6 + padded * 2 * 7 / 8 / 450e9, rel=1e-12)
    assert scaling.planned_traffic(hpz, CLUSTER).bytes["all_gather"] == pytest.approx(
        32 * padded * 2 * (7 / 8 + 31 / 32))


def test_hierarchical_gathers_cross_nodes_once():
    plan = _bare_plan(hierarchical_allgather=True)
    forward = [c for c in plan if c.phase == "forward"]
    assert [(c.group, c.group_size, c.numel) for c in forward[:2]] == [
        ("across", 4, 8192 // 8), ("node", 8, 8192)]
    # The first hop: 4 nodes, each local rank at 1/8 of the node's bandwidth.
    assert scaling.collective_seconds(forward[0], CLUSTER) == pytest.approx(
        3 * 5e-6 + 1024 * 2 * 3 / 4 / (12.5e9 / 8), rel=1e-12)


def test_overlap_rules():
    one_rank_link = Cluster(nodes=2, gpus_per_node=1, network=Link(1e6, 0.0),
                            intra=Link(1e9, 0.0))
    # Each 1e6-element fp32 all-gather over 2 ranks sends 2e6 bytes: 2 s at 1e6 B/s.
    gather = functools.partial(PlannedCollective, "all_gather", 10**6, 4)
    plan = [gather("forward", True), gather("forward", True), gather("backward", True),
            gather("backward", False), gather("step", False)]
    compute = Compute(forward=3.0, backward=1.0, optimizer=0.5)
    p = scaling.predict_step(plan, one_rank_link, compute, stage=3)
    # forward: first gather exposed (2) + max(3, 2); backward: the last hidden one exposed
    # (2) + the unhidden (2) + max(1, 0); step: optimizer 0.5 / 2 ranks + 2.
    assert p.seconds == pytest.approx((2 + 3) + (2 + 2 + 1) + (0.25 + 2))
    assert p.communication == pytest.approx(10)
    assert p.exposed == pytest.approx(2 + 4 + 2)
    assert p.compute == pytest.approx(3 + 1 + 0.25)


def test_collectives_on_the_compute_cores_do_not_hide_behind_compute():
    # gloo on CPU: the host link's time is work on the cores compute needs. Host as fast as
    # the network: nothing hides; host 4x faster: a quarter of each hidden gather is core work.
    gather = functools.partial(PlannedCollective, "all_gather", 10**6, 4)
    plan = [gather("forward", True), gather("forward", True), gather("forward", True)]
    compute = Compute(forward=3.5, backward=0.0)
    link = Link(1e6, 0.0)
    # (Without a host cost: 2 + max(3.5, 4) = 6.)
    for host, expected in ((link, 2 + 3.5 + 2 + 2), (Link(4e6, 0.0), 2 + 3.5 + 2 * 0.5)):
        cluster = Cluster(nodes=2, gpus_per_node=1, network=link, intra=link,
                          host={"all_gather": host})
        p = scaling.predict_step(plan, cluster, compute, stage=3)
        assert p.seconds == pytest.approx(expected)
        assert p.exposed == pytest.approx(expected - 3.5)


def test_collectives_needing_more_than_their_share_of_the_core_slow_down():
    # Three prefetched gathers of 10^6 fp32 over 2 ranks: 2 MB of ring bytes each, 0.05 s on a
    # 40 MB/s link and 0.04 s of CPU (0.8 of a core at the link's rate); 0.04 s of forward
    # compute on the same core. The first gather is exposed: 0.05. Behind compute, the other
    # two (0.1 s of link, 0.08 s of CPU) and the compute share the core: the collectives get
    # half of it (they need 0.8), so they move at 5/8 of the link's rate while the compute,
    # at half a core, takes 0.08 s; by then 0.05 s of their link time is done, the other 0.05
    # runs at full rate: 0.13. Phase: 0.05 + 0.13 = 0.18 (core and link as if shared
    # perfectly: 0.05 + max(0.04 + 0.08, 0.1) = 0.17).
    gather = functools.partial(PlannedCollective, "all_gather", 10**6, 4, "forward", True)
    cluster = Cluster(nodes=2, gpus_per_node=1, network=Link(4e7, 0.0), intra=Link(4e7, 0.0),
                      host={"all_gather": Link(5e7, 0.0)})
    p = scaling.predict_step([gather(), gather(), gather()], cluster,
                             Compute(forward=0.04, backward=0.0), stage=3)
    assert p.seconds == pytest.approx(0.18)
    # A transport that takes all the core it needs (share 1): the perfect sharing bound.
    p = scaling.predict_step([gather(), gather(), gather()], replace(cluster, host_share=1.0),
                             Compute(forward=0.04, backward=0.0), stage=3)
    assert p.seconds == pytest.approx(0.17)
    with pytest.raises(ValueError, match="host_share"):
        replace(cluster, host_share=0.0)


def _predictions(network: str, nodes: int = 2) -> list:
    params, tokens = 7 * 10**9, 16384
    cluster = Cluster(nodes, 8, scaling.parse_network(network), Link(450e9, 2e-6))
    compute = Compute.from_flops(params, tokens, 989e12 * 0.4)
    out = []
    for stage in (1, 2, 3):
        config = {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1,
                  "zero_optimization": {"stage": stage, "overlap_comm": True}}
        plan = scaling.plan_step(params, config, cluster.world_size, largest_unit=202 * 10**6)
        out.append(scaling.predict_step(plan, cluster, compute, stage=stage))
    return out


def test_stage3_moves_one_and_a_half_times_the_bytes():
    one, two, three = (sum(p.traffic.bytes.values()) for p in _predictions("100Gbps"))
    assert one == two
    assert three / one == pytest.approx(1.5, rel=1e-6)


def test_the_pick_moves_from_stage3_to_stage2_as_the_network_slows():
    fast = _predictions("400Gbps,5us")
    slow = _predictions("10Gbps,5us")
    assert scaling.recommend(fast)[0] == "stage 3"
    label, reason = scaling.recommend(slow)
    assert label == "stage 2", reason
    assert "stage 3 moves 1.50x stage 1's bytes" in reason
    # Analytic: on the slow link every phase is communication-bound, so stage 3's step costs
    # its extra all-gather of 2 bytes per parameter over the ring, less the forward compute
    # that its forward gathers hide (stage 2 has nothing to hide it behind); latency and
    # padding are within 0.2%.
    ring = 15 / 16
    extra = 7e9 * 2 * ring / (10e9 / 8) - slow[2].compute / 3
    assert slow[2].seconds - slow[1].seconds == pytest.approx(extra, rel=2e-3)
    # On the fast link stage 3's gathers hide behind compute: within 5% of the fastest.
    assert fast[2].seconds <= 1.05 * min(p.seconds for p in fast)


@pytest.mark.parametrize("network", ["fast", "100", "100GHz", "-5Gbps", "100Gbps,5",
                                     "100Gbps,5us,1"])
def test_cli_names_a_bad_network(network, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", "1B", f"--network={network}", "--compute-time", "1"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "--network" in message and "e.g." in message, message


def test_cli_needs_the_compute_and_names_both_ways(capsys):
    with pytest.raises(SystemExit):
        main(["--params", "1B", "--network", "100Gbps"])
    message = capsys.readouterr().err
    assert "--compute-time" in message and "--tokens-per-gpu" in message


def test_cli_prints_the_table_and_the_pick(capsys):
    assert main(["--params", "7B", "--largest-unit", "202M", "--network", "10Gbps,5us",
                 "--nodes", "1,2", "--tokens-per-gpu", "16384", "--hpz", "8"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("nodes"))
    assert header.split() == ["nodes", "GPUs", "stage", "1", "s", "stage", "2", "s", "stage",
                              "3", "s", "stage", "3", "+", "hpZ", "8", "s", "exposed", "comm",
                              "(best)", "pick"]
    assert "16 GPUs: stage 2" in out or "16 GPUs: stage 3 + hpZ 8" in out
    rows = out.split(header)[1].splitlines()[1:3]
    assert [row.split()[:2] for row in rows] == [["1", "8"], ["2", "16"]]
    assert all(math.isfinite(float(cell)) for row in rows for cell in row.split()[2:6])


def test_planned_traffic_over_gloo_counts_gloos_reduce_scatter_as_its_all_reduce():
    """On gloo an uncompressed reduce-scatter is gloo's all-reduce of the input: 2n(N-1)/N
    (exactly, 8 x 4096 fp32 over 4 ranks: 2 segments per rank of 4 KiB); a compressed one is an
    all-to-all, the ring's n(N-1)/N on either transport; all-gathers are rings on both."""
    def plan(gradients):
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                  "zero_ext": {"compression": {"gradients": gradients}}}
        return scaling.plan_step(8 * 4096, config, 4)

    n = 8 * 4096 * 4
    dense, int8 = plan({"method": "none"}), plan({"method": "int8"})
    ring, gloo = (scaling.planned_traffic(dense, 4, transport=t).bytes for t in ("ring", "gloo"))
    assert ring["reduce_scatter"] == n * 3 / 4 and gloo["reduce_scatter"] == 2 * n * 3 / 4
    assert gloo["all_gather"] == ring["all_gather"] == n * 3 / 4
    ring, gloo = (scaling.planned_traffic(int8, 4, transport=t).bytes for t in ("ring", "gloo"))
    # (the step's small agreement all-reduce is gloo's segmented one: compared elsewhere)
    assert all(gloo[op] == ring[op] for op in ("reduce_scatter", "all_gather", "all_to_all")
               if op in ring), (gloo, ring)
    assert ring["reduce_scatter"] < n * 3 / 4 / 3.8
