// Autograd for the forward ops, in C++ (the Autograd dispatch key): the backward of
// layer_norm_fwd is layer_norm_bwd, and of batch_norm_fwd batch_norm_bwd. A Python registration
// (torch.library.register_autograd) would cost about 30 us of interpreter time per forward and
// again per backward, as much as the kernels of a small normalization; here it is a few us.
//
// Both directions call the ops through the dispatcher, so the backend kernels, the fake kernels
// (torch.compile traces through this code with FakeTensors) and the backward ops' own autograd
// (the double-backward formulas registered in normext/ops.py) all apply.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace normext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<at::Tensor>;

// ---- typed handles to the ops ------------------------------------------------------------------

using LnFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                const OptT&, const OptT&, double);
using LnBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
    const OptT&, std::array<bool, 3>);
using BnFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, bool, double);
using BnBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, const at::Tensor&, bool,
    std::array<bool, 3>);

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& op(const char* name) {
  // one static per signature; each signature belongs to one op
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
  return handle;
}
const auto& ln_fwd() { return op<LnFwdSig>("normext::layer_norm_fwd"); }
const auto& ln_bwd() { return op<LnBwdSig>("normext::layer_norm_bwd"); }
const auto& bn_fwd() { return op<BnFwdSig>("normext::batch_norm_fwd"); }
const auto& bn_bwd() { return op<BnBwdSig>("normext::batch_norm_bwd"); }

bool needs_grad(const OptT& t) { return t.has_value() && t->defined() && t->requires_grad(); }

// A parameter's dtype, kept for its grad (the kernels return grads in the statistics' dtype).
int64_t dtype_of(const OptT& p) {
  return static_cast<int64_t>(p.has_value() && p->defined() ? p->scalar_type() : at::kFloat);
}
at::Tensor as_dtype(const at::Tensor& g, const c10::IValue& dtype) {
  return g.to(static_cast<at::ScalarType>(dtype.toInt()));
}

// What both backwards need of the forward's arguments: which grads were asked for (input,
// weight, bias) and the parameters' dtypes (for their grads).
void save_grad_info(AutogradContext* ctx, const at::Tensor& x, const OptT& weight,
                    const OptT& bias) {
  ctx->saved_data["mask"] =
      c10::List<bool>({x.requires_grad(), needs_grad(weight), needs_grad(bias)});
  ctx->saved_data["weight_dtype"] = dtype_of(weight);
  ctx->saved_data["bias_dtype"] = dtype_of(bias);
}
std::array<bool, 3> saved_mask(AutogradContext* ctx) {
  const c10::List<bool> m = ctx->saved_data["mask"].toBoolList();
  return {m[0], m[1], m[2]};
}

// The backward op's call. Under create_graph=True (grad mode on during backward) it goes through
// the dispatcher's Autograd key, whose kernel (the Python double-backward registration in
// normext/ops.py) records it for a second derivative. Otherwise nothing is recorded, and the call
// skips that key: the Python kernel would only redispatch, at some 20-100 us of interpreter time
// per backward (more than the kernels of a small normalization on the CPU, and the whole cost of
// a bf16 LayerNorm backward on an H100).
template <typename F>
auto below_autograd_unless_grad_mode(F&& call) {
  if (at::GradMode::is_enabled()) return call();
  at::AutoDispatchBelowADInplaceOrView guard;
  return call();
}

// ---- LayerNorm ---------------------------------------------------------------------------------

struct LayerNormFn : torch::autograd::Function<LayerNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t ndim,
                               const OptT& weight, const OptT& bias, double eps) {
    at::Tensor y, mean, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, mean, rstd) = ln_fwd().call(x, ndim, weight, bias, eps);
    }
    ctx->set_materialize_grads(false);  // no zero grads for mean/rstd (never used)
    ctx->saved_data["ndim"] = ndim;
    save_grad_info(ctx, x, weight, bias);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), mean, rstd});
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const OptT weight = saved[1].defined() ? OptT(saved[1]) : std::nullopt;
    const std::array<bool, 3> mask = saved_mask(ctx);
    variable_list out(5);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return out;
    auto [dx, dw, db] = below_autograd_unless_grad_mode([&] {
      return ln_bwd().call(grads[0].to(x.scalar_type()), x, ctx->saved_data["ndim"].toInt(),
                           saved[2], saved[3], weight, mask);
    });
    if (mask[0]) out[0] = dx;
    if (mask[1]) out[2] = as_dtype(dw, ctx->saved_data["weight_dtype"]);
    if (mask[2]) out[3] = as_dtype(db, ctx->saved_data["bias_dtype"]);
    return out;
  }
};

// ---- BatchNorm ---------------------------------------------------------------------------------

struct BatchNormFn : torch::autograd::Function<BatchNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptT& weight,
                               const OptT& bias, const OptT& running_mean,
                               const OptT& running_var, bool training, double eps) {
    at::Tensor y, save_mean, save_invstd, batch_var;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, save_mean, save_invstd, batch_var) =
          bn_fwd().call(x, weight, bias, running_mean, running_var, training, eps);
    }
    ctx->set_materialize_grads(false);  // no zero grads for the statistics (never used)
    ctx->saved_data["training"] = training;
    save_grad_info(ctx, x, weight, bias);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), save_mean, save_invstd});
    ctx->mark_non_differentiable({save_mean, save_invstd, batch_var});
    return {y, save_mean, save_invstd, batch_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const OptT weight = saved[1].defined() ? OptT(saved[1]) : std::nullopt;
    const std::array<bool, 3> mask = saved_mask(ctx);
    variable_list out(7);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return out;
    auto [dx, dw, db] = below_autograd_unless_grad_mode([&] {
      return bn_bwd().call(grads[0].to(x.scalar_type()), x, weight, saved[2], saved[3],
                           ctx->saved_data["training"].toBool(), mask);
    });
    if (mask[0]) out[0] = dx;
    if (mask[1]) out[1] = as_dtype(dw, ctx->saved_data["weight_dtype"]);
    if (mask[2]) out[2] = as_dtype(db, ctx->saved_data["bias_dtype"]);
    return out;
  }
};

// The Autograd kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_autograd(const at::Tensor& x,
                                                                   int64_t ndim,
                                                                   const OptT& weight,
                                                                   const OptT& bias, double eps) {
  auto r = LayerNormFn::apply(x, ndim, weight, bias, eps);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_autograd(
    const at::Tensor& x, const OptT& weight, const OptT& bias, const OptT& running_mean,
    const OptT& running_var, bool training, double eps) {
  auto r = BatchNormFn::apply(x, weight, bias, running_mean, running_var, training, eps);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_autograd);
  m.impl("batch_norm_fwd", &batch_norm_autograd);
}

}  // namespace normext
