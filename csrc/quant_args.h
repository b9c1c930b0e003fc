// The arguments of zero_ext::quantize_chunks, zero_ext::dequantize_sum_ and zero_ext::dequantize_
// as every backend receives them, and their validation.
//
// The CPU glue (csrc/quant_cpu.cpp) and the CUDA glue (csrc/quant_cuda.cu) register their kernels
// through QuantOps, which validates and allocates the result for both, so the same bad input
// raises the same message on every backend. The packed row layout and its byte count:
// kernels/quant_math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace zero_ext {

// Checks shared by the compressed-communication ops (quantization here, top-k selection in
// csrc/topk_cpu.cpp), each raising a message that starts with `op`.
// A defined 1-D contiguous fp32 / bf16 / fp16 tensor.
void check_flat_float(const char* op, const at::Tensor& t, const char* name);
// t on ref's device.
void check_same_device(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& ref, const char* ref_name);
// Whether two tensors' bytes overlap.
bool share_memory(const at::Tensor& a, const at::Tensor& b);

struct QuantizeChunksArgs {
  const at::Tensor& x;  // 1-D contiguous fp32 / bf16 / fp16, numel divisible by chunks
  int64_t chunks;
  int64_t bits;                                     // 4 or 8
  int64_t block_size;                               // a positive multiple of 8
  at::IntArrayRef skip;                             // rows neither computed nor written
  const std::optional<at::Tensor>& residual;        // float8_e4m3fn [numel], or none
  const std::optional<at::Tensor>& residual_scale;  // fp32 [chunks], given with residual
  double residual_factor;
};

// Raises c10::Error (ValueError / TypeError in Python) naming the op, the argument and what was
// expected versus what came.
void check_quantize_chunks_args(const QuantizeChunksArgs& args);

// A validated quantize_chunks call's result, allocated and not yet written.
struct QuantizeOutput {
  int64_t m;          // elements per chunk
  int64_t row_bytes;  // bytes per packed row (kernels::quant_row_bytes)
  at::Tensor packed;  // uint8 [chunks, row_bytes] on x's device
};
QuantizeOutput empty_quantize_output(const QuantizeChunksArgs& args);

// Which rows of a quantize_chunks call are computed (not in skip), in order.
std::vector<int64_t> rows_to_quantize(int64_t chunks, at::IntArrayRef skip);

// zero_ext::dequantize_sum_ (sum == true) or zero_ext::dequantize_ (sum == false, packed is
// [g, row_bytes] and there is no exact row and no accumulation).
struct DequantizeArgs {
  bool sum;
  const at::Tensor& out;     // 1-D contiguous fp32 / bf16 / fp16, g * m elements
  const at::Tensor& packed;  // uint8 [k, g, row_bytes] (sum) or [g, row_bytes]
  int64_t bits;
  int64_t block_size;
  const std::optional<at::Tensor>& exact;  // g * m elements fp32 / bf16 / fp16, or none
  int64_t exact_index;                     // in [0, k) when exact is given, else -1
};

void check_dequantize_args(const DequantizeArgs& args);

// The shape [k, g, row_bytes] of a validated call's packed rows (k = 1 for dequantize_).
struct PackedShape {
  int64_t k;
  int64_t g;
  int64_t m;
  int64_t row_bytes;
};
PackedShape packed_shape(const DequantizeArgs& args);

// One backend's zero_ext::quantize_chunks, dequantize_sum_ and dequantize_ in their schemas'
// signatures: each validates the call, then hands it to the backend's kernels, quantize(args,
// output) filling output.packed's rows and dequantize(args, accumulate). impl() registers the
// three under the backend's dispatch key (TORCH_LIBRARY_IMPL).
template <void (*Quantize)(const QuantizeChunksArgs&, const QuantizeOutput&),
          void (*Dequantize)(const DequantizeArgs&, bool)>
struct QuantOps {
  static at::Tensor quantize_chunks(const at::Tensor& x, int64_t chunks, int64_t bits,
                                    int64_t block_size, at::IntArrayRef skip,
                                    const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& residual_scale,
                                    double residual_factor) {
    const QuantizeChunksArgs args{x,        chunks,         bits,           block_size,
                                  skip,     residual,       residual_scale, residual_factor};
    check_quantize_chunks_args(args);
    const QuantizeOutput output = empty_quantize_output(args);
    Quantize(args, output);
    return output.packed;
  }

  static void dequantize_sum(const at::Tensor& out, const at::Tensor& packed, int64_t bits,
                             int64_t block_size, const std::optional<at::Tensor>& exact,
                             int64_t exact_index, bool accumulate) {
    checked_dequantize({true, out, packed, bits, block_size, exact, exact_index}, accumulate);
  }

  static void dequantize(const at::Tensor& out, const at::Tensor& packed, int64_t bits,
                         int64_t block_size) {
    checked_dequantize({false, out, packed, bits, block_size, std::nullopt, -1}, false);
  }

  static void impl(torch::Library& m) {
    m.impl("quantize_chunks", &quantize_chunks);
    m.impl("dequantize_sum_", &dequantize_sum);
    m.impl("dequantize_", &dequantize);
  }

 private:
  static void checked_dequantize(const DequantizeArgs& args, bool accumulate) {
    check_dequantize_args(args);
    Dequantize(args, accumulate);
  }
};

}  // namespace zero_ext
