// CUDA kernel of zero_ext::adamw_step_, on calls AdamWOps (csrc/adamw_args.h) validated: derives
// per-tensor coefficients on the host and hands every tensor, unsplit, to the multi-tensor
// launcher in kernels/cuda/adamw.cu on the current stream. setup.py compiles this file in a CUDA
// build only.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "csrc/adamw_args.h"
#include "csrc/cuda_checks.h"
#include "kernels/adamw_math.h"
#include "kernels/cuda/adamw.cuh"

namespace zero_ext {
namespace {

void adamw_step_cuda(const AdamWStepArgs& args) {
  const c10::cuda::CUDAGuard device_guard(args.params[0].device());
  const int64_t n = static_cast<int64_t>(args.params.size());
  const bool has_param_16bit = !args.params_16bit.empty();
  std::vector<kernels::cuda::AdamWCudaTensor> tensors(n);
  kernels::AdamWCoefficients<float> common{};
  // The step counts (host tensors) move on only once the kernels are launched: a failed launch
  // leaves them as they were.
  std::vector<float> next_steps(n);
  for (int64_t i = 0; i < n; ++i) {
    next_steps[i] = *args.state_steps[i].data_ptr<float>() + 1.0f;
    // inv_scale = 1 here; the kernel multiplies grad_factor by *inv_scale on the device.
    const kernels::AdamWCoefficients<float> c =
        kernels::adamw_coefficients(args.hyper, next_steps[i], 1.0);
    if (i == 0) common = c;  // only step_size and bias_correction2_sqrt vary with the step
    tensors[i] = {args.params[i].data_ptr<float>(), args.grads[i].const_data_ptr(),
                  args.exp_avgs[i].data_ptr<float>(), args.exp_avg_sqs[i].data_ptr<float>(),
                  has_param_16bit ? args.params_16bit[i].data_ptr() : nullptr,
                  args.params[i].numel(),
                  c.step_size, c.bias_correction2_sqrt};
  }

  const kernels::ElementType grad_type = element_type(args.grads[0].scalar_type());
  const kernels::ElementType copy_type =
      has_param_16bit ? element_type(args.params_16bit[0].scalar_type())
                      : kernels::ElementType::kBFloat16;
  // found_inf (zero here) is passed on too: the kernel's own check is one load per block.
  const cudaError_t err = kernels::cuda::launch_adamw_step(
      tensors.data(), n, common, grad_type, has_param_16bit, copy_type,
      args.inv_scale.has_value() ? args.inv_scale->const_data_ptr<float>() : nullptr,
      args.found_inf.has_value() ? args.found_inf->const_data_ptr<float>() : nullptr,
      stream_of(args.params[0]));
  check_launch(err, "zero_ext::adamw_step_");
  for (int64_t i = 0; i < n; ++i) *args.state_steps[i].data_ptr<float>() = next_steps[i];
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) { AdamWOps<adamw_step_cuda>::impl(m); }

}  // namespace zero_ext
