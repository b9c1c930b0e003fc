// CPU kernels of zero_ext::quantize_chunks, zero_ext::dequantize_sum_ and zero_ext::dequantize_,
// on calls QuantOps (csrc/quant_args.h) validated: cut every chunk into units of whole
// quantization blocks (about kSpanElements elements each) and run the units across ATen's
// intra-op thread pool (torch.get_num_threads()). The result does not depend on the thread
// count: each block is computed by one thread, and error feedback's per-chunk residual scale is
// taken from the finished row between two passes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "csrc/adamw_args.h"  // element_type
#include "csrc/cpu_isa.h"
#include "csrc/quant_args.h"
#include "kernels/cpu/quant.h"

namespace zero_ext {
namespace {

// Elements per unit of parallel work: large enough to amortise scheduling, small enough that a
// chunk spreads over every thread. Units hold whole blocks (one block when B is larger).
constexpr int64_t kSpanElements = 1 << 16;

int64_t blocks_per_unit(int64_t block_size) {
  return std::max<int64_t>(1, kSpanElements / block_size);
}

void quantize_chunks_cpu(const QuantizeChunksArgs& args, const QuantizeOutput& output) {
  const std::optional<at::Tensor>& residual = args.residual;
  const int64_t m = output.m, row_bytes = output.row_bytes, block_size = args.block_size;
  const int b = static_cast<int>(args.bits);
  const std::vector<int64_t> rows = rows_to_quantize(args.chunks, args.skip);
  const int64_t nb = kernels::quant_blocks(m, block_size);
  if (rows.empty()) return;
  if (nb == 0) {  // empty chunks: no block scale, so a residual scale of 0
    if (residual.has_value()) {
      for (const int64_t c : rows) args.residual_scale->select(0, c).zero_();
    }
    return;
  }

  const bool feedback = residual.has_value();
  // Rounded to fp32 as ATen rounds a Python scalar multiplying an fp32 tensor.
  const float factor = static_cast<float>(args.residual_factor);
  float* coefficients = feedback ? args.residual_scale->data_ptr<float>() : nullptr;
  const kernels::ElementType x_type = element_type(args.x.scalar_type());
  const char* x_data = static_cast<const char*>(args.x.const_data_ptr());
  const int64_t x_bytes = args.x.element_size();
  uint8_t* out = output.packed.data_ptr<uint8_t>();
  const int64_t per_unit = blocks_per_unit(block_size);
  const int64_t units_per_row = (nb + per_unit - 1) / per_unit;
  const int64_t units = static_cast<int64_t>(rows.size()) * units_per_row;

  // The blocks of unit u, with the chunk's residual read at old_scale[c].
  auto unit_args = [&](int64_t u) {
    const int64_t c = rows[u / units_per_row];
    const int64_t first = (u % units_per_row) * per_unit;
    kernels::cpu::ResidualView view{nullptr, 0.0f, factor};
    if (feedback) {
      view.residual = static_cast<uint8_t*>(residual->data_ptr()) + c * m;
      view.coefficient = coefficients[c];
    }
    return kernels::cpu::QuantizeBlocks{x_data + c * m * x_bytes, x_type, m, block_size, b,
                                        first, std::min(first + per_unit, nb),
                                        out + c * row_bytes, view};
  };

  const kernels::cpu::QuantizeBlocksFn quantize =
      ZERO_EXT_CPU_KERNEL(kernels::cpu::quantize_blocks);
  at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
    for (int64_t u = first; u < last; ++u) quantize(unit_args(u));
  });
  if (!feedback) return;

  // Each chunk's new residual scale from its finished scales: max / 2 / 448, or 0 (residual
  // dropped) for a chunk with a non-finite block.
  std::vector<float> new_scale(args.chunks, 0.0f);
  for (const int64_t c : rows) {
    const uint8_t* scales = out + c * row_bytes + kernels::quant_data_bytes(m, b, block_size);
    float max_scale = 0.0f;
    bool finite = true;
    for (int64_t blk = 0; blk < nb; ++blk) {
      float s;
      std::memcpy(&s, scales + 4 * blk, sizeof(float));
      if (std::isnan(s)) {
        finite = false;
        break;
      }
      max_scale = std::max(max_scale, s);
    }
    new_scale[c] = finite ? kernels::residual_scale_of(max_scale) : 0.0f;
  }
  const kernels::cpu::EncodeResidualFn encode =
      ZERO_EXT_CPU_KERNEL(kernels::cpu::encode_residual);
  at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
    for (int64_t u = first; u < last; ++u) encode(unit_args(u), new_scale[rows[u / units_per_row]]);
  });
  for (const int64_t c : rows) coefficients[c] = new_scale[c];
}

void dequantize_cpu(const DequantizeArgs& args, bool accumulate) {
  const PackedShape shape = packed_shape(args);
  if (shape.m == 0) return;
  const int b = static_cast<int>(args.bits);
  const kernels::ElementType out_type = element_type(args.out.scalar_type());
  const int64_t out_bytes = args.out.element_size();
  char* out = static_cast<char*>(args.out.data_ptr());
  const uint8_t* packed = args.packed.const_data_ptr<uint8_t>();
  const bool has_exact = args.exact.has_value();
  const char* exact = has_exact ? static_cast<const char*>(args.exact->const_data_ptr()) : nullptr;
  const kernels::ElementType exact_type =
      has_exact ? element_type(args.exact->scalar_type()) : kernels::ElementType::kFloat32;
  const int64_t exact_bytes = has_exact ? args.exact->element_size() : 0;

  const int64_t span = blocks_per_unit(args.block_size) * args.block_size;
  const int64_t units_per_chunk = (shape.m + span - 1) / span;
  const kernels::cpu::DequantizeSumFn kernel =
      ZERO_EXT_CPU_KERNEL(kernels::cpu::dequantize_sum_range);
  at::parallel_for(0, shape.g * units_per_chunk, 1, [&](int64_t first, int64_t last) {
    std::vector<const uint8_t*> rows(shape.k);
    for (int64_t u = first; u < last; ++u) {
      const int64_t c = u / units_per_chunk;
      const int64_t begin = (u % units_per_chunk) * span;
      for (int64_t i = 0; i < shape.k; ++i) {
        rows[i] = packed + (i * shape.g + c) * shape.row_bytes;
      }
      kernel({out + c * shape.m * out_bytes, out_type, rows.data(), shape.k,
              has_exact ? exact + c * shape.m * exact_bytes : nullptr, exact_type,
              args.exact_index, shape.m, args.block_size, b, begin,
              std::min(begin + span, shape.m), accumulate, args.sum});
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) { QuantOps<quantize_chunks_cpu, dequantize_cpu>::impl(m); }

}  // namespace zero_ext
