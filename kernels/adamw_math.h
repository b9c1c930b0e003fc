// The AdamW update of one element, written once for every backend.
//
// Included by the CPU kernels (scalar tail with T = float, SIMD body with T = at::vec::Vectorized<float>)
// and by the CUDA kernel (T = float on the device), so every path computes the same sequence of
// IEEE operations in the same order as torch.optim.AdamW's reference loop. The coefficients are
// derived on the host in double precision, as torch derives them in Python, then rounded to float.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/host_device.h"

namespace zero_ext::kernels {

// Element types the kernels read and write; the ATen glue maps at::ScalarType onto these.
enum class ElementType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Everything one tensor's AdamW step needs besides its four arrays.
template <typename T>
struct AdamWCoefficients {
  T grad_factor;            // inverse loss scale, negated when maximizing
  T l2;                     // Adam's L2 term added to the gradient (0 for AdamW)
  T param_scale;            // AdamW's decoupled decay 1 - lr * weight_decay (1 for Adam)
  T beta2;                  // second-moment decay
  T one_minus_beta1;        // first-moment interpolation weight
  T one_minus_beta2;        // second-moment weight of the new squared gradient
  T eps;                    // denominator floor
  T step_size;              // lr / (1 - beta1^step), or lr without bias correction
  T bias_correction2_sqrt;  // sqrt(1 - beta2^step), or 1 without bias correction

  // Broadcasts float coefficients into another arithmetic type (a SIMD vector).
  template <typename U>
  ZERO_EXT_HOST_DEVICE AdamWCoefficients<U> as() const {
    return {U(grad_factor), U(l2), U(param_scale), U(beta2), U(one_minus_beta1),
            U(one_minus_beta2), U(eps), U(step_size), U(bias_correction2_sqrt)};
  }
};

// The per-call hyperparameters, as the op receives them.
struct AdamWHyperparameters {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;  // AdamW; false = Adam with L2 penalty folded into the gradient
  bool bias_correction;
  bool maximize;
};

// Host-side derivation of one tensor's coefficients for its (already incremented) step count.
inline AdamWCoefficients<float> adamw_coefficients(const AdamWHyperparameters& h, double step,
                                                   double inv_scale) {
  const double bias_correction1 = h.bias_correction ? 1.0 - std::pow(h.beta1, step) : 1.0;
  const double bias_correction2 = h.bias_correction ? 1.0 - std::pow(h.beta2, step) : 1.0;
  AdamWCoefficients<float> c;
  c.grad_factor = static_cast<float>(h.maximize ? -inv_scale : inv_scale);
  c.l2 = static_cast<float>(h.decoupled_weight_decay ? 0.0 : h.weight_decay);
  c.param_scale = static_cast<float>(h.decoupled_weight_decay ? 1.0 - h.lr * h.weight_decay : 1.0);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  c.eps = static_cast<float>(h.eps);
  c.step_size = static_cast<float>(h.lr / bias_correction1);
  c.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  return c;
}

// One AdamW update. `sqrt_fn` is the backend's square root (correctly rounded on every backend).
// The order of operations follows torch.optim.AdamW's single-tensor loop:
//   p.mul_(1 - lr*wd); m.lerp_(g, 1-b1); v.mul_(b2).addcmul_(g, g, 1-b2);
//   p.addcdiv_(m, sqrt(v)/sqrt(bc2) + eps, -step_size)
// where ATen evaluates addcmul as self + (value*t1)*t2 and addcdiv as self + (value*t1)/t2.
template <typename T, typename SqrtFn>
ZERO_EXT_HOST_DEVICE void adamw_update(T& p, T& m, T& v, T g, const AdamWCoefficients<T>& c,
                                       SqrtFn sqrt_fn) {
  g = g * c.grad_factor + c.l2 * p;
  p = p * c.param_scale;
  m = m + c.one_minus_beta1 * (g - m);
  v = v * c.beta2 + (c.one_minus_beta2 * g) * g;
  const T denom = sqrt_fn(v) / c.bias_correction2_sqrt + c.eps;
  p = p - (c.step_size * m) / denom;
}

}  // namespace zero_ext::kernels
