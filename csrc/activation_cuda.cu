// CUDA kernels of zero_ext::swiglu, bias_gelu and their backwards: validate with the shared checks
// (csrc/norm_args.h), then hand raw pointers to the launchers in kernels/cuda/activation.cu on
// the current stream. fp32 / bf16 / fp16 (fp64, which only gradcheck uses, is CPU-only). The
// backwards recompute the activation from the saved inputs. setup.py compiles this file in a CUDA
// build only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "csrc/cuda_checks.h"
#include "csrc/norm_args.h"
#include "kernels/cuda/activation.cuh"

namespace zero_ext {
namespace {

using kernels::cpu::ActivationKind;
using kernels::cpu::ActivationRows;

// Validates like the CPU glue, rejects fp64, and launches over every row of a.
void run(ActivationRows args, const ActivationArgs& checked, bool backward) {
  check_activation_args(checked);
  const at::Tensor& a = checked.a;
  check_not_double(a, checked.op);
  const c10::cuda::CUDAGuard device_guard(a.device());
  args.h = a.size(-1);
  args.first_row = 0;
  args.last_row = args.h == 0 ? 0 : a.numel() / args.h;
  args.type = norm_type(a.scalar_type());
  const cudaStream_t stream = stream_of(a);
  const cudaError_t err = backward ? kernels::cuda::launch_activation_backward(args, stream)
                                   : kernels::cuda::launch_activation_forward(args, stream);
  check_launch(err, checked.op);
}

ActivationKind gelu_kind(c10::string_view approximate) {
  return approximate == "tanh" ? ActivationKind::kGeluTanh : ActivationKind::kGeluErf;
}

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  run({ActivationKind::kSwiGLU, gate.const_data_ptr(), up.const_data_ptr(), nullptr,
       out.data_ptr(), nullptr},
      {"zero_ext::swiglu", gate, up, std::nullopt, false, "none"}, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad_out,
                                                        const at::Tensor& gate,
                                                        const at::Tensor& up) {
  at::Tensor grad_gate = at::empty(gate.sizes(), gate.options());
  at::Tensor grad_up = at::empty(gate.sizes(), gate.options());
  run({ActivationKind::kSwiGLU, gate.const_data_ptr(), up.const_data_ptr(),
       grad_out.const_data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr()},
      {"zero_ext::swiglu_backward", gate, up, grad_out, false, "none"}, true);
  return {grad_gate, grad_up};
}

at::Tensor bias_gelu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                          c10::string_view approximate) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  run({gelu_kind(approximate), x.const_data_ptr(), data_or_null(bias), nullptr, out.data_ptr(),
       nullptr},
      {"zero_ext::bias_gelu", x, bias, std::nullopt, true, approximate}, false);
  return out;
}

at::Tensor bias_gelu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                   const std::optional<at::Tensor>& bias,
                                   c10::string_view approximate) {
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  run({gelu_kind(approximate), x.const_data_ptr(), data_or_null(bias), grad_out.const_data_ptr(),
       grad_x.data_ptr(), nullptr},
      {"zero_ext::bias_gelu_backward", x, bias, grad_out, true, approximate}, true);
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cuda);
}

}  // namespace zero_ext
