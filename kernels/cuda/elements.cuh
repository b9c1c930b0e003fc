// Element access shared by the CUDA kernels: fp32 <-> bf16 / fp16 conversions that round as
// c10::BFloat16 / c10::Half do on the CPU, and loads / stores of N consecutive elements as whole
// 8- or 16-byte accesses. Device code only, no torch headers; included by kernels/cuda/adamw.cu
// and kernels/cuda/bucket.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace zero_ext::kernels::cuda {

// Exact one way, round-to-nearest-even the other.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

__device__ __forceinline__ uint32_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint32_t bits(__half x) { return __half_as_ushort(x); }

template <typename T>
__device__ __forceinline__ T from_bits(uint32_t b);
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(uint32_t b) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(b));
}
template <>
__device__ __forceinline__ __half from_bits<__half>(uint32_t b) {
  return __ushort_as_half(static_cast<unsigned short>(b));
}

// The elements of T in one 32-bit word (one fp32, or two 16-bit values, the first in the low
// half), as fp32 values, and back.
template <typename T>
__device__ __forceinline__ void unpack_word(uint32_t u, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    dst[0] = __uint_as_float(u);
  } else {
    dst[0] = to_float(from_bits<T>(u & 0xffffu));
    dst[1] = to_float(from_bits<T>(u >> 16));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack_word(const float* src) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(src[0]);
  } else {
    return bits(from_float<T>(src[0])) | (bits(from_float<T>(src[1])) << 16);
  }
}

// N consecutive elements of T travel as one 8-byte uint2 access when they span 8 bytes, else as
// 16-byte uint4 accesses: the native vector types guarantee one LDG / STG of that width each.
template <typename T, int N>
inline constexpr int kVecBytes = N * static_cast<int>(sizeof(T));
template <typename T, int N>
inline constexpr int kVecAccessBytes = kVecBytes<T, N> == 8 ? 8 : 16;
template <typename T>
inline constexpr int kElementsPerWord = 4 / static_cast<int>(sizeof(T));

// Whether ptr is aligned for load_vec / store_vec of N elements.
template <int N, typename T>
__device__ __forceinline__ bool vec_aligned(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVecAccessBytes<T, N> == 0;
}

// dst[0, N) = src[0, N) as fp32. src must be vec_aligned<N>.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* src, float (&dst)[N]) {
  static_assert(kVecBytes<T, N> == 8 || kVecBytes<T, N> % 16 == 0, "8 bytes or whole uint4s");
  if constexpr (kVecBytes<T, N> == 8) {
    const uint2 x = *reinterpret_cast<const uint2*>(src);
    unpack_word<T>(x.x, dst);
    unpack_word<T>(x.y, dst + kElementsPerWord<T>);
  } else {
#pragma unroll
    for (int w = 0; w < kVecBytes<T, N> / 16; ++w) {
      const uint4 x = reinterpret_cast<const uint4*>(src)[w];
      const uint32_t u[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) unpack_word<T>(u[j], dst + (w * 4 + j) * kElementsPerWord<T>);
    }
  }
}

// dst[0, N) = src[0, N) rounded to T. dst must be vec_aligned<N>.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* dst, const float (&src)[N]) {
  static_assert(kVecBytes<T, N> == 8 || kVecBytes<T, N> % 16 == 0, "8 bytes or whole uint4s");
  if constexpr (kVecBytes<T, N> == 8) {
    *reinterpret_cast<uint2*>(dst) =
        make_uint2(pack_word<T>(src), pack_word<T>(src + kElementsPerWord<T>));
  } else {
#pragma unroll
    for (int w = 0; w < kVecBytes<T, N> / 16; ++w) {
      uint32_t u[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) u[j] = pack_word<T>(src + (w * 4 + j) * kElementsPerWord<T>);
      reinterpret_cast<uint4*>(dst)[w] = make_uint4(u[0], u[1], u[2], u[3]);
    }
  }
}

}  // namespace zero_ext::kernels::cuda
