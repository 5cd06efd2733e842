// Vectorized building blocks for the CPU kernels (at::vec::Vectorized, compiled for the ISA that
// setup.py picks). Values are loaded into the accumulation type (float for float/half/bfloat16,
// double for double) two vectors at a time, so a half-precision vector converts to exactly two
// float vectors.
//
// The reductions here are the statistics of DESIGN.md's math:
//   pass 1: sum, min and max of a span -> a first mean m (exactly the value when min == max,
//           so a constant channel or row has d = x - m = 0 exactly);
//   pass 2: sum(d) and sum(d*d) with d = x - m -> mean = m + sum(d)/n,
//           var = sum(d*d)/n - (sum(d)/n)^2 (the shift makes this cancellation-free).
// Long spans are cut into fixed chunks whose float sums are added in double, in order, so the
// result does not depend on the number of threads.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace normext::cpu {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Load/store `kStep` consecutive T values as two vectors of acc_t<T>.
template <typename T>
struct VecPair {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int64_t kStep = 2 * V::size();

  static inline void load(const T* p, V& a, V& b) {
    if constexpr (std::is_same_v<T, A>) {
      a = V::loadu(p);
      b = V::loadu(p + V::size());
    } else {
      at::vec::load_to_float<T>(p, a, b);
    }
  }
  static inline void store(T* p, const V& a, const V& b) {
    if constexpr (std::is_same_v<T, A>) {
      a.store(p);
      b.store(p + V::size());
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }
};

template <typename A>
inline A hsum(const at::vec::Vectorized<A>& v) {
  A buf[at::vec::Vectorized<A>::size()];
  v.store(buf);
  A s = 0;
  for (int64_t i = 0; i < at::vec::Vectorized<A>::size(); ++i) s += buf[i];
  return s;
}

template <typename A>
inline A hmin(const at::vec::Vectorized<A>& v) {
  A buf[at::vec::Vectorized<A>::size()];
  v.store(buf);
  A s = buf[0];
  for (int64_t i = 1; i < at::vec::Vectorized<A>::size(); ++i) s = buf[i] < s ? buf[i] : s;
  return s;
}

template <typename A>
inline A hmax(const at::vec::Vectorized<A>& v) {
  A buf[at::vec::Vectorized<A>::size()];
  v.store(buf);
  A s = buf[0];
  for (int64_t i = 1; i < at::vec::Vectorized<A>::size(); ++i) s = buf[i] > s ? buf[i] : s;
  return s;
}

// Values per chunk summed in acc_t before the chunk's sum joins a double accumulator.
constexpr int64_t kChunk = 4096;

// Pass-1 result for a group of values; merged in a fixed order.
struct Sum1 {
  double sum = 0;
  double mn = std::numeric_limits<double>::infinity();
  double mx = -std::numeric_limits<double>::infinity();
  void merge(const Sum1& o) {
    sum += o.sum;
    mn = o.mn < mn ? o.mn : mn;
    mx = o.mx > mx ? o.mx : mx;
  }
  // The shift m for pass 2: the mean, or exactly the value of a constant group.
  double shift(int64_t n) const { return mn == mx ? mn : sum / static_cast<double>(n); }
};

// Pass-2 result: sums of d and d*d with d = x - m.
struct Sum2 {
  double sd = 0, sdd = 0;
  void merge(const Sum2& o) {
    sd += o.sd;
    sdd += o.sdd;
  }
};

// Final mean and biased variance from the shift m and the pass-2 sums.
inline void finish_moments(double m, const Sum2& s2, int64_t n, double& mean, double& var) {
  if (n == 0) {
    mean = 0;
    var = 0;
    return;
  }
  double dm = s2.sd / static_cast<double>(n);
  // An Inf in the group makes the shift Inf and every d = x - m NaN or -Inf: the mean is then
  // the shift itself (+-Inf, or NaN for +Inf and -Inf together), as torch's batch statistics and
  // so BatchNorm's running_mean give it; the variance stays NaN.
  mean = std::isfinite(m) ? m + dm : m;
  var = s2.sdd / static_cast<double>(n) - dm * dm;
  if (var < 0) var = 0;
}

// Pass 1 over n contiguous values.
template <typename T>
inline Sum1 span_pass1(const T* x, int64_t n) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  Sum1 out;
  V lo(std::numeric_limits<A>::infinity()), hi(-std::numeric_limits<A>::infinity());
  A slo = std::numeric_limits<A>::infinity(), shi = -slo;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    V s0(A(0)), s1(A(0));
    int64_t i = c0;
    for (; i + P::kStep <= c1; i += P::kStep) {
      V a, b;
      P::load(x + i, a, b);
      s0 += a;
      s1 += b;
      lo = at::vec::minimum(lo, at::vec::minimum(a, b));
      hi = at::vec::maximum(hi, at::vec::maximum(a, b));
    }
    A s = hsum(s0 + s1);
    for (; i < c1; ++i) {
      A v = static_cast<A>(x[i]);
      s += v;
      slo = v < slo ? v : slo;
      shi = v > shi ? v : shi;
    }
    out.sum += s;
  }
  A vlo = hmin(lo), vhi = hmax(hi);
  out.mn = std::min<double>(vlo < slo ? vlo : slo, out.mn);
  out.mx = std::max<double>(vhi > shi ? vhi : shi, out.mx);
  if (std::isnan(out.sum)) out.mn = out.mx = out.sum;
  return out;
}

// Pass 2 over n contiguous values with shift m.
template <typename T>
inline Sum2 span_pass2(const T* x, int64_t n, acc_t<T> m) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  Sum2 out;
  const V vm(m);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    V d0(A(0)), d1(A(0)), q0(A(0)), q1(A(0));
    int64_t i = c0;
    for (; i + P::kStep <= c1; i += P::kStep) {
      V a, b;
      P::load(x + i, a, b);
      a = a - vm;
      b = b - vm;
      d0 += a;
      d1 += b;
      q0 = at::vec::fmadd(a, a, q0);
      q1 = at::vec::fmadd(b, b, q1);
    }
    A sd = hsum(d0 + d1), sdd = hsum(q0 + q1);
    for (; i < c1; ++i) {
      A d = static_cast<A>(x[i]) - m;
      sd += d;
      sdd += d * d;
    }
    out.sd += sd;
    out.sdd += sdd;
  }
  return out;
}

// y[i] = (x[i] - mean) * scale + shift over n contiguous values. Subtracting the mean first
// keeps large offsets (mean 1e4, std 1e-2) exact where x * scale - mean * scale would cancel.
template <typename T>
inline void span_affine(const T* x, T* y, int64_t n, acc_t<T> mean, acc_t<T> scale,
                        acc_t<T> shift) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  const V vm(mean), vs(scale), vb(shift);
  int64_t i = 0;
  for (; i + P::kStep <= n; i += P::kStep) {
    V a, b;
    P::load(x + i, a, b);
    P::store(y + i, at::vec::fmadd(a - vm, vs, vb), at::vec::fmadd(b - vm, vs, vb));
  }
  for (; i < n; ++i) y[i] = static_cast<T>((static_cast<A>(x[i]) - mean) * scale + shift);
}

// Sums of dy and dy * (x - mean) over n contiguous values (the two per-group sums that the
// backward needs), chunked into double like pass 2.
template <typename T>
inline Sum2 span_grad_sums(const T* dy, const T* x, int64_t n, acc_t<T> mean) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  Sum2 out;
  const V vm(mean);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    V g0(A(0)), g1(A(0)), p0(A(0)), p1(A(0));
    int64_t i = c0;
    for (; i + P::kStep <= c1; i += P::kStep) {
      V ga, gb, a, b;
      P::load(dy + i, ga, gb);
      P::load(x + i, a, b);
      g0 += ga;
      g1 += gb;
      p0 = at::vec::fmadd(ga, a - vm, p0);
      p1 = at::vec::fmadd(gb, b - vm, p1);
    }
    A sg = hsum(g0 + g1), sp = hsum(p0 + p1);
    for (; i < c1; ++i) {
      A g = static_cast<A>(dy[i]);
      sg += g;
      sp += g * (static_cast<A>(x[i]) - mean);
    }
    out.sd += sg;
    out.sdd += sp;
  }
  return out;
}

// dx[i] = a * dy[i] + b * (x[i] - mean) + k over n contiguous values (BatchNorm's dx with the
// per-channel constants of the backward formula). With x == nullptr, dx = a * dy.
template <typename T>
inline void span_dx(const T* dy, const T* x, T* dx, int64_t n, acc_t<T> a, acc_t<T> b,
                    acc_t<T> mean, acc_t<T> k) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  const V va(a), vb(b), vm(mean), vk(k);
  int64_t i = 0;
  if (x == nullptr) {
    for (; i + P::kStep <= n; i += P::kStep) {
      V g0, g1;
      P::load(dy + i, g0, g1);
      P::store(dx + i, g0 * va, g1 * va);
    }
    for (; i < n; ++i) dx[i] = static_cast<T>(static_cast<A>(dy[i]) * a);
    return;
  }
  for (; i + P::kStep <= n; i += P::kStep) {
    V g0, g1, x0, x1;
    P::load(dy + i, g0, g1);
    P::load(x + i, x0, x1);
    P::store(dx + i, at::vec::fmadd(g0, va, at::vec::fmadd(x0 - vm, vb, vk)),
             at::vec::fmadd(g1, va, at::vec::fmadd(x1 - vm, vb, vk)));
  }
  for (; i < n; ++i)
    dx[i] = static_cast<T>(static_cast<A>(dy[i]) * a + (static_cast<A>(x[i]) - mean) * b + k);
}

}  // namespace normext::cpu
