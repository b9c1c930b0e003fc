// RMSNorm / LayerNorm rows and parameter-gradient columns: at::vec SIMD body with a scalar tail,
// fp32 math for 16-bit elements (fp64 for fp64). Interface and formulas: kernels/cpu/norm.h.
//
// setup.py compiles this file once per instruction set with -DCPU_CAPABILITY=<ISA>; the entry
// points are named <kernel>_<ISA>, so the variants coexist in one library.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>

#include "kernels/cpu/isa_name.h"
#include "kernels/cpu/norm.h"
#include "kernels/cpu/vec_lanes.h"

namespace zero_ext::kernels::cpu {
namespace {

// The three kernels for element type T, on T's lanes (kernels/cpu/vec_lanes.h).
template <typename T>
struct NormKernels {
  using L = Lanes<T>;
  using A = typename L::A;
  using V = typename L::V;
  static constexpr int64_t kStep = L::kStep;

  static void forward_rows(const NormForwardRows& args);
  static void backward_rows(const NormBackwardRows& args);
  static void param_grad_columns(const NormParamGradColumns& args);

  // out[j, j + kStep) = (o0, o1), plus add's lanes at j when add is given (the bias; the residual
  // branch's gradient): one rounding to T after the sum. The scalar tail's: out[j] = o (+ add[j]).
  static void store_plus(T* out, const T* add, int64_t j, V o0, V o1) {
    L::add_at(add, j, o0, o1);
    L::store(out + j, o0, o1);
  }
  static void store_plus(T* out, const T* add, int64_t j, A o) {
    L::add_at(add, j, o);
    out[j] = static_cast<T>(o);
  }

  // Row r's statistics as the forward stored them (mean 0 for RMSNorm), for the backward kernels.
  template <typename Args>
  static A row_mean(const Args& args, int64_t r) {
    return args.rms ? A(0) : static_cast<const A*>(args.mean)[r];
  }
  template <typename Args>
  static A row_rstd(const Args& args, int64_t r) {
    return static_cast<const A*>(args.rstd)[r];
  }
};

template <typename T>
void NormKernels<T>::forward_rows(const NormForwardRows& args) {
  const int64_t h = args.h;
  const T* w = static_cast<const T*>(args.weight);
  const T* b = static_cast<const T*>(args.bias);
  for (int64_t r = args.first_row; r < args.last_row; ++r) {
    const T* v = static_cast<const T*>(args.x) + r * h;
    if (args.residual != nullptr) {
      // The sum is rounded to T before the statistics, as the eager x + residual would be.
      const T* x = v;
      const T* res = static_cast<const T*>(args.residual) + r * h;
      T* s = static_cast<T*>(args.summed) + r * h;
      int64_t j = 0;
      for (; j + kStep <= h; j += kStep) {
        V x0, x1, r0, r1;
        L::load(x + j, x0, x1);
        L::load(res + j, r0, r1);
        L::store(s + j, x0 + r0, x1 + r1);
      }
      for (; j < h; ++j) s[j] = static_cast<T>(static_cast<A>(x[j]) + static_cast<A>(res[j]));
      v = s;
    }

    A mean = 0;
    if (!args.rms) {
      const A total = L::row_sum(
          h, [&](int64_t j, V& t0, V& t1) { L::load(v + j, t0, t1); },
          [&](int64_t j) { return static_cast<A>(v[j]); });
      mean = total / static_cast<A>(h);
    }
    // Two passes (mean, then centred squares): no cancellation for rows far from zero.
    const V vmean(mean);
    const A squares = L::row_sum(
        h,
        [&](int64_t j, V& t0, V& t1) {
          V v0, v1;
          L::load(v + j, v0, v1);
          const V d0 = v0 - vmean, d1 = v1 - vmean;
          t0 = d0 * d0;
          t1 = d1 * d1;
        },
        [&](int64_t j) {
          const A d = static_cast<A>(v[j]) - mean;
          return d * d;
        });
    const A rstd = A(1) / std::sqrt(squares / static_cast<A>(h) + static_cast<A>(args.eps));

    T* out = static_cast<T*>(args.out) + r * h;
    const V vrstd(rstd);
    int64_t j = 0;
    for (; j + kStep <= h; j += kStep) {
      V v0, v1, w0, w1;
      L::load(v + j, v0, v1);
      L::load(w + j, w0, w1);
      store_plus(out, b, j, (v0 - vmean) * vrstd * w0, (v1 - vmean) * vrstd * w1);
    }
    for (; j < h; ++j) {
      store_plus(out, b, j, (static_cast<A>(v[j]) - mean) * rstd * static_cast<A>(w[j]));
    }
    static_cast<A*>(args.rstd)[r] = rstd;
    if (!args.rms) static_cast<A*>(args.mean)[r] = mean;
  }
}

template <typename T>
void NormKernels<T>::backward_rows(const NormBackwardRows& args) {
  const int64_t h = args.h;
  const T* w = static_cast<const T*>(args.weight);
  for (int64_t r = args.first_row; r < args.last_row; ++r) {
    const T* dy = static_cast<const T*>(args.grad_out) + r * h;
    const T* v = static_cast<const T*>(args.input) + r * h;
    const A mean = row_mean(args, r), rstd = row_rstd(args, r);
    const V vmean(mean), vrstd(rstd);

    // xhat and g are recomputed in the second pass rather than kept: one row of each would be
    // as large as the row itself.
    V sg0(0), sg1(0), sgx0(0), sgx1(0);
    int64_t j = 0;
    for (; j + kStep <= h; j += kStep) {
      V dy0, dy1, v0, v1, w0, w1;
      L::load(dy + j, dy0, dy1);
      L::load(v + j, v0, v1);
      L::load(w + j, w0, w1);
      const V g0 = dy0 * w0, g1 = dy1 * w1;
      sg0 += g0;
      sg1 += g1;
      sgx0 += g0 * ((v0 - vmean) * vrstd);
      sgx1 += g1 * ((v1 - vmean) * vrstd);
    }
    A sum_g = L::sum(sg0 + sg1);
    A sum_gx = L::sum(sgx0 + sgx1);
    for (; j < h; ++j) {
      const A g = static_cast<A>(dy[j]) * static_cast<A>(w[j]);
      sum_g += g;
      sum_gx += g * ((static_cast<A>(v[j]) - mean) * rstd);
    }
    const A mean_g = args.rms ? A(0) : sum_g / static_cast<A>(h);
    const A mean_gx = sum_gx / static_cast<A>(h);
    const V vmean_g(mean_g), vmean_gx(mean_gx);

    const T* ds = static_cast<const T*>(args.grad_summed);
    if (ds != nullptr) ds += r * h;
    T* dx = static_cast<T*>(args.grad_input) + r * h;
    for (j = 0; j + kStep <= h; j += kStep) {
      V dy0, dy1, v0, v1, w0, w1;
      L::load(dy + j, dy0, dy1);
      L::load(v + j, v0, v1);
      L::load(w + j, w0, w1);
      store_plus(dx, ds, j, (dy0 * w0 - vmean_g - (v0 - vmean) * vrstd * vmean_gx) * vrstd,
                 (dy1 * w1 - vmean_g - (v1 - vmean) * vrstd * vmean_gx) * vrstd);
    }
    for (; j < h; ++j) {
      const A g = static_cast<A>(dy[j]) * static_cast<A>(w[j]);
      store_plus(dx, ds, j, (g - mean_g - (static_cast<A>(v[j]) - mean) * rstd * mean_gx) * rstd);
    }
  }
}

template <typename T>
void NormKernels<T>::param_grad_columns(const NormParamGradColumns& args) {
  constexpr int64_t kWidth = V::size();
  const int64_t h = args.h;
  const int64_t first = args.first_col, last = args.last_col;
  A* gw = static_cast<A*>(args.grad_weight);
  A* gb = static_cast<A*>(args.grad_bias);
  for (int64_t j = first; j < last; ++j) {
    gw[j] = 0;
    if (gb != nullptr) gb[j] = 0;
  }
  for (int64_t r = 0; r < args.rows; ++r) {
    const T* dy = static_cast<const T*>(args.grad_out) + r * h;
    const T* v = static_cast<const T*>(args.input) + r * h;
    const A mean = row_mean(args, r), rstd = row_rstd(args, r);
    const V vmean(mean), vrstd(rstd);
    int64_t j = first;
    for (; j + kStep <= last; j += kStep) {
      V dy0, dy1, v0, v1;
      L::load(dy + j, dy0, dy1);
      L::load(v + j, v0, v1);
      (V::loadu(gw + j) + dy0 * ((v0 - vmean) * vrstd)).store(gw + j);
      (V::loadu(gw + j + kWidth) + dy1 * ((v1 - vmean) * vrstd)).store(gw + j + kWidth);
      if (gb != nullptr) {
        (V::loadu(gb + j) + dy0).store(gb + j);
        (V::loadu(gb + j + kWidth) + dy1).store(gb + j + kWidth);
      }
    }
    for (; j < last; ++j) {
      const A d = static_cast<A>(dy[j]);
      gw[j] += d * ((static_cast<A>(v[j]) - mean) * rstd);
      if (gb != nullptr) gb[j] += d;
    }
  }
}

}  // namespace

void ZERO_EXT_ISA_FN(norm_forward_rows)(const NormForwardRows& args) {
  visit_element_type(args.type,
                     [&](auto t) { NormKernels<TypeOf<decltype(t)>>::forward_rows(args); });
}

void ZERO_EXT_ISA_FN(norm_backward_rows)(const NormBackwardRows& args) {
  visit_element_type(args.type,
                     [&](auto t) { NormKernels<TypeOf<decltype(t)>>::backward_rows(args); });
}

void ZERO_EXT_ISA_FN(norm_param_grad_columns)(const NormParamGradColumns& args) {
  visit_element_type(args.type,
                     [&](auto t) { NormKernels<TypeOf<decltype(t)>>::param_grad_columns(args); });
}

}  // namespace zero_ext::kernels::cpu
