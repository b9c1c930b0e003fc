// Scaled masked softmax + dropout CUDA kernels: one block per row, fp32 math. The forward
// stages a row of up to 8192 keys in shared memory across its three sweeps (max, sum, write),
// and recomputes the logits in each sweep for longer rows. The dropout keep-mask is drawn one
// Philox call per four elements (a group of four consecutive global indices per thread).
// Interface: kernels/cuda/softmax.cuh; formulas: kernels/softmax_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/softmax.cuh"

namespace zero_ext::kernels::cuda {
namespace {

constexpr int kWarps = kSoftmaxBlockThreads / 32;
// Enough blocks to fill any GPU; each loops over rows beyond the grid.
constexpr int64_t kMaxBlocks = 1 << 16;

struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// The reduction of v over the block, returned to every thread. smem: kWarps floats.
template <typename Op>
__device__ float block_reduce(float v, float* smem, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  // Each aligned group of kWarps lanes reduces the kWarps partials (a power of two): every lane
  // ends with the whole block's value, each partial counted once.
  static_assert((kWarps & (kWarps - 1)) == 0 && kWarps <= 32, "kWarps: a power of two <= 32");
  float total = smem[lane % kWarps];
  for (int o = kWarps / 2; o > 0; o >>= 1) {
    total = op(total, __shfl_xor_sync(0xffffffffu, total, o));
  }
  return total;
}

// scale * x_j + mask_j over row r (mask pointer already at the row).
template <typename T>
__device__ float logit(const SoftmaxRun& run, const T* x, const void* mask, int64_t j) {
  float z = to_float(x[j]) * static_cast<float>(run.scale);
  if (run.mask_kind == SoftmaxMask::kAdditive) {
    z += to_float(static_cast<const T*>(mask)[j]);
  } else if (run.mask_kind == SoftmaxMask::kBool && !static_cast<const bool*>(mask)[j]) {
    z = -INFINITY;
  }
  return z;
}

// Calls f(j, kept) for the elements of row r that this thread owns: groups of four consecutive
// global indices, one Philox call each (every element kept without dropout).
template <typename F>
__device__ void for_row_groups(const SoftmaxRun& run, int64_t r, F f) {
  const int64_t base = r * run.k, end = base + run.k;
  for (int64_t g = base / 4 + threadIdx.x; g * 4 < end; g += blockDim.x) {
    Philox4 bits{};
    if (run.dropout) bits = philox4x32_10(static_cast<uint64_t>(g), run.seed);
    for (int e = 0; e < 4; ++e) {
      const int64_t index = g * 4 + e;
      if (index >= base && index < end) f(index - base, !run.dropout || bits.v[e] >= run.threshold);
    }
  }
}

// kStaged: the row's logits, then exponentials, live in dynamic shared memory (k floats), so x
// and the mask are read once; otherwise each sweep recomputes them from global memory.
template <typename T, bool kStaged>
__global__ void __launch_bounds__(kSoftmaxBlockThreads) softmax_forward_kernel(SoftmaxRun run) {
  __shared__ float smem[kWarps];
  extern __shared__ float staged[];
  const float keep_scale = to_float(from_float<T>(static_cast<float>(run.keep_scale)));
  for (int64_t r = blockIdx.x; r < run.rows; r += gridDim.x) {
    const T* x = static_cast<const T*>(run.x) + r * run.k;
    const void* mask = nullptr;
    if (run.mask_kind == SoftmaxMask::kAdditive) {
      mask = static_cast<const T*>(run.mask) + softmax_mask_offset(run, r);
    } else if (run.mask_kind == SoftmaxMask::kBool) {
      mask = static_cast<const bool*>(run.mask) + softmax_mask_offset(run, r);
    }
    const int64_t n = softmax_row_extent(run, r);
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float z = logit(run, x, mask, j);
      if (kStaged) staged[j] = z;
      m = fmaxf(m, z);
    }
    m = block_reduce(m, smem, Max{});
    const bool attended = m != -INFINITY;  // else a fully masked row: zeros
    // Each thread reads back only the staged elements it wrote until the barrier in
    // block_reduce; the write sweep below reads them in another order.
    auto exp_of = [&](int64_t j) {
      return kStaged ? staged[j] : expf(logit(run, x, mask, j) - m);
    };
    float part = 0.0f;
    if (attended) {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf((kStaged ? staged[j] : logit(run, x, mask, j)) - m);
        if (kStaged) staged[j] = e;
        part += e;
      }
    }
    const float inv = 1.0f / block_reduce(part, smem, Sum{});
    T* out = static_cast<T*>(run.out) + r * run.k;
    T* probs = run.dropout ? static_cast<T*>(run.probs_out) + r * run.k : out;
    for_row_groups(run, r, [&](int64_t j, bool kept) {
      const T s = from_float<T>(attended && j < n ? exp_of(j) * inv : 0.0f);
      probs[j] = s;
      if (run.dropout) out[j] = from_float<T>(kept ? to_float(s) * keep_scale : 0.0f);
    });
    if (kStaged) __syncthreads();  // the next row overwrites staged
  }
}

template <typename T>
__global__ void __launch_bounds__(kSoftmaxBlockThreads) softmax_backward_kernel(SoftmaxRun run) {
  __shared__ float smem[kWarps];
  const float keep_scale = to_float(from_float<T>(static_cast<float>(run.keep_scale)));
  const float scale = static_cast<float>(run.scale);
  for (int64_t r = blockIdx.x; r < run.rows; r += gridDim.x) {
    const T* dy = static_cast<const T*>(run.grad_out) + r * run.k;
    const T* s = static_cast<const T*>(run.probs) + r * run.k;
    T* dx = static_cast<T*>(run.out) + r * run.k;
    // The gradient at the softmax output, through the dropout.
    auto grad = [&](int64_t j, bool kept) {
      if (!run.dropout) return to_float(dy[j]);
      return kept ? to_float(from_float<T>(to_float(dy[j]) * keep_scale)) : 0.0f;
    };
    float part = 0.0f;
    for_row_groups(run, r, [&](int64_t j, bool kept) { part += grad(j, kept) * to_float(s[j]); });
    const float dot = block_reduce(part, smem, Sum{});
    for_row_groups(run, r, [&](int64_t j, bool kept) {
      dx[j] = from_float<T>(scale * (to_float(s[j]) * (grad(j, kept) - dot)));
    });
  }
}

__global__ void dropout_keep_mask_kernel(bool* keep, int64_t n, uint64_t seed, uint32_t threshold,
                                         bool none_dropped) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    keep[i] = none_dropped || dropout_keep(seed, static_cast<uint64_t>(i), threshold);
  }
}

template <template <typename> class Launch>
cudaError_t dispatch(const SoftmaxRun& run, cudaStream_t stream) {
  if (run.rows == 0 || run.k == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(run.rows, kMaxBlocks)));
  switch (run.type) {
    case cpu::NormType::kFloat32:
      Launch<float>::run(grid, run, stream);
      break;
    case cpu::NormType::kBFloat16:
      Launch<__nv_bfloat16>::run(grid, run, stream);
      break;
    case cpu::NormType::kFloat16:
      Launch<__half>::run(grid, run, stream);
      break;
    case cpu::NormType::kFloat64:
      return cudaErrorInvalidValue;  // the glue rejects fp64 on CUDA
  }
  return cudaGetLastError();
}

// Rows up to this many keys are staged in shared memory (32 KiB of the 48 KiB a block may
// take without opting in).
constexpr int64_t kMaxStagedKeys = 8192;

template <typename T>
struct LaunchForward {
  static void run(dim3 grid, const SoftmaxRun& run, cudaStream_t stream) {
    if (run.k <= kMaxStagedKeys) {
      const size_t bytes = static_cast<size_t>(run.k) * sizeof(float);
      softmax_forward_kernel<T, true><<<grid, kSoftmaxBlockThreads, bytes, stream>>>(run);
    } else {
      softmax_forward_kernel<T, false><<<grid, kSoftmaxBlockThreads, 0, stream>>>(run);
    }
  }
};

template <typename T>
struct LaunchBackward {
  static void run(dim3 grid, const SoftmaxRun& run, cudaStream_t stream) {
    softmax_backward_kernel<T><<<grid, kSoftmaxBlockThreads, 0, stream>>>(run);
  }
};

}  // namespace

cudaError_t launch_softmax_forward(const SoftmaxRun& run, cudaStream_t stream) {
  return dispatch<LaunchForward>(run, stream);
}

cudaError_t launch_softmax_backward(const SoftmaxRun& run, cudaStream_t stream) {
  return dispatch<LaunchBackward>(run, stream);
}

cudaError_t launch_dropout_keep_mask(bool* keep, int64_t n, uint64_t seed, uint32_t threshold,
                                     bool none_dropped, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
  dropout_keep_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      keep, n, seed, threshold, none_dropped);
  return cudaGetLastError();
}

}  // namespace zero_ext::kernels::cuda
