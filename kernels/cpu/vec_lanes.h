// Element loads and stores for the at::vec kernels that compute in fp32 whatever they store
// (norm.cpp, activation.cpp, softmax.cpp): kStep elements of T as two vectors of Acc<T>, so that
// every element type steps by the same two vectors (one 16-bit vector widens into two fp32
// ones), and the row loops those kernels share (a row's sum, an optional addend).
//
// Included only by kernels/cpu/*.cpp, which setup.py compiles once per instruction set: the
// anonymous namespace gives each variant its own copy (the vector types differ per ISA).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "kernels/cpu/norm.h"  // NormType

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
  // lo, hi += the two vectors of add at j, when add is given (a bias, a residual branch's
  // gradient, an additive mask); the scalar tail's x += add[j].
  static void add_at(const T* add, int64_t j, V& lo, V& hi) {
    if (add == nullptr) return;
    V a0, a1;
    load(add + j, a0, a1);
    lo += a0;
    hi += a1;
  }
  static void add_at(const T* add, int64_t j, A& x) {
    if (add != nullptr) x += static_cast<A>(add[j]);
  }
  // The sum over j < n of a row's terms, in the order every kernel here sums: step(j, t0, t1)
  // gives the terms of [j, j + kStep) as two vectors, summed lane-wise into two accumulators that
  // are then reduced; tail(j) gives the term of each j past the last whole step, added to that
  // total left to right. Both inline: the loop is the caller's own.
  template <typename Step, typename Tail>
  static A row_sum(int64_t n, Step step, Tail tail) {
    V acc0(0), acc1(0);
    int64_t j = 0;
    for (; j + kStep <= n; j += kStep) {
      V t0, t1;
      step(j, t0, t1);
      acc0 += t0;
      acc1 += t1;
    }
    A total = sum(acc0 + acc1);
    for (; j < n; ++j) total += tail(j);
    return total;
  }
  // x rounded to T and widened back: the value an eager op's T-typed intermediate holds.
  static void round(V& lo, V& hi) {
    if constexpr (!std::is_same_v<T, A>) {
      std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(lo, hi));
    }
  }
  static A round(A x) { return static_cast<A>(static_cast<T>(x)); }
};

// A type as a value, for the generic lambdas that visit_element_type calls.
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename Tag>
using TypeOf = typename Tag::type;

// Calls f(TypeTag<T>{}) with T the element type that `type` names: every kernel's one switch from
// its run-time element type to the template instance for it.
template <typename F>
void visit_element_type(NormType type, F&& f) {
  switch (type) {
    case NormType::kFloat32:
      return f(TypeTag<float>{});
    case NormType::kBFloat16:
      return f(TypeTag<c10::BFloat16>{});
    case NormType::kFloat16:
      return f(TypeTag<c10::Half>{});
    case NormType::kFloat64:
      return f(TypeTag<double>{});
  }
}

}  // namespace
}  // namespace zero_ext::kernels::cpu
