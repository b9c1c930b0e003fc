// The arguments of the scaled masked softmax + dropout kernels as every backend receives them
// (raw pointers, no torch), and the host-side dropout constants.
//
// Forward, per row of a [rows, k] input x (rows = batch x heads x q, row r being query
// q_index = r % q of head (r / q) % heads of batch r / (q heads)):
//   z_j = scale * x_j + mask_j      (bool mask: 0 where true, -inf where false; causal: -inf for
//                                    j > q_index, the upper triangle, as SDPA's is_causal)
//   s_j = exp(z_j - max z) / sum_i exp(z_i - max z), or 0 for the whole row when every z_j is
//         -inf (torch gives NaN there; zeros keep a fully masked row, e.g. padding, finite)
//   out_j = keep_j ? round(s_j) * keep_scale : 0   with keep_j from kernels/philox.h
// Backward, with the saved s (rounded) and the regenerated keep-mask:
//   G_j = keep_j ? round(dy_j * keep_scale) : 0,  grad_x_j = scale * s_j * (G_j - sum_i G_i s_i)
// All arithmetic in fp32 (fp64 for fp64 elements); keep_scale = 1 / (1 - p) rounded to the
// element type, as eager's dropout multiplies by a noise tensor of the input's dtype.
#pragma once

#include <cstdint>

#include "kernels/cpu/norm.h"  // NormType: the element types
#include "kernels/philox.h"

namespace zero_ext::kernels {

enum class SoftmaxMask : int32_t {
  kNone = 0,
  kBool = 1,      // true = attend, as SDPA's boolean attn_mask
  kAdditive = 2,  // added to scale * x, in x's element type
};

struct SoftmaxRun {
  const void* x;         // forward: [rows, k]
  const void* mask;      // element (b, h, q_index, j) at b m0 + h m1 + q_index m2 + j
  SoftmaxMask mask_kind;
  int64_t mask_stride[3];
  const void* probs;     // backward: the forward's softmax s
  const void* grad_out;  // backward: dy, [rows, k]
  void* out;             // forward: out (s itself without dropout); backward: grad_x
  void* probs_out;       // forward with dropout: s (the backward's input); else nullptr
  cpu::NormType type;
  int64_t rows;
  int64_t k;      // keys: the softmax dimension
  int64_t q;      // queries per head (x's second-to-last dimension, 1 for 1-D x)
  int64_t heads;  // x's third-to-last dimension (1 below 3-D)
  double scale;
  bool causal;
  bool dropout;          // false: keep everything (p = 0 or not training)
  uint64_t seed;         // Philox key
  uint32_t threshold;    // dropout_threshold(p)
  double keep_scale;     // 1 / (1 - p), 0 for p = 1 (everything dropped)
  int64_t first_row;     // CPU: the range of rows of one call
  int64_t last_row;
};

// keep_scale of dropout probability p in [0, 1].
inline double dropout_keep_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

// The offset of row r's mask row.
ZERO_EXT_HOST_DEVICE int64_t softmax_mask_offset(const SoftmaxRun& run, int64_t r) {
  const int64_t q_index = r % run.q, head = (r / run.q) % run.heads;
  const int64_t batch = r / (run.q * run.heads);
  return batch * run.mask_stride[0] + head * run.mask_stride[1] + q_index * run.mask_stride[2];
}

// Elements [0, n) of row r can be attended; causal masks the rest.
ZERO_EXT_HOST_DEVICE int64_t softmax_row_extent(const SoftmaxRun& run, int64_t r) {
  if (!run.causal) return run.k;
  const int64_t n = r % run.q + 1;
  return n < run.k ? n : run.k;
}

}  // namespace zero_ext::kernels
