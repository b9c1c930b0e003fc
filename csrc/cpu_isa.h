// Which compiled CPU kernel variant this process runs, chosen once from ATen's own detection, and
// ZERO_EXT_CPU_KERNEL, which the csrc/*_cpu.cpp glue calls to get that variant of a kernel.
#pragma once

namespace zero_ext {

enum class CpuIsa { kDefault, kAvx2, kAvx512 };

// The best variant that was both compiled (setup.py) and is supported by this CPU, following
// at::get_cpu_capability() so ATEN_CPU_CAPABILITY=default|avx2|avx512 forces a lower one.
CpuIsa selected_cpu_isa();

const char* cpu_isa_name(CpuIsa isa);

// The one of a kernel's per-ISA variants that selected_cpu_isa() names. A variant setup.py did
// not compile comes as nullptr and is never returned, as selected_cpu_isa() never names it.
template <typename Fn>
Fn pick_for_cpu_isa(Fn default_fn, Fn avx2_fn, Fn avx512_fn) {
  switch (selected_cpu_isa()) {
    case CpuIsa::kAvx512:
      return avx512_fn;
    case CpuIsa::kAvx2:
      return avx2_fn;
    case CpuIsa::kDefault:
      break;
  }
  return default_fn;
}

}  // namespace zero_ext

// The variants exist only where setup.py compiled them (ZERO_EXT_HAVE_<ISA>, x86-64 only).
#ifdef ZERO_EXT_HAVE_AVX2
#define ZERO_EXT_IF_HAVE_AVX2(fn) (fn)
#else
#define ZERO_EXT_IF_HAVE_AVX2(fn) nullptr
#endif
#ifdef ZERO_EXT_HAVE_AVX512
#define ZERO_EXT_IF_HAVE_AVX512(fn) (fn)
#else
#define ZERO_EXT_IF_HAVE_AVX512(fn) nullptr
#endif

// This CPU's variant of the kernel `name`, one of name_DEFAULT, name_AVX2 and name_AVX512 (see
// kernels/cpu/isa_name.h), e.g. ZERO_EXT_CPU_KERNEL(kernels::cpu::adamw_span).
#define ZERO_EXT_CPU_KERNEL(name)                                                              \
  ::zero_ext::pick_for_cpu_isa<decltype(&name##_DEFAULT)>(&name##_DEFAULT,                     \
                                                          ZERO_EXT_IF_HAVE_AVX2(&name##_AVX2), \
                                                          ZERO_EXT_IF_HAVE_AVX512(&name##_AVX512))
