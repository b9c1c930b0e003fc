// CUDA kernels of zero_ext::fused_norm and zero_ext::fused_norm_backward, on calls NormOps
// (csrc/norm_args.h) validated: hand raw pointers to the launchers in kernels/cuda/norm.cu
// on the current stream. fp32 / bf16 / fp16 (fp64, which only gradcheck uses, is CPU-only).
// setup.py compiles this file in a CUDA build only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "csrc/adamw_args.h"  // element_type
#include "csrc/cuda_checks.h"
#include "csrc/norm_args.h"
#include "kernels/cuda/norm.cuh"

namespace zero_ext {
namespace {

void fused_norm_cuda(const NormForwardArgs& args, const kernels::cpu::NormForwardTensors& t) {
  constexpr const char* kOp = "zero_ext::fused_norm";
  const at::Tensor& x = args.x;
  check_not_double(x, kOp);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t h = x.size(-1);
  const kernels::cuda::NormForwardRun run{t, element_type(x.scalar_type()), x.numel() / h, h,
                                          static_cast<float>(args.eps), args.rms};
  check_launch(kernels::cuda::launch_norm_forward(run, stream_of(x)), kOp);
}

void fused_norm_backward_cuda(const NormBackwardArgs& args,
                              const kernels::cpu::NormBackwardTensors& t) {
  constexpr const char* kOp = "zero_ext::fused_norm_backward";
  const at::Tensor& input = args.input;
  check_not_double(input, kOp);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t h = input.size(-1);
  kernels::cuda::NormBackwardRun run{t, element_type(input.scalar_type()), input.numel() / h, h,
                                     args.rms};
  int multiprocessors = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount,
                                                 input.device().index());
  TORCH_CHECK(err == cudaSuccess, kOp, ": reading the device's multiprocessor count failed: ",
              cudaGetErrorString(err));
  run.chunks = kernels::cuda::norm_param_grad_chunks(run.rows, h, multiprocessors);
  at::Tensor partial;  // the chunks' sums, freed (stream-ordered) after the launch
  if (run.chunks > 1) {
    partial = at::empty({2, run.chunks, h}, input.options().dtype(at::kFloat));
    run.partial = partial.data_ptr<float>();
  }
  check_launch(kernels::cuda::launch_norm_backward(run, stream_of(input)), kOp);
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CUDA, m) {
  NormOps<fused_norm_cuda, fused_norm_backward_cuda>::impl(m);
}

}  // namespace zero_ext
