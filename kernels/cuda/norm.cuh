// Raw-pointer launchers of the RMSNorm / LayerNorm kernels (optionally fused with the residual
// add): forward, input gradient, and weight / bias gradients. The formulas are those of the CPU
// kernels (kernels/cpu/norm.h), with fp32 statistics; fp32 / bf16 / fp16 elements.
//
// csrc/norm_cuda.cu validates the ops' arguments and calls these launchers on the current
// stream. Nothing here knows about tensors, the dispatcher or torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/adamw_math.h"  // ElementType
#include "kernels/cpu/norm.h"    // NormForwardTensors, NormBackwardTensors

namespace zero_ext::kernels::cuda {

// Threads per CUDA block: one block per row for the row kernels, one thread per column for the
// parameter gradients.
inline constexpr int kNormBlockThreads = 256;

// The statistics (mean, rstd) and the parameter gradients are fp32.
struct NormForwardRun : cpu::NormForwardTensors {
  ElementType type;
  int64_t rows;
  int64_t h;
  float eps;
  bool rms;
};

cudaError_t launch_norm_forward(const NormForwardRun& run, cudaStream_t stream);

struct NormBackwardRun : cpu::NormBackwardTensors {
  ElementType type;
  int64_t rows;
  int64_t h;
  bool rms;
};

// The input gradient (one block per row), then the parameter gradients (one thread per column,
// rows summed in order: deterministic).
cudaError_t launch_norm_backward(const NormBackwardRun& run, cudaStream_t stream);

}  // namespace zero_ext::kernels::cuda
