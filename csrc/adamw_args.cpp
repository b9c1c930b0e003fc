#include "csrc/adamw_args.h"

#include <c10/util/Exception.h>

#include <string>

namespace zero_ext {
namespace {

constexpr const char* kOp = "zero_ext::adamw_step_";

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_same_length(at::TensorList list, const char* name, size_t n) {
  TORCH_CHECK_VALUE(list.size() == n, kOp, ": expected ", name, " to have one tensor per param (",
                    n, "), got ", list.size());
}

// Checks tensor `t` (named `name`[i]) against params[i] and the call's device.
void check_companion(const at::Tensor& t, const at::Tensor& param, const char* name, size_t i,
                     const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), kOp, ": ", name, "[", i, "] is undefined (None)");
  TORCH_CHECK_VALUE(t.device() == device, kOp, ": expected every tensor on params[0]'s device (",
                    device, "), got ", t.device(), " for ", name, "[", i, "]");
  TORCH_CHECK_VALUE(t.sizes().equals(param.sizes()), kOp, ": expected ", name, "[", i,
                    "] to have the shape of params[", i, "] ", shape_str(param), ", got ",
                    shape_str(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": expected ", name, "[", i,
                    "] to be contiguous; call .contiguous() on it first");
}

void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* name, size_t i,
                 const char* why) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, kOp, ": expected ", name, "[", i, "] to be ",
                   expected, " (", why, "), got ", t.scalar_type());
}

void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                         const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->numel() == 1, kOp, ": expected ", name, " to have one element, got ",
                    t->numel());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, kOp, ": expected ", name,
                   " to be Float, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == device, kOp, ": expected ", name,
                    " on the params' device (", device, "), got ", t->device());
}

}  // namespace

kernels::ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return kernels::ElementType::kFloat32;
    case at::kBFloat16:
      return kernels::ElementType::kBFloat16;
    case at::kHalf:
      return kernels::ElementType::kFloat16;
    default:
      TORCH_INTERNAL_ASSERT(false, kOp, ": dtype ", dtype, " passed validation");
  }
}

void check_adamw_step_args(const AdamWStepArgs& a) {
  const auto& h = a.hyper;
  TORCH_CHECK_VALUE(h.lr >= 0.0, kOp, ": expected lr >= 0, got ", h.lr);
  TORCH_CHECK_VALUE(h.beta1 >= 0.0 && h.beta1 < 1.0, kOp, ": expected 0 <= beta1 < 1, got ",
                    h.beta1);
  // beta2 = 1 keeps the second moment as it is (v * 1 + g^2 * 0): a frozen variance, which
  // needs bias_correction off (1 - beta2^step would be 0).
  TORCH_CHECK_VALUE(h.beta2 >= 0.0 && (h.beta2 < 1.0 || (h.beta2 == 1.0 && !h.bias_correction)),
                    kOp, ": expected 0 <= beta2 < 1 (or beta2 = 1, a frozen second moment, with "
                    "bias_correction=False), got ", h.beta2,
                    h.bias_correction ? " with bias_correction=True" : "");
  TORCH_CHECK_VALUE(h.eps >= 0.0, kOp, ": expected eps >= 0, got ", h.eps);
  TORCH_CHECK_VALUE(h.weight_decay >= 0.0, kOp, ": expected weight_decay >= 0, got ",
                    h.weight_decay);

  const size_t n = a.params.size();
  check_same_length(a.grads, "grads", n);
  check_same_length(a.exp_avgs, "exp_avgs", n);
  check_same_length(a.exp_avg_sqs, "exp_avg_sqs", n);
  check_same_length(a.state_steps, "state_steps", n);
  TORCH_CHECK_VALUE(a.params_16bit.empty() || a.params_16bit.size() == n, kOp,
                    ": expected params_16bit to be empty or to have one tensor per param (", n,
                    "), got ", a.params_16bit.size());
  if (n == 0) return;

  const at::Device device = a.params[0].device();
  const at::ScalarType grad_dtype = a.grads[0].scalar_type();
  TORCH_CHECK_TYPE(grad_dtype == at::kFloat || grad_dtype == at::kBFloat16 ||
                       grad_dtype == at::kHalf,
                   kOp, ": expected grads of dtype Float, BFloat16 or Half, got ", grad_dtype);
  const at::ScalarType copy_dtype =
      a.params_16bit.empty() ? at::kBFloat16 : a.params_16bit[0].scalar_type();
  TORCH_CHECK_TYPE(copy_dtype == at::kBFloat16 || copy_dtype == at::kHalf, kOp,
                   ": expected params_16bit of dtype BFloat16 or Half, got ", copy_dtype);

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK_VALUE(p.defined(), kOp, ": params[", i, "] is undefined (None)");
    TORCH_CHECK_VALUE(p.device() == device, kOp,
                      ": expected every tensor on params[0]'s device (", device, "), got ",
                      p.device(), " for params[", i, "]");
    TORCH_CHECK_VALUE(p.is_contiguous(), kOp, ": expected params[", i,
                      "] to be contiguous; call .contiguous() on it first");
    check_dtype(p, at::kFloat, "params", i, "the fp32 master weights");
    check_companion(a.grads[i], p, "grads", i, device);
    check_dtype(a.grads[i], grad_dtype, "grads", i, "one grad dtype per call, that of grads[0]");
    check_companion(a.exp_avgs[i], p, "exp_avgs", i, device);
    check_dtype(a.exp_avgs[i], at::kFloat, "exp_avgs", i, "optimizer state is fp32");
    check_companion(a.exp_avg_sqs[i], p, "exp_avg_sqs", i, device);
    check_dtype(a.exp_avg_sqs[i], at::kFloat, "exp_avg_sqs", i, "optimizer state is fp32");
    if (!a.params_16bit.empty()) {
      check_companion(a.params_16bit[i], p, "params_16bit", i, device);
      check_dtype(a.params_16bit[i], copy_dtype, "params_16bit", i,
                  "one dtype per call, that of params_16bit[0]");
    }
    const at::Tensor& step = a.state_steps[i];
    TORCH_CHECK_VALUE(step.defined() && step.numel() == 1 && step.device().is_cpu(), kOp,
                      ": expected state_steps[", i,
                      "] to be a one-element tensor on the CPU (the step count is read on the "
                      "host), got ",
                      step.defined() ? c10::str(step.numel(), " elements on ", step.device())
                                     : std::string("None"));
    check_dtype(step, at::kFloat, "state_steps", i, "step counts are fp32, as in torch.optim");
  }
  check_scalar_tensor(a.inv_scale, "inv_scale", device);
  check_scalar_tensor(a.found_inf, "found_inf", device);
}

}  // namespace zero_ext
