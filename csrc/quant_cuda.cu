// CUDA kernels of zero_ext::quantize_chunks, zero_ext::dequantize_sum_ and zero_ext::dequantize_:
// validate with the shared checks (csrc/quant_args.h) and hand raw pointers to the launchers in
// kernels/cuda/quant.cu on the current stream. Skipped rows split quantize_chunks into runs of
// consecutive rows, one launch each (a reduce-scatter skips one row: at most two launches).
// setup.py compiles this file in a CUDA build only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <vector>

#include "csrc/adamw_args.h"  // element_type
#include "csrc/quant_args.h"
#include "kernels/cuda/quant.cuh"
#include "kernels/quant_math.h"

namespace zero_ext {
namespace {

constexpr const char* kQuantize = "zero_ext::quantize_chunks";

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// [first, first + count) runs of consecutive rows in `rows` (sorted, distinct).
std::vector<std::pair<int64_t, int64_t>> row_runs(const std::vector<int64_t>& rows) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (const int64_t r : rows) {
    if (!runs.empty() && runs.back().first + runs.back().second == r) {
      ++runs.back().second;
    } else {
      runs.emplace_back(r, 1);
    }
  }
  return runs;
}

at::Tensor quantize_chunks_cuda(const at::Tensor& x, int64_t chunks, int64_t bits,
                                int64_t block_size, at::IntArrayRef skip,
                                const std::optional<at::Tensor>& residual,
                                const std::optional<at::Tensor>& residual_scale,
                                double residual_factor) {
  check_quantize_chunks_args(
      {x, chunks, bits, block_size, skip, residual, residual_scale, residual_factor});
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t m = x.numel() / chunks;
  const int b = static_cast<int>(bits);
  const int64_t row_bytes = kernels::quant_row_bytes(m, b, block_size);
  at::Tensor packed = at::empty({chunks, row_bytes}, x.options().dtype(at::kByte));
  const std::vector<std::pair<int64_t, int64_t>> runs = row_runs(rows_to_quantize(chunks, skip));
  if (runs.empty()) return packed;
  if (m == 0) {  // empty chunks: no block scale, so a residual scale of 0
    if (residual.has_value()) {
      for (const auto& [first, count] : runs) residual_scale->narrow(0, first, count).zero_();
    }
    return packed;
  }

  const bool feedback = residual.has_value();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  kernels::cuda::QuantizeRun run{x.const_data_ptr(),
                                 element_type(x.scalar_type()),
                                 m,
                                 block_size,
                                 b,
                                 packed.data_ptr<uint8_t>(),
                                 row_bytes,
                                 0,
                                 0,
                                 feedback ? static_cast<uint8_t*>(residual->data_ptr()) : nullptr,
                                 feedback ? residual_scale->const_data_ptr<float>() : nullptr,
                                 // Rounded to fp32 as ATen rounds a Python scalar multiplier.
                                 static_cast<float>(residual_factor)};
  for (const auto& [first, count] : runs) {
    run.first_row = first;
    run.num_rows = count;
    check_launch(kernels::cuda::launch_quantize_rows(run, stream), kQuantize);
  }
  if (!feedback) return packed;

  // The encode pass reads the old residual scales; the new ones go to scratch first.
  at::Tensor new_scale = at::empty({chunks}, x.options().dtype(at::kFloat));
  for (const auto& [first, count] : runs) {
    run.first_row = first;
    run.num_rows = count;
    check_launch(kernels::cuda::launch_encode_residual(run, new_scale.data_ptr<float>(), stream),
                 kQuantize);
  }
  float* scales = residual_scale->data_ptr<float>();
  for (const auto& [first, count] : runs) {
    check_launch(cudaMemcpyAsync(scales + first, new_scale.const_data_ptr<float>() + first,
                                 count * sizeof(float), cudaMemcpyDeviceToDevice, stream),
                 kQuantize);
  }
  return packed;
}

void dequantize_cuda(const DequantizeArgs& args, bool accumulate) {
  check_dequantize_args(args);
  const c10::cuda::CUDAGuard device_guard(args.out.device());
  const PackedShape shape = packed_shape(args);
  const bool has_exact = args.exact.has_value();
  const kernels::cuda::DequantizeRun run{
      args.out.data_ptr(),
      element_type(args.out.scalar_type()),
      args.packed.const_data_ptr<uint8_t>(),
      shape.k,
      shape.g,
      shape.m,
      shape.row_bytes,
      args.block_size,
      static_cast<int>(args.bits),
      has_exact ? args.exact->const_data_ptr() : nullptr,
      has_exact ? element_type(args.exact->scalar_type()) : kernels::ElementType::kFloat32,
      args.exact_index,
      accumulate,
      args.sum};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(args.out.device().index()).stream();
  check_launch(kernels::cuda::launch_dequantize(run, stream),
               args.sum ? "zero_ext::dequantize_sum_" : "zero_ext::dequantize_");
}

void dequantize_sum_cuda(const at::Tensor& out, const at::Tensor& packed, int64_t bits,
                         int64_t block_size, const std::optional<at::Tensor>& exact,
                         int64_t exact_index, bool accumulate) {
  dequantize_cuda({true, out, packed, bits, block_size, exact, exact_index}, accumulate);
}

void dequantize_plain_cuda(const at::Tensor& out, const at::Tensor& packed, int64_t bits,
                           int64_t block_size) {
  dequantize_cuda({false, out, packed, bits, block_size, std::nullopt, -1}, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) {
  m.impl("quantize_chunks", &quantize_chunks_cuda);
  m.impl("dequantize_sum_", &dequantize_sum_cuda);
  m.impl("dequantize_", &dequantize_plain_cuda);
}

}  // namespace zero_ext
