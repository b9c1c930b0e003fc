#include "csrc/bucket_args.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace zero_ext {
namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// The bytes a contiguous tensor occupies, for memory-overlap checks.
struct ByteRange {
  uintptr_t begin;
  uintptr_t end;
  size_t index;  // into tensors
};

ByteRange byte_range(const at::Tensor& t, size_t index) {
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>(t.numel()) * t.element_size(), index};
}

bool overlap(const ByteRange& a, const ByteRange& b) { return a.begin < b.end && b.begin < a.end; }

void check_flat(const char* op, const at::Tensor& flat) {
  TORCH_CHECK_VALUE(flat.defined(), op, ": flat is undefined (None)");
  TORCH_CHECK_TYPE(is_supported_dtype(flat.scalar_type()), op,
                   ": expected flat of dtype Float, BFloat16 or Half, got ", flat.scalar_type());
  TORCH_CHECK_VALUE(flat.dim() == 1, op, ": expected flat to be 1-D, got shape ", flat.sizes());
  TORCH_CHECK_VALUE(flat.is_contiguous(), op, ": expected flat to be contiguous, got stride ",
                    flat.stride(0));
}

void check_tensor(const char* op, const BucketCopyArgs& a, size_t i) {
  const at::Tensor& t = a.tensors[i];
  TORCH_CHECK_VALUE(t.defined(), op, ": tensors[", i, "] is undefined (None)");
  TORCH_CHECK_VALUE(t.device() == a.flat.device(), op, ": expected every tensor on flat's device (",
                    a.flat.device(), "), got ", t.device(), " for tensors[", i, "]");
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), op, ": expected tensors[", i,
                   "] of dtype Float, BFloat16 or Half, got ", t.scalar_type());
  if (a.direction == BucketCopyDirection::kIntoFlat) {
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected tensors[", i,
                      "] to be contiguous; call .contiguous() on it first");
  } else {
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected tensors[", i,
                      "] to be contiguous (it is written in place, so a contiguous copy would not "
                      "receive the values), got strides ",
                      t.strides());
  }

  const int64_t offset = a.offsets[i];
  const int64_t numel = t.numel();
  const int64_t flat_numel = a.flat.numel();
  TORCH_CHECK_VALUE(offset >= 0, op, ": expected offsets[", i, "] >= 0, got ", offset);
  // offset > flat_numel - numel rather than offset + numel > flat_numel: no int64 overflow.
  TORCH_CHECK_VALUE(numel <= flat_numel && offset <= flat_numel - numel, op, ": tensors[", i,
                    "] (numel ", numel, ") at offsets[", i, "] = ", offset,
                    " runs past the end of flat: expected offset + numel <= ", flat_numel,
                    " (flat's numel), got ", offset, " + ", numel);
}

// After every range is known to lie inside flat: sort the non-empty ones by offset and compare
// neighbours, O(n log n).
void check_ranges_disjoint(const char* op, const BucketCopyArgs& a) {
  std::vector<size_t> order;
  order.reserve(a.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    if (a.tensors[i].numel() > 0) order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](size_t x, size_t y) {
    return a.offsets[x] != a.offsets[y] ? a.offsets[x] < a.offsets[y] : x < y;
  });
  for (size_t k = 1; k < order.size(); ++k) {
    const size_t prev = order[k - 1];
    const size_t cur = order[k];
    const int64_t prev_end = a.offsets[prev] + a.tensors[prev].numel();
    TORCH_CHECK_VALUE(prev_end <= a.offsets[cur], op, ": expected disjoint ranges, but tensors[",
                      std::min(prev, cur), "] and tensors[", std::max(prev, cur),
                      "] overlap: flat[", a.offsets[prev], " : ", prev_end, "] and flat[",
                      a.offsets[cur], " : ", a.offsets[cur] + a.tensors[cur].numel(), "]");
  }
}

// A tensor in flat's memory is fine only as the exact view of its own range, where each element
// is read and written by the same thread; anywhere else, a copy could read what it just wrote.
void check_no_aliasing(const char* op, const BucketCopyArgs& a) {
  const ByteRange flat_bytes = byte_range(a.flat, 0);
  std::vector<ByteRange> tensor_bytes;
  tensor_bytes.reserve(a.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    const at::Tensor& t = a.tensors[i];
    if (t.numel() == 0) continue;
    const ByteRange bytes = byte_range(t, i);
    tensor_bytes.push_back(bytes);
    if (!overlap(bytes, flat_bytes)) continue;
    const bool own_view =
        t.scalar_type() == a.flat.scalar_type() &&
        bytes.begin == flat_bytes.begin + static_cast<uintptr_t>(a.offsets[i]) * t.element_size();
    TORCH_CHECK_VALUE(own_view, op, ": tensors[", i, "] shares memory with flat but is not the ",
                      a.flat.scalar_type(), " view flat[", a.offsets[i], " : ",
                      a.offsets[i] + t.numel(),
                      "]; expected a tensor apart from flat (or exactly "
                      "that view)");
  }
  if (a.direction != BucketCopyDirection::kFromFlat) return;  // tensors are only read
  std::sort(tensor_bytes.begin(), tensor_bytes.end(), [](const ByteRange& x, const ByteRange& y) {
    return x.begin != y.begin ? x.begin < y.begin : x.index < y.index;
  });
  for (size_t k = 1; k < tensor_bytes.size(); ++k) {
    const ByteRange& prev = tensor_bytes[k - 1];
    const ByteRange& cur = tensor_bytes[k];
    TORCH_CHECK_VALUE(!overlap(prev, cur), op, ": tensors[", std::min(prev.index, cur.index),
                      "] and tensors[", std::max(prev.index, cur.index),
                      "] share memory; expected every written tensor apart from the others");
  }
}

}  // namespace

const char* bucket_op_name(BucketCopyDirection direction) {
  return direction == BucketCopyDirection::kIntoFlat ? "zero_ext::flatten_into_"
                                                     : "zero_ext::unflatten_from";
}

void check_bucket_copy_args(const BucketCopyArgs& a) {
  const char* op = bucket_op_name(a.direction);
  TORCH_CHECK_VALUE(a.tensors.size() == a.offsets.size(), op,
                    ": expected one offset per tensor, got ", a.tensors.size(), " tensors and ",
                    a.offsets.size(), " offsets");
  check_flat(op, a.flat);
  for (size_t i = 0; i < a.tensors.size(); ++i) check_tensor(op, a, i);
  check_ranges_disjoint(op, a);
  check_no_aliasing(op, a);
}

}  // namespace zero_ext
