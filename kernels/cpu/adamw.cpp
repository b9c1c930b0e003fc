// AdamW over one span: at::vec SIMD body with a scalar tail, fp32 math for 16-bit inputs.
//
// setup.py compiles this file once per instruction set with -DCPU_CAPABILITY=<ISA> (and that ISA's
// -m flags); at::vec puts its types in the matching inline namespace, and the entry point is
// named adamw_span_<ISA>, so the variants coexist in one library.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "kernels/cpu/adamw.h"
#include "kernels/cpu/isa_name.h"

namespace zero_ext::kernels::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;

struct ScalarSqrt {
  float operator()(float x) const { return std::sqrt(x); }
};
struct VecSqrt {
  Vec operator()(const Vec& x) const { return x.sqrt(); }
};

// Loads 2 * Vec::size() gradient elements as two fp32 vectors.
template <typename Grad>
inline void load_grad(const Grad* g, Vec& lo, Vec& hi) {
  if constexpr (std::is_same_v<Grad, float>) {
    lo = Vec::loadu(g);
    hi = Vec::loadu(g + Vec::size());
  } else {
    at::vec::load_to_float<Grad>(g, lo, hi);
  }
}

// Grad: float, c10::BFloat16 or c10::Half. Copy: void (no 16-bit copy), c10::BFloat16 or c10::Half.
template <typename Grad, typename Copy>
void adamw_span_typed(const AdamWSpan& span, const AdamWCoefficients<float>& c) {
  float* __restrict__ p = span.param;
  float* __restrict__ m = span.exp_avg;
  float* __restrict__ v = span.exp_avg_sq;
  // Not __restrict__: offload stages the new 16-bit weights in the gradient's own host buffer
  // (same dtype), so param_16bit may alias g. Each vector of g is loaded before the same
  // positions of the copy are stored, which the loop order keeps.
  const Grad* g = static_cast<const Grad*>(span.grad);
  const int64_t n = span.numel;
  const AdamWCoefficients<Vec> cv = c.template as<Vec>();
  constexpr int64_t kWidth = Vec::size();

  int64_t i = 0;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    Vec g0, g1;
    load_grad(g + i, g0, g1);
    Vec p0 = Vec::loadu(p + i), p1 = Vec::loadu(p + i + kWidth);
    Vec m0 = Vec::loadu(m + i), m1 = Vec::loadu(m + i + kWidth);
    Vec v0 = Vec::loadu(v + i), v1 = Vec::loadu(v + i + kWidth);
    adamw_update(p0, m0, v0, g0, cv, VecSqrt{});
    adamw_update(p1, m1, v1, g1, cv, VecSqrt{});
    p0.store(p + i);
    p1.store(p + i + kWidth);
    m0.store(m + i);
    m1.store(m + i + kWidth);
    v0.store(v + i);
    v1.store(v + i + kWidth);
    if constexpr (!std::is_void_v<Copy>) {
      at::vec::convert_from_float<Copy>(p0, p1).store(static_cast<Copy*>(span.param_16bit) + i);
    }
  }
  for (; i < n; ++i) {
    adamw_update(p[i], m[i], v[i], static_cast<float>(g[i]), c, ScalarSqrt{});
    if constexpr (!std::is_void_v<Copy>) {
      static_cast<Copy*>(span.param_16bit)[i] = static_cast<Copy>(p[i]);
    }
  }
}

template <typename Grad>
void adamw_span_for_grad(const AdamWSpan& span, const AdamWCoefficients<float>& c,
                         ElementType copy_type) {
  if (span.param_16bit == nullptr) {
    adamw_span_typed<Grad, void>(span, c);
  } else if (copy_type == ElementType::kBFloat16) {
    adamw_span_typed<Grad, c10::BFloat16>(span, c);
  } else {
    adamw_span_typed<Grad, c10::Half>(span, c);
  }
}

}  // namespace

void ZERO_EXT_ISA_FN(adamw_span)(const AdamWSpan& span, const AdamWCoefficients<float>& c,
                                 ElementType grad_type, ElementType copy_type) {
  switch (grad_type) {
    case ElementType::kFloat32:
      return adamw_span_for_grad<float>(span, c, copy_type);
    case ElementType::kBFloat16:
      return adamw_span_for_grad<c10::BFloat16>(span, c, copy_type);
    case ElementType::kFloat16:
      return adamw_span_for_grad<c10::Half>(span, c, copy_type);
  }
}

}  // namespace zero_ext::kernels::cpu
