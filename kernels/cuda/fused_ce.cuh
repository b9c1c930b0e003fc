// Raw-pointer launchers of the fused linear cross-entropy's row kernels on CUDA: the same math
// as kernels/cpu/fused_ce.h (fold a block of logits into the per-token online log-sum-exp; turn
// a recomputed block into its logit gradient in place), one thread block per token row.
//
// csrc/fused_ce_cuda.cu gives them each block of the driver in csrc/fused_ce.h on the current
// stream. Nothing here knows about tensors, the dispatcher or torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace zero_ext::kernels::cuda {

// A block of logits [rows, cols], row-major, whose column 0 is vocabulary entry col0, and its
// tokens' targets and running state (each [rows], device, of the accumulation type T).
template <typename T>
struct CeForwardRun {
  const T* logits;
  int64_t rows;
  int64_t cols;
  int64_t col0;
  const int64_t* target;
  int64_t ignore_index;
  T* max;
  T* sumexp;
  T* logit_sum;
  T* target_logit;
};

// The same block overwritten with grad * (softmax * (1 + 2 z lse) - smoothing / V - (1 -
// smoothing) onehot); zero rows for ignored tokens.
template <typename T>
struct CeBackwardRun {
  T* logits;
  int64_t rows;
  int64_t cols;
  int64_t col0;
  const int64_t* target;
  int64_t ignore_index;
  const T* lse;
  const T* grad;
  T smooth_per_class;  // label_smoothing / V
  T target_weight;     // 1 - label_smoothing
  T two_z_loss;        // 2 * z_loss
};

// Each returns cudaGetLastError() after its launch (cudaSuccess for an empty block).
cudaError_t launch_ce_forward(const CeForwardRun<float>& run, cudaStream_t stream);
cudaError_t launch_ce_forward(const CeForwardRun<double>& run, cudaStream_t stream);
cudaError_t launch_ce_backward(const CeBackwardRun<float>& run, cudaStream_t stream);
cudaError_t launch_ce_backward(const CeBackwardRun<double>& run, cudaStream_t stream);

}  // namespace zero_ext::kernels::cuda
