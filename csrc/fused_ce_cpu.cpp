// CPU kernels of zero_ext::fused_linear_cross_entropy_fwd / _bwd / _fwd_grad: the driver of
// csrc/fused_ce.h with the row math of kernels/cpu/fused_ce.h run over ranges of each block's rows
// on ATen's thread pool, in the variant at::get_cpu_capability() selects.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "csrc/cpu_isa.h"
#include "csrc/fused_ce.h"
#include "csrc/fused_ce_args.h"
#include "kernels/cpu/fused_ce.h"

namespace zero_ext {
namespace {

// Rows per unit of parallel work over a block of `cols` columns.
int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
}

// This CPU's variant of the row kernels for accumulation type T.
template <typename T>
kernels::cpu::CeForwardBlockFn<T> forward_kernel() {
  if constexpr (std::is_same_v<T, float>) {
    return ZERO_EXT_CPU_KERNEL(kernels::cpu::ce_forward_block_f32);
  } else {
    return ZERO_EXT_CPU_KERNEL(kernels::cpu::ce_forward_block_f64);
  }
}

template <typename T>
kernels::cpu::CeBackwardBlockFn<T> backward_kernel() {
  if constexpr (std::is_same_v<T, float>) {
    return ZERO_EXT_CPU_KERNEL(kernels::cpu::ce_backward_block_f32);
  } else {
    return ZERO_EXT_CPU_KERNEL(kernels::cpu::ce_backward_block_f64);
  }
}

void forward_rows(const at::Tensor& logits, int64_t col0, const at::Tensor& target,
                  int64_t ignore_index, const CeRowState& s) {
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kFusedCeForwardOp, [&] {
    const auto kernel = forward_kernel<scalar_t>();
    const int64_t cols = logits.size(1);
    at::parallel_for(0, logits.size(0), row_grain(cols), [&](int64_t first, int64_t last) {
      kernel({logits.const_data_ptr<scalar_t>(), cols, col0, target.const_data_ptr<int64_t>(),
              ignore_index, s.max.data_ptr<scalar_t>(), s.sumexp.data_ptr<scalar_t>(),
              s.logit_sum.data_ptr<scalar_t>(), s.target_logit.data_ptr<scalar_t>(), first,
              last});
    });
  });
}

void backward_rows(const at::Tensor& logits, int64_t col0, const at::Tensor& target,
                   int64_t ignore_index, const at::Tensor& lse, const at::Tensor& grad,
                   double label_smoothing, double z_loss, int64_t vocab) {
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kFusedCeBackwardOp, [&] {
    const auto kernel = backward_kernel<scalar_t>();
    const auto eps = static_cast<scalar_t>(label_smoothing);
    const int64_t cols = logits.size(1);
    at::parallel_for(0, logits.size(0), row_grain(cols), [&](int64_t first, int64_t last) {
      kernel({logits.data_ptr<scalar_t>(), cols, col0, target.const_data_ptr<int64_t>(),
              ignore_index, lse.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
              eps / static_cast<scalar_t>(vocab), scalar_t(1) - eps,
              static_cast<scalar_t>(2 * z_loss), first, last});
    });
  });
}

constexpr CeRowKernels kCpuKernels{&forward_rows, &backward_rows};

// The CPU needs no device guard.
struct NoDeviceGuard {
  explicit NoDeviceGuard(const at::Device&) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) {
  FusedCeOps<kCpuKernels, NoDeviceGuard>::register_ops(m);
}

}  // namespace zero_ext
