// Raw-pointer multi-tensor copies between a flat gradient / parameter buffer and the tensors
// that own its ranges: one launcher that moves a whole bucket (every tensor, cast, scaled,
// optionally accumulated) in one kernel launch per kBucketMaxTensorsPerLaunch tensors.
//
// csrc/bucket_cuda.cu validates the op's arguments and calls these launchers. Nothing here knows
// about tensors, the dispatcher or torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/adamw_math.h"  // ElementType

namespace zero_ext::kernels::cuda {

// One tensor of the call and its range flat[flat_offset : flat_offset + numel]. The tensor may
// be of any length (int64 indexing), any of the three element types independently of the other
// tensors and of flat, and any alignment (a chunk whose tensor or flat pointer is not 16-byte
// aligned takes a slower scalar path).
struct BucketCudaTensor {
  void* data;           // device pointer, read by flatten_into, written by unflatten_from
  int64_t flat_offset;  // element offset of its range in flat
  int64_t numel;        // zero-element tensors are skipped
  ElementType type;
};

// Launch geometry, public so that tests and benchmarks can size inputs that cross the limits.
// One thread block copies one chunk of one tensor. A launch takes up to
// kBucketMaxTensorsPerLaunch tensors of any sizes and mixed element types, which keeps its
// by-value metadata under 4 KB; a call with more tensors takes ceil(n / that) launches.
inline constexpr int kBucketChunkElements = 1 << 14;
inline constexpr int kBucketBlockThreads = 256;
inline constexpr int kBucketMaxTensorsPerLaunch = 128;

// flat[range of i] = round(accumulate ? flat[range of i] + tensors[i] * scale : tensors[i] * scale)
// on `stream`, asynchronously, fp32 arithmetic rounded per operation (no FMA contraction) and
// rounded to nearest even to flat_type. scale == 1 multiplies nothing, so a same-type copy is
// bit-exact. `tensors` is a host array; the pointers in it and `flat` are device pointers. Ranges
// must be disjoint and no tensor may overlap flat except as exactly its own range (the caller
// checks). Returns the first launch error (cudaGetLastError after each launch) or cudaSuccess;
// stops launching at the first error.
cudaError_t launch_flatten_into(void* flat, ElementType flat_type, const BucketCudaTensor* tensors,
                                int64_t num_tensors, float scale, bool accumulate,
                                cudaStream_t stream);

// tensors[i] = flat[range of i], cast (round to nearest even) to each tensor's type; otherwise
// as launch_flatten_into. Written tensors must not overlap each other.
cudaError_t launch_unflatten_from(const void* flat, ElementType flat_type,
                                  const BucketCudaTensor* tensors, int64_t num_tensors,
                                  cudaStream_t stream);

}  // namespace zero_ext::kernels::cuda
