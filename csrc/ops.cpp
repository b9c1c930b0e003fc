// Every zero_ext op schema, in one block, and the Python module that loads them.
//
// Kernels register per backend elsewhere: CPU in csrc/*_cpu.cpp, CUDA in csrc/*_cuda.cu (built
// only in the CUDA build, so a CPU build simply has no CUDA kernel). Python reaches the ops as
// torch.ops.zero_ext.*, through the typed wrappers in zero_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <exception>
#include <vector>

#include <c10/util/Exception.h>

#include "csrc/cpu_isa.h"
#include "csrc/probes.h"

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
  // Blockwise symmetric quantization for compressed collectives (layout and rounding in
  // kernels/quant_math.h). x (1-D contiguous fp32 / bf16 / fp16, read in its own dtype) is cut
  // into `chunks` chunks of m = numel / chunks elements; each chunk is quantized on its own, in
  // blocks of block_size elements (a multiple of 8; the last block padded with zeros), to int8
  // (bits=8) or packed int4 (bits=4) with one fp32 scale absmax / qmax per block (NaN for a block
  // holding inf or NaN). Returns uint8 [chunks, row_bytes], each row [data][scales]. Rows in skip
  // are neither computed nor written. Error feedback when residual (float8_e4m3fn [numel]) and
  // residual_scale (fp32 [chunks]) are given: each computed chunk quantizes
  // x + float(residual) * residual_scale[c] * residual_factor, then stores its quantization error
  // e as residual = fp8(clamp(e / s, -448, 448)), residual_scale[c] = s = max block scale / 2 /
  // 448 (0, and a zero residual, for a chunk with a non-finite block).
  m.def(
      "quantize_chunks(Tensor x, int chunks, int bits, int block_size, *, int[] skip=[], "
      "Tensor(a!)? residual=None, Tensor(b!)? residual_scale=None, float residual_factor=1.0) "
      "-> Tensor");
  // out (1-D contiguous fp32 / bf16 / fp16, g * m elements) = round((accumulate ? out : 0)
  // + v_0 + ... + v_{k-1}) in fp32, in order, where v_i is the dequantization (q * scale) of
  // packed[i] (uint8 [k, g, row_bytes], k senders of g chunks of m elements), except that
  // v_{exact_index} = exact (g * m elements, any of the three float dtypes) when exact is given.
  m.def(
      "dequantize_sum_(Tensor(a!) out, Tensor packed, int bits, int block_size, *, "
      "Tensor? exact=None, int exact_index=-1, bool accumulate=False) -> ()");
  // out (1-D contiguous fp32 / bf16 / fp16, g * m elements) = the dequantized chunks of packed
  // (uint8 [g, row_bytes]) in order, each q * scale rounded to out's dtype.
  m.def("dequantize_(Tensor(a!) out, Tensor packed, int bits, int block_size) -> ()");
  // Top-k sparsification with error feedback (Deep Gradient Compression), one call per send.
  // residual v (fp32, 1-D contiguous) accumulates grad g (fp32 / bf16 / fp16, v's numel):
  // v = v + g, or with momentum u (fp32, v's numel): u = u * momentum_factor + g * (1 -
  // momentum_factor), v = v + u, in fp32, each operation rounded on its own. Per chunk (v viewed
  // [chunks, m]) the k entries of largest |v| (NaN above inf above every finite value:
  // kernels/topk_math.h; of equal magnitudes at the k-th, those of lowest index) are sent:
  // returns uint8 [chunks, k * (4 + value bytes)], each row k int32 indices within the chunk,
  // ascending, then their values rounded to dtype (grad's dtype when None); each sent entry
  // leaves the state: v[i] = v[i] - float(value[i]) (the rounding error stays) and u[i] = 0.
  m.def(
      "topk_feedback_select(Tensor(a!) residual, Tensor grad, int chunks, int k, *, "
      "Tensor(b!)? momentum=None, float momentum_factor=0.0, ScalarType? dtype=None) -> Tensor");
  // Fused linear cross-entropy, per token, without the [N, V] logits (zero_ext/fused/
  // cross_entropy.py reduces and differentiates it). hidden [N, H] and weight [V, H] (and bias
  // [V]) fp32 / bf16 / fp64, target int64 [N]. Returns loss and lse, [N] in the accumulation dtype
  // (fp64 for fp64 inputs, else fp32): lse_i = logsumexp_j(logit_ij), loss_i = lse_i
  // - (1 - label_smoothing) * logit_i,target_i - label_smoothing / V * sum_j logit_ij
  // + z_loss * lse_i^2, both 0 where target_i == ignore_index.
  m.def(
      "fused_linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
      "*, int ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0) "
      "-> (Tensor, Tensor)");
  // Its backward from grad_loss (d L / d loss_i, the accumulation dtype [N]) and the forward's
  // lse, recomputing the logits: (grad_hidden, grad_weight, grad_bias), the last [V] with a bias
  // and [0] without. Ignored tokens contribute nothing, whatever their grad_loss.
  m.def(
      "fused_linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, "
      "Tensor target, Tensor? bias, Tensor lse, *, int ignore_index=-100, "
      "float label_smoothing=0.0, float z_loss=0.0) -> (Tensor, Tensor, Tensor)");
  // Loss and gradients in one pass, for a mean or sum reduction (the per-token gradient scale is
  // then one number, so the gradients can be computed before the backward asks for them): the
  // loss, 0-dim in the accumulation dtype, the sum of _fwd's per-token losses (divided by the
  // tokens not ignored with mean; NaN when there are none), and its gradients (grad_hidden,
  // grad_weight, grad_bias) in the inputs' dtype, each [0] when not requested (grad_bias without
  // a bias). workspace_bytes bounds the logits held at once: a chunk of tokens whose whole rows
  // fit it costs one logits matmul, else two sweeps over the vocabulary (csrc/fused_ce.h).
  m.def(
      "fused_linear_cross_entropy_fwd_grad(Tensor hidden, Tensor weight, Tensor target, "
      "Tensor? bias, *, int ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0, "
      "bool mean=True, bool hidden_grad=True, bool weight_grad=True, "
      "int workspace_bytes=8388608) -> (Tensor, Tensor, Tensor, Tensor)");
  // RMSNorm (rms) or LayerNorm over the last dimension h of x ([..., h] contiguous fp32 / bf16 /
  // fp16 / fp64), optionally fused with the residual add. With residual (x's shape and dtype):
  // summed = x + residual rounded to x's dtype, and summed is normalized; otherwise summed is
  // empty ([0]) and x is normalized. Statistics in fp32 (fp64 for fp64 x): mean [rows] (LayerNorm;
  // [0] for RMSNorm), rstd [rows]. out = (v - mean) * rstd * weight (+ bias, LayerNorm only);
  // weight and bias are [h] in x's dtype. Formulas: kernels/cpu/norm.h.
  m.def(
      "fused_norm(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool rms) "
      "-> (Tensor out, Tensor summed, Tensor mean, Tensor rstd)");
  // The gradients of fused_norm from its saved input (summed, or x without residual), weight
  // and statistics: grad_input (the gradient of x and of residual alike: grad_summed, the
  // gradient of the summed output, is added to it), grad_weight and, with has_bias, grad_bias
  // ([0] otherwise), both summed over rows in fp32 and rounded to weight's dtype.
  m.def(
      "fused_norm_backward(Tensor grad_out, Tensor? grad_summed, Tensor input, Tensor weight, "
      "Tensor mean, Tensor rstd, bool rms, bool has_bias) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // out = silu(gate) * up, elementwise (gate and up contiguous, one shape and dtype: fp32 / bf16 /
  // fp16 / fp64), in fp32 (fp64 for fp64) and rounded once. The backward recomputes silu(gate)
  // from gate: grad_gate = grad_out * up * sig * (1 + gate * (1 - sig)), grad_up = grad_out *
  // silu(gate).
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // out = F.gelu(v, approximate) with v = x + bias rounded to x's dtype (bias [h] over the last
  // dimension, or none); approximate "none" (erf) or "tanh". The backward recomputes v from x
  // and bias and returns the gradient of x (the bias gradient is its sum over rows).
  m.def("bias_gelu(Tensor x, Tensor? bias, str approximate='none') -> Tensor");
  m.def(
      "bias_gelu_backward(Tensor grad_out, Tensor x, Tensor? bias, str approximate='none') "
      "-> Tensor");
  // Scaled masked softmax + dropout over the last dimension of x ([..., q, k] contiguous fp32 /
  // bf16 / fp16 / fp64): softmax(scale * x + mask) with mask bool (True = attend) or additive in
  // x's dtype, broadcastable to x; causal masks keys after the query (SDPA's is_causal); a fully
  // masked row gives zeros. Then dropout with probability dropout_p, its keep-mask drawn from
  // Philox keyed by seed (a CPU int64 tensor of one element) and the element index. Returns out
  // and probs, the softmax before dropout that the backward takes ([0] without dropout: out is
  // the softmax then). Formulas: kernels/softmax_math.h.
  m.def(
      "scaled_masked_softmax(Tensor x, Tensor? mask, float scale, bool causal, float dropout_p, "
      "Tensor seed) -> (Tensor out, Tensor probs)");
  // The gradient of x from the forward's softmax, the keep-mask regenerated from seed.
  m.def(
      "scaled_masked_softmax_backward(Tensor grad_out, Tensor probs, float scale, "
      "float dropout_p, Tensor seed) -> Tensor");
  // The keep-mask (bool, x's shape) that scaled_masked_softmax draws for this seed and p.
  m.def("dropout_keep_mask(Tensor x, float dropout_p, Tensor seed) -> Tensor");
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

#ifdef ZERO_EXT_WITH_CUDA
// Runs fn without the GIL (the watch calls these from its heartbeat thread: a CUDA call that
// blocks must not stop every Python thread); a C++ exception becomes a RuntimeError.
template <typename Fn>
bool without_gil(Fn fn) {
  std::exception_ptr error;
  Py_BEGIN_ALLOW_THREADS
  try {
    fn();
  } catch (...) {
    error = std::current_exception();
  }
  Py_END_ALLOW_THREADS
  if (!error) return true;
  try {
    std::rethrow_exception(error);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "zero_ext: unknown C++ exception");
  }
  return false;
}
#else
// What the CUDA-only entry points do in a CPU-only build.
PyObject* no_cuda_kernels() {
  PyErr_SetString(PyExc_RuntimeError, "zero_ext: this build has no CUDA kernels");
  return nullptr;
}
#endif

// cuda_probe_record(device) -> handle; cuda_probes_completed(device, handles) -> count: see
// csrc/probes.h. A CPU-only build raises.
PyObject* cuda_probe_record(PyObject*, PyObject* args) {
  int device = 0;
  if (!PyArg_ParseTuple(args, "i", &device)) return nullptr;
#ifdef ZERO_EXT_WITH_CUDA
  std::uintptr_t handle = 0;
  if (!without_gil([&] { handle = zero_ext::record_probe(device); })) return nullptr;
  return PyLong_FromVoidPtr(reinterpret_cast<void*>(handle));
#else
  return no_cuda_kernels();
#endif
}

PyObject* cuda_probes_completed(PyObject*, PyObject* args) {
  int device = 0;
  PyObject* sequence = nullptr;
  if (!PyArg_ParseTuple(args, "iO", &device, &sequence)) return nullptr;
#ifdef ZERO_EXT_WITH_CUDA
  const Py_ssize_t n = PySequence_Size(sequence);
  if (n < 0) return nullptr;
  std::vector<std::uintptr_t> handles;
  handles.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_GetItem(sequence, i);
    if (item == nullptr) return nullptr;
    void* handle = PyLong_AsVoidPtr(item);
    Py_DECREF(item);
    if (handle == nullptr && PyErr_Occurred()) return nullptr;
    handles.push_back(reinterpret_cast<std::uintptr_t>(handle));
  }
  int64_t done = 0;
  if (!without_gil([&] { done = zero_ext::probes_completed(device, handles); })) return nullptr;
  return PyLong_FromLongLong(done);
#else
  return no_cuda_kernels();
#endif
}

PyMethodDef module_methods[] = {
    {"cpu_isa_selected", cpu_isa_selected, METH_NOARGS,
     "Instruction set of the CPU kernels this process runs (DEFAULT, AVX2 or AVX512)."},
    {"cpu_isas_built", cpu_isas_built, METH_NOARGS,
     "Instruction sets the CPU kernels were compiled for, comma-separated."},
    {"cuda_archs_built", cuda_archs_built, METH_NOARGS,
     "CUDA architectures the GPU kernels were compiled for, or None in a CPU-only build."},
    {"cuda_probe_record", cuda_probe_record, METH_VARARGS,
     "cuda_probe_record(device) -> handle: a stall-watch probe (a pooled CUDA event) recorded on "
     "the device's current stream of the calling thread, without the GIL."},
    {"cuda_probes_completed", cuda_probes_completed, METH_VARARGS,
     "cuda_probes_completed(device, handles) -> how many of the probes, oldest first, completed "
     "(up to the first that has not); those go back to the pool. Without the GIL."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "zero_ext compiled ops", -1,
                          module_methods};

}  // namespace

// A plain C-API module: importing it runs the static registrations above. No pybind11.
extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module_def); }
