// The eager fast path's Python functions (csrc/eager.cpp), added to normext._C at import.
#pragma once
#ifdef NORMEXT_EXTENSION
#include <Python.h>

namespace normext {
// Adds layer_norm_eager and batch_norm_eager to `module`; 0 on success, -1 with a Python error.
int add_eager_methods(PyObject* module);
}  // namespace normext
#endif
