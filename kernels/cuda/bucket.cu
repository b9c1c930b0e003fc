// Multi-tensor bucket copy kernels and their host launchers (declared in kernels/cuda/bucket.cuh).
//
// Built by setup.py in a CUDA build only; called by csrc/bucket_cuda.cu. Each thread block copies
// one chunk of one tensor. The per-launch table of tensors travels by value as a kernel argument,
// so a launch needs no host-to-device copy; a block finds its tensor by binary search over the
// table's running chunk counts, so a launch has no limit on its number of chunks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernels/adamw_math.h"
#include "kernels/cuda/bucket.cuh"
#include "kernels/cuda/elements.cuh"

namespace zero_ext::kernels::cuda {
namespace {

// Elements per thread per loop iteration: 16 bytes of a 16-bit type, 32 bytes of fp32, read and
// written as whole uint4 accesses.
constexpr int kIlp = 8;
constexpr int kMaxSlots = kBucketMaxTensorsPerLaunch;

// Everything one launch reads besides flat and scale, passed by value (kernel parameter space,
// served from the constant cache). Slot s covers blocks [first_block[s], first_block[s + 1]).
struct BucketLaunchMeta {
  void* data[kMaxSlots];
  int64_t flat_offset[kMaxSlots];
  int64_t numel[kMaxSlots];
  int32_t first_block[kMaxSlots + 1];
  int32_t num_slots;
  uint8_t type[kMaxSlots];  // an ElementType
};

// The 4 KB bound is the classic kernel-parameter limit; the extra two are flat and scale.
static_assert(sizeof(BucketLaunchMeta) + sizeof(void*) + sizeof(float) <= 4096,
              "launch metadata exceeds 4 KB");
static_assert(kBucketChunkElements % (kBucketBlockThreads * kIlp) == 0,
              "every full chunk is a whole number of vector iterations");
static_assert(kBucketChunkElements * sizeof(uint16_t) % 16 == 0,
              "a chunk starts as aligned as its tensor");

// kIlp consecutive elements of T as kWords<T> 16-byte accesses.
template <typename T>
constexpr int kWords = kIlp * sizeof(T) / sizeof(uint4);

template <typename T>
__device__ __forceinline__ void copy_vec(const T* src, T* dst) {
#pragma unroll
  for (int w = 0; w < kWords<T>; ++w) {
    reinterpret_cast<uint4*>(dst)[w] = reinterpret_cast<const uint4*>(src)[w];
  }
}

// One element's new value. The _rn intrinsics are never contracted into an FMA, whatever nvcc's
// --fmad setting, so the result rounds as ATen's op-by-op reference (a * s, then + b) does.
template <bool kScaled, bool kAccumulate>
__device__ __forceinline__ float combine(float x, float old, float scale) {
  if constexpr (kScaled) x = __fmul_rn(x, scale);
  if constexpr (kAccumulate) x = __fadd_rn(old, x);
  return x;
}

// dst[0, n) from src[0, n) by one thread block. Src, Dst: float, __nv_bfloat16 or __half.
// No __restrict__: src and dst may be the same memory (an in-place update of a view of flat).
template <typename Src, typename Dst, bool kScaled, bool kAccumulate>
__device__ __forceinline__ void copy_chunk(const Src* src, Dst* dst, int n, float scale) {
  // A plain same-type copy moves bits, never converting (not even a NaN's payload changes).
  constexpr bool kRaw = std::is_same_v<Src, Dst> && !kScaled && !kAccumulate;
  if (vec_aligned<kIlp>(src) && vec_aligned<kIlp>(dst)) {
    // Whole vectors first; only a tensor's last chunk can leave up to kIlp - 1 elements over.
    const int n_vec = n & ~(kIlp - 1);
    for (int i = threadIdx.x * kIlp; i < n_vec; i += kBucketBlockThreads * kIlp) {
      if constexpr (kRaw) {
        copy_vec(src + i, dst + i);
      } else {
        float x[kIlp];
        float old[kIlp];
        load_vec(src + i, x);
        if constexpr (kAccumulate) load_vec(dst + i, old);
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          x[k] = combine<kScaled, kAccumulate>(x[k], kAccumulate ? old[k] : 0.0f, scale);
        }
        store_vec(dst + i, x);
      }
    }
    for (int i = n_vec + static_cast<int>(threadIdx.x); i < n; i += kBucketBlockThreads) {
      if constexpr (kRaw) {
        dst[i] = src[i];
      } else {
        const float old = kAccumulate ? to_float(dst[i]) : 0.0f;
        dst[i] = from_float<Dst>(combine<kScaled, kAccumulate>(to_float(src[i]), old, scale));
      }
    }
    return;
  }

  // Misaligned range (an odd offset into flat, or a view at an odd offset): scalar accesses,
  // still kIlp independent elements per thread so as many loads are in flight as on the vector
  // path.
  for (int base = 0; base < n; base += kBucketBlockThreads * kIlp) {
    if constexpr (kRaw) {
      Src x[kIlp];
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int i = base + static_cast<int>(threadIdx.x) + k * kBucketBlockThreads;
        if (i < n) x[k] = src[i];
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int i = base + static_cast<int>(threadIdx.x) + k * kBucketBlockThreads;
        if (i < n) dst[i] = x[k];
      }
    } else {
      float x[kIlp];
      float old[kIlp];
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int i = base + static_cast<int>(threadIdx.x) + k * kBucketBlockThreads;
        const bool in = i < n;
        x[k] = in ? to_float(src[i]) : 0.0f;
        old[k] = in && kAccumulate ? to_float(dst[i]) : 0.0f;
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int i = base + static_cast<int>(threadIdx.x) + k * kBucketBlockThreads;
        if (i < n) dst[i] = from_float<Dst>(combine<kScaled, kAccumulate>(x[k], old[k], scale));
      }
    }
  }
}

template <typename Flat, typename Tensor, bool kIntoFlat, bool kScaled, bool kAccumulate>
__device__ __forceinline__ void copy_slot(Flat* flat, void* data, int64_t begin, int n,
                                          float scale) {
  Tensor* tensor = static_cast<Tensor*>(data) + begin;
  if constexpr (kIntoFlat) {
    copy_chunk<Tensor, Flat, kScaled, kAccumulate>(tensor, flat, n, scale);
  } else {
    copy_chunk<Flat, Tensor, false, false>(flat, tensor, n, scale);
  }
}

// Flat: float, __nv_bfloat16 or __half. The tensors' types are read per block from the table:
// the switch below is uniform across a block, so mixing types costs no divergence.
template <typename Flat, bool kIntoFlat, bool kScaled, bool kAccumulate>
__global__ void __launch_bounds__(kBucketBlockThreads)
    bucket_copy_kernel(const BucketLaunchMeta meta, Flat* flat, float scale) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  // The last slot whose first block is at or before this one.
  int lo = 0;
  int hi = meta.num_slots - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int slot = lo;
  // int64: a chunk of a tensor past 2^31 elements starts past 2^31.
  const int64_t begin = static_cast<int64_t>(block - meta.first_block[slot]) * kBucketChunkElements;
  const int64_t remaining = meta.numel[slot] - begin;
  const int n =
      remaining < kBucketChunkElements ? static_cast<int>(remaining) : kBucketChunkElements;
  Flat* slice = flat + meta.flat_offset[slot] + begin;
  switch (static_cast<ElementType>(meta.type[slot])) {
    case ElementType::kFloat32:
      return copy_slot<Flat, float, kIntoFlat, kScaled, kAccumulate>(slice, meta.data[slot], begin,
                                                                     n, scale);
    case ElementType::kBFloat16:
      return copy_slot<Flat, __nv_bfloat16, kIntoFlat, kScaled, kAccumulate>(slice, meta.data[slot],
                                                                             begin, n, scale);
    case ElementType::kFloat16:
      return copy_slot<Flat, __half, kIntoFlat, kScaled, kAccumulate>(slice, meta.data[slot], begin,
                                                                      n, scale);
  }
}

template <typename Flat, bool kIntoFlat, bool kScaled, bool kAccumulate>
cudaError_t launch_typed(Flat* flat, const BucketCudaTensor* tensors, int64_t num_tensors,
                         float scale, cudaStream_t stream) {
  BucketLaunchMeta meta;
  meta.num_slots = 0;
  int64_t num_blocks = 0;
  auto launch = [&]() {
    meta.first_block[meta.num_slots] = static_cast<int32_t>(num_blocks);
    bucket_copy_kernel<Flat, kIntoFlat, kScaled, kAccumulate>
        <<<static_cast<unsigned int>(num_blocks), kBucketBlockThreads, 0, stream>>>(meta, flat,
                                                                                    scale);
    meta.num_slots = 0;
    num_blocks = 0;
    return cudaGetLastError();
  };

  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();
  for (int64_t t = 0; t < num_tensors; ++t) {
    const BucketCudaTensor& tensor = tensors[t];
    if (tensor.numel <= 0) continue;
    const int64_t num_chunks = (tensor.numel + kBucketChunkElements - 1) / kBucketChunkElements;
    if (num_chunks > kMaxBlocks) return cudaErrorInvalidValue;
    if (num_blocks + num_chunks > kMaxBlocks) {
      const cudaError_t err = launch();
      if (err != cudaSuccess) return err;
    }
    const int slot = meta.num_slots++;
    meta.data[slot] = tensor.data;
    meta.flat_offset[slot] = tensor.flat_offset;
    meta.numel[slot] = tensor.numel;
    meta.type[slot] = static_cast<uint8_t>(tensor.type);
    meta.first_block[slot] = static_cast<int32_t>(num_blocks);
    num_blocks += num_chunks;
    if (meta.num_slots == kMaxSlots) {
      const cudaError_t err = launch();
      if (err != cudaSuccess) return err;
    }
  }
  return meta.num_slots > 0 ? launch() : cudaSuccess;
}

template <typename Flat>
cudaError_t launch_into_flat(Flat* flat, const BucketCudaTensor* tensors, int64_t num_tensors,
                             float scale, bool accumulate, cudaStream_t stream) {
  // Exactly 1 multiplies nothing: the copy stays bit-exact, signalling NaNs included.
  if (scale != 1.0f) {
    return accumulate
               ? launch_typed<Flat, true, true, true>(flat, tensors, num_tensors, scale, stream)
               : launch_typed<Flat, true, true, false>(flat, tensors, num_tensors, scale, stream);
  }
  return accumulate
             ? launch_typed<Flat, true, false, true>(flat, tensors, num_tensors, scale, stream)
             : launch_typed<Flat, true, false, false>(flat, tensors, num_tensors, scale, stream);
}

}  // namespace

cudaError_t launch_flatten_into(void* flat, ElementType flat_type, const BucketCudaTensor* tensors,
                                int64_t num_tensors, float scale, bool accumulate,
                                cudaStream_t stream) {
  switch (flat_type) {
    case ElementType::kFloat32:
      return launch_into_flat(static_cast<float*>(flat), tensors, num_tensors, scale, accumulate,
                              stream);
    case ElementType::kBFloat16:
      return launch_into_flat(static_cast<__nv_bfloat16*>(flat), tensors, num_tensors, scale,
                              accumulate, stream);
    case ElementType::kFloat16:
      return launch_into_flat(static_cast<__half*>(flat), tensors, num_tensors, scale, accumulate,
                              stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_unflatten_from(const void* flat, ElementType flat_type,
                                  const BucketCudaTensor* tensors, int64_t num_tensors,
                                  cudaStream_t stream) {
  // The kernel never writes flat in this direction; one kernel template serves both, so the
  // pointer travels without const.
  void* flat_data = const_cast<void*>(flat);
  switch (flat_type) {
    case ElementType::kFloat32:
      return launch_typed<float, false, false, false>(static_cast<float*>(flat_data), tensors,
                                                      num_tensors, 1.0f, stream);
    case ElementType::kBFloat16:
      return launch_typed<__nv_bfloat16, false, false, false>(
          static_cast<__nv_bfloat16*>(flat_data), tensors, num_tensors, 1.0f, stream);
    case ElementType::kFloat16:
      return launch_typed<__half, false, false, false>(static_cast<__half*>(flat_data), tensors,
                                                       num_tensors, 1.0f, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zero_ext::kernels::cuda
