// BatchNorm on the CPU: forward (training: batch statistics; eval: given statistics) and
// backward. (The running-statistics update is device-generic: csrc/batch_norm_update.cpp.) The math is DESIGN.md's:
//   mean, var (biased) per channel over N x spatial; invstd = 1 / sqrt(var + eps);
//   y = (x - mean) * (weight * invstd) + bias;
//   backward (training): with S1 = sum(dy), S2 = sum(dy * (x - mean)) per channel and n values,
//     dbias = S1, dweight = S2 * invstd,
//     dx = weight * invstd * (dy - S1 / n - (x - mean) * invstd^2 * S2 / n);
//   backward (eval): dx = weight * invstd * dy.
//
// Work split (see common.h for the layouts, and "work units" below):
//   planar (NCHW):  units are (n, c) planes, cut into segments when huge; threads take whole
//                   channels (C >= kTasks) or ranges of units; results merge per channel in
//                   order of n (planar_reduce).
//   channels-last:  fixed blocks of rows, grouped into at most kTasks tasks by shape alone; each
//                   block is walked one tile of channels at a time with the accumulators in
//                   registers; task results are merged per channel in task order.
// Both merge orders depend only on the shape, so results are bitwise reproducible whatever the
// number of threads. Training forward reads x twice (statistics, then y) and backward reads
// x and dy twice (sums, then dx).
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

// ---- work units -------------------------------------------------------------------------------
//
// planar: the N*C planes of S values are cut into segments of at most kSeg values, so that a
//   few huge planes still spread over all threads; unit u is segment u % segs of plane u / segs.
// channels-last: the R = N*S rows are cut into blocks of kBlockRows rows, grouped into at most
//   kTasks tasks; task t takes blocks [t*blocks/tasks, (t+1)*blocks/tasks).
// Both depend on the shape alone.

constexpr int64_t kSeg = 1 << 16;
constexpr int64_t kBlockRows = 128;

struct Planar {
  int64_t N, S, C, segs, units;
  explicit Planar(const BnShape& sh)
      : N(sh.n), S(sh.s), C(sh.c), segs(std::max<int64_t>(1, (sh.s + kSeg - 1) / kSeg)),
        units(sh.n * sh.c * segs) {}
  int64_t plane(int64_t u) const { return u / segs; }
  int64_t channel(int64_t u) const { return plane(u) % C; }
  int64_t offset(int64_t u) const { return plane(u) * S + (u % segs) * kSeg; }
  int64_t length(int64_t u) const { return std::min(kSeg, S - (u % segs) * kSeg); }
};

struct RowBlocks {
  int64_t R, rb, blocks, tasks;
  explicit RowBlocks(int64_t rows) : R(rows), rb(kBlockRows) {
    blocks = (R + rb - 1) / rb;
    tasks = std::max<int64_t>(1, std::min(blocks, kTasks));
  }
  int64_t first_block(int64_t t) const { return t * blocks / tasks; }
  int64_t row0(int64_t b) const { return b * rb; }
  int64_t row1(int64_t b) const { return std::min(R, (b + 1) * rb); }
};

// Column tiles of a row block: kTileVecs vectors wide, so a tile's accumulators stay in
// registers while the block's rows stream past (a tile of a block is at most 16 KB, and both
// statistics passes find it in L1). Columns past the last whole tile go one at a time.
constexpr int kTileVecs = 4;

template <typename T>
struct Tile {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  static constexpr int64_t kWidth = kTileVecs * V::size();

  static inline void load(const T* p, V (&v)[kTileVecs]) {
    P::load(p, v[0], v[1]);
    P::load(p + P::kStep, v[2], v[3]);
  }

  // Moments of columns [j, j + kWidth) (or the single column j when `single`) over rows
  // [r0, r1), merged into out[0 .. width).
  static void moments(const T* x, int64_t C, int64_t r0, int64_t r1, int64_t j, Moments* out) {
    const int64_t n = r1 - r0;
    V x0[kTileVecs], v[kTileVecs], s[kTileVecs], m[kTileVecs], q[kTileVecs];
    load(x + r0 * C + j, x0);
    for (int k = 0; k < kTileVecs; ++k) s[k] = V(A(0));
    for (int64_t r = r0; r < r1; ++r) {
      load(x + r * C + j, v);
      for (int k = 0; k < kTileVecs; ++k) s[k] += v[k] - x0[k];
    }
    const V inv_n(A(1) / static_cast<A>(n));
    A mb[kWidth], sb[kWidth], qb[kWidth];
    bool finite = true;
    for (int k = 0; k < kTileVecs; ++k) {
      m[k] = at::vec::fmadd(s[k], inv_n, x0[k]);  // exactly x0 for a constant column
      m[k].store(mb + k * V::size());
      s[k] = V(A(0));
      q[k] = V(A(0));
    }
    for (int64_t i = 0; i < kWidth; ++i) finite = finite && std::isfinite(mb[i]);
    if (!finite) {  // an Inf or NaN in some column: its shift is the plain mean (see span_shift)
      for (int64_t i = 0; i < kWidth; ++i)
        if (!std::isfinite(mb[i])) mb[i] = plain_mean(x + r0 * C + j + i, n, C);
      for (int k = 0; k < kTileVecs; ++k) m[k] = V::loadu(mb + k * V::size());
    }
    for (int64_t r = r0; r < r1; ++r) {
      load(x + r * C + j, v);
      for (int k = 0; k < kTileVecs; ++k) {
        const V d = v[k] - m[k];
        s[k] += d;
        q[k] = at::vec::fmadd(d, d, q[k]);
      }
    }
    for (int k = 0; k < kTileVecs; ++k) {
      s[k].store(sb + k * V::size());
      q[k].store(qb + k * V::size());
    }
    for (int64_t i = 0; i < kWidth; ++i) out[i].merge(moments_from(mb[i], sb[i], qb[i], n));
  }

  static void moments1(const T* x, int64_t C, int64_t r0, int64_t r1, int64_t j, Moments* out) {
    const int64_t n = r1 - r0;
    const A x0 = static_cast<A>(x[r0 * C + j]);
    A s = 0, q = 0;
    for (int64_t r = r0; r < r1; ++r) s += static_cast<A>(x[r * C + j]) - x0;
    A m = x0 + s / static_cast<A>(n);
    if (!std::isfinite(m)) m = plain_mean(x + r0 * C + j, n, C);
    s = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const A d = static_cast<A>(x[r * C + j]) - m;
      s += d;
      q += d * d;
    }
    out->merge(moments_from(m, s, q, n));
  }

  // s1 += sum(dy), s2 += sum(dy * (x - mean)) for columns [j, j + kWidth) over rows [r0, r1).
  static void grad_sums(const T* dy, const T* x, int64_t C, int64_t r0, int64_t r1, int64_t j,
                        const A* mean, double* s1, double* s2) {
    V m[kTileVecs], g[kTileVecs], v[kTileVecs], a[kTileVecs], b[kTileVecs];
    for (int k = 0; k < kTileVecs; ++k) {
      m[k] = V::loadu(mean + j + k * V::size());
      a[k] = V(A(0));
      b[k] = V(A(0));
    }
    for (int64_t r = r0; r < r1; ++r) {
      load(dy + r * C + j, g);
      load(x + r * C + j, v);
      for (int k = 0; k < kTileVecs; ++k) {
        a[k] += g[k];
        b[k] = at::vec::fmadd(g[k], v[k] - m[k], b[k]);
      }
    }
    A ab[kWidth], bb[kWidth];
    for (int k = 0; k < kTileVecs; ++k) {
      a[k].store(ab + k * V::size());
      b[k].store(bb + k * V::size());
    }
    for (int64_t i = 0; i < kWidth; ++i) {
      s1[j + i] += ab[i];
      s2[j + i] += bb[i];
    }
  }

  static void grad_sums1(const T* dy, const T* x, int64_t C, int64_t r0, int64_t r1, int64_t j,
                         const A* mean, double* s1, double* s2) {
    A a = 0, b = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const A g = static_cast<A>(dy[r * C + j]);
      a += g;
      b += g * (static_cast<A>(x[r * C + j]) - mean[j]);
    }
    s1[j] += a;
    s2[j] += b;
  }
};

// Row helpers, vectorized over the channels. A row holds C consecutive values.
template <typename T>
struct Rows {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;

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

// A planar per-channel reduction: unit_fn(u) is unit u's partial result R (Moments or Sum2, both
// with merge()), and channel c's partials merge in order of n, then segment. With at least
// kTasks channels the threads take whole channels and merge as they go; with fewer, the units
// go to at most kTasks tasks in contiguous ranges, each merging per channel into its own C
// partials, and the tasks merge in order. The order depends on the shape alone, and the partials
// take at most kTasks * C < kTasks^2 entries, not one per unit: a (N, C, 2) input has N*C units,
// and 24 bytes of Moments per unit would be several times the input.
template <typename R, typename F>
std::vector<R> planar_reduce(const Planar& pl, const F& unit_fn) {
  const int64_t C = pl.C;
  std::vector<R> out(C);
  if (C >= kTasks) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t i = 0; i < pl.N; ++i)
          for (int64_t s = 0; s < pl.segs; ++s) out[c].merge(unit_fn((i * C + c) * pl.segs + s));
    });
    return out;
  }
  const int64_t tasks = std::max<int64_t>(1, std::min(pl.units, kTasks));
  std::vector<R> part(tasks * C);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t u = t * pl.units / tasks; u < (t + 1) * pl.units / tasks; ++u)
        part[t * C + pl.channel(u)].merge(unit_fn(u));
  });
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t c = 0; c < C; ++c) out[c].merge(part[t * C + c]);
  return out;
}

// Per-channel moments of x (layout `sh`). Each unit (plane segment or row block) runs both
// statistics passes over its values while they are in cache, so x is read from memory once;
// the units' moments merge per channel in a fixed order.
template <typename T>
std::vector<Moments> channel_moments(const T* x, const BnShape& sh) {
  const int64_t C = sh.c;
  if (!sh.channels_last) {
    const Planar pl(sh);
    return planar_reduce<Moments>(pl, [&](int64_t u) {
      return span_moments(x + pl.offset(u), pl.length(u));
    });
  }
  std::vector<Moments> out(C);
  const RowBlocks rbk(sh.n * sh.s);
  const int64_t whole = C - C % Tile<T>::kWidth;
  std::vector<Moments> part(rbk.tasks * C);
  at::parallel_for(0, rbk.tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Moments* mine = part.data() + t * C;
      for (int64_t b = rbk.first_block(t); b < rbk.first_block(t + 1); ++b) {
        const int64_t r0 = rbk.row0(b), r1 = rbk.row1(b);
        for (int64_t j = 0; j < whole; j += Tile<T>::kWidth) Tile<T>::moments(x, C, r0, r1, j, mine + j);
        for (int64_t j = whole; j < C; ++j) Tile<T>::moments1(x, C, r0, r1, j, mine + j);
      }
    }
  });
  for (int64_t t = 0; t < rbk.tasks; ++t)
    for (int64_t c = 0; c < C; ++c) out[c].merge(part[t * C + c]);
  return out;
}

// Per-channel S1 = sum(dy) and S2 = sum(dy * (x - mean)), in double, merged in a fixed order.
template <typename T>
void channel_grad_sums(const T* dy, const T* x, const BnShape& sh, const acc_t<T>* mean,
                       std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t C = sh.c;
  s1.assign(C, 0);
  s2.assign(C, 0);
  if (!sh.channels_last) {
    const Planar pl(sh);
    const std::vector<Sum2> sums = planar_reduce<Sum2>(pl, [&](int64_t u) {
      return span_grad_sums(dy + pl.offset(u), x + pl.offset(u), pl.length(u),
                            mean[pl.channel(u)]);
    });
    for (int64_t c = 0; c < C; ++c) {
      s1[c] = sums[c].sd;
      s2[c] = sums[c].sdd;
    }
    return;
  }
  const RowBlocks rbk(sh.n * sh.s);
  const int64_t whole = C - C % Tile<T>::kWidth;
  std::vector<double> part(rbk.tasks * 2 * C, 0.0);
  at::parallel_for(0, rbk.tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      double* p1 = part.data() + t * 2 * C;
      double* p2 = p1 + C;
      for (int64_t b = rbk.first_block(t); b < rbk.first_block(t + 1); ++b) {
        const int64_t r0 = rbk.row0(b), r1 = rbk.row1(b);
        for (int64_t j = 0; j < whole; j += Tile<T>::kWidth)
          Tile<T>::grad_sums(dy, x, C, r0, r1, j, mean, p1, p2);
        for (int64_t j = whole; j < C; ++j) Tile<T>::grad_sums1(dy, x, C, r0, r1, j, mean, p1, p2);
      }
    }
  });
  for (int64_t t = 0; t < rbk.tasks; ++t)
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += part[t * 2 * C + c];
      s2[c] += part[t * 2 * C + C + c];
    }
}

// out = a[c] * g + b[c] * (x - m[c]) + k[c] elementwise, with g or x possibly absent (see Rows).
template <typename T>
void channel_apply(const T* g, const T* x, T* out, const BnShape& sh, const acc_t<T>* a,
                   const acc_t<T>* b, const acc_t<T>* m, const acc_t<T>* k) {
  const int64_t C = sh.c;
  if (!sh.channels_last) {
    const Planar pl(sh);
    at::parallel_for(0, pl.units, std::max<int64_t>(1, 16384 / std::max<int64_t>(sh.s, 1)),
                     [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t c = pl.channel(u), off = pl.offset(u), len = pl.length(u);
        if (g == nullptr)
          span_affine(x + off, out + off, len, m[c], b[c], k[c]);
        else
          span_dx(g + off, x == nullptr ? nullptr : x + off, out + off, len, a[c],
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
      const std::vector<Moments> mo = channel_moments(x.const_data_ptr<scalar_t>(), sh);
      for (int64_t c = 0; c < C; ++c) {
        mean[c] = mo[c].mean;
        var[c] = mo[c].var();
      }
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
      const double sc = wp ? wp[c] * invstd : invstd;
      sm[c] = m[c] = static_cast<A>(mean[c]);
      si[c] = static_cast<A>(invstd);
      if (training) batch_var.mutable_data_ptr<A>()[c] = static_cast<A>(var[c]);
      scale[c] = static_cast<A>(sc);
      // y = (x - m) * scale + shift, where m is the mean rounded to A; the rounding error
      // (mean - m) is folded into the shift so large offsets lose nothing.
      shift[c] = static_cast<A>((bp ? bp[c] : 0.0) - (mean[c] - static_cast<double>(m[c])) * sc);
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
    if (mask[1])  // an empty batch sums nothing: 0, even where invstd is Inf (eps = 0)
      for (int64_t c = 0; c < C; ++c)
        dw.mutable_data_ptr<A>()[c] = n > 0 ? static_cast<A>(s2[c] * invstd[c]) : A(0);
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
