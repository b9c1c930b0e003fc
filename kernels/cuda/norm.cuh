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

// Threads per CUDA block: one block per row for the row kernels; 32 columns by 8 rows for the
// parameter gradients.
inline constexpr int kNormBlockThreads = 256;
// The parameter gradients sum their rows in chunks (a grid dimension), each chunk of at least
// kNormMinChunkRows rows.
inline constexpr int64_t kNormMaxChunks = 1024;
inline constexpr int64_t kNormMinChunkRows = 64;

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
  int64_t chunks = 1;        // norm_param_grad_chunks(rows, h, the device's multiprocessors)
  float* partial = nullptr;  // chunks > 1: fp32 scratch of 2 * chunks * h (the chunks' sums)
};

// How many row chunks the parameter gradients are summed in: enough blocks to fill the GPU's
// multiprocessors (about four each), none under kNormMinChunkRows rows, at most kNormMaxChunks.
int64_t norm_param_grad_chunks(int64_t rows, int64_t h, int multiprocessors);

// The input gradient (one block per row), then the parameter gradients: each row chunk's
// column sums (rows in a fixed order), then the chunks' sums in chunk order. Deterministic for
// a given chunk count.
cudaError_t launch_norm_backward(const NormBackwardRun& run, cudaStream_t stream);

}  // namespace zero_ext::kernels::cuda
