// ZERO_EXT_ISA_FN(name) names a kernel entry point after the instruction set this translation unit
// is compiled for (adamw_span -> adamw_span_AVX2), so the per-ISA variants coexist in one library.
// Included by every kernels/cpu/*.cpp, which setup.py compiles once per ISA.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernels/cpu/*.cpp are compiled by setup.py with -DCPU_CAPABILITY=<ISA>"
#endif

#define ZERO_EXT_CONCAT_INNER(a, b) a##_##b
#define ZERO_EXT_CONCAT(a, b) ZERO_EXT_CONCAT_INNER(a, b)
#define ZERO_EXT_ISA_FN(name) ZERO_EXT_CONCAT(name, CPU_CAPABILITY)
