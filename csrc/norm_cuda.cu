// CUDA kernels of zero_ext::fused_norm and zero_ext::fused_norm_backward: validate with the
// shared checks (csrc/norm_args.h) and hand raw pointers to the launchers in kernels/cuda/norm.cu
// on the current stream. fp32 / bf16 / fp16 (fp64, which only gradcheck uses, is CPU-only).
// setup.py compiles this file in a CUDA build only.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "csrc/adamw_args.h"  // element_type
#include "csrc/norm_args.h"
#include "kernels/cuda/norm.cuh"

namespace zero_ext {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_not_double(const at::Tensor& t, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() != at::kDouble, op,
                   ": Double runs on the CPU only; use Float, BFloat16 or Half on CUDA");
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_norm_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  constexpr const char* kOp = "zero_ext::fused_norm";
  const NormForwardArgs args{x, residual, weight, bias, eps, rms};
  check_norm_forward_args(args);
  check_not_double(x, kOp);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t h = x.size(-1);
  const NormForwardOutputs o = empty_norm_forward_outputs(args);
  const kernels::cuda::NormForwardRun run{
      x.const_data_ptr(),
      residual.has_value() ? residual->const_data_ptr() : nullptr,
      weight.const_data_ptr(),
      bias.has_value() ? bias->const_data_ptr() : nullptr,
      o.out.data_ptr(),
      residual.has_value() ? o.summed.data_ptr() : nullptr,
      rms ? nullptr : o.mean.data_ptr<float>(),
      o.rstd.data_ptr<float>(),
      element_type(x.scalar_type()),
      x.numel() / h,
      h,
      static_cast<float>(eps),
      rms};
  check_launch(kernels::cuda::launch_norm_forward(run, stream_of(x)), kOp);
  return {o.out, o.summed, o.mean, o.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_norm_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool rms, bool has_bias) {
  constexpr const char* kOp = "zero_ext::fused_norm_backward";
  const NormBackwardArgs args{grad_out, grad_summed, input, weight, mean, rstd, rms};
  check_norm_backward_args(args);
  check_not_double(input, kOp);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t h = input.size(-1);
  const NormBackwardOutputs o = empty_norm_backward_outputs(args, has_bias);
  const kernels::cuda::NormBackwardRun run{
      grad_out.const_data_ptr(),
      grad_summed.has_value() ? grad_summed->const_data_ptr() : nullptr,
      input.const_data_ptr(),
      weight.const_data_ptr(),
      rms ? nullptr : mean.const_data_ptr<float>(),
      rstd.const_data_ptr<float>(),
      o.grad_input.data_ptr(),
      o.grad_weight.data_ptr<float>(),
      has_bias ? o.grad_bias.data_ptr<float>() : nullptr,
      element_type(input.scalar_type()),
      input.numel() / h,
      h,
      rms};
  check_launch(kernels::cuda::launch_norm_backward(run, stream_of(input)), kOp);
  return o.result(weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) {
  m.impl("fused_norm", &fused_norm_cuda);
  m.impl("fused_norm_backward", &fused_norm_backward_cuda);
}

}  // namespace zero_ext
