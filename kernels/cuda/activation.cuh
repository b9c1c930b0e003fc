// Raw-pointer launchers of the SwiGLU and bias + GeLU kernels, forward and backward, fp32 / bf16 /
// fp16 elements. Arguments and formulas: kernels/cpu/activation.h (the same ActivationRows, rows
// [first_row, last_row) of [rows, h] tensors) and kernels/activation_math.h, shared with the CPU
// kernels. Each backward recomputes the activation from the forward's inputs.
//
// csrc/activation_cuda.cu validates the ops' arguments and calls these launchers on the current
// stream. Nothing here knows about tensors, the dispatcher or torch headers.
#pragma once

#include <cuda_runtime.h>

#include "kernels/cpu/activation.h"

namespace zero_ext::kernels::cuda {

cudaError_t launch_activation_forward(const cpu::ActivationRows& args, cudaStream_t stream);

cudaError_t launch_activation_backward(const cpu::ActivationRows& args, cudaStream_t stream);

}  // namespace zero_ext::kernels::cuda
