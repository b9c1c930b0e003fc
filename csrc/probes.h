// Completion probes of the stall watch (zero_ext/comm/watch.py) for NCCL, whose Work.wait()
// orders the current CUDA stream after a collective and returns at once: a CUDA event recorded
// after the wait completes when the collective has. Events come from a pool per device and go
// back to it once seen completed, so the hot path creates none after the first steps. CUDA build
// only (csrc/probes_cuda.cu); Python reaches them as zero_ext._C.cuda_probe_record and
// zero_ext._C.cuda_probes_completed, without the GIL (csrc/ops.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace zero_ext {

// Records a probe on `device`'s current stream of the calling thread; returns its handle, or 0
// (no probe) while that stream is being captured into a CUDA graph.
std::uintptr_t record_probe(int device);

// How many of `handles` (probes of `device`, oldest first) have completed, counting up to the
// first that has not. Those counted go back to the pool: the caller must drop their handles.
// Queried in thread-local capture mode, so another thread's CUDA graph capture is left valid.
int64_t probes_completed(int device, const std::vector<std::uintptr_t>& handles);

}  // namespace zero_ext
