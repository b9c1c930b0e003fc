// Raw-pointer launchers of the fused linear cross-entropy's row kernels on CUDA: the math of
// kernels/fused_ce_rows.h, as kernels/cpu/fused_ce.h computes it (fold a block of logits into the
// per-token online log-sum-exp; turn a block into its logit gradient in place), one thread block
// per token row.
//
// csrc/fused_ce_cuda.cu gives them each block of the driver in csrc/fused_ce.h on the current
// stream. Nothing here knows about tensors, the dispatcher or torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/fused_ce_rows.h"

namespace zero_ext::kernels::cuda {

// Each returns cudaGetLastError() after its launch (cudaSuccess for an empty block).
cudaError_t launch_ce_forward(const CeForwardRows<float>& run, cudaStream_t stream);
cudaError_t launch_ce_forward(const CeForwardRows<double>& run, cudaStream_t stream);
cudaError_t launch_ce_backward(const CeBackwardRows<float>& run, cudaStream_t stream);
cudaError_t launch_ce_backward(const CeBackwardRows<double>& run, cudaStream_t stream);

}  // namespace zero_ext::kernels::cuda
