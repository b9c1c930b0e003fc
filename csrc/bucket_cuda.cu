// CUDA kernels of zero_ext::flatten_into_ and zero_ext::unflatten_from, on calls BucketOps
// (csrc/bucket_args.h) validated: hand every tensor, unsplit and whatever its dtype, to the
// multi-tensor launchers in kernels/cuda/bucket.cu on the current stream (one launch per 128
// tensors; a bucket of mixed dtypes still shares its launches). setup.py compiles this file in a
// CUDA build only.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <vector>

#include "csrc/adamw_args.h"
#include "csrc/bucket_args.h"
#include "csrc/cuda_checks.h"
#include "kernels/cuda/bucket.cuh"

namespace zero_ext {
namespace {

void bucket_copy_cuda(const BucketCopyArgs& args, float scale, bool accumulate) {
  const c10::cuda::CUDAGuard device_guard(args.flat.device());

  const int64_t n = static_cast<int64_t>(args.tensors.size());
  std::vector<kernels::cuda::BucketCudaTensor> tensors(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = args.tensors[i];
    tensors[i] = {t.data_ptr(), args.offsets[i], t.numel(), element_type(t.scalar_type())};
  }
  const kernels::ElementType flat_type = element_type(args.flat.scalar_type());
  const cudaStream_t stream = stream_of(args.flat);
  const cudaError_t err =
      args.direction == BucketCopyDirection::kIntoFlat
          ? kernels::cuda::launch_flatten_into(args.flat.data_ptr(), flat_type, tensors.data(), n,
                                               scale, accumulate, stream)
          : kernels::cuda::launch_unflatten_from(args.flat.const_data_ptr(), flat_type,
                                                 tensors.data(), n, stream);
  check_launch(err, bucket_op_name(args.direction));
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) { BucketOps<bucket_copy_cuda>::impl(m); }

}  // namespace zero_ext
