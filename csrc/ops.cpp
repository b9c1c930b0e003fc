// Every zero_ext op schema, in one block, and the Python module that loads them.
//
// Kernels register per backend elsewhere: CPU in csrc/*_cpu.cpp, CUDA in csrc/*_cuda.cu (built
// only in the CUDA build, so a CPU build simply has no CUDA kernel). Python reaches the ops as
// torch.ops.zero_ext.*, through the typed wrappers in zero_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "csrc/cpu_isa.h"

TORCH_LIBRARY(zero_ext, m) {
  // Multi-tensor AdamW / Adam step, in place. Each i indexes one parameter: fp32 master weights
  // params[i], its gradient grads[i] (fp32, bf16 or fp16; one dtype per call), fp32 moments
  // exp_avgs[i] and exp_avg_sqs[i], and its step count state_steps[i] (a one-element fp32 CPU
  // tensor, incremented here). params_16bit is empty, or holds a bf16/fp16 tensor per parameter
  // that receives the updated weights in the same pass. inv_scale multiplies every gradient;
  // a nonzero found_inf turns the whole call into a no-op (steps are not incremented).
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, Tensor(e!)[] params_16bit, *, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay=True, bool bias_correction=True, bool maximize=False, "
      "Tensor? inv_scale=None, Tensor? found_inf=None) -> ()");
  // Gradient bucket fill, in place, in one pass over every tensor: for each i,
  // flat[offsets[i] : offsets[i] + tensors[i].numel()] = tensors[i] * scale, or, with accumulate,
  // that slice + tensors[i] * scale; computed in fp32 and rounded to nearest even to flat's dtype.
  // flat: 1-D contiguous fp32 / bf16 / fp16; tensors: contiguous, any shape, each fp32 / bf16 /
  // fp16 (dtypes may differ). The ranges lie inside flat and are disjoint; elements of flat that
  // no range covers are left untouched.
  m.def(
      "flatten_into_(Tensor(a!) flat, Tensor[] tensors, int[] offsets, *, float scale=1.0, "
      "bool accumulate=False) -> ()");
  // The reverse copy, after a gathered flat buffer arrives: for each i, tensors[i] (written in
  // place) = flat[offsets[i] : offsets[i] + tensors[i].numel()] viewed in tensors[i]'s shape, cast
  // to tensors[i]'s dtype (round to nearest even). Same dtypes, layout and range rules as
  // flatten_into_.
  m.def("unflatten_from(Tensor flat, Tensor(a!)[] tensors, int[] offsets) -> ()");
}

namespace {

// Comma-separated instruction sets compiled into this library, from setup.py.
PyObject* cpu_isas_built(PyObject*, PyObject*) { return PyUnicode_FromString(ZERO_EXT_CPU_ISAS); }

PyObject* cuda_archs_built(PyObject*, PyObject*) {
#ifdef ZERO_EXT_WITH_CUDA
  return PyUnicode_FromString(ZERO_EXT_CUDA_ARCHS);
#else
  Py_RETURN_NONE;
#endif
}

PyObject* cpu_isa_selected(PyObject*, PyObject*) {
  return PyUnicode_FromString(zero_ext::cpu_isa_name(zero_ext::selected_cpu_isa()));
}

PyMethodDef module_methods[] = {
    {"cpu_isa_selected", cpu_isa_selected, METH_NOARGS,
     "Instruction set of the CPU kernels this process runs (DEFAULT, AVX2 or AVX512)."},
    {"cpu_isas_built", cpu_isas_built, METH_NOARGS,
     "Instruction sets the CPU kernels were compiled for, comma-separated."},
    {"cuda_archs_built", cuda_archs_built, METH_NOARGS,
     "CUDA architectures the GPU kernels were compiled for, or None in a CPU-only build."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "zero_ext compiled ops", -1,
                          module_methods};

}  // namespace

// A plain C-API module: importing it runs the static registrations above. No pybind11.
extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module_def); }
