// Raw-pointer blockwise quantize / dequantize over a range of blocks of one chunk, compiled once
// per instruction set.
//
// csrc/quant_cpu.cpp validates the arguments of zero_ext::quantize_chunks, dequantize_sum_ and
// dequantize_, cuts every chunk into ranges of blocks, runs the ranges on ATen's thread pool and
// calls the variant that at::get_cpu_capability() selects. Nothing here knows about tensors or
// the dispatcher. Element math: kernels/quant_math.h.
#pragma once

#include <cstdint>

#include "kernels/adamw_math.h"  // ElementType
#include "kernels/cpu/isa_decl.h"
#include "kernels/quant_math.h"

namespace zero_ext::kernels::cpu {

// The error-feedback state of one chunk, as the quantize kernels read it: the effective input is
// x_eff = x + float(residual) * coefficient * factor (fp32, left to right); factor == 1
// multiplies nothing.
struct ResidualView {
  uint8_t* residual;  // float8_e4m3fn bits of the chunk's elements, nullptr: no error feedback
  float coefficient;  // the chunk's stored residual scale
  float factor;       // residual_factor
};

// Blocks [first_block, last_block) of one chunk of m elements (x points at the chunk's first
// element, of x_type). Writes their quantized bytes into row (the chunk's packed row; data
// first, then the nb scales at row + quant_data_bytes(m, bits, B)) and their scales. Elements
// past m in the last block are quantized as zeros.
struct QuantizeBlocks {
  const void* x;
  ElementType x_type;
  int64_t m;
  int64_t block_size;
  int bits;
  int64_t first_block;
  int64_t last_block;
  uint8_t* row;
  ResidualView residual;
};

using QuantizeBlocksFn = void (*)(const QuantizeBlocks& args);
ZERO_EXT_DECLARE_CPU_KERNEL(quantize_blocks, QuantizeBlocksFn);

// After quantize_blocks filled the row: the new residual of the same blocks,
// fp8(clamp((x_eff - dequant(q)) / new_scale, -448, 448)), written over args.residual (read
// first, element by element, to recompute x_eff); zeros when new_scale == 0.
using EncodeResidualFn = void (*)(const QuantizeBlocks& args, float new_scale);
ZERO_EXT_DECLARE_CPU_KERNEL(encode_residual, EncodeResidualFn);

// out[t] for t in [first, last) of one chunk of m elements (out points at the chunk's first
// element, of out_type): (accumulate ? out[t] : 0) + v_0[t] + ... + v_{k-1}[t] in fp32, in that
// order, rounded to out_type, where v_i = dequant(rows[i]) or, for i == exact_index, exact[t]
// (of exact_type, exact pointing at the chunk's first element). With sum == false (the plain
// dequantize_, k == 1) out[t] = round(v_0[t]) with no addition, so a -0.0 stays -0.0.
struct DequantizeSumRange {
  void* out;
  ElementType out_type;
  const uint8_t* const* rows;  // k packed rows of this chunk
  int64_t k;
  const void* exact;
  ElementType exact_type;
  int64_t exact_index;  // -1: none
  int64_t m;
  int64_t block_size;
  int bits;
  int64_t first;
  int64_t last;
  bool accumulate;
  bool sum;
};

using DequantizeSumFn = void (*)(const DequantizeSumRange& args);
ZERO_EXT_DECLARE_CPU_KERNEL(dequantize_sum_range, DequantizeSumFn);

}  // namespace zero_ext::kernels::cpu
