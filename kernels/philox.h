// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based generator, so the random bits of element i are a pure function of (seed, i).
// The dropout of zero_ext::scaled_masked_softmax draws its keep-mask from it in the forward and
// regenerates the same mask in the backward instead of saving it; the CPU kernels
// (kernels/cpu/softmax.cpp) and the CUDA kernels (kernels/cuda/softmax.cu) include this one
// header, so both backends drop the same elements for the same seed.
#pragma once

#include <cstdint>

#include "kernels/host_device.h"

namespace zero_ext::kernels {

struct Philox4 {
  uint32_t v[4];
};

ZERO_EXT_HOST_DEVICE uint32_t mul_hi_lo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// One Philox round on the counter words c with key words k0, k1, then the key bump.
ZERO_EXT_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                       uint32_t& k0, uint32_t& k1) {
  uint32_t hi0, hi1;
  const uint32_t lo0 = mul_hi_lo(0xD2511F53u, c0, &hi0);
  const uint32_t lo1 = mul_hi_lo(0xCD9E8D57u, c2, &hi1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
  k0 += 0x9E3779B9u;
  k1 += 0xBB67AE85u;
}

// Four random words for the 128-bit counter (c0 + 2^32 c1, 0, 0) under the 64-bit key.
ZERO_EXT_HOST_DEVICE Philox4 philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) philox_round(c0, c1, c2, c3, k0, k1);
  return {{c0, c1, c2, c3}};
}

// words[4 i + e] = philox4x32_10(counter + i, key).v[e] for i < N: the same words as N calls,
// laid out as loops over i that a CPU compiler vectorizes (the CPU kernels' dropout).
template <int N>
inline void philox4x32_10_batch(uint64_t counter, uint64_t key, uint32_t* words) {
  uint32_t c0[N], c1[N], c2[N], c3[N], k0[N], k1[N];
  for (int i = 0; i < N; ++i) {
    c0[i] = static_cast<uint32_t>(counter + i);
    c1[i] = static_cast<uint32_t>((counter + i) >> 32);
    c2[i] = c3[i] = 0;
    k0[i] = static_cast<uint32_t>(key);
    k1[i] = static_cast<uint32_t>(key >> 32);
  }
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < N; ++i) philox_round(c0[i], c1[i], c2[i], c3[i], k0[i], k1[i]);
  }
  for (int i = 0; i < N; ++i) {
    words[4 * i] = c0[i];
    words[4 * i + 1] = c1[i];
    words[4 * i + 2] = c2[i];
    words[4 * i + 3] = c3[i];
  }
}

// Dropout with probability p keeps an element whose random word is >= this threshold
// (p * 2^32, so the keep probability is 1 - p up to 2^-32).
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// Whether element `index` of a dropout under `seed` is kept: one Philox call serves four
// consecutive elements.
ZERO_EXT_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  return philox4x32_10(index >> 2, seed).v[index & 3] >= threshold;
}

}  // namespace zero_ext::kernels
