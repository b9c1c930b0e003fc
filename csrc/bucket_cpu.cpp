// CPU kernels of zero_ext::flatten_into_ and zero_ext::unflatten_from, on calls BucketOps
// (csrc/bucket_args.h) validated: lay the call's tensors end to end, cut that sequence into equal
// spans and run the spans across ATen's intra-op thread pool (torch.get_num_threads()), whatever
// the mix of tensor sizes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "csrc/adamw_args.h"
#include "csrc/bucket_args.h"
#include "csrc/cpu_isa.h"
#include "kernels/cpu/bucket.h"

namespace zero_ext {
namespace {

// Elements per unit of parallel work: large enough to amortise scheduling, small enough that
// one big tensor spreads over every thread. A unit may cover the ends of several small tensors.
constexpr int64_t kSpanElements = 1 << 16;

// One tensor's side of the copy and its range in flat, resolved to raw pointers once per call.
struct TensorRange {
  char* tensor;
  char* flat;  // &flat[offsets[i]]
  kernels::ElementType tensor_type;
  int64_t tensor_element_size;
};

void bucket_copy_cpu(const BucketCopyArgs& args, float scale, bool accumulate) {
  const int64_t n = static_cast<int64_t>(args.tensors.size());
  const kernels::ElementType flat_type = element_type(args.flat.scalar_type());
  const int64_t flat_element_size = args.flat.element_size();
  char* flat = static_cast<char*>(args.flat.data_ptr());
  std::vector<TensorRange> ranges(n);
  std::vector<int64_t> starts(n + 1, 0);  // tensor i covers [starts[i], starts[i+1]) end to end
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = args.tensors[i];
    ranges[i] = {static_cast<char*>(t.data_ptr()), flat + args.offsets[i] * flat_element_size,
                 element_type(t.scalar_type()), t.element_size()};
    starts[i + 1] = starts[i] + t.numel();
  }
  const int64_t total = starts[n];
  const int64_t units = (total + kSpanElements - 1) / kSpanElements;
  const bool into_flat = args.direction == BucketCopyDirection::kIntoFlat;
  const kernels::cpu::BucketCopySpanFn kernel = ZERO_EXT_CPU_KERNEL(kernels::cpu::bucket_copy_span);

  at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
    for (int64_t u = first; u < last; ++u) {
      int64_t pos = u * kSpanElements;
      const int64_t end = std::min(pos + kSpanElements, total);
      int64_t i = std::upper_bound(starts.begin(), starts.end(), pos) - starts.begin() - 1;
      while (pos < end) {
        while (starts[i + 1] <= pos) ++i;  // past empty tensors
        const TensorRange& r = ranges[i];
        const int64_t begin = pos - starts[i];
        const int64_t count = std::min(end, starts[i + 1]) - pos;
        char* tensor = r.tensor + begin * r.tensor_element_size;
        char* slice = r.flat + begin * flat_element_size;
        const kernels::cpu::BucketCopySpan span =
            into_flat
                ? kernels::cpu::BucketCopySpan{tensor, slice, count, r.tensor_type, flat_type}
                : kernels::cpu::BucketCopySpan{slice, tensor, count, flat_type, r.tensor_type};
        kernel(span, scale, accumulate);
        pos += count;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) { BucketOps<bucket_copy_cpu>::impl(m); }

}  // namespace zero_ext
