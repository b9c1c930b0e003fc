// ZERO_EXT_DECLARE_CPU_KERNEL(name, Fn) declares a CPU kernel entry point once per instruction set
// setup.py compiles kernels/cpu/*.cpp for: name_DEFAULT, name_AVX2 and name_AVX512, each of the
// function type that the pointer type Fn points to, so a kernel's signature is written once (its
// Fn alias, which the csrc/ glue holds the chosen variant in). Each kernels/cpu/*.cpp defines its
// variant under ZERO_EXT_ISA_FN(name) (kernels/cpu/isa_name.h), and ZERO_EXT_CPU_KERNEL(name)
// (csrc/cpu_isa.h) picks one; a variant setup.py did not compile (AVX2 / AVX-512 off x86-64) is
// declared but never referenced.
#pragma once

#include <type_traits>

#define ZERO_EXT_DECLARE_CPU_KERNEL(name, ...)              \
  std::remove_pointer_t<__VA_ARGS__> name##_DEFAULT;        \
  std::remove_pointer_t<__VA_ARGS__> name##_AVX2;           \
  std::remove_pointer_t<__VA_ARGS__> name##_AVX512
