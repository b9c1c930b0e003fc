// A block of the fused linear cross-entropy's logits as the row kernels of every backend see it
// (kernels/cpu/fused_ce.h, kernels/cuda/fused_ce.cuh): tokens x a block of the vocabulary, and
// the per-token arrays each kernel reads and writes. csrc/fused_ce.h fills these from tensors.
#pragma once

#include <cstdint>

namespace zero_ext::kernels {

// T is the accumulation type: float for fp32 and bf16 inputs, double for fp64 ones (gradcheck).
//
// The forward folds each row r of logits [rows, cols] (row-major, column 0 = vocabulary entry
// col0) into the running state: max, sumexp (sum of exp(x - max)), logit_sum (sum of the logits)
// and target_logit (the logit of target[r] when it falls in this block). Tokens whose target is
// ignore_index are skipped entirely.
template <typename T>
struct CeForwardRows {
  const T* logits;
  int64_t rows;
  int64_t cols;
  int64_t col0;
  const int64_t* target;  // the block's tokens' targets
  int64_t ignore_index;
  T* max;
  T* sumexp;
  T* logit_sum;
  T* target_logit;
};

// The backward overwrites the same block with d loss / d logits:
// grad[r] * (softmax * (1 + 2 * z_loss * lse[r]) - smoothing / V - (1 - smoothing) * onehot),
// softmax = exp(x - lse[r]); rows of ignored tokens become zeros.
template <typename T>
struct CeBackwardRows {
  T* logits;
  int64_t rows;
  int64_t cols;
  int64_t col0;
  const int64_t* target;
  int64_t ignore_index;
  const T* lse;        // per token
  const T* grad;       // d loss / d per-token loss
  T smooth_per_class;  // label_smoothing / V
  T target_weight;     // 1 - label_smoothing
  T two_z_loss;        // 2 * z_loss
};

}  // namespace zero_ext::kernels
