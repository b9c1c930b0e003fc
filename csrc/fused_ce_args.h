// The arguments of zero_ext::fused_linear_cross_entropy_fwd / _bwd / _fwd_grad as every backend
// receives them, and their validation, so the same bad input raises the same message on every
// backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace zero_ext {

struct FusedCeArgs {
  const at::Tensor& hidden;               // [N, H] fp32 / bf16 / fp64, contiguous
  const at::Tensor& weight;               // [V, H], hidden's dtype, contiguous
  const at::Tensor& target;               // [N] int64, each in [0, V) or ignore_index
  const std::optional<at::Tensor>& bias;  // [V], hidden's dtype, or none
  int64_t ignore_index;
  double label_smoothing;  // in [0, 1]
  double z_loss;           // >= 0
};

// What _fwd_grad computes beyond FusedCeArgs: the reduction and which gradients.
struct CeGradOptions {
  bool mean;                // the loss (and its gradients) divided by the tokens not ignored
  bool hidden_grad;         // compute grad_hidden (else it comes back [0])
  bool weight_grad;         // compute grad_weight (else it comes back [0])
  int64_t workspace_bytes;  // the logits (and their copies) held at once
};

// The dtype of the per-token loss, lse and grad_loss, and of the softmax math: fp32 for fp32 and
// bf16 inputs, fp64 for fp64 ones (so gradcheck sees fp64 throughout).
at::ScalarType fused_ce_accumulation_dtype(at::ScalarType input);

// Raises c10::Error (ValueError / TypeError in Python) naming the op, the argument and what was
// expected versus what came. Reads target's values (a reduction over N) to reject classes
// outside [0, V) that are not ignore_index.
void check_fused_ce_args(const char* op, const FusedCeArgs& args);

// The backward's extra inputs: grad_loss and lse, [N] of the accumulation dtype on hidden's
// device.
void check_fused_ce_backward_args(const char* op, const FusedCeArgs& args,
                                  const at::Tensor& grad_loss, const at::Tensor& lse);

// check_fused_ce_args, and a positive workspace.
void check_fused_ce_grad_args(const char* op, const FusedCeArgs& args,
                              const CeGradOptions& options);

}  // namespace zero_ext
