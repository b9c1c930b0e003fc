// The driver declared in csrc/fused_ce.h. Extra memory: the logits of one block (plus a copy in
// the input dtype for bf16), the [chunk] row state, and accumulators in the accumulation dtype
// for bf16 gradients.
#include "csrc/fused_ce.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/log.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <limits>

namespace zero_ext {
namespace {

// The separate forward and backward: logits per block, 8 MiB of fp32, small next to the hidden
// states of any real batch, large enough that each matmul runs near peak. Tokens per chunk: at
// most kMaxChunk, so a block spans at least kBlockElements / kMaxChunk vocabulary entries.
constexpr int64_t kBlockElements = int64_t{1} << 21;
constexpr int64_t kMaxChunk = 1024;
// The one-pass gradients take a chunk's whole logit rows (one matmul instead of two sweeps) only
// when the workspace holds at least this many rows: below it each matmul streams the whole
// weight for too few tokens (2 CPU cores, N=1024 V=32000 H=512: chunks of 65 rows ran 2.7x
// slower than 262, and 1.7x slower than the two sweeps).
constexpr int64_t kMinWholeRows = 256;

struct Blocking {
  int64_t chunk;  // tokens per chunk
  int64_t block;  // vocabulary entries per block; v: whole rows, one logits matmul per chunk
};

// Chunks of up to kMaxChunk tokens against blocks of `elements / chunk` vocabulary entries, a
// multiple of 16 when the vocabulary takes several: each block's slices of the weight and the
// bias then start 16-byte aligned (cuBLASLt's bias epilogue may assume it of the bias; aligned
// matmul operands are faster anyway).
Blocking swept_blocking(int64_t n, int64_t v, int64_t elements) {
  const int64_t chunk = std::max<int64_t>(1, std::min(n, kMaxChunk));
  int64_t block = std::max<int64_t>(1, std::min(v, elements / chunk));
  if (block < v && block >= 16) block = block / 16 * 16;
  return {chunk, block};
}

// Whole logit rows when the workspace holds enough of them, else swept_blocking.
Blocking gradient_blocking(int64_t n, int64_t v, int64_t elements) {
  const int64_t rows = elements / v;
  if (rows >= 1 && rows >= std::min(n, kMinWholeRows)) return {std::min(n, rows), v};
  return swept_blocking(n, v, elements);
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

  // The logits [rows, cols] of acc again in the input dtype, in mm (acc itself without a copy).
  at::Tensor input_dtype(const at::Tensor& acc_block) {
    if (!converts()) return acc_block;
    at::Tensor out = mm.narrow(0, 0, acc_block.numel()).view(acc_block.sizes());
    out.copy_(acc_block);
    return out;
  }
};

// Bytes of workspace per logit: the accumulation dtype, plus the input dtype's copy if it differs.
int64_t bytes_per_logit(at::ScalarType input) {
  const at::ScalarType acc = fused_ce_accumulation_dtype(input);
  return static_cast<int64_t>(c10::elementSize(acc)) +
         (acc == input ? 0 : static_cast<int64_t>(c10::elementSize(input)));
}

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

// Tokens [c0, c0 + rows): folds their logits, block by block, into an online log-sum-exp and
// writes their loss and lse ([rows] views). Returns the last block's logits, which are the whole
// rows when one block spans the vocabulary.
at::Tensor chunk_loss(const FusedCeArgs& a, BlockBuffers& buf, const Blocking& bl, int64_t c0,
                      int64_t rows, const CeRowKernels& kernels, at::Tensor loss,
                      at::Tensor lse) {
  const int64_t v = a.weight.size(0);
  const auto opts = lse.options();
  const at::Tensor target = a.target.narrow(0, c0, rows);
  const CeRowState state{at::full({rows}, -std::numeric_limits<double>::infinity(), opts),
                         at::zeros({rows}, opts), at::zeros({rows}, opts),
                         at::zeros({rows}, opts)};
  at::Tensor logits;
  for (int64_t v0 = 0; v0 < v; v0 += bl.block) {
    const int64_t cols = std::min(bl.block, v - v0);
    logits = block_logits(a, buf, c0, rows, v0, cols);
    kernels.forward(logits, v0, target, a.ignore_index, state);
  }
  // Ignored tokens (max = -inf, sumexp = 0) keep loss and lse 0: where() selects, so their -inf
  // never reaches the result.
  const double eps = a.label_smoothing;
  const at::Tensor kept = target.ne(a.ignore_index);
  const at::Tensor l = state.max + at::log(state.sumexp);
  const at::Tensor token_loss = l - (1.0 - eps) * state.target_logit -
                                (eps / static_cast<double>(v)) * state.logit_sum +
                                a.z_loss * l * l;
  lse.copy_(at::where(kept, l, 0.0));
  loss.copy_(at::where(kept, token_loss, 0.0));
  return logits;
}

// Where the gradients go, each undefined when not computed: hidden rows are written once per
// chunk (through hidden_acc, [chunk, H] in the accumulation dtype, when several blocks sum into
// them in a 16-bit dtype); weight_acc ([V, H]) and bias_acc ([V], accumulation dtype) sum over
// the chunks.
struct CeGradients {
  at::Tensor hidden;
  at::Tensor hidden_acc;
  at::Tensor weight_acc;
  at::Tensor bias_acc;
};

// Tokens [c0, c0 + rows) with their lse and grad ([rows] views): turns each block of logits into
// d loss / d logits and adds its matmuls into g. `logits`, when defined, holds the chunk's whole
// rows (the caller's chunk_loss just computed them), so nothing is recomputed and the hidden
// rows come from one matmul over the whole vocabulary.
void chunk_gradients(const FusedCeArgs& a, BlockBuffers& buf, const Blocking& bl, int64_t c0,
                     int64_t rows, const at::Tensor& lse, const at::Tensor& grad,
                     const CeRowKernels& kernels, const CeGradients& g, const at::Tensor& logits) {
  const int64_t v = a.weight.size(0);
  const bool whole = logits.defined();
  const at::Tensor h = a.hidden.narrow(0, c0, rows);
  const at::Tensor target = a.target.narrow(0, c0, rows);
  at::Tensor gh;
  if (g.hidden.defined()) {
    gh = whole || !g.hidden_acc.defined() ? g.hidden.narrow(0, c0, rows)
                                          : g.hidden_acc.narrow(0, 0, rows);
    if (!whole) gh.zero_();
  }
  for (int64_t v0 = 0; v0 < v; v0 += bl.block) {
    const int64_t cols = std::min(bl.block, v - v0);
    const at::Tensor d = whole ? logits : block_logits(a, buf, c0, rows, v0, cols);
    kernels.backward(d, v0, target, a.ignore_index, lse, grad, a.label_smoothing, a.z_loss, v);
    if (g.bias_acc.defined()) g.bias_acc.narrow(0, v0, cols).add_(d.sum(0));
    // The matmuls take the logit gradient in the input dtype, as autograd would.
    const at::Tensor d_in = buf.input_dtype(d);
    const at::Tensor w = a.weight.narrow(0, v0, cols);
    if (gh.defined()) {
      if (whole) {
        at::mm_out(gh, d_in, w);
      } else {
        add_matmul(gh, d_in, w);
      }
    }
    if (g.weight_acc.defined()) add_matmul(g.weight_acc.narrow(0, v0, cols), d_in.t(), h);
  }
  if (gh.defined() && !whole && g.hidden_acc.defined()) g.hidden.narrow(0, c0, rows).copy_(gh);
}

// hidden_acc of CeGradients: needed when 16-bit hidden rows sum over several blocks.
at::Tensor hidden_accumulator(const FusedCeArgs& a, const Blocking& bl, bool converts) {
  if (!converts || bl.block >= a.weight.size(0)) return {};
  return at::empty({bl.chunk, a.hidden.size(1)},
                   a.hidden.options().dtype(fused_ce_accumulation_dtype(a.hidden.scalar_type())));
}

// An accumulator in the accumulation dtype rounded back to the input dtype (a no-op for fp32).
at::Tensor in_input_dtype(const at::Tensor& acc, const FusedCeArgs& a) {
  return acc.to(a.hidden.scalar_type());
}

// bias_acc of CeGradients: [V] zeros with a bias, else undefined.
at::Tensor bias_accumulator(const FusedCeArgs& a, const at::TensorOptions& acc_opts) {
  return a.bias.has_value() ? at::zeros({a.weight.size(0)}, acc_opts) : at::Tensor();
}

// grad_bias as the ops return it: in the input dtype, [0] without a bias.
at::Tensor bias_result(const at::Tensor& bias_acc, const FusedCeArgs& a) {
  return bias_acc.defined() ? in_input_dtype(bias_acc, a) : at::empty({0}, a.hidden.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_ce_forward(const FusedCeArgs& a,
                                                    const CeRowKernels& kernels) {
  const int64_t n = a.hidden.size(0);
  const auto opts = a.hidden.options().dtype(fused_ce_accumulation_dtype(a.hidden.scalar_type()));
  at::Tensor loss = at::zeros({n}, opts);
  at::Tensor lse = at::zeros({n}, opts);
  if (n == 0) return {loss, lse};
  const Blocking bl = swept_blocking(n, a.weight.size(0), kBlockElements);
  BlockBuffers buf(a.hidden, bl.chunk * bl.block);
  for (int64_t c0 = 0; c0 < n; c0 += bl.chunk) {
    const int64_t rows = std::min(bl.chunk, n - c0);
    chunk_loss(a, buf, bl, c0, rows, kernels, loss.narrow(0, c0, rows), lse.narrow(0, c0, rows));
  }
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_ce_backward(const FusedCeArgs& a,
                                                                 const at::Tensor& grad_loss,
                                                                 const at::Tensor& lse,
                                                                 const CeRowKernels& kernels) {
  const int64_t n = a.hidden.size(0);
  const int64_t v = a.weight.size(0);
  const auto acc_opts = a.hidden.options().dtype(lse.scalar_type());
  const Blocking bl = swept_blocking(n, v, kBlockElements);
  BlockBuffers buf(a.hidden, n == 0 ? 0 : bl.chunk * bl.block);
  // The weight gradient accumulates in the accumulation dtype: in place for fp32 / fp64, in an
  // fp32 buffer rounded once at the end for bf16.
  const CeGradients g{at::empty_like(a.hidden), hidden_accumulator(a, bl, buf.converts()),
                      at::zeros(a.weight.sizes(), acc_opts), bias_accumulator(a, acc_opts)};
  for (int64_t c0 = 0; c0 < n; c0 += bl.chunk) {
    const int64_t rows = std::min(bl.chunk, n - c0);
    chunk_gradients(a, buf, bl, c0, rows, lse.narrow(0, c0, rows), grad_loss.narrow(0, c0, rows),
                    kernels, g, at::Tensor());
  }
  return {g.hidden, in_input_dtype(g.weight_acc, a), bias_result(g.bias_acc, a)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_ce_forward_with_grads(
    const FusedCeArgs& a, const CeGradOptions& o, const CeRowKernels& kernels) {
  const int64_t n = a.hidden.size(0);
  const int64_t v = a.weight.size(0);
  const at::ScalarType input = a.hidden.scalar_type();
  const at::ScalarType acc = fused_ce_accumulation_dtype(input);
  const auto opts = a.hidden.options().dtype(acc);
  const int64_t elements = std::max<int64_t>(1, o.workspace_bytes / bytes_per_logit(input));
  const Blocking bl = gradient_blocking(n, v, elements);
  BlockBuffers buf(a.hidden, n == 0 ? 0 : bl.chunk * bl.block);
  // The weight gradient sums over the chunks in fp32 for bf16 weights when that [V, H] buffer
  // fits the workspace; beyond it (a real vocabulary on a GPU) it sums in the weight's dtype,
  // each chunk's matmul accumulating in fp32 and rounding once, as the memory bound requires.
  const int64_t weight_acc_bytes =
      v * a.weight.size(1) * static_cast<int64_t>(c10::elementSize(acc));
  const bool weight_in_acc = buf.converts() && weight_acc_bytes <= o.workspace_bytes;
  const CeGradients g{
      o.hidden_grad ? at::empty_like(a.hidden) : at::Tensor(),
      o.hidden_grad ? hidden_accumulator(a, bl, buf.converts()) : at::Tensor(),
      o.weight_grad ? at::zeros(a.weight.sizes(), weight_in_acc ? opts : a.weight.options())
                    : at::Tensor(),
      bias_accumulator(a, opts)};
  const at::Tensor kept = a.target.ne(a.ignore_index).sum().to(acc);
  // d loss / d loss_i: 1 for a sum; 1 / kept for a mean (inf with none kept, on ignored rows
  // only, which the row kernel zeroes whatever their grad).
  const at::Tensor grad = o.mean ? at::reciprocal(kept).expand({n}).contiguous()
                                 : at::ones({n}, opts);
  at::Tensor token_loss = at::zeros({n}, opts);
  at::Tensor lse = at::zeros({n}, opts);
  for (int64_t c0 = 0; c0 < n; c0 += bl.chunk) {
    const int64_t rows = std::min(bl.chunk, n - c0);
    const at::Tensor chunk_lse = lse.narrow(0, c0, rows);
    const at::Tensor logits = chunk_loss(a, buf, bl, c0, rows, kernels,
                                         token_loss.narrow(0, c0, rows), chunk_lse);
    chunk_gradients(a, buf, bl, c0, rows, chunk_lse, grad.narrow(0, c0, rows), kernels, g,
                    bl.block >= v ? logits : at::Tensor());
  }
  at::Tensor loss = token_loss.sum();
  if (o.mean) loss = loss / kept;  // 0 / 0 = NaN with every token ignored, as torch gives
  const auto none = a.hidden.options();
  return {loss, o.hidden_grad ? g.hidden : at::empty({0}, none),
          o.weight_grad ? in_input_dtype(g.weight_acc, a) : at::empty({0}, none),
          bias_result(g.bias_acc, a)};
}

}  // namespace zero_ext
