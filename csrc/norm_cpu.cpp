// CPU kernels of zero_ext::fused_norm and zero_ext::fused_norm_backward: validate, then run rows
// (forward, input gradient) or column blocks (weight and bias gradients) across ATen's intra-op
// thread pool. Every output element is computed by one thread in a fixed order, so results do not
// depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "csrc/cpu_isa.h"
#include "csrc/norm_args.h"
#include "kernels/cpu/norm.h"

namespace zero_ext {
namespace {

// Elements per unit of row work: enough to amortise scheduling on short rows.
constexpr int64_t kSpanElements = 1 << 15;
// Columns per unit of parameter-gradient work: the block's fp32 accumulators stay in L1 while
// every row streams past them.
constexpr int64_t kColumnsPerUnit = 256;

int64_t rows_per_unit(int64_t h) { return std::max<int64_t>(1, kSpanElements / h); }

// Runs a row kernel over rows [0, rows) of width h across the thread pool, each unit of work on
// a copy of base with its own [first_row, last_row).
template <typename Rows>
void parallel_rows(void (*kernel)(const Rows&), const Rows& base, int64_t rows, int64_t h) {
  at::parallel_for(0, rows, rows_per_unit(h), [&](int64_t first, int64_t last) {
    Rows args = base;
    args.first_row = first;
    args.last_row = last;
    kernel(args);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  const NormForwardArgs args{x, residual, weight, bias, eps, rms};
  check_norm_forward_args(args);
  const int64_t h = x.size(-1);
  const NormForwardOutputs o = empty_norm_forward_outputs(args);
  const kernels::cpu::NormForwardRows base{
      x.const_data_ptr(),
      residual.has_value() ? residual->const_data_ptr() : nullptr,
      weight.const_data_ptr(),
      bias.has_value() ? bias->const_data_ptr() : nullptr,
      o.out.data_ptr(),
      residual.has_value() ? o.summed.data_ptr() : nullptr,
      rms ? nullptr : o.mean.data_ptr(),
      o.rstd.data_ptr(),
      norm_type(x.scalar_type()),
      h,
      0,
      0,
      eps,
      rms};
  parallel_rows(ZERO_EXT_CPU_KERNEL(kernels::cpu::norm_forward_rows), base, x.numel() / h, h);
  return {o.out, o.summed, o.mean, o.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_norm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool rms, bool has_bias) {
  const NormBackwardArgs args{grad_out, grad_summed, input, weight, mean, rstd, rms};
  check_norm_backward_args(args);
  const int64_t h = input.size(-1);
  const int64_t rows = input.numel() / h;
  const kernels::cpu::NormType type = norm_type(input.scalar_type());
  const NormBackwardOutputs o = empty_norm_backward_outputs(args, has_bias);
  const kernels::cpu::NormBackwardRows row_base{
      grad_out.const_data_ptr(),
      grad_summed.has_value() ? grad_summed->const_data_ptr() : nullptr,
      input.const_data_ptr(),
      weight.const_data_ptr(),
      rms ? nullptr : mean.const_data_ptr(),
      rstd.const_data_ptr(),
      o.grad_input.data_ptr(),
      type,
      h,
      0,
      0,
      rms};
  parallel_rows(ZERO_EXT_CPU_KERNEL(kernels::cpu::norm_backward_rows), row_base, rows, h);

  const kernels::cpu::NormParamGradFn columns_kernel =
      ZERO_EXT_CPU_KERNEL(kernels::cpu::norm_param_grad_columns);
  const kernels::cpu::NormParamGradColumns column_base{
      grad_out.const_data_ptr(), input.const_data_ptr(),
      rms ? nullptr : mean.const_data_ptr(), rstd.const_data_ptr(),
      o.grad_weight.data_ptr(), has_bias ? o.grad_bias.data_ptr() : nullptr,
      type, rows, h, 0, 0, rms};
  const int64_t units = (h + kColumnsPerUnit - 1) / kColumnsPerUnit;
  at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
    kernels::cpu::NormParamGradColumns args = column_base;
    args.first_col = first * kColumnsPerUnit;
    args.last_col = std::min(last * kColumnsPerUnit, h);
    columns_kernel(args);
  });
  return o.result(weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) {
  m.impl("fused_norm", &fused_norm_cpu);
  m.impl("fused_norm_backward", &fused_norm_backward_cpu);
}

}  // namespace zero_ext
