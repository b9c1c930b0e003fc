#include "csrc/softmax_args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "csrc/norm_args.h"  // norm_type: the kernels' element type of a dtype

namespace zero_ext {
namespace {

constexpr const char* kForward = "zero_ext::scaled_masked_softmax";
constexpr const char* kBackward = "zero_ext::scaled_masked_softmax_backward";

void check_input(const char* op, const at::Tensor& t, const char* name) {
  const at::ScalarType d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble,
                   op, ": expected ", name, " to be Float, BFloat16, Half or Double, got ", d,
                   "; cast it with .float() or .bfloat16()");
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.is_contiguous(), op, ": expected ", name,
                    " to be contiguous with at least one dimension, got shape ", t.sizes(),
                    "; call .contiguous() on it first");
}

void check_dropout(const char* op, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": expected dropout_p in [0, 1], got ", p);
}

uint64_t seed_value(const char* op, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.is_cpu(), op,
                    ": expected seed to be a CPU int64 tensor of one element (as "
                    "torch.randint(2**62, (1,)) gives), got ", seed.scalar_type(), " of shape ",
                    seed.sizes(), " on ", seed.device());
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// x's leading dimensions as (batch, heads, q) of a [batch, heads, q, k] view.
std::tuple<int64_t, int64_t, int64_t> row_dims(const at::Tensor& x) {
  const int64_t d = x.dim();
  const int64_t q = d >= 2 ? x.size(d - 2) : 1;
  const int64_t heads = d >= 3 ? x.size(d - 3) : 1;
  const int64_t k = x.size(d - 1);
  const int64_t rows = k == 0 ? 0 : x.numel() / k;
  return {q * heads == 0 ? 0 : rows / (q * heads), heads, q};
}

// The mask as a [batch, heads, q, k] tensor whose last stride is 1 (a broadcasting view where
// one exists), its element kind, and its leading strides.
at::Tensor mask_as_4d(const at::Tensor& x, const at::Tensor& mask, kernels::SoftmaxRun& run) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == x.scalar_type(),
                   kForward, ": expected mask to be Bool (True = attend) or ", x.scalar_type(),
                   " like x (added to scale * x), got ", mask.scalar_type(),
                   "; cast it with .to(x.dtype)");
  TORCH_CHECK_VALUE(mask.device() == x.device(), kForward, ": expected mask on x's device (",
                    x.device(), "), got ", mask.device());
  bool broadcastable = mask.dim() <= x.dim();
  for (int64_t i = 1; broadcastable && i <= mask.dim(); ++i) {
    const int64_t m = mask.size(-i);
    broadcastable = m == 1 || m == x.size(-i);
  }
  TORCH_CHECK_VALUE(broadcastable, kForward, ": expected mask broadcastable to x's shape ",
                    x.sizes(), ", got ", mask.sizes());
  const auto [batch, heads, q] = row_dims(x);
  const int64_t k = x.size(-1);
  at::Tensor m = mask.expand(x.sizes()).reshape({batch, heads, q, k});
  if (k > 1 && m.stride(3) != 1) m = m.contiguous();  // a mask broadcast over the keys
  run.mask = m.const_data_ptr();
  run.mask_kind = mask.scalar_type() == at::kBool ? kernels::SoftmaxMask::kBool
                                                  : kernels::SoftmaxMask::kAdditive;
  for (int i = 0; i < 3; ++i) run.mask_stride[i] = m.stride(i);
  return m;
}

void set_dropout(kernels::SoftmaxRun& run, double p, uint64_t seed) {
  run.dropout = p > 0.0;
  run.seed = seed;
  run.threshold = kernels::dropout_threshold(p);
  run.keep_scale = kernels::dropout_keep_scale(p);
}

}  // namespace

kernels::SoftmaxRun softmax_forward_run(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                        double scale, bool causal, double dropout_p,
                                        const at::Tensor& seed, at::Tensor& mask_view) {
  check_input(kForward, x, "x");
  check_dropout(kForward, dropout_p);
  TORCH_CHECK_VALUE(!causal || x.dim() >= 2, kForward,
                    ": causal needs x of at least 2 dimensions ([..., q, k]), got shape ",
                    x.sizes());
  kernels::SoftmaxRun run{};
  const auto [batch, heads, q] = row_dims(x);
  run.x = x.const_data_ptr();
  run.type = norm_type(x.scalar_type());
  run.k = x.size(-1);
  run.rows = batch * heads * q;
  run.q = q;
  run.heads = heads;
  run.scale = scale;
  run.causal = causal;
  run.mask_kind = kernels::SoftmaxMask::kNone;
  if (mask.has_value()) mask_view = mask_as_4d(x, *mask, run);
  set_dropout(run, dropout_p, seed_value(kForward, seed));
  run.last_row = run.rows;
  return run;
}

std::tuple<at::Tensor, at::Tensor> softmax_forward_outputs(const at::Tensor& x, double dropout_p) {
  return {at::empty(x.sizes(), x.options()),
          at::empty(dropout_p > 0.0 ? x.sizes() : at::IntArrayRef{0}, x.options())};
}

void set_softmax_outputs(kernels::SoftmaxRun& run, const at::Tensor& out,
                         const at::Tensor& probs) {
  run.out = out.data_ptr();
  run.probs_out = run.dropout ? probs.data_ptr() : nullptr;
}

kernels::SoftmaxRun softmax_backward_run(const at::Tensor& grad_out, const at::Tensor& probs,
                                         double scale, double dropout_p, const at::Tensor& seed,
                                         const at::Tensor& grad_x) {
  check_input(kBackward, probs, "probs");
  check_dropout(kBackward, dropout_p);
  TORCH_CHECK_VALUE(grad_out.sizes().equals(probs.sizes()) && grad_out.is_contiguous(), kBackward,
                    ": expected grad_out contiguous of probs' shape ", probs.sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == probs.scalar_type(), kBackward,
                   ": expected grad_out to be ", probs.scalar_type(), " like probs, got ",
                   grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == probs.device(), kBackward,
                    ": expected grad_out on probs' device (", probs.device(), "), got ",
                    grad_out.device());
  kernels::SoftmaxRun run{};
  run.probs = probs.const_data_ptr();
  run.grad_out = grad_out.const_data_ptr();
  run.out = grad_x.data_ptr();
  run.type = norm_type(probs.scalar_type());
  run.k = probs.size(-1);
  run.rows = run.k == 0 ? 0 : probs.numel() / run.k;
  run.q = 1;
  run.heads = 1;
  run.scale = scale;
  set_dropout(run, dropout_p, seed_value(kBackward, seed));
  run.last_row = run.rows;
  return run;
}

uint64_t check_keep_mask_args(const at::Tensor& x, double dropout_p, const at::Tensor& seed) {
  constexpr const char* kOp = "zero_ext::dropout_keep_mask";
  TORCH_CHECK_VALUE(x.is_contiguous(), kOp, ": expected x contiguous, got strides ", x.strides());
  check_dropout(kOp, dropout_p);
  return seed_value(kOp, seed);
}

}  // namespace zero_ext
