"""The engine with compressed communication (zero_ext.compression, issue 16): quantized gradient
reduce-scatter (int8, int4, error feedback, two hops), top-k with momentum correction, qwZ.

One process group per world size runs every case (tests/compression_cases.py): 2 ranks, and 4
ranks first on one node, then made to look like 2 nodes x 2 ranks. References, all written
here or in the cases module in plain torch:
  - the reduction of one bucket: every rank's input (the pre-divided gradients the engine
    handed over), quantized chunk by chunk with the design's rule (quantize_dequantize), the
    own chunk exact, summed in fp32 in rank order; with error feedback the residual mass each
    rank held before the call, times current / stored loss scale; top-k as DGC's rule;
  - training: single-process torch AdamW on the whole batch (engine_cases.train_reference);
  - traffic: bytes worked out from the bucket sizes (row = blocks x block bytes + 4 per scale).
"""

import functools
import itertools
import math

import compression_cases as cases
import pytest
import torch
from compression_cases import BLOCK, quantize_dequantize
from torch.testing import assert_close

from zero_ext.zero.compression import warmup_density

from dist_harness import run_group


@functools.cache
def _two():
    return run_group(2, cases.two_ranks, timeout=300)


@functools.cache
def _four():
    return run_group(4, cases.four_ranks, timeout=300)


def _results(where: str) -> list[dict]:
    """Per rank, the results of one setting: "2", "4" (one node) or "2x2" (simulated nodes)."""
    if where == "2":
        return _two()
    return [r["nodes"] if where == "2x2" else r for r in _four()]


def row_bytes(m: int, bits: int, block: int) -> int:
    """Bytes of one quantized chunk of m elements on the wire: whole blocks of data, one fp32
    scale per block."""
    blocks = -(-m // block)
    return blocks * block * bits // 8 + 4 * blocks


# -- the warm-up schedule ----------------------------------------------------------------------
def test_topk_density_warms_up_exponentially_from_dense():
    assert warmup_density(0.01, 0, 4) == 1.0
    assert warmup_density(0.01, 2, 4) == pytest.approx(0.1)
    assert warmup_density(0.01, 1, 4) == pytest.approx(0.01 ** 0.25)
    assert warmup_density(0.01, 4, 4) == 0.01
    assert warmup_density(0.01, 40, 4) == 0.01
    assert warmup_density(0.05, 0, 0) == 0.05  # no warm-up: the target from the start


def test_freeze_variance_warm_up_is_dense_then_sparse():
    assert [warmup_density(0.01, step, 3, freeze_variance=True) for step in range(5)] == \
        [1.0, 1.0, 1.0, 0.01, 0.01]


def test_freeze_variance_keeps_adams_second_moment_after_the_dense_warm_up():
    for rank, result in enumerate(_results("2")):
        steps = result["frozen variance"]["steps"]
        assert [s["density"] for s in steps] == [1.0, 1.0, 0.3, 0.3, 0.3]
        # Steps 0-1 are AdamW's (v follows the gradients); from step 2 on the groups step
        # with betas (0.9, 1.0) and no bias correction, the moments corrected once.
        assert not torch.equal(steps[1]["exp_avg_sq"], steps[0]["exp_avg_sq"])
        assert all(g == ((0.9, 0.999), True, False) for g in steps[1]["groups"])
        assert all(g == ((0.9, 1.0), False, True) for s in steps[2:] for g in s["groups"])
        corrected = steps[1]["exp_avg_sq"].div(1.0 - 0.999 ** steps[1]["step"])
        for s in steps[2:]:
            assert torch.equal(s["exp_avg_sq"], corrected), rank
        # The first moment goes on: an EMA of the (sparse) gradients from its corrected value.
        assert not torch.equal(steps[4]["exp_avg"], steps[3]["exp_avg"])
        assert all(torch.isfinite(v).all() for v in result["frozen variance"]["params"].values())


def test_engine_follows_the_warm_up_by_optimizer_step():
    for where, label, stage, dtype in PARITY:
        if label == "topk":
            got = _results(where)[0]["parity"][(label, stage, dtype)]["densities"]
            assert got == [warmup_density(0.3, step, 2) for step in range(cases.STEPS)], where


# -- training against single-process torch -----------------------------------------------------
PARITY = [(where, *case[:3]) for where, group in
          (("2", cases.PARITY), ("4", cases.PARITY_FOUR), ("2x2", cases.PARITY_NODES))
          for case in group]


@pytest.mark.parametrize("where, label, stage, dtype", PARITY,
                         ids=[f"{w}-{label}-stage{s}-{d}" for w, label, s, d in PARITY])
def test_training_stays_close_to_single_process_torch(where, label, stage, dtype):
    results = _results(where)
    key = (label, stage, dtype)
    reference = results[0]["parity"]["reference"][dtype]
    low, high = cases.UPDATE_ERROR[label]
    for rank, result in enumerate(results):
        got = result["parity"][key]
        error = cases.update_error(got["params"], reference["params"], dtype)
        print(f"{where} {key} rank {rank}: update error {error:.4g}")
        assert error < high, f"rank {rank}: relative error of the update {error:.3g}"
        if dtype == "fp32":
            assert error > low, f"rank {rank}: {error:.3g}: as close as uncompressed"
        assert all(math.isfinite(n) for n in got["norms"])
        # Every rank holds the same parameters (the reduction's result is the same everywhere).
        for name, value in got["params"].items():
            assert torch.equal(value, results[0]["parity"][key]["params"][name]), (rank, name)


def test_qwz_with_hpz_and_two_hops_trains_bit_for_bit_as_flat_qwz():
    """hpZ's backward gathers the secondary copies of the forward's dequantized weights, and
    qwZ's two-hop gather moves the same packed rows as the flat one: the same weights in every
    forward and backward, so the same training, bit for bit."""
    for rank, result in enumerate(_results("2x2")):
        flat = result["parity"][("int8+qwZ", 3, "bf16")]
        hpz = result["parity"][("int8+qwZ+hpZ", 3, "bf16")]
        assert flat["norms"] == hpz["norms"], rank
        for name, value in flat["params"].items():
            assert torch.equal(hpz["params"][name], value), (rank, name)


# -- one reduction against the plain-torch reference -------------------------------------------
def _calls(results: list[dict], key: str) -> list[list[dict]]:
    """Per call index, every rank's record of it (the same bucket on every rank)."""
    per_rank = [r[key]["calls"] for r in results]
    assert per_rank[0], f"{key}: no compressed reduction ran"
    assert len({len(c) for c in per_rank}) == 1
    calls = list(zip(*per_rank))
    for call in calls:
        assert len({c["bucket"] for c in call}) == 1
    return calls


def _factors(calls: list[list[dict]]) -> list[float]:
    """Per call, current / stored loss scale of the bucket's residuals (1 at its first call)."""
    stored, factors = {}, []
    for call in calls:
        bucket, scale = call[0]["bucket"], call[0]["loss_scale"]
        factors.append(scale / stored.get(bucket, scale))
        stored[bucket] = scale
    return factors


def _one_hop_reference(call: list[dict], factor: float, bits: int, me: int) -> torch.Tensor:
    world = len(call)
    m = call[0]["flat"].numel() // world
    total = torch.zeros(m, dtype=torch.float32)
    for sender, record in enumerate(call):
        x = record["flat"][me * m:(me + 1) * m]
        if sender == me:
            total += x
            continue
        if record["total"] is not None:
            x = x + record["total"][me * m:(me + 1) * m] * factor
        total += quantize_dequantize(x, bits, BLOCK)
    return total


def _two_hop_reference(call: list[dict], bits: int, me: int, per_node: int) -> torch.Tensor:
    """Within each node the chunks {n * L + l} go to local rank l (own exact), summed; the
    partial for node n' goes to node n' (own exact), summed."""
    world = len(call)
    nodes, m = world // per_node, call[0]["flat"].numel() // world

    def partial(receiver: int, node_chunk: int) -> torch.Tensor:
        node, local = divmod(receiver, per_node)
        c = node_chunk * per_node + local
        total = torch.zeros(m, dtype=torch.float32)
        for peer in range(node * per_node, (node + 1) * per_node):
            x = call[peer]["flat"][c * m:(c + 1) * m]
            total += x if peer == receiver else quantize_dequantize(x, bits, BLOCK)
        return total

    node, local = divmod(me, per_node)
    total = torch.zeros(m, dtype=torch.float32)
    for other in range(nodes):
        p = partial(other * per_node + local, node)
        total += p if other == node else quantize_dequantize(p, bits, BLOCK)
    return total


def _assert_reduced(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, label: str):
    """Bitwise the reference after the cast to the output dtype: the same fp32 operations
    (quantize, dequantize, add in rank order) in the same order."""
    assert_close(got, expected.to(dtype).float(), rtol=0, atol=0, msg=label)


REDUCTIONS = [  # (where, key, bits, output dtype, hops)
    ("2", "int8", 8, torch.float32, 1),
    ("2", "int4+ef", 4, torch.float32, 1),
    ("2", "int8+ef bf16 stage 3", 8, torch.bfloat16, 1),
    ("2", "int4+ef stage 2 accumulation 2", 4, torch.float32, 1),
    ("2", "fp16", 8, torch.float16, 1),
    ("4", "int8", 8, torch.float32, 1),
    ("2x2", "int8 one hop", 8, torch.float32, 1),
    ("2x2", "int8", 8, torch.float32, 2),
]


@pytest.mark.parametrize("where, key, bits, dtype, hops", REDUCTIONS,
                         ids=[f"{w}-{k}" for w, k, *_ in REDUCTIONS])
def test_reduced_gradient_equals_plain_torch_reference(where, key, bits, dtype, hops):
    results = _results(where)
    calls = _calls(results, key)
    factors = _factors(calls)
    compared = 0
    for call, factor in zip(calls, factors):
        if not all(torch.isfinite(r["flat"]).all() for r in call):
            continue  # the overflow step: skipped, its output is not used
        for me, record in enumerate(call):
            expected = _one_hop_reference(call, factor, bits, me) if hops == 1 else \
                _two_hop_reference(call, bits, me, per_node=2)
            _assert_reduced(record["out"], expected, dtype,
                            f"{where} {key} bucket {record['bucket']} rank {me}")
            compared += 1
    assert compared >= len(results) * 2
    # Compression did something: the exact sum differs from what came.
    differs = 0
    for call in calls:
        exact = sum(r["flat"] for r in call)
        m = exact.numel() // len(call)
        differs += sum(not torch.equal(r["out"], exact[i * m:(i + 1) * m].to(dtype).float())
                       for i, r in enumerate(call))
    assert differs > 0


def test_error_feedback_keeps_the_quantization_error():
    """int4 with error feedback at stage 1: the residual a rank holds before its next call is
    what its previous send lost (x_eff - dequant(quant(x_eff))) for the other ranks' chunks,
    within the fp8 storage's rounding (3 mantissa bits)."""
    results = _results("2")
    calls = _calls(results, "int4+ef")
    by_bucket = {}
    for index, call in enumerate(calls):
        by_bucket.setdefault(call[0]["bucket"], []).append(index)
    checked = 0
    for indices in by_bucket.values():
        for this, following in itertools.pairwise(indices):
            for me, record in enumerate(calls[this]):
                world = len(calls[this])
                m = record["flat"].numel() // world
                after = calls[following][me]["total"]
                assert after is not None and after.abs().max() > 0
                for chunk in range(world):
                    part = slice(chunk * m, (chunk + 1) * m)
                    if chunk == me:
                        continue
                    x = record["flat"][part] + record["total"][part]
                    error = x - quantize_dequantize(x, 4, BLOCK)
                    # the residual's scale: half the largest block scale over fp8's 448
                    step = x.abs().max().item() / 7 / 2 / 448
                    assert_close(after[part], error, rtol=2 ** -4, atol=step * 2 ** -9 + 1e-30)
                    checked += 1
    assert checked > 0


def test_fp16_error_feedback_follows_the_loss_scale_and_resets_on_a_skipped_step():
    results = _results("2")
    calls = _calls(results, "fp16")
    factors = _factors(calls)
    # The case exercises the rescaling: a call whose residuals were stored at another scale.
    assert any(f != 1.0 and any(r["total"].abs().max() > 0 for r in call)
               for call, f in zip(calls, factors)), factors
    for rank, result in enumerate(results):
        after = result["fp16"]["after_step"]
        assert [a["skipped"] for a in after[:3]] == [0, 1, 1], rank
        # Before the overflow some residual was kept; the skipped step zeroed every one.
        assert any(t.abs().max() > 0 for r in results for t in r["fp16"]["after_step"][0]
                   ["totals"].values())
        assert all(t.abs().max() == 0 for t in after[1]["totals"].values()), rank
        assert after[1]["residual_loss_scale"] == {}, rank
        assert any(t.abs().max() > 0 for t in after[-1]["totals"].values()), rank
    # The reduction itself (with the factors) is checked by
    # test_reduced_gradient_equals_plain_torch_reference[2-fp16].


# -- top-k ---------------------------------------------------------------------------------------
def _topk_sends(states: list[dict], call: list[dict], density: float, momentum: float,
                world: int) -> list[torch.Tensor]:
    """DGC, per rank: u = m u + (1 - m) g; v += u; per chunk the ceil(density * m) largest |v|
    are sent and leave v, their u is zeroed; all of the rank's own chunk (it never goes on the
    wire). Returns each rank's dense tensor of what it sent."""
    sends = []
    for rank, record in enumerate(call):
        state = states[rank].setdefault(record["bucket"], {
            "u": torch.zeros_like(record["flat"]), "v": torch.zeros_like(record["flat"])})
        state["u"] = momentum * state["u"] + (1 - momentum) * record["flat"]
        state["v"] += state["u"]
        m = record["flat"].numel() // world
        k = math.ceil(density * m)
        sent = torch.zeros_like(record["flat"])
        for chunk in range(world):
            v, u = state["v"][chunk * m:(chunk + 1) * m], state["u"][chunk * m:(chunk + 1) * m]
            index = torch.arange(m) if chunk == rank else v.abs().topk(k).indices
            sent[chunk * m + index] = v[index]
            v[index] = 0
            u[index] = 0
        sends.append(sent)
    return sends


def test_topk_reduce_scatter_equals_dgc_reference():
    results = _results("2")
    calls = _calls(results, "topk")
    states = [{}, {}]
    for call in calls:
        sends = _topk_sends(states, call, 0.25, 0.5, 2)
        m = call[0]["flat"].numel() // 2
        for me, record in enumerate(call):
            part = slice(me * m, (me + 1) * m)  # its own chunk, then the others in rank order
            expected = sends[me][part] + sum(s[part] for r, s in enumerate(sends) if r != me)
            assert torch.equal(record["out"], expected), (record["bucket"], me)


def test_stage0_topk_gives_every_rank_the_same_gradient():
    results = _results("2")
    for step, grads in enumerate(results[0]["stage0 topk"]["grads"]):
        for rank, result in enumerate(results):
            for bucket, grad in enumerate(result["stage0 topk"]["grads"][step]):
                assert torch.equal(grad, grads[bucket]), (step, rank, bucket)
    for name, value in results[1]["stage0 topk"]["params"].items():
        assert torch.equal(value, results[0]["stage0 topk"]["params"][name]), name
    # DGC's all-reduce: the reduce-scatter of the sends, then the owner's top-k of its chunk
    # (what it does not send stays in its chunk residual), gathered by everyone.
    calls = _calls(results, "stage0 topk")
    states, owner = [{}, {}], {}
    for call in calls:
        sends = _topk_sends(states, call, 0.2, 0.5, 2)
        m = call[0]["flat"].numel() // 2
        k = math.ceil(0.2 * m)
        expected = torch.zeros_like(call[0]["flat"])
        for chunk in range(2):
            part = slice(chunk * m, (chunk + 1) * m)
            dense = sends[chunk][part] + sum(s[part] for r, s in enumerate(sends) if r != chunk) \
                + owner.get((call[0]["bucket"], chunk), 0)
            index = dense.abs().topk(k).indices
            expected[chunk * m + index] = dense[index]
            dense[index] = 0
            owner[(call[0]["bucket"], chunk)] = dense
        for record in call:
            assert torch.equal(record["out"], expected), record["bucket"]


def _momentum_reference(results: list[dict], key: str) -> list[tuple[dict, torch.Tensor]]:
    """compress_momentum (COMPRESSED_MOMENTUM: density 0.25, 2 dense steps, beta1 0.9) in
    plain torch, from each rank's recorded inputs: per rank a residual v; at the first sparse
    step the owner of each chunk adds beta1 x its bias-corrected first moment; each reduction
    v += input, per chunk the k largest |v| are sent and leave v (stage 0: to the chunk's
    owner, who adds its own residual and sends on its k largest); after each step beta1 of all
    that was delivered (at stage 0 by the owners) returns to where it left. Returns (record,
    expected output) pairs for every rank's record."""
    beta1, warmup, density = 0.9, 2, 0.25
    world = len(results)
    stage0 = key.endswith("0")
    calls = _calls(results, key)
    residual = [{} for _ in range(world)]
    owner: dict[tuple[int, int], torch.Tensor] = {}
    carries: list[tuple[dict, object, torch.Tensor]] = []
    pairs, step, seeded = [], None, set()
    for call in calls + [None]:
        if call is None or call[0]["step"] != step:
            for store, where, sent in carries:  # the step's end
                store[where] += beta1 * sent
            carries.clear()
            if call is None:
                break
            step = call[0]["step"]
        bucket = call[0]["bucket"]
        n = call[0]["flat"].numel()
        m = n // world
        if step == warmup and bucket not in seeded:  # the freeze
            seeded.add(bucket)
            for rank in range(world):
                moment = results[rank][key]["after_step"][warmup - 1]["exp_avg"][bucket]
                moment = moment.view(-1) / (1 - beta1 ** warmup)
                if stage0:
                    owner[(bucket, rank)] = beta1 * moment.view(world, m)[rank]
                else:
                    residual[rank][bucket].view(world, m)[rank] += beta1 * moment
        sends = []
        for rank, record in enumerate(call):
            v = residual[rank].setdefault(bucket, torch.zeros(n))
            v += record["flat"]
            sent = torch.zeros(n)
            k = m if step < warmup else math.ceil(density * m)
            for chunk in range(world):
                part = v[chunk * m:(chunk + 1) * m]
                index = torch.arange(m) if chunk == rank else part.abs().topk(k).indices
                sent[chunk * m + index] = part[index]
                part[index] = 0
            if step >= warmup and not stage0:
                carries.append((residual[rank], bucket, sent))
            sends.append(sent)
        expected = torch.zeros(n)
        for chunk in range(world):
            part = slice(chunk * m, (chunk + 1) * m)
            total = sends[chunk][part] + sum(s[part] for r, s in enumerate(sends) if r != chunk)
            if stage0 and step >= warmup:  # the owner's second selection
                total = total + owner[(bucket, chunk)]
                index = total.abs().topk(math.ceil(density * m)).indices
                delivered = torch.zeros(m)
                delivered[index] = total[index]
                owner[(bucket, chunk)] = total - delivered
                carries.append((owner, (bucket, chunk), delivered))
                total = delivered
            expected[part] = total
        for rank, record in enumerate(call):
            pairs.append((record, expected if stage0 else
                          expected.view(world, m)[rank]))
    return pairs


@pytest.mark.parametrize("key", ["momentum stage 2", "momentum stage 0"])
def test_compressed_momentum_sends_adams_momentum(key):
    results = _results("2")
    clip = 0.5  # engine_cases.config
    for rank, result in enumerate(results):
        steps = result[key]["after_step"]
        # Dense AdamW steps, then betas (0, 1): the first moment is what arrives; beta1 moves
        # to the reductions.
        assert [s["groups"][0] for s in steps] == \
            [((0.9, 0.999), True, None)] * 2 + [((0.0, 1.0), False, 0.9)] * 2, rank
        # What each bucket hands over: the raw gradients / world size, x (1 - beta1) once
        # sparse: the residual accumulates the momentum's (1 - beta1) g term.
        for record in result[key]["calls"]:
            factor = (1.0 if record["step"] < 2 else 0.1) / 2
            assert math.isclose(record["flat"].double().square().sum().item(),
                                factor ** 2 * record["raw_sq"], rel_tol=1e-5), record["step"]
        # Each sparse step's first moment is that step's delivered sum, clipped.
        for step in (2, 3):
            clip_coef = min(1.0, clip / (steps[step]["norm"] + 1e-6))
            for bucket, moment in steps[step]["exp_avg"].items():
                arrived = sum(c["out"] for c in result[key]["calls"]
                              if c["step"] == step and c["bucket"] == bucket)
                # The kernel's first moment is m + (1 - beta1)(g - m) (adamw_math.h): with
                # beta1 0 it is g, but for the rounding of g - m, up to an ulp of the larger
                # of the two (the previous step's moment included).
                expected = arrived * clip_coef
                previous = steps[step - 1]["exp_avg"][bucket]
                bound = 2 * torch.finfo(torch.float32).eps * \
                    torch.maximum(previous.abs(), expected.abs())
                assert ((moment - expected).abs() <= bound + 1e-6 * expected.abs()).all(), \
                    (rank, step, bucket)
    for record, expected in _momentum_reference(results, key):
        assert torch.equal(record["out"], expected), (key, record["step"], record["bucket"])
    assert [r[key]["starts"] for r in results] == [[2], [2]]  # at the freeze, not every step


def test_freeze_variance_warns_once_of_a_torch_optimizer():
    first, second = (r["frozen with a torch optimizer"] for r in _results("2"))
    assert len(first) == 1 and not second, (first, second)  # rank 0, at the freeze only
    assert "SGD" in first[0] and '"optimizer": {"type": "AdamW"}' in first[0], first[0]


def test_compressed_momentum_refuses_a_torch_optimizer():
    message = _results("2")[0]["momentum with a torch optimizer"]
    assert message.startswith("zero_ext.initialize: zero_ext.compression.gradients."
                              "compress_momentum"), message
    assert "AdamW" in message and "compress_momentum false" in message


# -- qwZ -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, key", [("2", "qwZ"), ("2x2", "qwZ hierarchical")])
def test_qwz_gathers_quantized_bf16_weights_beyond_fp16_range(where, key):
    results = _results(where)
    world = len(results)
    for rank, result in enumerate(results):
        got = result[key]
        assert got["loss_finite"], rank
        for slots, padded in got["units"]:
            flat = torch.zeros(padded, dtype=torch.bfloat16)
            for name, offset, numel in slots:
                flat[offset:offset + numel] = got["initial"][name].flatten()
            shard = padded // world
            expected = torch.cat([quantize_dequantize(flat[r * shard:(r + 1) * shard], 8, BLOCK)
                                  for r in range(world)]).to(torch.bfloat16)
            for name, offset, numel in slots:
                seen = got["seen"][name].flatten()
                assert torch.equal(seen, expected[offset:offset + numel]), (rank, name)
                assert not torch.equal(seen, got["initial"][name].flatten()), (rank, name)
        seen = torch.cat([t.flatten().float() for t in got["seen"].values()])
        assert torch.isfinite(seen).all() and seen.abs().max() > 1e20
        assert seen.abs().max() > torch.finfo(torch.float16).max
        # Values read back are gathered exactly.
        for name, value in got["initial"].items():
            assert torch.equal(got["full"][name].to(torch.bfloat16), value), (rank, name)
            assert torch.equal(got["gathered"][name], value), (rank, name)


@pytest.mark.parametrize("where, key", [("2", "qwZ"), ("2x2", "qwZ hierarchical")])
def test_qwz_gather_bytes_are_the_packed_rows(where, key):
    """The forward's gathers of the two units: every rank's shard as one int8 row (data of
    whole blocks, a scale per block), in one ring or two hops (the same bytes in total,
    (M - 1) / M of them across nodes); halving is checked on whole blocks in
    test_traffic_of_one_step_matches_the_arithmetic."""
    results = _results(where)
    world = len(results)
    for rank, result in enumerate(results):
        got = result[key]
        rows = [row_bytes(padded // world, 8, BLOCK) for _, padded in got["units"]]
        assert got["traffic"].bytes["all_gather"] == sum((world - 1) * r for r in rows), rank


# -- traffic -------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["2", "4", "2x2"])
def test_traffic_of_one_step_matches_the_arithmetic(where):
    for rank, result in enumerate(_results(where)):
        t = result["traffic"]
        world = len(_results(where))
        buckets = t["bf16"]["buckets"]
        bf16 = t["bf16"]["traffic"].bytes["reduce_scatter"]
        assert bf16 == sum((world - 1) / world * n * 2 for n in buckets)
        int8 = t["int8"]["traffic"].bytes["reduce_scatter"]
        int4 = t["int4"]["traffic"].bytes["reduce_scatter"]
        topk = t["topk"]["traffic"].bytes["reduce_scatter"]
        if where != "2x2":  # one hop: (world - 1) quantized chunks
            assert int8 == sum((world - 1) * row_bytes(n // world, 8, 256) for n in buckets)
            assert int4 == sum((world - 1) * row_bytes(n // world, 4, 256) for n in buckets)
            assert topk == sum((world - 1) * math.ceil(0.01 * n / world) * (4 + 2)
                               for n in buckets)
        assert bf16 / int8 >= 1.9, (rank, bf16 / int8)
        assert bf16 / int4 >= 3.5, (rank, bf16 / int4)
        assert bf16 / topk >= 25, (rank, bf16 / topk)
        # The parameter all-gathers are not compressed below stage 3.
        assert t["int8"]["traffic"].bytes["all_gather"] == t["bf16"]["traffic"].bytes[
            "all_gather"]
        # qwZ: every gather of stage 3 is a unit's; its bytes are the row's over bf16's.
        gather = t["stage3 bf16"]["traffic"].bytes["all_gather"]
        shard = t["stage3 bf16"]["buckets"][0] // world
        assert t["stage3 qwZ"]["traffic"].bytes["all_gather"] == pytest.approx(
            gather * row_bytes(shard, 8, 256) / (2 * shard), rel=1e-12)
        assert t["stage3 qwZ"]["traffic"].bytes["all_gather"] <= 0.51 * gather


def test_two_hops_carry_one_per_node_share_across_nodes():
    """2 nodes x 2 ranks, int8: one hop sends the 2 chunks of the other node's ranks across;
    two hops send one requantized partial (the node's sum) across, and the node's chunks to the
    other local rank within."""
    for rank, result in enumerate(_results("2x2")):
        one = result["traffic one hop"]
        two = result["traffic"]["int8"]
        chunks = [n // 4 for n in one["buckets"]]
        one_bytes, two_bytes = one["traffic"], two["traffic"]
        assert one_bytes.inter_node_bytes["reduce_scatter"] == sum(
            2 * row_bytes(m, 8, 256) for m in chunks), rank
        assert two_bytes.inter_node_bytes["reduce_scatter"] == sum(
            row_bytes(m, 8, 256) for m in chunks), rank
        assert two_bytes.intra_node_bytes["reduce_scatter"] == sum(
            2 * row_bytes(m, 8, 256) for m in chunks), rank
