// The arguments of zero_ext::adamw_step_ as every backend receives them, and their validation.
//
// Both the CPU glue (csrc/adamw_cpu.cpp) and the CUDA glue (csrc/adamw_cuda.cu) validate through
// check_adamw_step_args, so the same bad input raises the same message on every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

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

}  // namespace zero_ext
