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

#include <atomic>

#include "csrc/adamw_args.h"  // element_type
#include "csrc/cuda_checks.h"
#include "csrc/norm_args.h"
#include "kernels/cuda/norm.cuh"

namespace zero_ext {
namespace {

// The device's multiprocessor count, read from the driver once per device and kept (every norm
// backward sizes its chunks by it). Two threads racing on the first read store the same value.
// (ATen's cached device properties would do, but their header needs the cuSPARSE and cuBLAS
// headers, which a CUDA toolkit need not have.)
int multiprocessor_count(c10::DeviceIndex device) {
  static std::atomic<int> known[C10_COMPILE_TIME_MAX_GPUS] = {};
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS,
              "zero_ext::fused_norm_backward: device index ", static_cast<int>(device),
              " is out of range");
  int count = known[device].load(std::memory_order_relaxed);
  if (count == 0) {
    const cudaError_t err =
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    TORCH_CHECK(err == cudaSuccess, "zero_ext::fused_norm_backward: reading the device's "
                "multiprocessor count failed: ", cudaGetErrorString(err));
    known[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

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
  run.chunks = kernels::cuda::norm_param_grad_chunks(run.rows, h,
                                                     multiprocessor_count(input.device().index()));
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
