// CPU kernels of zero_ext::fused_linear_cross_entropy_fwd / _bwd: the logits of a chunk of tokens
// against a block of the vocabulary come from one ATen matmul into a reused buffer, the row math
// (kernels/cpu/fused_ce.h) runs on ATen's thread pool, and the [N, V] logits never exist. The
// forward keeps an online log-sum-exp per token; the backward recomputes each block from the
// saved per-token lse and turns it into the logit gradient in place, then folds it into
// grad_hidden and grad_weight with two more matmuls. Extra memory: one block of
// kBlockElements logits (plus a 16-bit copy for bf16), and fp32 accumulators for bf16 gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "csrc/cpu_isa.h"
#include "csrc/fused_ce_args.h"
#include "kernels/cpu/fused_ce.h"

namespace zero_ext {
namespace {

constexpr const char* kForward = "zero_ext::fused_linear_cross_entropy_fwd";
constexpr const char* kBackward = "zero_ext::fused_linear_cross_entropy_bwd";

// Logits per block: 8 MiB of fp32, small next to the hidden states of any real batch, large
// enough that each matmul runs near peak. Tokens per chunk: at most kMaxChunk, so a block spans
// at least kBlockElements / kMaxChunk vocabulary entries.
constexpr int64_t kBlockElements = int64_t{1} << 21;
constexpr int64_t kMaxChunk = 1024;

struct Blocking {
  int64_t chunk;  // tokens per chunk
  int64_t block;  // vocabulary entries per block
};

Blocking blocking_of(int64_t n, int64_t v) {
  const int64_t chunk = std::max<int64_t>(1, std::min(n, kMaxChunk));
  return {chunk, std::max<int64_t>(1, std::min(v, kBlockElements / chunk))};
}

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

// The reused block buffers: mm (the matmul's output, in the input dtype) and acc (the same
// logits in the accumulation dtype; the same tensor when the two dtypes agree).
struct BlockBuffers {
  at::Tensor mm;
  at::Tensor acc;

  BlockBuffers(const at::Tensor& hidden, int64_t elements) {
    mm = at::empty({elements}, hidden.options());
    const at::ScalarType acc_dtype = fused_ce_accumulation_dtype(hidden.scalar_type());
    acc = acc_dtype == hidden.scalar_type()
              ? mm
              : at::empty({elements}, hidden.options().dtype(acc_dtype));
  }

  bool converts() const { return !acc.is_same(mm); }
};

// Logits of tokens [c0, c0 + rows) against vocabulary [v0, v0 + cols), [rows, cols] contiguous
// in the accumulation dtype, written into the buffers.
at::Tensor block_logits(const FusedCeArgs& a, BlockBuffers& buf, int64_t c0, int64_t rows,
                        int64_t v0, int64_t cols) {
  const at::Tensor h = a.hidden.narrow(0, c0, rows);
  const at::Tensor w = a.weight.narrow(0, v0, cols);
  at::Tensor out = buf.mm.narrow(0, 0, rows * cols).view({rows, cols});
  if (a.bias.has_value()) {
    at::addmm_out(out, a.bias->narrow(0, v0, cols), h, w.t());
  } else {
    at::mm_out(out, h, w.t());
  }
  if (!buf.converts()) return out;
  at::Tensor acc = buf.acc.narrow(0, 0, rows * cols).view({rows, cols});
  acc.copy_(out);
  return acc;
}

// Rows per unit of parallel work over a block of `cols` columns.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)); }

template <typename T>
void forward_impl(const FusedCeArgs& a, at::Tensor& loss, at::Tensor& lse) {
  const int64_t n = a.hidden.size(0);
  const int64_t v = a.weight.size(0);
  const Blocking bl = blocking_of(n, v);
  BlockBuffers buf(a.hidden, bl.chunk * bl.block);
  const int64_t* target = a.target.const_data_ptr<int64_t>();
  T* loss_out = loss.data_ptr<T>();
  T* lse_out = lse.data_ptr<T>();
  const T eps = static_cast<T>(a.label_smoothing);
  const T z = static_cast<T>(a.z_loss);
  std::vector<T> max(bl.chunk), sumexp(bl.chunk), logit_sum(bl.chunk), target_logit(bl.chunk);
  const auto kernel = forward_kernel<T>();

  for (int64_t c0 = 0; c0 < n; c0 += bl.chunk) {
    const int64_t rows = std::min(bl.chunk, n - c0);
    std::fill(max.begin(), max.end(), -std::numeric_limits<T>::infinity());
    std::fill(sumexp.begin(), sumexp.end(), T(0));
    std::fill(logit_sum.begin(), logit_sum.end(), T(0));
    std::fill(target_logit.begin(), target_logit.end(), T(0));
    for (int64_t v0 = 0; v0 < v; v0 += bl.block) {
      const int64_t cols = std::min(bl.block, v - v0);
      const at::Tensor logits = block_logits(a, buf, c0, rows, v0, cols);
      const T* x = logits.const_data_ptr<T>();
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t first, int64_t last) {
        kernel({x, cols, v0, target + c0, a.ignore_index, max.data(), sumexp.data(),
                logit_sum.data(), target_logit.data(), first, last});
      });
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (target[c0 + r] == a.ignore_index) continue;  // loss and lse stay 0
      const T l = max[r] + std::log(sumexp[r]);
      lse_out[c0 + r] = l;
      loss_out[c0 + r] =
          l - (T(1) - eps) * target_logit[r] - eps / static_cast<T>(v) * logit_sum[r] + z * l * l;
    }
  }
}

// acc += a @ b, where acc is in the accumulation dtype and a, b may be 16-bit (their product is
// then rounded once per block before the fp32 sum).
void add_matmul(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
  } else {
    acc.add_(at::mm(a, b));
  }
}

template <typename T>
void backward_impl(const FusedCeArgs& a, const at::Tensor& grad_loss, const at::Tensor& lse,
                   at::Tensor& grad_hidden, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t n = a.hidden.size(0);
  const int64_t v = a.weight.size(0);
  const Blocking bl = blocking_of(n, v);
  BlockBuffers buf(a.hidden, bl.chunk * bl.block);
  const at::ScalarType acc_dtype = buf.acc.scalar_type();
  const bool converts = buf.converts();
  // The gradients accumulate in the accumulation dtype: in place for fp32 / fp64, in fp32
  // buffers rounded once at the end for bf16.
  at::Tensor gw = converts ? at::zeros(a.weight.sizes(), a.weight.options().dtype(acc_dtype))
                           : grad_weight;
  at::Tensor gh_chunk = converts ? at::empty({bl.chunk, a.hidden.size(1)},
                                             a.hidden.options().dtype(acc_dtype))
                                 : at::Tensor();
  const int64_t* target = a.target.const_data_ptr<int64_t>();
  const auto kernel = backward_kernel<T>();
  const T eps = static_cast<T>(a.label_smoothing);

  for (int64_t c0 = 0; c0 < n; c0 += bl.chunk) {
    const int64_t rows = std::min(bl.chunk, n - c0);
    const at::Tensor h = a.hidden.narrow(0, c0, rows);
    at::Tensor gh = converts ? gh_chunk.narrow(0, 0, rows) : grad_hidden.narrow(0, c0, rows);
    gh.zero_();
    for (int64_t v0 = 0; v0 < v; v0 += bl.block) {
      const int64_t cols = std::min(bl.block, v - v0);
      at::Tensor d = block_logits(a, buf, c0, rows, v0, cols);
      T* x = d.data_ptr<T>();
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t first, int64_t last) {
        kernel({x, cols, v0, target + c0, a.ignore_index, lse.const_data_ptr<T>() + c0,
                grad_loss.const_data_ptr<T>() + c0, eps / static_cast<T>(v), T(1) - eps,
                T(2) * static_cast<T>(a.z_loss), first, last});
      });
      if (grad_bias.numel() > 0) grad_bias.narrow(0, v0, cols).add_(d.sum(0));
      // The matmuls take the logit gradient in the input dtype, as autograd would.
      at::Tensor d_in = d;
      if (converts) {
        d_in = buf.mm.narrow(0, 0, rows * cols).view({rows, cols});
        d_in.copy_(d);
      }
      const at::Tensor w = a.weight.narrow(0, v0, cols);
      add_matmul(gh, d_in, w);
      add_matmul(gw.narrow(0, v0, cols), d_in.t(), h);
    }
    if (converts) grad_hidden.narrow(0, c0, rows).copy_(gh);
  }
  if (converts) grad_weight.copy_(gw);
}

std::tuple<at::Tensor, at::Tensor> fused_ce_fwd_cpu(const at::Tensor& hidden,
                                                    const at::Tensor& weight,
                                                    const at::Tensor& target,
                                                    const std::optional<at::Tensor>& bias,
                                                    int64_t ignore_index, double label_smoothing,
                                                    double z_loss) {
  const FusedCeArgs args{hidden, weight, target, bias, ignore_index, label_smoothing, z_loss};
  check_fused_ce_args(kForward, args);
  const auto opts = hidden.options().dtype(fused_ce_accumulation_dtype(hidden.scalar_type()));
  at::Tensor loss = at::zeros({hidden.size(0)}, opts);
  at::Tensor lse = at::zeros({hidden.size(0)}, opts);
  if (hidden.size(0) == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), kForward,
                             [&] { forward_impl<scalar_t>(args, loss, lse); });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_ce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& target, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, double z_loss) {
  const FusedCeArgs args{hidden, weight, target, bias, ignore_index, label_smoothing, z_loss};
  check_fused_ce_backward_args(kBackward, args, grad_loss, lse);
  const at::ScalarType acc = lse.scalar_type();
  at::Tensor grad_hidden = at::empty_like(hidden);  // every chunk is written
  at::Tensor grad_weight = at::zeros_like(weight);
  at::Tensor grad_bias_acc =
      at::zeros({bias.has_value() ? weight.size(0) : 0}, hidden.options().dtype(acc));
  if (hidden.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, kBackward, [&] {
      backward_impl<scalar_t>(args, grad_loss, lse, grad_hidden, grad_weight, grad_bias_acc);
    });
  }
  return {grad_hidden, grad_weight, grad_bias_acc.to(hidden.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) {
  m.impl("fused_linear_cross_entropy_fwd", &fused_ce_fwd_cpu);
  m.impl("fused_linear_cross_entropy_bwd", &fused_ce_bwd_cpu);
}

}  // namespace zero_ext
