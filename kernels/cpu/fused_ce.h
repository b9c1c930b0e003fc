// Raw-pointer row math of the fused linear cross-entropy over one block of logits (the layouts
// and formulas of kernels/fused_ce_rows.h), compiled once per instruction set.
//
// csrc/fused_ce_cpu.cpp runs these over ranges [first, last) of each block's rows on ATen's
// thread pool. Nothing here knows about tensors or the dispatcher.
#pragma once

#include <cstdint>

#include "kernels/fused_ce_rows.h"

namespace zero_ext::kernels::cpu {

template <typename T>
using CeForwardBlockFn = void (*)(const CeForwardRows<T>& block, int64_t first, int64_t last);
template <typename T>
using CeBackwardBlockFn = void (*)(const CeBackwardRows<T>& block, int64_t first, int64_t last);

// One definition per accumulation type and instruction set that setup.py compiled.
#define ZERO_EXT_DECLARE_CE_KERNELS(ISA)                                                    \
  void ce_forward_block_f32_##ISA(const CeForwardRows<float>&, int64_t, int64_t);           \
  void ce_forward_block_f64_##ISA(const CeForwardRows<double>&, int64_t, int64_t);          \
  void ce_backward_block_f32_##ISA(const CeBackwardRows<float>&, int64_t, int64_t);         \
  void ce_backward_block_f64_##ISA(const CeBackwardRows<double>&, int64_t, int64_t);
ZERO_EXT_DECLARE_CE_KERNELS(DEFAULT)
ZERO_EXT_DECLARE_CE_KERNELS(AVX2)
ZERO_EXT_DECLARE_CE_KERNELS(AVX512)
#undef ZERO_EXT_DECLARE_CE_KERNELS

}  // namespace zero_ext::kernels::cpu
