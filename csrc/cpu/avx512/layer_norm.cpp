// csrc/cpu/layer_norm.cpp compiled for AVX-512 (see csrc/cpu/kernels.h), into namespace
// normext::cpu::AVX512. Empty unless setup.py found AVX-512 on the build machine.
#if defined(NORMEXT_CPU_AVX512)
#include "cpu/avx512/isa.h"
#include "cpu/layer_norm.cpp"
#endif
