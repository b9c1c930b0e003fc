// Which compiled CPU kernel variant this process runs, chosen once from ATen's own detection.
#pragma once

namespace zero_ext {

enum class CpuIsa { kDefault, kAvx2, kAvx512 };

// The best variant that was both compiled (setup.py) and is supported by this CPU, following
// at::get_cpu_capability() so ATEN_CPU_CAPABILITY=default|avx2|avx512 forces a lower one.
CpuIsa selected_cpu_isa();

const char* cpu_isa_name(CpuIsa isa);

}  // namespace zero_ext
