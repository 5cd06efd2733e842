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
//                   channels or ranges of units in memory order (planar_reduce says when);
//                   results merge per channel in order of n, then of task. Long planes with a
//                   channel of at most kFuseBytes run fused instead (fused_planar,
//                   fused_channels): each channel cut into parts of planes that threads share,
//                   the parts merged in part order.
//   channels-last:  blocks of rows (about 256 KB each) of groups of up to 1024 channels, grouped
//                   into at most kTasks tasks by shape alone; rows stream past in memory order
//                   with per-channel accumulators in L1; task results merge per channel in task
//                   order.
// Both merge orders depend only on the shape, so results are bitwise reproducible whatever the
// number of threads. Training forward reads x twice (statistics, then y) and backward reads
// x and dy twice (sums, then dx), from memory unless the pass is fused (then once).
#include <ATen/Dispatch.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include "common.h"
#include "cpu/output_cache.h"
#include "cpu/kernels.h"
#include "cpu/vec_utils.h"

namespace normext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kTasks = 64;
// The folded output (span_scale_shift, Rows::scale_shift) is used where |mean| <= kFoldOffset
// standard deviations: x * alpha then exceeds the output's own scale by at most that factor, so
// its rounding adds at most a few units in the last place (torch folds unconditionally).
constexpr double kFoldOffset = 8.0;
// The backward folds too, for 16-bit types in training, NCHW, where every channel's mean is
// within kFoldOffset standard deviations of 0: its sums take dy * x and then take mean * sum(dy)
// off (span_grad_sums and planes_grad_sums with Fold), and dx = a * dy + b * x + (k - b * mean)
// (DxBody, DxFoldOp). Each drops a subtraction a vector from loops that are bound by their
// arithmetic when the machine is. Measured, raw bf16 backward, interleaved in one process,
// inputs warm, medians of 40-60; in an hour when this machine ran slow: (32, 256, 14, 14)
// 0.278 -> 0.255 ms and 0.284 -> 0.264, (32, 512, 7, 7) 0.371 -> 0.336, (32, 64, 56, 56)
// 2.33 -> 2.22; in a fast one, 14 x 14 and 7 x 7 level (0.336 -> 0.341, 0.352 -> 0.352,
// 0.220 -> 0.214), 56 x 56 0.938 -> 0.878. float16: 14 x 14 level, 56 x 56 1.359 -> 1.325.
// float32 measured level (0.950 -> 0.954 ms at 14 x 14: its loops wait on memory) and keeps the
// unfolded form. For 16-bit types the fold costs nothing visible: their dx rounds to 8 or 11
// bits, where the fold adds a few units in float's last place of |b * x| (at most kFoldOffset
// and a few times |b * (x - mean)|).
// Non-finite values: a NaN or Inf in x makes its channel's mean one, and nothing folds. One in
// dy makes its channel's sum(dy) one, and there the two forms part: sum(dy * x) - mean * sum(dy)
// can be Inf - Inf where sum(dy * (x - mean)) is an Inf, and b * x + (k - b * mean) NaN where
// b * (x - mean) + k is an Inf of the sign of x - mean. So a channel whose folded sums are not
// both finite is summed and written again unfolded (unfold_channel), as torch gives it.
template <typename T>
constexpr bool kFoldBackward = sizeof(T) == 2;
template <typename T, typename A>
bool fold_backward(const BnShape& sh, bool training, const A* mean, const A* invstd) {
  if (!kFoldBackward<T> || !training || sh.channels_last) return false;
  for (int64_t c = 0; c < sh.c; ++c)  // NaN fails too
    if (!(std::fabs(static_cast<double>(mean[c])) * static_cast<double>(invstd[c]) <=
          kFoldOffset))
      return false;
  return true;
}

// ---- work units -------------------------------------------------------------------------------
//
// planar: the N*C planes of S values are cut into segments of at most kSeg values, so that a
//   few huge planes still spread over all threads; unit u is segment u % segs of plane u / segs.
// channels-last: R = N*S rows of C values. The columns are cut into groups of at most
//   kGroupCols (a group's per-column accumulators stay in L1), the rows into blocks of rb rows
//   holding about kBlockBytes of a group (a block stays in L2 between the two statistics passes;
//   after a task's first block, its running means are the shifts and one pass suffices).
//   The blocks go to at most kTasks tasks (of at least kBlocksPerTask blocks where there are
//   that many), contiguous in row order; a work unit is one task's
//   blocks for one column group, walked in row order.
// Both depend on the shape (and the element size) alone.

constexpr int64_t kSeg = 1 << 16;
constexpr int64_t kGroupCols = 1024;
constexpr int64_t kBlockBytes = 256 << 10;
constexpr int64_t kBlocksPerTask = 4;  // so most blocks take one pass (running shifts)

struct Planar {
  int64_t N, S, C, segs, units;
  explicit Planar(const BnShape& sh)
      : N(sh.n), S(sh.s), C(sh.c), segs(std::max<int64_t>(1, (sh.s + kSeg - 1) / kSeg)),
        units(sh.n * sh.c * segs) {}
  // (one segment per plane is the common case: no division by segs then; short planes make
  // these per-unit costs matter, a (32, 512, 7, 7) input has 16384 units of 49 values)
  int64_t plane(int64_t u) const { return segs == 1 ? u : u / segs; }
  int64_t seg(int64_t u) const { return segs == 1 ? 0 : u % segs; }
  int64_t channel(int64_t u) const { return plane(u) % C; }
  int64_t offset(int64_t u) const { return plane(u) * S + seg(u) * kSeg; }
  int64_t length(int64_t u) const { return std::min(kSeg, S - seg(u) * kSeg); }
  // The work of a pass, in values, for the threading thresholds (serial_grain, the reductions'
  // task counts): each unit's setup and tails count as kUnitValues more. Counted by values
  // alone, a (2, 1024, 3, 3) input (18432 values) ran on one thread, though its 2048 short
  // spans took 30-60 us there. Raw ops, variants interleaved in one process, float32 forward /
  // backward us (by values -> kUnitValues 16 -> 32; torch): (2, 1024, 3, 3) 75 -> 49 -> 50 /
  // 52 -> 52 -> 39 (41 / 28); (4, 256, 3, 3) 36 -> 35 -> 26 / 30 (25 / 19); (2, 512, 15)
  // 53 -> 53 -> 36 / 40 (32 / 21); (8, 16, 4, 4) and (2, 64, 5, 5) level (still one thread).
  static constexpr int64_t kUnitValues = 32;
  int64_t work() const { return N * S * C + kUnitValues * units; }
};

struct RowGrid {
  int64_t R, C, width, groups, rb, blocks, tasks;
  RowGrid(const BnShape& sh, int64_t elem_size) : R(sh.n * sh.s), C(sh.c) {
    width = std::max<int64_t>(1, std::min(C, kGroupCols));
    groups = (C + width - 1) / width;
    rb = std::max<int64_t>(8, kBlockBytes / (width * elem_size));
    blocks = (R + rb - 1) / rb;
    tasks = std::max<int64_t>(1, std::min(blocks / kBlocksPerTask, kTasks));
  }
  int64_t units() const { return tasks * groups; }
  int64_t first_block(int64_t t) const { return t * blocks / tasks; }
  int64_t row0(int64_t b) const { return b * rb; }
  int64_t row1(int64_t b) const { return std::min(R, (b + 1) * rb); }
  int64_t col0(int64_t g) const { return g * width; }
  int64_t col1(int64_t g) const { return std::min(C, (g + 1) * width); }
  // rows of the blocks of task t
  int64_t task_rows(int64_t t) const {
    return std::min(R, first_block(t + 1) * rb) - std::min(R, first_block(t) * rb);
  }
  // f(c, u[l], v[l]) for each column c in order, l its place when each group's per-column
  // arrays are in lane order (VecPair's load_lanes, relative to the group's first column: the
  // Block loops keep them so), a group at a time: no division per column.
  template <typename T, typename F>
  void from_lanes(const double* u, const double* v, const F& f) const {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = col0(g), w = col1(g) - c0;
      for (int64_t j = 0; j < w; ++j) {
        const int64_t l = c0 + VecPair<T>::lane_pos(j, w);
        f(c0 + j, u[l], v[l]);
      }
    }
  }
  // v[0, C) per column, copied into each group's lane order (v itself where that is natural).
  template <typename T, typename A>
  const A* to_lanes(const A* v, Scratch<A>& out) const {
    if (!VecPair<T>::kLanesPermuted) return v;
    A* o = scratch(out, C);
    for (int64_t g = 0; g * width < C; ++g)
      lane_order_into<T>(v + col0(g), col1(g) - col0(g), o + col0(g));
    return o;
  }
};

// Per-column moments of a set of column groups that share one count n: the channels-last
// accumulators. A block's (or task's) moments merge in with Chan et al.'s formula, whose
// coefficients depend on the two counts alone, so they are computed once per merge and the
// per-column work is a few multiplications (no division per column).

struct ColMoments {
  double n = 0;
  double* mean;  // [width]
  double* m2;    // [width]

  // Merge columns [0, w) of group moments (n_b, mean_b, m2_b).
  void merge(int64_t w, double n_b, const double* mean_b, const double* m2_b) {
    if (n_b == 0) return;
    if (n == 0) {
      std::copy(mean_b, mean_b + w, mean);
      std::copy(m2_b, m2_b + w, m2);
      n = n_b;
      return;
    }
    const double tot = n + n_b, wb = n_b / tot, f = n * n_b / tot, wa = n / tot;
    if (all_finite(w, mean) && all_finite(w, mean_b)) {  // the common case, a vector loop
      for (int64_t j = 0; j < w; ++j) {
        const double delta = mean_b[j] - mean[j];
        mean[j] += delta * wb;
        m2[j] += m2_b[j] + delta * delta * f;
      }
    } else {
      for (int64_t j = 0; j < w; ++j) {
        const double delta = mean_b[j] - mean[j];
        if (std::isfinite(mean[j]) && std::isfinite(mean_b[j])) {
          mean[j] += delta * wb;
          m2[j] += m2_b[j] + delta * delta * f;
        } else {  // Inf/NaN combine as in a plain sum (see Moments::merge)
          mean[j] = mean[j] * wa + mean_b[j] * wb;
          m2[j] += m2_b[j];
        }
      }
    }
    n = tot;
  }

  // The pass-2 shifts for n rows joining these moments: the running means rounded to A, as
  // running_shift (vec_utils.h) takes them for planar spans; false where pass 1 must run.
  template <typename A>
  bool running_shift(int64_t w, int64_t n_b, A* m) const {
    if (n < static_cast<double>(n_b)) return false;
    for (int64_t j = 0; j < w; ++j) {
      m[j] = static_cast<A>(mean[j]);
      if (!std::isfinite(m[j])) return false;
    }
    return true;
  }
};

// Row-major loops over a block of rows of one column group, vectorized over the columns; the
// per-column accumulators live in small arrays (L1) while the rows stream past in memory order.
// `p` points at the block's first row, `ld` is the row stride (C), `w` the group's width.
// Every per-column array here (shifts, sums, moments, means) is in the group's lane order
// (RowGrid::from_lanes): the rows are read with load_lanes.
template <typename T>
struct Block {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  static constexpr int64_t kStep = P::kStep;
  static constexpr int64_t h = V::size();

  // Pass 1 over the n rows of columns [0, w): each column's shift m = x0 + sum(x - x0) / n
  // (x0 its first value; exactly x0 for a constant column), or its plain mean if that is not
  // finite (see span_shift). s is scratch.
  static void shift(const T* p, int64_t ld, int64_t n, int64_t w, A* m, A* s) {
    const int64_t wv = w - w % kStep;
    for (int64_t j = 0; j < wv; j += kStep) {
      V a, b;
      P::load_lanes(p + j, a, b);
      a.store(m + j);
      b.store(m + j + h);
    }
    for (int64_t j = wv; j < w; ++j) m[j] = static_cast<A>(p[j]);
    std::fill(s, s + w, A(0));
    for (int64_t r = 1; r < n; ++r) {
      const T* row = p + r * ld;
      for (int64_t j = 0; j < wv; j += kStep) {
        V a, b;
        P::load_lanes(row + j, a, b);
        (V::loadu(s + j) + (a - V::loadu(m + j))).store(s + j);
        (V::loadu(s + j + h) + (b - V::loadu(m + j + h))).store(s + j + h);
      }
      for (int64_t j = wv; j < w; ++j) s[j] += static_cast<A>(row[j]) - m[j];
    }
    const A inv_n = A(1) / static_cast<A>(n);
    bool finite = true;
    for (int64_t j = 0; j < w; ++j) {
      m[j] = m[j] + s[j] * inv_n;
      finite = finite && std::isfinite(m[j]);
    }
    if (!finite)
      for (int64_t j = 0; j < w; ++j)
        if (!std::isfinite(m[j])) m[j] = plain_mean(p + P::lane_src(j, w), n, ld);
  }

  // Pass 2: the moments of the n rows of columns [0, w) from the sums of d = x - m and d^2 (the
  // block is in L2 after pass 1), into (mean_b, m2_b) in double. s and q are scratch.
  // Most blocks come here straight from memory (after a task's first block the running mean is
  // the shift, and pass 1 is skipped): rows kAhead and kAhead + 1 ahead are prefetched. Measured
  // on (4096, 1024) fp32, noisy: the training forward went from about 1.6x to 1.35x torch's time.
  static constexpr int64_t kAhead = 6;
  static void moments(const T* p, int64_t ld, int64_t n, int64_t w, const A* m, A* s, A* q,
                      double* mean_b, double* m2_b) {
    const int64_t wv = w - w % kStep;
    std::fill(s, s + w, A(0));
    std::fill(q, q + w, A(0));
    int64_t r = 0;
    for (; r + 2 <= n; r += 2) {  // two rows a step: half the accumulator loads and stores
      const T* row = p + r * ld;
      for (int64_t j = 0; j < wv; j += kStep) {
        V a, b, a2, b2;
        __builtin_prefetch(row + kAhead * ld + j);
        __builtin_prefetch(row + (kAhead + 1) * ld + j);
        P::load_lanes(row + j, a, b);
        P::load_lanes(row + ld + j, a2, b2);
        const V m0 = V::loadu(m + j), m1 = V::loadu(m + j + h);
        const V da = a - m0, db = b - m1, da2 = a2 - m0, db2 = b2 - m1;
        (V::loadu(s + j) + (da + da2)).store(s + j);
        (V::loadu(s + j + h) + (db + db2)).store(s + j + h);
        at::vec::fmadd(da2, da2, at::vec::fmadd(da, da, V::loadu(q + j))).store(q + j);
        at::vec::fmadd(db2, db2, at::vec::fmadd(db, db, V::loadu(q + j + h))).store(q + j + h);
      }
      for (int64_t j = wv; j < w; ++j) {
        const A d1 = static_cast<A>(row[j]) - m[j], d2 = static_cast<A>(row[ld + j]) - m[j];
        s[j] += d1 + d2;
        q[j] += d1 * d1 + d2 * d2;
      }
    }
    for (; r < n; ++r) {
      const T* row = p + r * ld;
      for (int64_t j = 0; j < wv; j += kStep) {
        V a, b;
        P::load_lanes(row + j, a, b);
        const V da = a - V::loadu(m + j), db = b - V::loadu(m + j + h);
        (V::loadu(s + j) + da).store(s + j);
        (V::loadu(s + j + h) + db).store(s + j + h);
        at::vec::fmadd(da, da, V::loadu(q + j)).store(q + j);
        at::vec::fmadd(db, db, V::loadu(q + j + h)).store(q + j + h);
      }
      for (int64_t j = wv; j < w; ++j) {
        const A d = static_cast<A>(row[j]) - m[j];
        s[j] += d;
        q[j] += d * d;
      }
    }
    // moments_from for each column, with 1/n once, as a vector loop unless a shift is not finite
    const double inv_n = 1.0 / static_cast<double>(n);
    if (all_finite(w, m)) {
      for (int64_t j = 0; j < w; ++j) {
        const double sj = s[j], dm = sj * inv_n, m2 = q[j] - sj * dm;
        mean_b[j] = m[j] + dm;
        m2_b[j] = m2 < 0 ? 0 : m2;
      }
    } else {
      for (int64_t j = 0; j < w; ++j) {
        const double sj = s[j], dm = sj * inv_n, m2 = q[j] - sj * dm;
        mean_b[j] = std::isfinite(m[j]) ? m[j] + dm : m[j];
        m2_b[j] = m2 < 0 ? 0 : m2;
      }
    }
  }

  // s1 += sum(dy), s2 += sum(dy * (x - mean)) over the n rows of columns [0, w), summed in A
  // over the block and added to the double accumulators.
  static void grad_sums(const T* g, const T* x, int64_t ld, int64_t n, int64_t w, const A* mean,
                        A* a, A* b, double* s1, double* s2) {
    const int64_t wv = w - w % kStep;
    std::fill(a, a + w, A(0));
    std::fill(b, b + w, A(0));
    for (int64_t r = 0; r < n; ++r) {
      const T* grow = g + r * ld;
      const T* xrow = x + r * ld;
      for (int64_t j = 0; j < wv; j += kStep) {
        V g0, g1, x0, x1;
        P::load_lanes(grow + j, g0, g1);
        P::load_lanes(xrow + j, x0, x1);
        (V::loadu(a + j) + g0).store(a + j);
        (V::loadu(a + j + h) + g1).store(a + j + h);
        at::vec::fmadd(g0, x0 - V::loadu(mean + j), V::loadu(b + j)).store(b + j);
        at::vec::fmadd(g1, x1 - V::loadu(mean + j + h), V::loadu(b + j + h)).store(b + j + h);
      }
      for (int64_t j = wv; j < w; ++j) {
        const A gv = static_cast<A>(grow[j]);
        a[j] += gv;
        b[j] += gv * (static_cast<A>(xrow[j]) - mean[j]);
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      s1[j] += a[j];
      s2[j] += b[j];
    }
  }
};

// Row helpers, vectorized over the channels. A row holds C consecutive values; the per-channel
// arrays are in lane order over the row (to_lane_order in vec_utils.h).
template <typename T>
struct Rows {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;

  // out = a * g + b * (x - m) + k   (g == nullptr: out = (x - m) * b + k, the forward apply;
  //                                  x == nullptr: out = a * g, the eval backward)
  // (NT: non-temporal stores, for rows that start kStreamAlign-aligned; see stream_output.
  // NoNan: round without the NaN check, see finite_all.)
  template <bool NT = false, bool NoNan = false>
  static void apply(const T* g, const T* x, T* out, int64_t C, const A* a, const A* b,
                    const A* m, const A* k) {
    int64_t j = 0;
    const int64_t h = V::size();
    for (; j + P::kStep <= C; j += P::kStep) {
      V r0(A(0)), r1(A(0));
      if (x != nullptr) {
        V x0, x1;
        P::load_lanes(x + j, x0, x1);
        r0 = at::vec::fmadd(x0 - V::loadu(m + j), V::loadu(b + j), V::loadu(k + j));
        r1 = at::vec::fmadd(x1 - V::loadu(m + j + h), V::loadu(b + j + h), V::loadu(k + j + h));
      }
      if (g != nullptr) {
        V g0, g1;
        P::load_lanes(g + j, g0, g1);
        r0 = at::vec::fmadd(g0, V::loadu(a + j), r0);
        r1 = at::vec::fmadd(g1, V::loadu(a + j + h), r1);
      }
      P::template put_lanes<NT, NoNan>(out + j, r0, r1);
    }
    for (; j < C; ++j) {
      A r = 0;
      if (x != nullptr) r = (static_cast<A>(x[j]) - m[j]) * b[j] + k[j];
      if (g != nullptr) r += static_cast<A>(g[j]) * a[j];
      out[j] = static_cast<T>(r);
    }
  }

  // out = x * alpha + beta: the forward apply with folded constants, one coefficient stream
  // less than apply()'s (x - m) * b + k: three streams per value (x, alpha, beta) as torch's own
  // loop has. Measured, (4096, 1024) float32 eval, one thread: (x - m) form 2.9 ms, torch 2.5,
  // a plain copy 2.1. Only for channels whose mean is within kFoldOffset standard deviations of
  // 0 (see batch_norm_fwd): farther out, x * alpha and beta cancel and lose digits.
  template <bool NT = false, bool NoNan = false>
  static void scale_shift(const T* x, T* out, int64_t C, const A* alpha, const A* beta) {
    const int64_t h = V::size();
    int64_t j = 0;
    for (; j + P::kStep <= C; j += P::kStep) {
      V x0, x1;
      P::load_lanes(x + j, x0, x1);
      const V y0 = at::vec::fmadd(x0, V::loadu(alpha + j), V::loadu(beta + j));
      const V y1 = at::vec::fmadd(x1, V::loadu(alpha + j + h), V::loadu(beta + j + h));
      P::template put_lanes<NT, NoNan>(out + j, y0, y1);
    }
    for (; j < C; ++j) out[j] = static_cast<T>(static_cast<A>(x[j]) * alpha[j] + beta[j]);
  }
};

// f(r, j0, j1) over columns [j0, j1) of each of R rows of C values, the rows in ranges across
// threads (each range ends with stream_fence, for rows written with non-temporal stores). A
// range goes kTileRows rows at a time, and those rows `tile` columns at a time (one tile where
// the row is no wider): the row loops read per-column constants (Rows), and over a whole row
// of thousands of channels they stream from L2 (a (256, 8192) float32 backward's dx reads four
// arrays of 32 KB, beside x, dy and dx), where a tile's stay in L1 across the block's rows. The
// tiles are whole steps (row_tile), so each value takes the same operations either way: the
// results are the same. Measured, raw ops interleaved in one process, warm, medians of 60
// (rows -> tiles): (256, 8192) float32 backward 1.10 -> 0.77-0.81 ms, training forward 0.77 ->
// 0.66-0.74, eval 0.39 -> 0.34-0.36; (4096, 1024) (not tiled) level.
constexpr int64_t kTileRows = 8;
constexpr int64_t kTileConstBytes = 16 << 10;
// columns a tile for row loops over `arrays` per-column arrays of acc_t<T> (whole steps)
template <typename T>
inline int64_t row_tile(int64_t arrays) {
  constexpr int64_t K = VecPair<T>::kStep;
  const int64_t cols = kTileConstBytes / (std::max<int64_t>(arrays, 1) * sizeof(acc_t<T>));
  return std::max(K, cols - cols % K);
}
template <typename F>
inline void for_row_tiles(int64_t R, int64_t C, int64_t tile, const F& f) {
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t b0 = r0; b0 < r1; b0 += kTileRows) {
      const int64_t b1 = std::min(r1, b0 + kTileRows);
      for (int64_t j0 = 0; j0 < C; j0 += tile) {
        const int64_t j1 = std::min(C, j0 + tile);
        for (int64_t r = b0; r < b1; ++r) f(r, j0, j1);
      }
    }
    stream_fence();
  });
}

// out[c] = 1 / sqrt(var[c] + eps) in double, a vector at a time: the same IEEE square roots and
// divisions as the scalar formula, so the same results, at about a quarter of the cost (for
// (2, 8192) inputs these, one per channel, were most of the op).
inline void inv_std(const double* var, double eps, double* out, int64_t C) {
  using Vd = at::vec::Vectorized<double>;
  const Vd ve(eps), one(1.0);
  int64_t c = 0;
  for (; c + Vd::size() <= C; c += Vd::size())
    (one / (Vd::loadu(var + c) + ve).sqrt()).store(out + c);
  for (; c < C; ++c) out[c] = 1.0 / std::sqrt(var[c] + eps);
}

// f(c0, c1) over channel ranges: the per-channel constants of the ops (a square root and a
// division in double each, and several outputs per channel), across threads only where there are
// very many channels: vectorized (FwdConstants, BwdConstants) a channel costs a few ns, and
// waking a thread costs more than thousands of them.
// Ranges of at least kChannelGrain channels. Measured against 32768 (one thread up to there),
// raw ops, variants interleaved in rotating order, medians of 120, float32 forward / backward:
// (2, 16384) 0.200 -> 0.165 / 0.304 -> 0.208 ms, (2, 32768) backward 0.594 -> 0.436,
// (64, 16384) 0.434 -> 0.395 / 0.604 -> 0.499; (2, 8192) is one range either way.
// Then, with the constants' loops vectorized (and the forward's square roots in the ranges too),
// 8192 -> 2048, float32 training forward / eval / backward us, three grains and torch
// interleaved: (4, 8192) 80 -> 71 / 42 -> 35 / 48 -> 46 (torch 90 / 38 / 63); (8, 4096) 51 ->
// 47 / 27 -> 24 / 34 (59 / 27 / 45); (64, 8192) 223 -> 198 / 97 -> 85 / 200 -> 186; (2, 4096),
// (2, 16384) and (2, 32768) level.
constexpr int64_t kChannelGrain = 2048;
template <typename F>
inline void for_channel_ranges(int64_t C, const F& f) {
  at::parallel_for(0, C, kChannelGrain, f);
}

// The forward's per-channel values for channels [c0, c1), from each channel's mean, biased
// variance (training) and invstd, in double: the saved statistics (sm, si, and sv in training)
// and the constants of y = (x - m) * scale + shift (m is the mean rounded to A; the rounding
// error (mean - m) is folded into the shift so large offsets lose nothing) and of the folded
// y = x * scale + beta; folded[c]: whether channel c's mean is within kFoldOffset standard
// deviations of 0 (see kFoldOffset). Which of w, b and sv are given is a template argument:
// with a branch on each in the loop body the compiler did not vectorize it. Measured, (2, 8192)
// float32 eval forward: a lambda per channel (across threads, 2048 channels a task) 76 us; this,
// in one thread, 41 us (torch 35 us).
template <typename A>
struct FwdConstants {
  const A* w;  // null: weight 1
  const A* b;  // null: bias 0
  A *sm, *si, *sv;  // sv null in eval
  A *m, *scale, *shift, *beta;
  char* folded;
  void operator()(int64_t c0, int64_t c1, const double* mean, const double* var,
                  const double* invstd) const {
    with_flags(w != nullptr, b != nullptr, sv != nullptr, [&](auto W, auto B, auto V) {
      loop<decltype(W)::value, decltype(B)::value, decltype(V)::value>(
          c0, c1, mean, var, invstd, w, b, sm, si, sv, m, scale, shift, beta, folded);
    });
  }
  // One channel's values, from its mean, variance and invstd.
  void operator()(int64_t c, double mean, double var, double invstd) const {
    with_flags(w != nullptr, b != nullptr, sv != nullptr, [&](auto W, auto B, auto V) {
      set<decltype(W)::value, decltype(B)::value, decltype(V)::value>(
          c, mean, var, invstd, w, b, sm, si, sv, m, scale, shift, beta, folded);
    });
  }

 private:
  // The loop in a function of its own whose pointers are all __restrict: that is what lets the
  // compiler vectorize it. (Not on set's parameters: GCC 12 then gave up on the loop, "no vectype"
  // for the loads.)
  template <bool W, bool B, bool V>
  static void loop(int64_t c0, int64_t c1, const double* __restrict mean,
                   const double* __restrict var, const double* __restrict invstd,
                   const A* __restrict wp, const A* __restrict bp, A* __restrict smp,
                   A* __restrict sip, A* __restrict svp, A* __restrict mp, A* __restrict scp,
                   A* __restrict shp, A* __restrict bep, char* __restrict fp) {
    for (int64_t c = c0; c < c1; ++c)
      set<W, B, V>(c, mean[c], V ? var[c] : 0.0, invstd[c], wp, bp, smp, sip, svp, mp, scp, shp,
                   bep, fp);
  }
  template <bool W, bool B, bool V>
  NORMEXT_INLINE static void set(int64_t c, double mu, double var, double r,
                                 const A* wp, const A* bp,
                                 A* smp, A* sip, A* svp,
                                 A* mp, A* scp, A* shp,
                                 A* bep, char* fp) {
    double sc = r, bc = 0.0;
    if constexpr (W) sc = wp[c] * r;
    if constexpr (B) bc = bp[c];
    const A mc = static_cast<A>(mu), scc = static_cast<A>(sc);
    smp[c] = mc;
    mp[c] = mc;
    sip[c] = static_cast<A>(r);
    if constexpr (V) svp[c] = static_cast<A>(var);
    scp[c] = scc;
    shp[c] = static_cast<A>(bc - (mu - static_cast<double>(mc)) * sc);
    fp[c] = std::fabs(mu) * r <= kFoldOffset;
    bep[c] = static_cast<A>(bc - mu * static_cast<double>(scc));
  }
};

// The backward's per-channel values for channels [c0, c1), from the sums S1 = sum(dy) and
// S2 = sum(dy * (x - mean)) over n values (double): the weight and bias grads (dw, db; null
// where not asked) and the constants of dx = a * dy + b * (x - mean) + k (b and k in training
// only). Template flags as in FwdConstants.
template <typename A>
struct BwdConstants {
  const A* w;  // null: weight 1
  const A* invstd;
  int64_t n;
  bool training;
  A *dw, *db, *a, *b, *k;
  void operator()(int64_t c0, int64_t c1, const double* s1, const double* s2) const {
    with_flags(w != nullptr, dw != nullptr, db != nullptr, training, [&](auto W, auto DW, auto DB,
                                                                       auto T) {
      loop<decltype(W)::value, decltype(DW)::value, decltype(DB)::value, decltype(T)::value>(
          c0, c1, s1, s2, w, invstd, n, dw, db, a, b, k);
    });
  }
  // One channel's values, from its sums.
  void operator()(int64_t c, double s1, double s2) const {
    with_flags(w != nullptr, dw != nullptr, db != nullptr, training, [&](auto W, auto DW, auto DB,
                                                                       auto T) {
      set<decltype(W)::value, decltype(DW)::value, decltype(DB)::value, decltype(T)::value>(
          c, s1, s2, w, invstd, n, dw, db, a, b, k);
    });
  }

 private:
  // One loop per output over blocks of channels, each simple enough for the compiler to
  // vectorize (set's body as one loop, with its two divisions and the float/double conversions,
  // stayed scalar: (4, 8192) float32 backward spent most of its time here, on one thread). The
  // same operations in the same order as set(), so the same results.
  template <bool W, bool DW, bool DB, bool T>
  static void loop(int64_t c0, int64_t c1, const double* __restrict s1,
                   const double* __restrict s2, const A* __restrict wp, const A* __restrict rp,
                   int64_t n, A* __restrict dwp, A* __restrict dbp, A* __restrict ap,
                   A* __restrict bp, A* __restrict kp) {
    if (n <= 0) {  // an empty batch (see set)
      for (int64_t c = c0; c < c1; ++c)
        set<W, DW, DB, T>(c, s1[c], s2[c], wp, rp, n, dwp, dbp, ap, bp, kp);
      return;
    }
    constexpr int64_t kBlock = 256;
    const double dn = static_cast<double>(n);
    double gr[kBlock];
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t m = std::min(kBlock, c1 - b0);
      const A* __restrict r = rp + b0;
      for (int64_t j = 0; j < m; ++j)
        gr[j] = W ? static_cast<double>(wp[b0 + j]) * static_cast<double>(r[j])
                  : static_cast<double>(r[j]);
      if constexpr (DW)
        for (int64_t j = 0; j < m; ++j)
          dwp[b0 + j] = static_cast<A>(s2[b0 + j] * static_cast<double>(r[j]));
      if constexpr (DB)
        for (int64_t j = 0; j < m; ++j) dbp[b0 + j] = static_cast<A>(s1[b0 + j]);
      for (int64_t j = 0; j < m; ++j) ap[b0 + j] = static_cast<A>(gr[j]);
      if constexpr (T) {
        for (int64_t j = 0; j < m; ++j) {
          const double rj = static_cast<double>(r[j]);
          bp[b0 + j] = static_cast<A>(-gr[j] * rj * rj * s2[b0 + j] / dn);
        }
        for (int64_t j = 0; j < m; ++j) kp[b0 + j] = static_cast<A>(-gr[j] * s1[b0 + j] / dn);
      }
    }
  }
  template <bool W, bool DW, bool DB, bool T>
  NORMEXT_INLINE static void set(int64_t c, double s1, double s2, const A* wp,
                                 const A* rp, int64_t n, A* dwp,
                                 A* dbp, A* ap, A* bp,
                                 A* kp) {
    const double r = rp[c];
    // an empty batch sums nothing: 0, even where invstd is Inf (eps = 0)
    if constexpr (DW) dwp[c] = n > 0 ? static_cast<A>(s2 * r) : A(0);
    if constexpr (DB) dbp[c] = static_cast<A>(s1);
    double gr = r;
    if constexpr (W) gr = wp[c] * r;
    ap[c] = static_cast<A>(gr);
    if constexpr (T) {
      bp[c] = n > 0 ? static_cast<A>(-gr * r * r * s2 / n) : A(0);
      kp[c] = n > 0 ? static_cast<A>(-gr * s1 / n) : A(0);
    }
  }
};

// Whether an elementwise pass over layout `sh` writes its output with non-temporal stores
// (stream_output in vec_utils.h): `arrays` arrays of the input's size are touched (x and y; x,
// dy and dx), and the runs written are planes (planar) or, channels-last, the whole output when
// every row starts aligned.
inline bool bn_stream(const BnShape& sh, int64_t arrays, int64_t elem_size, const void* out) {
  const int64_t bytes = arrays * sh.count() * sh.c * elem_size;
  if (!sh.channels_last) return stream_output(bytes, sh.s * elem_size);
  return stream_rows(bytes, sh.c * elem_size, out);
}

// ---- statistics ------------------------------------------------------------------------------

// A planar per-channel reduction: add(acc, u, c) adds unit u (of channel c) into acc, the
// partial result R of its channel (MomentsAcc or Sum2, both with merge()). Channel c's units are
// added in order of n, then segment, one of two ways:
//   in memory order: the units go to tasks in contiguous ranges, each adding into its own C
//     partials, and the tasks merge in order. With short planes this is the one that streams:
//     a channel's planes lie C * S values apart, and a walk channel by channel restarts the
//     hardware prefetch at every plane. Measured, backward sums then dx, interleaved in one
//     process (quartiles): (32, 256, 14, 14) fp32 1.06-1.39 -> 0.67-0.85 ms (torch 1.11-1.42),
//     (32, 512, 7, 7) bf16 0.63-0.67 -> 0.46-0.48 ms (torch 1.14-1.16).
//   channel by channel, the threads taking whole channels: unless memory_order is asked for
//     (the backward's sums, for short planes: long planes are each a stream already), and where
//     the partials would not fit kPartialBytes with kMinTasks tasks (thousands of channels).
//     The forward's statistics stay channel by channel: their partials (MomentsAcc) are a few
//     hundred bytes each, not Sum2's 16, and in memory order the (32, 256, 14, 14) fp32
//     training forward went from 0.37-0.48 to 0.44-0.52 ms.
//   With fewer than kTasks channels, always in memory order (the threads could not all take
//     whole channels).
// The tasks (at most kTasks, one per kSerialValues values at least, so a small input is one)
// and so the order depend on the shape alone; the partials take at most kTasks * C entries and
// kPartialBytes with many channels, not one per unit: a (N, C, 2) input has N*C units.
constexpr int64_t kPartialBytes = 1 << 20;
constexpr int64_t kMinTasks = 8;
// run(part, u0, u1), where given, adds units [u0, u1) (one segment a plane) into part (C
// entries), unit u into part[u % C], in place of add per unit (planes_grad_sums; add is then
// nullptr).
template <typename R, typename F, typename Run = std::nullptr_t>
std::vector<R> planar_reduce(const Planar& pl, bool memory_order, const F& add,
                             const Run& run = nullptr) {
  const int64_t C = pl.C;
  std::vector<R> out(C);
  if (C == 0) return out;
  const int64_t values = pl.work();
  const int64_t want = std::clamp<int64_t>(std::min(pl.units, values / kSerialValues), 1, kTasks);
  const int64_t cap = kPartialBytes / (C * static_cast<int64_t>(sizeof(R)));
  const int64_t tasks = C >= kTasks ? std::max<int64_t>(1, std::min(want, cap)) : want;
  if (C >= kTasks && (!memory_order || (tasks < want && tasks < kMinTasks))) {
    at::parallel_for(0, C, serial_grain(C, values), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t i = 0; i < pl.N; ++i)
          for (int64_t s = 0; s < pl.segs; ++s) {
            const int64_t u = (i * C + c) * pl.segs + s;
            if constexpr (std::is_same_v<Run, std::nullptr_t>)
              add(out[c], u, c);
            else
              run(out.data(), u, u + 1);
          }
    });
    return out;
  }
  std::vector<R> part(tasks * C);
  at::parallel_for(0, tasks, serial_grain(tasks, values), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u0 = t * pl.units / tasks, u1 = (t + 1) * pl.units / tasks;
      if constexpr (!std::is_same_v<Run, std::nullptr_t>) {
        run(part.data() + t * C, u0, u1);
      } else {
        int64_t c = pl.channel(u0), s = pl.seg(u0);  // advanced with u: no division per unit
        for (int64_t u = u0; u < u1; ++u) {
          add(part[t * C + c], u, c);
          if (++s == pl.segs) {
            s = 0;
            if (++c == C) c = 0;
          }
        }
      }
    }
  });
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t c = 0; c < C; ++c) out[c].merge(part[t * C + c]);
  return out;
}

// Whether a planar op runs channel by channel, its reduction and then its elementwise pass over
// the channel while the channel is in L2 (so the inputs come from memory once): when a
// channel's inputs (bytes_per_value per value: x, or x and dy) fit in kFuseBytes, and its planes
// are long runs (kFusePlaneBytes of x at least), with any number of channels but one plane in
// all (threads share channels: fused_channels). This used to need 64 channels (whole channels a
// thread); with parts, fewer channels measured faster fused than unfused, raw ops interleaved in
// one process, medians: (32, 32, 56, 56) bf16 forward 1.35 -> 1.01 ms, backward 1.67 -> 1.44;
// float32 2.01 -> 1.33, 2.64 -> 2.34; (8, 16, 64, 64) float32 0.158 -> 0.124, 0.219 -> 0.182.
// A channel's planes lie C * S apart: short planes make the elementwise pass hop through memory,
// where the unfused one streams in memory order (measured: (32, 256, 14, 14) float32 backward
// 0.66 ms unfused, 0.86 ms fused). Fused or not, the results depend on the shape alone (the
// fused path merges a channel's parts, see fuse_parts, so its last bits can differ from the
// unfused path's).
// The fused ops walk a channel plane by plane, each plane C * S values past the last: the
// hardware prefetchers lose the stream at every jump, and the first lines of each plane wait
// on memory. So while one plane is summed, the next one of the part is prefetched into L2
// (a prefetch a cache line); this for a thread's first channel only: the later ones are
// prefetched while the channel before is written (fused_channels).
// Measured, interleaved with torch, (32, 64, 56, 56): bf16 forward 1.05-1.15x -> 1.29-1.33x
// torch, backward 1.08-1.10x -> 1.19-1.25x; float32 forward 2.6-2.85x -> 3.0-3.2x, backward
// unchanged (1.09-1.21x). Short planes (not fused, mostly in cache) gained nothing from it.
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* q = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(q + o, 0, 2);
}

constexpr int64_t kFuseBytes = 1 << 20;
// The fused passes cut each channel's N planes into P parts (ranges of n; P from the shape
// alone, each part's inputs at most kPartBytes where N allows), and the parts of a channel go to
// different threads, which meet once a channel (fused_channels). A channel's statistics are its
// parts' merged in part order, so the results depend on the shape only, not on the thread count.
// What the split buys: a thread's share of a channel small enough to stay in L2 from its summing
// to its writing, with the next channel's share coming in, so that its reads from memory overlap
// its arithmetic and its writes. With whole channels a thread (and each channel summed, then
// written, before the next was read), a (32, 64, 56, 56) bf16 backward had 401 KB of x and dy a
// channel: two overflow this machine's 512 KB L2, and the prefetch ahead measured no faster than
// none. Measured, raw ops interleaved in one process, 2 threads, cache flushed before each call,
// medians (whole channels -> parts): (32, 64, 56, 56) bf16 forward 1.53 -> 1.41 ms, backward
// 2.63 -> 2.32; float32 forward 2.84 -> 2.61, backward 4.35 -> 4.28.
constexpr int64_t kPartBytes = 128 << 10;
inline int64_t fuse_parts(const Planar& pl, int64_t bytes_per_value) {
  const int64_t channel = pl.N * pl.S * bytes_per_value;
  int64_t parts = 1;  // a power of two: shares even over 2, 4, 8 ... threads
  while (parts * kPartBytes < channel && parts < pl.N) parts *= 2;
  return std::min(parts, pl.N);
}
// planes [part_n0(p), part_n0(p + 1)) of each channel are part p
inline int64_t part_n0(const Planar& pl, int64_t parts, int64_t p) { return p * pl.N / parts; }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}
// A counter that one thread raises and others wait on, on a cache line of its own.
struct alignas(64) Progress {
  std::atomic<int64_t> v{0};
  void raise(int64_t to) { v.store(to, std::memory_order_release); }
  void wait(int64_t at_least) const {
    for (int spins = 0; v.load(std::memory_order_acquire) < at_least; ++spins) {
      if (spins < 4096)
        cpu_relax();
      else
        std::this_thread::yield();  // more threads than cores: let the one we wait on run
    }
  }
};

// f(u) over channel c's units of planes [n0, n1) in order (by n, then segment). Where prefetch,
// the same segment of the next plane of the range (of a, and of b where not null; elem_size
// bytes a value) is prefetched before each unit is visited.
template <typename F>
inline void for_part_units(const Planar& pl, int64_t c, int64_t n0, int64_t n1, const F& f,
                           bool prefetch = false, int64_t elem_size = 0,
                           const void* a = nullptr, const void* b = nullptr) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t s = 0; s < pl.segs; ++s) {
      const int64_t u = (n * pl.C + c) * pl.segs + s;
      if (prefetch && n + 1 < n1) {
        const int64_t next = pl.offset(u + pl.C * pl.segs) * elem_size;
        prefetch_span(static_cast<const char*>(a) + next, pl.length(u) * elem_size);
        if (b) prefetch_span(static_cast<const char*>(b) + next, pl.length(u) * elem_size);
      }
      f(u);
    }
}
// The arrays a fused pass streams: its inputs a (x) and b (dy, or null), elem_size bytes a value.
struct FusedIo {
  int64_t elem_size;
  const void* a;
  const void* b;
  int64_t bytes_per_value() const { return elem_size * (b ? 2 : 1); }
};

// The fused planar passes' driver. For each channel c, with P = fuse_parts:
//   add(acc, c, off, len): adds values [off, off + len) of channel c into acc (an Acc), one unit
//     (plane segment) at a time, a part's units in order of n then segment;
//   result(acc): a part's partial result (R) from its Acc;
//   finish(c, parts, P): merges the P partials in part order and sets c's constants;
//   apply(c, off, len, acc, off2, pf): the elementwise pass over values [off, off + len) of
//     channel c; where acc is not null, in the same loop (a Sidecar of the reduction), adds
//     values [off2, off2 + len) of channel c + 1 into acc, as add would, prefetching the values
//     from pf on as it goes where pf >= 0 (a plane of c + 1 still to add, see kAheadStepBytes).
// The work items are (team, part): a team's items take a range of channels together. Each
// thread streams its share of the channels one after another, one step behind itself: in the
// step of channel c it walks its planes of c, writing each plane's output (the inputs come from
// L2) while it sums the same plane of c + 1 (from memory, the plane after it prefetched). So its
// reads, its arithmetic and its writes go on together, the whole way, and only about one share
// of a channel need stay in L2 (the planes of c still to write plus those of c + 1 already
// summed). The thread whose parts of c + 1 arrive last merges that channel's partials (finish)
// and raises the team's flag; a step starts once its channel is finished, that is once every
// thread of the team is done with the step before (the team still meets once a channel).
// Results are the same as summing a channel's parts and then writing them: each part is summed
// in the same order, and merged in part order.
// Measured, raw ops interleaved in one process, 2 threads, cache flushed before each call,
// medians over 50 rounds (each part summed then written -> a plane written, then the next
// channel's plane summed): (32, 64, 56, 56) bf16 forward 1.81 -> 1.76 ms, backward 2.75 -> 2.70;
// float32 2.92 -> 2.82 and 4.91 -> 4.52; (32, 32, 56, 56) bf16 1.33 -> 1.23 and 1.85 -> 1.78.
// Summing two channels ahead (a step of slack before each meeting, two shares in L2) made the
// bf16 backward slower (2.10 -> 2.52 ms).
// Then (a plane written, then the next channel's plane summed -> both in one loop), medians of
// 40, outputs bitwise the same, inputs warm in L3 / cache flushed: (32, 64, 56, 56) bf16 forward
// 1.008 -> 0.977 / 1.203 -> 1.132 ms, backward 1.716 -> 1.485 / 2.091 -> 1.851; float32
// forward 2.448 -> 2.036 / 2.569 -> 2.373, backward 4.221 -> 3.501 / 4.095 -> 3.596;
// (32, 32, 56, 56) bf16 warm 0.775 -> 0.662 and 1.136 -> 0.974; (8, 16, 64, 64) float32 warm
// 0.132 -> 0.119 and 0.205 -> 0.180. One after the other, a plane of each, the writes and the
// sums had taken the sum of their times (the writes alone were 47% of a backward). Without the
// prefetch of the next plane the one loop lost most of that (bf16 backward, warm 1.73 -> 2.02).
// This needs every chunk of at::parallel_for running at once on a thread of its own, as
// OpenMP's do: the chunks are contiguous ranges of items in team order, so a team's items are
// all running (or all in one chunk) and each waits only on its own team. Where the chunks may
// queue (ATen's native thread pool), each item is a whole team: no thread waits then.
// The walk prefetches the plane after next of c + 1 (two ahead) where a plane's inputs are at
// most kAheadStepBytes, else the next one. Measured, raw ops interleaved in one process, cache
// flushed, medians of 30-40 (one plane ahead -> two): (32, 64, 56, 56) bf16 forward 0.776 ->
// 0.752 ms (twice), backward 1.183 -> 1.154 and 1.181 -> 1.138 (planes of 6.3 KB, 12.5 KB for
// x and dy); float32 forward 1.526 -> 1.396 (12.5 KB); float16 level (0.909 -> 0.900, 1.455 ->
// 1.467). float32's backward (25 KB a plane) went 2.450 -> 2.610 two ahead, and keeps one.
constexpr int64_t kAheadStepBytes = 16 << 10;
template <typename R, typename Acc, typename Add, typename Result, typename Finish,
          typename Apply>
void fused_channels(const Planar& pl, const FusedIo& io, const Add& add, const Result& result,
                    const Finish& finish, const Apply& apply) {
#if AT_PARALLEL_OPENMP
  constexpr bool kSplit = true;
#else
  constexpr bool kSplit = false;
#endif
  const int64_t C = pl.C, P = fuse_parts(pl, io.bytes_per_value()), width = kSplit ? P : 1;
  // how many planes ahead the walk prefetches (see kAheadStepBytes)
  const int64_t ahead = pl.S * io.bytes_per_value() <= kAheadStepBytes ? 2 : 1;
  const int64_t teams = std::clamp<int64_t>(at::get_num_threads() / width, 1, C);
  std::vector<R> partial(C * P);
  // per team: the parts of its channels that have arrived (k * P once the team's first k
  // channels are all in), then the channels finished
  std::unique_ptr<Progress[]> progress(new Progress[teams * 2]);
  at::parallel_for(0, teams * width, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t t = i0 / width; t * width < i1; ++t) {
      const int64_t p0 = kSplit ? std::max(i0, t * P) - t * P : 0;
      const int64_t p1 = kSplit ? std::min(i1, (t + 1) * P) - t * P : P;
      const int64_t c0 = t * C / teams, c1 = (t + 1) * C / teams;
      Progress& arrived = progress[2 * t];
      Progress& finished = progress[2 * t + 1];
      // Channel c's partials of this thread's parts are in; the last to arrive finishes c. No
      // thread arrives with c + 1 before all have with c (a step waits for its channel).
      auto arrive = [&](int64_t c) {
        const int64_t k = c - c0 + 1;
        if (arrived.v.fetch_add(p1 - p0, std::memory_order_acq_rel) + (p1 - p0) == k * P) {
          finish(c, partial.data() + c * P, P);
          finished.raise(k);
        }
      };
      // the first channel: summed from memory, each next plane prefetched while one is summed
      for (int64_t p = p0; p < p1; ++p) {
        Acc acc;
        for_part_units(
            pl, c0, part_n0(pl, P, p), part_n0(pl, P, p + 1),
            [&](int64_t u) { add(acc, c0, pl.offset(u), pl.length(u)); }, true, io.elem_size,
            io.a, io.b);
        partial[c0 * P + p] = result(acc);
      }
      arrive(c0);
      for (int64_t c = c0; c < c1; ++c) {
        finished.wait(c - c0 + 1);
        const bool next = c + 1 < c1;
        for (int64_t p = p0; p < p1; ++p) {
          Acc acc;
          const int64_t n0 = part_n0(pl, P, p), n1 = part_n0(pl, P, p + 1);
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t s = 0; s < pl.segs; ++s) {
              // unit u of channel c; u + segs, the same of c + 1; u + (C + 1) * segs, that of
              // the next plane
              const int64_t u = (n * pl.C + c) * pl.segs + s;
              const int64_t pf = !next              ? -1
                                 : n + ahead < n1   ? pl.offset(u + (ahead * pl.C + 1) * pl.segs)
                                 : n + 1 < n1       ? pl.offset(u + (pl.C + 1) * pl.segs)
                                                    : -1;
              apply(c, pl.offset(u), pl.length(u), next ? &acc : nullptr,
                    pl.offset(u + pl.segs), pf);
            }
          if (next) partial[(c + 1) * P + p] = result(acc);
        }
        if (next) arrive(c + 1);
      }
    }
    stream_fence();
  });
}

constexpr int64_t kFusePlaneBytes = 4096;
inline bool fused_planar(const BnShape& sh, int64_t bytes_per_value, int64_t elem_size) {
  return !sh.channels_last && sh.n * sh.c >= 2 && sh.n * sh.s * bytes_per_value <= kFuseBytes &&
         sh.s * elem_size >= kFusePlaneBytes;
}

// Whether planar passes over `sh` take planes_map (one stream over runs of whole planes): planes
// shorter than kFusePlaneBytes (the elementwise passes walk them in memory order) and at least a
// whole step long.
template <typename T>
inline bool short_run_planes(const BnShape& sh) {
  return !sh.channels_last && sh.s >= VecPair<T>::kStep &&
         sh.s * int64_t(sizeof(T)) < kFusePlaneBytes;
}

// Planes shorter than a whole step (2 x 2, 3 x 3, an (N, C, L) of small L): per plane, the
// planar loops are mostly scalar tails and per-span overhead. A contiguous (N, C, S) input is
// also N rows of C * S values, column c * S + s holding position s of channel c; as such, the
// channels-last row loops (vectorized over the columns) take it: each column's statistics over
// the N rows (then each channel's S columns merged in order of s), and the elementwise passes
// with each channel's constants repeated over its S columns (Regroup, with outer = 1).
// That costs some 10 ns a column, where the planar loops cost some 60 ns a channel plus a few a
// plane: so only where S <= 4 or N >= S. Measured, raw ops (below autograd), the two paths and
// torch interleaved in one process, medians, float32 forward / backward in us (planar -> rows,
// torch): (2, 2048, 2, 2) 127 -> 78 / 86 -> 61 (57 / 131); (16, 512, 3, 3) 92 -> 64 / 103 -> 64
// (122 / 82); (32, 256, 3) 88 -> 23 / 135 -> 24 (69 / 182); (128, 128, 2, 2) 97 -> 32 /
// 152 -> 35 (134 / 477); (256, 32, 3) 174 -> 20 / 136 -> 18 (68 / 180). Left planar, where the
// rows measured level or slower: (2, 1024, 3, 3), (4, 1024, 3, 3), (2, 512, 15), (2, 4096, 5)
// (torch is faster there: 41 against 75 us forward at (2, 1024, 3, 3)). The columns' sums merge
// per channel in order of s, so the results still depend on the shape alone.
// Channels-last rows narrower than a vector step (C < kStep: (N, 3, H, W) channels-last, an
// (N, 8) input) leave the row loops nothing but scalar tails. k consecutive rows are also one
// row of k * C values, column r * C + c holding channel c of row r: Regroup's outer is k (a
// power of two that divides the rows, up to about four steps a row; 1: not taken) and the
// channels-last loops take the wider rows, each channel's k columns merged in order of r, its
// constants repeated over them. Measured, raw ops, normext against torch in one
// process, float32 fwd / bwd / eval us (before -> after; torch): (32, 3, 32, 32) channels-last
// 272 -> 53 / 329 -> 60 / 115 -> 26 (1700 / 981 / 126); (4, 8, 64, 64) 134 -> 64 / 164 -> 79 /
// 62 -> 31 (548 / 453 / 41); (1, 2, 224, 224) 375 -> 45 / 438 -> 66 / 158 -> 28 (2590 / 1504 /
// 173); bfloat16 (32, 3, 32, 32) eval 143 -> 21 (torch 89).
//
// Regroup: either layout as `rows` of C * outer * inner columns, column (o * C + c) * inner + i
// holding channel c (NCHW short planes: outer 1, inner S; narrow channels-last rows: outer k,
// inner 1). A channel's t-th column (t = o * inner + i) is col(c, t), and its columns merge in
// order of t. regroup() gives none (outer * inner == 1) where the layout is not taken.
struct Regroup {
  BnShape rows;
  int64_t C = 0, outer = 1, inner = 1;
  int64_t reps() const { return outer * inner; }
  explicit operator bool() const { return reps() > 1; }
  int64_t col(int64_t c, int64_t t) const { return ((t / inner) * C + c) * inner + t % inner; }
  // v[c] over each channel's columns (null stays null; zero: 0 for a null v)
  template <typename A>
  const A* repeat(const A* v, Scratch<A>& out, bool zero = false) const {
    if (v == nullptr && !zero) return nullptr;
    A* o = scratch(out, rows.c);
    for (int64_t t = 0; t < reps(); ++t)
      for (int64_t c = 0; c < C; ++c) o[col(c, t)] = v == nullptr ? A(0) : v[c];
    return o;
  }
};
template <typename T>
inline Regroup regroup(const BnShape& sh) {
  constexpr int64_t K = VecPair<T>::kStep;
  Regroup g;
  g.C = sh.c;
  if (!sh.channels_last) {  // short planes, where S <= 4 or N >= S
    if (sh.n > 0 && sh.s > 1 && sh.s < K && sh.c * sh.s >= K && (sh.s <= 4 || sh.n >= sh.s))
      g.inner = sh.s;
  } else if (const int64_t R = sh.n * sh.s; sh.c < K && sh.c > 0 && R > 0) {  // narrow rows
    while (g.outer * sh.c < 4 * K && R % (2 * g.outer) == 0) g.outer *= 2;
  }
  g.rows = BnShape{sh.n * sh.s / g.reps(), sh.c * g.reps(), 1, true};
  return g;
}

// Per-channel moments of x (layout `sh`). Each unit (plane segment or row block) runs both
// statistics passes over its values while they are in cache, so x is read from memory once;
// the units' moments merge per channel in a fixed order.
// Each channel's mean and biased variance into mean[c], var[c].
template <typename T>
void channel_moments(const T* x, const BnShape& sh, double* mean, double* var,
                     bool m2 = false) {
  const int64_t C = sh.c;
  auto put = [&](int64_t c, const Moments& m) {
    mean[c] = m.mean;
    var[c] = m2 ? m.m2 : m.var();
  };
  if (const Regroup rg = regroup<T>(sh)) {
    Scratch<double> cm_buf, cq_buf, m_buf, q_buf, tm_buf, tq_buf;
    double* cm = scratch(cm_buf, rg.rows.c);
    double* cq = scratch(cq_buf, rg.rows.c);
    channel_moments(x, rg.rows, cm, cq, /*m2=*/true);  // per column, over the regrouped rows
    double* all_mean = scratch(m_buf, C);
    double* all_m2 = scratch(q_buf, C);
    double* tm = scratch(tm_buf, C);
    double* tq = scratch(tq_buf, C);
    std::fill(all_mean, all_mean + C, 0.0);  // (what an empty batch leaves)
    std::fill(all_m2, all_m2 + C, 0.0);
    ColMoments all{0, all_mean, all_m2};
    for (int64_t t = 0; t < rg.reps(); ++t) {  // column t of every channel, in order of t
      for (int64_t c = 0; c < C; ++c) {
        tm[c] = cm[rg.col(c, t)];
        tq[c] = cq[rg.col(c, t)];
      }
      all.merge(C, static_cast<double>(rg.rows.n), tm, tq);
    }
    for (int64_t c = 0; c < C; ++c) put(c, Moments{all.n, all_mean[c], all_m2[c]});
    return;
  }
  if (!sh.channels_last) {
    const Planar pl(sh);
    if (C >= kTasks && pl.segs == 1 && pl.S <= kChunk) {
      // Short planes channel by channel, as planar_reduce would take them (the same order and
      // grouping, so the same results), with the lanes kept in registers across planes.
      // Measured, raw training forward, 2 threads, best of 2 interleaved builds: (32, 512, 7, 7)
      // fp32 0.27 -> 0.15 ms, bf16 0.22 -> 0.17; (32, 256, 14, 14) fp32 0.23 -> 0.17, bf16
      // 0.22 -> 0.17. Outputs bitwise the same.
      at::parallel_for(0, C, serial_grain(C, pl.work()), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          put(c, short_spans_moments(x + c * pl.S, C * pl.S, pl.N, pl.S));
      });
      return;
    }
    std::vector<MomentsAcc<acc_t<T>>> acc = planar_reduce<MomentsAcc<acc_t<T>>>(
        pl, /*memory_order=*/false, [&](MomentsAcc<acc_t<T>>& a, int64_t u, int64_t) {
          a.add(x + pl.offset(u), pl.length(u));
        });
    for (int64_t c = 0; c < C; ++c) put(c, acc[c].result());
    return;
  }
  const RowGrid gr(sh, sizeof(T));
  const int64_t T_ = gr.tasks;
  // Task partials: per task, C means and C M2s (at most kTasks * C each; a task covers at least
  // one block of rb >= 8 rows, so this stays below the input's size), and the task's count.
  // (every task has a block, and merges into its partials before reading them)
  Scratch<double> pmean_buf, pm2_buf, mean_buf, m2_buf;
  double* pmean = scratch(pmean_buf, T_ * C);
  double* pm2 = scratch(pm2_buf, T_ * C);
  at::parallel_for(0, gr.units(), serial_grain(gr.units(), gr.R * C), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t<T>> scratch(3 * gr.width);
    std::vector<double> bmean(gr.width), bm2(gr.width);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t t = u / gr.groups, g = u % gr.groups;
      const int64_t c0 = gr.col0(g), w = gr.col1(g) - c0;
      ColMoments acc{0, pmean + t * C + c0, pm2 + t * C + c0};
      acc_t<T>* m = scratch.data();
      acc_t<T>* s = m + gr.width;
      acc_t<T>* q = s + gr.width;
      for (int64_t b = gr.first_block(t); b < gr.first_block(t + 1); ++b) {
        const int64_t r0 = gr.row0(b), n = gr.row1(b) - r0;
        const T* p = x + r0 * C + c0;
        // After a task's first block, its running means are the shifts: one pass per block.
        if (!acc.running_shift(w, n, m)) Block<T>::shift(p, C, n, w, m, s);
        Block<T>::moments(p, C, n, w, m, s, q, bmean.data(), bm2.data());
        acc.merge(w, static_cast<double>(n), bmean.data(), bm2.data());
      }
    }
  });
  double* all_mean = scratch(mean_buf, C);
  double* all_m2 = scratch(m2_buf, C);
  std::fill(all_mean, all_mean + C, 0.0);  // (what an empty batch leaves)
  std::fill(all_m2, all_m2 + C, 0.0);
  ColMoments all{0, all_mean, all_m2};
  for (int64_t t = 0; t < T_; ++t)
    all.merge(C, static_cast<double>(gr.task_rows(t)), pmean + t * C, pm2 + t * C);
  gr.from_lanes<T>(all_mean, all_m2, [&](int64_t c, double mean_c, double m2_c) {
    put(c, Moments{all.n, mean_c, m2_c});
  });
}

// Per-channel S1 = sum(dy) and S2 = sum(dy * (x - mean)), in double, merged in a fixed order.
// fold: S2 from sum(dy * x) (fold_backward; planar only).
template <typename T>
void channel_grad_sums(const T* dy, const T* x, const BnShape& sh, const acc_t<T>* mean,
                       bool fold, double* s1, double* s2) {
  const int64_t C = sh.c;
  std::fill(s1, s1 + C, 0.0);
  std::fill(s2, s2 + C, 0.0);
  if (const Regroup rg = regroup<T>(sh)) {
    Scratch<acc_t<T>> mean_buf;
    Scratch<double> c1_buf, c2_buf;
    double* c1 = scratch(c1_buf, rg.rows.c);
    double* c2 = scratch(c2_buf, rg.rows.c);
    // per column over the regrouped rows (unfolded: fold changes only how dx is written)
    channel_grad_sums(dy, x, rg.rows, rg.repeat(mean, mean_buf), false, c1, c2);
    for (int64_t t = 0; t < rg.reps(); ++t)  // each channel's columns in order of t
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += c1[rg.col(c, t)];
        s2[c] += c2[rg.col(c, t)];
      }
    return;
  }
  if (!sh.channels_last) {
    const Planar pl(sh);
    const bool short_planes = sh.s * int64_t(sizeof(T)) < kFusePlaneBytes;
    const std::vector<Sum2> sums =
        short_run_planes<T>(sh) && sh.s <= kChunk
            ? planar_reduce<Sum2>(pl, short_planes, nullptr,
                                  [&](Sum2* part, int64_t u0, int64_t u1) {
                                    if (fold)
                                      planes_grad_sums<T, true>(dy, x, u0, u1, pl.S, C, mean,
                                                                part);
                                    else
                                      planes_grad_sums(dy, x, u0, u1, pl.S, C, mean, part);
                                  })
            : planar_reduce<Sum2>(pl, short_planes, [&](Sum2& a, int64_t u, int64_t c) {
                const int64_t o = pl.offset(u), len = pl.length(u);
                a.merge(fold ? span_grad_sums<T, true>(dy + o, x + o, len, mean[c])
                             : span_grad_sums(dy + o, x + o, len, mean[c]));
              });
    for (int64_t c = 0; c < C; ++c) {
      s1[c] = sums[c].sd;
      s2[c] = sums[c].sdd;
    }
    return;
  }
  const RowGrid gr(sh, sizeof(T));
  Scratch<acc_t<T>> mean_lanes;
  mean = gr.to_lanes<T>(mean, mean_lanes);
  Scratch<double> part_buf;
  double* part = scratch(part_buf, gr.tasks * 2 * C);
  std::fill(part, part + gr.tasks * 2 * C, 0.0);
  at::parallel_for(0, gr.units(), serial_grain(gr.units(), gr.R * C), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t<T>> scratch(2 * gr.width);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t t = u / gr.groups, g = u % gr.groups;
      const int64_t c0 = gr.col0(g), w = gr.col1(g) - c0;
      double* p1 = part + t * 2 * C + c0;
      double* p2 = p1 + C;
      for (int64_t b = gr.first_block(t); b < gr.first_block(t + 1); ++b) {
        const int64_t r0 = gr.row0(b), n = gr.row1(b) - r0;
        Block<T>::grad_sums(dy + r0 * C + c0, x + r0 * C + c0, C, n, w, mean + c0,
                            scratch.data(), scratch.data() + gr.width, p1, p2);
      }
    }
  });
  // each channel adds its tasks' sums in task order, a group at a time (the group's lane order
  // undone by from_lanes; no division per channel)
  for (int64_t t = 0; t < gr.tasks; ++t)
    gr.from_lanes<T>(part + t * 2 * C, part + t * 2 * C + C, [&](int64_t c, double p1, double p2) {
      s1[c] += p1;
      s2[c] += p2;
    });
}

// out = a[c] * g + b[c] * (x - m[c]) + k[c] elementwise, with g or x possibly absent (see Rows);
// with non-temporal stores if NT, rounded without the NaN check if NoNan (see finite_all).
// Planar with m absent: the folded forms, out = x * b[c] + k[c] (g absent; span_scale_shift) and
// out = a[c] * g + b[c] * x + k[c] (fold_backward).
template <typename T, bool NT, bool NoNan = false>
void channel_apply(const T* g, const T* x, T* out, const BnShape& sh, const acc_t<T>* a,
                   const acc_t<T>* b, const acc_t<T>* m, const acc_t<T>* k) {
  const int64_t C = sh.c;
  if (const Regroup rg = regroup<T>(sh)) {
    // as the regrouped rows, the constants repeated over each channel's columns; an absent m
    // (the folded forms) as zeros: x - 0 is x, so the same operations as the plain loops'
    Scratch<acc_t<T>> ea, eb, em, ek;
    channel_apply<T, NT, NoNan>(g, x, out, rg.rows, rg.repeat(a, ea), rg.repeat(b, eb),
                                rg.repeat(m, em, x != nullptr), rg.repeat(k, ek));
    return;
  }
  if (!sh.channels_last) {
    const Planar pl(sh);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(sh.s, 1));
    if (!NT && short_run_planes<T>(sh)) {
      at::parallel_for(0, pl.units, grain, [&](int64_t u0, int64_t u1) {
        const int64_t S = pl.S;
        if (g == nullptr && m == nullptr)
          planes_map<T, NoNan>(ScaleShiftOp<T>{b, k}, x, nullptr, out, u0, u1, S, C);
        else if (g == nullptr)
          planes_map<T, NoNan>(AffineOp<T>{m, b, k}, x, nullptr, out, u0, u1, S, C);
        else if (x == nullptr)
          planes_map<T, NoNan>(GradScaleOp<T>{a}, g, nullptr, out, u0, u1, S, C);
        else if (m == nullptr)
          planes_map<T, NoNan>(DxFoldOp<T>{a, b, k}, g, x, out, u0, u1, S, C);
        else
          planes_map<T, NoNan>(DxOp<T>{a, b, m, k}, g, x, out, u0, u1, S, C);
      });
      return;
    }
    at::parallel_for(0, pl.units, grain, [&](int64_t u0, int64_t u1) {
      // the channel advances with the plane: no division per unit
      int64_t c = pl.channel(u0), s = pl.seg(u0);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t off = pl.offset(u), len = pl.length(u);
        if (g == nullptr && m == nullptr)
          span_scale_shift<T, NT, NoNan>(x + off, out + off, len, b[c], k[c]);
        else if (g == nullptr)
          span_affine<T, NT, NoNan>(x + off, out + off, len, m[c], b[c], k[c]);
        else
          span_dx<T, NT, NoNan>(g + off, x == nullptr ? nullptr : x + off, out + off, len, a[c],
                         b == nullptr ? 0 : b[c], m == nullptr ? 0 : m[c],
                         k == nullptr ? 0 : k[c]);
        if (++s == pl.segs) {
          s = 0;
          if (++c == C) c = 0;
        }
      }
      stream_fence();
    });
  } else {
    Scratch<acc_t<T>> la, lb, lm, lk;
    a = to_lane_order<T>(a, C, la);
    b = to_lane_order<T>(b, C, lb);
    m = to_lane_order<T>(m, C, lm);
    k = to_lane_order<T>(k, C, lk);
    auto at = [](const acc_t<T>* v, int64_t j) { return v == nullptr ? nullptr : v + j; };
    const int64_t arrays = (a != nullptr) + (b != nullptr) + (m != nullptr) + (k != nullptr);
    for_row_tiles(sh.n * sh.s, C, row_tile<T>(arrays), [&](int64_t r, int64_t j0, int64_t j1) {
      const int64_t o = r * C + j0;
      Rows<T>::template apply<NT, NoNan>(g == nullptr ? nullptr : g + o,
                                  x == nullptr ? nullptr : x + o, out + o, j1 - j0, at(a, j0),
                                  at(b, j0), at(m, j0), at(k, j0));
    });
  }
}

// Channel c of a folded training backward (kFoldBackward) again, unfolded: its sums, its
// constants and grads (set_channels) and its dx, plane by plane on the calling thread. For the
// rare channel whose folded sums were not finite (a NaN or Inf in its dy).
template <typename T, typename A, typename Set>
void unfold_channel(const T* dy, const T* x, T* dx, const BnShape& sh, A mean, int64_t c,
                    const Set& set_channels, const A* a, const A* b, const A* k) {
  Sum2 sums;
  for (int64_t n = 0; n < sh.n; ++n) {
    const int64_t o = (n * sh.c + c) * sh.s;
    sums.merge(span_grad_sums(dy + o, x + o, sh.s, mean));
  }
  set_channels(c, sums.sd, sums.sdd);
  if (dx == nullptr) return;
  for (int64_t n = 0; n < sh.n; ++n) {
    const int64_t o = (n * sh.c + c) * sh.s;
    span_dx<T>(dy + o, x + o, dx + o, sh.s, a[c], b[c], mean, k[c]);
  }
}

}  // namespace

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
  at::Tensor y = empty_output(x, sh.channels_last);
  at::Tensor save_mean = at::empty({C}, x.options().dtype(acc));
  at::Tensor save_invstd = at::empty({C}, x.options().dtype(acc));
  at::Tensor batch_var = at::empty({training ? C : 0}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const ParamValues<A> wv(weight), bv(bias);
    const A* wp = wv.ptr;
    const A* bp = bv.ptr;
    A* sm = save_mean.mutable_data_ptr<A>();
    A* si = save_invstd.mutable_data_ptr<A>();
    A* sv = training ? batch_var.mutable_data_ptr<A>() : nullptr;
    Scratch<A> m_buf, scale_buf, shift_buf, beta_buf;
    Scratch<char> folded_buf;
    A* m = scratch(m_buf, C);
    A* scale = scratch(scale_buf, C);
    A* shift = scratch(shift_buf, C);
    A* beta = scratch(beta_buf, C);
    char* folded = scratch(folded_buf, C);
    // Channel c's outputs and the constants of its y (FwdConstants). The folded
    // y = x * scale + beta is used where folded[c]: per plane (span_scale_shift) or per
    // channels-last row (Rows::scale_shift). The fused NCHW path decides per channel, the others
    // for all channels at once.
    const FwdConstants<A> set_channels{wp, bp, sm, si, sv, m, scale, shift, beta, folded};
    if (training && fused_planar(sh, sizeof(scalar_t), sizeof(scalar_t))) {
      // Each channel's statistics, then its output, while the channel is in L2: x is read from
      // memory once (fused_channels).
      const Planar pl(sh);
      const bool nt = bn_stream(sh, 2, sizeof(scalar_t), yp);
      Scratch<char> nan_free_buf;  // per channel: y rounds without the NaN check (finite_all)
      char* nan_free = scratch(nan_free_buf, C);
      fused_channels<Moments, MomentsAcc<A>>(
          pl, FusedIo{sizeof(scalar_t), xp, nullptr},
          [&](MomentsAcc<A>& acc, int64_t, int64_t off, int64_t len) { acc.add(xp + off, len); },
          [](MomentsAcc<A>& acc) { return acc.result(); },
          [&](int64_t c, const Moments* parts, int64_t P) {
            Moments mo = parts[0];
            for (int64_t q = 1; q < P; ++q) mo.merge(parts[q]);
            const double mean = mo.mean, var = mo.var(), invstd = 1.0 / std::sqrt(var + eps);
            set_channels(c, mean, var, invstd);
            nan_free[c] = finite_all(m[c], scale[c], shift[c], beta[c]);
          },
          // c's output; with acc, c + 1's next plane's moments in the same loop
          [&](int64_t c, int64_t off, int64_t len, MomentsAcc<A>* acc, int64_t off2,
              int64_t pf) {
            with_stream(nt, [&](auto tag) {
              with_no_nan<scalar_t>(nan_free[c], [&](auto no_nan) {
                constexpr bool NT = decltype(tag)::value, NN = decltype(no_nan)::value;
                auto run = [&](auto body) {
                  Sidecar<scalar_t, NT, decltype(body)> side(body, len,
                                                             pf < 0 ? nullptr : xp + pf);
                  if (acc) acc->add(xp + off2, len, side);
                  side.finish();
                };
                if (folded[c])
                  run(scale_shift_body<scalar_t, NT, NN>(xp + off, yp + off, scale[c], beta[c]));
                else
                  run(affine_body<scalar_t, NT, NN>(xp + off, yp + off, m[c], scale[c],
                                                    shift[c]));
              });
            });
          });
      return;
    }
    Scratch<double> invstd_buf, mean_buf, var_buf;
    double* invstd = scratch(invstd_buf, C);
    const double* mean;
    const double* var;
    const ParamValues<double> rm(training ? c10::nullopt : running_mean),
        rv(training ? c10::nullopt : running_var);
    if (training) {
      double* mean_w = scratch(mean_buf, C);
      double* var_w = scratch(var_buf, C);
      channel_moments(xp, sh, mean_w, var_w);
      mean = mean_w;
      var = var_w;
    } else {
      mean = rm.ptr;
      var = rv.ptr;
    }
    for_channel_ranges(C, [&](int64_t c0, int64_t c1) {
      inv_std(var + c0, eps, invstd + c0, c1 - c0);
      set_channels(c0, c1, mean, var, invstd);
    });
    if (x.numel() == 0) return;
    const bool fold = std::all_of(folded, folded + C, [](char f) { return f != 0; });
    // every channel's constants finite: round without the NaN check (finite_all)
    const bool no_nan = all_finite(C, scale) && (fold ? all_finite(C, beta)
                                                      : all_finite(C, m) && all_finite(C, shift));
    with_stream(bn_stream(sh, 2, sizeof(scalar_t), yp), [&](auto nt) {
      with_no_nan<scalar_t>(no_nan, [&](auto nn) {
        constexpr bool NT = decltype(nt)::value, NN = decltype(nn)::value;
        if (fold && (!sh.channels_last || regroup<scalar_t>(sh))) {
          channel_apply<scalar_t, NT, NN>(nullptr, xp, yp, sh, nullptr, scale, nullptr, beta);
        } else if (fold) {
          Scratch<A> ls, lb;
          const A* sc = to_lane_order<scalar_t>(scale, C, ls);
          const A* be = to_lane_order<scalar_t>(beta, C, lb);
          for_row_tiles(sh.n * sh.s, C, row_tile<scalar_t>(2),
                        [&](int64_t r, int64_t j0, int64_t j1) {
            Rows<scalar_t>::template scale_shift<NT, NN>(xp + r * C + j0, yp + r * C + j0,
                                                         j1 - j0, sc + j0, be + j0);
          });
        } else {
          channel_apply<scalar_t, NT, NN>(nullptr, xp, yp, sh, nullptr, scale, m, shift);
        }
      });
    });
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
  at::Tensor dx = mask[0] ? empty_output(x, sh.channels_last) : at::empty({0}, x.options());
  at::Tensor dw = at::empty({mask[1] ? C : 0}, x.options().dtype(acc));
  at::Tensor db = at::empty({mask[2] ? C : 0}, x.options().dtype(acc));
  at::Tensor mean_c = save_mean.contiguous(), invstd_c = save_invstd.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    const A* mean = mean_c.const_data_ptr<A>();
    const A* invstd = invstd_c.const_data_ptr<A>();
    const ParamValues<A> wv(weight);
    const A* wp = wv.ptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t n = sh.count();
    A* dwp = mask[1] ? dw.mutable_data_ptr<A>() : nullptr;
    A* dbp = mask[2] ? db.mutable_data_ptr<A>() : nullptr;
    Scratch<A> a_buf, b_buf, k_buf;
    A* a = scratch(a_buf, C);
    A* b = training ? scratch(b_buf, C) : nullptr;
    A* k = training ? scratch(k_buf, C) : nullptr;
    // Channel c's weight/bias grads and the constants of its dx (BwdConstants).
    const BwdConstants<A> set_channels{wp, invstd, n, training, dwp, dbp, a, b, k};
    const bool need_sums = training || mask[1] || mask[2];
    // the folded sums and dx (kFoldBackward); k then holds k - b * mean
    const bool fold = fold_backward<scalar_t>(sh, training, mean, invstd);
    // channels whose folded sums came out NaN or Inf (see kFoldBackward), each flagged by the
    // one thread that sets its constants
    std::vector<char> unfold(fold ? C : 0, 0);
    // after set_channels(c, s1, s2) of a folded backward: k to k - b * mean, and c flagged where
    // its sums are not finite
    auto fold_channel = [&](int64_t c, double s1c, double s2c) {
      k[c] = static_cast<A>(static_cast<double>(k[c]) -
                            static_cast<double>(b[c]) * static_cast<double>(mean[c]));
      unfold[c] = !(std::isfinite(s1c) && std::isfinite(s2c));
    };
    auto unfold_marked = [&] {
      for (int64_t c = 0; c < static_cast<int64_t>(unfold.size()); ++c)
        if (unfold[c]) unfold_channel(gp, xp, dxp, sh, mean[c], c, set_channels, a, b, k);
    };
    if (need_sums && mask[0] && fused_planar(sh, 2 * sizeof(scalar_t), sizeof(scalar_t))) {
      // Each channel's sums, then its dx, while the channel's x and dy are in L2 (read from
      // memory once; fused_channels).
      const Planar pl(sh);
      const bool nt = bn_stream(sh, training ? 3 : 2, sizeof(scalar_t), dxp);
      Scratch<char> nan_free_buf;  // per channel: dx rounds without the NaN check (finite_all)
      char* nan_free = scratch(nan_free_buf, C);
      auto run = [&](auto folded) {
        constexpr bool F = decltype(folded)::value;
        fused_channels<Sum2, Sum2>(
            pl, FusedIo{sizeof(scalar_t), xp, gp},
            [&](Sum2& sums, int64_t c, int64_t off, int64_t len) {
              sums.merge(span_grad_sums<scalar_t, F>(gp + off, xp + off, len, mean[c]));
            },
            [](const Sum2& sums) { return sums; },
            [&](int64_t c, const Sum2* parts, int64_t P) {
              Sum2 sums = parts[0];
              for (int64_t q = 1; q < P; ++q) sums.merge(parts[q]);
              set_channels(c, sums.sd, sums.sdd);
              if constexpr (F) fold_channel(c, sums.sd, sums.sdd);
              nan_free[c] =
                  training ? finite_all(a[c], b[c], k[c], mean[c]) : finite_all(a[c]);
            },
            // c's dx; with sums, c + 1's next plane's sums in the same loop
            [&](int64_t c, int64_t off, int64_t len, Sum2* sums, int64_t off2, int64_t pf) {
              const A bc = training ? b[c] : A(0), mc = training ? mean[c] : A(0),
                      kc = training ? k[c] : A(0);
              with_flags(nt, training, [&](auto tag, auto has_x) {
                with_no_nan<scalar_t>(nan_free[c], [&](auto no_nan) {
                  constexpr bool NT = decltype(tag)::value, NN = decltype(no_nan)::value;
                  constexpr bool X = decltype(has_x)::value;  // eval: dx = a * dy
                  Sidecar<scalar_t, NT, DxBody<scalar_t, NT, NN, X, F && X>> side(
                      {gp + off, xp + off, dxp + off, a[c], bc, mc, kc}, len,
                      pf < 0 ? nullptr : gp + pf, pf < 0 ? nullptr : xp + pf);
                  if (sums)
                    sums->merge(span_grad_sums<scalar_t, F>(gp + off2, xp + off2, len,
                                                            mean[c + 1], side));
                  side.finish();
                });
              });
            });
      };
      if constexpr (kFoldBackward<scalar_t>) {
        if (fold) {
          run(std::true_type{});
          unfold_marked();
          return;
        }
      }
      run(std::false_type{});
      return;
    }
    Scratch<double> s1_buf, s2_buf;
    double* s1 = scratch(s1_buf, C);
    double* s2 = scratch(s2_buf, C);
    if (need_sums && x.numel() > 0) {
      channel_grad_sums(gp, xp, sh, mean, fold, s1, s2);
    } else {
      std::fill(s1, s1 + C, 0.0);
      std::fill(s2, s2 + C, 0.0);
    }
    for_channel_ranges(C, [&](int64_t c0, int64_t c1) {
      set_channels(c0, c1, s1, s2);
      if (fold)
        for (int64_t c = c0; c < c1; ++c) fold_channel(c, s1[c], s2[c]);
    });
    if (!mask[0] || x.numel() == 0) {
      unfold_marked();  // (sums and grads only: no dx)
      return;
    }
    // every channel's constants finite: round without the NaN check (finite_all)
    const bool no_nan =
        all_finite(C, a) && (!training || (all_finite(C, b) && all_finite(C, k) &&
                                           (fold || all_finite(C, mean))));
    with_stream(bn_stream(sh, training ? 3 : 2, sizeof(scalar_t), dxp), [&](auto nt) {
      with_no_nan<scalar_t>(no_nan, [&](auto nn) {
        channel_apply<scalar_t, decltype(nt)::value, decltype(nn)::value>(
            gp, training ? xp : nullptr, dxp, sh, a, b, training && !fold ? mean : nullptr, k);
      });
    });
    unfold_marked();
  });
  return {dx, dw, db};
}

}  // namespace CPU_CAPABILITY
}  // namespace normext::cpu
