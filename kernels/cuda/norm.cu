// RMSNorm / LayerNorm CUDA kernels. Interface and formulas: kernels/cuda/norm.cuh,
// kernels/cpu/norm.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/norm.cuh"

namespace zero_ext::kernels::cuda {
namespace {

constexpr int kWarps = kNormBlockThreads / 32;

// The sum of v over the block, returned to every thread. smem: kWarps floats.
__device__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = lane < kWarps ? smem[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kNormBlockThreads) norm_forward_kernel(NormForwardRun run) {
  __shared__ float smem[kWarps];
  const int64_t r = blockIdx.x;
  const int64_t h = run.h;
  const T* v = static_cast<const T*>(run.x) + r * h;
  if (run.residual != nullptr) {
    // Each thread reads back only the elements it wrote: no barrier needed.
    const T* res = static_cast<const T*>(run.residual) + r * h;
    T* s = static_cast<T*>(run.summed) + r * h;
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      s[j] = from_float<T>(to_float(v[j]) + to_float(res[j]));
    }
    v = s;
  }
  float mean = 0.0f;
  if (!run.rms) {
    float part = 0.0f;
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) part += to_float(v[j]);
    mean = block_sum(part, smem) / static_cast<float>(h);
  }
  float part = 0.0f;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const float d = to_float(v[j]) - mean;
    part += d * d;
  }
  const float rstd = rsqrtf(block_sum(part, smem) / static_cast<float>(h) + run.eps);
  const T* w = static_cast<const T*>(run.weight);
  const T* b = static_cast<const T*>(run.bias);
  T* out = static_cast<T*>(run.out) + r * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    float o = (to_float(v[j]) - mean) * rstd * to_float(w[j]);
    if (b != nullptr) o += to_float(b[j]);
    out[j] = from_float<T>(o);
  }
  if (threadIdx.x == 0) {
    static_cast<float*>(run.rstd)[r] = rstd;
    if (!run.rms) static_cast<float*>(run.mean)[r] = mean;
  }
}

template <typename T>
__global__ void __launch_bounds__(kNormBlockThreads)
    norm_backward_rows_kernel(NormBackwardRun run) {
  __shared__ float smem[kWarps];
  const int64_t r = blockIdx.x;
  const int64_t h = run.h;
  const T* dy = static_cast<const T*>(run.grad_out) + r * h;
  const T* v = static_cast<const T*>(run.input) + r * h;
  const T* w = static_cast<const T*>(run.weight);
  const float mean = run.rms ? 0.0f : static_cast<const float*>(run.mean)[r];
  const float rstd = static_cast<const float*>(run.rstd)[r];
  float part_g = 0.0f, part_gx = 0.0f;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const float g = to_float(dy[j]) * to_float(w[j]);
    part_g += g;
    part_gx += g * ((to_float(v[j]) - mean) * rstd);
  }
  const float mean_g = run.rms ? 0.0f : block_sum(part_g, smem) / static_cast<float>(h);
  const float mean_gx = block_sum(part_gx, smem) / static_cast<float>(h);
  const T* ds = static_cast<const T*>(run.grad_summed);
  T* dx = static_cast<T*>(run.grad_input) + r * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const float g = to_float(dy[j]) * to_float(w[j]);
    float d = (g - mean_g - (to_float(v[j]) - mean) * rstd * mean_gx) * rstd;
    if (ds != nullptr) d += to_float(ds[r * h + j]);
    dx[j] = from_float<T>(d);
  }
}

template <typename T>
__global__ void __launch_bounds__(kNormBlockThreads) norm_param_grad_kernel(NormBackwardRun run) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= run.h) return;
  const T* dy = static_cast<const T*>(run.grad_out);
  const T* v = static_cast<const T*>(run.input);
  float gw = 0.0f, gb = 0.0f;
  for (int64_t r = 0; r < run.rows; ++r) {
    const float d = to_float(dy[r * run.h + j]);
    const float mean = run.rms ? 0.0f : static_cast<const float*>(run.mean)[r];
    gw += d * ((to_float(v[r * run.h + j]) - mean) * static_cast<const float*>(run.rstd)[r]);
    gb += d;
  }
  static_cast<float*>(run.grad_weight)[j] = gw;
  if (run.grad_bias != nullptr) static_cast<float*>(run.grad_bias)[j] = gb;
}

template <typename T>
cudaError_t forward_typed(const NormForwardRun& run, cudaStream_t stream) {
  if (run.rows == 0) return cudaSuccess;
  norm_forward_kernel<T><<<static_cast<unsigned>(run.rows), kNormBlockThreads, 0, stream>>>(run);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const NormBackwardRun& run, cudaStream_t stream) {
  if (run.rows > 0) {
    norm_backward_rows_kernel<T>
        <<<static_cast<unsigned>(run.rows), kNormBlockThreads, 0, stream>>>(run);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const unsigned column_blocks =
      static_cast<unsigned>((run.h + kNormBlockThreads - 1) / kNormBlockThreads);
  norm_param_grad_kernel<T><<<column_blocks, kNormBlockThreads, 0, stream>>>(run);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_norm_forward(const NormForwardRun& run, cudaStream_t stream) {
  switch (run.type) {
    case ElementType::kFloat32:
      return forward_typed<float>(run, stream);
    case ElementType::kBFloat16:
      return forward_typed<__nv_bfloat16>(run, stream);
    case ElementType::kFloat16:
      return forward_typed<__half>(run, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_norm_backward(const NormBackwardRun& run, cudaStream_t stream) {
  switch (run.type) {
    case ElementType::kFloat32:
      return backward_typed<float>(run, stream);
    case ElementType::kBFloat16:
      return backward_typed<__nv_bfloat16>(run, stream);
    case ElementType::kFloat16:
      return backward_typed<__half>(run, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zero_ext::kernels::cuda
