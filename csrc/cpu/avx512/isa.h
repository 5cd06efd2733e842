// Included first by the AVX-512 copies of the kernel files, which setup.py and CMakeLists.txt
// compile with -mavx512f -mavx512bw -mavx512vl -mavx512dq added: at::vec::Vectorized is then its
// 512-bit version (namespace at::vec::AVX512), and the kernels land in normext::cpu::AVX512.
//
// Why flags and not `#pragma GCC target`: under the pragma, g++ 13 fails to build these files
// (libstdc++ 13 marks std::allocator's members always_inline, and the implicitly defined
// destructors that call them keep the command line's target: "inlining failed in call to
// 'always_inline' ... target specific option mismatch"), and standard templates defined before
// a pragma see the 64-byte vectors as 32-byte aligned (a std::vector of them was allocated
// misaligned and crashed). With the flags, the whole file has one target.
//
// These objects are linked after the others, so where a header's inline function is emitted
// both here and in an AVX2 file, the linker keeps the AVX2 copy (it keeps the first).
#pragma once

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__)
#error "csrc/cpu/avx512/*.cpp need -mavx512f -mavx512bw -mavx512vl -mavx512dq (see setup.py)"
#endif

// The build defines the AVX2 capability for every file; these are the AVX-512 copies.
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
