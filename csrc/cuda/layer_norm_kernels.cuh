// LayerNorm kernels for CUDA (DESIGN.md, "The math"), over raw pointers and the two params structs
// below; they never see at::Tensor. csrc/cuda/layer_norm.cu checks inputs, allocates, picks a
// kernel and launches.
//
// x is viewed as `rows` contiguous rows of `cols` values (cols = product of normalized_shape).
// Accumulation type A: float for float/half/bfloat16, double for double.
//
// Statistics of a row, as on the CPU (csrc/cpu/vec_utils.h): pass 1 gives sum, min and max and a
// shift m = min if min == max (a constant row) else sum / cols; pass 2 gives sum(d) and sum(d^2)
// with d = x - m; then mean = m + sum(d) / cols, var = sum(d^2) / cols - (sum(d) / cols)^2,
// rstd = 1 / sqrt(var + eps), and y is computed from the differences as ((x - m) - sum(d) / cols)
// * rstd: a constant row has d == 0 exactly, so it normalizes to exactly 0, and a large offset
// (mean 1e4, std 1e-2 in float32) costs no precision in y beyond the rounding of x itself.
// Rows too long for registers (the *_large kernels) read x only twice: Welford's update over
// d = x - x[0] (the row's first value as the shift), which is exact for a constant row too (every
// d is 0), then y = ((x - x[0]) - mean(d)) * rstd.
//
// Two kernel families:
//   *_rows_kernel   a row lives in registers: blockDim = (threads_per_row, rows_per_block); the
//                   row group threadIdx.y owns one row at a time, each of its threads holds ITEMS
//                   vectors of VEC values, vector i of thread t being the row's vector
//                   i * threads_per_row + t (a warp's loads are consecutive 16-byte pieces).
//   *_large_kernel  one block of kLargeThreads per row, streaming the row from global memory (L2).
// Blocks stride over the rows (grid-stride loop; the launcher sizes the grid to what fits on the
// device at once).
//
// Reductions are deterministic: butterfly shuffles within a warp (all lanes end with the same,
// commutative result), then each warp's value through shared memory, combined in warp order by
// every thread; dweight/dbias go through per-row-group partial sums combined in a fixed order by a
// second kernel. No floating-point atomics: two runs give bitwise-equal results.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace normext::cuda {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kWarpSize = 32;
// Threads per block of the *_rows kernels at most (threads_per_row * rows_per_block).
constexpr int kRowsMaxThreads = 512;
constexpr int kRowsMaxWarps = kRowsMaxThreads / kWarpSize;
// Threads per block of the *_large kernels, and vectors each thread has in flight.
constexpr int kLargeThreads = 512;
constexpr int kLargeWarps = kLargeThreads / kWarpSize;
constexpr int kLargeUnroll = 4;
// blockDim.y of the column kernels (blockDim.x = kWarpSize columns).
constexpr int kColThreadsY = 16;

// Values per 16-byte vector: 4 float, 2 double, 8 half/bfloat16.
template <typename T>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));

// W: the weight/bias element type, A (float32 parameters next to a half input, or the input's
// own float/double) or the half input's own type (read and widened in the kernels: no separate
// conversion kernel per parameter per call).
template <typename T, typename A, typename W = A>
struct LayerNormFwdParams {
  const T* x;        // rows x cols
  T* y;              // rows x cols
  A* mean;           // rows
  A* rstd;           // rows
  const W* weight;   // cols, or null
  const W* bias;     // cols, or null
  int64_t rows;
  int64_t cols;
  A inv_cols;        // 1 / cols
  A eps;
};

template <typename T, typename A, typename W = A>
struct LayerNormBwdParams {
  const T* dy;       // rows x cols
  const T* x;        // rows x cols
  const A* mean;     // rows
  const A* rstd;     // rows
  const W* weight;   // cols, or null (W as in LayerNormFwdParams)
  T* dx;             // rows x cols, or null when grad_input is not asked for
  A* part_dweight;   // parts x cols partial sums of dy * xhat, or null when not asked for
  A* part_dbias;     // parts x cols partial sums of dy, or null when not asked for
  int64_t rows;
  int64_t cols;
  A inv_cols;        // 1 / cols
};

namespace detail {

template <typename E, int N>
struct alignas(sizeof(E) * N) Pack {
  E v[N];
};

// E values per memory access: VEC, split into 16-byte pieces when VEC values are wider (float
// weights next to a half input: 8 floats are two 16-byte loads).
template <typename E, int VEC>
constexpr int piece_width() {
  return VEC * static_cast<int>(sizeof(E)) > 16 ? 16 / static_cast<int>(sizeof(E)) : VEC;
}

// out[k] = p[k] for k < VEC, converted to A. p is aligned to min(16, VEC * sizeof(E)) bytes.
template <int VEC, typename E, typename A>
__device__ __forceinline__ void load_vec(const E* p, A (&out)[VEC]) {
  constexpr int P = piece_width<E, VEC>();
#pragma unroll
  for (int q = 0; q < VEC; q += P) {
    const Pack<E, P> pk = *reinterpret_cast<const Pack<E, P>*>(p + q);
#pragma unroll
    for (int k = 0; k < P; ++k) out[q + k] = static_cast<A>(pk.v[k]);
  }
}

// p[k] = in[k] for k < VEC, converted (rounded to nearest) to E.
template <int VEC, typename E, typename A>
__device__ __forceinline__ void store_vec(E* p, const A (&in)[VEC]) {
  constexpr int P = piece_width<E, VEC>();
#pragma unroll
  for (int q = 0; q < VEC; q += P) {
    Pack<E, P> pk;
#pragma unroll
    for (int k = 0; k < P; ++k) pk.v[k] = static_cast<E>(in[q + k]);
    *reinterpret_cast<Pack<E, P>*>(p + q) = pk;
  }
}

// fmin/fmax treat NaN alike in either argument order, so all lanes of a butterfly agree (a NaN
// still reaches the statistics through the sums).
__device__ __forceinline__ float min_of(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double min_of(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float rsqrt_of(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_of(double v) { return 1.0 / sqrt(v); }

template <typename A>
__device__ __forceinline__ A infinity() {
  if constexpr (std::is_same_v<A, double>) {
    return __longlong_as_double(0x7ff0000000000000LL);
  } else {
    return __int_as_float(0x7f800000);
  }
}

// Combiners for group_allreduce: a = a (op) b, slot by slot. Both are commutative, bit for bit.
struct SumMinMax {
  template <typename A>
  __device__ __forceinline__ void operator()(A (&a)[3], const A (&b)[3]) const {
    a[0] += b[0];
    a[1] = min_of(a[1], b[1]);
    a[2] = max_of(a[2], b[2]);
  }
};
struct Sum2 {
  template <typename A>
  __device__ __forceinline__ void operator()(A (&a)[2], const A (&b)[2]) const {
    a[0] += b[0];
    a[1] += b[1];
  }
};

// Every thread of a row group (threads with the same threadIdx.y; blockDim.x = 32 *
// warps_per_group) ends with `op` over the K values of all the group's threads, the same in every
// thread: butterfly shuffles within each warp, then, for a group of several warps, each warp's
// result through `smem` (at least blockDim.y * warps_per_group * K values), combined in warp order.
// With warps_per_group > 1 it contains a __syncthreads(): every thread of the block must call it,
// and a caller reusing `smem` must pass through another barrier first (the callers alternate
// buffers).
template <int K, typename A, typename Op>
__device__ __forceinline__ void group_allreduce(A (&v)[K], Op op, A* smem, int warps_per_group) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    A other[K];
#pragma unroll
    for (int k = 0; k < K; ++k) other[k] = __shfl_xor_sync(0xffffffffu, v[k], offset);
    op(v, other);
  }
  if (warps_per_group == 1) return;
  A* s = smem + threadIdx.y * warps_per_group * K;
  if (threadIdx.x % kWarpSize == 0) {
    const int warp = threadIdx.x / kWarpSize;
#pragma unroll
    for (int k = 0; k < K; ++k) s[warp * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = s[k];
  for (int w = 1; w < warps_per_group; ++w) {
    A other[K];
#pragma unroll
    for (int k = 0; k < K; ++k) other[k] = s[w * K + k];
    op(v, other);
  }
}

// Welford state of a set of values: count, mean and sum of squared differences to the mean.
template <typename A>
struct Welford {
  A n, mean, m2;
};

// Adds one value. The first value is taken as the mean as is, so a constant set keeps its value
// exactly as its mean (every later difference is 0).
template <typename A>
__device__ __forceinline__ void welford_add(Welford<A>& s, A v) {
  s.n += A(1);
  const A d = v - s.mean;
  s.mean = s.n == A(1) ? v : s.mean + d / s.n;
  s.m2 += d * (v - s.mean);
}

// Chan et al.'s merge; exact for two sets with the same mean (d == 0).
template <typename A>
__device__ __forceinline__ Welford<A> welford_merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == A(0)) return a;
  if (a.n == A(0)) return b;
  const A n = a.n + b.n;
  const A d = b.mean - a.mean;
  const A fb = b.n / n;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

// Welford over a whole block (blockDim = (kLargeThreads, 1)); every thread gets the same result.
// smem: kLargeWarps * 3 values; it contains a __syncthreads() (same reuse rule as above). The
// merge is not commutative bit for bit, so the warp step is a tree towards lane 0 (its partners
// always hold complete subtrees) followed by a broadcast.
template <typename A>
__device__ __forceinline__ Welford<A> block_welford(Welford<A> s, A* smem) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const Welford<A> o{__shfl_down_sync(0xffffffffu, s.n, offset),
                       __shfl_down_sync(0xffffffffu, s.mean, offset),
                       __shfl_down_sync(0xffffffffu, s.m2, offset)};
    s = welford_merge(s, o);
  }
  if (threadIdx.x % kWarpSize == 0) {
    const int warp = threadIdx.x / kWarpSize;
    smem[warp * 3 + 0] = s.n;
    smem[warp * 3 + 1] = s.mean;
    smem[warp * 3 + 2] = s.m2;
  }
  __syncthreads();
  s = {smem[0], smem[1], smem[2]};
  for (int w = 1; w < kLargeWarps; ++w)
    s = welford_merge(s, {smem[w * 3], smem[w * 3 + 1], smem[w * 3 + 2]});
  return s;
}

}  // namespace detail

// Forward, row in registers: y = (x - mean) * rstd * weight + bias (as ((x - m) - sum(d) / cols)
// * rstd * weight + bias), mean/rstd from the shifted two-pass sums above, both passes over the
// registers (x is read once).
// Work split: see the top of the file; the row group's ITEMS * VEC values per thread cover the row
// (threads_per_row * ITEMS * VEC >= cols, the launcher checks), the excess slots are idle.
template <typename T, typename A, int VEC, int ITEMS, typename W = A>
__global__ void __launch_bounds__(kRowsMaxThreads)
    layer_norm_fwd_rows_kernel(const LayerNormFwdParams<T, A, W> p) {
  __shared__ A smem1[kRowsMaxWarps * 3];
  __shared__ A smem2[kRowsMaxWarps * 2];
  const int threads_per_row = blockDim.x;
  const int warps_per_row = threads_per_row / kWarpSize;
  const int64_t nvec = p.cols / VEC;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y; first < p.rows;
       first += row_step) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < p.rows;
    const int64_t offset = (active ? row : 0) * p.cols;
    A v[ITEMS][VEC];
    bool ok[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c = static_cast<int64_t>(i) * threads_per_row + threadIdx.x;
      ok[i] = active && c < nvec;
      if (ok[i]) {
        detail::load_vec<VEC>(p.x + offset + c * VEC, v[i]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = A(0);
      }
    }

    A s1[3] = {A(0), detail::infinity<A>(), -detail::infinity<A>()};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (!ok[i]) continue;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        s1[0] += v[i][k];
        s1[1] = detail::min_of(s1[1], v[i][k]);
        s1[2] = detail::max_of(s1[2], v[i][k]);
      }
    }
    detail::group_allreduce(s1, detail::SumMinMax{}, smem1, warps_per_row);
    const A m = s1[1] == s1[2] ? s1[1] : s1[0] * p.inv_cols;

    A s2[2] = {A(0), A(0)};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (!ok[i]) continue;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A d = v[i][k] - m;
        s2[0] += d;
        s2[1] += d * d;
      }
    }
    detail::group_allreduce(s2, detail::Sum2{}, smem2, warps_per_row);
    const A dm = s2[0] * p.inv_cols;
    A var = s2[1] * p.inv_cols - dm * dm;
    if (var < A(0)) var = A(0);  // rounding; a NaN stays NaN
    const A mean = m + dm;
    const A rstd = detail::rsqrt_of(var + p.eps);
    if (active && threadIdx.x == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }

#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (!ok[i]) continue;
      const int64_t c = static_cast<int64_t>(i) * threads_per_row + threadIdx.x;
      A w[VEC], b[VEC], out[VEC];
      if (p.weight != nullptr) {
        detail::load_vec<VEC>(p.weight + c * VEC, w);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) w[k] = A(1);
      }
      if (p.bias != nullptr) {
        detail::load_vec<VEC>(p.bias + c * VEC, b);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) b[k] = A(0);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = ((v[i][k] - m) - dm) * rstd * w[k] + b[k];
      detail::store_vec<VEC>(p.y + offset + c * VEC, out);
    }
  }
}

// Forward for long rows: one block per row; Welford statistics of d = x - x[0] in one read of x,
// then a second read (mostly from L2) for y = (d - mean(d)) * rstd * weight + bias, and
// mean = x[0] + mean(d).
// Work split: thread t handles vectors t, t + kLargeThreads, ... of the row, kLargeUnroll vectors
// loaded before any is used.
template <typename T, typename A, int VEC, typename W = A>
__global__ void __launch_bounds__(kLargeThreads)
    layer_norm_fwd_large_kernel(const LayerNormFwdParams<T, A, W> p) {
  __shared__ A smem[2][kLargeWarps * 3];
  const int64_t nvec = p.cols / VEC;
  const int64_t step = static_cast<int64_t>(kLargeUnroll) * kLargeThreads;
  int parity = 0;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = p.x + row * p.cols;
    T* y = p.y + row * p.cols;
    const A shift = static_cast<A>(x[0]);
    detail::Welford<A> st{A(0), A(0), A(0)};
    for (int64_t c0 = threadIdx.x; c0 < nvec; c0 += step) {
      A v[kLargeUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kLargeUnroll; ++u) {
        const int64_t c = c0 + static_cast<int64_t>(u) * kLargeThreads;
        if (c < nvec) detail::load_vec<VEC>(x + c * VEC, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kLargeUnroll; ++u) {
        if (c0 + static_cast<int64_t>(u) * kLargeThreads >= nvec) break;
#pragma unroll
        for (int k = 0; k < VEC; ++k) detail::welford_add(st, v[u][k] - shift);
      }
    }
    st = detail::block_welford(st, smem[parity]);
    parity ^= 1;
    A var = st.m2 * p.inv_cols;
    if (var < A(0)) var = A(0);
    const A dm = st.mean;  // mean of x - shift
    const A rstd = detail::rsqrt_of(var + p.eps);
    if (threadIdx.x == 0) {
      p.mean[row] = shift + dm;
      p.rstd[row] = rstd;
    }

    for (int64_t c0 = threadIdx.x; c0 < nvec; c0 += step) {
      A v[kLargeUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kLargeUnroll; ++u) {
        const int64_t c = c0 + static_cast<int64_t>(u) * kLargeThreads;
        if (c < nvec) detail::load_vec<VEC>(x + c * VEC, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kLargeUnroll; ++u) {
        const int64_t c = c0 + static_cast<int64_t>(u) * kLargeThreads;
        if (c >= nvec) break;
        A w[VEC], b[VEC], out[VEC];
        if (p.weight != nullptr) {
          detail::load_vec<VEC>(p.weight + c * VEC, w);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) w[k] = A(1);
        }
        if (p.bias != nullptr) {
          detail::load_vec<VEC>(p.bias + c * VEC, b);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) b[k] = A(0);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = ((v[u][k] - shift) - dm) * rstd * w[k] + b[k];
        detail::store_vec<VEC>(y + c * VEC, out);
      }
    }
  }
}

// Backward, row in registers. Per row, with xhat = (x - mean) * rstd and g = weight * dy:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (x and dy read once),
// and per column, summed over the rows this row group handles, in registers:
//   part_dweight[group, j] = sum dy * xhat,  part_dbias[group, j] = sum dy,
// written once at the end (group = blockIdx.x * blockDim.y + threadIdx.y; a thread always owns
// the same columns). layer_norm_bwd_param_reduce_kernel adds the groups' rows in order.
// Work split: as layer_norm_fwd_rows_kernel.
template <typename T, typename A, int VEC, int ITEMS, typename W = A>
__global__ void __launch_bounds__(kRowsMaxThreads)
    layer_norm_bwd_rows_kernel(const LayerNormBwdParams<T, A, W> p) {
  __shared__ A smem[2][kRowsMaxWarps * 2];
  const int threads_per_row = blockDim.x;
  const int warps_per_row = threads_per_row / kWarpSize;
  const int64_t nvec = p.cols / VEC;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  A dw[ITEMS][VEC], db[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[i][k] = db[i][k] = A(0);
  }
  int parity = 0;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y; first < p.rows;
       first += row_step) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < p.rows;
    const int64_t offset = (active ? row : 0) * p.cols;
    const A mean = active ? p.mean[row] : A(0);
    const A rstd = active ? p.rstd[row] : A(0);
    A xh[ITEMS][VEC], g[ITEMS][VEC];
    bool ok[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c = static_cast<int64_t>(i) * threads_per_row + threadIdx.x;
      ok[i] = active && c < nvec;
      if (ok[i]) {
        detail::load_vec<VEC>(p.x + offset + c * VEC, xh[i]);
        detail::load_vec<VEC>(p.dy + offset + c * VEC, g[i]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xh[i][k] = g[i][k] = A(0);
      }
    }

    A s[2] = {A(0), A(0)};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (!ok[i]) continue;
      const int64_t c = static_cast<int64_t>(i) * threads_per_row + threadIdx.x;
      A w[VEC];
      if (p.weight != nullptr) {
        detail::load_vec<VEC>(p.weight + c * VEC, w);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) w[k] = A(1);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        xh[i][k] = (xh[i][k] - mean) * rstd;
        dw[i][k] += g[i][k] * xh[i][k];
        db[i][k] += g[i][k];
        g[i][k] *= w[k];
        s[0] += g[i][k];
        s[1] += g[i][k] * xh[i][k];
      }
    }

    if (p.dx != nullptr) {
      detail::group_allreduce(s, detail::Sum2{}, smem[parity], warps_per_row);
      parity ^= 1;
      const A c1 = s[0] * p.inv_cols, c2 = s[1] * p.inv_cols;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if (!ok[i]) continue;
        const int64_t c = static_cast<int64_t>(i) * threads_per_row + threadIdx.x;
        A out[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = rstd * (g[i][k] - c1 - xh[i][k] * c2);
        detail::store_vec<VEC>(p.dx + offset + c * VEC, out);
      }
    }
  }

  const int64_t part = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t c = static_cast<int64_t>(i) * threads_per_row + threadIdx.x;
    if (c >= nvec) continue;
    const int64_t at = part * p.cols + c * VEC;
    if (p.part_dweight != nullptr) detail::store_vec<VEC>(p.part_dweight + at, dw[i]);
    if (p.part_dbias != nullptr) detail::store_vec<VEC>(p.part_dbias + at, db[i]);
  }
}

// Backward dx for long rows: one block per row; sums of g and g * xhat in a first read of x and
// dy, then dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) in a second read.
// Work split: as layer_norm_fwd_large_kernel. dweight/dbias come from
// layer_norm_bwd_col_partials_kernel.
template <typename T, typename A, int VEC, typename W = A>
__global__ void __launch_bounds__(kLargeThreads)
    layer_norm_bwd_large_kernel(const LayerNormBwdParams<T, A, W> p) {
  __shared__ A smem[2][kLargeWarps * 2];
  const int64_t nvec = p.cols / VEC;
  const int64_t step = static_cast<int64_t>(kLargeUnroll) * kLargeThreads;
  int parity = 0;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = p.x + row * p.cols;
    const T* dy = p.dy + row * p.cols;
    T* dx = p.dx + row * p.cols;
    const A mean = p.mean[row], rstd = p.rstd[row];
    A s[2] = {A(0), A(0)};  // sum(g), sum(g * xhat)
    for (int pass = 0; pass < 2; ++pass) {
      const A c1 = s[0] * p.inv_cols, c2 = s[1] * p.inv_cols;
      for (int64_t c0 = threadIdx.x; c0 < nvec; c0 += step) {
        A xv[kLargeUnroll][VEC], gv[kLargeUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kLargeUnroll; ++u) {
          const int64_t c = c0 + static_cast<int64_t>(u) * kLargeThreads;
          if (c < nvec) {
            detail::load_vec<VEC>(x + c * VEC, xv[u]);
            detail::load_vec<VEC>(dy + c * VEC, gv[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kLargeUnroll; ++u) {
          const int64_t c = c0 + static_cast<int64_t>(u) * kLargeThreads;
          if (c >= nvec) break;
          A w[VEC], out[VEC];
          if (p.weight != nullptr) {
            detail::load_vec<VEC>(p.weight + c * VEC, w);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) w[k] = A(1);
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A xhat = (xv[u][k] - mean) * rstd;
            const A gk = gv[u][k] * w[k];
            if (pass == 0) {
              s[0] += gk;
              s[1] += gk * xhat;
            } else {
              out[k] = rstd * (gk - c1 - xhat * c2);
            }
          }
          if (pass == 1) detail::store_vec<VEC>(dx + c * VEC, out);
        }
      }
      if (pass == 0) {
        detail::group_allreduce(s, detail::Sum2{}, smem[parity], kLargeWarps);
        parity ^= 1;
      }
    }
  }
}

// Column partial sums for long rows, a slice of rows at a time:
//   part_dweight[s, j] = sum over rows r of slice s of dy[r, j] * (x[r, j] - mean[r]) * rstd[r],
//   part_dbias[s, j]   = sum over the same rows of dy[r, j].
// Work split: blockIdx.x picks 32 columns (threadIdx.x), blockIdx.y the slice of rows_per_part
// rows; threadIdx.y sums rows threadIdx.y, threadIdx.y + kColThreadsY, ... of the slice, and
// the kColThreadsY sums are added in order.
template <typename T, typename A, typename W = A>
__global__ void __launch_bounds__(kWarpSize* kColThreadsY)
    layer_norm_bwd_col_partials_kernel(const LayerNormBwdParams<T, A, W> p,
                                       int64_t rows_per_part) {
  __shared__ A sdw[kColThreadsY][kWarpSize + 1];
  __shared__ A sdb[kColThreadsY][kWarpSize + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_part;
  const int64_t r1 = r0 + rows_per_part < p.rows ? r0 + rows_per_part : p.rows;
  A dw = A(0), db = A(0);
  if (col < p.cols) {
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColThreadsY) {
      const A g = static_cast<A>(p.dy[r * p.cols + col]);
      const A xhat = (static_cast<A>(p.x[r * p.cols + col]) - p.mean[r]) * p.rstd[r];
      dw += g * xhat;
      db += g;
    }
  }
  sdw[threadIdx.y][threadIdx.x] = dw;
  sdb[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y != 0 || col >= p.cols) return;
  for (int t = 1; t < kColThreadsY; ++t) {
    dw += sdw[t][threadIdx.x];
    db += sdb[t][threadIdx.x];
  }
  const int64_t at = static_cast<int64_t>(blockIdx.y) * p.cols + col;
  if (p.part_dweight != nullptr) p.part_dweight[at] = dw;
  if (p.part_dbias != nullptr) p.part_dbias[at] = db;
}

// Sums of partial rows, a chunk at a time: out_dweight[s, j] = sum of in_dweight[r, j] over the
// rows r of chunk s (rows s * rows_per_chunk, ... up to `rows`), out_dbias likewise; null
// pointers skip that gradient. One chunk of all rows gives dweight/dbias; the launcher may first
// reduce many partial rows to fewer chunks (a fixed split, so the result stays deterministic).
// Work split: blockIdx.x picks 32 columns (threadIdx.x), blockIdx.y the chunk; threadIdx.y sums
// rows threadIdx.y, threadIdx.y + kColThreadsY, ... of the chunk, and the kColThreadsY sums are
// added in order.
template <typename A>
__global__ void __launch_bounds__(kWarpSize* kColThreadsY)
    layer_norm_bwd_param_reduce_kernel(const A* in_dweight, const A* in_dbias, A* out_dweight,
                                       A* out_dbias, int64_t rows, int64_t rows_per_chunk,
                                       int64_t cols) {
  __shared__ A sdw[kColThreadsY][kWarpSize + 1];
  __shared__ A sdb[kColThreadsY][kWarpSize + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  A dw = A(0), db = A(0);
  if (col < cols) {
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColThreadsY) {
      if (in_dweight != nullptr) dw += in_dweight[r * cols + col];
      if (in_dbias != nullptr) db += in_dbias[r * cols + col];
    }
  }
  sdw[threadIdx.y][threadIdx.x] = dw;
  sdb[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
  for (int t = 1; t < kColThreadsY; ++t) {
    dw += sdw[t][threadIdx.x];
    db += sdb[t][threadIdx.x];
  }
  const int64_t at = static_cast<int64_t>(blockIdx.y) * cols + col;
  if (out_dweight != nullptr) out_dweight[at] = dw;
  if (out_dbias != nullptr) out_dbias[at] = db;
}

}  // namespace normext::cuda
