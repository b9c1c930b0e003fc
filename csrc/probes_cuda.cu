// The stall watch's CUDA completion probes (csrc/probes.h): pooled events, timing disabled.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>
#include <vector>

#include "csrc/probes.h"

namespace zero_ext {
namespace {

std::mutex pool_mutex;
std::unordered_map<int, std::vector<cudaEvent_t>> pools;  // per device: events free for reuse

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // reported here: not left for the next kernel launch's check
  TORCH_CHECK(false, "zero_ext: stall-watch probe: ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

std::uintptr_t record_probe(int device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream =
      c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  // An event recorded into a CUDA graph being captured could never be queried: no probe.
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream, &capturing), "capture status");
  if (capturing != cudaStreamCaptureStatusNone) return 0;
  cudaEvent_t event = nullptr;
  {
    std::lock_guard<std::mutex> lock(pool_mutex);
    auto& pool = pools[device];
    if (!pool.empty()) {
      event = pool.back();
      pool.pop_back();
    }
  }
  if (event == nullptr) check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "create");
  const cudaError_t err = cudaEventRecord(event, stream);
  if (err != cudaSuccess) {
    cudaEventDestroy(event);
    check(err, "record");
  }
  return reinterpret_cast<std::uintptr_t>(event);
}

int64_t probes_completed(int device, const std::vector<std::uintptr_t>& handles) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  // Thread-local capture mode: a query from this thread while another thread captures a CUDA
  // graph in the default (global) mode would invalidate that capture.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeThreadLocal;
  check(cudaThreadExchangeStreamCaptureMode(&mode), "capture mode");
  int64_t done = 0;
  cudaError_t err = cudaSuccess;
  for (const std::uintptr_t handle : handles) {
    err = cudaEventQuery(reinterpret_cast<cudaEvent_t>(handle));
    if (err != cudaSuccess) break;
    ++done;
  }
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError();  // not an error: clear it
  } else {
    check(err, "query");
  }
  std::lock_guard<std::mutex> lock(pool_mutex);
  auto& pool = pools[device];
  for (int64_t i = 0; i < done; ++i) pool.push_back(reinterpret_cast<cudaEvent_t>(handles[i]));
  return done;
}

}  // namespace zero_ext
