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
    const auto block = forward_rows_of<scalar_t>(logits, col0, target, ignore_index, s);
    at::parallel_for(0, block.rows, row_grain(block.cols),
                     [&](int64_t first, int64_t last) { kernel(block, first, last); });
  });
}

void backward_rows(const at::Tensor& logits, int64_t col0, const at::Tensor& target,
                   int64_t ignore_index, const at::Tensor& lse, const at::Tensor& grad,
                   double label_smoothing, double z_loss, int64_t vocab) {
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kFusedCeBackwardOp, [&] {
    const auto kernel = backward_kernel<scalar_t>();
    const auto block = backward_rows_of<scalar_t>(logits, col0, target, ignore_index, lse, grad,
                                                  label_smoothing, z_loss, vocab);
    at::parallel_for(0, block.rows, row_grain(block.cols),
                     [&](int64_t first, int64_t last) { kernel(block, first, last); });
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
