// ZERO_EXT_HOST_DEVICE marks a function that both the CPU kernels (plain C++) and the CUDA
// kernels (device code) compile, so a formula shared between backends is written once:
// kernels/adamw_math.h, kernels/philox.h, kernels/activation_math.h.
#pragma once

#if defined(__CUDACC__)
#define ZERO_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ZERO_EXT_HOST_DEVICE inline
#endif
