// BatchNorm CUDA kernels over raw pointers and BnParams; csrc/cuda/batch_norm.cu checks the
// inputs, fills BnParams, picks the vector width and the grid, and launches them. The math is
// DESIGN.md's, as in the CPU twin csrc/cpu/batch_norm.cpp:
//   mean, var (biased) per channel over N x spatial; invstd = 1 / sqrt(var + eps);
//   y = (x - mean) * (weight * invstd) + bias;
//   backward (training): with S1 = sum(dy), S2 = sum(dy * (x - mean)) per channel and n values,
//     dbias = S1, dweight = S2 * invstd,
//     dx = weight * invstd * (dy - S1 / n - (x - mean) * invstd^2 * S2 / n);
//   backward (eval): dx = weight * invstd * dy.
//
// Layouts (csrc/common.h): planar (N, C, S), each (n, c) plane S consecutive values, or
// channels-last (N * S rows of C consecutive values). Each kernel reads V consecutive values per
// load (16 bytes when the sizes and pointers allow), all V in one channel (planar: S % V == 0) or
// in V consecutive channels (channels-last: C % V == 0).
//
// Reductions (statistics, gradient sums) are two kernels:
//   1. bn_stats_kernel / bn_grad_sums_kernel: block (g, u) reduces column u (a channel, or TX
//      channel vectors side by side in channels-last) over its share g of the N x S values; each
//      thread accumulates chunks of U loads, the block merges threads with warp shuffles and then
//      across warps through shared memory, and writes one partial per channel to
//      partial[part][g][c] (acc dtype);
//   2. bn_stats_finalize_kernel / bn_grad_finalize_kernel merge the G partials of each channel in
//      a fixed order (in double) and write the per-channel results, plus the coefficients of
//      bn_apply_kernel. With G == 1 the reduction kernel does this itself.
// Every merge order depends only on the shape and the launch configuration (which depends on the
// shape and the device), so two runs give bitwise-equal results; there are no atomics.
//
// Statistics are Welford/Chan over d = x - pilot, where the pilot is the channel's first value:
// a constant channel gives d = 0 exactly, hence mean = pilot exactly and var = 0; large offsets
// (mean 1e4, std 1e-2) never reach the float32 running means, whose rounding would otherwise
// bias the variance; and the running means stay small, so they do not stagnate over long runs.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace normext::cuda::bn {

// Accumulation and statistics dtype: float for float/half/bfloat16, double for double.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kWarpSize = 32;
constexpr int kPlanarThreads = 512;  // largest block of the planar reductions (1-D)
constexpr int kRowsThreads = 256;    // block of the channels-last reductions (TX x TY)
constexpr int kApplyThreads = 256;   // block of bn_apply_kernel
// Resident blocks per multiprocessor that bn_apply_kernel must allow (__launch_bounds__): at
// most 128 registers, so at least 512 threads per multiprocessor, each with U loads in flight.
// (3 blocks, 80 registers, spilled in the bfloat16 training-backward variants; the reductions
// keep the compiler's own choice, which does not spill.)
constexpr int kApplyMinBlocks = 2;
constexpr int kFinalX = 8;   // bn_*_finalize_kernel block: 8 channels x
constexpr int kFinalY = 64;  //   64 slices of the G partials
// Values one thread accumulates per channel, at most (the launcher grows G instead), so that
// float sums and Welford merges stay short.
constexpr int64_t kMaxPerThread = 4096;
// Chunks one thread accumulates, at least (below that the block reduction dominates).
constexpr int64_t kMinChunks = 2;

// Loads in flight per thread and loop iteration: U vectors of V values.
template <int V>
constexpr int unroll() {
  return V == 1 ? 8 : 4;
}

// bn_apply_kernel's U: the same bytes in flight per thread whether it reads one tensor or two.
template <int V, bool kTwoInputs>
constexpr int apply_unroll() {
  return kTwoInputs ? unroll<V>() / 2 : unroll<V>();
}

// A per-channel parameter (weight, bias, running statistic) read in its own dtype: float32,
// float64, float16 or bfloat16, widened exactly to double. Converting it to the accumulation
// dtype beforehand was one more small op and allocation per tensor and call (2 in a training
// forward, 4 in eval, 1 in a backward, with half-precision parameters), which counts where a
// small BatchNorm is bound by the host. Only the per-channel finishing code reads these.
struct ParamPtr {
  enum Kind : int { kFloat, kDouble, kHalf, kBFloat16 };
  const void* data = nullptr;
  int kind = kFloat;
  __host__ __device__ explicit operator bool() const { return data != nullptr; }
  __device__ __forceinline__ double operator[](int64_t i) const {
    switch (kind) {
      case kDouble:
        return static_cast<const double*>(data)[i];
      case kHalf:
        return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
      case kBFloat16:
        return static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
      default:
        return static_cast<const float*>(data)[i];
    }
  }
};

// Everything a kernel needs; pointers that a pass does not use are nullptr.
template <typename T>
struct BnParams {
  using A = acc_t<T>;
  const T* x = nullptr;   // input, planar or channels-last
  const T* dy = nullptr;  // grad_out, in x's layout (backward)
  T* out = nullptr;       // y (forward) or dx (backward), in x's layout
  int64_t n = 0, c = 0, s = 0;  // batch, channels, spatial
  int64_t pilot_stride = 0;     // channel c's first value is x[c * pilot_stride]
  int64_t groups = 0;           // G: blocks per channel along N x S; partials are [parts][G][C]
  A* partial = nullptr;
  // per-channel inputs (contiguous): the parameters in their own dtype, the saved statistics
  // in the acc dtype
  ParamPtr weight, bias;
  ParamPtr running_mean, running_var;  // eval forward
  const A* mean = nullptr;             // backward: save_mean
  const A* invstd = nullptr;           // backward: save_invstd
  // per-channel outputs (acc dtype); nullptr when not wanted
  A* save_mean = nullptr;
  A* save_invstd = nullptr;
  A* batch_var = nullptr;
  A* grad_weight = nullptr;
  A* grad_bias = nullptr;
  // [4][C]: the a, b, m, k of bn_apply_kernel (out = a * dy + b * (x - m) + k)
  A* coef = nullptr;
  double eps = 0;
  bool training = false;
};

// ---- small device helpers ---------------------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

__device__ __forceinline__ float fmadd(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fmadd(double a, double b, double c) { return __fma_rn(a, b, c); }

// Walks i = start, start + step, start + 2 step, ... over an index space of `inner` minors per
// major, keeping major = i / inner, minor = i % inner and cls = major % classes up to date with
// additions only (one division per thread, at the start).
struct Cursor {
  int64_t major, minor, cls;
  int64_t inner, classes, d_major, d_minor, d_cls;

  __device__ Cursor(int64_t start, int64_t step, int64_t inner_, int64_t classes_)
      : inner(inner_), classes(classes_) {
    major = start / inner;
    minor = start - major * inner;
    cls = major % classes;
    d_major = step / inner;
    d_minor = step - d_major * inner;
    d_cls = d_major % classes;
  }

  __device__ __forceinline__ void advance() {
    major += d_major;
    minor += d_minor;
    cls += d_cls;
    if (minor >= inner) {
      minor -= inner;
      ++major;
      ++cls;
    }
    if (cls >= classes) cls -= classes;  // cls < 2 * classes here
  }
};

// ---- the two reductions -----------------------------------------------------------------------

// Welford/Chan state of the values d = x - pilot: count, mean, sum of squared deviations.
template <typename M>
struct Welford {
  M n, mean, m2;
};

template <typename M>
__device__ __forceinline__ void merge(Welford<M>& a, const Welford<M>& b) {
  if (b.n == M(0)) return;
  if (a.n == M(0)) {
    a = b;
    return;
  }
  const M n = a.n + b.n;
  const M r = b.n / n;
  const M delta = b.mean - a.mean;
  a.mean += delta * r;
  a.m2 += b.m2 + delta * delta * a.n * r;  // na * nb / n
  a.n = n;
}

template <typename M>
__device__ __forceinline__ Welford<M> shfl_down(const Welford<M>& s, int off) {
  return {__shfl_down_sync(0xffffffffu, s.n, off), __shfl_down_sync(0xffffffffu, s.mean, off),
          __shfl_down_sync(0xffffffffu, s.m2, off)};
}

template <typename M>
__device__ __forceinline__ Welford<double> promote(const Welford<M>& s) {
  return {static_cast<double>(s.n), static_cast<double>(s.mean), static_cast<double>(s.m2)};
}

// S1 = sum(dy), S2 = sum(dy * (x - mean)).
template <typename M>
struct GradSums {
  M s1, s2;
};

template <typename M>
__device__ __forceinline__ void merge(GradSums<M>& a, const GradSums<M>& b) {
  a.s1 += b.s1;
  a.s2 += b.s2;
}

template <typename M>
__device__ __forceinline__ GradSums<M> shfl_down(const GradSums<M>& s, int off) {
  return {__shfl_down_sync(0xffffffffu, s.s1, off), __shfl_down_sync(0xffffffffu, s.s2, off)};
}

template <typename M>
__device__ __forceinline__ GradSums<double> promote(const GradSums<M>& s) {
  return {static_cast<double>(s.s1), static_cast<double>(s.s2)};
}

// Per-channel results of the forward statistics (training: from the merged Welford state;
// eval: from the running statistics), and the apply coefficients b = weight * invstd,
// m = mean, k = bias, as the CPU computes them (invstd in double).
template <typename T>
__device__ void bn_stats_finish(const BnParams<T>& p, int64_t ch, const Welford<double>& s) {
  using A = acc_t<T>;
  double mean = 0, var = 0;
  if (!p.training) {
    mean = p.running_mean[ch];
    var = p.running_var[ch];
  } else if (s.n > 0) {
    mean = static_cast<double>(static_cast<A>(p.x[ch * p.pilot_stride])) + s.mean;
    var = s.m2 / s.n;
    if (var < 0) var = 0;
  }
  const double invstd = 1.0 / ::sqrt(var + p.eps);
  p.save_mean[ch] = static_cast<A>(mean);
  p.save_invstd[ch] = static_cast<A>(invstd);
  if (p.training) p.batch_var[ch] = static_cast<A>(var);
  const int64_t C = p.c;
  p.coef[C + ch] = static_cast<A>(p.weight ? p.weight[ch] * invstd : invstd);
  p.coef[2 * C + ch] = static_cast<A>(mean);
  p.coef[3 * C + ch] = p.bias ? static_cast<A>(p.bias[ch]) : A(0);
}

// Per-channel results of the backward sums: dweight, dbias, and the dx coefficients
// a = weight * invstd and (training) b = -a * invstd^2 * S2 / n, m = mean, k = -a * S1 / n.
template <typename T>
__device__ void bn_grad_finish(const BnParams<T>& p, int64_t ch, const GradSums<double>& s) {
  using A = acc_t<T>;
  const double r = static_cast<double>(p.invstd[ch]);
  if (p.grad_weight) p.grad_weight[ch] = static_cast<A>(s.s2 * r);
  if (p.grad_bias) p.grad_bias[ch] = static_cast<A>(s.s1);
  if (p.coef == nullptr) return;
  const int64_t C = p.c;
  const double gr = (p.weight ? p.weight[ch] : 1.0) * r;
  p.coef[ch] = static_cast<A>(gr);
  if (p.training) {
    const double n = static_cast<double>(p.n * p.s);
    p.coef[C + ch] = static_cast<A>(-gr * r * r * s.s2 / n);
    p.coef[2 * C + ch] = p.mean[ch];
    p.coef[3 * C + ch] = static_cast<A>(-gr * s.s1 / n);
  }
}

// The forward statistics as a reduction: Welford over d = x - pilot.
template <typename A>
struct StatsOp {
  template <typename M>
  using Slot = Welford<M>;
  static constexpr int kParts = 3;
  static constexpr bool kReadsGrad = false;

  template <typename T>
  static __device__ __forceinline__ A ref(const BnParams<T>& p, int64_t ch) {
    return static_cast<A>(p.x[ch * p.pilot_stride]);
  }

  // A chunk of NV values of one channel, the first k valid (the others hold `pilot`): its mean
  // and squared deviations exactly (two passes over registers), then one Chan merge.
  template <int NV>
  static __device__ __forceinline__ void push(Slot<A>& s, const A (&x)[NV], const A (&)[NV], int k,
                                              A pilot) {
    A d[NV];
    A sum = 0;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      d[i] = x[i] - pilot;
      sum += d[i];
    }
    const A kn = static_cast<A>(k);
    // k == NV (every chunk but a thread's last) is a power of two: the product is the quotient.
    static_assert((NV & (NV - 1)) == 0, "chunks of a power of two values");
    const A cm = k == NV ? sum * (A(1) / A(NV)) : sum / kn;
    A cm2 = 0;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const A e = i < k ? d[i] - cm : A(0);
      cm2 = fmadd(e, e, cm2);
    }
    merge(s, Slot<A>{kn, cm, cm2});
  }

  static __device__ __forceinline__ void store(A* p, int64_t stride, const Slot<A>& s) {
    p[0] = s.n;
    p[stride] = s.mean;
    p[2 * stride] = s.m2;
  }
  static __device__ __forceinline__ Slot<A> load(const A* p, int64_t stride) {
    return {p[0], p[stride], p[2 * stride]};
  }
  template <typename T>
  static __device__ __forceinline__ void finish(const BnParams<T>& p, int64_t ch,
                                                const Slot<double>& s) {
    bn_stats_finish(p, ch, s);
  }
};

// The backward sums as a reduction: S1 = sum(dy), S2 = sum(dy * (x - mean)).
template <typename A>
struct GradOp {
  template <typename M>
  using Slot = GradSums<M>;
  static constexpr int kParts = 2;
  static constexpr bool kReadsGrad = true;

  template <typename T>
  static __device__ __forceinline__ A ref(const BnParams<T>& p, int64_t ch) {
    return p.mean[ch];
  }

  // Padding values hold x = mean, dy = 0, so they add nothing.
  template <int NV>
  static __device__ __forceinline__ void push(Slot<A>& s, const A (&x)[NV], const A (&g)[NV], int,
                                              A mean) {
    A s1 = 0, s2 = 0;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      s1 += g[i];
      s2 = fmadd(g[i], x[i] - mean, s2);
    }
    s.s1 += s1;
    s.s2 += s2;
  }

  static __device__ __forceinline__ void store(A* p, int64_t stride, const Slot<A>& s) {
    p[0] = s.s1;
    p[stride] = s.s2;
  }
  static __device__ __forceinline__ Slot<A> load(const A* p, int64_t stride) {
    return {p[0], p[stride]};
  }
  template <typename T>
  static __device__ __forceinline__ void finish(const BnParams<T>& p, int64_t ch,
                                                const Slot<double>& s) {
    bn_grad_finish(p, ch, s);
  }
};

// Planar: this thread's share of channel c. Vector j of the channel (V values of one plane) is
// taken by thread j % (G * B) of the channel's blocks, so consecutive threads read consecutive
// vectors; U vectors are loaded before any is used.
template <class Op, typename T, int V>
__device__ __forceinline__ void reduce_planes(const BnParams<T>& p, int64_t c, acc_t<T> ref,
                                              typename Op::template Slot<acc_t<T>>& st) {
  using A = acc_t<T>;
  constexpr int U = unroll<V>();
  const int64_t N = p.n, C = p.c, S = p.s;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  Cursor cur(start, step, S / V, 1);  // major: n, minor: vector within the plane
  while (cur.major < N) {
    Vec<T, V> xr[U], gr[U];
    int k = 0;
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (cur.major < N) {
        const int64_t off = (cur.major * C + c) * S + cur.minor * V;
        xr[j] = load_vec<T, V>(p.x + off);
        if constexpr (Op::kReadsGrad) gr[j] = load_vec<T, V>(p.dy + off);
        ++k;
      }
      cur.advance();
    }
    A xv[U * V], gv[U * V];
#pragma unroll
    for (int j = 0; j < U; ++j) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        xv[j * V + i] = ref;
        gv[j * V + i] = A(0);
        if (j < k) {
          xv[j * V + i] = static_cast<A>(xr[j].v[i]);
          if constexpr (Op::kReadsGrad) gv[j * V + i] = static_cast<A>(gr[j].v[i]);
        }
      }
    }
    Op::template push<U * V>(st, xv, gv, k * V, ref);
  }
}

// Channels-last: this thread's share of rows for channel vector cv (channels cv*V .. cv*V+V-1).
// Threads (tx, ty) of a block read row r's vector tx, so a warp reads 32 / TX rows' consecutive
// vectors; U rows are loaded before any is used, then each of the V channels takes a chunk of
// U values.
template <class Op, typename T, int V>
__device__ __forceinline__ void reduce_rows(const BnParams<T>& p, int64_t cv,
                                            const acc_t<T> (&ref)[V],
                                            typename Op::template Slot<acc_t<T>> (&st)[V]) {
  using A = acc_t<T>;
  constexpr int U = unroll<V>();
  const int64_t C = p.c, R = p.n * p.s;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < R;
       r += U * step) {
    Vec<T, V> xr[U], gr[U];
    int k = 0;
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int64_t rj = r + j * step;
      if (rj < R) {
        const int64_t off = rj * C + cv * V;
        xr[j] = load_vec<T, V>(p.x + off);
        if constexpr (Op::kReadsGrad) gr[j] = load_vec<T, V>(p.dy + off);
        ++k;
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      A xv[U], gv[U];
#pragma unroll
      for (int j = 0; j < U; ++j) {
        xv[j] = ref[i];
        gv[j] = A(0);
        if (j < k) {
          xv[j] = static_cast<A>(xr[j].v[i]);
          if constexpr (Op::kReadsGrad) gv[j] = static_cast<A>(gr[j].v[i]);
        }
      }
      Op::template push<U>(st[i], xv, gv, k, ref[i]);
    }
  }
}

// One block's reduction (see the top of the file). Planar: blockDim = (B), each block column
// is one channel (K = 1 slot per thread). Channels-last: blockDim = (TX, TY) with TX a power of
// two <= 32, each block column is TX channel vectors (K = V slots per thread, one per channel).
template <class Op, typename T, int V, bool CL>
__device__ __forceinline__ void bn_reduce(const BnParams<T>& p) {
  using A = acc_t<T>;
  using Slot = typename Op::template Slot<A>;
  constexpr int K = CL ? V : 1;
  constexpr int kWarps = (CL ? kRowsThreads : kPlanarThreads) / kWarpSize;
  constexpr int kLanes = CL ? kWarpSize : 1;
  __shared__ Slot smem[kWarps][kLanes][K];

  const int tx = CL ? static_cast<int>(threadIdx.x) : 0;
  const int TX = CL ? static_cast<int>(blockDim.x) : 1;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;  // lane % TX == tx
  const int warps = blockDim.x * blockDim.y / kWarpSize;
  const int64_t C = p.c;
  const int64_t cols = CL ? C / V : C;
  for (int64_t u = blockIdx.y; u * TX < cols; u += gridDim.y) {
    const int64_t col = u * TX + tx;  // planar: the channel; channels-last: the channel vector
    const bool active = col < cols;
    Slot st[K];
    A ref[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      st[i] = Slot{};
      ref[i] = active ? Op::ref(p, col * K + i) : A(0);
    }
    if (active) {
      if constexpr (CL)
        reduce_rows<Op, T, V>(p, col, ref, st);
      else
        reduce_planes<Op, T, V>(p, col, ref[0], st[0]);
    }
    // Within the warp: lanes l and l + off hold the same channels for off >= TX.
#pragma unroll
    for (int i = 0; i < K; ++i)
      for (int off = kWarpSize / 2; off >= TX; off >>= 1) {
        const Slot o = shfl_down(st[i], off);
        merge(st[i], o);
      }
    if (lane < TX) {
#pragma unroll
      for (int i = 0; i < K; ++i) smem[warp][lane][i] = st[i];
    }
    __syncthreads();
    if (warp == 0 && lane < TX && active) {
#pragma unroll
      for (int i = 0; i < K; ++i) {
        Slot s = smem[0][lane][i];
        for (int w = 1; w < warps; ++w) merge(s, smem[w][lane][i]);
        const int64_t ch = col * K + i;
        if (p.groups == 1)
          Op::finish(p, ch, promote(s));
        else
          Op::store(p.partial + blockIdx.x * C + ch, p.groups * C, s);
      }
    }
    __syncthreads();
  }
}

// Sums v over the kFinalY threads of block column threadIdx.x (one channel) in a fixed tree
// order; every thread of the column gets the totals.
template <int N>
__device__ __forceinline__ void column_sum(double (&v)[N]) {
  __shared__ double smem[N][kFinalY][kFinalX];
  const int x = threadIdx.x, y = threadIdx.y;
#pragma unroll
  for (int i = 0; i < N; ++i) smem[i][y][x] = v[i];
  __syncthreads();
  for (int h = kFinalY / 2; h > 0; h >>= 1) {
    if (y < h) {
#pragma unroll
      for (int i = 0; i < N; ++i) smem[i][y][x] += smem[i][y + h][x];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = smem[i][0][x];
  __syncthreads();  // smem is this instantiation's for every call of it in the kernel
}

// Fixed-order merge of the G partials of each channel, in double: thread (x, y) of block b
// takes partials g = y, y + 64, ... of channel 8 * b + x, and column_sum adds the 64 threads'
// results. The partials are read with several loads in flight and no divisions, since the
// merge is bound by their latency (G is about a thousand where C is small: 64 channels took
// 22 us on an H100 with a serial Welford merge per partial).
//   Gradient sums: S1 and S2 are sums of the partials' sums.
//   Statistics (two passes): n = sum n_g and mean = sum(n_g * mean_g) / n, then
//   m2 = sum(m2_g + n_g * (mean_g - mean)^2) (Chan's merge of all G at once, about the mean).
// G == 0 (no values, or eval) finishes empty states.
template <class Op, typename T>
__device__ __forceinline__ void bn_merge_partials(const BnParams<T>& p) {
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * kFinalX + threadIdx.x;
  const int64_t stride = p.groups * p.c;
  const int64_t G = ch < p.c ? p.groups : 0;
  // partial g of this channel, in double
  const auto part = [&](int64_t g) { return promote(Op::load(p.partial + g * p.c + ch, stride)); };
  typename Op::template Slot<double> s{};
  if constexpr (Op::kParts == 2) {  // gradient sums: merge adds
#pragma unroll 4
    for (int64_t g = threadIdx.y; g < G; g += kFinalY) merge(s, part(g));
    double v[2] = {s.s1, s.s2};
    column_sum(v);
    s = {v[0], v[1]};
  } else {
    double v[2] = {0, 0};
#pragma unroll 4
    for (int64_t g = threadIdx.y; g < G; g += kFinalY) {
      const auto q = part(g);
      if (q.n > 0) {
        v[0] += q.n;
        v[1] += q.n * q.mean;
      }
    }
    column_sum(v);
    const double n = v[0], mean = n > 0 ? v[1] / n : 0.0;
    double m2[1] = {0};
#pragma unroll 4
    for (int64_t g = threadIdx.y; g < G; g += kFinalY) {
      const auto q = part(g);
      if (q.n > 0) {
        const double d = q.mean - mean;
        m2[0] += q.m2 + q.n * d * d;
      }
    }
    column_sum(m2);
    s = {n, mean, m2[0]};
  }
  if (threadIdx.y == 0 && ch < p.c) Op::finish(p, ch, s);
}

// ---- kernels ----------------------------------------------------------------------------------

// Forward statistics (training): per channel, Welford over d = x - pilot; grid (G, column
// groups), see bn_reduce. Writes partials, or with G == 1 the results (bn_stats_finish).
template <typename T, int V, bool CL>
__global__ void __launch_bounds__(CL ? kRowsThreads : kPlanarThreads)
    bn_stats_kernel(BnParams<T> p) {
  bn_reduce<StatsOp<acc_t<T>>, T, V, CL>(p);
}

// Backward sums: per channel S1 = sum(dy) and S2 = sum(dy * (x - mean)); split as
// bn_stats_kernel. Writes partials, or with G == 1 the results (bn_grad_finish).
template <typename T, int V, bool CL>
__global__ void __launch_bounds__(CL ? kRowsThreads : kPlanarThreads)
    bn_grad_sums_kernel(BnParams<T> p) {
  bn_reduce<GradOp<acc_t<T>>, T, V, CL>(p);
}

// Forward per-channel results: mean, invstd, batch_var from the G Welford partials (training)
// or from the running statistics (eval, G == 0), and the apply coefficients. Grid ceil(C / 8)
// blocks of 8 x 64 threads, see bn_merge_partials.
template <typename T>
__global__ void __launch_bounds__(kFinalX * kFinalY) bn_stats_finalize_kernel(BnParams<T> p) {
  bn_merge_partials<StatsOp<acc_t<T>>, T>(p);
}

// Backward per-channel results: dweight, dbias and the dx coefficients from the G partial
// sums (G == 0: none needed, eval dx only). Split as bn_stats_finalize_kernel.
template <typename T>
__global__ void __launch_bounds__(kFinalX * kFinalY) bn_grad_finalize_kernel(BnParams<T> p) {
  bn_merge_partials<GradOp<acc_t<T>>, T>(p);
}

// One vector of the elementwise pass: out = a * dy + ((x - m) * b + k), the terms present.
template <typename T, int V, bool HAS_G, bool HAS_X, typename A>
__device__ __forceinline__ Vec<T, V> apply_vec(const Vec<T, V>& x, const Vec<T, V>& g,
                                               const A (&a)[V], const A (&b)[V], const A (&m)[V],
                                               const A (&k)[V]) {
  Vec<T, V> o;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    A r = A(0);
    if constexpr (HAS_X) r = fmadd(static_cast<A>(x.v[i]) - m[i], b[i], k[i]);
    if constexpr (HAS_G) {
      const A gi = static_cast<A>(g.v[i]);
      r = HAS_X ? fmadd(gi, a[i], r) : gi * a[i];
    }
    o.v[i] = static_cast<T>(r);
  }
  return o;
}

// Elementwise pass with per-channel coefficients a, b, m, k (p.coef, [4][C]):
//   HAS_X && !HAS_G:  y  = (x - m) * b + k              (forward: b = weight * invstd, k = bias)
//   HAS_X && HAS_G:   dx = a * dy + ((x - m) * b + k)   (training backward)
//   !HAS_X && HAS_G:  dx = a * dy                       (eval backward)
// A grid-stride loop over the tensor's V-vectors in memory order, U vectors' loads issued before
// any is used.
//   channels-last: the stride is a multiple of the C / V vectors of a row (the launcher gives at
//     least that many threads), so each thread keeps one channel vector and its V coefficients
//     in registers;
//   planar: a vector lies in one plane; a Cursor tracks each vector's channel without division,
//     and its coefficients are loaded per vector (they stay in L1).
template <typename T, int V, bool CL, bool HAS_G, bool HAS_X>
__global__ void __launch_bounds__(kApplyThreads, kApplyMinBlocks) bn_apply_kernel(BnParams<T> p) {
  using A = acc_t<T>;
  constexpr int U = apply_unroll<V, HAS_G && HAS_X>();
  const int64_t C = p.c;
  const A* ca = p.coef;
  const A* cb = p.coef + C;
  const A* cm = p.coef + 2 * C;
  const A* ck = p.coef + 3 * C;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  A a[V] = {}, b[V] = {}, m[V] = {}, k[V] = {};
  Vec<T, V> xr[U], gr[U];
  if constexpr (CL) {
    const int64_t cv = C / V;
    const int64_t step = threads / cv * cv;
    if (t >= step) return;
    const int64_t ch = t % cv * V;
    const auto load_coef = [ch](const A* c, A(&out)[V]) {
      const Vec<A, V> v = load_vec<A, V>(c + ch);  // C % V == 0: aligned
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = v.v[i];
    };
    if constexpr (HAS_G) load_coef(ca, a);
    if constexpr (HAS_X) {
      load_coef(cb, b);
      load_coef(cm, m);
      load_coef(ck, k);
    }
    const int64_t total = p.n * p.s * cv;
    for (int64_t i = t; i < total; i += U * step) {
#pragma unroll
      for (int j = 0; j < U; ++j) {
        const int64_t off = (i + j * step) * V;
        if (i + j * step < total) {
          if constexpr (HAS_X) xr[j] = load_vec<T, V>(p.x + off);
          if constexpr (HAS_G) gr[j] = load_vec<T, V>(p.dy + off);
        }
      }
#pragma unroll
      for (int j = 0; j < U; ++j) {
        const int64_t off = (i + j * step) * V;
        if (i + j * step < total)
          store_vec<T, V>(p.out + off, apply_vec<T, V, HAS_G, HAS_X>(xr[j], gr[j], a, b, m, k));
      }
    }
  } else {
    const int64_t planes = p.n * C;
    Cursor cur(t, threads, p.s / V, C);  // major: plane (n, c), minor: vector, cls: channel
    while (cur.major < planes) {
      int64_t off[U], chan[U];
      bool ok[U];
#pragma unroll
      for (int j = 0; j < U; ++j) {
        ok[j] = cur.major < planes;
        off[j] = cur.major * p.s + cur.minor * V;
        chan[j] = cur.cls;
        if (ok[j]) {
          if constexpr (HAS_X) xr[j] = load_vec<T, V>(p.x + off[j]);
          if constexpr (HAS_G) gr[j] = load_vec<T, V>(p.dy + off[j]);
        }
        cur.advance();
      }
#pragma unroll
      for (int j = 0; j < U; ++j) {
        if (!ok[j]) continue;
        const int64_t c = chan[j];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          if constexpr (HAS_G) a[i] = ca[c];
          if constexpr (HAS_X) {
            b[i] = cb[c];
            m[i] = cm[c];
            k[i] = ck[c];
          }
        }
        store_vec<T, V>(p.out + off[j], apply_vec<T, V, HAS_G, HAS_X>(xr[j], gr[j], a, b, m, k));
      }
    }
  }
}

}  // namespace normext::cuda::bn
