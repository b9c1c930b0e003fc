// The device-independent driver of zero_ext::fused_linear_cross_entropy_fwd / _bwd / _fwd_grad:
// chunks of tokens against blocks of the vocabulary, each block's logits from one ATen matmul
// into a reused buffer, the per-token online log-sum-exp state kept as [chunk] tensors, and the
// gradient matmuls. Each backend (csrc/fused_ce_cpu.cpp, csrc/fused_ce_cuda.cu) supplies only the
// two row kernels, so every backend blocks, rounds and reduces the same way.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "csrc/fused_ce_args.h"
#include "kernels/fused_ce_rows.h"

namespace zero_ext {

// The running log-sum-exp of a chunk's tokens, each [rows] in the accumulation dtype.
struct CeRowState {
  at::Tensor max;           // running max of the logits seen (-inf before the first block)
  at::Tensor sumexp;        // sum of exp(logit - max)
  at::Tensor logit_sum;     // sum of the logits
  at::Tensor target_logit;  // the target's logit, once its block was seen
};

struct CeRowKernels {
  // Folds logits [rows, cols] (accumulation dtype, columns col0 ...) into state; rows whose
  // target (int64 [rows]) is ignore_index are skipped.
  void (*forward)(const at::Tensor& logits, int64_t col0, const at::Tensor& target,
                  int64_t ignore_index, const CeRowState& state);
  // Overwrites logits [rows, cols] with d loss / d logits from lse and grad ([rows] each):
  // grad * (softmax * (1 + 2 z_loss lse) - smoothing / V - (1 - smoothing) onehot); zero rows
  // for ignored tokens.
  void (*backward)(const at::Tensor& logits, int64_t col0, const at::Tensor& target,
                   int64_t ignore_index, const at::Tensor& lse, const at::Tensor& grad,
                   double label_smoothing, double z_loss, int64_t vocab);
};

// The row kernels' view (kernels/fused_ce_rows.h) of CeRowKernels::forward's arguments, for
// accumulation type T.
template <typename T>
kernels::CeForwardRows<T> forward_rows_of(const at::Tensor& logits, int64_t col0,
                                          const at::Tensor& target, int64_t ignore_index,
                                          const CeRowState& s) {
  return {logits.const_data_ptr<T>(),
          logits.size(0),
          logits.size(1),
          col0,
          target.const_data_ptr<int64_t>(),
          ignore_index,
          s.max.data_ptr<T>(),
          s.sumexp.data_ptr<T>(),
          s.logit_sum.data_ptr<T>(),
          s.target_logit.data_ptr<T>()};
}

// The same of CeRowKernels::backward's.
template <typename T>
kernels::CeBackwardRows<T> backward_rows_of(const at::Tensor& logits, int64_t col0,
                                            const at::Tensor& target, int64_t ignore_index,
                                            const at::Tensor& lse, const at::Tensor& grad,
                                            double label_smoothing, double z_loss,
                                            int64_t vocab) {
  const auto eps = static_cast<T>(label_smoothing);
  return {logits.data_ptr<T>(),
          logits.size(0),
          logits.size(1),
          col0,
          target.const_data_ptr<int64_t>(),
          ignore_index,
          lse.const_data_ptr<T>(),
          grad.const_data_ptr<T>(),
          eps / static_cast<T>(vocab),
          T(1) - eps,
          static_cast<T>(2 * z_loss)};
}

// (loss, lse) of validated arguments; see the schema in csrc/ops.cpp.
std::tuple<at::Tensor, at::Tensor> fused_ce_forward(const FusedCeArgs& args,
                                                    const CeRowKernels& kernels);

// (grad_hidden, grad_weight, grad_bias) of validated arguments.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_ce_backward(const FusedCeArgs& args,
                                                                 const at::Tensor& grad_loss,
                                                                 const at::Tensor& lse,
                                                                 const CeRowKernels& kernels);

// (loss, grad_hidden, grad_weight, grad_bias) of validated arguments, in one pass: loss is the
// sum (or mean) of the per-token losses, 0-dim in the accumulation dtype, and the gradients are
// those of that loss, in the inputs' dtypes. A chunk of tokens whose whole logit rows fit the
// workspace costs one logits matmul (then softmax, d logits, grad_hidden = d @ W and
// grad_weight += d^T @ h); otherwise the chunk sweeps the vocabulary twice (log-sum-exp, then
// recomputed logits and the gradients).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_ce_forward_with_grads(
    const FusedCeArgs& args, const CeGradOptions& options, const CeRowKernels& kernels);

inline constexpr const char* kFusedCeForwardOp = "zero_ext::fused_linear_cross_entropy_fwd";
inline constexpr const char* kFusedCeBackwardOp = "zero_ext::fused_linear_cross_entropy_bwd";
inline constexpr const char* kFusedCeGradOp = "zero_ext::fused_linear_cross_entropy_fwd_grad";

// One backend's three ops over its row kernels: each validates its arguments, holds a Guard (the
// backend's device guard, built from hidden's device) and runs the driver.
template <const CeRowKernels& kKernels, typename Guard>
struct FusedCeOps {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& hidden,
                                                    const at::Tensor& weight,
                                                    const at::Tensor& target,
                                                    const std::optional<at::Tensor>& bias,
                                                    int64_t ignore_index, double label_smoothing,
                                                    double z_loss) {
    const FusedCeArgs args{hidden, weight, target, bias, ignore_index, label_smoothing, z_loss};
    check_fused_ce_args(kFusedCeForwardOp, args);
    const Guard guard(hidden.device());
    return fused_ce_forward(args, kKernels);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
      const at::Tensor& target, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
      int64_t ignore_index, double label_smoothing, double z_loss) {
    const FusedCeArgs args{hidden, weight, target, bias, ignore_index, label_smoothing, z_loss};
    check_fused_ce_backward_args(kFusedCeBackwardOp, args, grad_loss, lse);
    const Guard guard(hidden.device());
    return fused_ce_backward(args, grad_loss, lse, kKernels);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grads(
      const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
      const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing,
      double z_loss, bool mean, bool hidden_grad, bool weight_grad, int64_t workspace_bytes) {
    const FusedCeArgs args{hidden, weight, target, bias, ignore_index, label_smoothing, z_loss};
    const CeGradOptions options{mean, hidden_grad, weight_grad, workspace_bytes};
    check_fused_ce_grad_args(kFusedCeGradOp, args, options);
    const Guard guard(hidden.device());
    return fused_ce_forward_with_grads(args, options, kKernels);
  }

  // Called inside the backend's TORCH_LIBRARY_IMPL block.
  static void register_ops(torch::Library& m) {
    m.impl("fused_linear_cross_entropy_fwd", &forward);
    m.impl("fused_linear_cross_entropy_bwd", &backward);
    m.impl("fused_linear_cross_entropy_fwd_grad", &forward_with_grads);
  }
};

}  // namespace zero_ext
