// SwiGLU and bias + GeLU rows: at::vec SIMD body with a scalar tail that share one formula each
// (kernels/activation_math.h, templated on scalar or vector), fp32 math for 16-bit elements.
// Interface: kernels/cpu/activation.h.
//
// setup.py compiles this file once per instruction set with -DCPU_CAPABILITY=<ISA>; the entry
// points are named <kernel>_<ISA>.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "kernels/activation_math.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/isa_name.h"
#include "kernels/cpu/vec_lanes.h"

namespace zero_ext::kernels::cpu {
namespace {

// The elementary functions of kernels/activation_math.h's formulas for scalars and for at::vec
// vectors.
struct VecMath {
  static float exp(float x) { return std::exp(x); }
  static double exp(double x) { return std::exp(x); }
  static float tanh(float x) { return std::tanh(x); }
  static double tanh(double x) { return std::tanh(x); }
  static float erf(float x) { return std::erf(x); }
  static double erf(double x) { return std::erf(x); }
  template <typename S>
  static at::vec::Vectorized<S> exp(const at::vec::Vectorized<S>& x) { return x.exp(); }
  template <typename S>
  static at::vec::Vectorized<S> tanh(const at::vec::Vectorized<S>& x) { return x.tanh(); }
  template <typename S>
  static at::vec::Vectorized<S> erf(const at::vec::Vectorized<S>& x) { return x.erf(); }
};

template <typename T, bool kBackward, ActivationKind kind>
void rows(const ActivationRows& args) {
  using L = Lanes<T>;
  using A = typename L::A;
  using V = typename L::V;
  using E = ActivationElement<VecMath, A, kind>;
  constexpr int64_t kStep = L::kStep;
  const int64_t h = args.h;
  constexpr bool swiglu = kind == ActivationKind::kSwiGLU;
  const T* bias = swiglu ? nullptr : static_cast<const T*>(args.b);
  for (int64_t r = args.first_row; r < args.last_row; ++r) {
    const int64_t offset = r * h;
    const T* a = static_cast<const T*>(args.a) + offset;
    const T* up = swiglu ? static_cast<const T*>(args.b) + offset : nullptr;
    const T* dy = kBackward ? static_cast<const T*>(args.grad_out) + offset : nullptr;
    T* out = static_cast<T*>(args.out) + offset;
    T* gb = kBackward && swiglu ? static_cast<T*>(args.grad_b) + offset : nullptr;
    int64_t j = 0;
    for (; j + kStep <= h; j += kStep) {
      V a0, a1, b0(0), b1(0);
      L::load(a + j, a0, a1);
      if (swiglu) {
        L::load(up + j, b0, b1);
      } else if (bias != nullptr) {
        V c0, c1;
        L::load(bias + j, c0, c1);
        a0 += c0;
        a1 += c1;
        L::round(a0, a1);
      }
      if constexpr (kBackward) {
        V d0, d1, ga0, ga1, gb0, gb1;
        L::load(dy + j, d0, d1);
        E::backward(a0, b0, d0, &ga0, &gb0);
        E::backward(a1, b1, d1, &ga1, &gb1);
        L::store(out + j, ga0, ga1);
        if (gb != nullptr) L::store(gb + j, gb0, gb1);
      } else {
        L::store(out + j, E::forward(a0, b0), E::forward(a1, b1));
      }
    }
    for (; j < h; ++j) {
      A av = static_cast<A>(a[j]), bv = 0;
      if (swiglu) {
        bv = static_cast<A>(up[j]);
      } else if (bias != nullptr) {
        av = L::round(av + static_cast<A>(bias[j]));
      }
      if constexpr (kBackward) {
        A ga, gbv = 0;
        E::backward(av, bv, static_cast<A>(dy[j]), &ga, &gbv);
        out[j] = static_cast<T>(ga);
        if (gb != nullptr) gb[j] = static_cast<T>(gbv);
      } else {
        out[j] = static_cast<T>(E::forward(av, bv));
      }
    }
  }
}

template <typename T, bool kBackward>
void dispatch_kind(const ActivationRows& args) {
  switch (args.kind) {
    case ActivationKind::kSwiGLU:
      return rows<T, kBackward, ActivationKind::kSwiGLU>(args);
    case ActivationKind::kGeluTanh:
      return rows<T, kBackward, ActivationKind::kGeluTanh>(args);
    case ActivationKind::kGeluErf:
      return rows<T, kBackward, ActivationKind::kGeluErf>(args);
  }
}

template <bool kBackward>
void dispatch(const ActivationRows& args) {
  visit_element_type(args.type,
                     [&](auto t) { dispatch_kind<TypeOf<decltype(t)>, kBackward>(args); });
}

}  // namespace

void ZERO_EXT_ISA_FN(activation_forward_rows)(const ActivationRows& args) {
  dispatch<false>(args);
}

void ZERO_EXT_ISA_FN(activation_backward_rows)(const ActivationRows& args) {
  dispatch<true>(args);
}

}  // namespace zero_ext::kernels::cpu
