// The arguments of zero_ext::scaled_masked_softmax, its backward and zero_ext::dropout_keep_mask
// as every backend receives them: validation, and their translation into the raw-pointer
// kernels::SoftmaxRun (kernels/softmax_math.h) that the CPU and CUDA kernels both take.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "kernels/softmax_math.h"

namespace zero_ext {

// The forward's run over x ([..., q, k] contiguous fp32 / bf16 / fp16 / fp64) with its mask
// (bool or x's dtype, broadcastable to x), writing out and, with dropout, probs. `mask_view`
// receives the mask as a [batch, heads, q, k] view (a copy where no view exists) that the run's
// pointer refers to: the caller keeps it alive until the kernels are done. Raises c10::Error
// (ValueError / TypeError in Python) naming the op, the argument, what was expected and the fix.
kernels::SoftmaxRun softmax_forward_run(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                        double scale, bool causal, double dropout_p,
                                        const at::Tensor& seed, at::Tensor& mask_view);

// The outputs of the forward: out and probs (x's shape with dropout, else [0]).
std::tuple<at::Tensor, at::Tensor> softmax_forward_outputs(const at::Tensor& x, double dropout_p);

// Attaches the output pointers to a forward run.
void set_softmax_outputs(kernels::SoftmaxRun& run, const at::Tensor& out, const at::Tensor& probs);

// The backward's run: grad_x = scale * probs * (G - sum(G probs)) with G the gradient through the
// dropout regenerated from seed; writes into grad_x (probs' shape and dtype).
kernels::SoftmaxRun softmax_backward_run(const at::Tensor& grad_out, const at::Tensor& probs,
                                         double scale, double dropout_p, const at::Tensor& seed,
                                         const at::Tensor& grad_x);

// Validates zero_ext::dropout_keep_mask's arguments; returns the Philox seed.
uint64_t check_keep_mask_args(const at::Tensor& x, double dropout_p, const at::Tensor& seed);

}  // namespace zero_ext
