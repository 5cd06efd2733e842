// Input checks and small helpers shared by the CPU and CUDA backends (the checks are defined in
// checks.cpp, compiled by the host compiler; see there why). Nothing here touches
// tensor data: the backends check, allocate and dispatch; the kernels compute.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Optional.h>
#include <c10/util/accumulate.h>

#include <string>

namespace normext {

// Statistics and accumulation dtype: float32 for float32/float16/bfloat16 inputs, float64 for float64.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Values for error messages, as strings: our messages are built from strings only (checks.cpp
// says why).
std::string str_of(int64_t v);
std::string str_of(double v);
std::string str_of(at::IntArrayRef sizes);
std::string str_of(at::ScalarType t);
std::string str_of(const c10::Device& d);

// The dtype rules the checks below enforce, as predicates (csrc/eager.cpp tests them without
// raising): inputs are float32, float64, float16 or bfloat16; a parameter has the input's dtype,
// or float32 for a float16/bfloat16 input.
bool is_floating_dtype(at::ScalarType t);
bool param_dtype_ok(at::ScalarType param, at::ScalarType input);
void check_floating_input(const at::Tensor& x, const char* op);

// A parameter (weight, bias, running statistic) must have `numel` elements, live on x's device,
// and have x's dtype, or float32 when x is float16/bfloat16 (mixed precision, as in torch).
void check_param(const c10::optional<at::Tensor>& p, const at::Tensor& x, int64_t numel,
                 const char* op, const char* name);

// The parameter as a contiguous 1-D tensor of the accumulation dtype, or an undefined tensor.
inline at::Tensor param_as_acc(const c10::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->reshape({-1}).to(acc).contiguous();
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace normext

namespace normext {

// BatchNorm sees x (N, C, *) as (N, C, S) with S the product of the spatial sizes. Two memory
// layouts are handled natively:
//   planar:        NCHW-contiguous, each (n, c) plane is S consecutive values;
//   channels-last: (N, S, C) in memory (channels_last / channels_last_3d, and a contiguous
//                  (N, C) input), each of the N*S rows holds C consecutive channel values.
// Any other strides are copied first: to channels_last(_3d) where torch suggests that format for
// them, else to the planar layout.
inline bool is_channels_last_like(const at::Tensor& x) {
  int64_t expected = 1;
  auto fits = [&](int64_t d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
    return true;
  };
  if (!fits(1)) return false;
  for (int64_t d = x.dim() - 1; d >= 2; --d)
    if (!fits(d)) return false;
  return fits(0);
}

struct BnShape {
  int64_t n, c, s;  // batch, channels, spatial
  bool channels_last;
  int64_t count() const { return n * s; }  // values per channel
};

// S: the product of x's spatial sizes (dims 2 on), 1 for an (N, C) input.
inline int64_t bn_spatial_size(const at::Tensor& x) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  return s;
}

// Returns x in a layout the kernels handle (itself when possible, else a planar copy).
inline at::Tensor bn_layout(const at::Tensor& x, BnShape& shape) {
  shape.n = x.size(0);
  shape.c = x.size(1);
  shape.s = bn_spatial_size(x);
  // An empty x counts as contiguous whatever its strides: keep a channels-last one's layout.
  if ((shape.s == 1 || !x.is_contiguous() || x.numel() == 0) && is_channels_last_like(x)) {
    shape.channels_last = true;
    return x;
  }
  // Other strides are copied. Ones torch calls channels_last(_3d) (a strided slice of a
  // channels_last tensor, say) go to that format, so the output has it, as torch's does.
  if (x.dim() >= 4 && !x.is_contiguous()) {
    const auto fmt = x.suggest_memory_format();
    if (fmt != at::MemoryFormat::Contiguous) {
      shape.channels_last = true;
      return x.contiguous(fmt);
    }
  }
  shape.channels_last = shape.s == 1;  // a contiguous (N, C, 1...) is also channels-last
  return x.contiguous();
}

// grad_out in the same memory layout as x (autograd may hand it over in another one).
inline at::Tensor like_layout(const at::Tensor& t, const at::Tensor& x) {
  if (t.strides() == x.strides()) return t;
  return at::empty_like(x).copy_(t);
}

// ---- BatchNorm argument checks, the same on every backend -------------------------------------

void check_bn_input(const at::Tensor& x, const char* op);

void check_bn_fwd_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& running_mean,
                       const c10::optional<at::Tensor>& running_var, bool training,
                       double eps, const char* op);

// The running-statistics update (batch_norm_update.cpp): its argument checks, and the
// device-generic path (a few tensor ops; a loop on the CPU).
void check_update_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& batch_mean, const at::Tensor& batch_var,
                             int64_t count, const c10::optional<at::Tensor>& num_batches_tracked);
// count / (count - 1): the factor that makes a batch's biased variance over count values unbiased
// (1 for a single value).
inline double unbias_factor(int64_t count) {
  return count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
}
void update_stats_generic(at::Tensor& running_mean, at::Tensor& running_var,
                          const at::Tensor& batch_mean, const at::Tensor& batch_var,
                          double momentum, int64_t count,
                          const c10::optional<at::Tensor>& num_batches_tracked);

void check_bn_bwd_args(const at::Tensor& grad_out, const at::Tensor& input,
                       const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                       const at::Tensor& save_invstd, const char* op);

}  // namespace normext

namespace normext {

// ---- LayerNorm argument checks, the same on every backend -------------------------------------

// LayerNorm sees x as (m, n): n is the product of the last normalized_ndim sizes (those from
// `axis` on), m the product of the others.
struct LnShape {
  int64_t axis;  // first normalized dim
  int64_t m;     // rows
  int64_t n;     // values per row
};

// A backend that serves one device type passes it as `device_type` (the CUDA one: kCUDA): an input
// on another device is refused, after the dtype check and before the shape checks.
void check_ln_input(const at::Tensor& x, int64_t ndim, const char* op,
                    c10::optional<c10::DeviceType> device_type);

inline LnShape ln_shape(const at::Tensor& x, int64_t ndim) {
  const auto sizes = x.sizes();
  const int64_t axis = x.dim() - ndim;
  return {axis, c10::multiply_integers(sizes.begin(), sizes.begin() + axis),
          c10::multiply_integers(sizes.begin() + axis, sizes.end())};
}

LnShape check_ln_fwd_args(const at::Tensor& input, int64_t normalized_ndim,
                          const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const char* op,
                          c10::optional<c10::DeviceType> device_type = c10::nullopt);

LnShape check_ln_bwd_args(const at::Tensor& grad_out, const at::Tensor& input,
                          int64_t normalized_ndim, const at::Tensor& mean,
                          const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                          const char* op,
                          c10::optional<c10::DeviceType> device_type = c10::nullopt);

}  // namespace normext
