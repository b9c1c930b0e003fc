// CUDA kernels of zero_ext::fused_linear_cross_entropy_fwd / _bwd / _fwd_grad: the driver of
// csrc/fused_ce.h (cuBLAS matmuls through ATen) with the row kernels of kernels/cuda/fused_ce.cuh
// on the current stream. setup.py compiles this file in a CUDA build only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "csrc/cuda_checks.h"
#include "csrc/fused_ce.h"
#include "csrc/fused_ce_args.h"
#include "kernels/cuda/fused_ce.cuh"

namespace zero_ext {
namespace {

void forward_rows(const at::Tensor& logits, int64_t col0, const at::Tensor& target,
                  int64_t ignore_index, const CeRowState& s) {
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kFusedCeForwardOp, [&] {
    const auto block = forward_rows_of<scalar_t>(logits, col0, target, ignore_index, s);
    check_launch(kernels::cuda::launch_ce_forward(block, stream_of(logits)), kFusedCeForwardOp);
  });
}

void backward_rows(const at::Tensor& logits, int64_t col0, const at::Tensor& target,
                   int64_t ignore_index, const at::Tensor& lse, const at::Tensor& grad,
                   double label_smoothing, double z_loss, int64_t vocab) {
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kFusedCeBackwardOp, [&] {
    const auto block = backward_rows_of<scalar_t>(logits, col0, target, ignore_index, lse, grad,
                                                  label_smoothing, z_loss, vocab);
    check_launch(kernels::cuda::launch_ce_backward(block, stream_of(logits)),
                 kFusedCeBackwardOp);
  });
}

constexpr CeRowKernels kCudaKernels{&forward_rows, &backward_rows};

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) {
  FusedCeOps<kCudaKernels, c10::cuda::CUDAGuard>::register_ops(m);
}

}  // namespace zero_ext
