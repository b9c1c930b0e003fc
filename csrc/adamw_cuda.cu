// CUDA kernel of zero_ext::adamw_step_: validates with the shared checks, derives per-tensor
// coefficients on the host and hands every tensor, unsplit, to the multi-tensor launcher in
// kernels/cuda/adamw.cu on the current stream. setup.py compiles this file in a CUDA build only.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "csrc/adamw_args.h"
#include "kernels/adamw_math.h"
#include "kernels/cuda/adamw.cuh"

namespace zero_ext {
namespace {

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList state_steps,
                     at::TensorList params_16bit, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool decoupled_weight_decay,
                     bool bias_correction, bool maximize,
                     const std::optional<at::Tensor>& inv_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const AdamWStepArgs args{params, grads, exp_avgs, exp_avg_sqs, state_steps, params_16bit,
                           inv_scale, found_inf,
                           {lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                            bias_correction, maximize}};
  check_adamw_step_args(args);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());

  // The step counts live on the host and a nonzero found_inf must leave them untouched, so the
  // host needs found_inf's value before it may increment them: this one sync is the price, and it
  // is paid only on the loss-scaled path, whose caller reads found_inf on the host anyway to
  // decide skip / rescale. A device-only skip could not undo the host increments. inv_scale
  // needs no sync: it stays a device pointer and scales the gradients on the device.
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;

  const int64_t n = static_cast<int64_t>(params.size());
  const bool has_param_16bit = !params_16bit.empty();
  std::vector<kernels::cuda::AdamWCudaTensor> tensors(n);
  kernels::AdamWCoefficients<float> common{};
  for (int64_t i = 0; i < n; ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.0f;
    // inv_scale = 1 here; the kernel multiplies grad_factor by *inv_scale on the device.
    const kernels::AdamWCoefficients<float> c = kernels::adamw_coefficients(args.hyper, *step, 1.0);
    if (i == 0) common = c;  // only step_size and bias_correction2_sqrt vary with the step
    tensors[i] = {params[i].data_ptr<float>(), grads[i].const_data_ptr(),
                  exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(),
                  has_param_16bit ? params_16bit[i].data_ptr() : nullptr, params[i].numel(),
                  c.step_size, c.bias_correction2_sqrt};
  }

  const kernels::ElementType grad_type = element_type(grads[0].scalar_type());
  const kernels::ElementType copy_type =
      has_param_16bit ? element_type(params_16bit[0].scalar_type())
                      : kernels::ElementType::kBFloat16;
  // found_inf (zero here) is passed on too: the kernel's own check is one load per block.
  const cudaError_t err = kernels::cuda::launch_adamw_step(
      tensors.data(), n, common, grad_type, has_param_16bit, copy_type,
      inv_scale.has_value() ? inv_scale->const_data_ptr<float>() : nullptr,
      found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "zero_ext::adamw_step_: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) { m.impl("adamw_step_", &adamw_step_cuda); }

}  // namespace zero_ext
