// Raw-pointer cast / scale / accumulate copy over one contiguous span, compiled once per
// instruction set.
//
// csrc/bucket_cpu.cpp cuts the tensors of a zero_ext::flatten_into_ or zero_ext::unflatten_from
// call into spans, runs them on ATen's thread pool and calls the variant that
// at::get_cpu_capability() selects. Nothing here knows about tensors or the dispatcher.
#pragma once

#include <cstdint>

#include "kernels/adamw_math.h"
#include "kernels/cpu/isa_decl.h"

namespace zero_ext::kernels::cpu {

// dst[k] = round(accumulate ? float(dst[k]) + float(src[k]) * scale : float(src[k]) * scale)
// for k < numel, each operation rounded to fp32 on its own and the result rounded to dst_type to
// nearest even, as ATen's op-by-op reference rounds it. With scale == 1 no multiplication happens
// at all, so a same-type copy is bit-exact. src and dst may be the very same memory (an in-place
// update); any other overlap is the caller's to exclude.
struct BucketCopySpan {
  const void* src;  // of src_type
  void* dst;        // of dst_type
  int64_t numel;
  ElementType src_type;
  ElementType dst_type;
};

using BucketCopySpanFn = void (*)(const BucketCopySpan& span, float scale, bool accumulate);
ZERO_EXT_DECLARE_CPU_KERNEL(bucket_copy_span, BucketCopySpanFn);

}  // namespace zero_ext::kernels::cpu
