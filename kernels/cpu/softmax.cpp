// Scaled masked softmax + dropout rows: at::vec SIMD bodies with scalar tails over an fp32 (fp64
// for fp64) row buffer, the dropout mask drawn from Philox per element index. Interface:
// kernels/cpu/softmax.h; formulas: kernels/softmax_math.h.
//
// setup.py compiles this file once per instruction set with -DCPU_CAPABILITY=<ISA>; the entry
// points are named <kernel>_<ISA>.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/isa_name.h"
#include "kernels/cpu/softmax.h"
#include "kernels/cpu/vec_lanes.h"

namespace zero_ext::kernels::cpu {
namespace {

// Calls f(j0, j1, words) over consecutive spans [j0, j1) of row r's elements, words[j - j0]
// being element j's Philox word (kept when >= run.threshold): each span is one batch of
// kPhiloxGroups calls, four elements (consecutive global indices) per call.
constexpr int kPhiloxGroups = 16;

template <typename F>
void for_keep_spans(const SoftmaxRun& run, int64_t r, F f) {
  uint32_t words[4 * kPhiloxGroups];
  const uint64_t base = static_cast<uint64_t>(r * run.k);
  for (int64_t j0 = 0; j0 < run.k;) {
    const uint64_t first = (base + j0) & ~uint64_t{3};
    philox4x32_10_batch<kPhiloxGroups>(first >> 2, run.seed, words);
    const int64_t j1 = std::min<int64_t>(run.k, first + 4 * kPhiloxGroups - base);
    f(j0, j1, words + (base + j0 - first));
    j0 = j1;
  }
}

template <typename A>
A row_max(const A* z, int64_t n) {
  using V = at::vec::Vectorized<A>;
  A m = -std::numeric_limits<A>::infinity();
  int64_t j = 0;
  if (n >= V::size()) {
    V vm = V::loadu(z);
    for (j = V::size(); j + V::size() <= n; j += V::size()) {
      vm = at::vec::maximum(vm, V::loadu(z + j));
    }
    m = at::vec::vec_reduce_all<A>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, z[j]);
  return m;
}

// z[j] = exp(z[j] - m) for j < n; returns their sum.
template <typename A>
A exp_in_place(A* z, int64_t n, A m) {
  using V = at::vec::Vectorized<A>;
  const V vm(m);
  V acc(0);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V e = (V::loadu(z + j) - vm).exp_u20();
    e.store(z + j);
    acc += e;
  }
  A sum = at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    z[j] = std::exp(z[j] - m);
    sum += z[j];
  }
  return sum;
}

// z[0, n) = scale * x + mask over row r; elements masked by a bool mask become -inf.
template <typename T>
void load_logits(const SoftmaxRun& run, int64_t r, int64_t n, typename Lanes<T>::A* z) {
  using L = Lanes<T>;
  using A = typename L::A;
  using V = typename L::V;
  const T* x = static_cast<const T*>(run.x) + r * run.k;
  const T* add = run.mask_kind == SoftmaxMask::kAdditive
                     ? static_cast<const T*>(run.mask) + softmax_mask_offset(run, r)
                     : nullptr;
  const V vscale(static_cast<A>(run.scale));
  int64_t j = 0;
  for (; j + L::kStep <= n; j += L::kStep) {
    V a0, a1;
    L::load(x + j, a0, a1);
    a0 = a0 * vscale;
    a1 = a1 * vscale;
    L::add_at(add, j, a0, a1);
    a0.store(z + j);
    a1.store(z + j + V::size());
  }
  for (; j < n; ++j) {
    z[j] = static_cast<A>(x[j]) * static_cast<A>(run.scale);
    L::add_at(add, j, z[j]);
  }
  if (run.mask_kind == SoftmaxMask::kBool) {
    const bool* keep = static_cast<const bool*>(run.mask) + softmax_mask_offset(run, r);
    for (j = 0; j < n; ++j) {
      if (!keep[j]) z[j] = -std::numeric_limits<A>::infinity();
    }
  }
}

// dst[0, n) = round(z * c).
template <typename T>
void store_scaled(T* dst, const typename Lanes<T>::A* z, int64_t n, typename Lanes<T>::A c) {
  using L = Lanes<T>;
  using V = typename L::V;
  const V vc(c);
  int64_t j = 0;
  for (; j + L::kStep <= n; j += L::kStep) {
    L::store(dst + j, V::loadu(z + j) * vc, V::loadu(z + j + V::size()) * vc);
  }
  for (; j < n; ++j) dst[j] = static_cast<T>(z[j] * c);
}

template <typename T>
void forward_rows(const SoftmaxRun& run) {
  using L = Lanes<T>;
  using A = typename L::A;
  const int64_t k = run.k;
  const A keep_scale = L::round(static_cast<A>(run.keep_scale));
  std::vector<A> buffer(k);
  A* z = buffer.data();
  for (int64_t r = run.first_row; r < run.last_row; ++r) {
    T* out = static_cast<T*>(run.out) + r * k;
    T* probs = run.dropout ? static_cast<T*>(run.probs_out) + r * k : out;
    const int64_t n = softmax_row_extent(run, r);
    load_logits<T>(run, r, n, z);
    const A m = row_max(z, n);
    int64_t attended = 0;
    if (m != -std::numeric_limits<A>::infinity()) {
      store_scaled(probs, z, n, A(1) / exp_in_place(z, n, m));
      attended = n;
    }
    std::fill(probs + attended, probs + k, T(0));
    if (run.dropout) {
      for_keep_spans(run, r, [&](int64_t j0, int64_t j1, const uint32_t* words) {
        for (int64_t j = j0; j < j1; ++j) {
          const A kept = words[j - j0] >= run.threshold ? keep_scale : A(0);
          out[j] = static_cast<T>(static_cast<A>(probs[j]) * kept);
        }
      });
    }
  }
}

template <typename T>
void backward_rows(const SoftmaxRun& run) {
  using L = Lanes<T>;
  using A = typename L::A;
  using V = typename L::V;
  constexpr int64_t kStep = L::kStep;
  const int64_t k = run.k;
  const A keep_scale = L::round(static_cast<A>(run.keep_scale));
  const A scale = static_cast<A>(run.scale);
  std::vector<A> buffer(k);
  A* g = buffer.data();
  for (int64_t r = run.first_row; r < run.last_row; ++r) {
    const T* dy = static_cast<const T*>(run.grad_out) + r * k;
    const T* s = static_cast<const T*>(run.probs) + r * k;
    T* dx = static_cast<T*>(run.out) + r * k;
    // g = the gradient at the softmax output, through the dropout.
    if (run.dropout) {
      for_keep_spans(run, r, [&](int64_t j0, int64_t j1, const uint32_t* words) {
        for (int64_t j = j0; j < j1; ++j) {
          const A kept = words[j - j0] >= run.threshold ? keep_scale : A(0);
          g[j] = L::round(static_cast<A>(dy[j]) * kept);
        }
      });
    } else {
      for (int64_t j = 0; j < k; ++j) g[j] = static_cast<A>(dy[j]);
    }
    const A dot = L::row_sum(
        k,
        [&](int64_t j, V& t0, V& t1) {
          L::load(s + j, t0, t1);
          t0 = V::loadu(g + j) * t0;
          t1 = V::loadu(g + j + V::size()) * t1;
        },
        [&](int64_t j) { return g[j] * static_cast<A>(s[j]); });
    const V vdot(dot), vscale(scale);
    int64_t j = 0;
    for (; j + kStep <= k; j += kStep) {
      V s0, s1;
      L::load(s + j, s0, s1);
      L::store(dx + j, vscale * (s0 * (V::loadu(g + j) - vdot)),
               vscale * (s1 * (V::loadu(g + j + V::size()) - vdot)));
    }
    for (; j < k; ++j) dx[j] = static_cast<T>(scale * (static_cast<A>(s[j]) * (g[j] - dot)));
  }
}

}  // namespace

void ZERO_EXT_ISA_FN(softmax_forward_rows)(const SoftmaxRun& run) {
  visit_element_type(run.type, [&](auto t) { forward_rows<TypeOf<decltype(t)>>(run); });
}

void ZERO_EXT_ISA_FN(softmax_backward_rows)(const SoftmaxRun& run) {
  visit_element_type(run.type, [&](auto t) { backward_rows<TypeOf<decltype(t)>>(run); });
}

}  // namespace zero_ext::kernels::cpu
