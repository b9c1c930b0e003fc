// The arguments of zero_ext::adamw_step_ as every backend receives them, and their validation.
//
// Both the CPU glue (csrc/adamw_cpu.cpp) and the CUDA glue (csrc/adamw_cuda.cu) register their
// kernel through AdamWOps, which validates for both (check_adamw_step_args), so the same bad input
// raises the same message on every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <optional>

#include "kernels/adamw_math.h"

namespace zero_ext {

struct AdamWStepArgs {
  at::TensorList params;        // fp32, updated in place
  at::TensorList grads;         // one of fp32 / bf16 / fp16 for the whole call
  at::TensorList exp_avgs;      // fp32, updated in place
  at::TensorList exp_avg_sqs;   // fp32, updated in place
  at::TensorList state_steps;   // one-element fp32 CPU tensors, incremented in place
  at::TensorList params_16bit;  // empty, or one bf16 / fp16 tensor per param (one dtype)
  const std::optional<at::Tensor>& inv_scale;  // one-element fp32 on the params' device
  const std::optional<at::Tensor>& found_inf;  // one-element fp32 on the params' device
  kernels::AdamWHyperparameters hyper;
};

// Raises c10::Error (ValueError / TypeError / RuntimeError in Python) naming the op, the argument
// and what was expected versus what came. Accepts an empty call (no params).
void check_adamw_step_args(const AdamWStepArgs& args);

// The kernels' element type for a tensor dtype already validated by check_adamw_step_args.
kernels::ElementType element_type(at::ScalarType dtype);

// One backend's zero_ext::adamw_step_ in its schema's signature: validates the call and hands it
// to the backend's kernel, step(args), unless there is nothing to do. impl() registers it under
// the backend's dispatch key (TORCH_LIBRARY_IMPL).
template <void (*Step)(const AdamWStepArgs&)>
struct AdamWOps {
  static void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
    // A nonzero found_inf skips the whole call, step counts included. The step counts live on
    // the host, so the host needs found_inf's value before it may increment them: on CUDA this
    // one sync is the price, paid only on the loss-scaled path, whose caller reads found_inf on
    // the host anyway to decide skip / rescale. A device-only skip could not undo the host
    // increments. inv_scale needs no sync: the CUDA kernel reads it on the device.
    if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
    Step(args);
  }

  static void impl(torch::Library& m) { m.impl("adamw_step_", &adamw_step); }
};

}  // namespace zero_ext
