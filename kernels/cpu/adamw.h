// Raw-pointer AdamW over one contiguous span, compiled once per instruction set.
//
// csrc/adamw_cpu.cpp splits every tensor of an op call into spans, runs them on ATen's thread
// pool and calls the variant that at::get_cpu_capability() selects. Nothing here knows about
// tensors or the dispatcher.
#pragma once

#include <cstdint>

#include "kernels/adamw_math.h"

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

// One definition per instruction set that setup.py compiled (CPU_CAPABILITY names them).
void adamw_span_DEFAULT(const AdamWSpan&, const AdamWCoefficients<float>&, ElementType, ElementType);
void adamw_span_AVX2(const AdamWSpan&, const AdamWCoefficients<float>&, ElementType, ElementType);
void adamw_span_AVX512(const AdamWSpan&, const AdamWCoefficients<float>&, ElementType, ElementType);

}  // namespace zero_ext::kernels::cpu
