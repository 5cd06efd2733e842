// The CPU kernels' entry points (batch_norm.cpp, layer_norm.cpp), registered by dispatch.cpp.
//
// The kernels are written once, against at::vec::Vectorized, and compiled for the ISA setup.py
// picks (AVX2 on x86 machines that have it). Where the build machine also has AVX-512, they are
// compiled a second time for it (csrc/cpu/avx512/*.cpp, NORMEXT_CPU_AVX512), each copy in its
// own namespace named after the ISA (at::vec's CPU_CAPABILITY), and dispatch.cpp picks one per
// call: 16 values per vector halve the instructions per value where the loops are compute-bound
// (half and bfloat16, with their conversions), but cost more in short planes, which leave more
// of a 32-value step to the scalar tail.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

#define NORMEXT_CPU_KERNEL_DECLS                                                                 \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(                     \
      const at::Tensor& input, const c10::optional<at::Tensor>& weight,                          \
      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,      \
      const c10::optional<at::Tensor>& running_var, bool training, double eps);                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(                                 \
      const at::Tensor& grad_out, const at::Tensor& input,                                       \
      const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,                      \
      const at::Tensor& save_invstd, bool training, std::array<bool, 3> mask);                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(                                 \
      const at::Tensor& input, int64_t normalized_ndim, const c10::optional<at::Tensor>& weight, \
      const c10::optional<at::Tensor>& bias, double eps);                                        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(                                 \
      const at::Tensor& grad_out, const at::Tensor& input, int64_t normalized_ndim,              \
      const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,   \
      std::array<bool, 3> mask);

namespace normext::cpu {
inline namespace CPU_CAPABILITY {
NORMEXT_CPU_KERNEL_DECLS
}  // namespace CPU_CAPABILITY
}  // namespace normext::cpu
