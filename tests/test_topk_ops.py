"""zero_ext::topk_feedback_select against a plain-torch reference.

The reference below is Deep Gradient Compression's step written op by op in torch: the residual
accumulates the gradient (or the momentum u * m + g * (1 - m), each product and the sum rounded
on its own), each chunk's entries are ranked by a stable descending sort of |v| (torch ranks NaN
above inf above every finite value; equal magnitudes keep index order, so the lowest indices win
ties), the first k are sent as int32 indices in ascending order then their values rounded to
the value dtype, and each leaves the residual as v - float(value) and the momentum as 0. The op
must match it bit for bit: packed rows, residual and momentum.
"""

import math

import pytest
import torch

from zero_ext import ops
from zero_ext.comm import compressed

from cpu_isas import run_under_each_isa

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN, INF = float("nan"), float("inf")


def reference(v, g, chunks, k, u=None, factor=0.0, dtype=None):
    """(packed rows, residual, momentum) after one send, from copies of v, g and u."""
    dtype = g.dtype if dtype is None else dtype
    v, gf = v.clone(), g.float()
    if u is not None:
        u = u * factor + gf * (1.0 - factor)
        v = v + u
    else:
        v = v + gf
    rows = v.view(chunks, -1)
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
    index = order[:, :k].sort(dim=1).values
    picked = rows.gather(1, index)
    values = picked.to(dtype)
    rows.scatter_(1, index, picked - values.float())
    if u is not None:
        u.view(chunks, -1).scatter_(1, index, 0.0)
    packed = torch.cat([index.to(torch.int32).view(torch.uint8), values.view(torch.uint8)], dim=1)
    return packed, v, u


def run_op(v, g, chunks, k, u=None, factor=0.0, dtype=None):
    v = v.clone()
    u = None if u is None else u.clone()
    packed = ops.topk_feedback_select(v, g, chunks, k, momentum=u, momentum_factor=factor,
                                      dtype=dtype)
    return packed, v, u


def unpack(packed, k, dtype):
    # A copy with standard strides: a one-row slice counts as contiguous with its row stride.
    def part(bytes_):
        return bytes_.clone(memory_format=torch.contiguous_format)

    return part(packed[:, :4 * k]).view(torch.int32), part(packed[:, 4 * k:]).view(dtype)


def assert_same(actual, expected, k, dtype, where=""):
    """Packed rows, residual and momentum equal bit for bit (NaN where NaN)."""
    (packed, v, u), (ref_packed, ref_v, ref_u) = actual, expected
    assert packed.shape == ref_packed.shape, where
    index, values = unpack(packed, k, dtype)
    ref_index, ref_values = unpack(ref_packed, k, dtype)
    assert torch.equal(index, ref_index), f"{where}: indices differ"
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0, equal_nan=True, msg=where)
    torch.testing.assert_close(v, ref_v, rtol=0, atol=0, equal_nan=True, msg=where)
    if ref_u is None:
        assert u is None
    else:
        torch.testing.assert_close(u, ref_u, rtol=0, atol=0, equal_nan=True, msg=where)


def _state(n, gen, dtype=torch.bfloat16):
    v = torch.randn(n, generator=gen) * 1e-2
    g = (torch.randn(n, generator=gen) * 1e-2).to(dtype)
    u = torch.randn(n, generator=gen) * 1e-2
    return v, g, u


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, momentum):
    gen = torch.Generator().manual_seed(1)
    for chunks, m in [(1, 1237), (2, 1001), (3, 777), (4, 4099), (2, 20_011)]:
        v, g, u = _state(chunks * m, gen, dtype)
        u = u if momentum else None
        for k in sorted({1, math.ceil(0.01 * m), m // 3, m}):
            where = f"chunks {chunks}, m {m}, k {k}"
            assert_same(run_op(v, g, chunks, k, u, momentum),
                        reference(v, g, chunks, k, u, momentum), k, dtype, where)


def test_sends_the_values_rounded_and_keeps_the_rounding_error():
    # bf16 values of fp32 residuals: what stays is exactly v - float(bf16(v)), not 0.
    v = torch.tensor([1.0 + 2**-10, -3.0 - 2**-12, 0.5, 0.25], dtype=torch.float32)
    packed, after, _ = run_op(v, torch.zeros(4, dtype=torch.bfloat16), 1, 2)
    index, values = unpack(packed, 2, torch.bfloat16)
    assert index.tolist() == [[0, 1]]
    assert values.float().tolist() == [[1.0, -3.0]]
    assert after.tolist() == [2**-10, -2**-12, 0.5, 0.25]


def test_momentum_step_and_masking():
    # u = 0.5 u + 0.5 g, v += u; the sent entry's momentum is zeroed, the rest keep theirs.
    v = torch.tensor([0.0, 1.0, 0.0, 0.0])
    u = torch.tensor([2.0, 0.0, 4.0, -8.0])
    g = torch.tensor([0.0, 0.0, 2.0, 0.0])
    packed, after, u_after = run_op(v, g, 1, 1, u, 0.5)
    index, values = unpack(packed, 1, torch.float32)
    assert index.tolist() == [[3]] and values.tolist() == [[-4.0]]
    assert after.tolist() == [1.0, 1.0, 3.0, 0.0]
    assert u_after.tolist() == [1.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_entries_are_sent_first(dtype):
    # A non-finite gradient must reach the receiver's overflow check even at k = 1 ... 3.
    gen = torch.Generator().manual_seed(2)
    chunks, m = 3, 5003
    v, g, _ = _state(chunks * m, gen, dtype)
    g[m + 17] = NAN            # chunk 1
    g[2 * m + 4000] = INF      # chunk 2: inf, -inf and a huge finite value
    g[2 * m + 10] = -INF
    v[2 * m + 11] = 1e30
    for k in (1, 2, 3):
        actual = run_op(v, g, chunks, k)
        assert_same(actual, reference(v, g, chunks, k), k, dtype, f"k {k}")
        index, _ = unpack(actual[0], k, dtype)
        assert 17 in index[1].tolist()
        assert {10, 4000} <= set(index[2].tolist()) or k == 1 and index[2].tolist() == [10]
        if k == 3:
            assert index[2].tolist() == [10, 11, 4000]


@pytest.mark.parametrize("momentum", [0.0, 0.5], ids=["plain", "momentum"])
def test_ties_go_to_the_lowest_indices(momentum):
    gen = torch.Generator().manual_seed(3)
    u = torch.zeros(4 * 1000)
    cases = {
        "all zero": (torch.zeros(4 * 1000), torch.zeros(4 * 1000)),
        "few values": (torch.zeros(4 * 1000),
                       torch.tensor([0.25, -0.25, 0.5, 0.125])[torch.randint(0, 4, (4000,),
                                                                             generator=gen)]),
        # Every entry in one histogram bin, most of them equal: the boundary is settled
        # inside the bin.
        "one bin": (torch.full((4000,), 1.0) + (torch.rand(4000, generator=gen) < 0.1) * 2**-20,
                    torch.zeros(4000)),
    }
    for name, (v, g) in cases.items():
        for k in (1, 7, 500, 999, 1000):
            args = (v, g, 4, k, u if momentum else None, momentum)
            assert_same(run_op(*args), reference(*args), k, torch.float32, f"{name}, k {k}")
    index, _ = unpack(run_op(torch.zeros(8), torch.zeros(8), 2, 3)[0], 3, torch.float32)
    assert index.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_threads_and_units_do_not_change_results():
    # Chunks of several units each (65536+ elements), ties spread over units.
    gen = torch.Generator().manual_seed(4)
    chunks, m = 2, 300_007
    v, g, u = _state(chunks * m, gen)
    v[::3] = 0.5  # a third of the entries tie at 0.5 (k = 3000 takes the first of them)
    g[::3] = 0
    u[::3] = 0
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for k in (3000, m // 3 + 5):
                args = (v, g, chunks, k, u, 0.25)
                assert_same(run_op(*args), reference(*args), k, torch.bfloat16,
                            f"threads {threads}, k {k}")
    finally:
        torch.set_num_threads(previous)


def test_value_dtype_other_than_the_gradient():
    # sparse_all_reduce's owner step: an fp32 sum accumulated, bf16 values sent.
    gen = torch.Generator().manual_seed(5)
    v, g, _ = _state(3001, gen, torch.float32)
    args = (v, g, 1, 40, None, 0.0, torch.bfloat16)
    actual = run_op(*args)
    assert actual[0].shape == (1, 40 * 6)
    assert_same(actual, reference(*args), 40, torch.bfloat16)


def test_empty_and_k_zero():
    packed, v, _ = run_op(torch.zeros(0), torch.zeros(0), 2, 0)
    assert packed.shape == (2, 0)
    # k = 0 still accumulates (the gradient is kept for a later send).
    v, g = torch.ones(6), torch.full((6,), 2.0, dtype=torch.bfloat16)
    packed, after, _ = run_op(v, g, 3, 0)
    assert packed.shape == (3, 0) and after.tolist() == [3.0] * 6


_ISA_SCRIPT = """
import sys, torch, zero_ext
from zero_ext import ops
out = []
for case in torch.load(sys.argv[1]):
    v, u = case["v"].clone(), case["u"].clone()
    packed = ops.topk_feedback_select(v, case["g"], case["chunks"], case["k"], momentum=u,
                                      momentum_factor=0.9)
    out.append([packed, v, u])
torch.save({"isa": zero_ext._C.cpu_isa_selected(), "results": out}, sys.argv[2])
"""


def test_every_compiled_isa_matches_reference(tmp_path):
    gen = torch.Generator().manual_seed(6)
    cases, expected = [], []
    for dtype, chunks, m, k in [(torch.float32, 2, 1003, 11), (torch.bfloat16, 3, 70_001, 701),
                                (torch.float16, 1, 77, 77)]:
        v, g, u = _state(chunks * m, gen, dtype)
        g[chunks * m // 2], g[-1] = NAN, -INF  # in the SIMD body and in the scalar tail
        cases.append({"v": v, "g": g, "u": u, "chunks": chunks, "k": k})
        expected.append((reference(v, g, chunks, k, u, 0.9), k, dtype))
    for isa, run in run_under_each_isa(_ISA_SCRIPT, cases, tmp_path).items():
        for actual, (ref, k, dtype) in zip(run["results"], expected):
            assert_same(tuple(actual), ref, k, dtype, isa)


def test_torch_path_sends_the_same_entries():
    # The path compressed.py takes for tensors the op has no kernel for (CUDA), run on CPU:
    # distinct magnitudes, so no tie decides.
    gen = torch.Generator().manual_seed(7)
    chunks, m, k = 2, 40_000, 400
    v, g, u = _state(chunks * m, gen)
    v2, u2 = v.clone(), u.clone()
    packed = compressed._select_with_feedback_torch(v2, g, chunks, k, torch.bfloat16, u2, 0.9)
    assert_same((packed, v2, u2), reference(v, g, chunks, k, u, 0.9), k, torch.bfloat16)


def _opcheck_samples():
    gen = torch.Generator().manual_seed(8)
    op = torch.ops.zero_ext.topk_feedback_select.default
    v, g, u = _state(3 * 101, gen)
    return [
        (op, (v.clone(), g, 3, 5), {}),
        (op, (v.clone(), g.float(), 1, 303), {"dtype": torch.float16}),
        (op, (v.clone(), g, 3, 7), {"momentum": u.clone(), "momentum_factor": 0.9}),
    ]


def test_opcheck():
    for op, args, kwargs in _opcheck_samples():
        torch.library.opcheck(op, args, kwargs)
    op = torch.ops.zero_ext.topk_feedback_select.default
    written = {a.name for a in op._schema.arguments if a.alias_info and a.alias_info.is_write}
    assert written == {"residual", "momentum"}


def test_compiles_with_torch_compile():
    gen = torch.Generator().manual_seed(9)
    v, g, u = _state(2 * 500, gen)
    expected = reference(v, g, 2, 9, u, 0.5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def send(v, g, u):
        return ops.topk_feedback_select(v, g, 2, 9, momentum=u, momentum_factor=0.5)

    v2, u2 = v.clone(), u.clone()
    assert_same((send(v2, g, u2), v2, u2), expected, 9, torch.bfloat16)


_V = torch.zeros(16)


def _call(v=None, g=None, chunks=2, k=3, **kwargs):
    v = torch.zeros(16) if v is None else v
    g = torch.zeros(16, dtype=torch.bfloat16) if g is None else g
    return ops.topk_feedback_select(v, g, chunks, k, **kwargs)


_BAD_CALLS = [
    ({"v": torch.zeros(16, dtype=torch.bfloat16)}, TypeError,
     "topk_feedback_select: expected residual of dtype Float .fp32 state"),
    ({"v": torch.zeros(4, 4)}, ValueError, "expected residual to be 1-D"),
    ({"g": torch.zeros(15)}, ValueError, "expected grad to have residual's numel 16, got 15"),
    ({"g": torch.zeros(16, dtype=torch.int32)}, TypeError, "expected grad of dtype Float"),
    ({"g": _V, "v": _V}, ValueError, "grad and residual must not share memory"),
    ({"chunks": 3}, ValueError, "numel 16 is not divisible by chunks = 3"),
    ({"chunks": 0}, ValueError, "expected chunks >= 1, got 0"),
    ({"k": 9}, ValueError, "expected k in \\[0, 8\\]"),
    ({"k": -1}, ValueError, "expected k in \\[0, 8\\]"),
    ({"momentum_factor": 0.9}, ValueError, "momentum_factor = 0.9 without a momentum tensor"),
    ({"momentum": torch.zeros(16), "momentum_factor": 1.0}, ValueError,
     "expected momentum_factor in \\[0, 1\\)"),
    ({"momentum": torch.zeros(8)}, ValueError, "expected momentum to have residual's numel"),
    ({"momentum": torch.zeros(16).half()}, TypeError, "expected momentum of dtype Float"),
    ({"dtype": torch.int8}, TypeError, "expected dtype Float, BFloat16 or Half"),
]


@pytest.mark.parametrize("overrides,error,message", _BAD_CALLS)
def test_bad_arguments_raise_a_clear_error(overrides, error, message):
    with pytest.raises(error, match="zero_ext::topk_feedback_select: .*" + message
                       if not message.startswith("topk") else "zero_ext::" + message):
        _call(**overrides)


def test_the_compressed_collectives_use_the_op(monkeypatch):
    # On CPU, sparse_reduce_scatter's and sparse_all_reduce's selection is one call of the op.
    calls = []
    op = ops.topk_feedback_select

    def counted(*args, **kwargs):
        calls.append(args[2:4])
        return op(*args, **kwargs)

    monkeypatch.setattr(compressed.ops, "topk_feedback_select", counted)
    gen = torch.Generator().manual_seed(10)
    v, g, u = _state(2 * 3000, gen)
    v2, u2 = v.clone(), u.clone()
    packed = compressed._select_with_feedback(v2, g, 2, 30, torch.bfloat16, u2, 0.9)
    assert calls == [(2, 30)]
    assert_same((packed, v2, u2), reference(v, g, 2, 30, u, 0.9), 30, torch.bfloat16)
