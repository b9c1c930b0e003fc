// CPU kernel of zero_ext::adamw_step_, on calls AdamWOps (csrc/adamw_args.h) validated: derives
// per-tensor coefficients, splits every tensor into spans and runs them across ATen's intra-op
// thread pool (torch.get_num_threads()).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "csrc/adamw_args.h"
#include "csrc/cpu_isa.h"
#include "kernels/cpu/adamw.h"

namespace zero_ext {
namespace {

// Elements per unit of parallel work: large enough to amortise scheduling, small enough that
// one big tensor spreads over every thread. A multiple of every SIMD width.
constexpr int64_t kSpanElements = 1 << 16;

struct SpanWork {
  int64_t tensor;  // index into the op's lists
  int64_t begin;   // first element of this span
  int64_t numel;
};

template <typename T>
T* offset_ptr(const at::Tensor& t, int64_t begin) {
  return static_cast<T*>(t.data_ptr()) + begin;
}

void adamw_step_cpu(const AdamWStepArgs& args) {
  const double inv = args.inv_scale.has_value() ? args.inv_scale->item<float>() : 1.0;

  const int64_t n = static_cast<int64_t>(args.params.size());
  std::vector<kernels::AdamWCoefficients<float>> coefficients(n);
  std::vector<SpanWork> work;
  for (int64_t i = 0; i < n; ++i) {
    float* step = args.state_steps[i].data_ptr<float>();
    *step += 1.0f;
    coefficients[i] = kernels::adamw_coefficients(args.hyper, *step, inv);
    const int64_t numel = args.params[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kSpanElements) {
      work.push_back({i, begin, std::min(kSpanElements, numel - begin)});
    }
  }

  const kernels::ElementType grad_type = element_type(args.grads[0].scalar_type());
  const kernels::ElementType copy_type =
      args.params_16bit.empty() ? kernels::ElementType::kBFloat16
                                : element_type(args.params_16bit[0].scalar_type());
  const size_t grad_bytes = args.grads[0].element_size();
  const size_t copy_bytes = args.params_16bit.empty() ? 0 : args.params_16bit[0].element_size();
  const kernels::cpu::AdamWSpanFn kernel = ZERO_EXT_CPU_KERNEL(kernels::cpu::adamw_span);

  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const SpanWork& s = work[w];
      kernels::cpu::AdamWSpan span{
          offset_ptr<float>(args.params[s.tensor], s.begin),
          static_cast<const char*>(args.grads[s.tensor].data_ptr()) + s.begin * grad_bytes,
          offset_ptr<float>(args.exp_avgs[s.tensor], s.begin),
          offset_ptr<float>(args.exp_avg_sqs[s.tensor], s.begin),
          args.params_16bit.empty()
              ? nullptr
              : static_cast<char*>(args.params_16bit[s.tensor].data_ptr()) + s.begin * copy_bytes,
          s.numel};
      kernel(span, coefficients[s.tensor], grad_type, copy_type);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(zero_ext, CPU, m) { AdamWOps<adamw_step_cpu>::impl(m); }

}  // namespace zero_ext
