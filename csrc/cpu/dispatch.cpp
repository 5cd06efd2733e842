// Registers the CPU kernels, choosing per call between the ISA copies of kernels.h.
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/kernels.h"

#if defined(NORMEXT_CPU_AVX512)
namespace normext::cpu::AVX512 {
NORMEXT_CPU_KERNEL_DECLS
}  // namespace normext::cpu::AVX512
#endif

namespace normext::cpu {
namespace {

// Whether the AVX-512 copy may run: built, and allowed by torch's own CPU capability (the CPU has
// it, and ATEN_CPU_CAPABILITY does not lower it).
bool avx512_usable() {
#if defined(NORMEXT_CPU_AVX512)
  // (a copy built with AVX512_BF16 instructions, setup.py, needs them too)
#if defined(NORMEXT_CPU_AVX512_BF16)
  static const bool ok =
      at::get_cpu_capability() == "AVX512" && __builtin_cpu_supports("avx512bf16");
#else
  static const bool ok = at::get_cpu_capability() == "AVX512";
#endif
  return ok;
#else
  return false;
#endif
}

// The AVX-512 copy for half and bfloat16 values (float and double gain nothing measurable from it
// here: they are memory-bound), except BatchNorm's short NCHW planes (S < kShortPlane), where the
// scalar tail of a 32-value step costs more than the wider vectors save. Measured, bfloat16
// (32, 512, 7, 7), planes of 49: training forward 0.81x torch with AVX2, 0.55-0.60x with AVX-512
// (masked tail steps did not help); (32, 256, 14, 14), planes of 196: 1.00-1.07x with AVX2,
// 1.21x with AVX-512, eval 0.85x and 1.05x.
constexpr int64_t kShortPlane = 128;

bool reduced(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}

bool bn_avx512(const at::Tensor& x) {
  if (!avx512_usable() || !reduced(x) || x.dim() < 2) return false;
  const int64_t s = bn_spatial_size(x);
  return s == 1 || s >= kShortPlane || is_channels_last_like(x);
}

#if defined(NORMEXT_CPU_AVX512)
#define NORMEXT_PICK(use_avx512, fn, ...) \
  ((use_avx512) ? AVX512::fn(__VA_ARGS__) : fn(__VA_ARGS__))
#else
#define NORMEXT_PICK(use_avx512, fn, ...) fn(__VA_ARGS__)
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_fwd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  return NORMEXT_PICK(bn_avx512(input), batch_norm_fwd, input, weight, bias, running_mean,
                      running_var, training, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    std::array<bool, 3> mask) {
  return NORMEXT_PICK(bn_avx512(input), batch_norm_bwd, grad_out, input, weight, save_mean,
                      save_invstd, training, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_fwd(const at::Tensor& input,
                                                      int64_t normalized_ndim,
                                                      const c10::optional<at::Tensor>& weight,
                                                      const c10::optional<at::Tensor>& bias,
                                                      double eps) {
  return NORMEXT_PICK(avx512_usable() && reduced(input), layer_norm_fwd, input, normalized_ndim,
                      weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, int64_t normalized_ndim,
    const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    std::array<bool, 3> mask) {
  return NORMEXT_PICK(avx512_usable() && reduced(input), layer_norm_bwd, grad_out, input,
                      normalized_ndim, mean, rstd, weight, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, CPU, m) {
  m.impl("batch_norm_fwd", &bn_fwd);
  m.impl("batch_norm_bwd", &bn_bwd);
  m.impl("layer_norm_fwd", &ln_fwd);
  m.impl("layer_norm_bwd", &ln_bwd);
}

}  // namespace normext::cpu
