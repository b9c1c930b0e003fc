// Blockwise quantization kernels and their host launchers (declared in kernels/cuda/quant.cuh).
//
// Built by setup.py in a CUDA build only; called by csrc/quant_cuda.cu.
//
// Quantize: a group of G threads (G the largest power of two dividing B / 8, at most a warp)
// owns one quantization block; each thread reads 8 consecutive elements per step as one vector
// access (16 bytes of bf16 / fp16, 32 of fp32), the group's absmax is one shuffle reduction, and
// each thread writes its 8 quantized values as one 8-byte (int8) or 4-byte (int4) store, so a
// warp writes a contiguous run of the packed row. Up to kCachedSteps steps stay in registers
// between the absmax and the quantize pass; longer blocks read their tail again (from L1 / L2).
// Dequantize-sum: each thread owns 8 consecutive output elements and walks the k senders in
// order, so the fp32 sum is formed in the same order as on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/adamw_math.h"
#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/quant.cuh"
#include "kernels/quant_math.h"

namespace zero_ext::kernels::cuda {
namespace {

constexpr int kE = kQuantElementsPerThread;
constexpr int kCachedSteps = 4;
// Grid y is a row (quantize) or chunk (dequantize) index; larger counts take several launches.
constexpr int64_t kMaxGridY = 65535;

// The max of a and b, NaN as soon as either is NaN (fmaxf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

__device__ __forceinline__ float fp8_to_float(uint8_t bits) {
  __nv_fp8_e4m3 v;
  v.__x = bits;
  return static_cast<float>(v);
}

// Round to nearest even, as c10::Float8_e4m3fn(float) rounds; callers clamp to +-448 first.
__device__ __forceinline__ uint8_t fp8_from_float(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// v[0, 8) = the 8 elements of T at chunk[e, e + 8) as fp32, zeros at and past m.
template <typename T>
__device__ __forceinline__ void load8(const T* chunk, int64_t e, int64_t m, float (&v)[kE]) {
  const T* p = chunk + e;
  if (e + kE <= m && vec_aligned<kE>(p)) {
    load_vec<T, kE>(p, v);
    return;
  }
#pragma unroll
  for (int k = 0; k < kE; ++k) v[k] = e + k < m ? to_float(p[k]) : 0.0f;
}

// chunk[e, min(e + 8, m)) = v rounded to T.
template <typename T>
__device__ __forceinline__ void store8(T* chunk, int64_t e, int64_t m, const float (&v)[kE]) {
  T* p = chunk + e;
  if (e + kE <= m && vec_aligned<kE>(p)) {
    store_vec<T, kE>(p, v);
    return;
  }
#pragma unroll
  for (int k = 0; k < kE; ++k) {
    if (e + k < m) p[k] = from_float<T>(v[k]);
  }
}

// The 8 fp8 residual bytes at r[e, e + 8) (those before m).
__device__ __forceinline__ void load_residual8(const uint8_t* r, int64_t e, int64_t m,
                                               uint8_t (&bytes)[kE]) {
  const uint8_t* p = r + e;
  if (e + kE <= m && reinterpret_cast<uintptr_t>(p) % 8 == 0) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      bytes[k] = static_cast<uint8_t>(w.x >> (8 * k));
      bytes[k + 4] = static_cast<uint8_t>(w.y >> (8 * k));
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kE; ++k) bytes[k] = e + k < m ? p[k] : 0;
}

__device__ __forceinline__ void store_residual8(uint8_t* r, int64_t e, int64_t m,
                                                const uint8_t (&bytes)[kE]) {
  uint8_t* p = r + e;
  if (e + kE <= m && reinterpret_cast<uintptr_t>(p) % 8 == 0) {
    uint2 w{0u, 0u};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w.x |= static_cast<uint32_t>(bytes[k]) << (8 * k);
      w.y |= static_cast<uint32_t>(bytes[k + 4]) << (8 * k);
    }
    *reinterpret_cast<uint2*>(p) = w;
    return;
  }
#pragma unroll
  for (int k = 0; k < kE; ++k) {
    if (e + k < m) p[k] = bytes[k];
  }
}

// 8 quantized integers of a row starting at element e (a multiple of 8, inside the padded
// data: always readable), as fp32. Rows are 4-byte aligned (row_bytes is a multiple of 4).
template <int kBits>
__device__ __forceinline__ void load_q8(const uint8_t* data, int64_t e, float (&q)[kE]) {
  if constexpr (kBits == 8) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(data + e);
    const uint32_t lo = w[0];
    const uint32_t hi = w[1];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      q[k] = static_cast<float>(static_cast<int8_t>(lo >> (8 * k)));
      q[k + 4] = static_cast<float>(static_cast<int8_t>(hi >> (8 * k)));
    }
  } else {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(data + e / 2);
#pragma unroll
    for (int k = 0; k < kE; ++k) q[k] = static_cast<float>(int4_from_nibble(w >> (4 * k)));
  }
}

template <int kBits>
__device__ __forceinline__ void store_q8(uint8_t* data, int64_t e, const int (&q)[kE]) {
  if constexpr (kBits == 8) {
    uint32_t lo = 0;
    uint32_t hi = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      lo |= (static_cast<uint32_t>(q[k]) & 0xFFu) << (8 * k);
      hi |= (static_cast<uint32_t>(q[k + 4]) & 0xFFu) << (8 * k);
    }
    uint8_t* p = data + e;
    if (reinterpret_cast<uintptr_t>(p) % 8 == 0) {
      *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
    } else {
      reinterpret_cast<uint32_t*>(p)[0] = lo;
      reinterpret_cast<uint32_t*>(p)[1] = hi;
    }
  } else {
    uint32_t w = 0;
#pragma unroll
    for (int k = 0; k < kE; ++k) w |= (static_cast<uint32_t>(q[k]) & 0xFu) << (4 * k);
    *reinterpret_cast<uint32_t*>(data + e / 2) = w;
  }
}

// Where a thread of a quantize / encode launch works: its row, its quantization block and its
// lane in the block's group of G threads.
struct BlockPosition {
  int64_t row;
  int64_t block;
  int lane;
  bool active;  // block < nb (inactive threads still take part in the shuffles)
};

__device__ __forceinline__ BlockPosition block_position(const QuantizeRun& run, int group_size,
                                                        int64_t row_offset) {
  const int groups = kQuantBlockThreads / group_size;
  const int64_t nb = quant_blocks(run.m, run.block_size);
  const int64_t block = static_cast<int64_t>(blockIdx.x) * groups + threadIdx.x / group_size;
  return {run.first_row + row_offset + blockIdx.y, block,
          static_cast<int>(threadIdx.x % group_size), block < nb};
}

// The effective input of the 8 elements of step `step` of this thread's block: x (+ residual),
// and their element index in the chunk.
template <typename T, bool kFeedback>
__device__ __forceinline__ int64_t load_step(const QuantizeRun& run, const BlockPosition& pos,
                                             int group_size, int64_t step, float coefficient,
                                             float (&v)[kE]) {
  const int64_t e = pos.block * run.block_size + (step * group_size + pos.lane) * kE;
  if (!pos.active) {
#pragma unroll
    for (int k = 0; k < kE; ++k) v[k] = 0.0f;
    return e;
  }
  const T* chunk = static_cast<const T*>(run.x) + pos.row * run.m;
  load8(chunk, e, run.m, v);
  if constexpr (kFeedback) {
    uint8_t bytes[kE];
    load_residual8(run.residual + pos.row * run.m, e, run.m, bytes);
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      // x + float(r) * coefficient * factor, left to right, each operation rounded.
      const float r = __fmul_rn(__fmul_rn(fp8_to_float(bytes[k]), coefficient), run.factor);
      v[k] = e + k < run.m ? __fadd_rn(v[k], r) : 0.0f;
    }
  }
  return e;
}

__device__ __forceinline__ float group_absmax(float absmax, int group_size) {
  for (int offset = group_size / 2; offset > 0; offset /= 2) {
    absmax = max_nan(absmax, __shfl_xor_sync(0xffffffffu, absmax, offset));
  }
  return absmax;
}

template <typename T, int kBits, bool kFeedback>
__global__ void __launch_bounds__(kQuantBlockThreads)
    quantize_kernel(const QuantizeRun run, int group_size, int64_t row_offset) {
  const BlockPosition pos = block_position(run, group_size, row_offset);
  const int64_t steps = run.block_size / (kE * group_size);
  const float coefficient = kFeedback && pos.active ? run.coefficient[pos.row] : 0.0f;
  const float qmax = static_cast<float>(quant_qmax(kBits));

  float cached[kCachedSteps][kE];
  float absmax = 0.0f;
#pragma unroll
  for (int s = 0; s < kCachedSteps; ++s) {
    if (s < steps) {
      load_step<T, kFeedback>(run, pos, group_size, s, coefficient, cached[s]);
#pragma unroll
      for (int k = 0; k < kE; ++k) absmax = max_nan(absmax, fabsf(cached[s][k]));
    }
  }
  for (int64_t s = kCachedSteps; s < steps; ++s) {
    float v[kE];
    load_step<T, kFeedback>(run, pos, group_size, s, coefficient, v);
#pragma unroll
    for (int k = 0; k < kE; ++k) absmax = max_nan(absmax, fabsf(v[k]));
  }
  absmax = group_absmax(absmax, group_size);
  if (!pos.active) return;  // past the shuffles: nothing else is shared

  uint8_t* row = run.packed + pos.row * run.row_bytes;
  const float inv = quant_inverse(absmax, qmax);
  if (pos.lane == 0) {
    const float scale = quant_scale(absmax, qmax);
    reinterpret_cast<float*>(row + quant_data_bytes(run.m, kBits, run.block_size))[pos.block] =
        scale;
  }
  auto quantize_store = [&](int64_t s, const float (&v)[kE]) {
    int q[kE];
#pragma unroll
    for (int k = 0; k < kE; ++k) q[k] = quantize_element(v[k], inv, qmax);
    store_q8<kBits>(row, pos.block * run.block_size + (s * group_size + pos.lane) * kE, q);
  };
#pragma unroll
  for (int s = 0; s < kCachedSteps; ++s) {
    if (s < steps) quantize_store(s, cached[s]);
  }
  for (int64_t s = kCachedSteps; s < steps; ++s) {
    float v[kE];
    load_step<T, kFeedback>(run, pos, group_size, s, coefficient, v);
    quantize_store(s, v);
  }
}

// new_scale[row] from the row's finished scales, one CUDA block per row.
template <int kBits>
__global__ void __launch_bounds__(kQuantBlockThreads)
    residual_scale_kernel(const QuantizeRun run, float* new_scale, int64_t row_offset) {
  const int64_t row = run.first_row + row_offset + blockIdx.y;
  const int64_t nb = quant_blocks(run.m, run.block_size);
  const float* scales = reinterpret_cast<const float*>(
      run.packed + row * run.row_bytes + quant_data_bytes(run.m, kBits, run.block_size));
  float max_scale = 0.0f;
  for (int64_t b = threadIdx.x; b < nb; b += kQuantBlockThreads) {
    max_scale = max_nan(max_scale, scales[b]);
  }
  __shared__ float partial[kQuantBlockThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    max_scale = max_nan(max_scale, __shfl_xor_sync(0xffffffffu, max_scale, offset));
  }
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = max_scale;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kQuantBlockThreads / 32; ++w) max_scale = max_nan(max_scale, partial[w]);
  new_scale[row] = max_scale != max_scale ? 0.0f : residual_scale_of(max_scale);
}

template <typename T, int kBits>
__global__ void __launch_bounds__(kQuantBlockThreads)
    encode_residual_kernel(const QuantizeRun run, const float* new_scale, int group_size,
                           int64_t row_offset) {
  const BlockPosition pos = block_position(run, group_size, row_offset);
  if (!pos.active) return;  // no shuffles here
  const int64_t steps = run.block_size / (kE * group_size);
  const float s_new = new_scale[pos.row];
  const float coefficient = run.coefficient[pos.row];
  const uint8_t* row = run.packed + pos.row * run.row_bytes;
  const float scale = reinterpret_cast<const float*>(
      row + quant_data_bytes(run.m, kBits, run.block_size))[pos.block];
  uint8_t* residual = run.residual + pos.row * run.m;
  for (int64_t s = 0; s < steps; ++s) {
    uint8_t bytes[kE];
    float v[kE];
    const int64_t e = load_step<T, true>(run, pos, group_size, s, coefficient, v);
    if (e >= run.m) break;
    if (s_new == 0.0f) {
#pragma unroll
      for (int k = 0; k < kE; ++k) bytes[k] = 0;
    } else {
      float q[kE];
      load_q8<kBits>(row, e, q);
#pragma unroll
      for (int k = 0; k < kE; ++k) {
        const float err = __fsub_rn(v[k], __fmul_rn(q[k], scale));
        bytes[k] = fp8_from_float(residual_code(err, s_new));
      }
    }
    store_residual8(residual, e, run.m, bytes);
  }
}

// The G of a block size: the largest power of two dividing B / 8, at most 32.
int group_size_of(int64_t block_size) {
  int g = 1;
  while (g < 32 && (block_size / kE) % (2 * g) == 0) g *= 2;
  return g;
}

// The grid of the quantize and encode kernels over a run's chunks: `group` threads per
// quantization block, a CUDA block holding kQuantBlockThreads / group of them, grid_x CUDA blocks
// along a chunk (its rows in grid y, kMaxGridY at a time).
struct QuantGrid {
  int group;
  int64_t grid_x;
};

QuantGrid quant_grid(const QuantizeRun& run) {
  const int group = group_size_of(run.block_size);
  const int64_t groups = kQuantBlockThreads / group;
  const int64_t nb = quant_blocks(run.m, run.block_size);
  return {group, (nb + groups - 1) / groups};
}

template <typename T, int kBits>
cudaError_t launch_quantize_typed(const QuantizeRun& run, cudaStream_t stream) {
  const auto [group, grid_x] = quant_grid(run);
  if (grid_x > 0x7fffffff) return cudaErrorInvalidValue;
  for (int64_t offset = 0; offset < run.num_rows; offset += kMaxGridY) {
    const dim3 grid(static_cast<unsigned>(grid_x),
                    static_cast<unsigned>(std::min(kMaxGridY, run.num_rows - offset)));
    if (run.residual != nullptr) {
      quantize_kernel<T, kBits, true><<<grid, kQuantBlockThreads, 0, stream>>>(run, group, offset);
    } else {
      quantize_kernel<T, kBits, false><<<grid, kQuantBlockThreads, 0, stream>>>(run, group,
                                                                                offset);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, int kBits>
cudaError_t launch_encode_typed(const QuantizeRun& run, float* new_scale, cudaStream_t stream) {
  const auto [group, grid_x] = quant_grid(run);
  if (grid_x > 0x7fffffff) return cudaErrorInvalidValue;
  for (int64_t offset = 0; offset < run.num_rows; offset += kMaxGridY) {
    const unsigned rows = static_cast<unsigned>(std::min(kMaxGridY, run.num_rows - offset));
    residual_scale_kernel<kBits>
        <<<dim3(1, rows), kQuantBlockThreads, 0, stream>>>(run, new_scale, offset);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    encode_residual_kernel<T, kBits><<<dim3(static_cast<unsigned>(grid_x), rows),
                                       kQuantBlockThreads, 0, stream>>>(run, new_scale, group,
                                                                        offset);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The exact row's 8 elements at e, whatever its element type (uniform across the launch).
__device__ __forceinline__ void load_exact8(const DequantizeRun& run, int64_t chunk, int64_t e,
                                            float (&v)[kE]) {
  const int64_t offset = chunk * run.m;
  switch (run.exact_type) {
    case ElementType::kFloat32:
      return load8(static_cast<const float*>(run.exact) + offset, e, run.m, v);
    case ElementType::kBFloat16:
      return load8(static_cast<const __nv_bfloat16*>(run.exact) + offset, e, run.m, v);
    case ElementType::kFloat16:
      return load8(static_cast<const __half*>(run.exact) + offset, e, run.m, v);
  }
}

template <typename Out, int kBits, bool kSum>
__global__ void __launch_bounds__(kQuantBlockThreads)
    dequantize_kernel(const DequantizeRun run, int64_t chunk_offset) {
  const int64_t chunk = chunk_offset + blockIdx.y;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * kQuantBlockThreads + threadIdx.x) * kE;
  if (e >= run.m) return;
  const int64_t block = e / run.block_size;
  const int64_t scales_offset = quant_data_bytes(run.m, kBits, run.block_size);
  Out* out = static_cast<Out*>(run.out) + chunk * run.m;
  float acc[kE];
  float q[kE];
  if constexpr (!kSum) {
    const uint8_t* row = run.packed + chunk * run.row_bytes;
    const float scale = reinterpret_cast<const float*>(row + scales_offset)[block];
    load_q8<kBits>(row, e, q);
#pragma unroll
    for (int k = 0; k < kE; ++k) acc[k] = __fmul_rn(q[k], scale);
  } else {
    if (run.accumulate) {
      load8(out, e, run.m, acc);
    } else {
#pragma unroll
      for (int k = 0; k < kE; ++k) acc[k] = 0.0f;
    }
    for (int64_t i = 0; i < run.k; ++i) {
      if (i == run.exact_index) {
        load_exact8(run, chunk, e, q);
#pragma unroll
        for (int k = 0; k < kE; ++k) acc[k] = __fadd_rn(acc[k], q[k]);
        continue;
      }
      const uint8_t* row = run.packed + (i * run.g + chunk) * run.row_bytes;
      const float scale = reinterpret_cast<const float*>(row + scales_offset)[block];
      load_q8<kBits>(row, e, q);
#pragma unroll
      for (int k = 0; k < kE; ++k) acc[k] = __fadd_rn(acc[k], __fmul_rn(q[k], scale));
    }
  }
  store8(out, e, run.m, acc);
}

template <typename Out, int kBits>
cudaError_t launch_dequantize_typed(const DequantizeRun& run, cudaStream_t stream) {
  const int64_t per_block = static_cast<int64_t>(kQuantBlockThreads) * kE;
  const int64_t grid_x = (run.m + per_block - 1) / per_block;
  if (grid_x > 0x7fffffff) return cudaErrorInvalidValue;
  for (int64_t offset = 0; offset < run.g; offset += kMaxGridY) {
    const dim3 grid(static_cast<unsigned>(grid_x),
                    static_cast<unsigned>(std::min(kMaxGridY, run.g - offset)));
    if (run.sum) {
      dequantize_kernel<Out, kBits, true><<<grid, kQuantBlockThreads, 0, stream>>>(run, offset);
    } else {
      dequantize_kernel<Out, kBits, false><<<grid, kQuantBlockThreads, 0, stream>>>(run, offset);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

namespace {

template <typename T>
struct TypeTag {
  using type = T;
};
template <int Bits>
struct BitsTag {
  static constexpr int value = Bits;
};

// Calls launch(TypeTag<element type>{}, BitsTag<bits>{}) for the run's element type and
// width: the one place the (dtype x bits) instantiations are spelled out.
template <typename Launch>
cudaError_t dispatch(ElementType type, int bits, Launch&& launch) {
  switch (type) {
    case ElementType::kFloat32:
      return bits == 8 ? launch(TypeTag<float>{}, BitsTag<8>{})
                       : launch(TypeTag<float>{}, BitsTag<4>{});
    case ElementType::kBFloat16:
      return bits == 8 ? launch(TypeTag<__nv_bfloat16>{}, BitsTag<8>{})
                       : launch(TypeTag<__nv_bfloat16>{}, BitsTag<4>{});
    case ElementType::kFloat16:
      return bits == 8 ? launch(TypeTag<__half>{}, BitsTag<8>{})
                       : launch(TypeTag<__half>{}, BitsTag<4>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_quantize_rows(const QuantizeRun& run, cudaStream_t stream) {
  if (run.num_rows <= 0 || run.m == 0) return cudaSuccess;
  return dispatch(run.x_type, run.bits, [&](auto t, auto b) {
    return launch_quantize_typed<typename decltype(t)::type, decltype(b)::value>(run, stream);
  });
}

cudaError_t launch_encode_residual(const QuantizeRun& run, float* new_scale,
                                   cudaStream_t stream) {
  if (run.num_rows <= 0 || run.m == 0) return cudaSuccess;
  return dispatch(run.x_type, run.bits, [&](auto t, auto b) {
    return launch_encode_typed<typename decltype(t)::type, decltype(b)::value>(run, new_scale,
                                                                              stream);
  });
}

cudaError_t launch_dequantize(const DequantizeRun& run, cudaStream_t stream) {
  if (run.m == 0 || run.g == 0) return cudaSuccess;
  return dispatch(run.out_type, run.bits, [&](auto t, auto b) {
    return launch_dequantize_typed<typename decltype(t)::type, decltype(b)::value>(run, stream);
  });
}

}  // namespace zero_ext::kernels::cuda
