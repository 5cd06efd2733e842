// BatchNorm on the CPU: forward (training: batch statistics; eval: given statistics) and
// backward. (The running-statistics update is device-generic: csrc/batch_norm_update.cpp.) The math is DESIGN.md's:
//   mean, var (biased) per channel over N x spatial; invstd = 1 / sqrt(var + eps);
//   y = (x - mean) * (weight * invstd) + bias;
//   backward (training): with S1 = sum(dy), S2 = sum(dy * (x - mean)) per channel and n values,
//     dbias = S1, dweight = S2 * invstd,
//     dx = weight * invstd * (dy - S1 / n - (x - mean) * invstd^2 * S2 / n);
//   backward (eval): dx = weight * invstd * dy.
//
// Work split (see common.h for the layouts):
//   planar (NCHW):  one task per (n, c) plane; per-plane results are merged per channel over n
//                   in order.
//   channels-last:  fixed blocks of rows, grouped into at most kTasks tasks by shape alone; each
//                   task accumulates its rows into per-channel buffers; task results are merged
//                   per channel in task order.
// Both merge orders depend only on the shape, so results are bitwise reproducible whatever the
// number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cpu/vec_utils.h"

namespace normext::cpu {
namespace {

constexpr int64_t kTasks = 64;

// ---- channels-last rows: per-row accumulation into per-channel buffers -----------------------

enum class Op { kSum, kMin, kMax };

inline double op_identity(Op op) {
  if (op == Op::kMin) return std::numeric_limits<double>::infinity();
  if (op == Op::kMax) return -std::numeric_limits<double>::infinity();
  return 0;
}

inline double op_apply(Op op, double a, double b) {
  if (op == Op::kMin) return b < a ? b : a;
  if (op == Op::kMax) return b > a ? b : a;
  return a + b;
}

// Reduces rows [0, R) of C channels into out[k * C + c] for each of the K slots. row_fn(r, bufs)
// accumulates row r into K acc_t buffers of length C. Rows go in blocks of `rb` (float sums of at
// most kChunk values), blocks are grouped into tasks, and every merge has a fixed order.
template <typename A, int K, typename RowFn>
void rows_reduce(int64_t R, int64_t C, const Op (&ops)[K], const RowFn& row_fn, double* out) {
  const int64_t rb = std::max<int64_t>(1, std::min<int64_t>(1024, kChunk / std::max<int64_t>(C, 1)));
  const int64_t blocks = (R + rb - 1) / rb;
  const int64_t tasks = std::max<int64_t>(1, std::min(blocks, kTasks));
  std::vector<double> partial(tasks * K * C);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> buf(K * C);
    A* bufs[K];
    for (int k = 0; k < K; ++k) bufs[k] = buf.data() + k * C;
    for (int64_t t = t0; t < t1; ++t) {
      double* part = partial.data() + t * K * C;
      for (int k = 0; k < K; ++k) std::fill(part + k * C, part + (k + 1) * C, op_identity(ops[k]));
      const int64_t b0 = t * blocks / tasks, b1 = (t + 1) * blocks / tasks;
      for (int64_t b = b0; b < b1; ++b) {
        for (int k = 0; k < K; ++k)
          std::fill(bufs[k], bufs[k] + C, static_cast<A>(op_identity(ops[k])));
        const int64_t r1 = std::min(R, (b + 1) * rb);
        for (int64_t r = b * rb; r < r1; ++r) row_fn(r, bufs);
        for (int k = 0; k < K; ++k)
          for (int64_t c = 0; c < C; ++c)
            part[k * C + c] = op_apply(ops[k], part[k * C + c], static_cast<double>(bufs[k][c]));
      }
    }
  });
  for (int k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) {
      double v = op_identity(ops[k]);
      for (int64_t t = 0; t < tasks; ++t) v = op_apply(ops[k], v, partial[(t * K + k) * C + c]);
      out[k * C + c] = v;
    }
}

// Row helpers, vectorized over the channels. A row holds C consecutive values.
template <typename T>
struct Rows {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;

  static void pass1(const T* x, int64_t C, A* sum, A* lo, A* hi) {
    int64_t j = 0;
    for (; j + P::kStep <= C; j += P::kStep) {
      V a, b;
      P::load(x + j, a, b);
      const int64_t h = V::size();
      (V::loadu(sum + j) + a).store(sum + j);
      (V::loadu(sum + j + h) + b).store(sum + j + h);
      at::vec::minimum(V::loadu(lo + j), a).store(lo + j);
      at::vec::minimum(V::loadu(lo + j + h), b).store(lo + j + h);
      at::vec::maximum(V::loadu(hi + j), a).store(hi + j);
      at::vec::maximum(V::loadu(hi + j + h), b).store(hi + j + h);
    }
    for (; j < C; ++j) {
      A v = static_cast<A>(x[j]);
      sum[j] += v;
      if (v < lo[j] || std::isnan(v)) lo[j] = v;
      if (v > hi[j] || std::isnan(v)) hi[j] = v;
    }
  }

  // s1 += (x - m), s2 += (x - m)^2        (pass 2, g == nullptr)
  // s1 += g, s2 += g * (x - m)            (gradient sums)
  static void pass2(const T* x, const T* g, int64_t C, const A* m, A* s1, A* s2) {
    int64_t j = 0;
    const int64_t h = V::size();
    for (; j + P::kStep <= C; j += P::kStep) {
      V a, b;
      P::load(x + j, a, b);
      a = a - V::loadu(m + j);
      b = b - V::loadu(m + j + h);
      V ga = a, gb = b;
      if (g != nullptr) P::load(g + j, ga, gb);
      (V::loadu(s1 + j) + ga).store(s1 + j);
      (V::loadu(s1 + j + h) + gb).store(s1 + j + h);
      at::vec::fmadd(ga, a, V::loadu(s2 + j)).store(s2 + j);
      at::vec::fmadd(gb, b, V::loadu(s2 + j + h)).store(s2 + j + h);
    }
    for (; j < C; ++j) {
      A d = static_cast<A>(x[j]) - m[j];
      A gv = g != nullptr ? static_cast<A>(g[j]) : d;
      s1[j] += gv;
      s2[j] += gv * d;
    }
  }

  // out = a * g + b * (x - m) + k   (g == nullptr: out = (x - m) * b + k, the forward apply;
  //                                  x == nullptr: out = a * g, the eval backward)
  static void apply(const T* g, const T* x, T* out, int64_t C, const A* a, const A* b,
                    const A* m, const A* k) {
    int64_t j = 0;
    const int64_t h = V::size();
    for (; j + P::kStep <= C; j += P::kStep) {
      V r0(A(0)), r1(A(0));
      if (x != nullptr) {
        V x0, x1;
        P::load(x + j, x0, x1);
        r0 = at::vec::fmadd(x0 - V::loadu(m + j), V::loadu(b + j), V::loadu(k + j));
        r1 = at::vec::fmadd(x1 - V::loadu(m + j + h), V::loadu(b + j + h), V::loadu(k + j + h));
      }
      if (g != nullptr) {
        V g0, g1;
        P::load(g + j, g0, g1);
        r0 = at::vec::fmadd(g0, V::loadu(a + j), r0);
        r1 = at::vec::fmadd(g1, V::loadu(a + j + h), r1);
      }
      P::store(out + j, r0, r1);
    }
    for (; j < C; ++j) {
      A r = 0;
      if (x != nullptr) r = (static_cast<A>(x[j]) - m[j]) * b[j] + k[j];
      if (g != nullptr) r += static_cast<A>(g[j]) * a[j];
      out[j] = static_cast<T>(r);
    }
  }
};

// ---- statistics ------------------------------------------------------------------------------

// Per-channel mean and biased variance of x (layout `sh`), in double.
template <typename T>
void channel_moments(const T* x, const BnShape& sh, std::vector<double>& mean,
                     std::vector<double>& var) {
  using A = acc_t<T>;
  const int64_t C = sh.c, n = sh.count();
  std::vector<double> shift(C);
  std::vector<A> shift_a(C);
  std::vector<Sum2> s2(C);
  if (!sh.channels_last) {
    const int64_t S = sh.s, planes = sh.n * C;
    std::vector<Sum1> p1(planes);
    at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1e) {
      for (int64_t p = p0; p < p1e; ++p) p1[p] = span_pass1(x + p * S, S);
    });
    for (int64_t c = 0; c < C; ++c) {
      Sum1 s;
      for (int64_t i = 0; i < sh.n; ++i) s.merge(p1[i * C + c]);
      shift_a[c] = static_cast<A>(s.shift(n));
      shift[c] = static_cast<double>(shift_a[c]);
    }
    std::vector<Sum2> p2(planes);
    at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1e) {
      for (int64_t p = p0; p < p1e; ++p) p2[p] = span_pass2(x + p * S, S, shift_a[p % C]);
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < sh.n; ++i) s2[c].merge(p2[i * C + c]);
  } else {
    const int64_t R = sh.n * sh.s;
    std::vector<double> r1(3 * C);
    const Op ops1[3] = {Op::kSum, Op::kMin, Op::kMax};
    rows_reduce<A, 3>(R, C, ops1, [&](int64_t r, A* const* b) {
      Rows<T>::pass1(x + r * C, C, b[0], b[1], b[2]);
    }, r1.data());
    for (int64_t c = 0; c < C; ++c) {
      Sum1 s;
      s.sum = r1[c];
      s.mn = r1[C + c];
      s.mx = r1[2 * C + c];
      if (std::isnan(s.sum)) s.mn = s.mx = s.sum;
      shift_a[c] = static_cast<A>(s.shift(n));
      shift[c] = static_cast<double>(shift_a[c]);
    }
    std::vector<double> r2(2 * C);
    const Op ops2[2] = {Op::kSum, Op::kSum};
    rows_reduce<A, 2>(R, C, ops2, [&](int64_t r, A* const* b) {
      Rows<T>::pass2(x + r * C, nullptr, C, shift_a.data(), b[0], b[1]);
    }, r2.data());
    for (int64_t c = 0; c < C; ++c) s2[c] = Sum2{r2[c], r2[C + c]};
  }
  mean.resize(C);
  var.resize(C);
  for (int64_t c = 0; c < C; ++c) finish_moments(shift[c], s2[c], n, mean[c], var[c]);
}

// Per-channel S1 = sum(dy) and S2 = sum(dy * (x - mean)), in double.
template <typename T>
void channel_grad_sums(const T* dy, const T* x, const BnShape& sh, const acc_t<T>* mean,
                       std::vector<double>& s1, std::vector<double>& s2) {
  using A = acc_t<T>;
  const int64_t C = sh.c;
  s1.assign(C, 0);
  s2.assign(C, 0);
  if (!sh.channels_last) {
    const int64_t S = sh.s, planes = sh.n * C;
    std::vector<Sum2> p(planes);
    at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t q = p0; q < p1; ++q) p[q] = span_grad_sums(dy + q * S, x + q * S, S, mean[q % C]);
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < sh.n; ++i) {
        s1[c] += p[i * C + c].sd;
        s2[c] += p[i * C + c].sdd;
      }
  } else {
    std::vector<double> r(2 * C);
    const Op ops[2] = {Op::kSum, Op::kSum};
    rows_reduce<A, 2>(sh.n * sh.s, C, ops, [&](int64_t row, A* const* b) {
      Rows<T>::pass2(x + row * C, dy + row * C, C, mean, b[0], b[1]);
    }, r.data());
    for (int64_t c = 0; c < C; ++c) {
      s1[c] = r[c];
      s2[c] = r[C + c];
    }
  }
}

// out = a[c] * g + b[c] * (x - m[c]) + k[c] elementwise, with g or x possibly absent (see Rows).
template <typename T>
void channel_apply(const T* g, const T* x, T* out, const BnShape& sh, const acc_t<T>* a,
                   const acc_t<T>* b, const acc_t<T>* m, const acc_t<T>* k) {
  const int64_t C = sh.c;
  if (!sh.channels_last) {
    const int64_t S = sh.s;
    at::parallel_for(0, sh.n * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C;
        if (g == nullptr)
          span_affine(x + p * S, out + p * S, S, m[c], b[c], k[c]);
        else
          span_dx(g + p * S, x == nullptr ? nullptr : x + p * S, out + p * S, S, a[c],
                  b == nullptr ? 0 : b[c], m == nullptr ? 0 : m[c], k == nullptr ? 0 : k[c]);
      }
    });
  } else {
    const int64_t R = sh.n * sh.s;
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        Rows<T>::apply(g == nullptr ? nullptr : g + r * C, x == nullptr ? nullptr : x + r * C,
                       out + r * C, C, a, b, m, k);
    });
  }
}

// ---- ops -------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  check_bn_fwd_args(input, weight, bias, running_mean, running_var, training, eps,
                    "normext::batch_norm_fwd");
  const int64_t C = input.size(1);

  BnShape sh;
  at::Tensor x = bn_layout(input, sh);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor y = sh.channels_last ? at::empty_like(x) : at::empty(x.sizes(), x.options());
  at::Tensor save_mean = at::empty({C}, x.options().dtype(acc));
  at::Tensor save_invstd = at::empty({C}, x.options().dtype(acc));
  at::Tensor batch_var = at::empty({training ? C : 0}, x.options().dtype(acc));
  at::Tensor w = param_as_acc(weight, acc), b = param_as_acc(bias, acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    std::vector<double> mean(C), var(C);
    if (training) {
      channel_moments(x.const_data_ptr<scalar_t>(), sh, mean, var);
    } else {
      at::Tensor rm = running_mean->to(at::kDouble).contiguous();
      at::Tensor rv = running_var->to(at::kDouble).contiguous();
      std::copy(rm.const_data_ptr<double>(), rm.const_data_ptr<double>() + C, mean.begin());
      std::copy(rv.const_data_ptr<double>(), rv.const_data_ptr<double>() + C, var.begin());
    }
    const A* wp = ptr_or_null<A>(w);
    const A* bp = ptr_or_null<A>(b);
    std::vector<A> m(C), scale(C), shift(C);
    A* sm = save_mean.mutable_data_ptr<A>();
    A* si = save_invstd.mutable_data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(var[c] + eps);
      sm[c] = m[c] = static_cast<A>(mean[c]);
      si[c] = static_cast<A>(invstd);
      if (training) batch_var.mutable_data_ptr<A>()[c] = static_cast<A>(var[c]);
      scale[c] = static_cast<A>(wp ? wp[c] * invstd : invstd);
      shift[c] = bp ? bp[c] : A(0);
    }
    if (x.numel() > 0)
      channel_apply<scalar_t>(nullptr, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                              sh, nullptr, scale.data(), m.data(), shift.data());
  });
  return {y, save_mean, save_invstd, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    std::array<bool, 3> mask) {
  check_bn_bwd_args(grad_out, input, weight, save_mean, save_invstd, "normext::batch_norm_bwd");
  const int64_t C = input.size(1);
  const auto acc = acc_dtype(input.scalar_type());

  BnShape sh;
  at::Tensor x = bn_layout(input, sh);
  at::Tensor dy = like_layout(grad_out, x);
  at::Tensor w = param_as_acc(weight, acc);
  at::Tensor dx = mask[0] ? (sh.channels_last ? at::empty_like(x) : at::empty(x.sizes(), x.options()))
                          : at::empty({0}, x.options());
  at::Tensor dw = at::empty({mask[1] ? C : 0}, x.options().dtype(acc));
  at::Tensor db = at::empty({mask[2] ? C : 0}, x.options().dtype(acc));
  at::Tensor mean_c = save_mean.contiguous(), invstd_c = save_invstd.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    const A* mean = mean_c.const_data_ptr<A>();
    const A* invstd = invstd_c.const_data_ptr<A>();
    const A* wp = ptr_or_null<A>(w);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const int64_t n = sh.count();
    std::vector<double> s1, s2;
    if (training || mask[1] || mask[2]) {
      if (x.numel() > 0) {
        channel_grad_sums(gp, xp, sh, mean, s1, s2);
      } else {
        s1.assign(C, 0);
        s2.assign(C, 0);
      }
    }
    if (mask[1])
      for (int64_t c = 0; c < C; ++c) dw.mutable_data_ptr<A>()[c] = static_cast<A>(s2[c] * invstd[c]);
    if (mask[2])
      for (int64_t c = 0; c < C; ++c) db.mutable_data_ptr<A>()[c] = static_cast<A>(s1[c]);
    if (!mask[0] || x.numel() == 0) return;
    std::vector<A> a(C), b(C), k(C);
    for (int64_t c = 0; c < C; ++c) {
      const double r = invstd[c], gr = (wp ? wp[c] : 1.0) * r;
      a[c] = static_cast<A>(gr);
      if (training) {
        b[c] = static_cast<A>(-gr * r * r * s2[c] / n);
        k[c] = static_cast<A>(-gr * s1[c] / n);
      }
    }
    channel_apply<scalar_t>(gp, training ? xp : nullptr, dx.mutable_data_ptr<scalar_t>(), sh,
                            a.data(), training ? b.data() : nullptr, training ? mean : nullptr,
                            training ? k.data() : nullptr);
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, CPU, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd);
  m.impl("batch_norm_bwd", &batch_norm_bwd);
}

}  // namespace normext::cpu
