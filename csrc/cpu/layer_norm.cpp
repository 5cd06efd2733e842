// LayerNorm on the CPU, over rows: x is viewed as (M, N) with N the product of normalized_shape.
//   forward, per row: mean and biased var (two passes, vec_utils.h), rstd = 1 / sqrt(var + eps),
//     y = (x - mean) * rstd * weight + bias;
//   backward, per row, with xhat = (x - mean) * rstd and g = weight * dy:
//     dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
//   and per element over all rows: dweight = sum(dy * xhat), dbias = sum(dy).
// Work split: rows are independent and go to threads in ranges (at::parallel_for). The column
// sums of the backward use at most kBlocks fixed row blocks, each summing its rows into its own
// buffer; the blocks are then added in order, so results do not depend on the thread count.
// With few long rows those buffers would rival the input in size: the column sums then take a
// second pass, parallel over tiles of columns, each column summing its rows in order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common.h"
#include "cpu/output_cache.h"
#include "cpu/kernels.h"
#include "cpu/vec_utils.h"

namespace normext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBlocks = 64;
// A row whose mean is within kFoldOffset standard deviations of 0 is normalized in the folded
// form xhat = x * rstd + beta (beta = -mean * rstd), one operation a vector less than
// (x - mean) * rstd + lo: x * rstd then exceeds xhat's own scale by at most that factor, so its
// rounding adds at most a few units in the last place. Farther out, x * rstd and beta cancel.
// Measured, interleaved in one process, 2 threads: float32 (4096, 768) forward 0.57 -> 0.52 ms,
// (4096, 1024) 1.18 -> 1.08; bfloat16 (4096, 1024) 1.00 -> 0.93, (1024, 4096) 0.86 -> 0.80.
constexpr double kFoldOffset = 8.0;
constexpr int64_t kBlockValues = 16384;  // a row block of the backward's sums holds at least these
constexpr int64_t kMaxPartial = int64_t{1} << 24;  // fused backward's partial sums (see below)
constexpr int64_t kColTile = 1024;                   // columns per task in column_sums
constexpr int64_t kKeptBytes = 8 << 20;  // block sums up to this size reuse a kept buffer

// Scratch for n values of the backward's block sums. Up to kKeptBytes it is a buffer the calling
// thread keeps between calls: a fresh buffer of a few MB comes back from the kernel as new pages
// on every call (glibc returns large freed blocks), and faulting them in cost more than the
// sums themselves ((1024, 4096) float32: 2 MB, 512 page faults per call). Larger ones are
// allocated (into `owned`) and freed with the call. The contents are never read before they
// are written, so the reuse cannot leak one call's values into another.
template <typename A>
A* block_sums_scratch(int64_t n, std::unique_ptr<A[]>& owned) {
  if (n * static_cast<int64_t>(sizeof(A)) > kKeptBytes) {
    owned.reset(new A[n]);
    return owned.get();
  }
  thread_local std::unique_ptr<A[]> kept;
  thread_local int64_t kept_n = 0;
  if (kept_n < n) {
    kept.reset(new A[n]);
    kept_n = n;
  }
  return kept.get();
}

// Whether a pass over M rows of N values writes its output rows with non-temporal stores
// (stream_output in vec_utils.h): `arrays` arrays of M * N values are touched (x and y; x, dy
// and dx) and every output row starts aligned.
inline bool ln_stream(int64_t M, int64_t N, int64_t arrays, int64_t elem_size, const void* out) {
  return stream_rows(arrays * M * N * elem_size, N * elem_size, out);
}

// A row's forward constants, from its moments: the saved mean and rstd (rounded to A), lo and
// beta (see RowFwdBody), whether the row takes the folded form (within kFoldOffset), and
// whether it rounds without the NaN check (finite_all in vec_utils.h; wb_finite: weight and bias
// finite).
template <typename A>
struct RowConsts {
  A mean, rstd, lo, beta;
  bool folded, no_nan;
};
template <typename A>
inline RowConsts<A> row_consts(const Moments& mo, double eps, bool wb_finite) {
  const double m = mo.mean, rs = 1.0 / std::sqrt(mo.var() + eps);
  RowConsts<A> k;
  k.mean = static_cast<A>(m);
  k.rstd = static_cast<A>(rs);
  k.lo = static_cast<A>(-(m - static_cast<double>(k.mean)) * rs);
  k.beta = static_cast<A>(-m * static_cast<double>(k.rstd));
  k.folded = std::fabs(m) * rs <= kFoldOffset;
  k.no_nan = wb_finite && finite_all(k.mean, k.rstd, k.lo, k.beta);
  return k;
}

// y = xhat * w + b over one row, w or b given (the other may be null), with xhat = (x - mean) *
// rstd + lo, where lo = -(the mean's rounding error) * rstd corrects for the mean being rounded
// to acc_t (large offsets); or, Folded (a row within kFoldOffset), xhat = x * rstd + beta. A
// Sidecar body (vec_utils.h): whole steps from the row's start (w and b are in lane order,
// to_lane_order in vec_utils.h, a whole step at a time), the tail value by value. NT: y is
// written with non-temporal stores (y must then be kStreamAlign-aligned; see ln_stream). NoNan:
// rounded without the NaN check (finite_all in vec_utils.h).
template <typename T, bool NT, bool NoNan, bool Folded>
struct RowFwdBody {
  using P = VecPair<T>;
  using A = acc_t<T>;
  using V = typename P::V;
  static constexpr bool kOverlapTail = false;  // w and b: lane order holds for whole steps only
  const T* x;
  T* out;
  const A* w;
  const A* b;
  A mean, rstd, lo;
  V vm, vr, vc;  // vc: lo, or beta where Folded
  NORMEXT_INLINE RowFwdBody(const T* x_, T* out_, const A* w_, const A* b_, A mean_, A rstd_,
                            A lo_, A beta)
      : x(x_), out(out_), w(w_), b(b_), mean(mean_), rstd(rstd_), lo(lo_), vm(mean_), vr(rstd_),
        vc(Folded ? beta : lo_) {}
  NORMEXT_INLINE V xhat(const V& v) const {
    if constexpr (Folded)
      return at::vec::fmadd(v, vr, vc);
    else
      return at::vec::fmadd(v - vm, vr, vc);
  }
  template <bool S, bool NN>
  NORMEXT_INLINE void put(int64_t j) const {
    const int64_t h = V::size();
    V a, c;
    P::load_lanes(x + j, a, c);
    const V w0 = w ? V::loadu(w + j) : V(A(1)), w1 = w ? V::loadu(w + j + h) : V(A(1));
    const V b0 = b ? V::loadu(b + j) : V(A(0)), b1 = b ? V::loadu(b + j + h) : V(A(0));
    P::template put_lanes<S, NN>(out + j, at::vec::fmadd(xhat(a), w0, b0),
                                 at::vec::fmadd(xhat(c), w1, b1));
  }
  NORMEXT_INLINE void step(int64_t j) const { put<NT, NoNan>(j); }
  NORMEXT_INLINE void last(int64_t j) const { put<false, false>(j); }  // (unused: no overlap)
  NORMEXT_INLINE void one(int64_t j) const {
    A v = (static_cast<A>(x[j]) - mean) * rstd + lo;
    if (w) v *= w[j];
    if (b) v += b[j];
    out[j] = static_cast<T>(v);
  }
};

// y over one row: RowFwdBody where w or b is given, else the plain xhat (span_scale_shift or
// span_affine). beta: null, or the folded constant.
template <typename T, bool NT = false, bool NoNan = false>
inline void row_forward(const T* x, T* y, int64_t n, acc_t<T> mean, acc_t<T> rstd, acc_t<T> lo,
                        const acc_t<T>* beta, const acc_t<T>* w, const acc_t<T>* b) {
  if (w == nullptr && b == nullptr) {
    if (beta)
      span_scale_shift<T, NT, NoNan>(x, y, n, rstd, *beta);
    else
      span_affine<T, NT, NoNan>(x, y, n, mean, rstd, lo);
    return;
  }
  auto run = [&](auto folded) {
    using Body = RowFwdBody<T, NT, NoNan, decltype(folded)::value>;
    Sidecar<T, NT, Body>(Body(x, y, w, b, mean, rstd, lo, beta ? *beta : acc_t<T>(0)), n)
        .finish();
  };
  if (beta)
    run(std::true_type{});
  else
    run(std::false_type{});
}

// lo = -(mean(x) - mean) * rstd for one row: the saved mean is the row mean rounded to acc_t,
// and xhat = (x - mean) * rstd + lo undoes that rounding, as the forward does (with mean 1e2 and
// std 1e-2 in float32 the rounding alone moves xhat by up to 4e-4). x - mean is small and
// exact for values near the mean, so a float sum of it is accurate.
template <typename T>
inline acc_t<T> row_shift(const T* x, int64_t n, acc_t<T> mean, acc_t<T> rstd) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  const V vm(mean);
  V s0(A(0)), s1(A(0));
  int64_t j = 0;
  for (; j + P::kStep <= n; j += P::kStep) {
    V x0, x1;
    P::load_lanes(x + j, x0, x1);
    s0 += x0 - vm;
    s1 += x1 - vm;
  }
  A sd = hsum(s0 + s1);
  for (; j < n; ++j) sd += static_cast<A>(x[j]) - mean;
  return n > 0 ? -(sd / static_cast<A>(n)) * rstd : A(0);
}

// The constants of one row's dx (rows_backward): mean(g), mean(g * xhat) with g = weight * dy,
// and lo, xhat's correction (row_shift).
template <typename A>
struct RowGrad {
  A c1 = 0, c2 = 0, lo = 0;
};

// Pass 1 of rows_backward over one row: the sums of g, g * (x - mean) * rstd and x - mean, as
// RowGrad. A step of `side` (Sidecar) goes along with each whole step.
template <typename T, typename Side = NoSide>
NORMEXT_INLINE RowGrad<acc_t<T>> row_grad(const T* dy, const T* x, int64_t n, acc_t<T> mean,
                                          acc_t<T> rstd, const acc_t<T>* w,
                                          Side&& side_ = NoSide{}) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  std::remove_reference_t<Side> side = side_;  // a local: see pass2_lanes in vec_utils.h
  const V vm(mean), vr(rstd);
  const int64_t h = V::size();
  V sg0(A(0)), sg1(A(0)), sgx0(A(0)), sgx1(A(0)), sd0(A(0)), sd1(A(0));
  int64_t j = 0;
  for (; j + P::kStep <= n; j += P::kStep) {
    side.step();
    V g0, g1, x0, x1;
    P::load_lanes(dy + j, g0, g1);
    P::load_lanes(x + j, x0, x1);
    if (w) {
      g0 = g0 * V::loadu(w + j);
      g1 = g1 * V::loadu(w + j + h);
    }
    x0 = x0 - vm;
    x1 = x1 - vm;
    sd0 += x0;
    sd1 += x1;
    sg0 += g0;
    sg1 += g1;
    sgx0 = at::vec::fmadd(g0, x0 * vr, sgx0);
    sgx1 = at::vec::fmadd(g1, x1 * vr, sgx1);
  }
  side_.i = side.i;
  A sg = hsum(sg0 + sg1), sgx = hsum(sgx0 + sgx1), sd = hsum(sd0 + sd1);
  for (; j < n; ++j) {
    A g = static_cast<A>(dy[j]) * (w ? w[j] : A(1));
    const A d = static_cast<A>(x[j]) - mean;
    sd += d;
    sg += g;
    sgx += g * d * rstd;
  }
  RowGrad<A> r;
  r.lo = -(sd / static_cast<A>(n)) * rstd;
  r.c1 = sg / static_cast<A>(n);
  r.c2 = (sgx + r.lo * sg) / static_cast<A>(n);  // sum(g * (xh + lo)) = sgx + lo * sum(g)
  return r;
}

// Pass 2 of rows_backward, as a Sidecar body: dx (where out is not null) and the column sums
// dw_sum += dy * xhat, db_sum += dy (where not null; `first` stores them instead, so the sums
// need no zeroing beforehand). No overlapping tail step: the sums must see each value once.
template <typename T, bool NT, bool NoNan>
struct RowDxBody {
  using P = VecPair<T>;
  using A = acc_t<T>;
  using V = typename P::V;
  static constexpr bool kOverlapTail = false;
  const T* dy;
  const T* x;
  T* out;
  A mean, rstd;
  RowGrad<A> k;
  const A* w;
  A* dw_sum;
  A* db_sum;
  bool first;
  V vm, vr, vc1, vc2, vlo;
  NORMEXT_INLINE RowDxBody(const T* dy_, const T* x_, T* out_, A mean_, A rstd_, RowGrad<A> k_,
                           const A* w_, A* dw_sum_, A* db_sum_, bool first_)
      : dy(dy_), x(x_), out(out_), mean(mean_), rstd(rstd_), k(k_), w(w_), dw_sum(dw_sum_),
        db_sum(db_sum_), first(first_), vm(mean_), vr(rstd_), vc1(k_.c1), vc2(k_.c2),
        vlo(k_.lo) {}
  NORMEXT_INLINE void one(int64_t j) const {
    const A d = static_cast<A>(dy[j]);
    const A xh = (static_cast<A>(x[j]) - mean) * rstd + k.lo;
    if (out != nullptr) out[j] = static_cast<T>(rstd * (d * (w ? w[j] : A(1)) - k.c1 - xh * k.c2));
    if (dw_sum != nullptr) dw_sum[j] = (first ? A(0) : dw_sum[j]) + d * xh;
    if (db_sum != nullptr) db_sum[j] = (first ? A(0) : db_sum[j]) + d;
  }
  NORMEXT_INLINE void step(int64_t j) const {
    const int64_t h = V::size();
    V d0, d1, x0, x1;
    P::load_lanes(dy + j, d0, d1);
    P::load_lanes(x + j, x0, x1);
    const V xh0 = at::vec::fmadd(x0 - vm, vr, vlo), xh1 = at::vec::fmadd(x1 - vm, vr, vlo);
    if (out != nullptr) {
      V g0 = d0, g1 = d1;
      if (w) {
        g0 = g0 * V::loadu(w + j);
        g1 = g1 * V::loadu(w + j + h);
      }
      P::template put_lanes<NT, NoNan>(out + j, vr * (g0 - vc1 - xh0 * vc2),
                                       vr * (g1 - vc1 - xh1 * vc2));
    }
    if (dw_sum != nullptr) {
      const V z(A(0));
      at::vec::fmadd(d0, xh0, first ? z : V::loadu(dw_sum + j)).store(dw_sum + j);
      at::vec::fmadd(d1, xh1, first ? z : V::loadu(dw_sum + j + h)).store(dw_sum + j + h);
    }
    if (db_sum != nullptr) {
      if (first) {
        d0.store(db_sum + j);
        d1.store(db_sum + j + h);
      } else {
        (V::loadu(db_sum + j) + d0).store(db_sum + j);
        (V::loadu(db_sum + j + h) + d1).store(db_sum + j + h);
      }
    }
  }
  NORMEXT_INLINE void last(int64_t) const {}  // never called (kOverlapTail)
};

// dx for rows [r0, r1) of n values (dy, x, dx at row r: + r * n; dx may be null), and their
// dy * xhat and dy added into the column sums dw_sum, db_sum (where not null; row r0 stores
// them, see RowDxBody). NT: dx is written with non-temporal stores (every row of dx must then
// be kStreamAlign-aligned). Each row takes two passes: its sums (row_grad, from memory), then
// its dx and column sums (from L1/L2). With dx, in float32 and float64, the second pass of a
// row runs in the same loop as the first of the next (a Sidecar), so that the stores of one
// drain while the other computes. Measured, raw backward ops, 2 threads, cache flushed before
// each call, medians of 40 (rows one after the other -> one loop), outputs bitwise the same:
// float32 (4096, 768) 2.03 -> 1.86 ms, (4096, 1024) 2.00 -> 1.76, (1024, 4096) 3.08 -> 2.79,
// (512, 8192) 2.96 -> 2.66; float64 (4096, 1024) 5.62 -> 5.04, (1024, 4096) 5.58 -> 4.57. With
// bfloat16 it was level or slower ((1024, 4096) 3.03 -> 3.17), float16 11-13% slower: with the
// conversions of both passes in one loop, the vector registers ran out.
// Where rows are at most kRowPrefetchBytes, the row after the next is prefetched as the next is
// summed (as rows_forward does for any length). Measured the same way (without -> with):
// float32 (4096, 768) 1.125 -> 0.997, 1.706 -> 1.605 and 1.068 -> 0.948 ms in three runs,
// (4096, 1024) 1.903 -> 1.706 and 1.804 -> 1.703; float64 (4096, 768) 3.098 -> 3.003. Longer
// rows measured level or slower with it: float32 (1024, 4096) 1.906 -> 1.908, (512, 8192)
// 2.389 -> 2.568 and 2.406 -> 2.533; float64 (4096, 1024) 4.078 -> 4.167, (1024, 4096) 4.631
// -> 4.718.
// Without dx, lo comes from row_shift (dweight only) and the rows go one by one.
// NoNan per row where the weight is finite (w_finite) and so are the row's mean and rstd (see
// finite_all in vec_utils.h). w and the column sums are in lane order (to_lane_order).
constexpr int64_t kRowPrefetchBytes = 4096;
template <typename T, bool NT>
void rows_backward(const T* dy, const T* x, T* dx, int64_t r0, int64_t r1, int64_t n,
                   const acc_t<T>* mean, const acc_t<T>* rstd, const acc_t<T>* w, bool w_finite,
                   acc_t<T>* dw_sum, acc_t<T>* db_sum) {
  using A = acc_t<T>;
  if (r0 >= r1) return;
  if (dx == nullptr) {
    for (int64_t r = r0; r < r1; ++r) {
      RowGrad<A> k;
      if (dw_sum != nullptr) k.lo = row_shift(x + r * n, n, mean[r], rstd[r]);
      Sidecar<T, false, RowDxBody<T, false, false>>(
          {dy + r * n, x + r * n, nullptr, mean[r], rstd[r], k, w, dw_sum, db_sum, r == r0}, n)
          .finish();
    }
    return;
  }
  // one loop for the two passes where the values need no conversion (float32, float64)
  constexpr bool kOneLoop = std::is_same_v<T, A>;
  // the row after next prefetched while the next is summed: rows of at most kRowPrefetchBytes
  const bool prefetch = kOneLoop && n * int64_t(sizeof(T)) <= kRowPrefetchBytes;
  RowGrad<A> k = row_grad(dy + r0 * n, x + r0 * n, n, mean[r0], rstd[r0], w);
  for (int64_t r = r0; r < r1; ++r) {
    with_no_nan<T>(w_finite && finite_all(mean[r], rstd[r]), [&](auto nn) {
      constexpr bool NN = decltype(nn)::value;
      const int64_t q = r + 1;  // the next row
      const bool pf = prefetch && q + 1 < r1;
      Sidecar<T, NT, RowDxBody<T, NT, NN>> side(
          {dy + r * n, x + r * n, dx + r * n, mean[r], rstd[r], k, w, dw_sum, db_sum, r == r0},
          n, pf ? dy + (q + 1) * n : nullptr, pf ? x + (q + 1) * n : nullptr);
      if (kOneLoop && q < r1) k = row_grad(dy + q * n, x + q * n, n, mean[q], rstd[q], w, side);
      side.finish();
      if (!kOneLoop && q < r1) k = row_grad(dy + q * n, x + q * n, n, mean[q], rstd[q], w);
    });
  }
}

// dweight = sum(dy * xhat) and dbias = sum(dy) over the M rows, by columns: threads take tiles
// of kColTile columns, and each column sums its rows in order, in double (the unfused path).
template <typename T>
void column_sums(const T* dy, const T* x, int64_t M, int64_t N, const acc_t<T>* mean,
                 const acc_t<T>* rstd, acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  std::vector<A> lo(dw != nullptr ? M : 0);  // xhat's per-row correction (row_shift)
  if (dw != nullptr)
    at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(N, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) lo[r] = row_shift(x + r * N, N, mean[r], rstd[r]);
    });
  const int64_t tiles = (N + kColTile - 1) / kColTile;
  at::parallel_for(0, tiles, serial_grain(tiles, M * N), [&](int64_t t0, int64_t t1) {
    std::vector<double> sw(kColTile), sb(kColTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kColTile, n = std::min(kColTile, N - j0);
      std::fill(sw.begin(), sw.end(), 0.0);
      std::fill(sb.begin(), sb.end(), 0.0);
      for (int64_t r = 0; r < M; ++r) {
        const T* g = dy + r * N + j0;
        const T* xr = x + r * N + j0;
        const A m = mean[r], rs = rstd[r], l = dw != nullptr ? lo[r] : A(0);
        for (int64_t j = 0; j < n; ++j) {
          const A d = static_cast<A>(g[j]);
          sw[j] += d * ((static_cast<A>(xr[j]) - m) * rs + l);
          sb[j] += d;
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        if (dw != nullptr) dw[j0 + j] = static_cast<A>(sw[j]);
        if (db != nullptr) db[j0 + j] = static_cast<A>(sb[j]);
      }
    }
  });
}

// Rows [r0, r1) of the forward, w or b given: each row's moments (span_moments: pass 1 reads
// it from memory, pass 2 from L1), then its y (row_forward's RowFwdBody, from L1). The y of a
// row runs in the same loop as the next row's first pass (a Sidecar: its stores drain while the
// sums compute, as in rows_backward and the fused BatchNorm passes), with the row after that
// prefetched as it goes. Each value gets the same arithmetic as row by row, so the outputs are
// the same. Measured, raw forward ops, 2 threads, cache flushed before each call, medians of
// 40, interleaved in one process (rows one by one -> one loop; outputs bitwise the same):
// float32 (4096, 768) 1.064 -> 0.861 ms, (4096, 1024) 1.758 -> 1.355, (1024, 4096) 1.672 ->
// 1.363, (512, 8192) 1.642 -> 1.287 (without the prefetch: 0.883, 1.468, 1.426 for the three);
// float64 (4096, 768) 2.70 -> 2.21, (1024, 4096) 3.50 -> 2.96, warm (1024, 1024) 0.895 ->
// 0.764. bfloat16 and float16 keep the rows one by one: warm (1024, 1024) went 0.188 -> 0.229
// ms and 0.324 -> 0.385 (with both passes' conversions in one loop the vector registers run out,
// as in the backward), though flushed (1024, 4096) went 0.997 -> 0.906 and 1.195 -> 0.990.
template <typename T, bool NT>
void rows_forward(const T* x, T* y, int64_t r0, int64_t r1, int64_t n, double eps,
                  acc_t<T>* mean, acc_t<T>* rstd, const acc_t<T>* w, const acc_t<T>* b,
                  bool wb_finite) {
  using A = acc_t<T>;
  if (r0 >= r1) return;
  Moments mo = span_moments(x + r0 * n, n);
  for (int64_t r = r0; r < r1; ++r) {
    const RowConsts<A> k = row_consts<A>(mo, eps, wb_finite);
    mean[r] = k.mean;
    rstd[r] = k.rstd;
    const int64_t q = r + 1;  // the next row
    const T* pf = q + 1 < r1 ? x + (q + 1) * n : nullptr;
    auto run = [&](auto folded, auto nn) {
      using Body = RowFwdBody<T, NT, decltype(nn)::value, decltype(folded)::value>;
      Sidecar<T, NT, Body> side(Body(x + r * n, y + r * n, w, b, k.mean, k.rstd, k.lo, k.beta),
                                n, pf);
      if (q < r1) mo = span_moments(x + q * n, n, side);
      side.finish();
    };
    with_no_nan<T>(k.no_nan, [&](auto nn) {
      if (k.folded)
        run(std::true_type{}, nn);
      else
        run(std::false_type{}, nn);
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& input, int64_t normalized_ndim, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  const LnShape ln =
      check_ln_fwd_args(input, normalized_ndim, weight, bias, "normext::layer_norm_fwd");
  const int64_t axis = ln.axis, M = ln.m, N = ln.n;
  const auto acc = acc_dtype(input.scalar_type());
  at::Tensor x = input.contiguous();
  at::Tensor y = empty_output(x, false);
  at::Tensor mean = at::empty(x.sizes().slice(0, axis), x.options().dtype(acc));
  at::Tensor rstd = at::empty(x.sizes().slice(0, axis), x.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    A* mp = mean.mutable_data_ptr<A>();
    A* rp = rstd.mutable_data_ptr<A>();
    const LaneParam<scalar_t> wl(weight, N), bl(bias, N);
    const A* wp = wl.ptr;
    const A* bp = bl.ptr;
    // weight and bias finite: rows whose own constants are finite round without the NaN check
    const bool wb_finite = (!wp || all_finite(N, wp)) && (!bp || all_finite(N, bp));
    with_stream(ln_stream(M, N, 2, sizeof(scalar_t), yp), [&](auto nt) {
      at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(N, 1)),
                       [&](int64_t r0, int64_t r1) {
        if constexpr (std::is_same_v<scalar_t, A>) {  // float32, float64: see rows_forward
          if (wp || bp) {
            rows_forward<scalar_t, decltype(nt)::value>(xp, yp, r0, r1, N, eps, mp, rp, wp, bp,
                                                        wb_finite);
            stream_fence();
            return;
          }
        }
        for (int64_t r = r0; r < r1; ++r) {
          const RowConsts<A> k = row_consts<A>(span_moments(xp + r * N, N), eps, wb_finite);
          mp[r] = k.mean;
          rp[r] = k.rstd;
          with_no_nan<scalar_t>(k.no_nan, [&](auto nn) {
            row_forward<scalar_t, decltype(nt)::value, decltype(nn)::value>(
                xp + r * N, yp + r * N, N, k.mean, k.rstd, k.lo, k.folded ? &k.beta : nullptr, wp,
                bp);
          });
        }
        stream_fence();
      });
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, int64_t normalized_ndim,
    const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    std::array<bool, 3> mask) {
  const LnShape ln = check_ln_bwd_args(grad_out, input, normalized_ndim, mean, rstd, weight,
                                       "normext::layer_norm_bwd");
  const int64_t axis = ln.axis, M = ln.m, N = ln.n;
  const auto acc = acc_dtype(input.scalar_type());
  at::Tensor x = input.contiguous(), dy = grad_out.contiguous();
  at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor dx =
      mask[0] ? empty_output(x, false) : at::empty({0}, x.options());
  auto param_shape = x.sizes().slice(axis);
  at::Tensor dw = mask[1] ? at::empty(param_shape, x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  at::Tensor db = mask[2] ? at::empty(param_shape, x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    const A* mp = mean_c.const_data_ptr<A>();
    const A* rp = rstd_c.const_data_ptr<A>();
    const LaneParam<scalar_t> wl(weight, N);
    const A* wp = wl.ptr;
    // weight finite: rows with a finite mean and rstd round dx without the NaN check (the row's
    // other constants are sums of its values: finite_all in vec_utils.h)
    const bool w_finite = !wp || all_finite(N, wp);
    const bool sums = mask[1] || mask[2];
    // At most kBlocks row blocks, and no more than one per kBlockValues values: a (64, 768)
    // backward with a block per row built 393 KB of partials, fresh pages from the kernel on
    // every call (190 us, torch 41 us); with 3 blocks they are 18 KB.
    const int64_t blocks =
        sums ? std::clamp<int64_t>(M * N / kBlockValues, 1, std::max<int64_t>(1, std::min(M, kBlocks)))
             : 1;
    // The fused pass keeps 2N partial sums per row block: with few long rows (a block per row)
    // that is twice the input's size in floats. Past kMaxPartial of them, and more than half as
    // many as the input has values, the sums take their own column-parallel pass instead.
    // (No rows: column_sums writes the zeros.)
    const bool fused =
        sums && M > 0 && blocks * 2 * N <= std::max<int64_t>(kMaxPartial, M * N / 2);
    // Not zeroed: each block's first row stores its sums (zeroing them here took a serial
    // memset of up to 4 MB, and one more write of them).
    std::unique_ptr<A[]> owned;
    A* part = fused ? block_sums_scratch<A>(blocks * 2 * N, owned) : nullptr;
    auto rows = [&](auto nt) {
      constexpr bool NT = decltype(nt)::value;
      auto body = [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          A* dws = mask[1] ? part + blk * 2 * N : nullptr;
          A* dbs = mask[2] ? part + blk * 2 * N + N : nullptr;
          rows_backward<scalar_t, NT>(gp, xp, dxp, blk * M / blocks, (blk + 1) * M / blocks, N,
                                      mp, rp, wp, w_finite, dws, dbs);
        }
        stream_fence();
      };
      if (fused) {
        at::parallel_for(0, blocks, serial_grain(blocks, M * N), body);
      } else if (dxp != nullptr) {
        at::parallel_for(0, M, std::max<int64_t>(1, 8192 / N), [&](int64_t r0, int64_t r1) {
          rows_backward<scalar_t, NT>(gp, xp, dxp, r0, r1, N, mp, rp, wp, w_finite, nullptr,
                                      nullptr);
          stream_fence();
        });
      }
    };
    if (N > 0 && M > 0)
      with_stream(dxp != nullptr && ln_stream(M, N, 3, sizeof(scalar_t), dxp), rows);
    if (sums && !fused)
      column_sums(gp, xp, M, N, mp, rp, mask[1] ? dw.mutable_data_ptr<A>() : nullptr,
                  mask[2] ? db.mutable_data_ptr<A>() : nullptr);
    if (fused) {
      A* dwp = mask[1] ? dw.mutable_data_ptr<A>() : nullptr;
      A* dbp = mask[2] ? db.mutable_data_ptr<A>() : nullptr;
      // Each column adds its blocks' partials in block order, in double; a tile of columns at
      // a time, so the loads run along the partials' rows (contiguous), not down a column.
      constexpr int64_t kTile = 256;
      static_assert(kTile % VecPair<scalar_t>::kStep == 0);
      const int64_t tiles = (N + kTile - 1) / kTile;
      at::parallel_for(0, tiles, serial_grain(tiles, blocks * N), [&](int64_t t0, int64_t t1) {
        double sw[kTile], sb[kTile];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t j0 = t * kTile, n = std::min(kTile, N - j0);
          std::fill(sw, sw + n, 0.0);
          std::fill(sb, sb + n, 0.0);
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const A* pw = part + blk * 2 * N + j0;
            const A* pb = pw + N;
            if (dwp)
              for (int64_t j = 0; j < n; ++j) sw[j] += pw[j];
            if (dbp)
              for (int64_t j = 0; j < n; ++j) sb[j] += pb[j];
          }
          // the partials are in lane order (rows_backward); kTile is a multiple of kStep, so a
          // tile holds whole lane blocks (and a step is whole in the tile where it is in the row)
          if (dwp) lane_order_from<scalar_t>(sw, n, dwp + j0);
          if (dbp) lane_order_from<scalar_t>(sb, n, dbp + j0);
        }
      });
    }
  });
  return {dx, dw, db};
}

}  // namespace CPU_CAPABILITY
}  // namespace normext::cpu
