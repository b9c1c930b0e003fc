// The passes of top-k selection with error feedback over one unit: at::vec SIMD for the fp32
// accumulation and for the test that finds the few candidates of a vector (its lanes as a bit
// mask), plain loops the compiler vectorizes for the keys, scalar histogram counts.
//
// setup.py compiles this file once per instruction set with -DCPU_CAPABILITY=<ISA> (and
// -ffp-contract=off: u * m + g * w rounds each product and the sum, in the SIMD body and the
// scalar tail alike, so every variant gives the same bits).
#include "kernels/cpu/topk.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels/cpu/isa_name.h"

namespace zero_ext::kernels::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();

// Elements accumulated before their bins are counted: the piece of v just written is still in
// L1 when the counting loop reads it back.
constexpr int64_t kPiece = 1024;

// Interleaved copies of the histogram: consecutive entries mostly fall in the same few bins, and
// one counter incremented back to back waits on its own store each time; four copies let four
// increments proceed at once. Only the bins in use are touched, so the copies stay in L1.
constexpr int kCopies = 4;

// v[0, n) += g (and the momentum step), g of type G, in SIMD with a scalar tail.
template <typename G, bool kMomentum>
void accumulate_piece(float* v, const G* g, float* u, int64_t n, float momentum, float weight) {
  const Vec vmomentum(momentum);
  const Vec vweight(weight);
  auto step = [&](const Vec& gv, int64_t t) {
    if constexpr (kMomentum) {
      const Vec un = Vec::loadu(u + t) * vmomentum + gv * vweight;
      un.store(u + t);
      (Vec::loadu(v + t) + un).store(v + t);
    } else {
      (Vec::loadu(v + t) + gv).store(v + t);
    }
  };
  int64_t t = 0;
  if constexpr (std::is_same_v<G, float>) {
    for (; t + kWidth <= n; t += kWidth) step(Vec::loadu(g + t), t);
  } else {
    for (; t + 2 * kWidth <= n; t += 2 * kWidth) {
      Vec lo, hi;
      at::vec::load_to_float<G>(g + t, lo, hi);
      step(lo, t);
      step(hi, t + kWidth);
    }
  }
  for (; t < n; ++t) {
    const float gt = static_cast<float>(g[t]);
    if constexpr (kMomentum) {
      u[t] = u[t] * momentum + gt * weight;
      v[t] = v[t] + u[t];
    } else {
      v[t] = v[t] + gt;
    }
  }
}

template <typename G, bool kMomentum>
void accumulate_unit(const TopkAccumulate& a) {
  uint32_t counts[kCopies][kTopkBins];
  std::memset(counts, 0, sizeof(counts));
  uint16_t bins[kPiece];
  const G* g = static_cast<const G*>(a.g);
  for (int64_t begin = 0; begin < a.n; begin += kPiece) {
    const int64_t n = std::min(kPiece, a.n - begin);
    float* v = a.v + begin;
    accumulate_piece<G, kMomentum>(v, g + begin, a.u + (kMomentum ? begin : 0), n, a.momentum,
                                   a.grad_weight);
    for (int64_t t = 0; t < n; ++t) {
      bins[t] = static_cast<uint16_t>(magnitude_bin(magnitude_key(v[t])));
    }
    int64_t t = 0;
    for (; t + kCopies <= n; t += kCopies) {
      for (int c = 0; c < kCopies; ++c) ++counts[c][bins[t + c]];
    }
    for (; t < n; ++t) ++counts[0][bins[t]];
  }
  for (int b = 0; b < kTopkBins; ++b) {
    uint32_t sum = 0;
    for (int c = 0; c < kCopies; ++c) sum += counts[c][b];
    a.hist[b] += sum;
  }
}

template <typename G>
void accumulate_unit(const TopkAccumulate& a) {
  if (a.u != nullptr) {
    accumulate_unit<G, true>(a);
  } else {
    accumulate_unit<G, false>(a);
  }
}

// How far ahead the emit loop prefetches the residual (and momentum) entries it will update:
// at 1% density consecutive entries lie a few cache lines apart, beyond what the hardware
// prefetchers follow.
constexpr int64_t kPrefetchAhead = 16;

// The unit's selected indices in ascending order (the merge of above and the selected boundary
// entries) into index_out; returns how many. Touches only the compact lists, so its
// unpredictable branches do not hold up the misses of the residual updates.
int64_t merge_selected(const TopkEmit& a) {
  int64_t out = 0;
  int64_t next_above = 0;
  int64_t ties = a.ties;
  auto put = [&](int32_t i) { std::memcpy(a.index_out + 4 * out++, &i, sizeof(int32_t)); };
  for (int64_t j = 0; j < a.n_boundary; ++j) {
    const uint32_t key = a.boundary_key[j];
    if (key < a.threshold) continue;
    if (key == a.threshold) {
      if (ties == 0) continue;
      --ties;
    }
    const int32_t i = a.boundary_index[j];
    while (next_above < a.n_above && a.above[next_above] < i) put(a.above[next_above++]);
    put(i);
  }
  while (next_above < a.n_above) put(a.above[next_above++]);
  return out;
}

// For each selected index: its value rounded to T into value_out, and its removal from the
// residual and the momentum. No branch depends on the data, so the cache misses overlap.
template <typename T>
void take_selected(const TopkEmit& a, int64_t count) {
  auto index_at = [&](int64_t j) {
    int32_t i;
    std::memcpy(&i, a.index_out + 4 * j, sizeof(int32_t));
    return i;
  };
  for (int64_t j = 0; j < count; ++j) {
    if (j + kPrefetchAhead < count) {
      const int32_t ahead = index_at(j + kPrefetchAhead);
      __builtin_prefetch(a.v + ahead, 1);
      if (a.u != nullptr) __builtin_prefetch(a.u + ahead, 1);
    }
    const int32_t i = index_at(j);
    const float x = a.v[i];
    const T rounded = static_cast<T>(x);
    std::memcpy(a.value_out + sizeof(T) * j, &rounded, sizeof(T));
    a.v[i] = x - static_cast<float>(rounded);
    if (a.u != nullptr) a.u[i] = 0.0f;  // the same way every time: predicted
  }
}

}  // namespace

void ZERO_EXT_ISA_FN(topk_accumulate)(const TopkAccumulate& a) {
  switch (a.g_type) {
    case ElementType::kFloat32:
      return accumulate_unit<float>(a);
    case ElementType::kBFloat16:
      return accumulate_unit<c10::BFloat16>(a);
    case ElementType::kFloat16:
      return accumulate_unit<c10::Half>(a);
  }
}

void ZERO_EXT_ISA_FN(topk_collect)(const TopkCollect& a) {
  const uint32_t low = a.bin << kTopkBinShift;          // the bin's smallest key
  const uint32_t high = (a.bin + 1u) << kTopkBinShift;  // the next bin's (2^31 past the last)
  int64_t n_above = 0;
  int64_t n_boundary = 0;
  // Branch-free appends: every entry is written at the end of both lists, and the counts move
  // past it only where it belongs (the lists have a slot to spare for the last write).
  auto append = [&](int64_t t) {
    const uint32_t key = magnitude_key(a.v[t]);
    const int32_t index = static_cast<int32_t>(a.base + t);
    a.above[n_above] = index;
    n_above += key >= high;
    a.boundary_index[n_boundary] = index;
    a.boundary_key[n_boundary] = key;
    n_boundary += (key >= low) & (key < high);
  };
  // A vector at a time, the lanes that may hold a candidate as a bit mask: not |v| < the bin's
  // smallest magnitude (NaN compares false, so it is a candidate). The integer keys decide:
  // the mask only has to hold every candidate (with denormals flushed to zero it may hold a
  // subnormal below the bin too, which then counts nowhere).
  float smallest;
  std::memcpy(&smallest, &low, sizeof(float));
  const Vec vsmallest(smallest);
  int64_t t = 0;
  for (; t + kWidth <= a.n; t += kWidth) {
    int mask = (Vec::loadu(a.v + t).abs() < vsmallest).zero_mask();
    while (mask != 0) {
      append(t + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
  for (; t < a.n; ++t) append(t);
}

void ZERO_EXT_ISA_FN(topk_emit)(const TopkEmit& a) {
  const int64_t count = merge_selected(a);
  switch (a.value_type) {
    case ElementType::kFloat32:
      return take_selected<float>(a, count);
    case ElementType::kBFloat16:
      return take_selected<c10::BFloat16>(a, count);
    case ElementType::kFloat16:
      return take_selected<c10::Half>(a, count);
  }
}

}  // namespace zero_ext::kernels::cpu
