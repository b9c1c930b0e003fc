// CPU kernels of zero_ext::swiglu, bias_gelu and their backwards: validate, then run rows across
// ATen's intra-op thread pool. The backwards recompute the activation from the saved inputs.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "csrc/cpu_isa.h"
#include "csrc/norm_args.h"
#include "kernels/cpu/activation.h"

namespace zero_ext {
namespace {

using kernels::cpu::ActivationKind;
using kernels::cpu::ActivationRows;

// Elements per unit of row work: enough to amortise scheduling on short rows.
constexpr int64_t kSpanElements = 1 << 14;

void run_rows(ActivationRows args, const at::Tensor& a, bool backward) {
  const int64_t h = a.dim() == 0 ? 1 : a.size(-1);
  const int64_t rows = h == 0 ? 0 : a.numel() / h;
  args.h = h;
  const kernels::cpu::ActivationFn kernel =
      backward ? ZERO_EXT_CPU_KERNEL(kernels::cpu::activation_backward_rows)
               : ZERO_EXT_CPU_KERNEL(kernels::cpu::activation_forward_rows);
  at::parallel_for(0, rows, std::max<int64_t>(1, kSpanElements / std::max<int64_t>(h, 1)),
                   [&](int64_t first, int64_t last) {
                     ActivationRows unit = args;
                     unit.first_row = first;
                     unit.last_row = last;
                     kernel(unit);
                   });
}

ActivationKind gelu_kind(c10::string_view approximate) {
  return approximate == "tanh" ? ActivationKind::kGeluTanh : ActivationKind::kGeluErf;
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_activation_args({"zero_ext::swiglu", gate, up, std::nullopt, false, "none"});
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  run_rows({ActivationKind::kSwiGLU, gate.const_data_ptr(), up.const_data_ptr(), nullptr,
            out.data_ptr(), nullptr, norm_type(gate.scalar_type()), 0, 0, 0},
           gate, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_out,
                                                       const at::Tensor& gate,
                                                       const at::Tensor& up) {
  check_activation_args({"zero_ext::swiglu_backward", gate, up, grad_out, false, "none"});
  at::Tensor grad_gate = at::empty(gate.sizes(), gate.options());
  at::Tensor grad_up = at::empty(gate.sizes(), gate.options());
  run_rows({ActivationKind::kSwiGLU, gate.const_data_ptr(), up.const_data_ptr(),
            grad_out.const_data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr(),
            norm_type(gate.scalar_type()), 0, 0, 0},
           gate, true);
  return {grad_gate, grad_up};
}

at::Tensor bias_gelu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                         c10::string_view approximate) {
  check_activation_args({"zero_ext::bias_gelu", x, bias, std::nullopt, true, approximate});
  at::Tensor out = at::empty(x.sizes(), x.options());
  run_rows({gelu_kind(approximate), x.const_data_ptr(),
            bias.has_value() ? bias->const_data_ptr() : nullptr, nullptr, out.data_ptr(), nullptr,
            norm_type(x.scalar_type()), 0, 0, 0},
           x, false);
  return out;
}

at::Tensor bias_gelu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                  const std::optional<at::Tensor>& bias,
                                  c10::string_view approximate) {
  check_activation_args({"zero_ext::bias_gelu_backward", x, bias, grad_out, true, approximate});
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  run_rows({gelu_kind(approximate), x.const_data_ptr(),
            bias.has_value() ? bias->const_data_ptr() : nullptr, grad_out.const_data_ptr(),
            grad_x.data_ptr(), nullptr, norm_type(x.scalar_type()), 0, 0, 0},
           x, true);
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
}

}  // namespace zero_ext
