// SwiGLU and bias + GeLU CUDA kernels: elementwise over [rows, h], fp32 math, each thread
// handling 16 bytes of consecutive elements as one vector access where every pointer and the
// element count allow it (else one element). Interface: kernels/cuda/activation.cuh; formulas:
// kernels/activation_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/activation_math.h"
#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/elements.cuh"

namespace zero_ext::kernels::cuda {
namespace {

using cpu::ActivationKind;
using cpu::ActivationRows;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

// The elementary functions of kernels/activation_math.h's formulas in fp32.
struct DeviceMath {
  __host__ __device__ static float exp(float x) { return expf(x); }
  __host__ __device__ static float tanh(float x) { return tanhf(x); }
  __host__ __device__ static float erf(float x) { return erff(x); }
};

// N consecutive elements starting at p: one vector access for N > 1 (aligned, checked on the
// host), else a scalar one.
template <typename T, int N>
__device__ __forceinline__ void load(const T* p, float (&v)[N]) {
  if constexpr (N == 1) {
    v[0] = to_float(p[0]);
  } else {
    load_vec<T, N>(p, v);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const float (&v)[N]) {
  if constexpr (N == 1) {
    p[0] = from_float<T>(v[0]);
  } else {
    store_vec<T, N>(p, v);
  }
}

template <typename T, int N, ActivationKind kind, bool kBackward>
__global__ void __launch_bounds__(kThreads) activation_kernel(ActivationRows args) {
  using E = ActivationElement<DeviceMath, float, kind>;
  constexpr bool swiglu = kind == ActivationKind::kSwiGLU;
  const int64_t first = args.first_row * args.h, end = args.last_row * args.h;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * N;
  const T* bias = swiglu ? nullptr : static_cast<const T*>(args.b);
  for (int64_t i = first + (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N;
       i < end; i += stride) {
    float a[N], b[N] = {}, dy[N], ga[N], gb[N];
    load<T, N>(static_cast<const T*>(args.a) + i, a);
    if (swiglu) {
      load<T, N>(static_cast<const T*>(args.b) + i, b);
    } else if (bias != nullptr) {
      // x + bias rounded to the element type, as eager's add stores it.
#pragma unroll
      for (int e = 0; e < N; ++e) {
        a[e] = to_float(from_float<T>(a[e] + to_float(bias[(i + e) % args.h])));
      }
    }
    if constexpr (kBackward) {
      load<T, N>(static_cast<const T*>(args.grad_out) + i, dy);
#pragma unroll
      for (int e = 0; e < N; ++e) E::backward(a[e], b[e], dy[e], &ga[e], &gb[e]);
      store<T, N>(static_cast<T*>(args.out) + i, ga);
      if (swiglu) store<T, N>(static_cast<T*>(args.grad_b) + i, gb);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) ga[e] = E::forward(a[e], b[e]);
      store<T, N>(static_cast<T*>(args.out) + i, ga);
    }
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, ActivationKind kind, bool kBackward>
cudaError_t launch_typed(const ActivationRows& args, cudaStream_t stream) {
  constexpr int kVector = 16 / static_cast<int>(sizeof(T));
  const int64_t n = (args.last_row - args.first_row) * args.h;
  if (n <= 0) return cudaSuccess;
  const bool vector = n % kVector == 0 && args.first_row * args.h % kVector == 0 &&
                      aligned16(args.a) && (kind != ActivationKind::kSwiGLU || aligned16(args.b)) &&
                      aligned16(args.grad_out) && aligned16(args.out) && aligned16(args.grad_b);
  const int per_thread = vector ? kVector : 1;
  const int64_t blocks =
      std::min<int64_t>((n / per_thread + kThreads - 1) / kThreads, kMaxBlocks);
  if (vector) {
    activation_kernel<T, kVector, kind, kBackward>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
  } else {
    activation_kernel<T, 1, kind, kBackward>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <typename T, bool kBackward>
cudaError_t dispatch_kind(const ActivationRows& args, cudaStream_t stream) {
  switch (args.kind) {
    case ActivationKind::kSwiGLU:
      return launch_typed<T, ActivationKind::kSwiGLU, kBackward>(args, stream);
    case ActivationKind::kGeluTanh:
      return launch_typed<T, ActivationKind::kGeluTanh, kBackward>(args, stream);
    case ActivationKind::kGeluErf:
      return launch_typed<T, ActivationKind::kGeluErf, kBackward>(args, stream);
  }
  return cudaErrorInvalidValue;
}

template <bool kBackward>
cudaError_t dispatch(const ActivationRows& args, cudaStream_t stream) {
  switch (args.type) {
    case cpu::NormType::kFloat32:
      return dispatch_kind<float, kBackward>(args, stream);
    case cpu::NormType::kBFloat16:
      return dispatch_kind<__nv_bfloat16, kBackward>(args, stream);
    case cpu::NormType::kFloat16:
      return dispatch_kind<__half, kBackward>(args, stream);
    case cpu::NormType::kFloat64:
      break;  // the glue rejects fp64 on CUDA
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_activation_forward(const ActivationRows& args, cudaStream_t stream) {
  return dispatch<false>(args, stream);
}

cudaError_t launch_activation_backward(const ActivationRows& args, cudaStream_t stream) {
  return dispatch<true>(args, stream);
}

}  // namespace zero_ext::kernels::cuda
