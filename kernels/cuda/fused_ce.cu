// The fused linear cross-entropy's row kernels (kernels/cuda/fused_ce.cuh): a thread block per
// row, threads striding over its columns, shared-memory tree reductions.
#include "kernels/cuda/fused_ce.cuh"

#include <cmath>

namespace zero_ext::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// -inf of T in device code (std::numeric_limits is host-only without relaxed constexpr).
template <typename T>
__device__ T negative_infinity() {
  return -static_cast<T>(INFINITY);
}

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

// The reduction of every thread's value over the thread block, returned to all threads.
template <typename T, typename Op>
__device__ T block_reduce(T value, T* shared, Op op) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  const T result = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return result;
}

template <typename T>
__global__ void ce_forward_kernel(CeForwardRows<T> run) {
  __shared__ T shared[kThreads];
  const int64_t r = blockIdx.x;
  const int64_t t = run.target[r];
  if (t == run.ignore_index) return;  // the whole block returns: no barrier is left waiting
  const T* x = run.logits + r * run.cols;
  T local_max = negative_infinity<T>();
  for (int64_t j = threadIdx.x; j < run.cols; j += kThreads) local_max = max(local_max, x[j]);
  const T old_max = run.max[r];
  const T new_max = max(old_max, block_reduce(local_max, shared, MaxOp{}));
  T exp_sum = 0;
  T sum = 0;
  for (int64_t j = threadIdx.x; j < run.cols; j += kThreads) {
    exp_sum += exp(x[j] - new_max);
    sum += x[j];
  }
  exp_sum = block_reduce(exp_sum, shared, SumOp{});
  sum = block_reduce(sum, shared, SumOp{});
  if (threadIdx.x == 0) {
    // The first block rescales an empty sum: 0, never exp(-inf - -inf) = NaN.
    const T rescale = old_max == negative_infinity<T>() ? T(0) : exp(old_max - new_max);
    run.sumexp[r] = run.sumexp[r] * rescale + exp_sum;
    run.max[r] = new_max;
    run.logit_sum[r] += sum;
    if (t >= run.col0 && t < run.col0 + run.cols) run.target_logit[r] = x[t - run.col0];
  }
}

template <typename T>
__global__ void ce_backward_kernel(CeBackwardRows<T> run) {
  const int64_t r = blockIdx.x;
  T* x = run.logits + r * run.cols;
  const int64_t t = run.target[r];
  if (t == run.ignore_index) {  // zero, whatever grad[r] is (inf when a mean has no token)
    for (int64_t j = threadIdx.x; j < run.cols; j += kThreads) x[j] = T(0);
    return;
  }
  const T g = run.grad[r];
  const T lse = run.lse[r];
  const T p_scale = g * (T(1) + run.two_z_loss * lse);
  const T offset = g * run.smooth_per_class;
  for (int64_t j = threadIdx.x; j < run.cols; j += kThreads) {
    T d = exp(x[j] - lse) * p_scale - offset;
    if (run.col0 + j == t) d -= g * run.target_weight;
    x[j] = d;
  }
}

template <typename Run, typename Kernel>
cudaError_t launch(const Run& run, Kernel kernel, cudaStream_t stream) {
  if (run.rows == 0 || run.cols == 0) return cudaSuccess;
  kernel<<<static_cast<unsigned>(run.rows), kThreads, 0, stream>>>(run);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ce_forward(const CeForwardRows<float>& run, cudaStream_t stream) {
  return launch(run, ce_forward_kernel<float>, stream);
}
cudaError_t launch_ce_forward(const CeForwardRows<double>& run, cudaStream_t stream) {
  return launch(run, ce_forward_kernel<double>, stream);
}
cudaError_t launch_ce_backward(const CeBackwardRows<float>& run, cudaStream_t stream) {
  return launch(run, ce_backward_kernel<float>, stream);
}
cudaError_t launch_ce_backward(const CeBackwardRows<double>& run, cudaStream_t stream) {
  return launch(run, ce_backward_kernel<double>, stream);
}

}  // namespace zero_ext::kernels::cuda
