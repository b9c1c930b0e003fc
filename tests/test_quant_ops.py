"""zero_ext::quantize_chunks, dequantize_sum_ and dequantize_ against a plain-torch reference.

The reference below is written op by op in torch, each operation on full-size fp32 tensors
(never a Python scalar divisor, which ATen may turn into a multiplication by its reciprocal):
``scale = absmax / qmax``, ``q = clamp(round(x * (qmax / absmax)), -qmax, qmax)``, NaN scale
for a block holding inf or NaN, the packed row ``[data][scales]``, error feedback stored as
float8_e4m3fn with a per-chunk scale, and the fp32 sum in sender order. The ops must match it
bit for bit (q, scales, residuals, outputs) on every device, dtype, bit width and odd size.
"""

import math

import numpy as np
import pytest
import torch

import zero_ext
from zero_ext import ops

from cpu_isas import run_under_each_isa

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
QMAX = {8: 127, 4: 7}
NAN = float("nan")


def _needs_cuda_kernel(device):
    if device == "cuda" and zero_ext._C.cuda_archs_built() is None:
        pytest.fail("a GPU is present but zero_ext was built without its CUDA kernels; "
                    "rebuild with ZERO_EXT_CUDA=1")


# ---------------------------------------------------------------------------------------------
# The reference


def _f32(v):
    """An fp32 scalar computed with numpy's IEEE fp32 arithmetic."""
    return np.float32(v)


def _ref_quantize_chunk(x_eff, bits, block):
    """(q int8 [nb * B], scale fp32 [nb]) of one chunk's fp32 effective input."""
    qmax = QMAX[bits]
    m = x_eff.numel()
    nb = -(-m // block)
    blocks = torch.zeros(nb * block, dtype=torch.float32)
    blocks[:m] = x_eff
    blocks = blocks.view(nb, block)
    absmax = blocks.abs().amax(dim=1)  # NaN when a block holds NaN
    finite = torch.isfinite(absmax)
    scale = torch.where(finite, absmax / torch.full_like(absmax, qmax), torch.full_like(absmax, NAN))
    usable = finite & (absmax != 0)
    inv = torch.where(usable, torch.full_like(absmax, qmax) / absmax, torch.zeros_like(absmax))
    y = blocks * inv[:, None]
    q = torch.nan_to_num(torch.round(y), nan=0.0).clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(-1), scale


def _pack(q, scale, bits):
    if bits == 8:
        data = q.view(torch.uint8)
    else:
        nib = q.to(torch.int16) & 0xF
        data = (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8)
    return torch.cat([data, scale.view(torch.uint8)])


def _ref_dequant_chunk(q, scale, m, block):
    v = q.float().view(-1, block) * scale[:, None].expand(-1, block)
    return v.reshape(-1)[:m]


def _ref_quantize(x, chunks, bits, block, skip=(), residual=None, residual_scale=None,
                  factor=1.0):
    """(packed rows with skipped rows None, new residual, new residual_scale)."""
    x = x.cpu()
    m = x.numel() // chunks
    rows = []
    new_r = None if residual is None else residual.cpu().clone()
    new_s = None if residual_scale is None else residual_scale.cpu().clone()
    for c in range(chunks):
        if c in skip:
            rows.append(None)
            continue
        x_eff = x[c * m:(c + 1) * m].float()
        if residual is not None:
            r = residual.cpu()[c * m:(c + 1) * m].float()
            coefficient = torch.full_like(r, residual_scale.cpu()[c].item())
            x_eff = x_eff + r * coefficient * torch.full_like(r, _f32(factor))
        q, scale = _ref_quantize_chunk(x_eff, bits, block)
        rows.append(_pack(q, scale, bits))
        if residual is None:
            continue
        s = _f32(0.0)
        if torch.isfinite(scale).all() and m > 0:
            s = _f32(scale.max().item()) / _f32(2.0) / _f32(448.0)
        if s == 0:
            new_r[c * m:(c + 1) * m] = torch.zeros(m, dtype=torch.float8_e4m3fn)
        else:
            e = x_eff - _ref_dequant_chunk(q, scale, m, block)
            code = (e / torch.full_like(e, s)).clamp(-448.0, 448.0)
            new_r[c * m:(c + 1) * m] = code.to(torch.float8_e4m3fn)
        new_s[c] = float(s)
    return rows, new_r, new_s


def _unpack(row, m, bits, block):
    """(q int8 [nb * B], scales fp32 [nb]) of one packed row, read back by the reference."""
    nb = -(-m // block)
    data_bytes = nb * block * bits // 8
    data = row[:data_bytes].cpu()
    scale = row[data_bytes:].cpu().clone().view(torch.float32)
    if bits == 8:
        return data.view(torch.int8), scale
    lo = (data & 0xF).to(torch.int16)
    hi = (data >> 4).to(torch.int16)
    q = torch.stack([lo, hi], dim=1).reshape(-1)
    return torch.where(q >= 8, q - 16, q).to(torch.int8), scale


def _ref_dequantize_sum(out, packed, bits, block, exact=None, exact_index=-1, accumulate=False):
    k, g, _ = packed.shape
    m = out.numel() // g
    acc = out.cpu().float() if accumulate else torch.zeros(out.numel())
    for i in range(k):
        if i == exact_index:
            v = exact.cpu().float()
        else:
            parts = [_ref_dequant_chunk(*_unpack(packed[i, c], m, bits, block), m, block)
                     for c in range(g)]
            v = torch.cat(parts)
        acc = acc + v
    return acc.to(out.dtype)


# ---------------------------------------------------------------------------------------------
# Inputs and comparisons


def _values(n, dtype, gen, spread=8):
    """Gaussian values with a magnitude that changes every few elements (blocks differ), ties
    up front: in a block whose absmax is qmax, x * (qmax / absmax) == x, so 2.5 and -0.5 tie."""
    x = torch.randn(n, generator=gen) * torch.exp2(
        torch.randint(-spread, spread, (n // 5 + 1,), generator=gen).float()
    ).repeat_interleave(5)[:n]
    return x.to(dtype)


_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.uint8: torch.uint8, torch.float8_e4m3fn: torch.uint8}


def _assert_bits_equal(actual, expected, what=""):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a = actual.detach().cpu().contiguous().view(_INT_VIEW[actual.dtype])
    e = expected.detach().cpu().contiguous().view(_INT_VIEW[expected.dtype])
    mismatch = (a != e).nonzero()
    if mismatch.numel():
        first = mismatch[0].tolist()
        raise AssertionError(f"{what}: {mismatch.shape[0]} of {a.numel()} differ, first at "
                             f"{first}: {a[tuple(first)].item()} != {e[tuple(first)].item()}")


def _assert_rows_equal(packed, rows, what=""):
    assert packed.shape[0] == len(rows)
    for c, row in enumerate(rows):
        if row is not None:
            _assert_bits_equal(packed[c], row, f"{what} row {c}")


# ---------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("m,bits,block,expected", [
    (1, 8, 8, 8 + 4), (1, 4, 8, 4 + 4), (256, 8, 256, 256 + 4), (257, 8, 256, 512 + 8),
    (257, 4, 256, 256 + 8), (0, 8, 64, 0), (1000, 4, 2048, 1024 + 4)])
def test_row_bytes(m, bits, block, expected):
    assert ops.quantized_row_bytes(m, bits, block) == expected
    if m:
        packed = ops.quantize_chunks(torch.zeros(3 * m), 3, bits, block)
        assert packed.shape == (3, expected) and packed.dtype == torch.uint8


@pytest.mark.parametrize("device", DEVICES)
def test_empty_chunks(device):
    _needs_cuda_kernel(device)
    x = torch.zeros(0, device=device)
    packed = ops.quantize_chunks(x, 3, 8, 8)
    assert packed.shape == (3, 0)
    r = torch.zeros(0, dtype=torch.float8_e4m3fn, device=device)
    s = torch.ones(3, device=device)
    ops.quantize_chunks(x, 3, 4, 8, skip=[1], residual=r, residual_scale=s)
    assert s.tolist() == [0.0, 1.0, 0.0]  # no block, so no scale; the skipped row untouched
    out = torch.zeros(0, device=device)
    ops.dequantize_sum_(out, packed[None], 8, 8, accumulate=True)
    ops.dequantize_(out, packed, 8, 8)


def test_row_bytes_rejects_bad_format():
    with pytest.raises(ValueError, match="bits 8 or 4, got 2"):
        ops.quantized_row_bytes(8, 2, 8)
    with pytest.raises(ValueError, match="multiple of 8, got 12"):
        ops.quantized_row_bytes(8, 8, 12)


# ---------------------------------------------------------------------------------------------
# Quantize


def _sizes(block):
    return [1, 7, block - 1, block + 1, 3 * block + 5]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_matches_reference(device, dtype, bits):
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(1)
    for block in (8, 32):
        for m in _sizes(block):
            for chunks, skip in ((1, ()), (2, (0,)), (3, (1,)), (4, (0, 3))):
                x = _values(chunks * m, dtype, gen)
                packed = ops.quantize_chunks(x.to(device), chunks, bits, block, skip=skip)
                rows, _, _ = _ref_quantize(x, chunks, bits, block, skip)
                _assert_rows_equal(packed, rows, f"{dtype} bits {bits} B {block} m {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [8, 32])  # 32: whole SIMD vectors on every ISA
def test_quantize_rounds_ties_to_even_and_keeps_zero_blocks_at_zero(device, bits, block):
    _needs_cuda_kernel(device)
    qmax = QMAX[bits]
    # First 32: blocks whose absmax is qmax, so x * (qmax / absmax) == x exactly: ties at +-0.5,
    # 1.5, 2.5. Next 32: all zeros (scale 0, q 0). Last 32: one large element per 8, the rest
    # round to 0 or to small values.
    ties = [qmax, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -qmax]
    x = torch.tensor(ties * 4 + [0.0] * 32 + [1e6, 1.0, -1.0, 0.0, 3e3, 0.5, -7.0, 1e-3] * 4)
    packed = ops.quantize_chunks(x.to(device), 1, bits, block)
    q, scale = _unpack(packed[0], 96, bits, block)
    assert q[:32].tolist() == [qmax, 0, 2, 2, 0, -2, -2, -qmax] * 4
    assert q[32:64].tolist() == [0] * 32
    assert scale[:32 // block].tolist() == [1.0] * (32 // block)
    assert scale[32 // block:64 // block].tolist() == [0.0] * (32 // block)
    rows, _, _ = _ref_quantize(x, 1, bits, block)
    _assert_rows_equal(packed, rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blocks_holding_inf_or_nan_get_scale_nan(device, dtype):
    _needs_cuda_kernel(device)
    x = torch.ones(40, dtype=dtype)
    # Two chunks of 20: blocks [0, 8), [8, 16), [16, 20) padded; [20, 28), [28, 36), [36, 40).
    x[3] = float("inf")
    x[12] = NAN
    x[17] = NAN
    x[18] = float("inf")
    x[25] = -float("inf")
    x[35] = 4.0
    for bits in (8, 4):
        packed = ops.quantize_chunks(x.to(device), 2, bits, 8)
        rows, _, _ = _ref_quantize(x, 2, bits, 8)
        _assert_rows_equal(packed, rows)
        scales = [_unpack(packed[c], 20, bits, 8)[1] for c in range(2)]
        assert torch.isnan(scales[0]).tolist() == [True, True, True]
        assert torch.isnan(scales[1]).tolist() == [True, False, False]
        out = torch.empty(40, dtype=dtype, device=device)
        ops.dequantize_(out, packed, bits, 8)
        assert torch.isnan(out.cpu()[:28]).all() and not torch.isnan(out.cpu()[28:]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_beyond_fp16_range_is_read_as_bf16(device):
    # DeepSpeed once reinterpreted bf16 as fp16: 1e30 would be inf and 1e-30 zero.
    _needs_cuda_kernel(device)
    x = torch.tensor([1e30, -3e29, 1e-30, 0.0] * 4 + [1e-30, -2e-30, 5e-31, 1e-31] * 4,
                     dtype=torch.bfloat16)
    packed = ops.quantize_chunks(x.to(device), 1, 8, 16)
    rows, _, _ = _ref_quantize(x, 1, 8, 16)
    _assert_rows_equal(packed, rows)
    out = torch.empty(32, dtype=torch.float32, device=device)
    ops.dequantize_(out, packed, 8, 16)
    torch.testing.assert_close(out.cpu()[:16], x.float()[:16], rtol=0, atol=1e30 / 254 * 1.01)
    torch.testing.assert_close(out.cpu()[16:], x.float()[16:], rtol=0, atol=2e-30 / 254 * 1.01)
    assert out.cpu()[0].item() == pytest.approx(1e30, rel=1e-2)
    assert out.cpu()[16].item() == pytest.approx(1e-30, rel=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_subnormal_blocks_follow_the_reference(device):
    # absmax below qmax / FLT_MAX: qmax / absmax overflows to inf, 0 * inf is NaN -> q 0.
    _needs_cuda_kernel(device)
    x = torch.tensor([1e-40, -5e-41, 0.0, 2e-45, 0.0, 0.0, 0.0, 0.0])
    for bits in (8, 4):
        packed = ops.quantize_chunks(x.to(device), 1, bits, 8)
        rows, _, _ = _ref_quantize(x, 1, bits, 8)
        _assert_rows_equal(packed, rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_error_is_at_most_half_a_scale(device, dtype, bits):
    _needs_cuda_kernel(device)
    x = _values(3 * 1000, dtype, torch.Generator().manual_seed(2))
    packed = ops.quantize_chunks(x.to(device), 3, bits, 64)
    out = torch.empty(3000, dtype=torch.float32, device=device)
    ops.dequantize_(out, packed, bits, 64)
    scale = torch.cat([_unpack(packed[c], 1000, bits, 64)[1].repeat_interleave(64)[:1000]
                       for c in range(3)])
    err = (out.cpu() - x.float()).abs()
    # Half a scale, up to the fp32 rounding of qmax / absmax (relative 2^-24, times |q| <= qmax
    # in units of the scale) and of q * scale.
    assert (err <= scale * (0.5 + QMAX[bits] * 2**-22)).all()
    assert (err > scale * 0.45).any()  # the bound is not loose


# ---------------------------------------------------------------------------------------------
# Error feedback


def _random_residual(n, chunks, gen):
    """Every finite float8_e4m3fn code (subnormals and +-448 included), and chunk scales."""
    codes = torch.randint(0, 254, (n,), generator=gen)
    codes = codes + (codes >= 0x7F).long()  # skip 0x7F (NaN); 0xFF (NaN) is past the range
    s = torch.rand(chunks, generator=gen) * 1e-3
    return codes.to(torch.uint8).view(torch.float8_e4m3fn), s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_error_feedback_matches_reference(device, dtype, bits):
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(3)
    for block in (8, 32):
        for m in _sizes(block):
            for chunks, skip, factor in ((1, (), 1.0), (3, (1,), 0.5), (4, (0, 2), 2.0)):
                x = _values(chunks * m, dtype, gen)
                r, s = _random_residual(chunks * m, chunks, gen)
                rows, new_r, new_s = _ref_quantize(x, chunks, bits, block, skip, r, s, factor)
                r_dev, s_dev = r.to(device), s.to(device)
                packed = ops.quantize_chunks(x.to(device), chunks, bits, block, skip=skip,
                                             residual=r_dev, residual_scale=s_dev,
                                             residual_factor=factor)
                what = f"{dtype} bits {bits} B {block} m {m} chunks {chunks}"
                _assert_rows_equal(packed, rows, what)
                _assert_bits_equal(r_dev, new_r, what + " residual")
                _assert_bits_equal(s_dev, new_s, what + " residual_scale")
                for c in skip:  # untouched
                    _assert_bits_equal(r_dev[c * m:(c + 1) * m], r[c * m:(c + 1) * m])
                    assert s_dev[c].item() == s[c].item()


@pytest.mark.parametrize("device", DEVICES)
def test_error_feedback_drops_non_finite_and_all_zero_chunks(device):
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(4)
    x = _values(48, torch.float32, gen)
    x[3] = float("inf")  # chunk 0
    x[16:32] = 0.0  # chunk 1: all zero
    r, s = _random_residual(48, 3, gen)
    r[16:32] = torch.zeros(16, dtype=torch.float8_e4m3fn)
    rows, new_r, new_s = _ref_quantize(x, 3, 8, 8, (), r, s)
    r_dev, s_dev = r.to(device), s.to(device)
    packed = ops.quantize_chunks(x.to(device), 3, 8, 8, residual=r_dev, residual_scale=s_dev)
    _assert_rows_equal(packed, rows)
    _assert_bits_equal(r_dev, new_r)
    _assert_bits_equal(s_dev, new_s)
    assert s_dev.cpu()[:2].tolist() == [0.0, 0.0] and s_dev.cpu()[2].item() > 0
    assert (r_dev.cpu()[:32].float() == 0).all() and (r_dev.cpu()[32:].float() != 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
def test_two_calls_with_error_feedback_deliver_the_sum(device, bits):
    # d1 + d2 = x1 + x2 - e1 + decoded(e1) + (d2 - x_eff2): off by the fp8 rounding of e1 and
    # one quantization rounding, where without feedback e1 would stay lost.
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(5)
    n, chunks, block = 4 * 777, 4, 64
    m = n // chunks
    x1, x2 = _values(n, torch.float32, gen, 4), _values(n, torch.float32, gen, 4)
    r = torch.zeros(n, dtype=torch.float8_e4m3fn, device=device)
    s = torch.zeros(chunks, device=device)
    delivered, bounds = [], []
    for x in (x1, x2):
        s1 = s.cpu().clone()
        packed = ops.quantize_chunks(x.to(device), chunks, bits, block, residual=r,
                                     residual_scale=s)
        out = torch.empty(n, device=device)
        ops.dequantize_(out, packed, bits, block)
        delivered.append(out.cpu())
        scale = torch.cat([_unpack(packed[c], m, bits, block)[1].repeat_interleave(block)[:m]
                           for c in range(chunks)])
        bounds.append((scale, s1))
    e1 = x1 - delivered[0]
    scale2, s1 = bounds[1]
    s1 = s1.repeat_interleave(m)
    err = (delivered[0] + delivered[1] - (x1 + x2)).abs()
    bound = scale2 / 2 + e1.abs() / 16 + s1 / 512 + 1e-6 * (x1.abs() + x2.abs())
    assert (err <= bound).all(), (err - bound).max()
    # Without feedback the first call's error is simply lost: the bound does not hold.
    plain = [torch.empty(n) for _ in range(2)]
    for x, out in zip((x1, x2), plain):
        ops.dequantize_(out, ops.quantize_chunks(x, chunks, bits, block), bits, block)
    assert ((plain[0] + plain[1] - (x1 + x2)).abs() > bound).any()


# ---------------------------------------------------------------------------------------------
# Dequantize


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_sum_matches_reference(device, out_dtype, bits):
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(6)
    block = 32
    for m in _sizes(block):
        for k, g in ((1, 1), (3, 2), (4, 3)):
            senders = [ops.quantize_chunks(_values(g * m, DTYPES[i % 3], gen), g, bits, block)
                       for i in range(k)]
            packed = torch.stack(senders).to(device)
            for exact_index in (-1, k - 1):
                for accumulate in (False, True):
                    exact = None
                    if exact_index >= 0:
                        exact = _values(g * m, DTYPES[(k + m) % 3], gen).to(device)
                    out = _values(g * m, out_dtype, gen).to(device)
                    expected = _ref_dequantize_sum(out, packed, bits, block, exact, exact_index,
                                                   accumulate)
                    ops.dequantize_sum_(out, packed, bits, block, exact=exact,
                                        exact_index=exact_index, accumulate=accumulate)
                    _assert_bits_equal(out, expected, f"m {m} k {k} g {g} exact {exact_index}")


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_sum_takes_out_itself_as_the_exact_row(device):
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(7)
    packed = torch.stack([ops.quantize_chunks(_values(100, torch.float32, gen), 2, 8, 16)
                          for _ in range(3)]).to(device)
    out = _values(100, torch.bfloat16, gen).to(device)
    expected = _ref_dequantize_sum(out, packed, 8, 16, out.clone(), 1)
    ops.dequantize_sum_(out, packed, 8, 16, exact=out, exact_index=1)
    _assert_bits_equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_is_q_times_scale(device, out_dtype, bits):
    _needs_cuda_kernel(device)
    gen = torch.Generator().manual_seed(8)
    for m in _sizes(64):
        x = _values(3 * m, torch.float32, gen)
        packed = ops.quantize_chunks(x.to(device), 3, bits, 64)
        out = torch.empty(3 * m, dtype=out_dtype, device=device)
        ops.dequantize_(out, packed, bits, 64)
        expected = torch.cat([_ref_dequant_chunk(*_unpack(packed[c], m, bits, 64), m, 64)
                              for c in range(3)]).to(out_dtype)
        _assert_bits_equal(out, expected, f"m {m}")


# ---------------------------------------------------------------------------------------------
# Threads, instruction sets, opcheck


def test_threads_do_not_change_results():
    gen = torch.Generator().manual_seed(9)
    n = 3 * (1 << 17) + 3
    x = _values(n, torch.bfloat16, gen)
    r0, s0 = _random_residual(n, 3, gen)
    results = []
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            r, s = r0.clone(), s0.clone()
            packed = ops.quantize_chunks(x, 3, 4, 256, residual=r, residual_scale=s)
            out = torch.empty(n)
            ops.dequantize_sum_(out, torch.stack([packed, packed]), 4, 256, exact=x,
                                exact_index=0)
            results.append((packed, r, s, out))
        finally:
            torch.set_num_threads(previous)
    for a, b in zip(*results):
        _assert_bits_equal(a, b)


_ISA_SCRIPT = """
import sys, torch, zero_ext
from zero_ext import ops
out = []
for case in torch.load(sys.argv[1]):
    r, s = case["r"].clone(), case["s"].clone()
    packed = ops.quantize_chunks(case["x"], case["chunks"], case["bits"], case["block"],
                                 residual=r, residual_scale=s, residual_factor=0.5)
    plain = ops.quantize_chunks(case["x"], case["chunks"], case["bits"], case["block"])
    acc = case["acc"].clone()
    ops.dequantize_sum_(acc, torch.stack([plain, packed]), case["bits"], case["block"],
                        accumulate=True)
    out.append([packed, r, s, plain, acc])
torch.save({"isa": zero_ext._C.cpu_isa_selected(), "results": out}, sys.argv[2])
"""


def test_every_compiled_isa_matches_reference(tmp_path):
    gen = torch.Generator().manual_seed(10)
    cases, expected = [], []
    for i, (dtype, bits, block, m) in enumerate([
            (torch.float32, 8, 256, 4 * 256 + 5), (torch.bfloat16, 4, 64, 1000),
            (torch.float16, 8, 8, 99), (torch.float32, 4, 2048, 3000)]):
        chunks = 3
        x = _values(chunks * m, dtype, gen)
        x[7] = NAN if i == 3 else x[7]
        r, s = _random_residual(chunks * m, chunks, gen)
        acc = _values(chunks * m, DTYPES[i % 3], gen)
        rows, new_r, new_s = _ref_quantize(x, chunks, bits, block, (), r, s, 0.5)
        plain, _, _ = _ref_quantize(x, chunks, bits, block)
        packed = torch.stack([torch.stack(plain), torch.stack(rows)])
        cases.append({"x": x, "r": r, "s": s, "chunks": chunks, "bits": bits, "block": block,
                      "acc": acc})
        expected.append([torch.stack(rows), new_r, new_s, torch.stack(plain),
                         _ref_dequantize_sum(acc, packed, bits, block, accumulate=True)])
    for isa, run in run_under_each_isa(_ISA_SCRIPT, cases, tmp_path).items():
        for actual_case, expected_case in zip(run["results"], expected):
            for actual, e in zip(actual_case, expected_case):
                _assert_bits_equal(actual, e, isa)


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(11)
    quantize = torch.ops.zero_ext.quantize_chunks.default
    dequantize_sum = torch.ops.zero_ext.dequantize_sum_.default
    dequantize = torch.ops.zero_ext.dequantize_.default

    def x(n, dtype=torch.float32):
        return _values(n, dtype, gen).to(device)

    def packed(k, g, m, bits, block):
        return torch.stack([ops.quantize_chunks(x(g * m), g, bits, block) for _ in range(k)])

    return [
        (quantize, (x(3 * 77), 3, 8, 32), {}),
        (quantize, (x(100, torch.bfloat16), 1, 4, 8), {}),
        (dequantize_sum, (x(2 * 50), packed(3, 2, 50, 8, 16), 8, 16), {}),
        (dequantize_sum, (x(2 * 50, torch.bfloat16), packed(3, 2, 50, 4, 16), 4, 16),
         {"exact": x(100, torch.float16), "exact_index": 2, "accumulate": True}),
        (dequantize, (x(3 * 41, torch.float16), packed(1, 3, 41, 8, 8)[0], 8, 8), {}),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _needs_cuda_kernel(device)
    for op, args, kwargs in _opcheck_samples(device):
        torch.library.opcheck(op, args, kwargs)


def _error_feedback_sample(device):
    gen = torch.Generator().manual_seed(13)
    r, s = _random_residual(3 * 77, 3, gen)
    return (_values(3 * 77, torch.float16, gen).to(device), 3, 4, 64), {
        "residual": r.to(device), "residual_scale": s.to(device), "residual_factor": 0.5}


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_error_feedback(device):
    # torch's SchemaCheckMode (opcheck's test_schema) compares mutated tensors with allclose,
    # which has no float8 kernel: the mutation annotations are checked directly instead, and
    # aot_dispatch checks that the in-place residual updates survive functionalization.
    _needs_cuda_kernel(device)
    op = torch.ops.zero_ext.quantize_chunks.default
    args, kwargs = _error_feedback_sample(device)
    torch.library.opcheck(op, args, kwargs, test_utils=(
        "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    written = {a.name for a in op._schema.arguments if a.alias_info and a.alias_info.is_write}
    assert written == {"residual", "residual_scale"}
    assert not op._schema.returns[0].alias_info  # a fresh tensor, not a view of an input


def test_opcheck_with_skipped_rows():
    # Skipped rows are left uninitialised, so two runs need not agree on them: the schema and
    # fake-tensor checks still apply.
    x = _values(3 * 40, torch.float32, torch.Generator().manual_seed(12))
    torch.library.opcheck(torch.ops.zero_ext.quantize_chunks.default, (x, 3, 8, 8),
                          {"skip": [1]}, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Bad arguments


def _quantize(x=None, chunks=2, bits=8, block=8, **kwargs):
    return ops.quantize_chunks(torch.zeros(16) if x is None else x, chunks, bits, block, **kwargs)


def _dequantize_sum(out=None, packed=None, bits=8, block=8, **kwargs):
    out = torch.zeros(16) if out is None else out
    packed = torch.zeros(3, 2, 12, dtype=torch.uint8) if packed is None else packed
    ops.dequantize_sum_(out, packed, bits, block, **kwargs)


_R = torch.zeros(16, dtype=torch.float8_e4m3fn)
_S = torch.zeros(2)

_BAD_CALLS = [
    (_quantize, {"bits": 5}, ValueError, "quantize_chunks: expected bits 8 .int8. or 4 .int4., got 5"),
    (_quantize, {"block": 12}, ValueError, "block_size to be a positive multiple of 8, got 12"),
    (_quantize, {"block": 0}, ValueError, "block_size to be a positive multiple of 8, got 0"),
    (_quantize, {"chunks": 3}, ValueError, "numel 16 is not divisible by chunks = 3"),
    (_quantize, {"chunks": 0}, ValueError, "expected chunks >= 1, got 0"),
    (_quantize, {"x": torch.zeros(16, dtype=torch.int32)}, TypeError,
     "expected x of dtype Float, BFloat16 or Half, got Int"),
    (_quantize, {"x": torch.zeros(4, 4)}, ValueError, "expected x to be 1-D, got shape \\[4, 4\\]"),
    (_quantize, {"x": torch.zeros(32)[::2]}, ValueError, "expected x to be contiguous"),
    (_quantize, {"skip": [2]}, ValueError, "skip\\[0\\] = 2 is not a row index in \\[0, 2\\)"),
    (_quantize, {"residual": _R}, ValueError, "residual and residual_scale come together"),
    (_quantize, {"residual": _R.float(), "residual_scale": _S}, TypeError,
     "expected residual of dtype Float8_e4m3fn"),
    (_quantize, {"residual": _R[:8], "residual_scale": _S}, ValueError,
     "expected residual of shape \\[16\\]"),
    (_quantize, {"residual": _R, "residual_scale": torch.zeros(3)}, ValueError,
     "expected residual_scale of shape \\[2\\]"),
    (_quantize, {"residual": _R, "residual_scale": _S.half()}, TypeError,
     "expected residual_scale of dtype Float"),
    (_quantize, {"residual": _R, "residual_scale": _S, "residual_factor": math.inf}, ValueError,
     "expected a finite residual_factor"),
    (_dequantize_sum, {"bits": 4}, ValueError,
     "expected packed rows of 8 bytes .8 elements per chunk, bits 4, block_size 8., got 12"),
    (_dequantize_sum, {"packed": torch.zeros(2, 12, dtype=torch.uint8)}, ValueError,
     "dequantize_sum_: expected packed of shape \\[k, g, row_bytes\\], got \\[2, 12\\]"),
    (_dequantize_sum, {"packed": torch.zeros(3, 2, 12)}, TypeError,
     "expected packed of dtype Byte"),
    (_dequantize_sum, {"out": torch.zeros(15)}, ValueError,
     "out's numel 15 is not divisible by the 2 chunks"),
    (_dequantize_sum, {"out": torch.zeros(16, dtype=torch.float64)}, TypeError,
     "expected out of dtype Float, BFloat16 or Half, got Double"),
    (_dequantize_sum, {"out": torch.zeros(32)[::2]}, ValueError, "expected out to be contiguous"),
    (_dequantize_sum, {"exact_index": 1}, ValueError,
     "exact_index = 1 names an exact row, but exact was not given"),
    (_dequantize_sum, {"exact": torch.zeros(16), "exact_index": 3}, ValueError,
     "exact_index = 3 is not a sender index in \\[0, 3\\)"),
    (_dequantize_sum, {"exact": torch.zeros(8), "exact_index": 0}, ValueError,
     "expected exact to have out's numel 16, got 8"),
]


@pytest.mark.parametrize("call,overrides,error,message", _BAD_CALLS)
def test_bad_arguments_raise_a_clear_error(call, overrides, error, message):
    with pytest.raises(error, match=message) as info:
        call(**overrides)
    assert str(info.value).startswith("zero_ext::")


def test_dequantize_rejects_overlapping_exact():
    out = torch.zeros(32)
    packed = torch.zeros(2, 2, 12, dtype=torch.uint8)
    with pytest.raises(ValueError, match="exact shares memory with out without being out"):
        ops.dequantize_sum_(out[:16], packed, 8, 8, exact=out[8:24], exact_index=0)
    with pytest.raises(ValueError, match="dequantize_: expected packed of shape \\[g, row_bytes\\]"):
        ops.dequantize_(out, packed, 8, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_raise():
    _needs_cuda_kernel("cuda")
    x = torch.zeros(16, device="cuda")
    with pytest.raises(ValueError, match="expected residual on x's device"):
        ops.quantize_chunks(x, 2, 8, 8, residual=_R, residual_scale=_S.cuda())
    packed = ops.quantize_chunks(x, 2, 8, 8)
    with pytest.raises(ValueError, match="expected packed on out's device"):
        ops.dequantize_sum_(torch.zeros(16), packed[None], 8, 8)
