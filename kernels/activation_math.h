// The SwiGLU and GeLU formulas of one element, forward and backward, written once for every
// backend: the CPU kernels (kernels/cpu/activation.cpp) instantiate them on fp32 / fp64 scalars
// and at::vec vectors, the CUDA kernels (kernels/cuda/activation.cu) on fp32 in device code.
//
// M supplies exp, tanh and erf for the value type X (M::exp(x), ...); K is the constants' scalar
// type (float, or double for fp64). Kinds and formulas: kernels/cpu/activation.h.
#pragma once

#include <cmath>

#include "kernels/cpu/activation.h"  // ActivationKind
#include "kernels/host_device.h"

namespace zero_ext::kernels {

template <typename M, typename K, typename X>
ZERO_EXT_HOST_DEVICE X sigmoid(const X& a) {
  return X(K(1)) / (X(K(1)) + M::exp(X(K(0)) - a));
}

template <typename M, typename K, typename X>
ZERO_EXT_HOST_DEVICE X gelu(const X& v, bool tanh_form) {
  const X half(K(0.5)), one(K(1));
  if (tanh_form) {
    const X inner = X(K(M_SQRT2 * M_2_SQRTPI * 0.5)) * (v + X(K(0.044715)) * v * v * v);
    return half * v * (one + M::tanh(inner));
  }
  return half * v * (one + M::erf(v * X(K(M_SQRT1_2))));
}

template <typename M, typename K, typename X>
ZERO_EXT_HOST_DEVICE X gelu_derivative(const X& v, bool tanh_form) {
  const X half(K(0.5)), one(K(1));
  if (tanh_form) {
    const X k0(K(M_SQRT2 * M_2_SQRTPI * 0.5)), k1(K(0.044715));
    const X t = M::tanh(k0 * (v + k1 * v * v * v));
    return half * (one + t) + half * v * (one - t * t) * k0 * (one + X(K(3)) * k1 * v * v);
  }
  const X pdf = M::exp(X(K(-0.5)) * v * v) * X(K(M_2_SQRTPI * M_SQRT1_2 * 0.5));
  return half * (one + M::erf(v * X(K(M_SQRT1_2)))) + v * pdf;
}

// One element (or vector) of a row, forward or backward, for one kind: a template parameter, so
// each row loop holds one formula, branch-free. a: the gate (SwiGLU) or x + bias (GeLU); b: up
// (SwiGLU only).
template <typename M, typename K, cpu::ActivationKind kind>
struct ActivationElement {
  template <typename X>
  static ZERO_EXT_HOST_DEVICE X forward(const X& a, const X& b) {
    if constexpr (kind == cpu::ActivationKind::kSwiGLU) {
      return a * sigmoid<M, K>(a) * b;
    } else {
      return gelu<M, K>(a, kind == cpu::ActivationKind::kGeluTanh);
    }
  }
  // grad_a into *ga and, for SwiGLU, grad_b into *gb.
  template <typename X>
  static ZERO_EXT_HOST_DEVICE void backward(const X& a, const X& b, const X& dy, X* ga, X* gb) {
    if constexpr (kind == cpu::ActivationKind::kSwiGLU) {
      const X s = sigmoid<M, K>(a);
      *gb = dy * a * s;
      *ga = dy * b * s * (X(K(1)) + a * (X(K(1)) - s));
    } else {
      *ga = dy * gelu_derivative<M, K>(a, kind == cpu::ActivationKind::kGeluTanh);
    }
  }
};

}  // namespace zero_ext::kernels
