// CUDA kernels of zero_ext::quantize_chunks, zero_ext::dequantize_sum_ and zero_ext::dequantize_,
// on calls QuantOps (csrc/quant_args.h) validated: hand raw pointers to the launchers in
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

#include <cstdint>
#include <vector>

#include "csrc/adamw_args.h"  // element_type
#include "csrc/cuda_checks.h"
#include "csrc/quant_args.h"
#include "kernels/cuda/quant.cuh"
#include "kernels/quant_math.h"

namespace zero_ext {
namespace {

constexpr const char* kQuantize = "zero_ext::quantize_chunks";

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

void quantize_chunks_cuda(const QuantizeChunksArgs& args, const QuantizeOutput& output) {
  const at::Tensor& x = args.x;
  const std::optional<at::Tensor>& residual = args.residual;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const std::vector<std::pair<int64_t, int64_t>> runs =
      row_runs(rows_to_quantize(args.chunks, args.skip));
  if (runs.empty()) return;
  if (output.m == 0) {  // empty chunks: no block scale, so a residual scale of 0
    if (residual.has_value()) {
      for (const auto& [first, count] : runs) args.residual_scale->narrow(0, first, count).zero_();
    }
    return;
  }

  const bool feedback = residual.has_value();
  const cudaStream_t stream = stream_of(x);
  kernels::cuda::QuantizeRun run{
      x.const_data_ptr(),
      element_type(x.scalar_type()),
      output.m,
      args.block_size,
      static_cast<int>(args.bits),
      output.packed.data_ptr<uint8_t>(),
      output.row_bytes,
      0,
      0,
      feedback ? static_cast<uint8_t*>(residual->data_ptr()) : nullptr,
      feedback ? args.residual_scale->const_data_ptr<float>() : nullptr,
      // Rounded to fp32 as ATen rounds a Python scalar multiplier.
      static_cast<float>(args.residual_factor)};
  for (const auto& [first, count] : runs) {
    run.first_row = first;
    run.num_rows = count;
    check_launch(kernels::cuda::launch_quantize_rows(run, stream), kQuantize);
  }
  if (!feedback) return;

  // The encode pass reads the old residual scales; the new ones go to scratch first.
  at::Tensor new_scale = at::empty({args.chunks}, x.options().dtype(at::kFloat));
  for (const auto& [first, count] : runs) {
    run.first_row = first;
    run.num_rows = count;
    check_launch(kernels::cuda::launch_encode_residual(run, new_scale.data_ptr<float>(), stream),
                 kQuantize);
  }
  float* scales = args.residual_scale->data_ptr<float>();
  for (const auto& [first, count] : runs) {
    check_launch(cudaMemcpyAsync(scales + first, new_scale.const_data_ptr<float>() + first,
                                 count * sizeof(float), cudaMemcpyDeviceToDevice, stream),
                 kQuantize);
  }
}

void dequantize_cuda(const DequantizeArgs& args, bool accumulate) {
  // The kernels read the packed rows' codes and scales as 4-byte words.
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(args.packed.const_data_ptr()) % 4 == 0,
                    "zero_ext dequantize: on CUDA the packed rows must start 4-byte aligned; got "
                    "a view at an offset that is not a multiple of 4 bytes: pass the tensor "
                    "quantize_chunks returned (or a .clone() of the view)");
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
  check_launch(kernels::cuda::launch_dequantize(run, stream_of(args.out)),
               args.sum ? "zero_ext::dequantize_sum_" : "zero_ext::dequantize_");
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) { QuantOps<quantize_chunks_cuda, dequantize_cuda>::impl(m); }

}  // namespace zero_ext
