#include "csrc/cpu_isa.h"

#include <ATen/Version.h>

#include <string>

namespace zero_ext {

CpuIsa selected_cpu_isa() {
  static const CpuIsa isa = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef ZERO_EXT_HAVE_AVX512
    if (capability == "AVX512") return CpuIsa::kAvx512;
#endif
#ifdef ZERO_EXT_HAVE_AVX2
    if (capability == "AVX512" || capability == "AVX2") return CpuIsa::kAvx2;
#endif
    return CpuIsa::kDefault;
  }();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "AVX512";
    case CpuIsa::kAvx2:
      return "AVX2";
    case CpuIsa::kDefault:
      break;
  }
  return "DEFAULT";
}

}  // namespace zero_ext
