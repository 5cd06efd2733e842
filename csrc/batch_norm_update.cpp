// The running-statistics update, computed in float64 and written back in the buffers' own dtype:
//   running_mean = (1 - momentum) * running_mean + momentum * batch_mean
//   running_var  = (1 - momentum) * running_var  + momentum * batch_var * count / (count - 1)
// (count values per channel; the running variance is the unbiased one). With num_batches_tracked
// given, momentum = 1 / num_batches_tracked (a cumulative average), read where the count lives
// (no device sync). An empty batch (count == 0) leaves both unchanged, as torch does.
// Here: the checks, the CPU kernel (a loop over the channels) and the generic path of a few
// tensor ops on C values (any device, dtypes and strides); cuda/batch_norm.cu has a CUDA kernel.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

#include "common.h"

namespace normext {
namespace {

// The CPU path: one loop over the channels, in double. (The generic path below is a few small
// tensor ops, each paying the dispatcher: about 15 us a call, more than the kernels of a small
// BatchNorm.) running = keep * running + f * batch, per statistic.
template <typename R, typename B>
void update_cpu(R* rm, R* rv, const B* bm, const B* bv, int64_t C, double keep, double f_mean,
                double f_var) {
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = static_cast<R>(static_cast<double>(rm[c]) * keep + static_cast<double>(bm[c]) * f_mean);
    rv[c] = static_cast<R>(static_cast<double>(rv[c]) * keep + static_cast<double>(bv[c]) * f_var);
  }
}

bool try_update_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& batch_mean,
                    const at::Tensor& batch_var, double keep, double f_mean, double f_var) {
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&running_mean),
                              static_cast<const at::Tensor*>(&running_var), &batch_mean, &batch_var})
    if (!t->device().is_cpu() || !t->is_contiguous()) return false;
  if (running_var.scalar_type() != running_mean.scalar_type() ||
      batch_var.scalar_type() != batch_mean.scalar_type())
    return false;
  const auto bt = batch_mean.scalar_type();
  if (bt != at::kFloat && bt != at::kDouble) return false;
  const int64_t C = running_mean.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "update", [&] {
    using R = scalar_t;
    if (bt == at::kFloat)
      update_cpu(running_mean.mutable_data_ptr<R>(), running_var.mutable_data_ptr<R>(),
                 batch_mean.const_data_ptr<float>(), batch_var.const_data_ptr<float>(), C, keep,
                 f_mean, f_var);
    else
      update_cpu(running_mean.mutable_data_ptr<R>(), running_var.mutable_data_ptr<R>(),
                 batch_mean.const_data_ptr<double>(), batch_var.const_data_ptr<double>(), C, keep,
                 f_mean, f_var);
  });
  return true;
}

}  // namespace

void check_update_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& batch_mean, const at::Tensor& batch_var,
                             int64_t count, const c10::optional<at::Tensor>& num_batches_tracked) {
  const char* op = "normext::batch_norm_update_stats_";
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_var.numel() == C && batch_mean.numel() == C && batch_var.numel() == C, op,
              ": running_mean, running_var, batch_mean and batch_var must all have ", str_of(C),
              " elements, but got ", str_of(running_var.numel()), ", ", str_of(batch_mean.numel()),
              " and ", str_of(batch_var.numel()));
  for (const at::Tensor* t : {&running_var, &batch_mean, &batch_var})
    TORCH_CHECK(t->device() == running_mean.device(), op, ": all tensors must be on ",
                str_of(running_mean.device()), ", but one is on ", str_of(t->device()));
  for (const at::Tensor* t : {&running_mean, &running_var, &batch_mean, &batch_var})
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op,
                ": running and batch statistics must be floating point, but one has dtype ",
                str_of(t->scalar_type()));
  TORCH_CHECK(count >= 0, op, ": count must be non-negative, but got ", str_of(count));
  if (num_batches_tracked.has_value() && num_batches_tracked->defined())
    TORCH_CHECK(num_batches_tracked->numel() == 1 &&
                    num_batches_tracked->device() == running_mean.device(),
                op, ": num_batches_tracked must be a one-element tensor on ",
                str_of(running_mean.device()));
}

void update_stats_generic(at::Tensor& running_mean, at::Tensor& running_var,
                          const at::Tensor& batch_mean, const at::Tensor& batch_var,
                          double momentum, int64_t count,
                          const c10::optional<at::Tensor>& num_batches_tracked) {
  if (count == 0 || running_mean.numel() == 0) return;
  const double unbias = unbias_factor(count);
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    const at::Tensor& nbt = *num_batches_tracked;
    if (nbt.device().is_cpu()) {  // the count is on the host: read it, no device sync
      const double f = 1.0 / nbt.reshape({}).item<double>();
      if (try_update_cpu(running_mean, running_var, batch_mean, batch_var, 1.0 - f, f, f * unbias))
        return;
    }
    at::Tensor bm = batch_mean.reshape(running_mean.sizes()).to(at::kDouble);
    at::Tensor bv = batch_var.reshape(running_var.sizes()).to(at::kDouble);
    at::Tensor f = nbt.reshape({}).to(at::kDouble).reciprocal();
    at::Tensor keep = f.neg().add_(1);  // 1 - f
    running_mean.copy_(running_mean.to(at::kDouble).mul(keep).add_(bm.mul(f)));
    running_var.copy_(running_var.to(at::kDouble).mul(keep).add_(bv.mul(f.mul(unbias))));
    return;
  }
  if (try_update_cpu(running_mean, running_var, batch_mean, batch_var, 1 - momentum, momentum,
                     momentum * unbias))
    return;
  at::Tensor bm = batch_mean.reshape(running_mean.sizes()).to(at::kDouble);
  at::Tensor bv = batch_var.reshape(running_var.sizes()).to(at::kDouble);
  running_mean.copy_(running_mean.to(at::kDouble).mul_(1 - momentum).add_(bm, momentum));
  running_var.copy_(running_var.to(at::kDouble).mul_(1 - momentum).add_(bv, momentum * unbias));
}

namespace {

void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var,
                              const at::Tensor& batch_mean, const at::Tensor& batch_var,
                              double momentum, int64_t count,
                              const c10::optional<at::Tensor>& num_batches_tracked) {
  check_update_stats_args(running_mean, running_var, batch_mean, batch_var, count,
                          num_batches_tracked);
  update_stats_generic(running_mean, running_var, batch_mean, batch_var, momentum, count,
                       num_batches_tracked);
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, CPU, m) {
  m.impl("batch_norm_update_stats_", &batch_norm_update_stats_);
}

// The CUDA one is in cuda/batch_norm.cu: a kernel, falling back to update_stats_generic.

}  // namespace normext
