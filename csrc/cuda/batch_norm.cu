// BatchNorm on CUDA: forward (training: batch statistics; eval: given statistics) and backward,
// the CPU twin being csrc/cpu/batch_norm.cpp (same checks, outputs and formulas). This file
// checks, allocates, dispatches on dtype / vector width / layout, sizes the grids and launches
// the kernels of batch_norm_kernels.cuh:
//   forward, training:  bn_stats_kernel [-> bn_stats_finalize_kernel] -> bn_apply_kernel
//   forward, eval:      bn_stats_finalize_kernel (from the running statistics) -> bn_apply_kernel
//   backward:           [bn_grad_sums_kernel] [-> bn_grad_finalize_kernel] -> bn_apply_kernel
// (the finalize kernel runs when the reduction used more than one block per channel, or when
// there is nothing to reduce). All on the current stream of the input's device.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <tuple>

#include "common.h"
#include "cuda/batch_norm_kernels.cuh"

namespace normext::cuda::bn {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Resident blocks of `Kernel` per multiprocessor at `threads` threads per block (asked once per
// kernel: it depends only on the kernel's registers and shared memory).
template <auto Kernel>
int64_t blocks_per_sm(int threads) {
  static const int blocks = [threads] {
    int b = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, Kernel, threads, 0));
    return std::max(b, 1);
  }();
  return blocks;
}

// The widest vector (values per load) that divides the contiguous extent (S planar, C
// channels-last) and to which every pointer is aligned: 16 bytes, 8 bytes, or one value.
template <typename T>
int pick_vec(const BnShape& sh, std::initializer_list<const void*> ptrs) {
  constexpr int kMax = 16 / sizeof(T);
  const int64_t inner = sh.channels_last ? sh.c : sh.s;
  for (int v = kMax; v >= std::max(kMax / 2, 2); v /= 2) {
    bool ok = inner % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (v * sizeof(T)) == 0;
    if (ok) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, V>, std::bool_constant<CL>) for the runtime vec / layout.
template <typename T, typename F>
void dispatch_vec(int vec, bool channels_last, const F& f) {
  constexpr int kMax = 16 / sizeof(T);
  auto with_layout = [&](auto v) {
    if (channels_last)
      f(v, std::true_type{});
    else
      f(v, std::false_type{});
  };
  if (vec == kMax) {
    with_layout(std::integral_constant<int, kMax>{});
  } else {
    if constexpr (kMax / 2 > 1) {
      if (vec == kMax / 2) return with_layout(std::integral_constant<int, kMax / 2>{});
    }
    with_layout(std::integral_constant<int, 1>{});
  }
}

// Launch shape of a reduction (bn_stats_kernel / bn_grad_sums_kernel): grid (G, column groups).
// G fills the GPU (about `resident` threads) but leaves each thread at least kMinChunks chunks,
// and grows beyond that to keep each thread at most kMaxPerThread values per channel.
struct ReduceGrid {
  dim3 grid, block;
  int64_t groups;
};

ReduceGrid reduce_grid(const BnShape& sh, int vec, int unroll, int64_t resident) {
  const auto pick_groups = [&](int64_t per_col, int64_t threads, int64_t lanes, int64_t cols,
                               int64_t values) {
    // per_col: loads per column (planar: vectors of the channel; channels-last: rows); lanes:
    // threads sharing one column's loads; values: values per load and channel.
    const int64_t fill = std::max<int64_t>(1, resident / (threads * cols));
    const int64_t work = ceil_div(per_col, lanes * unroll * kMinChunks);
    const int64_t cap = ceil_div(per_col * values, lanes * kMaxPerThread);
    return std::max<int64_t>(1, std::max(std::min(fill, work), cap));
  };
  if (!sh.channels_last) {
    const int64_t per_col = sh.n * (sh.s / vec);
    const int64_t threads = std::clamp<int64_t>(
        ceil_div(ceil_div(per_col, unroll * kMinChunks), kWarpSize) * kWarpSize, kWarpSize,
        kPlanarThreads);
    const int64_t cols = std::min<int64_t>(sh.c, 65535);
    const int64_t g = pick_groups(per_col, threads, threads, cols, vec);
    TORCH_CHECK(g <= INT32_MAX, "normext: input too large for the BatchNorm CUDA grid");
    return {dim3(static_cast<unsigned>(g), static_cast<unsigned>(cols)),
            dim3(static_cast<unsigned>(threads)), g};
  }
  const int64_t cv = sh.c / vec;
  int64_t tx = 1;
  while (tx < cv && tx < kWarpSize) tx *= 2;
  const int64_t ty = kRowsThreads / tx;
  const int64_t cols = std::min<int64_t>(ceil_div(cv, tx), 65535);
  const int64_t g = pick_groups(sh.n * sh.s, kRowsThreads, ty, cols, 1);
  TORCH_CHECK(g <= INT32_MAX, "normext: input too large for the BatchNorm CUDA grid");
  return {dim3(static_cast<unsigned>(g), static_cast<unsigned>(cols)),
          dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty)), g};
}

template <auto Kernel, typename T>
void launch_finalize(const BnParams<T>& p, cudaStream_t stream) {
  Kernel<<<static_cast<unsigned>(ceil_div(p.c, kFinalX)), dim3(kFinalX, kFinalY), 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A reduction over x (and dy) into per-channel results: Reduce with G blocks per channel, then
// Finalize over its `parts` x G x C partials when G > 1 (with G == 1, Reduce finishes itself).
template <auto Reduce, auto Finalize, typename T, int V, bool CL>
void launch_reduce(BnParams<T>& p, const BnShape& sh, int parts, const at::TensorOptions& acc,
                   cudaStream_t stream) {
  constexpr int kThreads = CL ? kRowsThreads : kPlanarThreads;
  const int64_t resident = blocks_per_sm<Reduce>(kThreads) * kThreads * sm_count();
  const ReduceGrid rg = reduce_grid(sh, V, unroll<V>(), resident);
  at::Tensor partial;
  p.groups = rg.groups;
  if (rg.groups > 1) {
    partial = at::empty({parts * rg.groups * sh.c}, acc);
    p.partial = partial.mutable_data_ptr<acc_t<T>>();
  }
  Reduce<<<rg.grid, rg.block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // `partial` goes back to the caching allocator at the end of this scope; the allocator reuses
  // it only in stream order, after Finalize has read it.
  if (rg.groups > 1) launch_finalize<Finalize>(p, stream);
}

// bn_apply_kernel over all N x C x S values: a grid-stride loop with at most one wave of blocks
// (sized for the smaller unroll, that of the two-input variant), and in channels-last at least one
// thread per channel vector of a row.
template <auto Kernel, typename T, int V, bool CL>
void launch_apply(const BnParams<T>& p, cudaStream_t stream) {
  const int64_t vectors = p.n * p.c * p.s / V;
  int64_t blocks = std::min(ceil_div(vectors, int64_t{kApplyThreads} * unroll<V>() / 2),
                            blocks_per_sm<Kernel>(kApplyThreads) * sm_count());
  if (CL) blocks = std::max(blocks, ceil_div(p.c / V, kApplyThreads));
  TORCH_CHECK(blocks <= INT32_MAX, "normext: input too large for the BatchNorm CUDA grid");
  Kernel<<<static_cast<unsigned>(blocks), kApplyThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// torch's CUDA batch_norm lays its output out like the input (at::empty_like) when the input is
// dense, whatever its dim order, except when it picks cuDNN (the conditions of
// at::native::_select_batch_norm_backend, below), whose output has input.suggest_memory_format().
// normext computes in its own layout (planar or channels-last) and, where torch keeps the input's
// strides and those differ, hands the output over in them: for a permuted dense input torch would
// return permuted, and so do we. normext/ops.py's fake kernel applies the same rule.
bool torch_uses_cudnn(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  auto defined = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  if (!defined(weight) || !defined(bias)) return false;
  const auto xt = x.scalar_type(), wt = weight->scalar_type();
  const bool stats = defined(running_mean) && defined(running_var);
  const bool no_stats = !defined(running_mean) && !defined(running_var);
  const auto& hooks = at::detail::getCUDAHooks();
  return xt != at::kBFloat16 && wt != at::kBFloat16 && (xt != at::kHalf || wt == at::kFloat) &&
         (stats || (no_stats && training)) && x.dim() >= 3 &&
         x.size(0) <= (training ? 880801 : 65535) && at::globalContext().userEnabledCuDNN() &&
         hooks.compiledWithCuDNN() && hooks.versionCuDNN() >= 5110L &&
         eps >= hooks.batchnormMinEpsilonCuDNN() && x.numel() < INT32_MAX;
}

// The parameter for the kernels in its own dtype (ParamPtr), contiguous; `keep` holds the tensor
// read (a contiguous copy only for a strided parameter).
ParamPtr param_ptr(const c10::optional<at::Tensor>& p, at::Tensor& keep) {
  if (!p.has_value() || !p->defined()) return {};
  keep = p->is_contiguous() ? *p : p->contiguous();
  ParamPtr out;
  out.data = keep.const_data_ptr();
  switch (keep.scalar_type()) {
    case at::kFloat:
      out.kind = ParamPtr::kFloat;
      break;
    case at::kDouble:
      out.kind = ParamPtr::kDouble;
      break;
    case at::kHalf:
      out.kind = ParamPtr::kHalf;
      break;
    case at::kBFloat16:
      out.kind = ParamPtr::kBFloat16;
      break;
    default:
      TORCH_CHECK(false, "normext: a BatchNorm parameter of an unexpected dtype");
  }
  return out;
}

void check_cuda_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected a CUDA input, but it is on ", str_of(x.device()));
}

// ---- ops -------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  const char* op = "normext::batch_norm_fwd";
  check_bn_fwd_args(input, weight, bias, running_mean, running_var, training, eps, op);
  check_cuda_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t C = input.size(1);

  BnShape sh;
  at::Tensor x = bn_layout(input, sh);
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor y = sh.channels_last ? at::empty_like(x) : at::empty(x.sizes(), x.options());
  at::Tensor save_mean = at::empty({C}, acc_opts);
  at::Tensor save_invstd = at::empty({C}, acc_opts);
  at::Tensor batch_var = at::empty({training ? C : 0}, acc_opts);
  if (C == 0) return {y, save_mean, save_invstd, batch_var};
  at::Tensor w, b, rm, rv;
  const ParamPtr wp = param_ptr(weight, w), bp = param_ptr(bias, b);
  const ParamPtr rmp = training ? ParamPtr{} : param_ptr(running_mean, rm);
  const ParamPtr rvp = training ? ParamPtr{} : param_ptr(running_var, rv);
  at::Tensor coef = at::empty({4 * C}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    BnParams<scalar_t> p;
    p.x = x.const_data_ptr<scalar_t>();
    p.out = y.mutable_data_ptr<scalar_t>();
    p.n = sh.n;
    p.c = sh.c;
    p.s = sh.s;
    p.pilot_stride = sh.channels_last ? 1 : sh.s;
    p.weight = wp;
    p.bias = bp;
    p.running_mean = rmp;
    p.running_var = rvp;
    p.save_mean = save_mean.mutable_data_ptr<A>();
    p.save_invstd = save_invstd.mutable_data_ptr<A>();
    p.batch_var = training ? batch_var.mutable_data_ptr<A>() : nullptr;
    p.coef = coef.mutable_data_ptr<A>();
    p.eps = eps;
    p.training = training;
    const int vec = pick_vec<scalar_t>(sh, {p.x, p.out});
    dispatch_vec<scalar_t>(vec, sh.channels_last, [&](auto v, auto cl) {
      constexpr int V = decltype(v)::value;
      constexpr bool CL = decltype(cl)::value;
      if (training && sh.count() > 0)
        launch_reduce<bn_stats_kernel<scalar_t, V, CL>, bn_stats_finalize_kernel<scalar_t>,
                      scalar_t, V, CL>(p, sh, StatsOp<A>::kParts, acc_opts, stream);
      else  // eval, or no values: the statistics of an empty channel (mean 0, var 0)
        launch_finalize<bn_stats_finalize_kernel<scalar_t>>(p, stream);
      if (x.numel() > 0)
        launch_apply<bn_apply_kernel<scalar_t, V, CL, false, true>, scalar_t, V, CL>(p, stream);
    });
  });
  if (y.strides() != input.strides() && input.is_non_overlapping_and_dense() &&
      !torch_uses_cudnn(input, weight, bias, running_mean, running_var, training, eps))
    y = at::empty_like(input).copy_(y);
  return {y, save_mean, save_invstd, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    std::array<bool, 3> mask) {
  const char* op = "normext::batch_norm_bwd";
  check_bn_bwd_args(grad_out, input, weight, save_mean, save_invstd, op);
  check_cuda_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t C = input.size(1);
  const auto acc = acc_dtype(input.scalar_type());

  BnShape sh;
  at::Tensor x = bn_layout(input, sh);
  at::Tensor dy = like_layout(grad_out, x);
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor dx = mask[0] ? (sh.channels_last ? at::empty_like(x) : at::empty(x.sizes(), x.options()))
                          : at::empty({0}, x.options());
  at::Tensor dw = at::empty({mask[1] ? C : 0}, acc_opts);
  at::Tensor db = at::empty({mask[2] ? C : 0}, acc_opts);
  const bool need_sums = training || mask[1] || mask[2];
  if (C == 0 || (!mask[0] && !need_sums)) return {dx, dw, db};
  at::Tensor w;
  const ParamPtr wp = param_ptr(weight, w);
  at::Tensor mean_c = save_mean.contiguous(), invstd_c = save_invstd.contiguous();
  at::Tensor coef = mask[0] ? at::empty({4 * C}, acc_opts) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    BnParams<scalar_t> p;
    p.x = x.const_data_ptr<scalar_t>();
    p.dy = dy.const_data_ptr<scalar_t>();
    p.out = mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    p.n = sh.n;
    p.c = sh.c;
    p.s = sh.s;
    p.pilot_stride = sh.channels_last ? 1 : sh.s;
    p.weight = wp;
    p.mean = mean_c.const_data_ptr<A>();
    p.invstd = invstd_c.const_data_ptr<A>();
    p.grad_weight = mask[1] ? dw.mutable_data_ptr<A>() : nullptr;
    p.grad_bias = mask[2] ? db.mutable_data_ptr<A>() : nullptr;
    p.coef = mask[0] ? coef.mutable_data_ptr<A>() : nullptr;
    p.training = training;
    const int vec = pick_vec<scalar_t>(sh, {p.x, p.dy, p.out});
    dispatch_vec<scalar_t>(vec, sh.channels_last, [&](auto v, auto cl) {
      constexpr int V = decltype(v)::value;
      constexpr bool CL = decltype(cl)::value;
      if (need_sums && sh.count() > 0)
        launch_reduce<bn_grad_sums_kernel<scalar_t, V, CL>, bn_grad_finalize_kernel<scalar_t>,
                      scalar_t, V, CL>(p, sh, GradOp<A>::kParts, acc_opts, stream);
      else  // eval dx only, or no values: zero sums
        launch_finalize<bn_grad_finalize_kernel<scalar_t>>(p, stream);
      if (mask[0] && x.numel() > 0) {
        if (training)
          launch_apply<bn_apply_kernel<scalar_t, V, CL, true, true>, scalar_t, V, CL>(p, stream);
        else
          launch_apply<bn_apply_kernel<scalar_t, V, CL, true, false>, scalar_t, V, CL>(p, stream);
      }
    });
  });
  return {dx, dw, db};
}

// ---- the running-statistics update ----------------------------------------------------------

// One thread per channel, in double, as the CPU loop (batch_norm_update.cpp): one launch instead
// of the generic path's ten small tensor ops (about 130 us of host time a call on the H100
// machine, four times torch's whole BatchNorm forward there). With nbt (num_batches_tracked,
// int64 on the device) f = 1 / nbt is read on the device: no sync.
template <typename R>
__device__ R from_double(double v) {
  if constexpr (std::is_same_v<R, double>)
    return v;
  else
    return static_cast<R>(static_cast<float>(v));
}

template <typename R, typename B>
__global__ void bn_update_stats_kernel(R* rm, R* rv, const B* bm, const B* bv, int64_t C,
                                       double momentum, double unbias, const int64_t* nbt) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const double f = nbt != nullptr ? 1.0 / static_cast<double>(*nbt) : momentum;
  const double keep = 1.0 - f;
  rm[c] = from_double<R>(static_cast<double>(rm[c]) * keep + static_cast<double>(bm[c]) * f);
  rv[c] = from_double<R>(static_cast<double>(rv[c]) * keep +
                         static_cast<double>(bv[c]) * (f * unbias));
}

void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var,
                              const at::Tensor& batch_mean, const at::Tensor& batch_var,
                              double momentum, int64_t count,
                              const c10::optional<at::Tensor>& num_batches_tracked) {
  check_update_stats_args(running_mean, running_var, batch_mean, batch_var, count,
                          num_batches_tracked);
  const int64_t C = running_mean.numel();
  if (count == 0 || C == 0) return;
  const bool nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  const auto bt = batch_mean.scalar_type();
  const bool kernel =
      running_mean.is_cuda() && running_mean.is_contiguous() && running_var.is_contiguous() &&
      batch_mean.is_contiguous() && batch_var.is_contiguous() &&
      running_var.scalar_type() == running_mean.scalar_type() && batch_var.scalar_type() == bt &&
      (bt == at::kFloat || bt == at::kDouble) &&
      (!nbt || num_batches_tracked->scalar_type() == at::kLong) && C <= INT32_MAX;
  if (!kernel) {
    update_stats_generic(running_mean, running_var, batch_mean, batch_var, momentum, count,
                         num_batches_tracked);
    return;
  }
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const double unbias = unbias_factor(count);
  const int64_t* nbt_ptr = nbt ? num_batches_tracked->const_data_ptr<int64_t>() : nullptr;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>(ceil_div(C, kThreads));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "batch_norm_update_stats_cuda", [&] {
    using R = scalar_t;
    if (bt == at::kFloat)
      bn_update_stats_kernel<R, float><<<blocks, kThreads, 0, stream>>>(
          running_mean.mutable_data_ptr<R>(), running_var.mutable_data_ptr<R>(),
          batch_mean.const_data_ptr<float>(), batch_var.const_data_ptr<float>(), C, momentum,
          unbias, nbt_ptr);
    else
      bn_update_stats_kernel<R, double><<<blocks, kThreads, 0, stream>>>(
          running_mean.mutable_data_ptr<R>(), running_var.mutable_data_ptr<R>(),
          batch_mean.const_data_ptr<double>(), batch_var.const_data_ptr<double>(), C, momentum,
          unbias, nbt_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, CUDA, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd);
  m.impl("batch_norm_bwd", &batch_norm_bwd);
  m.impl("batch_norm_update_stats_", &batch_norm_update_stats_);
}

}  // namespace normext::cuda::bn
