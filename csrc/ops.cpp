// Every normext operator's schema, declared once. The CPU and CUDA files register kernels for
// them with TORCH_LIBRARY_IMPL; normext/ops.py adds the fake (shape) and autograd registrations.
//
// Differentiable ops are functional (torch.library.register_autograd refuses mutating ops), so
// the running-statistics update is its own mutating op with no autograd.
#include <torch/library.h>

#ifdef NORMEXT_EXTENSION
#include <Python.h>

#include "cpu/output_cache.h"
#include "eager.h"
#endif

TORCH_LIBRARY(normext, m) {
  // y = (x - mean) * rstd * weight + bias over the trailing `normalized_ndim` dims.
  // mean/rstd have shape x.shape[:-normalized_ndim]; float32 for half inputs, else x's dtype.
  m.def("layer_norm_fwd(Tensor input, int normalized_ndim, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor output, Tensor mean, Tensor rstd)");
  // Gradients of layer_norm_fwd. grad_weight/grad_bias have shape x.shape[-normalized_ndim:] and
  // the statistics' dtype (empty when not asked for in output_mask = [input, weight, bias]).
  m.def("layer_norm_bwd(Tensor grad_out, Tensor input, int normalized_ndim, Tensor mean, "
        "Tensor rstd, Tensor? weight, bool[3] output_mask)"
        " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Per-channel normalization of x (N, C, *). training: batch statistics, and batch_var is the
  // biased batch variance (C,); eval: running_mean/running_var are used and batch_var is empty.
  // save_mean/save_invstd are (C,), float32 for half inputs, else x's dtype.
  m.def("batch_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, bool training, float eps)"
        " -> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor batch_var)");
  // Gradients of batch_norm_fwd. grad_weight/grad_bias are (C,) in the statistics' dtype (empty
  // when not asked for in output_mask = [input, weight, bias]).
  m.def("batch_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, "
        "Tensor save_invstd, bool training, bool[3] output_mask)"
        " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // running = (1 - momentum) * running + momentum * batch, with the variance made unbiased by
  // count / (count - 1). Nothing changes when count == 0 (an empty batch), as in torch.
  // With num_batches_tracked given, momentum is ignored and the factor is 1 / num_batches_tracked
  // (momentum=None: a cumulative average), read on the device so no host sync is needed.
  m.def("batch_norm_update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor batch_mean, Tensor batch_var, float momentum, SymInt count, "
        "Tensor? num_batches_tracked=None) -> ()");
}

#ifdef NORMEXT_EXTENSION
// Importing normext._C loads this library, which runs the registrations above. The module itself
// reports build facts and manages the CPU output cache (cpu/output_cache.h).
static PyObject* cpu_cache_stats(PyObject*, PyObject*) {
  const normext::cpu::OutputCacheStats s = normext::cpu::output_cache_stats();
  return Py_BuildValue("{s:L,s:L,s:L,s:L}", "cached_bytes", static_cast<long long>(s.cached_bytes),
                       "limit_bytes", static_cast<long long>(s.limit_bytes), "hits",
                       static_cast<long long>(s.hits), "misses", static_cast<long long>(s.misses));
}

static PyObject* cpu_cache_release(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(normext::cpu::output_cache_release()));
}

static PyMethodDef normext_methods[] = {
    {"cpu_cache_stats", cpu_cache_stats, METH_NOARGS,
     "The CPU output cache's cached_bytes, limit_bytes, hits and misses."},
    {"cpu_cache_release", cpu_cache_release, METH_NOARGS,
     "Return the CPU output cache's blocks to the system; returns the bytes released."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef normext_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                            normext_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&normext_module);
  if (mod == nullptr) return nullptr;
  if (normext::add_eager_methods(mod) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
#ifdef NORMEXT_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
#if defined(CPU_CAPABILITY_AVX512)
  PyModule_AddStringConstant(mod, "cpu_isa", "avx512");
#elif defined(CPU_CAPABILITY_AVX2)
  PyModule_AddStringConstant(mod, "cpu_isa", "avx2");
#else
  PyModule_AddStringConstant(mod, "cpu_isa", "default");
#endif
  // whether the kernels were also compiled for AVX-512, picked per call (cpu/kernels.h)
#if defined(NORMEXT_CPU_AVX512)
  PyModule_AddIntConstant(mod, "cpu_avx512_copy", 1);
#else
  PyModule_AddIntConstant(mod, "cpu_avx512_copy", 0);
#endif
  return mod;
}
#endif  // NORMEXT_EXTENSION
