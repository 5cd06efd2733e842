// Included first (before any other header) by the AVX-512 copies of the kernel files: every
// function after this is compiled for AVX-512, and at::vec::Vectorized is its 512-bit version
// (namespace at::vec::AVX512). Only built where the build machine has these extensions, so the
// inline functions of the headers, compiled here too, can run wherever this library is loaded.
#pragma once

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
// The pragma, unlike -mavx512f, does not define the feature macros that headers test (sleef.h
// declares its 512-bit functions under __AVX512F__): define them as the flags would.
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
