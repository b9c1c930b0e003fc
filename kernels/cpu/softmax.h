// Raw-pointer scaled masked softmax + dropout over a range of rows, forward and backward,
// compiled once per instruction set. Formulas and arguments: kernels/softmax_math.h.
//
// csrc/softmax_cpu.cpp validates the arguments of zero_ext::scaled_masked_softmax and its
// backward, cuts the rows into ranges (first_row, last_row) and runs them on ATen's thread pool.
#pragma once

#include "kernels/cpu/isa_decl.h"
#include "kernels/softmax_math.h"

namespace zero_ext::kernels::cpu {

using SoftmaxFn = void (*)(const SoftmaxRun& run);
ZERO_EXT_DECLARE_CPU_KERNEL(softmax_forward_rows, SoftmaxFn);
ZERO_EXT_DECLARE_CPU_KERNEL(softmax_backward_rows, SoftmaxFn);

}  // namespace zero_ext::kernels::cpu
