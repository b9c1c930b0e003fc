// Multi-tensor AdamW kernels and their host launcher (declared in kernels/cuda/adamw.cuh).
//
// Built by setup.py in a CUDA build only; called by csrc/adamw_cuda.cu. Each thread block updates
// one 64K-element chunk of one tensor; the per-launch tables that map blocks to (tensor, chunk)
// travel by value as a kernel argument, so a launch needs no host-to-device copy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernels/adamw_math.h"
#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/elements.cuh"

namespace zero_ext::kernels::cuda {
namespace {

// Elements per thread per loop iteration: one 16-byte fp32 access per array.
constexpr int kIlp = 4;

// Everything one launch reads, passed by value (kernel parameter space, served from the constant
// cache). Per-tensor arrays are indexed by slot, the block tables by blockIdx.x.
struct LaunchMeta {
  float* param[kMaxTensorsPerLaunch];
  const void* grad[kMaxTensorsPerLaunch];
  float* exp_avg[kMaxTensorsPerLaunch];
  float* exp_avg_sq[kMaxTensorsPerLaunch];
  void* param_16bit[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  float step_size[kMaxTensorsPerLaunch];
  float bias_correction2_sqrt[kMaxTensorsPerLaunch];
  // Coefficients shared by every tensor of the call, derived with inv_scale = 1.
  AdamWCoefficients<float> common;
  int32_t block_chunk[kMaxBlocksPerLaunch];   // chunk index within the block's tensor
  uint8_t block_tensor[kMaxBlocksPerLaunch];  // slot of the block's tensor
};

// The 4 KB bound is the classic kernel-parameter limit; the two extra pointers are the kernel's
// other arguments.
static_assert(sizeof(LaunchMeta) + 2 * sizeof(void*) <= 4096, "launch metadata exceeds 4 KB");
static_assert(kMaxTensorsPerLaunch <= std::numeric_limits<uint8_t>::max() + 1,
              "block_tensor is a uint8_t slot index");
static_assert(kChunkElements % (kBlockThreads * kIlp) == 0,
              "every full chunk is a whole number of vector iterations");

// float whose arithmetic always rounds each operation on its own. nvcc contracts a * b + c into
// one FMA by default (--fmad=true), which would round differently from the CPU kernels (built
// with -ffp-contract=off) and from torch.optim's op-by-op reference; the _rn intrinsics are never
// contracted, whatever the build flags. adamw_update is written once for any T, so the CUDA
// kernel runs the very same sequence of operations through this type.
struct RnFloat {
  float x;
  RnFloat() = default;
  __host__ __device__ __forceinline__ RnFloat(float value) : x(value) {}
};
__device__ __forceinline__ RnFloat operator+(RnFloat a, RnFloat b) { return __fadd_rn(a.x, b.x); }
__device__ __forceinline__ RnFloat operator-(RnFloat a, RnFloat b) { return __fsub_rn(a.x, b.x); }
__device__ __forceinline__ RnFloat operator*(RnFloat a, RnFloat b) { return __fmul_rn(a.x, b.x); }
__device__ __forceinline__ RnFloat operator/(RnFloat a, RnFloat b) { return __fdiv_rn(a.x, b.x); }

struct RnSqrt {
  __device__ __forceinline__ RnFloat operator()(RnFloat v) const { return __fsqrt_rn(v.x); }
};

__device__ __forceinline__ void update(float& p, float& m, float& v, float g,
                                       const AdamWCoefficients<RnFloat>& c) {
  RnFloat rp(p), rm(m), rv(v);
  adamw_update(rp, rm, rv, RnFloat(g), c, RnSqrt{});
  p = rp.x;
  m = rm.x;
  v = rv.x;
}

// Grad: float, __nv_bfloat16 or __half. Copy: void (no 16-bit copy), __nv_bfloat16 or __half.
template <typename Grad, typename Copy>
__global__ void __launch_bounds__(kBlockThreads)
    adamw_multi_tensor_kernel(const LaunchMeta meta, const float* __restrict__ inv_scale,
                              const float* __restrict__ found_inf) {
  // A skipped step must leave every tensor untouched; the launcher never reads the flag itself.
  if (found_inf != nullptr && *found_inf != 0.0f) return;

  const int slot = meta.block_tensor[blockIdx.x];
  // int64: a chunk of a tensor past 2^31 elements starts past 2^31.
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t remaining = meta.numel[slot] - begin;
  const int n = remaining < kChunkElements ? static_cast<int>(remaining) : kChunkElements;

  AdamWCoefficients<float> cf = meta.common;
  cf.step_size = meta.step_size[slot];
  cf.bias_correction2_sqrt = meta.bias_correction2_sqrt[slot];
  // The host folded maximize into grad_factor = +-1, so this is exactly +-inv_scale, the value
  // the CPU kernel gets from adamw_coefficients(h, step, inv_scale).
  if (inv_scale != nullptr) cf.grad_factor = __fmul_rn(cf.grad_factor, *inv_scale);
  const AdamWCoefficients<RnFloat> c = cf.template as<RnFloat>();

  float* __restrict__ p = meta.param[slot] + begin;
  // Not __restrict__: the 16-bit copy may be written into the gradient's own memory (the op
  // allows it; each element is read before the same thread overwrites it), so the gradient must
  // not be read through the read-only cache, which assumes nothing writes it during the kernel.
  const Grad* g = static_cast<const Grad*>(meta.grad[slot]) + begin;
  float* __restrict__ m = meta.exp_avg[slot] + begin;
  float* __restrict__ v = meta.exp_avg_sq[slot] + begin;
  Copy* copy = nullptr;
  bool aligned =
      vec_aligned<kIlp>(p) && vec_aligned<kIlp>(g) && vec_aligned<kIlp>(m) && vec_aligned<kIlp>(v);
  if constexpr (!std::is_void_v<Copy>) {
    copy = static_cast<Copy*>(meta.param_16bit[slot]) + begin;
    aligned = aligned && vec_aligned<kIlp>(copy);
  }

  if (aligned) {
    // Whole vectors first; only a tensor's last chunk can leave up to kIlp - 1 elements over.
    const int n_vec = n & ~(kIlp - 1);
    for (int i = threadIdx.x * kIlp; i < n_vec; i += kBlockThreads * kIlp) {
      float rp[kIlp], rg[kIlp], rm[kIlp], rv[kIlp];
      load_vec(p + i, rp);
      load_vec(g + i, rg);
      load_vec(m + i, rm);
      load_vec(v + i, rv);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) update(rp[k], rm[k], rv[k], rg[k], c);
      store_vec(p + i, rp);
      store_vec(m + i, rm);
      store_vec(v + i, rv);
      if constexpr (!std::is_void_v<Copy>) store_vec(copy + i, rp);
    }
    for (int i = n_vec + static_cast<int>(threadIdx.x); i < n; i += kBlockThreads) {
      float rp = p[i], rm = m[i], rv = v[i];
      update(rp, rm, rv, to_float(g[i]), c);
      p[i] = rp;
      m[i] = rm;
      v[i] = rv;
      if constexpr (!std::is_void_v<Copy>) copy[i] = from_float<Copy>(rp);
    }
    return;
  }

  // Misaligned tensor (e.g. a view at an odd offset into a flat buffer): scalar accesses, still
  // kIlp independent elements per thread so as many loads are in flight as on the vector path.
  for (int base = 0; base < n; base += kBlockThreads * kIlp) {
    float rp[kIlp], rg[kIlp], rm[kIlp], rv[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = base + static_cast<int>(threadIdx.x) + k * kBlockThreads;
      const bool in = i < n;
      rp[k] = in ? p[i] : 0.0f;
      rg[k] = in ? to_float(g[i]) : 0.0f;
      rm[k] = in ? m[i] : 0.0f;
      rv[k] = in ? v[i] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) update(rp[k], rm[k], rv[k], rg[k], c);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = base + static_cast<int>(threadIdx.x) + k * kBlockThreads;
      if (i < n) {
        p[i] = rp[k];
        m[i] = rm[k];
        v[i] = rv[k];
        if constexpr (!std::is_void_v<Copy>) copy[i] = from_float<Copy>(rp[k]);
      }
    }
  }
}

void set_slot(LaunchMeta& meta, int slot, const AdamWCudaTensor& t) {
  meta.param[slot] = t.param;
  meta.grad[slot] = t.grad;
  meta.exp_avg[slot] = t.exp_avg;
  meta.exp_avg_sq[slot] = t.exp_avg_sq;
  meta.param_16bit[slot] = t.param_16bit;
  meta.numel[slot] = t.numel;
  meta.step_size[slot] = t.step_size;
  meta.bias_correction2_sqrt[slot] = t.bias_correction2_sqrt;
}

template <typename Grad, typename Copy>
cudaError_t launch_typed(const AdamWCudaTensor* tensors, int64_t num_tensors,
                         const AdamWCoefficients<float>& common, const float* inv_scale,
                         const float* found_inf, cudaStream_t stream) {
  LaunchMeta meta;
  meta.common = common;
  int num_slots = 0;
  int num_blocks = 0;
  auto launch = [&]() {
    adamw_multi_tensor_kernel<Grad, Copy>
        <<<num_blocks, kBlockThreads, 0, stream>>>(meta, inv_scale, found_inf);
    return cudaGetLastError();
  };

  for (int64_t t = 0; t < num_tensors; ++t) {
    const AdamWCudaTensor& tensor = tensors[t];
    if (tensor.numel <= 0) continue;
    const int64_t num_chunks = (tensor.numel + kChunkElements - 1) / kChunkElements;
    if (num_chunks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;
    int slot = num_slots++;
    set_slot(meta, slot, tensor);
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      meta.block_tensor[num_blocks] = static_cast<uint8_t>(slot);
      meta.block_chunk[num_blocks] = static_cast<int32_t>(chunk);
      ++num_blocks;
      const bool last_chunk = chunk == num_chunks - 1;
      if (num_blocks == kMaxBlocksPerLaunch || (last_chunk && num_slots == kMaxTensorsPerLaunch)) {
        const cudaError_t err = launch();
        if (err != cudaSuccess) return err;
        num_blocks = 0;
        num_slots = 0;
        if (!last_chunk) {
          // The tensor goes on in the next launch, from slot 0.
          slot = num_slots++;
          set_slot(meta, slot, tensor);
        }
      }
    }
  }
  return num_blocks > 0 ? launch() : cudaSuccess;
}

template <typename Grad>
cudaError_t launch_for_grad(const AdamWCudaTensor* tensors, int64_t num_tensors,
                            const AdamWCoefficients<float>& common, bool has_param_16bit,
                            ElementType param_16bit_type, const float* inv_scale,
                            const float* found_inf, cudaStream_t stream) {
  if (!has_param_16bit) {
    return launch_typed<Grad, void>(tensors, num_tensors, common, inv_scale, found_inf, stream);
  }
  switch (param_16bit_type) {
    case ElementType::kBFloat16:
      return launch_typed<Grad, __nv_bfloat16>(tensors, num_tensors, common, inv_scale, found_inf,
                                               stream);
    case ElementType::kFloat16:
      return launch_typed<Grad, __half>(tensors, num_tensors, common, inv_scale, found_inf,
                                        stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_adamw_step(const AdamWCudaTensor* tensors, int64_t num_tensors,
                              const AdamWCoefficients<float>& common, ElementType grad_type,
                              bool has_param_16bit, ElementType param_16bit_type,
                              const float* inv_scale, const float* found_inf,
                              cudaStream_t stream) {
  switch (grad_type) {
    case ElementType::kFloat32:
      return launch_for_grad<float>(tensors, num_tensors, common, has_param_16bit,
                                    param_16bit_type, inv_scale, found_inf, stream);
    case ElementType::kBFloat16:
      return launch_for_grad<__nv_bfloat16>(tensors, num_tensors, common, has_param_16bit,
                                            param_16bit_type, inv_scale, found_inf, stream);
    case ElementType::kFloat16:
      return launch_for_grad<__half>(tensors, num_tensors, common, has_param_16bit,
                                     param_16bit_type, inv_scale, found_inf, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zero_ext::kernels::cuda
