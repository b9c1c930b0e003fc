#include "csrc/fused_ce_args.h"

#include <c10/util/Exception.h>

namespace zero_ext {
namespace {

void check_matrix(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined (None)");
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": expected ", name, " to be 2-D, got shape ", t.sizes(),
                    "; flatten the leading dimensions first (hidden.flatten(0, -2))");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected ", name,
                    " to be contiguous; call .contiguous() on it first");
}

void check_token_vector(const char* op, const at::Tensor& t, const char* name, int64_t n,
                        const at::Tensor& hidden) {
  const at::ScalarType acc = fused_ce_accumulation_dtype(hidden.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": expected ", name, " of dtype ", acc,
                   " (the accumulation dtype of ", hidden.scalar_type(), " inputs), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), op, ": expected ", name,
                    " contiguous of shape [", n, "] (one per token), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == hidden.device(), op, ": expected ", name, " on hidden's device (",
                    hidden.device(), "), got ", t.device());
}

}  // namespace

at::ScalarType fused_ce_accumulation_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

void check_fused_ce_args(const char* op, const FusedCeArgs& a) {
  check_matrix(op, a.hidden, "hidden");
  check_matrix(op, a.weight, "weight");
  const at::ScalarType dtype = a.hidden.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, op,
                   ": expected hidden of dtype Float, BFloat16 or Double, got ", dtype);
  TORCH_CHECK_TYPE(a.weight.scalar_type() == dtype, op, ": expected weight of hidden's dtype (",
                   dtype, "), got ", a.weight.scalar_type(), "; cast one to the other");
  TORCH_CHECK_VALUE(a.weight.size(1) == a.hidden.size(1), op, ": hidden is [N, H] = ",
                    a.hidden.sizes(), " but weight is [V, H] = ", a.weight.sizes(),
                    "; their last dimensions must match");
  TORCH_CHECK_VALUE(a.weight.device() == a.hidden.device(), op,
                    ": expected weight on hidden's device (", a.hidden.device(), "), got ",
                    a.weight.device());
  const int64_t n = a.hidden.size(0);
  const int64_t v = a.weight.size(0);
  TORCH_CHECK_VALUE(v >= 1, op, ": expected weight with at least one row (class), got ",
                    a.weight.sizes());
  TORCH_CHECK_TYPE(a.target.scalar_type() == at::kLong, op,
                   ": expected target of dtype Long (int64 class indices), got ",
                   a.target.scalar_type());
  TORCH_CHECK_VALUE(a.target.dim() == 1 && a.target.size(0) == n && a.target.is_contiguous(), op,
                    ": expected target contiguous of shape [", n, "] (one class per token), got ",
                    a.target.sizes());
  TORCH_CHECK_VALUE(a.target.device() == a.hidden.device(), op,
                    ": expected target on hidden's device (", a.hidden.device(), "), got ",
                    a.target.device());
  if (a.bias.has_value()) {
    const at::Tensor& b = *a.bias;
    TORCH_CHECK_TYPE(b.scalar_type() == dtype, op, ": expected bias of hidden's dtype (", dtype,
                     "), got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == v && b.is_contiguous(), op,
                      ": expected bias contiguous of shape [", v, "] (weight's rows), got ",
                      b.sizes());
    TORCH_CHECK_VALUE(b.device() == a.hidden.device(), op, ": expected bias on hidden's device (",
                      a.hidden.device(), "), got ", b.device());
  }
  TORCH_CHECK_VALUE(a.label_smoothing >= 0.0 && a.label_smoothing <= 1.0, op,
                    ": expected label_smoothing in [0, 1], got ", a.label_smoothing);
  TORCH_CHECK_VALUE(a.z_loss >= 0.0, op, ": expected z_loss >= 0, got ", a.z_loss);
  if (n > 0) {
    const at::Tensor bad =
        a.target.ne(a.ignore_index).logical_and_(a.target.lt(0).logical_or_(a.target.ge(v)));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), op,
                      ": target holds a class outside [0, ", v, ") that is not ignore_index (",
                      a.ignore_index, "); fix the labels or pass their padding value as "
                      "ignore_index");
  }
}

void check_fused_ce_backward_args(const char* op, const FusedCeArgs& a,
                                  const at::Tensor& grad_loss, const at::Tensor& lse) {
  check_fused_ce_args(op, a);
  const int64_t n = a.hidden.size(0);
  check_token_vector(op, grad_loss, "grad_loss", n, a.hidden);
  check_token_vector(op, lse, "lse", n, a.hidden);
}

void check_fused_ce_grad_args(const char* op, const FusedCeArgs& a, const CeGradOptions& o) {
  check_fused_ce_args(op, a);
  TORCH_CHECK_VALUE(o.workspace_bytes > 0, op,
                    ": expected workspace_bytes > 0 (the memory for a chunk's logits), got ",
                    o.workspace_bytes);
}

}  // namespace zero_ext
