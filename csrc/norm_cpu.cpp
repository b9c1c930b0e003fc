// CPU kernels of zero_ext::fused_norm and zero_ext::fused_norm_backward: validate, then run rows
// (forward, input gradient) or column blocks (weight and bias gradients) across ATen's intra-op
// thread pool. Every output element is computed by one thread in a fixed order, so results do not
// depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  check_norm_forward_args({x, residual, weight, bias, eps, rms});
  const int64_t h = x.size(-1);
  const int64_t rows = x.numel() / h;
  const at::TensorOptions stat = x.options().dtype(norm_stat_dtype(x.scalar_type()));
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor summed = at::empty(residual.has_value() ? x.sizes() : at::IntArrayRef{0},
                                x.options());
  at::Tensor mean = at::empty({rms ? 0 : rows}, stat);
  at::Tensor rstd = at::empty({rows}, stat);

  const kernels::cpu::NormForwardFn kernel =
      ZERO_EXT_CPU_KERNEL(kernels::cpu::norm_forward_rows);
  const kernels::cpu::NormForwardRows base{
      x.const_data_ptr(),
      residual.has_value() ? residual->const_data_ptr() : nullptr,
      weight.const_data_ptr(),
      bias.has_value() ? bias->const_data_ptr() : nullptr,
      out.data_ptr(),
      residual.has_value() ? summed.data_ptr() : nullptr,
      rms ? nullptr : mean.data_ptr(),
      rstd.data_ptr(),
      norm_type(x.scalar_type()),
      h,
      0,
      0,
      eps,
      rms};
  at::parallel_for(0, rows, rows_per_unit(h), [&](int64_t first, int64_t last) {
    kernels::cpu::NormForwardRows args = base;
    args.first_row = first;
    args.last_row = last;
    kernel(args);
  });
  return {out, summed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_norm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool rms, bool has_bias) {
  check_norm_backward_args({grad_out, grad_summed, input, weight, mean, rstd, rms});
  const int64_t h = input.size(-1);
  const int64_t rows = input.numel() / h;
  const kernels::cpu::NormType type = norm_type(input.scalar_type());
  const at::TensorOptions stat = input.options().dtype(norm_stat_dtype(input.scalar_type()));
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_weight = at::empty({h}, stat);
  at::Tensor grad_bias = at::empty({has_bias ? h : 0}, stat);

  const kernels::cpu::NormBackwardFn rows_kernel =
      ZERO_EXT_CPU_KERNEL(kernels::cpu::norm_backward_rows);
  const kernels::cpu::NormBackwardRows row_base{
      grad_out.const_data_ptr(),
      grad_summed.has_value() ? grad_summed->const_data_ptr() : nullptr,
      input.const_data_ptr(),
      weight.const_data_ptr(),
      rms ? nullptr : mean.const_data_ptr(),
      rstd.const_data_ptr(),
      grad_input.data_ptr(),
      type,
      h,
      0,
      0,
      rms};
  at::parallel_for(0, rows, rows_per_unit(h), [&](int64_t first, int64_t last) {
    kernels::cpu::NormBackwardRows args = row_base;
    args.first_row = first;
    args.last_row = last;
    rows_kernel(args);
  });

  const kernels::cpu::NormParamGradFn columns_kernel =
      ZERO_EXT_CPU_KERNEL(kernels::cpu::norm_param_grad_columns);
  const kernels::cpu::NormParamGradColumns column_base{
      grad_out.const_data_ptr(), input.const_data_ptr(),
      rms ? nullptr : mean.const_data_ptr(), rstd.const_data_ptr(),
      grad_weight.data_ptr(), has_bias ? grad_bias.data_ptr() : nullptr,
      type, rows, h, 0, 0, rms};
  const int64_t units = (h + kColumnsPerUnit - 1) / kColumnsPerUnit;
  at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
    kernels::cpu::NormParamGradColumns args = column_base;
    args.first_col = first * kColumnsPerUnit;
    args.last_col = std::min(last * kColumnsPerUnit, h);
    columns_kernel(args);
  });
  // Summed in fp32, rounded once to the parameters' dtype.
  return {grad_input, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) {
  m.impl("fused_norm", &fused_norm_cpu);
  m.impl("fused_norm_backward", &fused_norm_backward_cpu);
}

}  // namespace zero_ext
