// Automatic mixed precision, as torch's own ops have it. Under torch.autocast("cuda"),
// torch.nn.functional.layer_norm is on the float32 list: float16 and bfloat16 CUDA inputs,
// weights and biases are cast to float32, and the output is float32. normext's LayerNorm does the
// same, through this kernel for the AutocastCUDA dispatch key, which runs before autograd: the
// casts are recorded, and the gradient flows back to the half-precision tensors.
//
// BatchNorm is on no list (torch runs it in the input's dtype, with float32 parameters allowed),
// and torch.autocast("cpu") casts neither op: those need nothing here. The backward ops run
// outside autocast, as torch's do.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace normext {
namespace {

using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_autocast_cuda(
    const at::Tensor& x, int64_t normalized_ndim, const OptT& weight, const OptT& bias,
    double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normext::layer_norm_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                const OptT&, const OptT&, double)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  constexpr auto cuda = c10::DeviceType::CUDA;
  return op.call(at::autocast::cached_cast(at::kFloat, x, cuda), normalized_ndim,
                 at::autocast::cached_cast(at::kFloat, weight, cuda),
                 at::autocast::cached_cast(at::kFloat, bias, cuda), eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, AutocastCUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_autocast_cuda);
}

}  // namespace normext
