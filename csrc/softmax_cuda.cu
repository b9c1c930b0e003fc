// CUDA kernels of zero_ext::scaled_masked_softmax, its backward and zero_ext::dropout_keep_mask:
// validate and build the run with the shared code (csrc/softmax_args.h), then hand it to the
// launchers in kernels/cuda/softmax.cu on the current stream. fp32 / bf16 / fp16 (fp64, which only
// gradcheck uses, is CPU-only). setup.py compiles this file in a CUDA build only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "csrc/cuda_checks.h"
#include "csrc/softmax_args.h"
#include "kernels/cuda/softmax.cuh"

namespace zero_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> scaled_masked_softmax_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale, bool causal,
    double dropout_p, const at::Tensor& seed) {
  constexpr const char* kOp = "zero_ext::scaled_masked_softmax";
  at::Tensor mask_view;
  kernels::SoftmaxRun run =
      softmax_forward_run(x, mask, scale, causal, dropout_p, seed, mask_view);
  check_not_double(x, kOp);
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto [out, probs] = softmax_forward_outputs(x, dropout_p);
  set_softmax_outputs(run, out, probs);
  check_launch(kernels::cuda::launch_softmax_forward(run, stream_of(x)), kOp);
  return {out, probs};
}

at::Tensor scaled_masked_softmax_backward_cuda(const at::Tensor& grad_out,
                                               const at::Tensor& probs, double scale,
                                               double dropout_p, const at::Tensor& seed) {
  constexpr const char* kOp = "zero_ext::scaled_masked_softmax_backward";
  const c10::cuda::CUDAGuard device_guard(probs.device());
  at::Tensor grad_x = at::empty(probs.sizes(), probs.options());
  const kernels::SoftmaxRun run =
      softmax_backward_run(grad_out, probs, scale, dropout_p, seed, grad_x);
  check_not_double(probs, kOp);
  check_launch(kernels::cuda::launch_softmax_backward(run, stream_of(probs)), kOp);
  return grad_x;
}

at::Tensor dropout_keep_mask_cuda(const at::Tensor& x, double dropout_p, const at::Tensor& seed) {
  const uint64_t key = check_keep_mask_args(x, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor keep = at::empty(x.sizes(), x.options().dtype(at::kBool));
  check_launch(kernels::cuda::launch_dropout_keep_mask(keep.data_ptr<bool>(), x.numel(), key,
                                                       kernels::dropout_threshold(dropout_p),
                                                       dropout_p == 0.0, stream_of(x)),
               "zero_ext::dropout_keep_mask");
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) {
  m.impl("scaled_masked_softmax", &scaled_masked_softmax_cuda);
  m.impl("scaled_masked_softmax_backward", &scaled_masked_softmax_backward_cuda);
  m.impl("dropout_keep_mask", &dropout_keep_mask_cuda);
}

}  // namespace zero_ext
