// The arguments of zero_ext::fused_norm and zero_ext::fused_norm_backward as every backend
// receives them, and their validation.
//
// The CPU glue (csrc/norm_cpu.cpp) and the CUDA glue (csrc/norm_cuda.cu) register their kernels
// through NormOps, which validates and allocates the results for both, so a bad input raises the
// same message whatever the backend. Formulas: kernels/cpu/norm.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "kernels/cpu/norm.h"

namespace zero_ext {

struct NormForwardArgs {
  const at::Tensor& x;                        // [..., h] contiguous fp32 / bf16 / fp16 / fp64
  const std::optional<at::Tensor>& residual;  // x's shape and dtype, contiguous, or none
  const at::Tensor& weight;                   // [h], x's dtype
  const std::optional<at::Tensor>& bias;      // [h], x's dtype, or none; LayerNorm only
  double eps;                                 // > 0
  bool rms;
};

// Raises c10::Error (ValueError / TypeError in Python) naming the op, the argument and what was
// expected versus what came.
void check_norm_forward_args(const NormForwardArgs& args);

struct NormBackwardArgs {
  const at::Tensor& grad_out;                    // the input's shape and dtype
  const std::optional<at::Tensor>& grad_summed;  // the same, or none
  const at::Tensor& input;                       // the normalized input [..., h]
  const at::Tensor& weight;                      // [h]
  const at::Tensor& mean;                        // [rows] statistics (empty for RMSNorm)
  const at::Tensor& rstd;                        // [rows] statistics
  bool rms;
  bool has_bias;  // whether the bias gradient is wanted (LayerNorm with a bias)
};

void check_norm_backward_args(const NormBackwardArgs& args);

// zero_ext::swiglu / swiglu_backward (bias_gelu false) and bias_gelu / bias_gelu_backward
// (bias_gelu true). a: gate or x, [..., h] contiguous fp32 / bf16 / fp16 / fp64; b: up (a's
// shape, SwiGLU) or the bias ([h], or none); grad_out: a's shape (backward only); approximate:
// "none" or "tanh" (GeLU only). The same dtype for all.
struct ActivationArgs {
  const char* op;
  const at::Tensor& a;
  const std::optional<at::Tensor>& b;
  const std::optional<at::Tensor>& grad_out;
  bool bias_gelu;
  c10::string_view approximate;
};

void check_activation_args(const ActivationArgs& args);

// fused_norm's results for validated arguments, allocated and not yet written: out, summed
// ([0] without a residual), mean ([0] for RMSNorm) and rstd ([rows], norm_stat_dtype).
struct NormForwardOutputs {
  at::Tensor out;
  at::Tensor summed;
  at::Tensor mean;
  at::Tensor rstd;
};
NormForwardOutputs empty_norm_forward_outputs(const NormForwardArgs& args);

// fused_norm_backward's: grad_input (input's shape and dtype) and the parameter gradients' sums,
// grad_weight [h] and grad_bias ([h] with has_bias, else [0]), in norm_stat_dtype.
struct NormBackwardOutputs {
  at::Tensor grad_input;
  at::Tensor grad_weight;
  at::Tensor grad_bias;

  // The op's results: the parameter gradients, summed in fp32, rounded once to weight's dtype.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result(const at::Tensor& weight) const;
};
NormBackwardOutputs empty_norm_backward_outputs(const NormBackwardArgs& args);

// The raw pointers of a validated call and of its allocated results, as both backends' kernels
// take them (nullptr for what the call lacks: residual, bias, LayerNorm's mean).
kernels::cpu::NormForwardTensors norm_forward_tensors(const NormForwardArgs& args,
                                                      const NormForwardOutputs& outputs);
kernels::cpu::NormBackwardTensors norm_backward_tensors(const NormBackwardArgs& args,
                                                        const NormBackwardOutputs& outputs);

// The kernel element type of a validated tensor's dtype.
kernels::cpu::NormType norm_type(at::ScalarType dtype);

// The dtype of the mean and rstd statistics for inputs of `dtype`: fp64 for fp64, else fp32.
at::ScalarType norm_stat_dtype(at::ScalarType dtype);

// One backend's zero_ext::fused_norm and fused_norm_backward in their schemas' signatures: each
// validates the call and allocates its results, then hands the call and the raw pointers of its
// tensors to the backend's kernels, forward(args, tensors) and backward(args, tensors), which
// write the results. impl() registers the two under the backend's dispatch key
// (TORCH_LIBRARY_IMPL).
template <void (*Forward)(const NormForwardArgs&, const kernels::cpu::NormForwardTensors&),
          void (*Backward)(const NormBackwardArgs&, const kernels::cpu::NormBackwardTensors&)>
struct NormOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_norm(
      const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, double eps, bool rms) {
    const NormForwardArgs args{x, residual, weight, bias, eps, rms};
    check_norm_forward_args(args);
    const NormForwardOutputs o = empty_norm_forward_outputs(args);
    Forward(args, norm_forward_tensors(args, o));
    return {o.out, o.summed, o.mean, o.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_norm_backward(
      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_summed,
      const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
      const at::Tensor& rstd, bool rms, bool has_bias) {
    const NormBackwardArgs args{grad_out, grad_summed, input, weight, mean, rstd, rms, has_bias};
    check_norm_backward_args(args);
    const NormBackwardOutputs o = empty_norm_backward_outputs(args);
    Backward(args, norm_backward_tensors(args, o));
    return o.result(weight);
  }

  static void impl(torch::Library& m) {
    m.impl("fused_norm", &fused_norm);
    m.impl("fused_norm_backward", &fused_norm_backward);
  }
};

}  // namespace zero_ext
