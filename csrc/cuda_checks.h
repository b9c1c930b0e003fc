// Checks shared by the CUDA glue (csrc/*_cuda.cu): a failed kernel launch, and fp64 inputs, which
// the CUDA kernels leave to the CPU (only gradcheck uses them). Included by .cu files only.
#pragma once

#include <ATen/core/Tensor.h>
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

}  // namespace zero_ext
