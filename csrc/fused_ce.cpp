// The driver declared in csrc/fused_ce.h. Extra memory: one block of kBlockElements logits (plus
// a copy in the input dtype for bf16), the [chunk] row state, and fp32 accumulators of the
// gradients for bf16 inputs.
#include "csrc/fused_ce.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/log.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <limits>

namespace zero_ext {
namespace {

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

// acc += a @ b, where acc is in the accumulation dtype and a, b may be 16-bit (their product is
// then rounded once per block before the fp32 sum).
void add_matmul(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
  } else {
    acc.add_(at::mm(a, b));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_ce_forward(const FusedCeArgs& a,
                                                    const CeRowKernels& kernels) {
  const int64_t n = a.hidden.size(0);
  const int64_t v = a.weight.size(0);
  const auto opts = a.hidden.options().dtype(fused_ce_accumulation_dtype(a.hidden.scalar_type()));
  at::Tensor loss = at::zeros({n}, opts);
  at::Tensor lse = at::zeros({n}, opts);
  if (n == 0) return {loss, lse};
  const Blocking bl = blocking_of(n, v);
  BlockBuffers buf(a.hidden, bl.chunk * bl.block);
  const double eps = a.label_smoothing;

  for (int64_t c0 = 0; c0 < n; c0 += bl.chunk) {
    const int64_t rows = std::min(bl.chunk, n - c0);
    const at::Tensor target = a.target.narrow(0, c0, rows);
    const CeRowState state{at::full({rows}, -std::numeric_limits<double>::infinity(), opts),
                           at::zeros({rows}, opts), at::zeros({rows}, opts),
                           at::zeros({rows}, opts)};
    for (int64_t v0 = 0; v0 < v; v0 += bl.block) {
      const int64_t cols = std::min(bl.block, v - v0);
      kernels.forward(block_logits(a, buf, c0, rows, v0, cols), v0, target, a.ignore_index,
                      state);
    }
    // Ignored tokens (max = -inf, sumexp = 0) keep loss and lse 0: where() selects, so their
    // -inf never reaches the result.
    const at::Tensor kept = target.ne(a.ignore_index);
    const at::Tensor l = state.max + at::log(state.sumexp);
    const at::Tensor token_loss = l - (1.0 - eps) * state.target_logit -
                                  (eps / static_cast<double>(v)) * state.logit_sum +
                                  a.z_loss * l * l;
    lse.narrow(0, c0, rows).copy_(at::where(kept, l, 0.0));
    loss.narrow(0, c0, rows).copy_(at::where(kept, token_loss, 0.0));
  }
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_ce_backward(const FusedCeArgs& a,
                                                                 const at::Tensor& grad_loss,
                                                                 const at::Tensor& lse,
                                                                 const CeRowKernels& kernels) {
  const int64_t n = a.hidden.size(0);
  const int64_t v = a.weight.size(0);
  const at::ScalarType acc_dtype = lse.scalar_type();
  at::Tensor grad_hidden = at::empty_like(a.hidden);  // every chunk is written
  at::Tensor grad_weight = at::zeros_like(a.weight);
  at::Tensor grad_bias =
      at::zeros({a.bias.has_value() ? v : 0}, a.hidden.options().dtype(acc_dtype));
  if (n == 0) return {grad_hidden, grad_weight, grad_bias.to(a.hidden.scalar_type())};
  const Blocking bl = blocking_of(n, v);
  BlockBuffers buf(a.hidden, bl.chunk * bl.block);
  const bool converts = buf.converts();
  // The gradients accumulate in the accumulation dtype: in place for fp32 / fp64, in fp32
  // buffers rounded once at the end for bf16.
  at::Tensor gw = converts ? at::zeros(a.weight.sizes(), a.weight.options().dtype(acc_dtype))
                           : grad_weight;
  at::Tensor gh_chunk = converts ? at::empty({bl.chunk, a.hidden.size(1)},
                                             a.hidden.options().dtype(acc_dtype))
                                 : at::Tensor();

  for (int64_t c0 = 0; c0 < n; c0 += bl.chunk) {
    const int64_t rows = std::min(bl.chunk, n - c0);
    const at::Tensor h = a.hidden.narrow(0, c0, rows);
    const at::Tensor target = a.target.narrow(0, c0, rows);
    const at::Tensor chunk_lse = lse.narrow(0, c0, rows);
    const at::Tensor chunk_grad = grad_loss.narrow(0, c0, rows);
    at::Tensor gh = converts ? gh_chunk.narrow(0, 0, rows) : grad_hidden.narrow(0, c0, rows);
    gh.zero_();
    for (int64_t v0 = 0; v0 < v; v0 += bl.block) {
      const int64_t cols = std::min(bl.block, v - v0);
      const at::Tensor d = block_logits(a, buf, c0, rows, v0, cols);
      kernels.backward(d, v0, target, a.ignore_index, chunk_lse, chunk_grad, a.label_smoothing,
                       a.z_loss, v);
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
  return {grad_hidden, grad_weight, grad_bias.to(a.hidden.scalar_type())};
}

}  // namespace zero_ext
