// The device-independent driver of zero_ext::fused_linear_cross_entropy_fwd / _bwd: chunks of
// tokens against blocks of the vocabulary, each block's logits from one ATen matmul into a
// reused buffer, the per-token online log-sum-exp state kept as [chunk] tensors, and the gradient
// matmuls. Each backend (csrc/fused_ce_cpu.cpp, csrc/fused_ce_cuda.cu) supplies only the two row
// kernels, so every backend blocks, rounds and reduces the same way.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#include "csrc/fused_ce_args.h"

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

// (loss, lse) of validated arguments; see the schema in csrc/ops.cpp.
std::tuple<at::Tensor, at::Tensor> fused_ce_forward(const FusedCeArgs& args,
                                                    const CeRowKernels& kernels);

// (grad_hidden, grad_weight, grad_bias) of validated arguments.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_ce_backward(const FusedCeArgs& args,
                                                                 const at::Tensor& grad_loss,
                                                                 const at::Tensor& lse,
                                                                 const CeRowKernels& kernels);

}  // namespace zero_ext
