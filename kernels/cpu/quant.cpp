// Blockwise quantize, residual encode and dequantize-sum over ranges of one chunk: at::vec SIMD
// for the fp32 math of each block, a scalar tail for what is left of a block, fp32 math for
// 16-bit elements.
//
// setup.py compiles this file once per instruction set with -DCPU_CAPABILITY=<ISA> (and that ISA's
// -m flags, with -ffp-contract=off); entry points are named <kernel>_<ISA>. A block is first
// converted into an fp32 scratch of B values (x, or x plus its decoded residual), reduced to its
// absmax and quantized from there: each element goes through the operations of
// kernels/quant_math.h in the same order in the SIMD body and the tail, so every variant is
// bitwise equal to the scalar definition. The integer packing and unpacking loops are plain
// loops the compiler vectorizes for the ISA at hand.
#include "kernels/cpu/quant.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/cpu/isa_name.h"

namespace zero_ext::kernels::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();
constexpr int64_t kDequantizePiece = 512;

// dst[0, n) = src[0, n) as fp32 (exact for every input type).
template <typename T>
void load_floats(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t t = 0;
    for (; t + 2 * kWidth <= n; t += 2 * kWidth) {
      Vec lo, hi;
      at::vec::load_to_float<T>(src + t, lo, hi);
      lo.store(dst + t);
      hi.store(dst + t + kWidth);
    }
    for (; t < n; ++t) dst[t] = static_cast<float>(src[t]);
  }
}

void load_floats(const void* src, ElementType type, int64_t offset, float* dst, int64_t n) {
  switch (type) {
    case ElementType::kFloat32:
      return load_floats(static_cast<const float*>(src) + offset, dst, n);
    case ElementType::kBFloat16:
      return load_floats(static_cast<const c10::BFloat16*>(src) + offset, dst, n);
    case ElementType::kFloat16:
      return load_floats(static_cast<const c10::Half*>(src) + offset, dst, n);
  }
}

// dst[0, n) = src[0, n) rounded to T (nearest even).
template <typename T>
void store_floats(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t t = 0;
    for (; t + 2 * kWidth <= n; t += 2 * kWidth) {
      at::vec::convert_from_float<T>(Vec::loadu(src + t), Vec::loadu(src + t + kWidth))
          .store(dst + t);
    }
    for (; t < n; ++t) dst[t] = static_cast<T>(src[t]);
  }
}

void store_floats(const float* src, void* dst, ElementType type, int64_t offset, int64_t n) {
  switch (type) {
    case ElementType::kFloat32:
      return store_floats(src, static_cast<float*>(dst) + offset, n);
    case ElementType::kBFloat16:
      return store_floats(src, static_cast<c10::BFloat16*>(dst) + offset, n);
    case ElementType::kFloat16:
      return store_floats(src, static_cast<c10::Half*>(dst) + offset, n);
  }
}

// float8_e4m3fn bits -> fp32, exactly as c10::Float8_e4m3fn decodes them, in a loop the compiler
// vectorizes: the 7 magnitude bits placed at the top of an fp32 mantissa, as a float, times
// 2^(127 - 7) give both normal and subnormal values exactly; 0x7F is NaN.
void fp8_to_floats(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    const uint32_t b = src[t];
    const uint32_t magnitude_bits = (b & 0x7Fu) << 20;
    float magnitude;
    std::memcpy(&magnitude, &magnitude_bits, sizeof(float));
    magnitude = (b & 0x7Fu) == 0x7Fu ? NAN : magnitude * 0x1p120f;
    dst[t] = (b & 0x80u) ? -magnitude : magnitude;
  }
}

// fp32 -> float8_e4m3fn bits, round to nearest even, bitwise as c10::Float8_e4m3fn(float) for
// finite |v| <= 448 (callers clamp first), in a loop the compiler vectorizes. Below 2^-6 the code
// is the subnormal count nearbyint(|v| * 2^9) (8 of them make the smallest normal, code 0x08);
// above, the fp32 mantissa is rounded to 3 bits and the exponent rebased by 127 - 7.
void floats_to_fp8(const float* src, uint8_t* dst, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    uint32_t bits;
    std::memcpy(&bits, src + t, sizeof(float));
    const uint32_t sign = (bits >> 24) & 0x80u;
    const uint32_t abs_bits = bits & 0x7FFFFFFFu;
    float magnitude;
    std::memcpy(&magnitude, &abs_bits, sizeof(float));
    const uint32_t subnormal = static_cast<uint32_t>(std::nearbyint(magnitude * 512.0f));
    const uint32_t normal =
        (abs_bits - (120u << 23) + 0x7FFFFu + ((abs_bits >> 20) & 1u)) >> 20;
    dst[t] = static_cast<uint8_t>(sign | (abs_bits < (121u << 23) ? subnormal : normal));
  }
}

// Per-thread fp32 scratch of one block, reused across calls.
struct Scratch {
  std::vector<float> a;
  std::vector<float> b;
  explicit Scratch(int64_t n) : a(n), b(n) {}
};

Scratch& thread_scratch(int64_t n) {
  thread_local Scratch scratch(0);
  if (static_cast<int64_t>(scratch.a.size()) < n) {
    scratch.a.resize(n);
    scratch.b.resize(n);
  }
  return scratch;
}

// Block b's effective input into v[0, B): x (+ residual * coefficient * factor), zeros past m.
// tmp: B floats of scratch for the decoded residual.
void load_block(const QuantizeBlocks& a, int64_t b, float* v, float* tmp) {
  const int64_t begin = b * a.block_size;
  const int64_t n = std::min(a.block_size, a.m - begin);
  load_floats(a.x, a.x_type, begin, v, n);
  std::fill(v + n, v + a.block_size, 0.0f);
  if (a.residual.residual == nullptr) return;
  fp8_to_floats(a.residual.residual + begin, tmp, n);
  const float coefficient = a.residual.coefficient;
  const float factor = a.residual.factor;
  const bool scaled = factor != 1.0f;
  const Vec vcoefficient(coefficient);
  const Vec vfactor(factor);
  int64_t t = 0;
  for (; t + kWidth <= n; t += kWidth) {
    Vec r_eff = Vec::loadu(tmp + t) * vcoefficient;
    if (scaled) r_eff = r_eff * vfactor;
    (Vec::loadu(v + t) + r_eff).store(v + t);
  }
  for (; t < n; ++t) {
    float r_eff = tmp[t] * coefficient;
    if (scaled) r_eff = r_eff * factor;
    v[t] = v[t] + r_eff;
  }
}

// The max of |v[0, n)|, NaN when one of them is NaN (at::vec::maximum propagates NaN).
float block_absmax(const float* v, int64_t n) {
  int64_t t = 0;
  float absmax = 0.0f;
  if (n >= kWidth) {
    // Four independent accumulators: the maximum's latency, not its throughput, would bound a
    // single chain.
    Vec acc(0.0f);
    Vec acc1(0.0f);
    Vec acc2(0.0f);
    Vec acc3(0.0f);
    for (; t + 4 * kWidth <= n; t += 4 * kWidth) {
      acc = at::vec::maximum(acc, Vec::loadu(v + t).abs());
      acc1 = at::vec::maximum(acc1, Vec::loadu(v + t + kWidth).abs());
      acc2 = at::vec::maximum(acc2, Vec::loadu(v + t + 2 * kWidth).abs());
      acc3 = at::vec::maximum(acc3, Vec::loadu(v + t + 3 * kWidth).abs());
    }
    for (; t + kWidth <= n; t += kWidth) acc = at::vec::maximum(acc, Vec::loadu(v + t).abs());
    acc = at::vec::maximum(at::vec::maximum(acc, acc1), at::vec::maximum(acc2, acc3));
    absmax = at::vec::vec_reduce_all<float>(
        [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, acc);
  }
  for (; t < n; ++t) {
    const float a = std::fabs(v[t]);
    if (a > absmax || a != a) absmax = a;
  }
  return absmax;
}

// q[0, n) as fp32 integers: quantize_element of each v, in SIMD where a whole vector fits.
void quantize_floats(const float* v, float* q, int64_t n, float inv, float qmax) {
  const Vec vinv(inv);
  const Vec vlo(-qmax);
  const Vec vhi(qmax);
  const Vec zero(0.0f);
  int64_t t = 0;
  for (; t + kWidth <= n; t += kWidth) {
    const Vec y = Vec::loadu(v + t) * vinv;
    const Vec r = Vec::blendv(y.round(), zero, y.isnan());
    at::vec::minimum(at::vec::maximum(r, vlo), vhi).store(q + t);
  }
  for (; t < n; ++t) q[t] = static_cast<float>(quantize_element(v[t], inv, qmax));
}

// The fp32 values of the quantized integers of elements [begin, begin + n) of a row.
void unpack_floats(const uint8_t* data, int bits, int64_t begin, int64_t n, float* dst) {
  if (bits == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(data) + begin;
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<float>(q[t]);
    return;
  }
  int64_t t = 0;
  if (begin & 1) {
    dst[t++] = static_cast<float>(int4_from_nibble(data[begin >> 1] >> 4));
  }
  const uint8_t* bytes = data + ((begin + t) >> 1);
  const int64_t pairs = (n - t) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const uint8_t byte = bytes[p];
    dst[t + 2 * p] = static_cast<float>(int4_from_nibble(byte));
    dst[t + 2 * p + 1] = static_cast<float>(int4_from_nibble(byte >> 4));
  }
  t += 2 * pairs;
  if (t < n) dst[t] = static_cast<float>(int4_from_nibble(bytes[pairs]));
}

inline float load_scale(const uint8_t* scales, int64_t b) {
  float s;
  std::memcpy(&s, scales + 4 * b, sizeof(float));
  return s;
}

inline int64_t scales_offset(int64_t m, int bits, int64_t block_size) {
  return quant_data_bytes(m, bits, block_size);
}

}  // namespace

void ZERO_EXT_ISA_FN(quantize_blocks)(const QuantizeBlocks& a) {
  const float qmax = static_cast<float>(quant_qmax(a.bits));
  const int64_t block = a.block_size;
  Scratch& scratch = thread_scratch(block);
  float* v = scratch.a.data();
  float* q = scratch.b.data();
  uint8_t* scales = a.row + scales_offset(a.m, a.bits, block);
  for (int64_t b = a.first_block; b < a.last_block; ++b) {
    load_block(a, b, v, q);
    const float absmax = block_absmax(v, block);
    const float scale = quant_scale(absmax, qmax);
    std::memcpy(scales + 4 * b, &scale, sizeof(float));
    quantize_floats(v, q, block, quant_inverse(absmax, qmax), qmax);
    if (a.bits == 8) {
      int8_t* out = reinterpret_cast<int8_t*>(a.row) + b * block;
      for (int64_t t = 0; t < block; ++t) out[t] = static_cast<int8_t>(static_cast<int32_t>(q[t]));
    } else {
      uint8_t* out = a.row + b * block / 2;
      for (int64_t p = 0; p < block / 2; ++p) {
        const uint32_t lo = static_cast<uint32_t>(static_cast<int32_t>(q[2 * p])) & 0xFu;
        const uint32_t hi = static_cast<uint32_t>(static_cast<int32_t>(q[2 * p + 1])) & 0xFu;
        out[p] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  }
}

void ZERO_EXT_ISA_FN(encode_residual)(const QuantizeBlocks& a, float new_scale) {
  const int64_t block = a.block_size;
  const uint8_t* scales = a.row + scales_offset(a.m, a.bits, block);
  Scratch& scratch = thread_scratch(block);
  float* v = scratch.a.data();
  float* q = scratch.b.data();
  const Vec vs(new_scale);
  const Vec vlo(-kResidualRange);
  const Vec vhi(kResidualRange);
  for (int64_t b = a.first_block; b < a.last_block; ++b) {
    const int64_t begin = b * block;
    const int64_t n = std::min(block, a.m - begin);
    uint8_t* residual = a.residual.residual + begin;
    if (new_scale == 0.0f) {
      std::memset(residual, 0, n);
      continue;
    }
    load_block(a, b, v, q);
    unpack_floats(a.row, a.bits, begin, n, q);
    const float scale = load_scale(scales, b);
    const Vec vscale(scale);
    int64_t t = 0;
    for (; t + kWidth <= n; t += kWidth) {
      const Vec e = Vec::loadu(v + t) - Vec::loadu(q + t) * vscale;
      at::vec::minimum(at::vec::maximum(e / vs, vlo), vhi).store(q + t);
    }
    for (; t < n; ++t) {
      q[t] = residual_code(v[t] - dequantize_element(static_cast<int>(q[t]), scale), new_scale);
    }
    floats_to_fp8(q, residual, n);
  }
}

void ZERO_EXT_ISA_FN(dequantize_sum_range)(const DequantizeSumRange& a) {
  const int64_t block = a.block_size;
  const int64_t offset = scales_offset(a.m, a.bits, block);
  // Pieces of at most kDequantizePiece elements of one block: the sum's two fp32 scratch rows
  // stay in L1 beside the k streams of packed rows, whatever the block size.
  const int64_t piece = std::min(block, kDequantizePiece);
  Scratch& scratch = thread_scratch(piece);
  float* acc = scratch.a.data();
  float* v = scratch.b.data();
  for (int64_t begin = a.first; begin < a.last;) {
    const int64_t b = begin / block;
    const int64_t n = std::min({(b + 1) * block, a.last, begin + piece}) - begin;
    if (!a.sum) {
      unpack_floats(a.rows[0], a.bits, begin, n, acc);
      const float scale = load_scale(a.rows[0] + offset, b);
      const Vec vscale(scale);
      int64_t t = 0;
      for (; t + kWidth <= n; t += kWidth) (Vec::loadu(acc + t) * vscale).store(acc + t);
      for (; t < n; ++t) acc[t] = dequantize_element(static_cast<int>(acc[t]), scale);
    } else {
      if (a.accumulate) {
        load_floats(a.out, a.out_type, begin, acc, n);
      } else {
        std::fill(acc, acc + n, 0.0f);
      }
      for (int64_t i = 0; i < a.k; ++i) {
        if (i == a.exact_index) {
          load_floats(a.exact, a.exact_type, begin, v, n);
          int64_t t = 0;
          for (; t + kWidth <= n; t += kWidth) {
            (Vec::loadu(acc + t) + Vec::loadu(v + t)).store(acc + t);
          }
          for (; t < n; ++t) acc[t] = acc[t] + v[t];
          continue;
        }
        unpack_floats(a.rows[i], a.bits, begin, n, v);
        const float scale = load_scale(a.rows[i] + offset, b);
        const Vec vscale(scale);
        int64_t t = 0;
        for (; t + kWidth <= n; t += kWidth) {
          (Vec::loadu(acc + t) + Vec::loadu(v + t) * vscale).store(acc + t);
        }
        for (; t < n; ++t) acc[t] = acc[t] + dequantize_element(static_cast<int>(v[t]), scale);
      }
    }
    store_floats(acc, a.out, a.out_type, begin, n);
    begin += n;
  }
}

}  // namespace zero_ext::kernels::cpu
