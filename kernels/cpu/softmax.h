// Raw-pointer scaled masked softmax + dropout over a range of rows, forward and backward,
// compiled once per instruction set. Formulas and arguments: kernels/softmax_math.h.
//
// csrc/softmax_cpu.cpp validates the arguments of zero_ext::scaled_masked_softmax and its
// backward, cuts the rows into ranges (first_row, last_row) and runs them on ATen's thread pool.
#pragma once

#include "kernels/softmax_math.h"

namespace zero_ext::kernels::cpu {

using SoftmaxFn = void (*)(const SoftmaxRun& run);

void softmax_forward_rows_DEFAULT(const SoftmaxRun&);
void softmax_forward_rows_AVX2(const SoftmaxRun&);
void softmax_forward_rows_AVX512(const SoftmaxRun&);
void softmax_backward_rows_DEFAULT(const SoftmaxRun&);
void softmax_backward_rows_AVX2(const SoftmaxRun&);
void softmax_backward_rows_AVX512(const SoftmaxRun&);

}  // namespace zero_ext::kernels::cpu
