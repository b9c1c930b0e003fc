// CUDA kernels of zero_ext::flatten_into_ and zero_ext::unflatten_from: validate with the shared
// checks and hand every tensor, unsplit and whatever its dtype, to the multi-tensor launchers in
// kernels/cuda/bucket.cu on the current stream (one launch per 128 tensors; a bucket of mixed
// dtypes still shares its launches). setup.py compiles this file in a CUDA build only.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <vector>

#include "csrc/adamw_args.h"
#include "csrc/bucket_args.h"
#include "kernels/cuda/bucket.cuh"

namespace zero_ext {
namespace {

void bucket_copy_cuda(const BucketCopyArgs& args, float scale, bool accumulate) {
  check_bucket_copy_args(args);
  if (args.tensors.empty()) return;
  const c10::cuda::CUDAGuard device_guard(args.flat.device());

  const int64_t n = static_cast<int64_t>(args.tensors.size());
  std::vector<kernels::cuda::BucketCudaTensor> tensors(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = args.tensors[i];
    tensors[i] = {t.data_ptr(), args.offsets[i], t.numel(), element_type(t.scalar_type())};
  }
  const kernels::ElementType flat_type = element_type(args.flat.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(args.flat.device().index()).stream();
  const cudaError_t err =
      args.direction == BucketCopyDirection::kIntoFlat
          ? kernels::cuda::launch_flatten_into(args.flat.data_ptr(), flat_type, tensors.data(), n,
                                               scale, accumulate, stream)
          : kernels::cuda::launch_unflatten_from(args.flat.const_data_ptr(), flat_type,
                                                 tensors.data(), n, stream);
  TORCH_CHECK(err == cudaSuccess, bucket_op_name(args.direction),
              ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void flatten_into_cuda(const at::Tensor& flat, at::TensorList tensors, at::IntArrayRef offsets,
                       double scale, bool accumulate) {
  // Rounded to fp32 as ATen rounds a Python scalar multiplying an fp32 tensor.
  bucket_copy_cuda({BucketCopyDirection::kIntoFlat, flat, tensors, offsets},
                   static_cast<float>(scale), accumulate);
}

void unflatten_from_cuda(const at::Tensor& flat, at::TensorList tensors, at::IntArrayRef offsets) {
  bucket_copy_cuda({BucketCopyDirection::kFromFlat, flat, tensors, offsets}, 1.0f, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) {
  m.impl("flatten_into_", &flatten_into_cuda);
  m.impl("unflatten_from", &unflatten_from_cuda);
}

}  // namespace zero_ext
