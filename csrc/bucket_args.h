// The arguments of zero_ext::flatten_into_ and zero_ext::unflatten_from as every backend receives
// them, and their validation.
//
// Both ops copy tensors[i] to or from the range flat[offsets[i] : offsets[i] + tensors[i].numel()]
// and take the same checks; they differ only in which side is written. The CPU glue
// (csrc/bucket_cpu.cpp) and the CUDA glue (csrc/bucket_cuda.cu) register their kernels through
// BucketOps, which validates for both (check_bucket_copy_args), so the same bad input raises the
// same message on every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

namespace zero_ext {

enum class BucketCopyDirection {
  kIntoFlat,  // zero_ext::flatten_into_: reads tensors, writes flat
  kFromFlat,  // zero_ext::unflatten_from: reads flat, writes tensors
};

struct BucketCopyArgs {
  BucketCopyDirection direction;
  const at::Tensor& flat;   // 1-D contiguous, fp32 / bf16 / fp16
  at::TensorList tensors;   // contiguous, any shape, each fp32 / bf16 / fp16 (dtypes may differ)
  at::IntArrayRef offsets;  // element offset into flat of each tensor's range
};

// "zero_ext::flatten_into_" or "zero_ext::unflatten_from": the prefix of every message.
const char* bucket_op_name(BucketCopyDirection direction);

// Raises c10::Error (ValueError / TypeError in Python) naming the op, the argument and what was
// expected versus what came: one offset per tensor; dtypes; contiguity; every tensor on flat's
// device; every range non-negative, inside flat and disjoint from every other range; no tensor
// sharing memory with flat unless it is exactly the view of its own range in flat's dtype (an
// in-place no-op copy); and for unflatten_from, no two written tensors sharing memory.
// Accepts an empty call (no tensors).
void check_bucket_copy_args(const BucketCopyArgs& args);

// One backend's zero_ext::flatten_into_ and zero_ext::unflatten_from in their schemas'
// signatures: each validates the call and hands it to the backend's kernel, copy(args, scale,
// accumulate), unless it has no tensors. impl() registers the two under the backend's dispatch
// key (TORCH_LIBRARY_IMPL).
template <void (*Copy)(const BucketCopyArgs&, float, bool)>
struct BucketOps {
  static void flatten_into(const at::Tensor& flat, at::TensorList tensors,
                           at::IntArrayRef offsets, double scale, bool accumulate) {
    // Rounded to fp32 as ATen rounds a Python scalar multiplying an fp32 tensor.
    checked_copy({BucketCopyDirection::kIntoFlat, flat, tensors, offsets},
                 static_cast<float>(scale), accumulate);
  }

  static void unflatten_from(const at::Tensor& flat, at::TensorList tensors,
                             at::IntArrayRef offsets) {
    checked_copy({BucketCopyDirection::kFromFlat, flat, tensors, offsets}, 1.0f, false);
  }

  static void impl(torch::Library& m) {
    m.impl("flatten_into_", &flatten_into);
    m.impl("unflatten_from", &unflatten_from);
  }

 private:
  static void checked_copy(const BucketCopyArgs& args, float scale, bool accumulate) {
    check_bucket_copy_args(args);
    if (args.tensors.empty()) return;
    Copy(args, scale, accumulate);
  }
};

}  // namespace zero_ext
