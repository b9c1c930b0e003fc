// CPU kernels of zero_ext::scaled_masked_softmax, its backward and zero_ext::dropout_keep_mask:
// validate through csrc/softmax_args.h, then run rows across ATen's intra-op thread pool.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "csrc/cpu_isa.h"
#include "csrc/softmax_args.h"
#include "kernels/cpu/softmax.h"

namespace zero_ext {
namespace {

// Elements per unit of row work: enough to amortise scheduling on short rows.
constexpr int64_t kSpanElements = 1 << 14;

void run_rows(const kernels::SoftmaxRun& run, bool backward) {
  if (run.k == 0) return;
  const kernels::cpu::SoftmaxFn kernel =
      backward ? ZERO_EXT_CPU_KERNEL(kernels::cpu::softmax_backward_rows)
               : ZERO_EXT_CPU_KERNEL(kernels::cpu::softmax_forward_rows);
  at::parallel_for(0, run.rows, std::max<int64_t>(1, kSpanElements / run.k),
                   [&](int64_t first, int64_t last) {
                     kernels::SoftmaxRun unit = run;
                     unit.first_row = first;
                     unit.last_row = last;
                     kernel(unit);
                   });
}

std::tuple<at::Tensor, at::Tensor> scaled_masked_softmax_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale, bool causal,
    double dropout_p, const at::Tensor& seed) {
  at::Tensor mask_view;
  kernels::SoftmaxRun run =
      softmax_forward_run(x, mask, scale, causal, dropout_p, seed, mask_view);
  auto [out, probs] = softmax_forward_outputs(x, dropout_p);
  set_softmax_outputs(run, out, probs);
  run_rows(run, false);
  return {out, probs};
}

at::Tensor scaled_masked_softmax_backward_cpu(const at::Tensor& grad_out, const at::Tensor& probs,
                                              double scale, double dropout_p,
                                              const at::Tensor& seed) {
  at::Tensor grad_x = at::empty(probs.sizes(), probs.options());
  run_rows(softmax_backward_run(grad_out, probs, scale, dropout_p, seed, grad_x), true);
  return grad_x;
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& x, double dropout_p, const at::Tensor& seed) {
  const uint64_t key = check_keep_mask_args(x, dropout_p, seed);
  const uint32_t threshold = kernels::dropout_threshold(dropout_p);
  at::Tensor keep = at::empty(x.sizes(), x.options().dtype(at::kBool));
  bool* data = keep.data_ptr<bool>();
  const bool none_dropped = dropout_p == 0.0;
  at::parallel_for(0, x.numel(), kSpanElements, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      data[i] = none_dropped || kernels::dropout_keep(key, static_cast<uint64_t>(i), threshold);
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) {
  m.impl("scaled_masked_softmax", &scaled_masked_softmax_cpu);
  m.impl("scaled_masked_softmax_backward", &scaled_masked_softmax_backward_cpu);
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
}

}  // namespace zero_ext
