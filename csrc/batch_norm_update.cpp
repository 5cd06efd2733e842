// The running-statistics update, for every device: a few elementwise tensor ops on C values,
// computed in float64 and written back in the buffers' own dtype.
//   running_mean = (1 - momentum) * running_mean + momentum * batch_mean
//   running_var  = (1 - momentum) * running_var  + momentum * batch_var * count / (count - 1)
// (count values per channel; the running variance is the unbiased one). With num_batches_tracked
// given, momentum = 1 / num_batches_tracked (a cumulative average), as a device tensor. An empty batch
// (count == 0) leaves both unchanged, as torch does.
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <torch/library.h>

namespace normext {
namespace {

void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var,
                              const at::Tensor& batch_mean, const at::Tensor& batch_var,
                              double momentum, int64_t count,
                              const c10::optional<at::Tensor>& num_batches_tracked) {
  const char* op = "normext::batch_norm_update_stats_";
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_var.numel() == C && batch_mean.numel() == C && batch_var.numel() == C, op,
              ": running_mean, running_var, batch_mean and batch_var must all have ", C,
              " elements, but got ", running_var.numel(), ", ", batch_mean.numel(), " and ",
              batch_var.numel());
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&running_var), &batch_mean, &batch_var})
    TORCH_CHECK(t->device() == running_mean.device(), op, ": all tensors must be on ",
                running_mean.device(), ", but one is on ", t->device());
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&running_mean),
                              static_cast<const at::Tensor*>(&running_var), &batch_mean, &batch_var})
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op,
                ": running and batch statistics must be floating point, but one has dtype ",
                t->scalar_type());
  TORCH_CHECK(count >= 0, op, ": count must be non-negative, but got ", count);
  if (count == 0 || C == 0) return;
  const double unbias = count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
  at::Tensor bm = batch_mean.reshape(running_mean.sizes()).to(at::kDouble);
  at::Tensor bv = batch_var.reshape(running_var.sizes()).to(at::kDouble);
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    const at::Tensor& nbt = *num_batches_tracked;
    TORCH_CHECK(nbt.numel() == 1 && nbt.device() == running_mean.device(), op,
                ": num_batches_tracked must be a one-element tensor on ", running_mean.device());
    at::Tensor f = nbt.reshape({}).to(at::kDouble).reciprocal();
    at::Tensor keep = f.neg().add_(1);  // 1 - f
    running_mean.copy_(running_mean.to(at::kDouble).mul(keep).add_(bm.mul(f)));
    running_var.copy_(running_var.to(at::kDouble).mul(keep).add_(bv.mul(f.mul(unbias))));
    return;
  }
  running_mean.copy_(running_mean.to(at::kDouble).mul_(1 - momentum).add_(bm, momentum));
  running_var.copy_(running_var.to(at::kDouble).mul_(1 - momentum).add_(bv, momentum * unbias));
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, CPU, m) {
  m.impl("batch_norm_update_stats_", &batch_norm_update_stats_);
}

#ifdef NORMEXT_WITH_CUDA
TORCH_LIBRARY_IMPL(normext, CUDA, m) {
  m.impl("batch_norm_update_stats_", &batch_norm_update_stats_);
}
#endif

}  // namespace normext
