// Raw-pointer row math of the fused linear cross-entropy over one [rows, cols] block of fp32
// logits (tokens x a block of the vocabulary), compiled once per instruction set.
//
// csrc/fused_ce_cpu.cpp computes each block's logits with ATen matmuls, runs these kernels over
// ranges of its rows on ATen's thread pool, and never holds more than one block: the forward
// folds each block into a per-token online log-sum-exp, the backward turns a recomputed block
// into its logit gradient in place. Nothing here knows about tensors or the dispatcher.
#pragma once

#include <cstdint>

namespace zero_ext::kernels::cpu {

// T is the accumulation type: float for fp32 and bf16 inputs, double for fp64 ones (gradcheck).
//
// Rows [first, last) of a block whose column 0 is vocabulary entry col0, row r holding token r's
// logits at logits + r * cols. Per row, folded into the running state: max, sumexp (sum of
// exp(x - max)), logit_sum (sum of the logits) and target_logit (the logit of target[r] when it
// falls in this block). Tokens whose target is ignore_index are skipped entirely.
template <typename T>
struct CeForwardBlock {
  const T* logits;
  int64_t cols;
  int64_t col0;
  const int64_t* target;  // the block's tokens' targets
  int64_t ignore_index;
  T* max;
  T* sumexp;
  T* logit_sum;
  T* target_logit;
  int64_t first;
  int64_t last;
};

// Rows [first, last) of a block (same layout), overwritten with d loss / d logits:
// grad[r] * (softmax * (1 + 2 * z_loss * lse[r]) - smoothing / V - (1 - smoothing) * onehot),
// softmax = exp(x - lse[r]); rows of ignored tokens become zeros.
template <typename T>
struct CeBackwardBlock {
  T* logits;
  int64_t cols;
  int64_t col0;
  const int64_t* target;
  int64_t ignore_index;
  const T* lse;         // per token
  const T* grad;        // d loss / d per-token loss
  T smooth_per_class;   // label_smoothing / V
  T target_weight;      // 1 - label_smoothing
  T two_z_loss;         // 2 * z_loss
  int64_t first;
  int64_t last;
};

template <typename T>
using CeForwardBlockFn = void (*)(const CeForwardBlock<T>& args);
template <typename T>
using CeBackwardBlockFn = void (*)(const CeBackwardBlock<T>& args);

// One definition per accumulation type and instruction set that setup.py compiled.
#define ZERO_EXT_DECLARE_CE_KERNELS(ISA)                              \
  void ce_forward_block_f32_##ISA(const CeForwardBlock<float>&);      \
  void ce_forward_block_f64_##ISA(const CeForwardBlock<double>&);     \
  void ce_backward_block_f32_##ISA(const CeBackwardBlock<float>&);    \
  void ce_backward_block_f64_##ISA(const CeBackwardBlock<double>&);
ZERO_EXT_DECLARE_CE_KERNELS(DEFAULT)
ZERO_EXT_DECLARE_CE_KERNELS(AVX2)
ZERO_EXT_DECLARE_CE_KERNELS(AVX512)
#undef ZERO_EXT_DECLARE_CE_KERNELS

}  // namespace zero_ext::kernels::cpu
