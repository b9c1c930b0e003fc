// CPU kernels of zero_ext::fused_norm and zero_ext::fused_norm_backward, on calls NormOps
// (csrc/norm_args.h) validated: run rows
// (forward, input gradient) or column blocks (weight and bias gradients) across ATen's intra-op
// thread pool. Every output element is computed by one thread in a fixed order, so results do not
// depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

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

// Runs a row kernel over rows [0, rows) of width h across the thread pool, each unit of work on
// a copy of base with its own [first_row, last_row).
template <typename Rows>
void parallel_rows(void (*kernel)(const Rows&), const Rows& base, int64_t rows, int64_t h) {
  at::parallel_for(0, rows, rows_per_unit(h), [&](int64_t first, int64_t last) {
    Rows args = base;
    args.first_row = first;
    args.last_row = last;
    kernel(args);
  });
}

void fused_norm_cpu(const NormForwardArgs& args, const kernels::cpu::NormForwardTensors& t) {
  const int64_t h = args.x.size(-1);
  const kernels::cpu::NormForwardRows base{t, norm_type(args.x.scalar_type()), h, 0, 0, args.eps,
                                           args.rms};
  parallel_rows(ZERO_EXT_CPU_KERNEL(kernels::cpu::norm_forward_rows), base, args.x.numel() / h, h);
}

void fused_norm_backward_cpu(const NormBackwardArgs& args,
                             const kernels::cpu::NormBackwardTensors& t) {
  const int64_t h = args.input.size(-1);
  const int64_t rows = args.input.numel() / h;
  const kernels::cpu::NormType type = norm_type(args.input.scalar_type());
  const kernels::cpu::NormBackwardRows row_base{t, type, h, 0, 0, args.rms};
  parallel_rows(ZERO_EXT_CPU_KERNEL(kernels::cpu::norm_backward_rows), row_base, rows, h);

  const kernels::cpu::NormParamGradFn columns_kernel =
      ZERO_EXT_CPU_KERNEL(kernels::cpu::norm_param_grad_columns);
  const kernels::cpu::NormParamGradColumns column_base{t, type, rows, h, 0, 0, args.rms};
  const int64_t units = (h + kColumnsPerUnit - 1) / kColumnsPerUnit;
  at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
    kernels::cpu::NormParamGradColumns columns = column_base;
    columns.first_col = first * kColumnsPerUnit;
    columns.last_col = std::min(last * kColumnsPerUnit, h);
    columns_kernel(columns);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) { NormOps<fused_norm_cpu, fused_norm_backward_cpu>::impl(m); }

}  // namespace zero_ext
