// The order in which top-k sparsification ranks entries, written once for every backend.
//
// zero_ext::topk_feedback_select sends, per chunk, the k entries of the residual with the largest
// magnitude key below. The key is the IEEE-754 bit pattern of |x| as an unsigned integer: for
// finite values it orders exactly as the magnitude does, +inf comes above every finite value and
// every NaN (whatever its sign or payload) above +inf, so a non-finite gradient is always among
// the entries sent and the receiver's overflow check sees it. The top kTopkBinBits bits of the
// key (the 8 exponent bits and the 3 leading mantissa bits) name its histogram bin: bins order
// like keys, and the kernels find the bin holding the k-th largest key from a histogram before
// they settle that bin exactly.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/host_device.h"

namespace zero_ext::kernels {

inline constexpr int kTopkBinShift = 20;                    // key bits below the bin
inline constexpr int kTopkBins = 1 << (31 - kTopkBinShift);  // 2048: the sign bit is clear

ZERO_EXT_HOST_DEVICE uint32_t magnitude_key(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  return bits & 0x7FFFFFFFu;
}

ZERO_EXT_HOST_DEVICE uint32_t magnitude_bin(uint32_t key) { return key >> kTopkBinShift; }

// Bytes of one packed row of k entries: k int32 indices, then k values of value_bytes each.
ZERO_EXT_HOST_DEVICE int64_t topk_row_bytes(int64_t k, int64_t value_bytes) {
  return k * (4 + value_bytes);
}

}  // namespace zero_ext::kernels
