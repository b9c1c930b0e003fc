// Raw-pointer SwiGLU and bias + GeLU over a range of rows, forward and backward, compiled once
// per instruction set. Each backward recomputes the activation from the forward's inputs, so
// autograd saves those inputs only (no activation-sized intermediate).
//
// csrc/activation_cpu.cpp validates the arguments of zero_ext::swiglu, bias_gelu and their
// backwards, cuts the rows into ranges and runs them on ATen's thread pool. Arithmetic is fp32 for
// fp32 / bf16 / fp16 elements (fp64 for fp64); only stored elements are rounded.
#pragma once

#include <cstdint>

#include "kernels/cpu/isa_decl.h"
#include "kernels/cpu/norm.h"  // NormType: the element types of both families

namespace zero_ext::kernels::cpu {

enum class ActivationKind : int32_t {
  kSwiGLU = 0,    // out = silu(a) * b, with a the gate and b the up projection ([rows, h] each)
  kGeluTanh = 1,  // out = gelu_tanh(v), v = round(a + b[j]) (b: the [h] bias, or nullptr)
  kGeluErf = 2,   // out = gelu(v) with erf, v as above
};

// Rows [first_row, last_row) of [rows, h] row-major tensors.
//   forward:  out = the activation
//   backward: with dy = grad_out, SwiGLU: grad_a = dy * b * sig(a) * (1 + a * (1 - sig(a))),
//             grad_b = dy * silu(a); GeLU: grad_a = dy * gelu'(v) (grad_b unused: the bias
//             gradient is grad_a summed over rows, which the glue takes).
struct ActivationRows {
  ActivationKind kind;
  const void* a;
  const void* b;
  const void* grad_out;  // backward only
  void* out;             // forward: out; backward: grad_a
  void* grad_b;          // backward SwiGLU only
  NormType type;
  int64_t h;
  int64_t first_row;
  int64_t last_row;
};

using ActivationFn = void (*)(const ActivationRows& args);
ZERO_EXT_DECLARE_CPU_KERNEL(activation_forward_rows, ActivationFn);
ZERO_EXT_DECLARE_CPU_KERNEL(activation_backward_rows, ActivationFn);

}  // namespace zero_ext::kernels::cpu
