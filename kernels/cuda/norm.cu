// RMSNorm / LayerNorm CUDA kernels. Interface and formulas: kernels/cuda/norm.cuh,
// kernels/cpu/norm.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/norm.cuh"

namespace zero_ext::kernels::cuda {
namespace {

constexpr int kWarps = kNormBlockThreads / 32;
constexpr int64_t kMaxRowBlocks = 1 << 16;
constexpr int kNormColumnTile = 32;                                // columns per block
constexpr int kNormRowGroups = kNormBlockThreads / kNormColumnTile;  // warps, one row each

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
__device__ void norm_forward_row(const NormForwardRun& run, int64_t r, float* smem) {
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
__device__ void norm_backward_row(const NormBackwardRun& run, int64_t r, float* smem) {
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

// One block per row, over the rows in steps of the grid (at most kMaxRowBlocks blocks). The
// trip count is the same for every thread of a block: block_sum's barriers stay uniform.
template <typename T>
__global__ void __launch_bounds__(kNormBlockThreads) norm_forward_kernel(NormForwardRun run) {
  __shared__ float smem[kWarps];
  for (int64_t r = blockIdx.x; r < run.rows; r += gridDim.x) norm_forward_row<T>(run, r, smem);
}

template <typename T>
__global__ void __launch_bounds__(kNormBlockThreads)
    norm_backward_rows_kernel(NormBackwardRun run) {
  __shared__ float smem[kWarps];
  for (int64_t r = blockIdx.x; r < run.rows; r += gridDim.x) norm_backward_row<T>(run, r, smem);
}

// The parameter gradients, stage 1: block (x, y) sums columns [32 x, 32 x + 32) over row chunk y
// (rows [y * rows_per_chunk, (y + 1) * rows_per_chunk)). Each warp takes one row in eight, its
// lanes 32 adjacent columns (coalesced); the eight warps' sums are then added in warp order. One
// chunk: straight into the gradients; more: into run.partial ([2][chunks][h]: weight, then
// bias), which stage 2 sums in chunk order. Deterministic for a given chunk count.
template <typename T>
__global__ void __launch_bounds__(kNormBlockThreads)
    norm_param_partial_kernel(NormBackwardRun run, int64_t rows_per_chunk) {
  __shared__ float sums_w[kNormRowGroups][kNormColumnTile];
  __shared__ float sums_b[kNormRowGroups][kNormColumnTile];
  const int col = threadIdx.x % kNormColumnTile, group = threadIdx.x / kNormColumnTile;
  const int64_t h = run.h;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kNormColumnTile + col;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < run.rows ? first + rows_per_chunk : run.rows;
  const T* dy = static_cast<const T*>(run.grad_out);
  const T* v = static_cast<const T*>(run.input);
  const float* means = static_cast<const float*>(run.mean);
  const float* rstds = static_cast<const float*>(run.rstd);
  float gw = 0.0f, gb = 0.0f;
  if (j < h) {
    for (int64_t r = first + group; r < last; r += kNormRowGroups) {
      const float d = to_float(dy[r * h + j]);
      const float mean = run.rms ? 0.0f : means[r];
      gw += d * ((to_float(v[r * h + j]) - mean) * rstds[r]);
      gb += d;
    }
  }
  sums_w[group][col] = gw;
  sums_b[group][col] = gb;
  __syncthreads();
  if (group != 0 || j >= h) return;
  float total_w = 0.0f, total_b = 0.0f;
  for (int g = 0; g < kNormRowGroups; ++g) {
    total_w += sums_w[g][col];
    total_b += sums_b[g][col];
  }
  if (run.chunks == 1) {
    static_cast<float*>(run.grad_weight)[j] = total_w;
    if (run.grad_bias != nullptr) static_cast<float*>(run.grad_bias)[j] = total_b;
  } else {
    run.partial[blockIdx.y * h + j] = total_w;
    run.partial[(run.chunks + blockIdx.y) * h + j] = total_b;
  }
}

// Stage 2 (more than one chunk): each column's chunk sums, added in chunk order.
__global__ void __launch_bounds__(kNormBlockThreads) norm_param_sum_kernel(NormBackwardRun run) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= run.h) return;
  float total_w = 0.0f, total_b = 0.0f;
  for (int64_t c = 0; c < run.chunks; ++c) {
    total_w += run.partial[c * run.h + j];
    total_b += run.partial[(run.chunks + c) * run.h + j];
  }
  static_cast<float*>(run.grad_weight)[j] = total_w;
  if (run.grad_bias != nullptr) static_cast<float*>(run.grad_bias)[j] = total_b;
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxRowBlocks ? rows : kMaxRowBlocks);
}

template <typename T>
cudaError_t forward_typed(const NormForwardRun& run, cudaStream_t stream) {
  if (run.rows == 0) return cudaSuccess;
  norm_forward_kernel<T><<<row_blocks(run.rows), kNormBlockThreads, 0, stream>>>(run);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const NormBackwardRun& run, cudaStream_t stream) {
  if (run.rows > 0) {
    norm_backward_rows_kernel<T><<<row_blocks(run.rows), kNormBlockThreads, 0, stream>>>(run);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (run.chunks < 1 || run.chunks > kNormMaxChunks || (run.chunks > 1 && run.partial == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows_per_chunk = (run.rows + run.chunks - 1) / run.chunks;
  const dim3 grid(static_cast<unsigned>((run.h + kNormColumnTile - 1) / kNormColumnTile),
                  static_cast<unsigned>(run.chunks));
  norm_param_partial_kernel<T><<<grid, kNormBlockThreads, 0, stream>>>(run, rows_per_chunk);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || run.chunks == 1) return err;
  const unsigned column_blocks =
      static_cast<unsigned>((run.h + kNormBlockThreads - 1) / kNormBlockThreads);
  norm_param_sum_kernel<<<column_blocks, kNormBlockThreads, 0, stream>>>(run);
  return cudaGetLastError();
}

}  // namespace

int64_t norm_param_grad_chunks(int64_t rows, int64_t h, int multiprocessors) {
  const int64_t tiles = (h + kNormColumnTile - 1) / kNormColumnTile;
  const int64_t wanted = 4 * static_cast<int64_t>(multiprocessors > 0 ? multiprocessors : 1);
  int64_t chunks = (wanted + tiles - 1) / tiles;            // enough blocks to fill the GPU
  const int64_t most = (rows + kNormMinChunkRows - 1) / kNormMinChunkRows;  // not too few rows
  if (chunks > most) chunks = most;
  if (chunks > kNormMaxChunks) chunks = kNormMaxChunks;
  return chunks < 1 ? 1 : chunks;
}

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
