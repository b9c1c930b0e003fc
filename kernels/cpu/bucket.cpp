// Cast / scale / accumulate copy over one span: at::vec SIMD body with a scalar tail, fp32 math
// for 16-bit elements.
//
// setup.py compiles this file once per instruction set with -DCPU_CAPABILITY=<ISA> (and that ISA's
// -m flags); at::vec puts its types in the matching inline namespace, and the entry point is
// named bucket_copy_span_<ISA>, so the variants coexist in one library.
#include "kernels/cpu/bucket.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "kernels/cpu/isa_name.h"

namespace zero_ext::kernels::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();

// 2 * kWidth elements of T as two fp32 vectors, and back (round to nearest even for 16 bits).
template <typename T>
inline void load_as_float(const T* src, Vec& lo, Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = Vec::loadu(src);
    hi = Vec::loadu(src + kWidth);
  } else {
    at::vec::load_to_float<T>(src, lo, hi);
  }
}

template <typename T>
inline void store_from_float(T* dst, const Vec& lo, const Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(dst);
    hi.store(dst + kWidth);
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(dst);
  }
}

// Src, Dst: float, c10::BFloat16 or c10::Half. No __restrict__: src and dst may coincide.
template <typename Src, typename Dst, bool kScaled, bool kAccumulate>
void copy_typed(const BucketCopySpan& span, float scale) {
  const Src* src = static_cast<const Src*>(span.src);
  Dst* dst = static_cast<Dst*>(span.dst);
  const int64_t n = span.numel;
  if constexpr (std::is_same_v<Src, Dst> && !kScaled && !kAccumulate) {
    if (static_cast<const void*>(src) != static_cast<void*>(dst)) {
      std::memcpy(dst, src, n * sizeof(Dst));
    }
    return;
  }

  const Vec vscale(scale);
  int64_t i = 0;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    Vec lo, hi;
    load_as_float(src + i, lo, hi);
    if constexpr (kScaled) {
      lo = lo * vscale;
      hi = hi * vscale;
    }
    if constexpr (kAccumulate) {
      Vec acc_lo, acc_hi;
      load_as_float(dst + i, acc_lo, acc_hi);
      lo = acc_lo + lo;
      hi = acc_hi + hi;
    }
    store_from_float(dst + i, lo, hi);
  }
  for (; i < n; ++i) {
    float x = static_cast<float>(src[i]);
    if constexpr (kScaled) x = x * scale;
    if constexpr (kAccumulate) x = static_cast<float>(dst[i]) + x;
    dst[i] = static_cast<Dst>(x);
  }
}

template <typename Src, typename Dst>
void copy_for_types(const BucketCopySpan& span, float scale, bool accumulate) {
  // A scale of exactly 1 skips the multiplication, so it cannot quieten a signalling NaN.
  if (scale != 1.0f) {
    accumulate ? copy_typed<Src, Dst, true, true>(span, scale)
               : copy_typed<Src, Dst, true, false>(span, scale);
  } else {
    accumulate ? copy_typed<Src, Dst, false, true>(span, scale)
               : copy_typed<Src, Dst, false, false>(span, scale);
  }
}

template <typename Src>
void copy_for_src(const BucketCopySpan& span, float scale, bool accumulate) {
  switch (span.dst_type) {
    case ElementType::kFloat32:
      return copy_for_types<Src, float>(span, scale, accumulate);
    case ElementType::kBFloat16:
      return copy_for_types<Src, c10::BFloat16>(span, scale, accumulate);
    case ElementType::kFloat16:
      return copy_for_types<Src, c10::Half>(span, scale, accumulate);
  }
}

}  // namespace

void ZERO_EXT_ISA_FN(bucket_copy_span)(const BucketCopySpan& span, float scale, bool accumulate) {
  switch (span.src_type) {
    case ElementType::kFloat32:
      return copy_for_src<float>(span, scale, accumulate);
    case ElementType::kBFloat16:
      return copy_for_src<c10::BFloat16>(span, scale, accumulate);
    case ElementType::kFloat16:
      return copy_for_src<c10::Half>(span, scale, accumulate);
  }
}

}  // namespace zero_ext::kernels::cpu
