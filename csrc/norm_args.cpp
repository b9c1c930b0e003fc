#include "csrc/norm_args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace zero_ext {
namespace {

constexpr const char* kForward = "zero_ext::fused_norm";
constexpr const char* kBackward = "zero_ext::fused_norm_backward";

void check_float_dtype(const char* op, const at::Tensor& t, const char* name) {
  const at::ScalarType d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble,
                   op, ": expected ", name, " to be Float, BFloat16, Half or Double, got ", d,
                   "; cast it with .float() or .bfloat16()");
}

// `t` (named `name`) alongside `like` (named `like_name`): same device, dtype and shape.
void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like,
                const char* like_name, bool same_shape) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": expected ", name, " on ", like_name,
                    "'s device (", like.device(), "), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": expected ", name, " to be ",
                   like.scalar_type(), " like ", like_name, ", got ", t.scalar_type(),
                   "; cast it with .to(", like_name, ".dtype)");
  if (same_shape) {
    TORCH_CHECK_VALUE(t.sizes().equals(like.sizes()), op, ": expected ", name,
                      " to have the shape of ", like_name, " ", like.sizes(), ", got ",
                      t.sizes());
  }
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected ", name,
                    " to be contiguous; call .contiguous() on it first");
}

void check_parameter(const char* op, const at::Tensor& p, const char* name, const at::Tensor& x,
                     const char* x_name) {
  const int64_t h = x.size(-1);
  TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == h, op, ": expected ", name,
                    " to be 1-D of the last dimension of ", x_name, " (", h, "), got shape ",
                    p.sizes());
  check_like(op, p, name, x, x_name, false);
}

void check_stat(const at::Tensor& s, const char* name, int64_t rows, const at::Tensor& input) {
  const at::ScalarType expected = norm_stat_dtype(input.scalar_type());
  TORCH_CHECK_TYPE(s.scalar_type() == expected, kBackward, ": expected ", name, " to be ",
                   expected, " (the forward's statistics), got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == rows, kBackward, ": expected ", name,
                    " of shape [", rows, "] (one per row of input, as fused_norm returns it), got ",
                    s.sizes());
  TORCH_CHECK_VALUE(s.device() == input.device() && s.is_contiguous(), kBackward, ": expected ",
                    name, " contiguous on input's device (", input.device(), ")");
}

}  // namespace

void check_norm_forward_args(const NormForwardArgs& args) {
  const at::Tensor& x = args.x;
  check_float_dtype(kForward, x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, kForward,
                    ": expected x with a nonempty last (normalized) dimension, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), kForward,
                    ": expected x to be contiguous; call .contiguous() on it first");
  if (args.residual.has_value()) check_like(kForward, *args.residual, "residual", x, "x", true);
  check_parameter(kForward, args.weight, "weight", x, "x");
  if (args.bias.has_value()) {
    TORCH_CHECK_VALUE(!args.rms, kForward,
                      ": RMSNorm takes no bias; pass bias=None or use LayerNorm (rms=False)");
    check_parameter(kForward, *args.bias, "bias", x, "x");
  }
  TORCH_CHECK_VALUE(args.eps > 0, kForward, ": expected eps > 0, got ", args.eps);
}

void check_norm_backward_args(const NormBackwardArgs& args) {
  const at::Tensor& input = args.input;
  check_float_dtype(kBackward, input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) > 0 && input.is_contiguous(), kBackward,
                    ": expected a contiguous input with a nonempty last dimension, got shape ",
                    input.sizes());
  check_like(kBackward, args.grad_out, "grad_out", input, "input", true);
  if (args.grad_summed.has_value()) {
    check_like(kBackward, *args.grad_summed, "grad_summed", input, "input", true);
  }
  check_parameter(kBackward, args.weight, "weight", input, "input");
  const int64_t rows = input.numel() / input.size(-1);
  check_stat(args.rstd, "rstd", rows, input);
  if (!args.rms) check_stat(args.mean, "mean", rows, input);
}

void check_activation_args(const ActivationArgs& args) {
  const at::Tensor& a = args.a;
  const char* a_name = args.bias_gelu ? "x" : "gate";
  check_float_dtype(args.op, a, a_name);
  TORCH_CHECK_VALUE(a.dim() >= 1 && a.is_contiguous(), args.op, ": expected ", a_name,
                    " to be contiguous with at least one dimension, got shape ", a.sizes(),
                    "; call .contiguous() on it first");
  if (args.bias_gelu) {
    TORCH_CHECK_VALUE(args.approximate == "none" || args.approximate == "tanh", args.op,
                      ": expected approximate to be 'none' or 'tanh' (as F.gelu), got '",
                      args.approximate, "'");
    if (args.b.has_value()) check_parameter(args.op, *args.b, "bias", a, a_name);
  } else {
    TORCH_CHECK_VALUE(args.b.has_value(), args.op, ": up is required");
    check_like(args.op, *args.b, "up", a, a_name, true);
  }
  if (args.grad_out.has_value()) check_like(args.op, *args.grad_out, "grad_out", a, a_name, true);
}

kernels::cpu::NormType norm_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return kernels::cpu::NormType::kFloat32;
    case at::kBFloat16:
      return kernels::cpu::NormType::kBFloat16;
    case at::kHalf:
      return kernels::cpu::NormType::kFloat16;
    case at::kDouble:
      return kernels::cpu::NormType::kFloat64;
    default:
      TORCH_INTERNAL_ASSERT(false, "zero_ext norm: dtype ", dtype, " passed validation");
  }
}

at::ScalarType norm_stat_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

NormForwardOutputs empty_norm_forward_outputs(const NormForwardArgs& a) {
  const at::Tensor& x = a.x;
  const int64_t rows = x.numel() / x.size(-1);
  const at::TensorOptions stat = x.options().dtype(norm_stat_dtype(x.scalar_type()));
  return {at::empty(x.sizes(), x.options()),
          at::empty(a.residual.has_value() ? x.sizes() : at::IntArrayRef{0}, x.options()),
          at::empty({a.rms ? 0 : rows}, stat), at::empty({rows}, stat)};
}

NormBackwardOutputs empty_norm_backward_outputs(const NormBackwardArgs& a) {
  const at::Tensor& input = a.input;
  const int64_t h = input.size(-1);
  const at::TensorOptions stat = input.options().dtype(norm_stat_dtype(input.scalar_type()));
  return {at::empty(input.sizes(), input.options()), at::empty({h}, stat),
          at::empty({a.has_bias ? h : 0}, stat)};
}

kernels::cpu::NormForwardTensors norm_forward_tensors(const NormForwardArgs& a,
                                                      const NormForwardOutputs& o) {
  const bool with_residual = a.residual.has_value();
  return {a.x.const_data_ptr(),
          with_residual ? a.residual->const_data_ptr() : nullptr,
          a.weight.const_data_ptr(),
          a.bias.has_value() ? a.bias->const_data_ptr() : nullptr,
          o.out.data_ptr(),
          with_residual ? o.summed.data_ptr() : nullptr,
          a.rms ? nullptr : o.mean.data_ptr(),
          o.rstd.data_ptr()};
}

kernels::cpu::NormBackwardTensors norm_backward_tensors(const NormBackwardArgs& a,
                                                        const NormBackwardOutputs& o) {
  return {a.grad_out.const_data_ptr(),
          a.grad_summed.has_value() ? a.grad_summed->const_data_ptr() : nullptr,
          a.input.const_data_ptr(),
          a.weight.const_data_ptr(),
          a.rms ? nullptr : a.mean.const_data_ptr(),
          a.rstd.const_data_ptr(),
          o.grad_input.data_ptr(),
          o.grad_weight.data_ptr(),
          a.has_bias ? o.grad_bias.data_ptr() : nullptr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> NormBackwardOutputs::result(
    const at::Tensor& weight) const {
  return {grad_input, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type())};
}

}  // namespace zero_ext
