#include "csrc/quant_args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "kernels/quant_math.h"

namespace zero_ext {
namespace {

constexpr const char* kQuantize = "zero_ext::quantize_chunks";

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void check_format(const char* op, int64_t bits, int64_t block_size) {
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, op, ": expected bits 8 (int8) or 4 (int4), got ",
                    bits);
  TORCH_CHECK_VALUE(block_size >= 8 && block_size % 8 == 0, op,
                    ": expected block_size to be a positive multiple of 8, got ", block_size);
}

}  // namespace

void check_flat_float(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined (None)");
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), op, ": expected ", name,
                   " of dtype Float, BFloat16 or Half, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": expected ", name, " to be 1-D, got shape ", t.sizes(),
                    "; flatten it first");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected ", name,
                    " to be contiguous; call .contiguous() on it first");
}

void check_same_device(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": expected ", name, " on ", ref_name,
                    "'s device (", ref.device(), "), got ", t.device());
}

bool share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto a0 = reinterpret_cast<uintptr_t>(a.const_data_ptr());
  const auto b0 = reinterpret_cast<uintptr_t>(b.const_data_ptr());
  const auto a1 = a0 + static_cast<uintptr_t>(a.numel()) * a.element_size();
  const auto b1 = b0 + static_cast<uintptr_t>(b.numel()) * b.element_size();
  return a0 < b1 && b0 < a1;
}

void check_quantize_chunks_args(const QuantizeChunksArgs& a) {
  check_flat_float(kQuantize, a.x, "x");
  check_format(kQuantize, a.bits, a.block_size);
  TORCH_CHECK_VALUE(a.chunks >= 1, kQuantize, ": expected chunks >= 1, got ", a.chunks);
  TORCH_CHECK_VALUE(a.x.numel() % a.chunks == 0, kQuantize, ": x's numel ", a.x.numel(),
                    " is not divisible by chunks = ", a.chunks,
                    "; pad x to a multiple of chunks (each chunk pads its own last block)");
  for (size_t i = 0; i < a.skip.size(); ++i) {
    TORCH_CHECK_VALUE(a.skip[i] >= 0 && a.skip[i] < a.chunks, kQuantize, ": skip[", i, "] = ",
                      a.skip[i], " is not a row index in [0, ", a.chunks, ")");
  }
  TORCH_CHECK_VALUE(a.residual.has_value() == a.residual_scale.has_value(), kQuantize,
                    ": residual and residual_scale come together (error feedback) or not at all; "
                    "got only ",
                    a.residual.has_value() ? "residual" : "residual_scale");
  if (!a.residual.has_value()) return;
  const at::Tensor& r = *a.residual;
  const at::Tensor& s = *a.residual_scale;
  TORCH_CHECK_TYPE(r.scalar_type() == at::kFloat8_e4m3fn, kQuantize,
                   ": expected residual of dtype Float8_e4m3fn (1 byte per element), got ",
                   r.scalar_type());
  TORCH_CHECK_VALUE(r.dim() == 1 && r.numel() == a.x.numel(), kQuantize,
                    ": expected residual of shape [", a.x.numel(), "] (x's numel), got ",
                    r.sizes());
  TORCH_CHECK_VALUE(r.is_contiguous(), kQuantize,
                    ": expected residual to be contiguous (it is updated in place)");
  check_same_device(kQuantize, r, "residual", a.x, "x");
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, kQuantize,
                   ": expected residual_scale of dtype Float, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 1 && s.numel() == a.chunks, kQuantize,
                    ": expected residual_scale of shape [", a.chunks, "] (one per chunk), got ",
                    s.sizes());
  TORCH_CHECK_VALUE(s.is_contiguous(), kQuantize,
                    ": expected residual_scale to be contiguous (it is updated in place)");
  check_same_device(kQuantize, s, "residual_scale", a.x, "x");
  TORCH_CHECK_VALUE(!share_memory(r, s) && !share_memory(r, a.x) && !share_memory(s, a.x),
                    kQuantize, ": residual, residual_scale and x must not share memory");
  TORCH_CHECK_VALUE(std::isfinite(a.residual_factor), kQuantize,
                    ": expected a finite residual_factor, got ", a.residual_factor);
}

QuantizeOutput empty_quantize_output(const QuantizeChunksArgs& a) {
  const int64_t m = a.x.numel() / a.chunks;
  const int64_t row_bytes = kernels::quant_row_bytes(m, static_cast<int>(a.bits), a.block_size);
  return {m, row_bytes, at::empty({a.chunks, row_bytes}, a.x.options().dtype(at::kByte))};
}

std::vector<int64_t> rows_to_quantize(int64_t chunks, at::IntArrayRef skip) {
  std::vector<bool> skipped(chunks, false);
  for (const int64_t c : skip) skipped[c] = true;
  std::vector<int64_t> rows;
  rows.reserve(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    if (!skipped[c]) rows.push_back(c);
  }
  return rows;
}

void check_dequantize_args(const DequantizeArgs& a) {
  const char* op = a.sum ? "zero_ext::dequantize_sum_" : "zero_ext::dequantize_";
  check_flat_float(op, a.out, "out");
  check_format(op, a.bits, a.block_size);
  const at::Tensor& p = a.packed;
  TORCH_CHECK_VALUE(p.defined(), op, ": packed is undefined (None)");
  TORCH_CHECK_TYPE(p.scalar_type() == at::kByte, op,
                   ": expected packed of dtype Byte (uint8 rows from quantize_chunks), got ",
                   p.scalar_type());
  const int64_t dims = a.sum ? 3 : 2;
  TORCH_CHECK_VALUE(p.dim() == dims, op, ": expected packed of shape ",
                    a.sum ? "[k, g, row_bytes]" : "[g, row_bytes]", ", got ", p.sizes());
  TORCH_CHECK_VALUE(p.is_contiguous(), op,
                    ": expected packed to be contiguous; call .contiguous() on it first");
  check_same_device(op, p, "packed", a.out, "out");
  const int64_t g = p.size(dims - 2);
  TORCH_CHECK_VALUE(g >= 1, op, ": expected at least one chunk per sender in packed, got shape ",
                    p.sizes());
  TORCH_CHECK_VALUE(a.out.numel() % g == 0, op, ": out's numel ", a.out.numel(),
                    " is not divisible by the ", g, " chunks of a packed sender");
  const int64_t m = a.out.numel() / g;
  const int64_t expected = kernels::quant_row_bytes(m, static_cast<int>(a.bits), a.block_size);
  TORCH_CHECK_VALUE(p.size(dims - 1) == expected, op, ": expected packed rows of ", expected,
                    " bytes (", m, " elements per chunk, bits ", a.bits, ", block_size ",
                    a.block_size, "), got ", p.size(dims - 1),
                    "; pass the bits and block_size the rows were quantized with");
  TORCH_CHECK_VALUE(!share_memory(a.out, p), op, ": out and packed must not share memory");
  if (!a.exact.has_value()) {
    TORCH_CHECK_VALUE(a.exact_index == -1, op, ": exact_index = ", a.exact_index,
                      " names an exact row, but exact was not given");
    return;
  }
  const at::Tensor& e = *a.exact;
  check_flat_float(op, e, "exact");
  TORCH_CHECK_VALUE(e.numel() == a.out.numel(), op, ": expected exact to have out's numel ",
                    a.out.numel(), ", got ", e.numel());
  check_same_device(op, e, "exact", a.out, "out");
  const int64_t k = p.size(0);
  TORCH_CHECK_VALUE(a.exact_index >= 0 && a.exact_index < k, op, ": exact_index = ",
                    a.exact_index, " is not a sender index in [0, ", k, ") of packed");
  // Element t of out reads element t of exact before writing: the very same memory is fine.
  const bool same_view =
      e.const_data_ptr() == a.out.const_data_ptr() && e.scalar_type() == a.out.scalar_type();
  TORCH_CHECK_VALUE(same_view || !share_memory(a.out, e), op,
                    ": exact shares memory with out without being out itself; pass a separate "
                    "tensor (or out)");
}

PackedShape packed_shape(const DequantizeArgs& a) {
  const int64_t dims = a.sum ? 3 : 2;
  const int64_t g = a.packed.size(dims - 2);
  return {a.sum ? a.packed.size(0) : 1, g, a.out.numel() / g, a.packed.size(dims - 1)};
}

}  // namespace zero_ext
