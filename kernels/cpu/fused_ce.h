// Raw-pointer row math of the fused linear cross-entropy over one block of logits (the layouts
// and formulas of kernels/fused_ce_rows.h), compiled once per instruction set.
//
// csrc/fused_ce_cpu.cpp runs these over ranges [first, last) of each block's rows on ATen's
// thread pool. Nothing here knows about tensors or the dispatcher.
#pragma once

#include <cstdint>

#include "kernels/cpu/isa_decl.h"
#include "kernels/fused_ce_rows.h"

namespace zero_ext::kernels::cpu {

// Per accumulation type (f32 / f64) and instruction set (kernels/cpu/isa_decl.h).
template <typename T>
using CeForwardBlockFn = void (*)(const CeForwardRows<T>& block, int64_t first, int64_t last);
ZERO_EXT_DECLARE_CPU_KERNEL(ce_forward_block_f32, CeForwardBlockFn<float>);
ZERO_EXT_DECLARE_CPU_KERNEL(ce_forward_block_f64, CeForwardBlockFn<double>);

template <typename T>
using CeBackwardBlockFn = void (*)(const CeBackwardRows<T>& block, int64_t first, int64_t last);
ZERO_EXT_DECLARE_CPU_KERNEL(ce_backward_block_f32, CeBackwardBlockFn<float>);
ZERO_EXT_DECLARE_CPU_KERNEL(ce_backward_block_f64, CeBackwardBlockFn<double>);

}  // namespace zero_ext::kernels::cpu
