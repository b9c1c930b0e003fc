// Raw-pointer multi-tensor AdamW for CUDA: one launcher that walks every tensor of an op call in
// 64K-element chunks and updates them with as few kernel launches as the launch tables allow.
//
// csrc/adamw_cuda.cu validates the op's arguments, derives the coefficients on the host and calls
// launch_adamw_step. Nothing here knows about tensors, the dispatcher or torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/adamw_math.h"

namespace zero_ext::kernels::cuda {

// One parameter of the call and its state, as device pointers. All pointers cover `numel`
// elements; a tensor may be of any length (int64 indexing) and any alignment (a tensor whose
// pointers are not aligned for vector access takes a slower scalar path).
struct AdamWCudaTensor {
  float* param;                 // fp32 master weights, updated in place
  const void* grad;             // gradient, of the call's grad ElementType
  float* exp_avg;               // first moment, updated in place
  float* exp_avg_sq;            // second moment, updated in place
  void* param_16bit;            // 16-bit copy of the updated param; ignored without has_param_16bit
  int64_t numel;                // zero-element tensors are skipped
  float step_size;              // this tensor's AdamWCoefficients::step_size
  float bias_correction2_sqrt;  // this tensor's AdamWCoefficients::bias_correction2_sqrt
};

// Launch geometry, public so that tests and benchmarks can size inputs that cross the limits.
// One thread block updates one chunk; a launch covers at most kMaxBlocksPerLaunch chunks of at
// most kMaxTensorsPerLaunch tensors, which keeps its by-value metadata under 4 KB.
inline constexpr int kChunkElements = 1 << 16;
inline constexpr int kBlockThreads = 512;
inline constexpr int kMaxTensorsPerLaunch = 36;
inline constexpr int kMaxBlocksPerLaunch = 320;

// Updates every tensor in `tensors` (host array; the pointers in it are device pointers) on
// `stream`, asynchronously. `common` holds the call's coefficients as derived with inv_scale = 1;
// its step_size and bias_correction2_sqrt are ignored in favour of the per-tensor values.
// `inv_scale` (nullable, device) multiplies the gradient factor on the device. `found_inf`
// (nullable, device): when *found_inf != 0 the kernels write nothing. Neither is read on the host.
// Returns the first launch error (cudaGetLastError after each launch), or cudaSuccess; stops
// launching at the first error.
cudaError_t launch_adamw_step(const AdamWCudaTensor* tensors, int64_t num_tensors,
                              const AdamWCoefficients<float>& common, ElementType grad_type,
                              bool has_param_16bit, ElementType param_16bit_type,
                              const float* inv_scale, const float* found_inf,
                              cudaStream_t stream);

}  // namespace zero_ext::kernels::cuda
