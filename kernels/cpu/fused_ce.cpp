// The per-ISA row math of the fused linear cross-entropy (declared in kernels/cpu/fused_ce.h):
// at::vec::Vectorized main loops with scalar tails, in the accumulation type T.
#include "kernels/cpu/fused_ce.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/isa_name.h"

namespace zero_ext::kernels::cpu {
namespace {

template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
}

// sum(exp(x - shift)) and sum(x) over one row, in one pass.
template <typename T>
void row_exp_sum(const T* x, int64_t n, T shift, T* exp_sum, T* sum) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vshift(shift);
  Vec acc_exp(T(0));
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec v = Vec::loadu(x + j);
    acc_exp = acc_exp + (v - vshift).exp();
    acc = acc + v;
  }
  T e = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc_exp);
  T s = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    e += std::exp(x[j] - shift);
    s += x[j];
  }
  *exp_sum = e;
  *sum = s;
}

template <typename T>
void forward_block(const CeForwardRows<T>& a, int64_t first, int64_t last) {
  for (int64_t r = first; r < last; ++r) {
    const int64_t t = a.target[r];
    if (t == a.ignore_index) continue;
    const T* x = a.logits + r * a.cols;
    const T new_max = std::max(a.max[r], row_max(x, a.cols));
    T exp_sum = 0;
    T sum = 0;
    row_exp_sum(x, a.cols, new_max, &exp_sum, &sum);
    // The first block rescales an empty sum: 0, never exp(-inf - -inf) = NaN.
    const T rescale =
        a.max[r] == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(a.max[r] - new_max);
    a.sumexp[r] = a.sumexp[r] * rescale + exp_sum;
    a.max[r] = new_max;
    a.logit_sum[r] += sum;
    if (t >= a.col0 && t < a.col0 + a.cols) a.target_logit[r] = x[t - a.col0];
  }
}

template <typename T>
void backward_block(const CeBackwardRows<T>& a, int64_t first, int64_t last) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t r = first; r < last; ++r) {
    T* x = a.logits + r * a.cols;
    const int64_t t = a.target[r];
    if (t == a.ignore_index) {  // zero, whatever grad[r] is (inf when a mean has no token)
      std::fill(x, x + a.cols, T(0));
      continue;
    }
    const T g = a.grad[r];
    const T lse = a.lse[r];
    // d/dx_j of lse - (1-e) x_t - e/V sum x + z lse^2 = p_j (1 + 2 z lse) - e/V - (1-e) [j == t].
    const T p_scale = g * (T(1) + a.two_z_loss * lse);
    const T offset = g * a.smooth_per_class;
    const Vec vlse(lse);
    const Vec vscale(p_scale);
    const Vec voffset(offset);
    int64_t j = 0;
    for (; j + Vec::size() <= a.cols; j += Vec::size()) {
      const Vec v = Vec::loadu(x + j);
      ((v - vlse).exp() * vscale - voffset).store(x + j);
    }
    for (; j < a.cols; ++j) x[j] = std::exp(x[j] - lse) * p_scale - offset;
    if (t >= a.col0 && t < a.col0 + a.cols) x[t - a.col0] -= g * a.target_weight;
  }
}

}  // namespace

void ZERO_EXT_ISA_FN(ce_forward_block_f32)(const CeForwardRows<float>& a, int64_t first,
                                           int64_t last) {
  forward_block(a, first, last);
}
void ZERO_EXT_ISA_FN(ce_forward_block_f64)(const CeForwardRows<double>& a, int64_t first,
                                           int64_t last) {
  forward_block(a, first, last);
}
void ZERO_EXT_ISA_FN(ce_backward_block_f32)(const CeBackwardRows<float>& a, int64_t first,
                                            int64_t last) {
  backward_block(a, first, last);
}
void ZERO_EXT_ISA_FN(ce_backward_block_f64)(const CeBackwardRows<double>& a, int64_t first,
                                            int64_t last) {
  backward_block(a, first, last);
}

}  // namespace zero_ext::kernels::cpu
