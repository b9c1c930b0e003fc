// Raw-pointer AdamW over one contiguous span, compiled once per instruction set.
//
// csrc/adamw_cpu.cpp splits every tensor of an op call into spans, runs them on ATen's thread
// pool and calls the variant that at::get_cpu_capability() selects. Nothing here knows about
// tensors or the dispatcher.
#pragma once

#include <cstdint>

#include "kernels/adamw_math.h"
#include "kernels/cpu/isa_decl.h"

namespace zero_ext::kernels::cpu {

// One contiguous slice of one parameter and its state. All pointers cover `numel` elements.
struct AdamWSpan {
  float* param;        // fp32 master weights, updated in place
  const void* grad;    // gradient, of the call's grad ElementType
  float* exp_avg;      // first moment, updated in place
  float* exp_avg_sq;   // second moment, updated in place
  void* param_16bit;   // optional 16-bit copy of the updated param (nullptr: none)
  int64_t numel;
};

using AdamWSpanFn = void (*)(const AdamWSpan& span, const AdamWCoefficients<float>& coefficients,
                             ElementType grad_type, ElementType param_16bit_type);
ZERO_EXT_DECLARE_CPU_KERNEL(adamw_span, AdamWSpanFn);

}  // namespace zero_ext::kernels::cpu
