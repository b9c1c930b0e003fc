// What the CUDA glue (csrc/*_cuda.cu) shares: the checks of a failed kernel launch and of fp64
// inputs, which the CUDA kernels leave to the CPU (only gradcheck uses them), and the stream the
// kernels launch on. Included by .cu files only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace zero_ext {

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline void check_not_double(const at::Tensor& t, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() != at::kDouble, op,
                   ": Double runs on the CPU only; use Float, BFloat16 or Half on CUDA");
}

// The current stream of t's device, which an op's kernels run on.
inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace zero_ext
