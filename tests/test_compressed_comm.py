"""zero_ext.comm's compressed collectives against plain-torch references computed here from
every rank's inputs: the blockwise quantizer written out below, DGC's top-k with error feedback
and momentum masking step by step, and the wire bytes by arithmetic. One group per world size
(2, 3; 4 as 2 simulated nodes x 2 for the two-hop reduce-scatter)."""

from __future__ import annotations

import functools
import math

import compressed_comm_cases as cases
import pytest
import torch

from zero_ext import comm

from dist_harness import run_group

BLOCK = cases.BLOCK
N = cases.UNEVEN
WORLDS = [2, 3, 4]


@functools.cache
def _results(world_size: int) -> list[dict]:
    return run_group(world_size, cases.run_cases, world_size == 4)


# -- references ------------------------------------------------------------------------------------
def dequantized(x: torch.Tensor, bits: int, block: int = BLOCK) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """The blockwise symmetric quantizer of design16 §1 in plain torch: (dequantized values,
    each element's quantization step), fp32."""
    qmax = 127.0 if bits == 8 else 7.0
    m = x.numel()
    blocks = -(-m // block)
    padded = torch.zeros(blocks * block)
    padded[:m] = x.float()
    padded = padded.view(blocks, block)
    absmax = padded.abs().amax(dim=1, keepdim=True)
    q = torch.round(padded * (qmax / torch.where(absmax > 0, absmax, 1.0))).clamp(-qmax, qmax)
    scale = absmax / qmax
    return (q * scale).view(-1)[:m], scale.expand(blocks, block).reshape(-1)[:m]


def flat_reference(inputs: list[torch.Tensor], rank: int, bits: int) -> torch.Tensor:
    """Chunk `rank` of the sum: every other rank's chunk dequantized, its own exact, in fp32
    in rank order."""
    total = torch.zeros(N)
    for sender, x in enumerate(inputs):
        chunk = x.view(len(inputs), N)[rank]
        total += chunk.float() if sender == rank else dequantized(chunk, bits)[0]
    return total


def two_hop_reference(inputs: list[torch.Tensor], rank: int, bits: int,
                      per_node: int = 2) -> torch.Tensor:
    """Hop 1 within the node (own local index exact), hop 2 of the fp32 partials across
    nodes (own node exact)."""
    size = len(inputs)
    nodes, node, local = size // per_node, rank // per_node, rank % per_node

    def partial(on_node: int) -> torch.Tensor:  # of chunk node*per_node + local, on that node
        total = torch.zeros(N)
        for sender_local in range(per_node):
            x = inputs[on_node * per_node + sender_local].view(size, N)[rank]
            total += x.float() if sender_local == local else dequantized(x, bits)[0]
        return total

    total = torch.zeros(N)
    for sender_node in range(nodes):
        p = partial(sender_node)
        total += p if sender_node == node else dequantized(p, bits)[0]
    return total


def _close_in_dtype(actual: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal but for the rounding of the fp32 sum to the output's dtype (and fp32 order)."""
    eps = torch.finfo(actual.dtype).eps
    bound = eps * reference.abs() + 1e-30
    assert ((actual.float() - reference).abs() <= bound).all(), \
        (actual.float() - reference).abs().max()


# -- all_to_all at 1 and 4 ranks --------------------------------------------------------------------
def test_all_to_all_over_groups_of_two_simulated_nodes():
    """World, node and across-node groups (4 ranks as 2 x 2): chunk j to group rank j, and
    each chunk's bytes on the link it crosses (3 bytes a chunk)."""
    results = [r["a2a"] for r in _results(4)]
    for label in ("world", "node", "across"):
        for rank, result in enumerate(results):
            group = result[label]["ranks"] or (0, 1, 2, 3)
            me = group.index(rank)
            chunk = 12 // len(group)
            expected = torch.cat([results[g][label]["input"][me * chunk:(me + 1) * chunk]
                                  for g in group])
            assert torch.equal(result[label]["output"], expected), (label, rank)
            traffic = result[label]["traffic"]
            other_node = sum(g // 2 != rank // 2 for g in group)
            same_node = len(group) - 1 - other_node
            assert traffic.inter_node_bytes.get("all_to_all", 0) == other_node * chunk
            assert traffic.intra_node_bytes.get("all_to_all", 0) == same_node * chunk
    assert [r["world"]["traffic"].inter_node_bytes["all_to_all"] for r in results] == [6] * 4


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_a_rank_missing_from_the_all_to_all_ends_on_both_ranks(transport):
    """Bounded by the watch on both transports (gloo's all_to_all_single honours the wait's
    timeout): the same report on both ranks, well before rank 1's 60 s loop ends."""
    outcomes = [r["stall"][transport] for r in _results(2)]
    assert [o[0] for o in outcomes] == ["CollectiveStallError"] * 2, outcomes
    assert outcomes[0][1] == outcomes[1][1]
    assert outcomes[0][1].startswith("zero_ext: rank(s) 1 on ")
    assert "all_to_all[reduce_scatter]" in outcomes[0][1]
    assert max(o[2] for o in outcomes) < 15


# -- quantized reduce-scatter -------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", WORLDS)
def test_quantized_reduce_scatter_sums_dequantized_chunks_own_exact(world_size):
    results = [r["flat"] for r in _results(world_size)]
    for key in results[0]:
        bits = key[0]
        inputs = [r[key]["input"] for r in results]
        for rank, result in enumerate(results):
            reference = flat_reference(inputs, rank, bits)
            _close_in_dtype(result[key]["output"], reference)
            assert torch.equal(result[key]["output_async"], result[key]["output"])


def test_two_hop_reduce_scatter_follows_its_hops_and_stays_near_the_flat_one():
    results = _results(4)
    for key in results[0]["two_hop"]:
        bits = key[0]
        inputs = [r["two_hop"][key]["input"] for r in results]
        for rank, result in enumerate(results):
            two_hop = result["two_hop"][key]["output"]
            _close_in_dtype(two_hop, two_hop_reference(inputs, rank, bits))
            assert torch.equal(result["two_hop"][key]["output_async"], two_hop)
            # Within the quantization error of both: each sender's step once, each node's
            # partial's step once.
            steps = sum(dequantized(x.view(4, N)[rank], bits)[1] for x in inputs)
            exact = sum(x.view(4, N)[rank].float() for x in inputs)
            partial_steps = dequantized(exact, bits)[1] * 2
            flat = result["flat"][key]["output"].float()
            assert ((two_hop.float() - flat).abs() <= steps + partial_steps).all()
            assert not torch.equal(two_hop, result["flat"][key]["output"])


def test_two_hop_sends_one_over_ranks_per_node_across_nodes():
    """Per rank, int8: flat sends 2 rows to the other node and 1 within; two hops send 2 rows
    within (hop 1) and 1 across (hop 2): 1/2 of the flat bytes over the slow link."""
    row = 4 * 32 + 4 * 4  # 100 elements: 4 blocks of 32 int8 and 4 fp32 scales
    for result in _results(4):
        flat = result["flat"][(8, "torch.float32")]["traffic"]
        two_hop = result["two_hop"][(8, "torch.float32")]["traffic"]
        assert flat.inter_node_bytes == {"reduce_scatter": 2 * row}
        assert flat.intra_node_bytes == {"reduce_scatter": row}
        assert two_hop.inter_node_bytes == {"reduce_scatter": row}
        assert two_hop.intra_node_bytes == {"reduce_scatter": 2 * row}
        assert two_hop.inter_node_bytes["reduce_scatter"] * 2 == \
            flat.inter_node_bytes["reduce_scatter"]


@pytest.mark.parametrize("world_size,label", [(2, "ef"), (3, "ef"), (4, "ef_two_hop")])
def test_error_feedback_tracks_the_cumulative_sum(world_size, label):
    """int4, one constant input sent 12 times: with error feedback the delivered total stays
    within one quantization step per sender of 12 x the sum (the error of one send is carried
    into the next); without, the same rounding repeats and the error grows with the steps."""
    results = [r[label] for r in _results(world_size)]
    inputs = [r["input"] for r in results]
    steps = 12
    for rank, result in enumerate(results):
        chunks = [x.view(world_size, N)[rank] for x in inputs]
        exact = steps * sum(c.double() for c in chunks)
        step = sum(dequantized(c, 4)[1].double() for c in chunks)
        if label == "ef_two_hop":
            step = step + dequantized(sum(c.float() for c in chunks), 4)[1].double() * 2
        with_ef = (result["feedback"]["delivered"] - exact).abs()
        without = (result["none"]["delivered"] - exact).abs()
        assert (with_ef <= step).all(), (with_ef / step).max()
        assert without.max() > 3 * with_ef.max()
        assert (without > step).any()


@pytest.mark.parametrize("world_size", WORLDS)
def test_error_feedback_residual_holds_what_was_not_delivered(world_size):
    """delivered + every rank's residual (flat_total) = 12 x the sum, up to the fp8 storage
    of each step's residual (2^-4 relative) summed over the steps."""
    label = "ef_two_hop" if world_size == 4 else "ef"
    results = [r[label] for r in _results(world_size)]
    inputs = [r["input"] for r in results]
    residual = sum(r["feedback"]["flat_total"].double() for r in results)
    for rank, result in enumerate(results):
        chunks = [x.view(world_size, N)[rank] for x in inputs]
        exact = 12 * sum(c.double() for c in chunks)
        step = sum(dequantized(c, 4)[1].double() for c in chunks)
        left = exact - result["feedback"]["delivered"]
        mine = residual.view(world_size, N)[rank]
        assert ((left - mine).abs() <= 12 * step / 16 + 1e-6).all()
        assert (left - mine).abs().max() < (left.abs().max() / 4)


# -- quantized all-gather ------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", WORLDS)
def test_quantized_all_gather_is_identical_everywhere_and_within_half_a_step(world_size):
    results = [r["gather"] for r in _results(world_size)]
    for key in results[0]:
        inputs = [r[key]["input"] for r in results]
        expected = torch.cat([dequantized(x, 8)[0] for x in inputs])
        for result in results:
            assert torch.equal(result[key]["output"], results[0][key]["output"])
            assert torch.equal(result[key]["output_async"], result[key]["output"])
            _close_in_dtype(result[key]["output"], expected)
            half_step = torch.cat([dequantized(x, 8)[1] / 2 for x in inputs])
            exact = torch.cat(inputs).float()
            eps = torch.finfo(inputs[0].dtype).eps
            assert ((result[key]["output"].float() - exact).abs()
                    <= half_step * (1 + 1e-6) + eps * exact.abs()).all()
        if key == "torch.bfloat16":
            assert results[0][key]["output"].float().abs().max() > 65504  # fp16 would be inf
    if world_size == 4:
        flat = results[0]["torch.float32"]["output"]
        for r in _results(4):
            assert torch.equal(r["gather_hierarchical"], flat)


@pytest.mark.parametrize("world_size", WORLDS)
def test_int8_all_gather_sends_about_half_of_bf16(world_size):
    for result in _results(world_size):
        gather = result["gather"]["torch.bfloat16"]
        row = 4 * 32 + 4 * 4
        assert gather["traffic"].bytes == {"all_gather": (world_size - 1) * row}
        assert gather["plain_traffic"].bytes == {"all_gather": (world_size - 1) * N * 2}
        # Blocks of 32 here: the scales cost 4/32 of the payload (1/64 at the default 256).
        ratio = gather["plain_traffic"].bytes["all_gather"] / gather["traffic"].bytes["all_gather"]
        assert ratio == pytest.approx(2 * 100 / 144)


# -- top-k ---------------------------------------------------------------------------------------------
def top_magnitudes(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest |x|; of equal magnitudes the lowest indices, as the op sends
    them (bf16 inputs tie often at the k-th, and torch.topk's choice among ties is arbitrary)."""
    return torch.sort(x.abs(), descending=True, stable=True).indices[:k]


def dgc_reference(inputs: list[list[torch.Tensor]], momentum: float, density: float,
                  all_reduce: bool):
    """DGC step by step for every rank: v += u (u = m u + (1 - m) g), per chunk the top-k of
    |v| sent as bf16 and taken out of v, u masked, but the rank's own chunk, which never goes on
    the wire, delivered whole in fp32 (v and u zeroed there); each chunk's sum of what arrived
    and its owner's own chunk, and for
    all-reduce the owner's top-k of (owner residual + sum). Returns per step the outputs by
    rank, and the states by rank."""
    size = len(inputs)
    k = math.ceil(density * N)
    v = [torch.zeros(size * N) for _ in range(size)]
    u = [torch.zeros(size * N) for _ in range(size)]
    owner = [torch.zeros(N) for _ in range(size)]
    outputs, states = [], []
    for step in range(len(inputs[0])):
        sent = []
        for r in range(size):
            g = inputs[r][step].float()
            if momentum:
                u[r] = momentum * u[r] + (1 - momentum) * g
                v[r] += u[r]
            else:
                v[r] += g
            picks = []
            for c in range(size):
                chunk = v[r][c * N:(c + 1) * N]
                if c == r:
                    picks.append((torch.arange(N), chunk.clone()))
                    chunk.zero_()
                    u[r][c * N:(c + 1) * N] = 0
                    continue
                index = top_magnitudes(chunk, k)
                values = chunk[index].to(torch.bfloat16)
                chunk[index] -= values.float()
                u[r][c * N + index] = 0
                picks.append((index, values))
            sent.append(picks)
        sums = []
        for c in range(size):
            total = sent[c][c][1].clone()  # the owner's own chunk, then the others in rank order
            for r in range(size):
                if r != c:
                    index, values = sent[r][c]
                    total.index_add_(0, index, values.float())
            sums.append(total)
        if all_reduce:
            full = torch.zeros(size * N, dtype=torch.bfloat16)
            for c in range(size):
                owner[c] += sums[c]
                index = top_magnitudes(owner[c], k)
                values = owner[c][index].to(torch.bfloat16)
                owner[c][index] -= values.float()
                full[c * N + index] = values
            outputs.append([full] * size)
        else:
            outputs.append(sums)
        states.append([{"residual": v[r].clone(), "momentum": u[r].clone(),
                        "owner_residual": owner[r].clone()} for r in range(size)])
    return outputs, states


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("all_reduce", [False, True], ids=["reduce_scatter", "all_reduce"])
@pytest.mark.parametrize("world_size", WORLDS)
def test_topk_delivers_the_top_k_of_each_residual(world_size, all_reduce, momentum):
    label = ("topk_ar" if all_reduce else "topk_rs") + ("_momentum" if momentum else "")
    results = [r[label] for r in _results(world_size)]
    inputs = [r["inputs"] for r in results]
    outputs, states = dgc_reference(inputs, momentum, 0.1, all_reduce)
    for step in range(len(outputs)):
        for rank, result in enumerate(results):
            actual, expected = result["outputs"][step], outputs[step][rank]
            torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-6, atol=1e-6)
            state = result["states"][step]
            torch.testing.assert_close(state["residual"], states[step][rank]["residual"],
                                       rtol=1e-5, atol=1e-6)
            if momentum:
                # Masked where sent: exactly zero there, the EMA elsewhere.
                expected_u = states[step][rank]["momentum"]
                assert torch.equal(state["momentum"] == 0, expected_u == 0)
                torch.testing.assert_close(state["momentum"], expected_u, rtol=1e-5, atol=1e-6)
            else:
                assert "momentum" not in state
            if all_reduce:
                torch.testing.assert_close(state["owner_residual"],
                                           states[step][rank]["owner_residual"],
                                           rtol=1e-5, atol=1e-6)
    if all_reduce:
        for result in results:
            assert all(torch.equal(a, b) for a, b in zip(result["outputs"],
                                                         results[0]["outputs"]))


@pytest.mark.parametrize("world_size", WORLDS)
def test_topk_torch_path_equals_the_op(world_size):
    """The torch ops CUDA tensors take (no CUDA kernel) reduce as the C++ op does, own chunk
    and slices of the residual included: fp32 inputs, so no ties decide the set."""
    for result in _results(world_size):
        paths = result["topk_torch_path"]
        for all_reduce in (False, True):
            op, torch_path = paths[("op", all_reduce)], paths[("torch", all_reduce)]
            for a, b in zip(op["outputs"], torch_path["outputs"]):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
            for name, tensor in op["state"].items():
                torch.testing.assert_close(torch_path["state"][name], tensor, rtol=1e-6,
                                           atol=1e-7)


@pytest.mark.parametrize("all_reduce", [False, True], ids=["reduce_scatter", "all_reduce"])
@pytest.mark.parametrize("world_size", WORLDS)
def test_topk_accounts_for_every_input_exactly(world_size, all_reduce):
    """Without momentum: what was delivered over the steps plus every rank's residual mass
    (flat_total) equals the sum of every input, in fp32 arithmetic."""
    results = [r["topk_ar" if all_reduce else "topk_rs"] for r in _results(world_size)]
    inputs = sum(x.double() for r in results for x in r["inputs"])
    if all_reduce:
        delivered = sum(y.double() for y in results[0]["outputs"])
    else:
        delivered = torch.cat([sum(y.double() for y in r["outputs"]) for r in results])
    residual = sum(r["flat_total"].double() for r in results)
    torch.testing.assert_close(delivered + residual, inputs, rtol=0, atol=1e-5)
    assert residual.abs().max() > 0.5  # most of the mass is still waiting at density 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("all_reduce", [False, True], ids=["reduce_scatter", "all_reduce"])
@pytest.mark.parametrize("world_size", WORLDS)
def test_topk_falls_back_to_dense_with_every_residual(world_size, all_reduce, dtype):
    """Density 0.5: sparse would not be smaller, so the dense collective runs on gradient +
    residual + pending momentum (m / (1 - m) u), and only rounding stays behind."""
    results = [r["dense"][(all_reduce, str(dtype))] for r in _results(world_size)]
    due = []
    for rank, r in enumerate(results):
        before = r["before_dense"]
        total = before["residual"] + r["inputs"][1].float() + before["momentum"]
        if all_reduce:
            total.view(world_size, N)[rank] += before["owner_residual"]
        due.append(total)
    sent = [d.to(dtype).float() for d in due]
    exact = sum(sent)
    for rank, r in enumerate(results):
        output = r["outputs"][1].float()
        expected = exact if all_reduce else exact.view(world_size, N)[rank]
        bound = world_size * torch.finfo(dtype).eps * sum(s.abs() for s in sent)
        if not all_reduce:
            bound = bound.view(world_size, N)[rank]
        assert ((output - expected).abs() <= bound).all()
        assert output.abs().max() > 1  # not the zeros an aliased residual would send
        torch.testing.assert_close(r["after"]["residual"], due[rank] - sent[rank])
        assert not r["after"]["momentum"].any()
        op = "all_reduce" if all_reduce else "reduce_scatter"
        size = torch.finfo(dtype).bits // 8
        assert r["traffic"].bytes == {op: (2 if all_reduce else 1) * N * (world_size - 1) * size}


# -- wire bytes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", WORLDS)
def test_wire_bytes_against_the_arithmetic(world_size):
    n, others = 4096, world_size - 1
    for result in _results(world_size):
        b = {key: t.bytes for key, t in result["bytes"].items()}
        bf16 = b[("plain", "torch.bfloat16")]["reduce_scatter"]
        fp32 = b[("plain", "torch.float32")]["reduce_scatter"]
        int8 = b[("int8", "bf16")]["reduce_scatter"]
        int4 = b[("int4", "bf16")]["reduce_scatter"]
        topk = b[("topk", "bf16")]["reduce_scatter"]
        topk_ar = b[("topk all_reduce", "bf16")]["all_reduce"]
        bf16_ar = b[("plain all_reduce", "torch.bfloat16")]["all_reduce"]
        assert bf16 == others * n * 2 and fp32 == others * n * 4
        assert int8 == others * (n + 4 * n // 256)
        assert int4 == others * (n // 2 + 4 * n // 256)
        k = math.ceil(0.01 * n)
        assert topk == others * k * (4 + 2)
        assert topk_ar == 2 * others * k * (4 + 2)
        assert bf16 / int8 >= 1.9 and fp32 / int8 >= 3.8
        assert bf16 / int4 >= 3.5
        assert bf16 / topk >= 25 and bf16_ar / topk_ar >= 25


# -- the feedback objects on their own (no group) ----------------------------------------------------
@pytest.mark.parametrize("world,layout", [(3, None), (4, (2, 2))])
def test_quant_feedback_reshards_through_flat_totals(world, layout):
    """from_flat_total on every rank, then the flat totals summed: the total again (fp8 keeps
    2^-4 relative), and no rank holds mass in a row it never quantizes (its own chunk; in two
    hops its local index's chunks in hop 1, its own node's in hop 2)."""
    numel = 8 * world
    total = torch.randn(numel, generator=torch.Generator().manual_seed(5))
    states = [comm.QuantFeedback(numel, world, r, layout) for r in range(world)]
    for state in states:
        state.from_flat_total(total, world)
    back = sum(s.flat_total() for s in states)
    assert ((back - total).abs() <= total.abs() / 16 + 1e-6).all()
    for r, state in enumerate(states):
        first = state.residual.float().view(world, 8)
        assert not first[r].any()
        if layout is not None:
            assert not first.view(2, 2, 8)[:, r % 2].any()
            assert not state.across_residual.float().view(2, 8)[r // 2].any()
        saved = {k: v.clone() for k, v in state.tensors().items()}
        before = state.flat_total()
        state.reset()
        assert not state.flat_total().any()
        state.load_tensors(saved)
        assert torch.equal(state.flat_total(), before)
    with pytest.raises(ValueError, match="QuantFeedback.load_tensors: expected tensors"):
        states[0].load_tensors({"residual": states[0].residual})


def test_topk_feedback_reshards_through_flat_totals():
    states = [comm.TopkFeedback(12, 3, momentum=0.5, all_reduce=True) for _ in range(3)]
    total = torch.randn(12, generator=torch.Generator().manual_seed(6))
    for state in states:
        state.from_flat_total(total, 3, momentum=total * 2)
    torch.testing.assert_close(sum(s.flat_total() for s in states), total)
    torch.testing.assert_close(sum(s.flat_momentum() for s in states), total * 2)
    with pytest.raises(ValueError, match="TopkFeedback: numel 10 must be a multiple"):
        comm.TopkFeedback(10, 3)


def test_on_one_rank_the_reductions_are_copies():
    x = torch.randn(40)
    y = torch.empty(40)
    comm.quantized_reduce_scatter(y, x, bits=4, block_size=BLOCK)
    assert torch.equal(y, x)
    comm.quantized_all_gather(y, x, block_size=BLOCK, async_op=True).wait()
    assert torch.equal(y, x)
    comm.sparse_reduce_scatter(y, x, state=comm.TopkFeedback(40, 1), density=0.01)
    assert torch.equal(y, x)
    with pytest.raises(ValueError, match="zero_ext.comm.quantized_reduce_scatter: expected"):
        comm.quantized_reduce_scatter(torch.empty(3), x, bits=8, block_size=BLOCK)


def _top_set(rows: torch.Tensor, k: int) -> list[set]:
    return [set(r.tolist()) for r in rows.abs().topk(k, dim=1).indices]


def test_top_magnitudes_is_torch_topks_set_on_large_rows():
    """The sampled threshold (DGC's selection) picks exactly torch.topk's entries: on random
    rows, when the sample sees only the large entries (fewer than k candidates: the row's own
    topk), when it sees none of them (more candidates), on a row of mostly zeros, and a NaN
    and an inf are sent like the largest values."""
    from zero_ext.comm.compressed import top_magnitudes

    gen = torch.Generator().manual_seed(9)
    m, k = 50_000, 500
    rows = torch.randn(3, m, generator=gen)
    stride = m // 8192
    # Row 1: only sampled entries are large, so 176 are above the threshold (< k): topk.
    rows[1, ::stride] *= 100
    rows[1, ::stride * 16] *= 1000
    # Row 2: the sample sees zeros only (threshold 0, every entry a candidate), the 50 large
    # entries and 1000 small ones off the sample.
    rows[2] = 0
    rows[2, 1::stride][:50] = torch.randn(50, generator=gen)
    rows[2, 7 + torch.randperm(m - 7, generator=gen)[:1000]] += 1e-3
    for case in (rows, rows[:1] * -1):
        assert [set(r.tolist()) for r in top_magnitudes(case, k)] == _top_set(case, k)
    spiky = torch.randn(2, m, generator=gen)
    spiky[0, 3], spiky[1, 5] = float("nan"), float("inf")
    picked = top_magnitudes(spiky, k)
    assert 3 in picked[0].tolist() and 5 in picked[1].tolist()
    assert [set(r.tolist()) for r in picked][1] == _top_set(spiky[1:], k)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_top_magnitudes_on_cuda_is_torch_topks_set_without_a_host_sync():
    """On a GPU the selection runs from the gradient hook while backward is queued: it must not
    wait for the device (the CPU path's per-chunk nonzero() would, once per chunk)."""
    from zero_ext.comm.compressed import top_magnitudes

    rows = torch.randn(3, 50_000, generator=torch.Generator().manual_seed(9)).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        picked = top_magnitudes(rows, 500)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [set(r.tolist()) for r in picked.cpu()] == _top_set(rows.cpu(), 500)


@pytest.mark.parametrize(("momentum", "carry"), [(0.0, 0.0), (0.9, 0.0), (0.0, 0.9)])
def test_topk_own_chunk_allocates_nothing_of_its_size_after_the_first(momentum, carry):
    """A top-k reduction's own chunk (fp32 sum) reuses one buffer on CPU, and a bf16 gradient is
    read into it: fp32.add_(bf16) would first copy the gradient to a new fp32 tensor of its
    size, and a new chunk-sized buffer each reduction was page faults on every micro-step
    (benchmarks/RESULTS.md). Compressed momentum's carry (beta1 of what the own chunk
    delivered) is summed in one buffer, not kept as each reduction's own chunk. After the
    first reduction, taking the own chunk, noting its carry and selecting the others allocate
    only the packed rows (seen failing with `residual.add(gradient)`, and with the carry
    keeping each own chunk)."""
    from torch.profiler import ProfilerActivity, profile

    from zero_ext.comm import compressed

    numel, k = 1 << 20, 1000
    state = compressed.TopkFeedback(numel, 2, momentum=momentum)
    state.carry = carry
    gradient = torch.randn(numel).to(torch.bfloat16)

    def reduce_once():
        state._note_own_delivery(compressed._take_own_chunk(state, gradient))
        compressed._select_others(state, gradient, k)

    reduce_once()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        reduce_once()
    chunk_bytes = numel // 2 * 4
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert allocated < chunk_bytes // 8, (allocated, [
        (e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0])
