// Raw-pointer passes of zero_ext::topk_feedback_select over one unit of work (a contiguous range
// of one chunk), compiled once per instruction set.
//
// csrc/topk_cpu.cpp validates the arguments, cuts every chunk into units, runs the units on ATen's
// thread pool and, between the passes, merges the units' histograms, finds each chunk's boundary
// bin and settles it exactly. Nothing here knows about tensors or the dispatcher. The ranking key
// and its bins: kernels/topk_math.h.
#pragma once

#include <cstdint>

#include "kernels/adamw_math.h"  // ElementType
#include "kernels/cpu/isa_decl.h"
#include "kernels/topk_math.h"

namespace zero_ext::kernels::cpu {

// Pass 1 over elements [0, n) of a unit (every pointer at the unit's first element): the error
// feedback accumulation, in fp32 with each operation rounded on its own,
//   with momentum u:  u = u * momentum + g * grad_weight;  v = v + u
//   without:          v = v + g
// and the histogram of the new v's magnitude bins, added to hist (kTopkBins counters).
struct TopkAccumulate {
  float* v;
  const void* g;
  ElementType g_type;
  float* u;           // nullptr: no momentum
  float momentum;     // the momentum factor, rounded to fp32
  float grad_weight;  // 1 - momentum factor, rounded to fp32
  int64_t n;
  uint32_t* hist;
};

using TopkAccumulateFn = void (*)(const TopkAccumulate& args);
ZERO_EXT_DECLARE_CPU_KERNEL(topk_accumulate, TopkAccumulateFn);

// Pass 2 over v[0, n) of a unit: the indices (base + t) of the entries whose bin is above `bin`
// into above, and of those in `bin` into boundary_index with their keys into boundary_key, each
// in ascending order. The caller sized both from the unit's histogram, with one slot to spare
// past the last entry (written and not counted).
struct TopkCollect {
  const float* v;
  int64_t n;
  int64_t base;  // the unit's first index within its chunk
  uint32_t bin;
  int32_t* above;
  int32_t* boundary_index;
  uint32_t* boundary_key;
};

using TopkCollectFn = void (*)(const TopkCollect& args);
ZERO_EXT_DECLARE_CPU_KERNEL(topk_collect, TopkCollectFn);

// The last step of a unit: its selected entries in ascending index order are every entry of
// above, the boundary entries whose key is above threshold, and the first `ties` boundary entries
// whose key equals it. For each, in order: its index (int32) and its value rounded to value_type
// are written to the next slot of index_out / value_out, and it leaves the residual, v[i] =
// v[i] - float(value) (the rounding error stays), and the momentum, u[i] = 0.
struct TopkEmit {
  float* v;  // the chunk's first element (indices are within the chunk)
  float* u;  // the chunk's first element, or nullptr: no momentum
  const int32_t* above;
  int64_t n_above;
  const int32_t* boundary_index;
  const uint32_t* boundary_key;
  int64_t n_boundary;
  uint32_t threshold;
  int64_t ties;
  uint8_t* index_out;  // int32 little-endian, possibly unaligned
  uint8_t* value_out;  // value_type elements, possibly unaligned
  ElementType value_type;
};

using TopkEmitFn = void (*)(const TopkEmit& args);
ZERO_EXT_DECLARE_CPU_KERNEL(topk_emit, TopkEmitFn);

}  // namespace zero_ext::kernels::cpu
