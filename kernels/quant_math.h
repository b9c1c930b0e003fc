// Blockwise symmetric quantization of one element or one block, written once for every backend.
//
// Included by the CPU kernels (kernels/cpu/quant.cpp, scalar tail and reference order for the
// SIMD body) and the CUDA kernels (kernels/cuda/quant.cu), so that every path computes the same
// IEEE operations in the same order as the plain-torch reference in tests/test_quant_ops.py:
//   scale = absmax / qmax;  q = clamp(nearbyint(x * (qmax / absmax)), -qmax, qmax)
// in fp32, round half to even, each operation rounded on its own (no FMA contraction). The
// packed row layout of a chunk and its byte count live here too, so the ATen glue, the kernels
// and zero_ext.ops.quantized_row_bytes agree on one definition.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ZERO_EXT_QUANT_FN __host__ __device__ __forceinline__
#else
#define ZERO_EXT_QUANT_FN inline
#endif

namespace zero_ext::kernels {

// Largest magnitude of the quantized integers: 127 for int8, 7 for int4 (symmetric, so -8 of the
// int4 range is never used and negating a block never clips).
ZERO_EXT_QUANT_FN int quant_qmax(int bits) { return bits == 8 ? 127 : 7; }

// Largest finite float8_e4m3fn value: the error-feedback residual is stored as
// fp8(e / s) with s chosen so that |e / s| <= kResidualRange.
inline constexpr float kResidualRange = 448.0f;

// Quantization blocks of a chunk of m elements (the last one padded with zeros when B does not
// divide m).
ZERO_EXT_QUANT_FN int64_t quant_blocks(int64_t m, int64_t block_size) {
  return (m + block_size - 1) / block_size;
}

// Bytes of one packed row [data][scales]: nb * B * bits / 8 data bytes (int8, or int4 nibbles
// with element 2i in the low nibble of byte i), then nb little-endian fp32 scales.
ZERO_EXT_QUANT_FN int64_t quant_data_bytes(int64_t m, int bits, int64_t block_size) {
  return quant_blocks(m, block_size) * block_size * bits / 8;
}
ZERO_EXT_QUANT_FN int64_t quant_row_bytes(int64_t m, int bits, int64_t block_size) {
  return quant_data_bytes(m, bits, block_size) + 4 * quant_blocks(m, block_size);
}

// A block's scale from its absmax (the max of |x| over the block, NaN if any element is NaN,
// inf if any is infinite): absmax / qmax, 0 for an all-zero block, NaN for a block holding inf
// or NaN, so whatever is dequantized from it is NaN and an overflow check downstream sees it.
ZERO_EXT_QUANT_FN float quant_scale(float absmax, float qmax) {
  if (!(absmax <= 3.402823466e38f)) return NAN;  // inf or NaN
  return absmax / qmax;
}

// The multiplier x is quantized with: qmax / absmax, or 0 for a zero or non-finite block (every
// element of it quantizes to 0). For a subnormal absmax below qmax / FLT_MAX the quotient is
// +inf; quantize_element then maps each nonzero x to +-qmax and 0 to 0.
ZERO_EXT_QUANT_FN float quant_inverse(float absmax, float qmax) {
  if (!(absmax <= 3.402823466e38f) || absmax == 0.0f) return 0.0f;
  return qmax / absmax;
}

// One element: clamp(nearbyint(x * inv), -qmax, qmax), with a NaN product (0 * inf, only for a
// subnormal absmax) quantized to 0. Rounds half to even under the default rounding mode.
ZERO_EXT_QUANT_FN int quantize_element(float x, float inv, float qmax) {
  const float y = x * inv;
  if (y != y) return 0;
  const float r = std::nearbyint(y);
  return static_cast<int>(r < -qmax ? -qmax : (r > qmax ? qmax : r));
}

// The dequantized value: one fp32 multiply.
ZERO_EXT_QUANT_FN float dequantize_element(int q, float scale) {
  return static_cast<float>(q) * scale;
}

// Sign-extends the low 4 bits of a byte (a two's complement int4 nibble).
ZERO_EXT_QUANT_FN int int4_from_nibble(unsigned nibble) {
  return static_cast<int>(nibble & 0xFu) - static_cast<int>((nibble & 0x8u) << 1);
}

// The scale s of a chunk's error-feedback residual: max block scale / 2 / 448, since the
// quantization error of an element is at most half its block's scale. 0 when every block scale
// is 0 (or so small that s underflows): the chunk's residual is then stored as zeros.
ZERO_EXT_QUANT_FN float residual_scale_of(float max_block_scale) {
  return max_block_scale / 2.0f / kResidualRange;
}

// The value stored (before rounding to fp8) for an error e under residual scale s:
// clamp(e / s, -448, 448).
ZERO_EXT_QUANT_FN float residual_code(float e, float s) {
  const float r = e / s;
  return r < -kResidualRange ? -kResidualRange : (r > kResidualRange ? kResidualRange : r);
}

}  // namespace zero_ext::kernels
