// Element loads and stores for the at::vec kernels that compute in fp32 whatever they store
// (norm.cpp, activation.cpp): kStep elements of T as two vectors of Acc<T>, so that every
// element type steps by the same two vectors (one 16-bit vector widens into two fp32 ones).
//
// Included only by kernels/cpu/*.cpp, which setup.py compiles once per instruction set: the
// anonymous namespace gives each variant its own copy (the vector types differ per ISA).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

namespace zero_ext::kernels::cpu {
namespace {

// The arithmetic type of element type T: fp64 for fp64 (gradcheck), fp32 for the rest.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
struct Lanes {
  using A = Acc<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int64_t kStep = 2 * V::size();

  static void load(const T* p, V& lo, V& hi) {
    if constexpr (std::is_same_v<T, A>) {
      lo = V::loadu(p);
      hi = V::loadu(p + V::size());
    } else {
      at::vec::load_to_float<T>(p, lo, hi);
    }
  }
  static void store(T* p, const V& lo, const V& hi) {
    if constexpr (std::is_same_v<T, A>) {
      lo.store(p);
      hi.store(p + V::size());
    } else {
      at::vec::convert_from_float<T>(lo, hi).store(p);
    }
  }
  static A sum(const V& v) {
    return at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, v);
  }
  // x rounded to T and widened back: the value an eager op's T-typed intermediate holds.
  static void round(V& lo, V& hi) {
    if constexpr (!std::is_same_v<T, A>) {
      std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(lo, hi));
    }
  }
  static A round(A x) { return static_cast<A>(static_cast<T>(x)); }
};

}  // namespace
}  // namespace zero_ext::kernels::cpu
