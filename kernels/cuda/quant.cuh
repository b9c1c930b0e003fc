// Raw-pointer launchers of the blockwise quantization kernels: quantize a run of rows (with or
// without error feedback), and dequantize-sum k senders' rows into an output.
//
// csrc/quant_cuda.cu validates the ops' arguments and calls these launchers on the current
// stream. Nothing here knows about tensors, the dispatcher or torch headers. The element math and
// the packed row layout are those of kernels/quant_math.h, so results are bitwise those of the CPU
// kernels (every multiply feeding an add is an explicit _rn intrinsic: no FMA contraction).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/adamw_math.h"  // ElementType

namespace zero_ext::kernels::cuda {

// Threads per CUDA block of every kernel here; elements each thread reads per access.
inline constexpr int kQuantBlockThreads = 256;
inline constexpr int kQuantElementsPerThread = 8;

// Rows [first_row, first_row + num_rows) of a quantize_chunks call: chunk c of x (elements
// [c * m, (c + 1) * m)) into packed row c (packed + c * row_bytes).
struct QuantizeRun {
  const void* x;  // device, of x_type
  ElementType x_type;
  int64_t m;
  int64_t block_size;
  int bits;
  uint8_t* packed;
  int64_t row_bytes;
  int64_t first_row;
  int64_t num_rows;
  // Error feedback (residual == nullptr: none): x_eff = x + float(residual) * coefficient[c] *
  // factor.
  uint8_t* residual;            // float8_e4m3fn bits, x's numel
  const float* coefficient;     // [chunks], the stored residual scales (read only)
  float factor;
};

// Writes the rows' quantized blocks and scales (quantize pass).
cudaError_t launch_quantize_rows(const QuantizeRun& run, cudaStream_t stream);

// After launch_quantize_rows with feedback: new_scale[c] = max block scale / 2 / 448 of each row
// (0 if a scale is NaN), then residual = fp8(clamp(e / new_scale[c], -448, 448)) of every
// element (zeros where new_scale[c] == 0). new_scale is device scratch of [chunks] floats; the
// caller copies it into the residual scales once this has run (the encode reads the old ones).
cudaError_t launch_encode_residual(const QuantizeRun& run, float* new_scale, cudaStream_t stream);

// out[j] (j < g * m) = round((accumulate ? out[j] : 0) + v_0[j] + ... + v_{k-1}[j]) in fp32, in
// sender order, v_i = q * scale of packed sender i (rows [i * g, (i + 1) * g) of packed) or
// exact[j] for i == exact_index. With sum == false (dequantize_, k == 1): out = round(v_0) with
// no addition.
struct DequantizeRun {
  void* out;  // device, of out_type
  ElementType out_type;
  const uint8_t* packed;
  int64_t k;
  int64_t g;
  int64_t m;
  int64_t row_bytes;
  int64_t block_size;
  int bits;
  const void* exact;  // nullptr: none
  ElementType exact_type;
  int64_t exact_index;
  bool accumulate;
  bool sum;
};

cudaError_t launch_dequantize(const DequantizeRun& run, cudaStream_t stream);

}  // namespace zero_ext::kernels::cuda
