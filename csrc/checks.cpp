// The argument checks declared in common.h, for every backend.
//
// Every value in an error message is turned into a string here (str_of) before TORCH_CHECK sees
// it. On the H100 machine (torch 2.11, the extension built with its /opt/gcc toolchain) any
// message into which our own code inserted a number, a shape or a dtype through std::ostream
// (what c10::str does with non-strings) crashed the process with SIGSEGV instead of raising,
// from the C++ and the CUDA files alike; messages made of strings and devices raised normally.
// Built from strings, the same checks raise RuntimeError there; tests/test_errors.py and
// tests/test_cuda_*.py's test_errors / test_device_errors go through each of them.
#include "common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>

namespace normext {

std::string str_of(int64_t v) { return std::to_string(v); }

std::string str_of(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string str_of(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

std::string str_of(at::ScalarType t) { return c10::toString(t); }

std::string str_of(const c10::Device& d) { return d.str(); }

bool is_floating_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool param_dtype_ok(at::ScalarType param, at::ScalarType input) {
  const bool half_input = input == at::kHalf || input == at::kBFloat16;
  return param == input || (half_input && param == at::kFloat);
}

void check_floating_input(const at::Tensor& x, const char* op) {
  auto t = x.scalar_type();
  TORCH_CHECK(is_floating_dtype(t), op,
              ": expected input of dtype float32, float64, float16 or bfloat16, but got ", str_of(t));
}

void check_param(const c10::optional<at::Tensor>& p, const at::Tensor& x, int64_t numel,
                 const char* op, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->numel() == numel, op, ": ", name, " should contain ", str_of(numel), " elements, not ",
              str_of(p->numel()));
  TORCH_CHECK(p->device() == x.device(), op, ": ", name, " is on ", str_of(p->device()),
              " but input is on ", str_of(x.device()));
  auto xt = x.scalar_type(), pt = p->scalar_type();
  TORCH_CHECK(param_dtype_ok(pt, xt), op, ": ", name, " has dtype ", str_of(pt),
              " but input has dtype ", str_of(xt), " (a parameter must have the input's dtype, or float32 "
              "for a float16/bfloat16 input)");
}

void check_bn_input(const at::Tensor& x, const char* op) {
  check_floating_input(x, op);
  TORCH_CHECK(x.dim() >= 2, op, ": expected input of shape (N, C, *) with at least 2 dims, but got ",
              str_of(x.dim()), " dims");
}

void check_bn_fwd_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& running_mean,
                       const c10::optional<at::Tensor>& running_var, bool training,
                       double eps, const char* op) {
  check_bn_input(input, op);
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, but got ", str_of(eps));
  const int64_t C = input.size(1);
  check_param(weight, input, C, op, "weight");
  check_param(bias, input, C, op, "bias");
  check_param(running_mean, input, C, op, "running_mean");
  check_param(running_var, input, C, op, "running_var");
  const bool have_stats = running_mean.has_value() && running_mean->defined() &&
                          running_var.has_value() && running_var->defined();
  TORCH_CHECK(training || have_stats, op,
              ": running_mean and running_var must be given in evaluation mode (training=False)");
}

namespace {

// grad_out has the input's shape, dtype and device (both backwards).
void check_grad_out(const at::Tensor& grad_out, const at::Tensor& input, const char* op) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", str_of(grad_out.sizes()),
              " but input has shape ", str_of(input.sizes()));
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op, ": grad_out has dtype ",
              str_of(grad_out.scalar_type()), " but input has dtype ", str_of(input.scalar_type()));
  TORCH_CHECK(grad_out.device() == input.device(), op, ": grad_out is on ", str_of(grad_out.device()),
              " but input is on ", str_of(input.device()));
}

}  // namespace

void check_bn_bwd_args(const at::Tensor& grad_out, const at::Tensor& input,
                       const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                       const at::Tensor& save_invstd, const char* op) {
  check_bn_input(input, op);
  check_grad_out(grad_out, input, op);
  const int64_t C = input.size(1);
  const auto acc = acc_dtype(input.scalar_type());
  check_param(weight, input, C, op, "weight");
  for (const at::Tensor* t : {&save_mean, &save_invstd}) {
    TORCH_CHECK(t->numel() == C && t->scalar_type() == acc && t->device() == input.device(), op,
                ": save_mean/save_invstd must be ", str_of(acc), " tensors of ", str_of(C),
                " elements on the input's device, as batch_norm_fwd returns them");
  }
}

void check_ln_input(const at::Tensor& x, int64_t ndim, const char* op,
                    c10::optional<c10::DeviceType> device_type) {
  check_floating_input(x, op);
  if (device_type.has_value())
    TORCH_CHECK(x.device().type() == *device_type, op, ": expected a ",
                c10::DeviceTypeName(*device_type), " input, but it is on ", str_of(x.device()));
  TORCH_CHECK(ndim >= 1 && ndim <= x.dim(), op, ": normalized_ndim must be in [1, ", str_of(x.dim()),
              "] for an input of shape ", str_of(x.sizes()), ", but got ", str_of(ndim));
}

LnShape check_ln_fwd_args(const at::Tensor& input, int64_t normalized_ndim,
                          const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const char* op,
                          c10::optional<c10::DeviceType> device_type) {
  check_ln_input(input, normalized_ndim, op, device_type);
  const LnShape shape = ln_shape(input, normalized_ndim);
  check_param(weight, input, shape.n, op, "weight");
  check_param(bias, input, shape.n, op, "bias");
  return shape;
}

LnShape check_ln_bwd_args(const at::Tensor& grad_out, const at::Tensor& input,
                          int64_t normalized_ndim, const at::Tensor& mean,
                          const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                          const char* op,
                          c10::optional<c10::DeviceType> device_type) {
  check_ln_input(input, normalized_ndim, op, device_type);
  check_grad_out(grad_out, input, op);
  const LnShape shape = ln_shape(input, normalized_ndim);
  check_param(weight, input, shape.n, op, "weight");
  const auto acc = acc_dtype(input.scalar_type());
  for (const at::Tensor* t : {&mean, &rstd})
    TORCH_CHECK(t->numel() == shape.m && t->scalar_type() == acc && t->device() == input.device(),
                op, ": mean/rstd must be ", str_of(acc), " tensors of ", str_of(shape.m),
                " elements on the input's device, as layer_norm_fwd returns them");
  return shape;
}

}  // namespace normext
