"""zero_ext::flatten_into_ and zero_ext::unflatten_from against torch.cat / slicing / .to(dtype).

The reference is plain torch, op by op: a cast is ``t.to(dtype)``, a scaled copy
``(t.float() * scale).to(dtype)`` and an accumulation ``(slice.float() + t.float() * scale)
.to(dtype)``. The ops must match it bit for bit (compared as integers, so -0.0 and +0.0 differ),
on every device, for every pair of dtypes, including rounding ties and fp16 subnormals.
"""

import pytest
import torch

import zero_ext
from zero_ext import ops

from cpu_isas import run_under_each_isa

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 4095, 2**20 + 3]
SCALES = [1.0, 0.37]
# Tensors that fill one bucket: shapes (one empty) and dtypes cycling fp32 / bf16 / fp16.
MIXED_SHAPES = [(3, 5), (1,), (4095,), (0,), (7, 1, 3), (2**20 + 3,), (64, 64), (2,)]

# fp32 bit patterns that round to a tie: halfway between two bf16 values (even below, odd below)
# or two fp16 values, and fp16 subnormal ties (2^-25 and 3 * 2^-25).
_TIES = [0x3F808000, 0x3F818000, 0xC0808000, 0x3F801000, 0x3F803000, 0xBF803000, 0x33000000,
         0x33C00000]
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _needs_cuda_kernel(device):
    if device == "cuda" and zero_ext._C.cuda_archs_built() is None:
        pytest.fail("a GPU is present but zero_ext was built without its CUDA kernels; "
                    "rebuild with ZERO_EXT_CUDA=1")


def _values(shape, dtype, gen, device="cpu"):
    """Values over 2^-24 .. 2^14 in magnitude (fp16 subnormals, no overflow), ties up front."""
    n = 1
    for s in shape:
        n *= s
    x = torch.randn(n, generator=gen) * torch.exp2(
        torch.randint(-24, 12, (n,), generator=gen).float())
    k = min(n, len(_TIES))
    x[:k] = torch.tensor(_TIES[:k], dtype=torch.int64).to(torch.int32).view(torch.float32)
    return x.to(dtype).reshape(shape).to(device)


def _layout(numels, gap):
    """Offsets that place ranges of these sizes in order with `gap` elements before each."""
    offsets, pos = [], gap
    for n in numels:
        offsets.append(pos)
        pos += n + gap
    return offsets, pos


def _assert_bits_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a = actual.detach().cpu().contiguous().view(_INT_VIEW[actual.dtype])
    e = expected.detach().cpu().contiguous().view(_INT_VIEW[expected.dtype])
    mismatch = (a != e).nonzero()
    if mismatch.numel():
        first = mismatch[0].tolist()
        raise AssertionError(f"{mismatch.shape[0]} elements differ, first at {first}: "
                             f"{actual.cpu()[tuple(first)].item()} != "
                             f"{expected.cpu()[tuple(first)].item()}")


def _expected_flatten(flat, tensors, offsets, scale, accumulate):
    expected = flat.clone()
    for t, o in zip(tensors, offsets):
        n = t.numel()
        if scale == 1.0 and not accumulate:
            expected[o:o + n] = t.reshape(-1).to(flat.dtype)
            continue
        x = t.reshape(-1).float() * scale if scale != 1.0 else t.reshape(-1).float()
        if accumulate:
            x = expected[o:o + n].float() + x
        expected[o:o + n] = x.to(flat.dtype)
    return expected


def _expected_unflatten(flat, tensors, offsets):
    return [flat[o:o + t.numel()].to(t.dtype).reshape(t.shape) for t, o in zip(tensors, offsets)]


def _mixed_bucket(device, flat_dtype, gap, seed):
    """A bucket of MIXED_SHAPES tensors in mixed dtypes, listed in a different order than their
    ranges lie in flat, `gap` elements apart."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [_values(s, DTYPES[i % 3], gen, device) for i, s in enumerate(MIXED_SHAPES)]
    offsets, total = _layout([t.numel() for t in tensors], gap)
    order = [3, 0, 6, 1, 5, 7, 2, 4]
    flat = _values((total,), flat_dtype, gen, device)
    return flat, [tensors[i] for i in order], [offsets[i] for i in order]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flat_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_flatten_into_matches_torch(device, src_dtype, flat_dtype, size, scale, accumulate):
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(size)
    tensors = [_values((size,), src_dtype, gen, device), _values((3, 2), src_dtype, gen, device)]
    offsets, total = _layout([size, 6], gap=0)
    flat = _values((total,), flat_dtype, gen, device)
    expected = _expected_flatten(flat, tensors, offsets, scale, accumulate)
    ops.flatten_into_(flat, tensors, offsets, scale=scale, accumulate=accumulate)
    _assert_bits_equal(flat, expected)
    if scale == 1.0 and not accumulate:
        _assert_bits_equal(flat, torch.cat([t.reshape(-1) for t in tensors]).to(flat_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dst_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_unflatten_from_matches_torch(device, flat_dtype, dst_dtype, size):
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(size + 1)
    offsets, total = _layout([size, 6], gap=0)
    flat = _values((total,), flat_dtype, gen, device)
    tensors = [torch.empty(size, dtype=dst_dtype, device=device),
               torch.empty(3, 2, dtype=dst_dtype, device=device)]
    ops.unflatten_from(flat, tensors, offsets)
    for actual, expected in zip(tensors, _expected_unflatten(flat, tensors, offsets)):
        _assert_bits_equal(actual, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("gap", [0, 5, 64])
def test_mixed_bucket_with_gaps(device, flat_dtype, scale, accumulate, gap):
    _needs_cuda_kernel(device)
    flat, tensors, offsets = _mixed_bucket(device, flat_dtype, gap, seed=gap)
    before = flat.clone()
    expected = _expected_flatten(flat, tensors, offsets, scale, accumulate)
    ops.flatten_into_(flat, tensors, offsets, scale=scale, accumulate=accumulate)
    _assert_bits_equal(flat, expected)

    covered = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    for t, o in zip(tensors, offsets):
        covered[o:o + t.numel()] = True
    if gap:
        assert not covered.all()
    _assert_bits_equal(flat[~covered], before[~covered])

    # And back out, into tensors of the same shapes and dtypes.
    outs = [torch.empty_like(t) for t in tensors]
    ops.unflatten_from(flat, outs, offsets)
    for actual, e in zip(outs, _expected_unflatten(flat, outs, offsets)):
        _assert_bits_equal(actual, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_dtype_round_trip_is_exact(device, dtype):
    _needs_cuda_kernel(device)
    _, tensors, offsets = _mixed_bucket(device, dtype, gap=3, seed=11)
    tensors = [t.to(dtype) for t in tensors]
    total = max(o + t.numel() for t, o in zip(tensors, offsets)) + 3
    flat = torch.full((total,), float("nan"), dtype=dtype, device=device)
    ops.flatten_into_(flat, tensors, offsets)
    outs = [torch.empty_like(t) for t in tensors]
    ops.unflatten_from(flat, outs, offsets)
    for actual, t in zip(outs, tensors):
        _assert_bits_equal(actual, t)


@pytest.mark.parametrize("device", DEVICES)
def test_many_small_tensors_at_odd_offsets(device):
    # More tensors than one CUDA launch takes (kBucketMaxTensorsPerLaunch = 128), every range
    # misaligned for vector access.
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(12)
    tensors = [_values((1 + (i * 37) % 300,), DTYPES[i % 3], gen, device) for i in range(300)]
    offsets, total = _layout([t.numel() for t in tensors], gap=1)
    flat = _values((total,), torch.bfloat16, gen, device)
    expected = _expected_flatten(flat, tensors, offsets, 0.37, True)
    ops.flatten_into_(flat, tensors, offsets, scale=0.37, accumulate=True)
    _assert_bits_equal(flat, expected)
    outs = [torch.empty_like(t) for t in tensors]
    ops.unflatten_from(flat, outs, offsets)
    for actual, e in zip(outs, _expected_unflatten(flat, outs, offsets)):
        _assert_bits_equal(actual, e)


@pytest.mark.parametrize("device", DEVICES)
def test_a_view_of_its_own_range_updates_in_place(device):
    # Gradients that already live in the bucket: copying one onto itself is allowed.
    _needs_cuda_kernel(device)
    flat = _values((100,), torch.float32, torch.Generator().manual_seed(13), device)
    before = flat.clone()
    views = [flat[10:30].view(4, 5), flat[50:57]]
    ops.flatten_into_(flat, views, [10, 50])
    _assert_bits_equal(flat, before)
    ops.flatten_into_(flat, views, [10, 50], scale=0.5, accumulate=True)
    expected = before.clone()
    for lo, hi in ((10, 30), (50, 57)):
        expected[lo:hi] = before[lo:hi] + before[lo:hi] * 0.5
    _assert_bits_equal(flat, expected)
    ops.unflatten_from(flat, views, [10, 50])
    _assert_bits_equal(flat, expected)


def test_an_empty_call_is_a_no_op():
    flat = torch.ones(4)
    ops.flatten_into_(flat, [], [])
    ops.unflatten_from(flat, [], [])
    torch.ops.zero_ext.flatten_into_(flat, [], [], scale=2.0, accumulate=True)
    torch.ops.zero_ext.unflatten_from(flat, [], [])
    assert torch.equal(flat, torch.ones(4))
    with pytest.raises(ValueError, match="expected one offset per tensor, got 0 tensors and 1"):
        ops.flatten_into_(flat, [], [0])


def test_empty_tensors_may_sit_anywhere_in_flat():
    flat = torch.zeros(4)
    empty = torch.zeros(0)
    ops.flatten_into_(flat, [empty, torch.ones(4), empty], [4, 0, 2], scale=3.0)
    assert torch.equal(flat, torch.full((4,), 3.0))
    ops.unflatten_from(flat, [empty], [4])


def test_threads_do_not_change_results():
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            flat, tensors, offsets = _mixed_bucket("cpu", torch.bfloat16, gap=5, seed=14)
            ops.flatten_into_(flat, tensors, offsets, scale=0.37, accumulate=True)
            results.append(flat)
        finally:
            torch.set_num_threads(previous)
    _assert_bits_equal(results[0], results[1])


_ISA_SCRIPT = """
import sys, torch, zero_ext
from zero_ext import ops
out = []
for case in torch.load(sys.argv[1]):
    flat = case["flat"].clone()
    ops.flatten_into_(flat, case["tensors"], case["offsets"], scale=case["scale"],
                      accumulate=case["accumulate"])
    outs = [torch.empty_like(t) for t in case["outs"]]
    ops.unflatten_from(case["flat"], outs, case["offsets"])
    out.append([flat] + outs)
torch.save({"isa": zero_ext._C.cpu_isa_selected(), "results": out}, sys.argv[2])
"""


def test_every_compiled_isa_matches_torch(tmp_path):
    # Inputs and references are made here once; every ISA variant must reproduce them exactly.
    cases, expected = [], []
    for flat_dtype in DTYPES:
        for scale, accumulate in ((1.0, False), (0.37, True)):
            flat, tensors, offsets = _mixed_bucket("cpu", flat_dtype, gap=5, seed=15)
            outs = [torch.empty(t.shape, dtype=DTYPES[(i + 1) % 3]) for i, t in enumerate(tensors)]
            cases.append({"flat": flat, "tensors": tensors, "offsets": offsets, "scale": scale,
                          "accumulate": accumulate, "outs": outs})
            expected.append([_expected_flatten(flat, tensors, offsets, scale, accumulate)]
                            + _expected_unflatten(flat, outs, offsets))
    for run in run_under_each_isa(_ISA_SCRIPT, cases, tmp_path).values():
        for actual_case, expected_case in zip(run["results"], expected):
            for actual, e in zip(actual_case, expected_case):
                _assert_bits_equal(actual, e)


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(16)

    def flatten(flat_dtype, src_dtypes, sizes, gap, **kwargs):
        tensors = [_values((n,), d, gen, device) for n, d in zip(sizes, src_dtypes)]
        offsets, total = _layout(sizes, gap)
        flat = _values((total,), flat_dtype, gen, device)
        return torch.ops.zero_ext.flatten_into_.default, (flat, tensors, offsets), kwargs

    def unflatten(flat_dtype, dst_dtypes, shapes, gap):
        tensors = [torch.empty(s, dtype=d, device=device) for s, d in zip(shapes, dst_dtypes)]
        offsets, total = _layout([t.numel() for t in tensors], gap)
        flat = _values((total,), flat_dtype, gen, device)
        return torch.ops.zero_ext.unflatten_from.default, (flat, tensors, offsets), {}

    f32, bf16, f16 = DTYPES
    return [
        flatten(f32, [f32, f32], [7, 4095], 0),
        flatten(bf16, [f32, bf16, f16], [1, 7, 4095], 3, scale=0.5),
        flatten(f16, [bf16], [4095], 1, scale=0.37, accumulate=True),
        flatten(f32, [f16, bf16], [33, 0], 2, accumulate=True),
        unflatten(f32, [bf16, f16, f32], [(7,), (3, 5), (4095,)], 0),
        unflatten(bf16, [f32], [(2, 2)], 5),
        unflatten(f16, [f16, bf16], [(1,), (4095,)], 1),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _needs_cuda_kernel(device)
    for op, args, kwargs in _opcheck_samples(device):
        torch.library.opcheck(op, args, kwargs)


def _flatten_call(flat=None, tensors=None, offsets=None):
    """A valid two-tensor flatten_into_ call with some arguments replaced."""
    flat = torch.zeros(12) if flat is None else flat
    tensors = [torch.zeros(4), torch.zeros(2, 3)] if tensors is None else tensors
    ops.flatten_into_(flat, tensors, [0, 5] if offsets is None else offsets)


def _unflatten_call(flat=None, tensors=None, offsets=None):
    """A valid two-tensor unflatten_from call with some arguments replaced."""
    flat = torch.zeros(12) if flat is None else flat
    tensors = [torch.zeros(4), torch.zeros(2, 3)] if tensors is None else tensors
    ops.unflatten_from(flat, tensors, [0, 5] if offsets is None else offsets)


_SHARED = torch.zeros(10)
_FLAT = torch.zeros(12)

# (overrides, error, message): raised alike by both ops unless the message names one.
_BAD_CALLS = [
    ({"offsets": [0]}, ValueError, "expected one offset per tensor, got 2 tensors and 1 offsets"),
    ({"flat": torch.zeros(12, dtype=torch.float64)}, TypeError,
     "expected flat of dtype Float, BFloat16 or Half, got Double"),
    ({"flat": torch.zeros(3, 4)}, ValueError, "expected flat to be 1-D, got shape [3, 4]"),
    ({"flat": torch.zeros(24)[::2]}, ValueError, "expected flat to be contiguous, got stride 2"),
    ({"tensors": [torch.zeros(4), torch.zeros(2, 3, dtype=torch.int32)]}, TypeError,
     "expected tensors[1] of dtype Float, BFloat16 or Half, got Int"),
    ({"tensors": [torch.zeros(4), torch.zeros(3, 2).t()]}, ValueError,
     "expected tensors[1] to be contiguous"),
    ({"offsets": [0, -3]}, ValueError, "expected offsets[1] >= 0, got -3"),
    ({"offsets": [0, 7]}, ValueError,
     ("tensors[1] (numel 6) at offsets[1] = 7 runs past the end of flat: expected offset + "
      "numel <= 12 (flat's numel), got 7 + 6")),
    ({"tensors": [torch.zeros(4), torch.zeros(20)]}, ValueError,
     "tensors[1] (numel 20) at offsets[1] = 5 runs past the end of flat"),
    ({"offsets": [3, 5]}, ValueError,
     ("expected disjoint ranges, but tensors[0] and tensors[1] overlap: flat[3 : 7] and "
      "flat[5 : 11]")),
    ({"tensors": [torch.zeros(2), torch.zeros(3), torch.zeros(4)], "offsets": [9, 0, 2]},
     ValueError,
     ("expected disjoint ranges, but tensors[1] and tensors[2] overlap: flat[0 : 3] and "
      "flat[2 : 6]")),
    ({"flat": _FLAT, "tensors": [_FLAT[1:5], torch.zeros(2, 3)]}, ValueError,
     "tensors[0] shares memory with flat but is not the Float view flat[0 : 4]"),
    # tensors[0] is its own view (allowed); tensors[1] starts at flat[5] but is not Float.
    ({"flat": _FLAT, "tensors": [_FLAT[0:4], _FLAT.view(torch.bfloat16)[10:16]]}, ValueError,
     "tensors[1] shares memory with flat but is not the Float view flat[5 : 11]"),
]


@pytest.mark.parametrize("call", [_flatten_call, _unflatten_call],
                         ids=["flatten_into_", "unflatten_from"])
@pytest.mark.parametrize("overrides, error, message", _BAD_CALLS)
def test_bad_input_raises_a_clear_error(call, overrides, error, message):
    with pytest.raises(error) as info:
        call(**overrides)
    text = str(info.value)
    op = "flatten_into_" if call is _flatten_call else "unflatten_from"
    assert text.startswith(f"zero_ext::{op}: "), text
    assert message in text, text
    assert "CUDA" not in text or zero_ext._C.cuda_archs_built() is not None


def test_contiguity_messages_say_what_to_do():
    bad = [torch.zeros(4), torch.zeros(3, 2).t()]
    with pytest.raises(ValueError, match=r"call \.contiguous\(\) on it first"):
        _flatten_call(tensors=bad)
    with pytest.raises(ValueError, match="it is written in place, so a contiguous copy would not "
                       r"receive the values\), got strides \[1, 2\]"):
        _unflatten_call(tensors=bad)


def test_unflatten_rejects_outputs_that_share_memory():
    # Read-only sources may share memory (flatten_into_), written tensors may not.
    _flatten_call(tensors=[_SHARED[0:4], _SHARED[2:8].view(2, 3)])
    with pytest.raises(ValueError) as info:
        _unflatten_call(tensors=[_SHARED[0:4], _SHARED[2:8].view(2, 3)])
    assert str(info.value).startswith(
        "zero_ext::unflatten_from: tensors[0] and tensors[1] share memory; expected every written "
        "tensor apart from the others"), str(info.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_raise():
    _needs_cuda_kernel("cuda")
    for call, op in ((_flatten_call, "flatten_into_"), (_unflatten_call, "unflatten_from")):
        with pytest.raises(ValueError, match=rf"^zero_ext::{op}: expected every tensor on flat's "
                           r"device \(cuda:0\), got cpu for tensors\[1\]"):
            call(flat=torch.zeros(12, device="cuda"),
                 tensors=[torch.zeros(4, device="cuda"), torch.zeros(2, 3)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tensors, launches", [(10, 1), (128, 1), (129, 2)])
def test_one_launch_per_128_tensors_whatever_their_dtypes(num_tensors, launches):
    _needs_cuda_kernel("cuda")
    gen = torch.Generator().manual_seed(17)
    tensors = [_values((100 + i,), DTYPES[i % 3], gen, "cuda") for i in range(num_tensors)]
    offsets, total = _layout([t.numel() for t in tensors], gap=0)
    flat = torch.zeros(total, dtype=torch.bfloat16, device="cuda")
    outs = [torch.empty_like(t) for t in tensors]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.flatten_into_(flat, tensors, offsets, scale=0.5, accumulate=True)
        ops.unflatten_from(flat, outs, offsets)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if "bucket_copy_kernel" in e.name]
    assert len(kernels) == 2 * launches, kernels


def test_bucket_norm_makes_no_fp32_copy_of_a_large_bf16_bucket():
    """A bucket's fp32 norm (gradient clipping) takes a 16-bit bucket in pieces:
    vector_norm(x, dtype=float32) copies x to fp32 whole first (seen failing with it: one
    allocation of 4 bytes per element). The value is the norm to fp32 summation's accuracy."""
    from torch.profiler import ProfilerActivity, profile

    from zero_ext.zero.buckets import NORM_PIECE, fp32_norm

    x = torch.randn(2 * NORM_PIECE + 7, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        norm = fp32_norm(x)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest < 4 * x.numel() // 2, largest
    assert norm.dtype == torch.float32 and norm.dim() == 0
    torch.testing.assert_close(norm.double(), x.double().norm(), rtol=3e-4, atol=0)
    # Up to NORM_PIECE elements, and for fp32, vector_norm itself (the same bits as before).
    small = x[:NORM_PIECE]
    assert torch.equal(fp32_norm(small), torch.linalg.vector_norm(small, dtype=torch.float32))
