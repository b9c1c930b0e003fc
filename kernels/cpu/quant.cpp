// Blockwise quantize, residual encode and dequantize-sum over ranges of one chunk.
//
// setup.py compiles this file once per instruction set with -DCPU_CAPABILITY=<ISA> (and that ISA's
// -m flags, with -ffp-contract=off); entry points are named <kernel>_<ISA>. Each block is first
// loaded into an fp32 scratch of B values (x, or x plus its decoded residual), then reduced to its
// absmax and quantized from the scratch, so the input is read once per pass.
#include "kernels/cpu/quant.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/isa_name.h"

namespace zero_ext::kernels::cpu {
namespace {

template <typename T>
inline float load_float(const void* base, int64_t i) {
  return static_cast<float>(static_cast<const T*>(base)[i]);
}

inline float load_element(const void* base, ElementType type, int64_t i) {
  switch (type) {
    case ElementType::kFloat32:
      return load_float<float>(base, i);
    case ElementType::kBFloat16:
      return load_float<c10::BFloat16>(base, i);
    case ElementType::kFloat16:
      return load_float<c10::Half>(base, i);
  }
  return 0.0f;
}

inline void store_element(void* base, ElementType type, int64_t i, float v) {
  switch (type) {
    case ElementType::kFloat32:
      static_cast<float*>(base)[i] = v;
      return;
    case ElementType::kBFloat16:
      static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(v);
      return;
    case ElementType::kFloat16:
      static_cast<c10::Half*>(base)[i] = c10::Half(v);
      return;
  }
}

inline float fp8_to_float(uint8_t bits) {
  return static_cast<float>(c10::Float8_e4m3fn(bits, c10::Float8_e4m3fn::from_bits()));
}

inline uint8_t fp8_from_float(float v) { return c10::Float8_e4m3fn(v).x; }

// Block b's effective input, [0, B) of the scratch: x (+ residual), zeros past m.
void load_block(const QuantizeBlocks& a, int64_t b, float* scratch) {
  const int64_t begin = b * a.block_size;
  const int64_t n = std::min(a.block_size, a.m - begin);
  for (int64_t t = 0; t < n; ++t) {
    float v = load_element(a.x, a.x_type, begin + t);
    if (a.residual.residual != nullptr) {
      float r = fp8_to_float(a.residual.residual[begin + t]) * a.residual.coefficient;
      if (a.residual.factor != 1.0f) r = r * a.residual.factor;
      v = v + r;
    }
    scratch[t] = v;
  }
  for (int64_t t = n; t < a.block_size; ++t) scratch[t] = 0.0f;
}

// The max of |v|, NaN as soon as one element is NaN.
float block_absmax(const float* v, int64_t n) {
  float absmax = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    const float a = std::fabs(v[t]);
    if (a > absmax || a != a) absmax = a;
    if (absmax != absmax) break;
  }
  return absmax;
}

inline uint8_t* scales_of(const QuantizeBlocks& a) {
  return a.row + quant_data_bytes(a.m, a.bits, a.block_size);
}

inline float load_scale(const uint8_t* scales, int64_t b) {
  float s;
  std::memcpy(&s, scales + 4 * b, sizeof(float));
  return s;
}

// The quantized integer of element t of block b of a row.
inline int load_q(const uint8_t* data, int bits, int64_t index) {
  if (bits == 8) return static_cast<int8_t>(data[index]);
  const uint8_t byte = data[index >> 1];
  return int4_from_nibble((index & 1) ? byte >> 4 : byte);
}

}  // namespace

void ZERO_EXT_ISA_FN(quantize_blocks)(const QuantizeBlocks& a) {
  const float qmax = static_cast<float>(quant_qmax(a.bits));
  std::vector<float> scratch(a.block_size);
  uint8_t* scales = scales_of(a);
  for (int64_t b = a.first_block; b < a.last_block; ++b) {
    load_block(a, b, scratch.data());
    const float absmax = block_absmax(scratch.data(), a.block_size);
    const float scale = quant_scale(absmax, qmax);
    const float inv = quant_inverse(absmax, qmax);
    std::memcpy(scales + 4 * b, &scale, sizeof(float));
    if (a.bits == 8) {
      int8_t* q = reinterpret_cast<int8_t*>(a.row) + b * a.block_size;
      for (int64_t t = 0; t < a.block_size; ++t) {
        q[t] = static_cast<int8_t>(quantize_element(scratch[t], inv, qmax));
      }
    } else {
      uint8_t* q = a.row + b * a.block_size / 2;
      for (int64_t t = 0; t < a.block_size; t += 2) {
        const unsigned lo = static_cast<unsigned>(quantize_element(scratch[t], inv, qmax)) & 0xFu;
        const unsigned hi =
            static_cast<unsigned>(quantize_element(scratch[t + 1], inv, qmax)) & 0xFu;
        q[t / 2] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  }
}

void ZERO_EXT_ISA_FN(encode_residual)(const QuantizeBlocks& a, float new_scale) {
  const uint8_t* scales = scales_of(a);
  std::vector<float> scratch(a.block_size);
  for (int64_t b = a.first_block; b < a.last_block; ++b) {
    const int64_t begin = b * a.block_size;
    const int64_t n = std::min(a.block_size, a.m - begin);
    uint8_t* residual = a.residual.residual + begin;
    if (new_scale == 0.0f) {
      std::memset(residual, 0, n);
      continue;
    }
    load_block(a, b, scratch.data());
    const float scale = load_scale(scales, b);
    for (int64_t t = 0; t < n; ++t) {
      const float e = scratch[t] - dequantize_element(load_q(a.row, a.bits, begin + t), scale);
      residual[t] = fp8_from_float(residual_code(e, new_scale));
    }
  }
}

void ZERO_EXT_ISA_FN(dequantize_sum_range)(const DequantizeSumRange& a) {
  const int64_t scales_offset = quant_data_bytes(a.m, a.bits, a.block_size);
  for (int64_t t = a.first; t < a.last; ++t) {
    const int64_t b = t / a.block_size;
    if (!a.sum) {
      const uint8_t* row = a.rows[0];
      store_element(a.out, a.out_type, t,
                    dequantize_element(load_q(row, a.bits, t), load_scale(row + scales_offset, b)));
      continue;
    }
    float acc = a.accumulate ? load_element(a.out, a.out_type, t) : 0.0f;
    for (int64_t i = 0; i < a.k; ++i) {
      float v;
      if (i == a.exact_index) {
        v = load_element(a.exact, a.exact_type, t);
      } else {
        const uint8_t* row = a.rows[i];
        v = dequantize_element(load_q(row, a.bits, t), load_scale(row + scales_offset, b));
      }
      acc = acc + v;
    }
    store_element(a.out, a.out_type, t, acc);
  }
}

}  // namespace zero_ext::kernels::cpu
