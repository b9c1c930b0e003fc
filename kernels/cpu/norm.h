// Raw-pointer RMSNorm / LayerNorm over a range of rows (forward, input gradient) or of columns
// (weight and bias gradients), each optionally fused with the residual add; compiled once per
// instruction set.
//
// csrc/norm_cpu.cpp validates the arguments of zero_ext::fused_norm and fused_norm_backward,
// cuts the rows (or columns) into ranges, runs them on ATen's thread pool and calls the variant
// that at::get_cpu_capability() selects. Statistics and all arithmetic are fp32 for fp32 / bf16 /
// fp16 elements (fp64 for fp64, which gradcheck needs); only stored elements are rounded.
#pragma once

#include <cstdint>

#include "kernels/cpu/isa_decl.h"

namespace zero_ext::kernels::cpu {

// The element type of every tensor of one call but the statistics (fp64 for kFloat64, fp32
// otherwise).
enum class NormType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// The tensors of one fused_norm call as raw pointers, which the CPU kernels here and the CUDA
// kernels (kernels/cuda/norm.cuh) read alike; csrc/norm_args.cpp fills them from the call.
struct NormForwardTensors {
  const void* x;
  const void* residual;  // nullptr: no residual add
  const void* weight;    // [h]
  const void* bias;      // [h] or nullptr (LayerNorm only)
  void* out;
  void* summed;  // written when residual is given
  void* mean;    // [rows] statistics (fp64 for fp64 elements, else fp32); LayerNorm only
  void* rstd;    // [rows]
};

// Rows [first_row, last_row) of a [rows, h] row-major input. With residual: summed = round(x +
// residual) is stored, and normalized; otherwise x is. For the normalized input v of a row:
//   LayerNorm: mean = sum(v) / h, rstd = 1 / sqrt(sum((v - mean)^2) / h + eps),
//              out = (v - mean) * rstd * weight + bias (bias may be nullptr)
//   RMSNorm:   rstd = 1 / sqrt(sum(v^2) / h + eps), out = v * rstd * weight (mean not written)
struct NormForwardRows : NormForwardTensors {
  NormType type;
  int64_t h;
  int64_t first_row;
  int64_t last_row;
  double eps;
  bool rms;
};

using NormForwardFn = void (*)(const NormForwardRows& args);
ZERO_EXT_DECLARE_CPU_KERNEL(norm_forward_rows, NormForwardFn);

// The tensors of one fused_norm_backward call, likewise.
struct NormBackwardTensors {
  const void* grad_out;
  const void* grad_summed;  // nullptr: none
  const void* input;        // the normalized input v (summed, or x without residual)
  const void* weight;
  const void* mean;  // LayerNorm only
  const void* rstd;
  void* grad_input;
  void* grad_weight;  // [h], in the statistics' type
  void* grad_bias;    // [h] or nullptr: no bias
};

// Rows [first_row, last_row) of the input gradient, with xhat = (v - mean) * rstd (mean = 0 for
// RMSNorm) and g = grad_out * weight:
//   LayerNorm: dv = rstd * (g - sum(g) / h - xhat * sum(g * xhat) / h)
//   RMSNorm:   dv = rstd * (g - xhat * sum(g * xhat) / h)
// plus grad_summed (the gradient of the residual stream output) when given.
// (grad_weight and grad_bias are not read.)
struct NormBackwardRows : NormBackwardTensors {
  NormType type;
  int64_t h;
  int64_t first_row;
  int64_t last_row;
  bool rms;
};

using NormBackwardFn = void (*)(const NormBackwardRows& args);
ZERO_EXT_DECLARE_CPU_KERNEL(norm_backward_rows, NormBackwardFn);

// Columns [first_col, last_col) of the parameter gradients, summed over all rows in row order
// (so the result does not depend on the thread count): grad_weight[j] = sum(grad_out * xhat),
// grad_bias[j] = sum(grad_out), in the statistics' type (grad_summed and grad_input are not read).
struct NormParamGradColumns : NormBackwardTensors {
  NormType type;
  int64_t rows;
  int64_t h;
  int64_t first_col;
  int64_t last_col;
  bool rms;
};

using NormParamGradFn = void (*)(const NormParamGradColumns& args);
ZERO_EXT_DECLARE_CPU_KERNEL(norm_param_grad_columns, NormParamGradFn);

}  // namespace zero_ext::kernels::cpu
