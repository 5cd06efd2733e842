// The eager fast path of normext.functional (and so of the modules): for a plain call, the
// argument checks and the op calls in C++, from Python's objects straight to the dispatcher.
//
// Why: on small inputs the Python layer cost more than the kernels. Measured, LayerNorm (2, 8)
// float32 with a weight that requires grad: normext.functional.layer_norm 16.3 us, of which the
// op call through torch.ops (argument parsing against the schema) 9.4 us and the Python checks
// about 7; torch.nn.functional.layer_norm 6.9 us. A BatchNorm training step adds a second op
// (the running statistics) and more checks.
//
// A call takes this path only when it is plain (see normext/functional.py): exact torch.Tensor
// (or Parameter) arguments, no __torch_function__ mode, not under torch.jit.trace (and, checked
// in Python, not under a torch.func transform or while torch.compile traces). Anything else,
// and any argument a check would reject, returns None: functional.py then runs its Python path,
// which has every check and error message. So this path never raises for bad arguments; it
// calls the same ops through the dispatcher (autograd, autocast, dispatch modes and every
// backend apply as before), so results are the same either way.
#ifdef NORMEXT_EXTENSION
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "eager.h"

namespace normext {
namespace {

using OptT = std::optional<at::Tensor>;
using LnFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                const OptT&, const OptT&, double);
using BnFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, bool, double);
using BnUpdateSig = void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                         c10::SymInt, const OptT&);

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& op(const char* name) {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
  return handle;
}

// Nothing that could redirect the call: no torch function mode, no tracer. (No torch.func
// transform either: functional.py checks that, as functorch's C++ header is not shipped whole.)
bool plain_context() {
  return !at::impl::torch_function_mode_enabled() && !torch::jit::tracer::isTracing();
}

// A Tensor or Parameter (not another subclass) into t; None into an empty t. False otherwise.
bool tensor_arg(PyObject* o, OptT& t, bool allow_none) {
  if (o == Py_None) {
    t.reset();
    return allow_none;
  }
  if (!THPVariable_CheckExact(o)) return false;
  t = THPVariable_Unpack(o);
  return true;
}

bool number_arg(PyObject* o, double& v) {
  if (PyFloat_CheckExact(o)) {
    v = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (PyLong_CheckExact(o)) {
    v = PyLong_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

// functional._check_param's rule: the input's device and param_dtype_ok (common.h). (Sizes are
// checked by the callers.)
bool param_ok(const OptT& p, const at::Tensor& x) {
  return !p.has_value() ||
         (p->device() == x.device() && param_dtype_ok(p->scalar_type(), x.scalar_type()));
}

// The given parameters share one dtype (functional._check_params_agree).
bool params_agree(std::initializer_list<const OptT*> ps) {
  std::optional<at::ScalarType> first;
  for (const OptT* p : ps) {
    if (!p->has_value()) continue;
    if (!first.has_value())
      first = (*p)->scalar_type();
    else if ((*p)->scalar_type() != *first)
      return false;
  }
  return true;
}

// layer_norm_eager(input, normalized_shape, weight, bias, eps) -> Tensor or None
PyObject* layer_norm_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !plain_context()) Py_RETURN_NONE;
  OptT x, weight, bias;
  double eps = 0;
  if (!tensor_arg(args[0], x, false) || !tensor_arg(args[2], weight, true) ||
      !tensor_arg(args[3], bias, true) || !number_arg(args[4], eps))
    Py_RETURN_NONE;
  if (!is_floating_dtype(x->scalar_type())) Py_RETURN_NONE;
  // normalized_shape: an int, or a tuple (torch.Size too) or list of ints
  constexpr int kMaxDims = 16;
  int64_t shape[kMaxDims];
  int64_t k = 0;
  PyObject* ns = args[1];
  if (PyLong_CheckExact(ns)) {
    shape[k++] = PyLong_AsLongLong(ns);
  } else if (PyTuple_Check(ns) || PyList_CheckExact(ns)) {
    const Py_ssize_t len = PySequence_Fast_GET_SIZE(ns);
    if (len > kMaxDims) Py_RETURN_NONE;
    PyObject** items = PySequence_Fast_ITEMS(ns);
    for (Py_ssize_t i = 0; i < len; ++i) {
      if (!PyLong_CheckExact(items[i])) Py_RETURN_NONE;
      shape[k++] = PyLong_AsLongLong(items[i]);
    }
  } else {
    Py_RETURN_NONE;
  }
  if (PyErr_Occurred()) {  // an int too large for int64
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  if (k == 0 || x->dim() < k) Py_RETURN_NONE;
  const c10::IntArrayRef normalized(shape, k);
  if (x->sizes().slice(x->dim() - k) != normalized) Py_RETURN_NONE;
  for (const OptT* p : {&weight, &bias})
    if (p->has_value() && (!param_ok(*p, *x) || (*p)->sizes() != normalized)) Py_RETURN_NONE;
  if (!params_agree({&weight, &bias})) Py_RETURN_NONE;
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = std::get<0>(op<LnFwdSig>("normext::layer_norm_fwd").call(*x, k, weight, bias, eps));
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// batch_norm_eager(input, running_mean, running_var, weight, bias, training, momentum, eps,
//                  num_batches_tracked) -> Tensor or None
PyObject* batch_norm_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9 || !plain_context()) Py_RETURN_NONE;
  OptT x, rm, rv, weight, bias, nbt;
  double momentum = 0, eps = 0;
  if (!tensor_arg(args[0], x, false) || !tensor_arg(args[1], rm, true) ||
      !tensor_arg(args[2], rv, true) || !tensor_arg(args[3], weight, true) ||
      !tensor_arg(args[4], bias, true) || !PyBool_Check(args[5]) ||
      !number_arg(args[6], momentum) || !number_arg(args[7], eps) ||
      !tensor_arg(args[8], nbt, true))
    Py_RETURN_NONE;
  const bool training = args[5] == Py_True;
  if (!is_floating_dtype(x->scalar_type()) || x->dim() < 2) Py_RETURN_NONE;
  if (rm.has_value() != rv.has_value() || !(eps >= 0) || (!training && !rm.has_value()))
    Py_RETURN_NONE;
  const int64_t C = x->size(1), numel = x->numel();
  for (const OptT* p : {&weight, &bias, &rm, &rv})
    if (p->has_value() && (!param_ok(*p, *x) || (*p)->numel() != C)) Py_RETURN_NONE;
  if (!params_agree({&weight, &bias, &rm, &rv})) Py_RETURN_NONE;
  const int64_t count = C ? numel / C : 0;
  // torch's batch-size check counts N times the spatial sizes (not numel / C, which an empty
  // channel dim makes 0); the Python path raises torch's error
  int64_t per_channel = x->size(0);
  for (int64_t d = 2; d < x->dim(); ++d) per_channel *= x->size(d);
  if (training && per_channel == 1) Py_RETURN_NONE;
  const bool update = training && rm.has_value();
  // running statistics that require grad: the Python path raises or runs it under no_grad
  if ((rm.has_value() && rm->requires_grad()) || (rv.has_value() && rv->requires_grad()))
    Py_RETURN_NONE;
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    auto out = op<BnFwdSig>("normext::batch_norm_fwd")
                   .call(*x, weight, bias, training ? OptT() : rm, training ? OptT() : rv,
                         training, eps);
    y = std::move(std::get<0>(out));
    if (update) {
      // not differentiated (functional.py runs it under no_grad where a tensor requires grad)
      c10::AutoGradMode no_grad(false);
      op<BnUpdateSig>("normext::batch_norm_update_stats_")
          .call(*rm, *rv, std::get<1>(out), std::get<3>(out), momentum, c10::SymInt(count), nbt);
    }
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef eager_methods[] = {
    {"layer_norm_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(layer_norm_eager)),
     METH_FASTCALL, "functional.layer_norm for a plain call, or None (see csrc/eager.cpp)."},
    {"batch_norm_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(batch_norm_eager)),
     METH_FASTCALL, "functional._batch_norm for a plain call, or None (see csrc/eager.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

int add_eager_methods(PyObject* module) { return PyModule_AddFunctions(module, eager_methods); }

}  // namespace normext
#endif  // NORMEXT_EXTENSION
