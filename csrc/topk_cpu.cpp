// CPU kernel of zero_ext::topk_feedback_select: validate, cut every chunk into units (a share of
// the threads each, at least kMinUnit elements) and run the passes of kernels/cpu/topk.h over the
// units on ATen's intra-op thread pool, with the per-chunk steps between them:
//   1. accumulate (v += g, or the momentum step) and count each unit's magnitude bins;
//   2. per chunk, from the units' histograms: the bin b holding the k-th largest key, the D
//      entries above it (all sent) and the B entries in it, of which r = k - D are sent;
//   3. collect each unit's entries above b and in b, in index order, at offsets its histogram
//      gives;
//   4. per chunk: the r-th largest key T of the B (nth_element); the entries of b above T are
//      sent, and of those equal to T the r - (count above T) of lowest index;
//   5. emit each unit's selected entries in index order into its slots of the packed row.
// Two passes over the residual; the rest touches about k + B entries. The result does not depend
// on the thread count: histograms are exact counts, every list keeps index order and the ties
// at T are shared out in index order.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "csrc/adamw_args.h"  // element_type
#include "csrc/cpu_isa.h"
#include "csrc/quant_args.h"  // check_flat_float, check_same_device, share_memory
#include "kernels/cpu/topk.h"

namespace zero_ext {
namespace {

constexpr const char* kOp = "zero_ext::topk_feedback_select";

// The fewest elements a unit holds: its histogram (8 KiB) and scheduling stay small beside it.
constexpr int64_t kMinUnit = 1 << 16;

void check_fp32_state(const at::Tensor& t, const char* name, const at::Tensor& residual) {
  check_flat_float(kOp, t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kOp, ": expected ", name,
                   " of dtype Float (fp32 state, updated in place), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == residual.numel(), kOp, ": expected ", name,
                    " to have residual's numel ", residual.numel(), ", got ", t.numel());
  check_same_device(kOp, t, name, residual, "residual");
}

void check_args(const at::Tensor& residual, const at::Tensor& grad, int64_t chunks, int64_t k,
                const std::optional<at::Tensor>& momentum, double momentum_factor,
                at::ScalarType value_dtype) {
  check_fp32_state(residual, "residual", residual);
  check_flat_float(kOp, grad, "grad");
  TORCH_CHECK_VALUE(grad.numel() == residual.numel(), kOp,
                    ": expected grad to have residual's numel ", residual.numel(), ", got ",
                    grad.numel());
  check_same_device(kOp, grad, "grad", residual, "residual");
  TORCH_CHECK_VALUE(!share_memory(grad, residual), kOp,
                    ": grad and residual must not share memory (residual is updated in place)");
  TORCH_CHECK_VALUE(chunks >= 1, kOp, ": expected chunks >= 1, got ", chunks);
  TORCH_CHECK_VALUE(residual.numel() % chunks == 0, kOp, ": residual's numel ", residual.numel(),
                    " is not divisible by chunks = ", chunks, "; pad it to a multiple of chunks");
  const int64_t m = residual.numel() / chunks;
  TORCH_CHECK_VALUE(m <= std::numeric_limits<int32_t>::max(), kOp, ": chunks of ", m,
                    " elements do not fit the int32 indices of the packed rows; use more chunks");
  TORCH_CHECK_VALUE(k >= 0 && k <= m, kOp, ": expected k in [0, ", m,
                    "] (the chunk's elements), got ", k);
  TORCH_CHECK_TYPE(value_dtype == at::kFloat || value_dtype == at::kBFloat16 ||
                       value_dtype == at::kHalf,
                   kOp, ": expected dtype Float, BFloat16 or Half for the values sent, got ",
                   value_dtype);
  if (!momentum.has_value()) {
    TORCH_CHECK_VALUE(momentum_factor == 0.0, kOp, ": momentum_factor = ", momentum_factor,
                      " without a momentum tensor; pass momentum (fp32, residual's shape) or 0");
    return;
  }
  check_fp32_state(*momentum, "momentum", residual);
  TORCH_CHECK_VALUE(!share_memory(*momentum, residual) && !share_memory(*momentum, grad), kOp,
                    ": momentum must not share memory with residual or grad");
  TORCH_CHECK_VALUE(momentum_factor >= 0.0 && momentum_factor < 1.0, kOp,
                    ": expected momentum_factor in [0, 1), got ", momentum_factor);
}

// A contiguous range [begin, end) of one chunk, and what the passes learn about it.
struct Unit {
  int64_t chunk;
  int64_t begin;
  int64_t end;
  int64_t above_offset = 0;     // its first slot in the shared above list
  int64_t n_above = 0;          // entries above the chunk's boundary bin
  int64_t boundary_offset = 0;  // its first slot in the shared boundary lists
  int64_t n_boundary = 0;       // entries in the boundary bin
  int64_t n_greater = 0;        // of those, keys above the chunk's threshold
  int64_t n_equal = 0;          // keys equal to it
  int64_t ties = 0;             // how many of the equal ones it sends
  int64_t out_offset = 0;       // its first slot in the chunk's packed row
};

std::vector<Unit> make_units(int64_t chunks, int64_t m) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t wanted = std::max<int64_t>(1, (2 * threads + chunks - 1) / chunks);
  const int64_t per_chunk = std::max<int64_t>(1, std::min((m + kMinUnit - 1) / kMinUnit, wanted));
  const int64_t span = (m + per_chunk - 1) / per_chunk;
  std::vector<Unit> units;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t begin = 0; begin < m; begin += span) {
      units.push_back({c, begin, std::min(m, begin + span)});
    }
  }
  return units;
}

// What a chunk sends from its boundary bin.
struct Boundary {
  uint32_t bin = 0;
  int64_t wanted = 0;  // r: entries of the bin to send
  int64_t count = 0;   // B: entries in the bin
  uint32_t threshold = 0;  // T: the wanted-th largest key in the bin
};

// Step 2 for chunk c: its boundary bin from the summed histograms of its units, and each unit's
// counts above and in it.
Boundary find_boundary_bin(std::vector<Unit>& units, const std::vector<uint32_t>& hist,
                           int64_t c, int64_t k) {
  std::array<int64_t, kernels::kTopkBins> total{};
  for (size_t i = 0; i < units.size(); ++i) {
    if (units[i].chunk != c) continue;
    const uint32_t* h = hist.data() + i * kernels::kTopkBins;
    for (int b = 0; b < kernels::kTopkBins; ++b) total[b] += h[b];
  }
  Boundary boundary;
  int64_t above = 0;
  int b = kernels::kTopkBins - 1;
  while (above + total[b] < k) above += total[b--];  // the chunk's total m >= k >= 1 stops it
  boundary.bin = static_cast<uint32_t>(b);
  boundary.wanted = k - above;
  boundary.count = total[b];
  for (size_t i = 0; i < units.size(); ++i) {
    if (units[i].chunk != c) continue;
    const uint32_t* h = hist.data() + i * kernels::kTopkBins;
    int64_t n_above = 0;
    for (int bin = b + 1; bin < kernels::kTopkBins; ++bin) n_above += h[bin];
    units[i].n_above = n_above;
    units[i].n_boundary = h[b];
  }
  return boundary;
}

template <typename Fn>
void for_each_unit(const std::vector<Unit>& units, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) fn(i);
  });
}

// One call's tensors as raw pointers, and its sizes.
struct Call {
  float* v;
  float* u;  // nullptr: no momentum
  const char* g;
  int64_t g_bytes;
  kernels::ElementType g_type;
  int64_t chunks;
  int64_t m;
  int64_t k;
  kernels::ElementType value_type;
  int64_t value_bytes;
  int64_t row_bytes;
  uint8_t* rows;
};

// The entries each unit collects in step 3: its slice of each list starts at its offsets.
struct Candidates {
  std::unique_ptr<int32_t[]> above;
  std::unique_ptr<int32_t[]> boundary_index;
  std::unique_ptr<uint32_t[]> boundary_key;
};

// Step 1: the units' histograms (kTopkBins counters each, one after another).
std::vector<uint32_t> accumulate_and_count(const Call& call, const std::vector<Unit>& units,
                                           double momentum_factor) {
  std::vector<uint32_t> hist(units.size() * kernels::kTopkBins, 0);
  const kernels::cpu::TopkAccumulateFn accumulate =
      ZERO_EXT_CPU_KERNEL(kernels::cpu::topk_accumulate);
  // Rounded to fp32 as ATen rounds a Python scalar multiplying an fp32 tensor.
  const float factor = static_cast<float>(momentum_factor);
  const float grad_weight = static_cast<float>(1.0 - momentum_factor);
  for_each_unit(units, [&](int64_t i) {
    const Unit& unit = units[i];
    const int64_t first = unit.chunk * call.m + unit.begin;
    accumulate({call.v + first, call.g + first * call.g_bytes, call.g_type,
                call.u == nullptr ? nullptr : call.u + first, factor, grad_weight,
                unit.end - unit.begin, hist.data() + i * kernels::kTopkBins});
  });
  return hist;
}

// Steps 2 and 3: each chunk's boundary bin, the units' slots in the lists, and the lists.
std::vector<Boundary> collect_candidates(const Call& call, std::vector<Unit>& units,
                                         const std::vector<uint32_t>& hist,
                                         Candidates& candidates) {
  std::vector<Boundary> boundaries(call.chunks);
  int64_t n_above = 0;
  int64_t n_boundary = 0;
  for (int64_t c = 0; c < call.chunks; ++c) {
    boundaries[c] = find_boundary_bin(units, hist, c, call.k);
    for (Unit& unit : units) {
      if (unit.chunk != c) continue;
      unit.above_offset = n_above;
      unit.boundary_offset = n_boundary;
      n_above += unit.n_above + 1;  // + 1: collect's branch-free append writes one past
      n_boundary += unit.n_boundary + 1;
    }
  }
  candidates.above.reset(new int32_t[n_above]);
  candidates.boundary_index.reset(new int32_t[n_boundary]);
  candidates.boundary_key.reset(new uint32_t[n_boundary]);
  const kernels::cpu::TopkCollectFn collect = ZERO_EXT_CPU_KERNEL(kernels::cpu::topk_collect);
  for_each_unit(units, [&](int64_t i) {
    const Unit& unit = units[i];
    collect({call.v + unit.chunk * call.m + unit.begin, unit.end - unit.begin, unit.begin,
             boundaries[unit.chunk].bin, candidates.above.get() + unit.above_offset,
             candidates.boundary_index.get() + unit.boundary_offset,
             candidates.boundary_key.get() + unit.boundary_offset});
  });
  return boundaries;
}

// Step 4: each chunk's threshold within its boundary bin, how its units share the ties at the
// threshold (in index order) and where each unit's entries go in the packed row.
void settle_boundaries(const Call& call, std::vector<Unit>& units,
                       std::vector<Boundary>& boundaries, const Candidates& candidates) {
  for (int64_t c = 0; c < call.chunks; ++c) {
    Boundary& boundary = boundaries[c];
    std::vector<uint32_t> keys;
    keys.reserve(boundary.count);
    for (const Unit& unit : units) {
      if (unit.chunk != c) continue;
      const uint32_t* first = candidates.boundary_key.get() + unit.boundary_offset;
      keys.insert(keys.end(), first, first + unit.n_boundary);
    }
    std::nth_element(keys.begin(), keys.begin() + (boundary.wanted - 1), keys.end(),
                     std::greater<uint32_t>());
    boundary.threshold = keys[boundary.wanted - 1];
  }
  for_each_unit(units, [&](int64_t i) {
    Unit& unit = units[i];
    const uint32_t threshold = boundaries[unit.chunk].threshold;
    const uint32_t* keys = candidates.boundary_key.get() + unit.boundary_offset;
    for (int64_t j = 0; j < unit.n_boundary; ++j) {
      unit.n_greater += keys[j] > threshold;
      unit.n_equal += keys[j] == threshold;
    }
  });
  for (int64_t c = 0; c < call.chunks; ++c) {
    int64_t greater = 0;
    for (const Unit& unit : units) greater += unit.chunk == c ? unit.n_greater : 0;
    int64_t ties_left = boundaries[c].wanted - greater;
    int64_t out = 0;
    for (Unit& unit : units) {
      if (unit.chunk != c) continue;
      unit.ties = std::min(ties_left, unit.n_equal);
      ties_left -= unit.ties;
      unit.out_offset = out;
      out += unit.n_above + unit.n_greater + unit.ties;
    }
    TORCH_INTERNAL_ASSERT(out == call.k && ties_left == 0, kOp, ": selected ", out, " of k = ",
                          call.k);
  }
}

// Step 5.
void emit_rows(const Call& call, const std::vector<Unit>& units,
               const std::vector<Boundary>& boundaries, const Candidates& candidates) {
  const kernels::cpu::TopkEmitFn emit = ZERO_EXT_CPU_KERNEL(kernels::cpu::topk_emit);
  for_each_unit(units, [&](int64_t i) {
    const Unit& unit = units[i];
    const int64_t first = unit.chunk * call.m;
    uint8_t* row = call.rows + unit.chunk * call.row_bytes;
    emit({call.v + first, call.u == nullptr ? nullptr : call.u + first,
          candidates.above.get() + unit.above_offset, unit.n_above,
          candidates.boundary_index.get() + unit.boundary_offset,
          candidates.boundary_key.get() + unit.boundary_offset, unit.n_boundary,
          boundaries[unit.chunk].threshold, unit.ties, row + 4 * unit.out_offset,
          row + 4 * call.k + call.value_bytes * unit.out_offset, call.value_type});
  });
}

at::Tensor topk_feedback_select_cpu(const at::Tensor& residual, const at::Tensor& grad,
                                    int64_t chunks, int64_t k,
                                    const std::optional<at::Tensor>& momentum,
                                    double momentum_factor,
                                    std::optional<at::ScalarType> dtype) {
  const at::ScalarType value_dtype = dtype.value_or(grad.scalar_type());
  check_args(residual, grad, chunks, k, momentum, momentum_factor, value_dtype);
  const int64_t m = residual.numel() / chunks;
  const int64_t value_bytes = static_cast<int64_t>(c10::elementSize(value_dtype));
  const int64_t row_bytes = kernels::topk_row_bytes(k, value_bytes);
  at::Tensor packed = at::empty({chunks, row_bytes}, residual.options().dtype(at::kByte));
  if (m == 0) return packed;
  const Call call{residual.data_ptr<float>(),
                  momentum.has_value() ? momentum->data_ptr<float>() : nullptr,
                  static_cast<const char*>(grad.const_data_ptr()),
                  grad.element_size(),
                  element_type(grad.scalar_type()),
                  chunks,
                  m,
                  k,
                  element_type(value_dtype),
                  value_bytes,
                  row_bytes,
                  packed.data_ptr<uint8_t>()};
  std::vector<Unit> units = make_units(chunks, m);
  const std::vector<uint32_t> hist = accumulate_and_count(call, units, momentum_factor);
  if (k == 0) return packed;  // the gradient is kept for a later send
  Candidates candidates;
  std::vector<Boundary> boundaries = collect_candidates(call, units, hist, candidates);
  settle_boundaries(call, units, boundaries, candidates);
  emit_rows(call, units, boundaries, candidates);
  return packed;
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) { m.impl("topk_feedback_select", &topk_feedback_select_cpu); }

}  // namespace zero_ext
