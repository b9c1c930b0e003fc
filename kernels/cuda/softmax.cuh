// Raw-pointer launchers of the scaled masked softmax + dropout kernels (forward, backward) and of
// the dropout keep-mask, fp32 / bf16 / fp16 elements. Arguments and formulas:
// kernels/softmax_math.h, shared with the CPU kernels; the dropout bits come from
// kernels/philox.h, so both backends drop the same elements for the same seed.
//
// csrc/softmax_cuda.cu validates the ops' arguments and calls these launchers on the current
// stream. Nothing here knows about tensors, the dispatcher or torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/softmax_math.h"

namespace zero_ext::kernels::cuda {

// Threads per CUDA block: one block per row.
inline constexpr int kSoftmaxBlockThreads = 256;

cudaError_t launch_softmax_forward(const SoftmaxRun& run, cudaStream_t stream);

cudaError_t launch_softmax_backward(const SoftmaxRun& run, cudaStream_t stream);

// keep[i] = element i of a dropout under (seed, threshold) is kept, i < n; all true when
// none_dropped (p = 0).
cudaError_t launch_dropout_keep_mask(bool* keep, int64_t n, uint64_t seed, uint32_t threshold,
                                     bool none_dropped, cudaStream_t stream);

}  // namespace zero_ext::kernels::cuda
