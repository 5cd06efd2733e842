// Vectorized building blocks for the CPU kernels (at::vec::Vectorized, compiled for the ISA that
// setup.py picks). Values are loaded into the accumulation type (float for float/half/bfloat16,
// double for double) two vectors at a time, so a half-precision vector converts to exactly two
// float vectors.
//
// The reductions here are the statistics of DESIGN.md's math, for a chunk of values in cache:
//   pass 1: m = x0 + sum(x - x0) / n with x0 the chunk's first value (exactly x0 for a constant
//           chunk, since every term is 0);
//   pass 2: sum(d) and sum(d*d) with d = x - m -> mean = m + sum(d)/n,
//           M2 = sum(d*d) - sum(d)^2/n (d is small, so this does not cancel as E[x^2] - E[x]^2
//           would; a constant chunk gives d = 0 exactly).
// Long spans are cut into fixed chunks of kChunk values: both passes run over a chunk while it is
// in L1, and the chunks' moments merge in double, in order (Chan et al.), so the result does not
// depend on the number of threads. After a group's first piece, pass 1 is skipped: the group's
// running mean is the shift (running_shift states why that is safe), so a piece is read once.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

// Everything here (and in the kernel files) lives in an inline namespace named after the ISA, as
// at::vec does: the kernels are compiled once per ISA (kernels.h), and the copies must not share
// symbols.
namespace normext::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Forced inlining, for the helpers of hot loops and the per-span functions called once per
// plane: as code was added around them, GCC left some out of line (a call per vector or per
// plane, through the PLT, with the vectors passed through the stack; see the README).
#define NORMEXT_INLINE __attribute__((always_inline)) inline

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define NORMEXT_BF16_PACK 1
// 32 floats rounded to bfloat16 (to nearest, ties to even, as c10::BFloat16 rounds) in one
// instruction, vcvtne2ps2bf16, where at::vec's integer emulation of the rounding takes about
// eight per 16 values; the forward's and backward's elementwise passes over bfloat16 were bound
// by those instructions, not by memory. The instruction flushes denormal inputs to zero, which
// c10::BFloat16 does not, so a pair holding a denormal (vfpclassps, class 0x20) takes at::vec's
// conversion; NaNs stay NaN (quieted: the sign and payload may differ from at::vec's 0xffff, as
// they already differ from c10::BFloat16's 0x7fc0).
inline __m512i bf16_pack(const __m512& a, const __m512& b) {
  const __mmask16 denormal = _mm512_fpclass_ps_mask(a, 0x20) | _mm512_fpclass_ps_mask(b, 0x20);
  if (__builtin_expect(denormal != 0, 0))
    return static_cast<__m512i>(at::vec::convert_from_float<c10::BFloat16>(a, b));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a -> the low 16 values
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
#define NORMEXT_BF16_LANES 1
// bfloat16 on AVX2 in lane order (VecPair::load_lanes): 16 values as their even-indexed values
// (one vector) and odd-indexed ones (the other). Widening is then one shift or one mask of the
// 32-bit words that hold two values each, and rounding back ends in one 16-bit blend, where
// at::vec's natural order takes a widening load per 8 values and a pack and a lane permute per 16.
// Measured, one thread, a bfloat16 y = x * s + b over 100k values in L2: at::vec's order 16.0 us,
// lane order 10.4 us (truncating instead of rounding: 6.1 us; memcpy: 4.2 us).
NORMEXT_INLINE void bf16_load_lanes(const c10::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xffff0000u))));
}
// The 16 values back in natural order, each rounded to bfloat16 to nearest, ties to even (as
// c10::BFloat16 rounds), in 16-bit lanes: hi = the top halves (the truncated values), lo = the
// bottom halves; round up where lo > 0x8000, or lo == 0x8000 and hi is odd, i.e. where
// lo + (hi & 1) > 0x8000 (as signed 16-bit: (lo ^ 0x8000) + (hi & 1) > 0, saturating, so that
// lo = 0xffff with hi odd still counts). Up is hi + 1 (the carry runs into the exponent as it
// should). Finite values only: a NaN may carry into the sign; bf16_pack_lanes checks.
NORMEXT_INLINE __m256i bf16_round_lanes(const __m256& even, const __m256& odd) {
  const __m256i e = _mm256_castps_si256(even), o = _mm256_castps_si256(odd);
  const __m256i hi = _mm256_blend_epi16(_mm256_srli_epi32(e, 16), o, 0xAA);
  const __m256i lo = _mm256_blend_epi16(e, _mm256_slli_epi32(o, 16), 0xAA);
  const __m256i s = _mm256_adds_epi16(_mm256_xor_si256(lo, _mm256_set1_epi16(int16_t(0x8000))),
                                      _mm256_and_si256(hi, _mm256_set1_epi16(1)));
  return _mm256_sub_epi16(hi, _mm256_cmpgt_epi16(s, _mm256_setzero_si256()));
}
// A pair holding a NaN takes c10::BFloat16's conversion value by value (as the scalar tails do).
// (The vectors go by value, in registers: by reference, the hot loop stored both to the stack
// every step, in case of the call.)
__attribute__((noinline, cold)) inline __m256i bf16_pack_nan(__m256 even, __m256 odd) {
  alignas(32) float e[8], o[8];
  alignas(32) c10::BFloat16 out[16];
  _mm256_store_ps(e, even);
  _mm256_store_ps(o, odd);
  for (int k = 0; k < 8; ++k) {
    out[2 * k] = static_cast<c10::BFloat16>(e[k]);
    out[2 * k + 1] = static_cast<c10::BFloat16>(o[k]);
  }
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(out));
}
// NoNan: the caller has shown that no value is a NaN with a nonzero low half (the only ones
// the rounding gets wrong; see finite_all), and the check, three instructions
// per 16 values of an elementwise pass of about twenty, is left out. Measured, raw BatchNorm
// training ops, bf16, 2 threads, with and without the check interleaved in one process, medians
// of 60 over two rounds, inputs warm in L3: (32, 64, 56, 56) forward 1.055 / 0.997 -> 0.967 /
// 0.939 ms, backward 1.649 / 1.584 -> 1.555 / 1.529; (32, 256, 14, 14) 0.221 / 0.201 -> 0.201 /
// 0.192 and 0.329 / 0.303 -> 0.303 / 0.302; (32, 512, 7, 7) 0.182 / 0.177 -> 0.165 / 0.174 and
// 0.275 / 0.256 -> 0.241 / 0.240. With the cache flushed before each call, the gain is smaller
// (56 x 56 forward 1.73 / 1.66 -> 1.57 / 1.59 ms, backward level). LayerNorm, raw ops the same
// way, medians of 40 over two rounds: (4096, 768) forward 1.18 / 1.12 -> 1.09 / 1.04 ms, backward
// 1.94 / 1.81 -> 1.83 / 1.80; (1024, 4096) 1.68 / 1.58 -> 1.53 / 1.48 and 3.51 / 3.28 -> 3.20 /
// 3.10; (512, 8192) 1.60 / 1.52 -> 1.51 / 1.45 and 3.68 / 3.37 -> 3.45 / 3.28.
template <bool NoNan = false>
NORMEXT_INLINE __m256i bf16_pack_lanes(const __m256& even, const __m256& odd) {
  if (!NoNan &&
      __builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(even, odd, _CMP_UNORD_Q)) != 0, 0))
    return bf16_pack_nan(even, odd);
  return bf16_round_lanes(even, odd);
}
#endif

// Load/store `kStep` consecutive T values as two vectors of acc_t<T>.
//
// load/store keep the values in order (the first V::size() in the first vector). load_lanes and
// put_lanes place them in the ISA's lane order, the same for both: the natural order except
// bfloat16 on AVX2 (bf16_load_lanes above). For code whose vectors meet
// only broadcast constants, or sums that do not care which lane holds which value; arrays of
// acc_t per position (LayerNorm's weight) must be in that order too (to_lane_order).
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
#if defined(NORMEXT_BF16_PACK)
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      _mm512_storeu_si512(p, bf16_pack(a, b));
#endif
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }
  // store() with non-temporal stores, for p aligned to kStreamAlign bytes (see stream_output).
  // A plain store where the ISA has none.
  static inline void store_nt(T* p, const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, a);
      _mm512_stream_ps(p + V::size(), b);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(p, a);
      _mm512_stream_pd(p + V::size(), b);
#if defined(NORMEXT_BF16_PACK)
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bf16_pack(a, b));
#endif
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p),
                          static_cast<__m512i>(at::vec::convert_from_float<T>(a, b)));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + V::size(), b);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, a);
      _mm256_stream_pd(p + V::size(), b);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p),
                          static_cast<__m256i>(at::vec::convert_from_float<T>(a, b)));
    }
#else
    store(p, a, b);
#endif
  }
  template <bool NT>
  static inline void put(T* p, const V& a, const V& b) {
    if constexpr (NT)
      store_nt(p, a, b);
    else
      store(p, a, b);
  }

#if defined(NORMEXT_BF16_LANES)
  static constexpr bool kLanesPermuted = std::is_same_v<T, c10::BFloat16>;
#else
  static constexpr bool kLanesPermuted = false;
#endif
  NORMEXT_INLINE static void load_lanes(const T* p, V& a, V& b) {
#if defined(NORMEXT_BF16_LANES)
    if constexpr (kLanesPermuted) {
      __m256 e, o;
      bf16_load_lanes(p, e, o);
      a = e;
      b = o;
      return;
    }
#endif
    load(p, a, b);
  }
  // NoNan: skip the NaN check (bf16_pack_lanes); ignored where the ISA's conversion has none.
  template <bool NT, bool NoNan = false>
  NORMEXT_INLINE static void put_lanes(T* p, const V& a, const V& b) {
#if defined(NORMEXT_BF16_LANES)
    if constexpr (kLanesPermuted) {
      const __m256i r = bf16_pack_lanes<NoNan>(a, b);
      if constexpr (NT)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), r);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
      return;
    }
#endif
    put<NT>(p, a, b);
  }
  // Where natural position j (of a span of n values that starts a lane block) sits in lane order:
  // within each whole kStep block, even positions first, then odd; the tail (n % kStep values,
  // which the loops take one by one) in place.
  static constexpr int64_t lane_pos(int64_t j, int64_t n) {
    if constexpr (!kLanesPermuted) return j;
    const int64_t r = j % kStep, base = j - r;
    if (base + kStep > n) return j;
    return base + (r % 2) * (kStep / 2) + r / 2;
  }
  // The natural position held at lane-order position l (lane_pos's inverse).
  static constexpr int64_t lane_src(int64_t l, int64_t n) {
    if constexpr (!kLanesPermuted) return l;
    const int64_t r = l % kStep, base = l - r;
    if (base + kStep > n) return l;
    return base + (r < kStep / 2 ? 2 * r : 2 * (r - kStep / 2) + 1);
  }
};

// v[0, n) (one value per position of a span) copied into lane order at o: o[lane_pos(j)] = v[j].
// Written a whole step at a time (evens, then odds): a loop over lane_pos, with its division and
// branch per value, took 0.1 ms for a LayerNorm weight and bias of 50000 values (the whole of a
// (1, 50000) bf16 forward was 135 us against torch's 34).
template <typename T, typename A>
inline void lane_order_into(const A* v, int64_t n, A* o) {
  constexpr int64_t K = VecPair<T>::kStep, H = K / 2;
  int64_t base = 0;
  for (; base + K <= n; base += K) {
    for (int64_t i = 0; i < H; ++i) o[base + i] = v[base + 2 * i];
    for (int64_t i = 0; i < H; ++i) o[base + H + i] = v[base + 2 * i + 1];
  }
  for (int64_t j = base; j < n; ++j) o[j] = v[j];  // a partial step keeps the natural order
}

// lane_order_into's inverse, converting: o[j] = D(l[lane_pos(j)]) for j in [0, n).
template <typename T, typename D, typename S>
inline void lane_order_from(const S* l, int64_t n, D* o) {
  constexpr int64_t K = VecPair<T>::kStep, H = K / 2;
  int64_t base = 0;
  if constexpr (VecPair<T>::kLanesPermuted) {
    for (; base + K <= n; base += K)
      for (int64_t i = 0; i < H; ++i) {
        o[base + 2 * i] = static_cast<D>(l[base + i]);
        o[base + 2 * i + 1] = static_cast<D>(l[base + H + i]);
      }
  }
  for (int64_t j = base; j < n; ++j) o[j] = static_cast<D>(l[j]);
}

// A buffer of n values left uninitialized (std::vector's resize zeroes it first: a memset that
// cost as much as the copy that follows).
// Buffers of kArenaMinBytes or more come from a block the thread keeps between calls
// (ScratchArena), bump-allocated while any is live; the block grows, once none is live, to the
// most a call asked of it (at most kArenaMaxBytes; beyond, buffers come from the heap). Freshly
// allocated per call, a (2, 32768) BatchNorm's per-channel buffers (about 3 MB) went back to the
// kernel at each free (glibc trims the heap's top) and came back as new pages on the next call:
// 416 page faults a training forward, 1.08 ms against 0.18 with glibc told to keep them
// (MALLOC_TRIM_THRESHOLD_), and torch's 0.20. Every buffer of that size counts towards the
// block's next size, also those that came from the heap because the block was too small (the
// first version counted only those from the block, so a block that started empty never grew).
constexpr int64_t kArenaMinBytes = 32 << 10;
constexpr int64_t kArenaMaxBytes = 64 << 20;
struct ScratchArena {
  std::unique_ptr<char[]> block;
  int64_t cap = 0, used = 0, live = 0, demand = 0;
  // Counts a buffer of `bytes` into this call's demand and returns it from the block, or null
  // (then the caller takes it from the heap); either way give_back() once it is freed.
  void* take(int64_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (live == 0) used = demand = 0;
    demand += bytes;
    ++live;
    if (used + bytes > cap) return nullptr;
    void* p = block.get() + used;
    used += bytes;
    return p;
  }
  void give_back() {
    if (--live == 0 && demand > cap && demand <= kArenaMaxBytes) {
      block.reset(new char[static_cast<size_t>(demand)]);
      cap = demand;
    }
  }
  static ScratchArena& mine() {
    thread_local ScratchArena arena;
    return arena;
  }
};
template <typename A>
struct ScratchFree {
  enum From : char { kHeap, kArena, kHeapCounted };  // kHeapCounted: counted in the arena's demand
  From from = kHeap;
  void operator()(A* p) const {
    if (from != kArena) delete[] p;
    if (from != kHeap) ScratchArena::mine().give_back();
  }
};
template <typename A>
using Scratch = std::unique_ptr<A[], ScratchFree<A>>;
template <typename A>
inline A* scratch(Scratch<A>& buf, int64_t n) {
  static_assert(std::is_trivially_destructible_v<A> && alignof(A) <= 64);
  using Free = ScratchFree<A>;
  const int64_t count = std::max<int64_t>(n, 1), bytes = count * int64_t(sizeof(A));
  if (bytes >= kArenaMinBytes) {
    if (void* kept = ScratchArena::mine().take(bytes)) {
      buf = Scratch<A>(static_cast<A*>(kept), Free{Free::kArena});
      return buf.get();
    }
    buf = Scratch<A>(new A[static_cast<size_t>(count)], Free{Free::kHeapCounted});
    return buf.get();
  }
  buf = Scratch<A>(new A[static_cast<size_t>(count)], Free{Free::kHeap});
  return buf.get();
}

// v[0, n) in lane order: v itself where that order is the natural one (or v is null), else a
// copy in `out`.
template <typename T, typename A>
inline const A* to_lane_order(const A* v, int64_t n, Scratch<A>& out) {
  if (!VecPair<T>::kLanesPermuted || v == nullptr) return v;
  A* o = scratch(out, n);
  lane_order_into<T>(v, n, o);
  return o;
}

// ---- non-temporal output ----------------------------------------------------------------------
//
// An ordinary store first reads the line it writes (a third of a forward's memory traffic: x in,
// y's lines in, y out) and then keeps it in cache, evicting inputs still to be read. A
// non-temporal store writes whole lines straight to memory. That wins when the output would not
// stay in cache anyway: an op that touches at least kStreamBytes (about this machine's 32 MB L3;
// a consumer reading such an output from its start finds the start evicted by its end, cached or
// not). And only over long aligned runs: a partial line written non-temporally costs a slow
// partial write, and (32, 512, 7, 7) bf16 planes of 98 bytes made the forward 7x slower.
// Measured, interleaved raw ops against torch, 2 threads, before -> after:
//   BN (32, 64, 56, 56) NCHW fp32 forward 3.0-3.1x -> 3.9-4.1x, backward 1.07-1.14x -> 1.44-1.47x;
//   channels-last fp32 forward 0.89-0.94x -> 1.34-1.35x; (4096, 1024) fp32 forward
//   0.92-0.96x -> 1.08-1.28x, backward 1.19-1.20x -> 1.32-1.34x.
// The values stored are the same either way; stream_fence() orders a thread's non-temporal
// stores before the end of its parallel region.
constexpr uintptr_t kStreamAlign = 64;  // the widest vector (and a cache line)
constexpr int64_t kStreamBytes = int64_t{24} << 20;
constexpr int64_t kStreamRunBytes = 4096;
inline bool stream_output(int64_t bytes_touched, int64_t run_bytes) {
  return bytes_touched >= kStreamBytes && run_bytes >= kStreamRunBytes;
}
inline bool stream_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0;
}
// stream_output for an output written as rows of row_bytes from `out` on: every row must start
// aligned, and the rows run on into each other (one long run).
inline bool stream_rows(int64_t bytes_touched, int64_t row_bytes, const void* out) {
  return stream_aligned(out) && row_bytes % kStreamAlign == 0 &&
         stream_output(bytes_touched, kStreamRunBytes);
}
// f(std::true_type) where stream, else f(std::false_type): the kernels take NT as a template
// argument, so the plain-store loops carry no test per store.
template <typename F>
inline void with_stream(bool stream, const F& f) {
  if (stream)
    f(std::true_type{});
  else
    f(std::false_type{});
}
// f(std::integral_constant<bool, a>, ...) for runtime flags a, b, c (and d): a loop written
// with `if constexpr` on each flag is specialized per case, as with_stream does for one.
template <typename F>
inline void with_flags(bool a, bool b, const F& f) {
  with_stream(a, [&](auto fa) { with_stream(b, [&](auto fb) { f(fa, fb); }); });
}
template <typename F>
inline void with_flags(bool a, bool b, bool c, const F& f) {
  with_stream(a, [&](auto fa) {
    with_stream(b, [&](auto fb) { with_stream(c, [&](auto fc) { f(fa, fb, fc); }); });
  });
}
template <typename F>
inline void with_flags(bool a, bool b, bool c, bool d, const F& f) {
  with_flags(a, b, c, [&](auto fa, auto fb, auto fc) {
    with_stream(d, [&](auto fd) { f(fa, fb, fc, fd); });
  });
}
// Whether a bfloat16 elementwise pass may round without its NaN check (bf16_pack_lanes): where
// the pass's float constants (a BatchNorm channel's m, scale, shift, beta, or a, b, k; a
// LayerNorm row's mean, rstd and shifts, and its weight and bias) are all finite. The
// check is there for NaNs whose low 16 bits are not all zero: rounded as numbers, they would
// carry into the exponent and sign (0x7fffffff becomes -0). No other NaN reaches the rounding:
// a bfloat16 value widened to float has a zero low half, NaN or not; x86's arithmetic returns
// an operand's NaN (quieted, the payload kept) or its default NaN 0xffc00000, whose low half is
// zero too; so a NaN with another low half can only come from a constant, say a float32 weight
// of such a NaN. NaN and Inf inputs still give NaN and Inf, as before. Per channel or row:
// finite_all; arrays of them (all channels at once, a weight): all_finite.
template <typename A, typename... Rest>
inline bool finite_all(A v, Rest... rest) {
  return std::isfinite(v) && (std::isfinite(rest) && ...);
}

// Whether v[0 .. w) are all finite: x - x is 0 for a finite x and NaN for an Inf or a NaN, and a
// NaN stays in a sum. (A loop of fabs(x) <= max, or-ed into a flag, stayed scalar: a compare and
// a flag update per value, most of a (2, 1024) float32 training forward's own time.)
template <typename A>
inline bool all_finite(int64_t w, const A* v) {
  using V = at::vec::Vectorized<A>;
  V acc(A(0));
  int64_t j = 0;
  for (; j + V::size() <= w; j += V::size()) {
    const V x = V::loadu(v + j);
    acc = acc + (x - x);
  }
  A lanes[V::size()];
  acc.store(lanes);
  A s = 0;
  for (int64_t l = 0; l < V::size(); ++l) s += lanes[l];
  for (; j < w; ++j) s += v[j] - v[j];
  return s == 0;
}

// f(std::true_type) where no_nan and T's stores have a NaN check to skip (VecPair::put_lanes),
// else f(std::false_type): only the types that gain from it get a second copy of a loop.
template <typename T, typename F>
inline void with_no_nan(bool no_nan, const F& f) {
  if constexpr (VecPair<T>::kLanesPermuted)
    with_stream(no_nan, f);
  else
    f(std::false_type{});
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// A parameter (weight or bias; BatchNorm's running statistics as double) as contiguous A
// values, read in its own dtype: the tensor itself
// where it already is (the common float32 or float64 case), else a widened copy in a std::vector
// (exact: half values widen to float). ptr is null for an absent parameter. No tensor op, so no
// dispatcher call or allocation of a tensor per parameter: measured, a (8, 16, 4, 4) bfloat16
// BatchNorm forward took 11.9 us with an at::Tensor::to per parameter.
template <typename A>
struct ParamValues {
  Scratch<A> own;
  const A* ptr = nullptr;
  explicit ParamValues(const c10::optional<at::Tensor>& p) {
    if (!p.has_value() || !p->defined()) return;
    if (p->scalar_type() == c10::CppTypeToScalarType<A>::value && p->is_contiguous()) {
      ptr = p->const_data_ptr<A>();
      return;
    }
    const at::Tensor c = p->contiguous();
    const int64_t n = c.numel();
    A* o = scratch(own, n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "param", [&] {
      const scalar_t* v = c.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) o[i] = static_cast<A>(v[i]);
    });
    ptr = o;
  }
};

// A per-position parameter (LayerNorm's weight or bias) as acc_t<T> values in VecPair<T>'s lane
// order, for rows read with load_lanes. A parameter stored as T (a bfloat16 weight of a bfloat16
// input) is widened straight into lane order by load_lanes, a whole step at a time; any other is
// read as ParamValues and then reordered (to_lane_order).
template <typename T>
struct LaneParam {
  using A = acc_t<T>;
  ParamValues<A> values;
  Scratch<A> lanes;
  const A* ptr = nullptr;
  LaneParam(const c10::optional<at::Tensor>& p, int64_t n) : values(direct(p) ? c10::nullopt : p) {
    if (!direct(p)) {
      ptr = to_lane_order<T>(values.ptr, n, lanes);
      return;
    }
    using P = VecPair<T>;
    const T* v = p->const_data_ptr<T>();
    A* o = scratch(lanes, n);
    int64_t base = 0;
    for (; base + P::kStep <= n; base += P::kStep) {
      typename P::V a, b;
      P::load_lanes(v + base, a, b);
      a.store(o + base);
      b.store(o + base + P::V::size());
    }
    for (int64_t j = base; j < n; ++j) o[j] = static_cast<A>(v[j]);
    ptr = o;
  }

 private:
  static bool direct(const c10::optional<at::Tensor>& p) {
    return VecPair<T>::kLanesPermuted && p.has_value() && p->defined() &&
           p->scalar_type() == c10::CppTypeToScalarType<T>::value && p->is_contiguous();
  }
};

// ---- vector tails ------------------------------------------------------------------------------
//
// A span of n >= kStep values whose length is not a multiple of kStep ends with r = n % kStep
// values that the whole steps left over. Rather than one by one (a bfloat16 value each through
// c10's scalar conversion: for planes of 14 x 14, 4 values a plane cost about as much as two
// whole steps), the loops take one more whole step over the span's last kStep values:
//   maps (y = f(x)) recompute and rewrite the kStep - r values before the tail, with the same
//     results (the outputs never alias the inputs);
//   sums mask those lanes to zero (tail_mask), after the subtraction, so Inf or NaN there
//     cannot leak in (0 * Inf would be NaN).
// tail_mask<T>(r) holds the two vectors' masks for r new values, in lane order (all-ones bits
// where a lane holds one of the last r positions).
// A single value is still cheaper alone: (32, 512, 7, 7) planes (49 = 3 x 16 + 1 values, bf16)
// took 6% longer with the whole step, where (32, 256, 14, 14) (196 = 12 x 16 + 4) gained
// 7% forward, 14% backward.
constexpr int64_t kVecTail = 2;
template <typename T>
struct TailMasks {
  using P = VecPair<T>;
  using Bits = std::conditional_t<sizeof(acc_t<T>) == 8, uint64_t, uint32_t>;
  static constexpr int64_t K = P::kStep;
  struct Table {
    alignas(64) Bits m[K][K];
  };
  static constexpr Table make() {
    Table t{};
    for (int64_t r = 0; r < K; ++r)
      for (int64_t l = 0; l < K; ++l) t.m[r][l] = P::lane_src(l, K) >= K - r ? ~Bits(0) : Bits(0);
    return t;
  }
  static constexpr Table table = make();  // built by the compiler: no guard on a hot path
};
template <typename T>
inline const void* tail_mask(int64_t r) {
  return TailMasks<T>::table.m[r];
}

// The sum of a vector's lanes, pairwise (halves added until one lane is left): a fixed order
// for each ISA, so results stay deterministic. The short planar passes take one or two per
// plane; summed lane by lane through memory, that was a chain of 16 dependent adds per sum.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
inline float hsum_halves(__m256 x) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
#endif
template <typename A>
inline A hsum(const at::vec::Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __m512 x = v;
    return hsum_halves(_mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) return hsum_halves(v);
#endif
  A buf[at::vec::Vectorized<A>::size()];
  v.store(buf);
  A s = 0;
  for (int64_t i = 0; i < at::vec::Vectorized<A>::size(); ++i) s += buf[i];
  return s;
}

// at::parallel_for's grain for `units` work units that cover `values` values in all: every unit
// in one task on the calling thread below kSerialValues values (waking the thread pool costs
// tens of us, more than such a pass: a (8, 16, 4, 4) BatchNorm forward took 59 us threaded,
// 12 serial), else 1 (each unit may go to its own thread). The units and their merge order are
// the same either way, so the results are too.
constexpr int64_t kSerialValues = 32768;
inline int64_t serial_grain(int64_t units, int64_t values) {
  return values < kSerialValues ? std::max<int64_t>(units, 1) : 1;
}

// Values per chunk summed in acc_t before the chunk's sum joins a double accumulator.
constexpr int64_t kChunk = 4096;

// Pass-2 result: sums of d and d*d with d = x - m.
struct Sum2 {
  double sd = 0, sdd = 0;
  void merge(const Sum2& o) {
    sd += o.sd;
    sdd += o.sdd;
  }
};

// Count, mean and M2 = sum((x - mean)^2) of a group, in double. Groups merge with Chan et al.'s
// formula in a fixed order; merging two groups of the same exact mean keeps it exact, so a
// constant channel stays exactly constant however it is split.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(const Moments& o) {
    if (o.n == 0) return;
    if (n == 0) {
      *this = o;
      return;
    }
    const double tot = n + o.n, delta = o.mean - mean;
    if (!std::isfinite(mean) || !std::isfinite(o.mean)) {  // Inf/NaN combine as in a plain sum
      mean = (n * mean + o.n * o.mean) / tot;
      m2 += o.m2;  // the non-finite group's M2 is NaN already
      n = tot;
      return;
    }
    mean += delta * (o.n / tot);
    m2 += o.m2 + delta * delta * (n * o.n / tot);
    n = tot;
  }
  double var() const { return n > 0 ? m2 / n : 0.0; }  // biased; NaN propagates
};

// Moments of a group of n values from its shift m (as used in pass 2) and the pass-2 sums.
inline Moments moments_from(double m, double sd, double sdd, int64_t n) {
  Moments r;
  if (n == 0) return r;
  r.n = static_cast<double>(n);
  const double dm = sd * (1.0 / r.n);  // 1/n hoists out of a loop over columns
  // An Inf in the group makes the shift Inf and every d = x - m NaN or -Inf: the mean is then
  // the shift itself (+-Inf, or NaN for +Inf and -Inf together), as torch's batch statistics
  // give it; M2 (so the variance) is NaN.
  r.mean = std::isfinite(m) ? m + dm : m;
  r.m2 = sdd - sd * dm;
  if (r.m2 < 0) r.m2 = 0;
  return r;
}

// sum(x) / n for a group holding an Inf or NaN (the mean torch reports then: +-Inf or NaN).
template <typename T>
inline acc_t<T> plain_mean(const T* x, int64_t n, int64_t stride = 1) {
  acc_t<T> s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t<T>>(x[i * stride]);
  return s / static_cast<acc_t<T>>(n);
}

// Pass 1 over n > 0 contiguous values: the shift m = x0 + sum(x - x0) / n, or the plain mean
// if that is not finite (x0 = Inf would make every term NaN). A step of `side` (Sidecar, defined
// below) goes along with each whole step.
template <typename T, typename Side>
inline acc_t<T> span_shift(const T* x, int64_t n, Side&& side_) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  std::remove_reference_t<Side> side = side_;  // a local: see pass2_lanes
  const A x0 = static_cast<A>(x[0]);
  const V v0(x0);
  // four accumulators: the adds' latency, not the loads, would bound two
  V s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  int64_t i = 0;
  for (; i + 2 * P::kStep <= n; i += 2 * P::kStep) {
    side.step();
    side.step();
    V a, b, c, d;
    P::load_lanes(x + i, a, b);
    P::load_lanes(x + i + P::kStep, c, d);
    s0 += a - v0;
    s1 += b - v0;
    s2 += c - v0;
    s3 += d - v0;
  }
  for (; i + P::kStep <= n; i += P::kStep) {
    side.step();
    V a, b;
    P::load_lanes(x + i, a, b);
    s0 += a - v0;
    s1 += b - v0;
  }
  if (n - i >= kVecTail && n >= P::kStep) {  // the tail as a masked whole step (see tail_mask)
    const A* mk = static_cast<const A*>(tail_mask<T>(n - i));
    V a, b;
    P::load_lanes(x + n - P::kStep, a, b);
    s2 += (a - v0) & V::loadu(mk);
    s3 += (b - v0) & V::loadu(mk + V::size());
    i = n;
  }
  side_.i = side.i;  // where the side got to
  A s = hsum((s0 + s2) + (s1 + s3));
  for (; i < n; ++i) s += static_cast<A>(x[i]) - x0;
  const A m = x0 + s / static_cast<A>(n);
  return std::isfinite(m) ? m : plain_mean(x, n);
}

// ---- elementwise passes, alone or alongside a reduction ----------------------------------------
//
// An elementwise pass (y = f(x), or BatchNorm's dx) over n contiguous values: where the output is
// written non-temporally (NT), value by value up to its first kStreamAlign-aligned value, then in
// whole steps, then the tail as one more whole step overlapping the last (see tail_mask), or
// value by value where NT or where the Body does not allow it (kOverlapTail false: a body that
// also adds into sums, which must see each value once). A Body gives the three kinds of work:
// one(i) for one value, step(i) for the whole step at i (stored NT where NT), last(j) for the
// overlapping tail step (plain stores), and `out`, the output.
// Run alone (finish() straight away), this is the plain loop. A reduction can also take it
// along, a step of each at a time (step()): the fused BatchNorm passes write a plane of one
// channel while they sum the same plane of the next, and done in one loop the two kinds of work
// overlap (the non-temporal stores drain while the sums compute; done one plane after the other,
// they took the sum of their times). Each value gets the same arithmetic either way, so the
// output does not depend on how the steps were interleaved. Where pf_a is not null, every step
// that starts a new line also prefetches the line at the same offset of pf_a and pf_b (the
// inputs the reduction reads next).
template <typename T, bool NT, typename Body>
struct Sidecar {
  using P = VecPair<T>;
  Body body;
  int64_t n;
  const T* pf_a = nullptr;
  const T* pf_b = nullptr;
  int64_t i = 0;
  NORMEXT_INLINE Sidecar(const Body& b, int64_t n_, const T* pa = nullptr, const T* pb = nullptr)
      : body(b), n(n_), pf_a(pa), pf_b(pb) {
    if constexpr (NT)
      for (; i < n && !stream_aligned(body.out + i); ++i) body.one(i);
  }
  NORMEXT_INLINE void step() {
    if (i + P::kStep > n) return;
    constexpr int64_t kLine = 64 / int64_t(sizeof(T));  // values a cache line
    if (pf_a != nullptr && i % kLine < P::kStep)
      for (int64_t o = 0; o < P::kStep; o += kLine) {  // AVX-512 float32: two lines a step
        __builtin_prefetch(pf_a + i + o, 0, 2);
        if (pf_b != nullptr) __builtin_prefetch(pf_b + i + o, 0, 2);
      }
    body.step(i);
    i += P::kStep;
  }
  NORMEXT_INLINE void finish() {
    for (; i + P::kStep <= n; i += P::kStep) body.step(i);
    if (!NT && Body::kOverlapTail && n - i >= kVecTail && n >= P::kStep) {
      body.last(n - P::kStep);
      i = n;
      return;
    }
    for (; i < n; ++i) body.one(i);
  }
};
// No elementwise pass alongside: the reductions' default.
struct NoSide {
  int64_t i = 0;
  NORMEXT_INLINE void step() {}
};
template <typename T>
inline acc_t<T> span_shift(const T* x, int64_t n) {
  return span_shift(x, n, NoSide{});
}

// y[i] = f(x[i]), f given for a vector of acc_t<T> (fv) and for one value (fs). NoNan: round
// without the NaN check (VecPair::put_lanes).
template <typename T, bool NT, bool NoNan, typename FV, typename FS>
struct MapBody {
  using P = VecPair<T>;
  static constexpr bool kOverlapTail = true;
  const T* x;
  T* out;
  FV fv;
  FS fs;
  NORMEXT_INLINE void one(int64_t i) const {
    out[i] = static_cast<T>(fs(static_cast<acc_t<T>>(x[i])));
  }
  NORMEXT_INLINE void step(int64_t i) const {
    typename P::V a, b;
    P::load_lanes(x + i, a, b);
    P::template put_lanes<NT, NoNan>(out + i, fv(a), fv(b));
  }
  NORMEXT_INLINE void last(int64_t j) const {
    typename P::V a, b;
    P::load_lanes(x + j, a, b);
    P::template put_lanes<false>(out + j, fv(a), fv(b));
  }
};

// BatchNorm's dx[i] = a * dy[i] + b * (x[i] - mean) + k (the per-channel constants of the
// backward formula); without x (HasX false; evaluation), dx = a * dy. Fold: the folded
// dx = a * dy + b * x + k, k holding k - b * mean (mean is not used; see kFoldBackward).
template <typename T, bool NT, bool NoNan, bool HasX, bool Fold = false>
struct DxBody {
  using P = VecPair<T>;
  static constexpr bool kOverlapTail = true;
  using A = acc_t<T>;
  using V = typename P::V;
  const T* dy;
  const T* x;
  T* out;
  A a, b, mean, k;
  V va, vb, vm, vk;
  NORMEXT_INLINE DxBody(const T* dy_, const T* x_, T* out_, A a_, A b_, A mean_, A k_)
      : dy(dy_), x(x_), out(out_), a(a_), b(b_), mean(mean_), k(k_), va(a_), vb(b_), vm(mean_),
        vk(k_) {}
  NORMEXT_INLINE void one(int64_t i) const {
    const A g = static_cast<A>(dy[i]) * a;
    if constexpr (!HasX)
      out[i] = static_cast<T>(g);
    else if constexpr (Fold)
      out[i] = static_cast<T>(g + static_cast<A>(x[i]) * b + k);
    else
      out[i] = static_cast<T>(g + (static_cast<A>(x[i]) - mean) * b + k);
  }
  template <bool S, bool NN>
  NORMEXT_INLINE void put(int64_t i) const {
    V g0, g1;
    P::load_lanes(dy + i, g0, g1);
    if constexpr (!HasX) {
      P::template put_lanes<S, NN>(out + i, g0 * va, g1 * va);
    } else {
      V x0, x1;
      P::load_lanes(x + i, x0, x1);
      if constexpr (!Fold) {
        x0 = x0 - vm;
        x1 = x1 - vm;
      }
      P::template put_lanes<S, NN>(out + i, at::vec::fmadd(g0, va, at::vec::fmadd(x0, vb, vk)),
                                   at::vec::fmadd(g1, va, at::vec::fmadd(x1, vb, vk)));
    }
  }
  NORMEXT_INLINE void step(int64_t i) const { put<NT, NoNan>(i); }
  NORMEXT_INLINE void last(int64_t j) const { put<false, false>(j); }
};

// The vector part of pass 2 over x[0, n): d = x - vm added into four lanes of sum(d) and sum(d*d)
// (four independent accumulators, so the adds' latency does not bound the loop), the tail too
// where n >= kStep (tail_mask). Returns where the vectors stopped; the caller adds what is left
// (all of a span shorter than kStep).
template <typename T, typename V, typename Side = NoSide>
NORMEXT_INLINE int64_t pass2_lanes(const T* x, int64_t n, const V& vm, V (&d)[4], V (&q)[4],
                                   Side&& side_ = NoSide{}) {
  using P = VecPair<T>;
  // Locals, not d, q and side themselves: a vector store (the side's output) may alias any
  // memory, so the compiler would store and reload them around every one.
  V d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3], q0 = q[0], q1 = q[1], q2 = q[2], q3 = q[3];
  std::remove_reference_t<Side> side = side_;
  int64_t i = 0;
  for (; i + 2 * P::kStep <= n; i += 2 * P::kStep) {
    side.step();
    side.step();
    V a, b, c, e;
    P::load_lanes(x + i, a, b);
    P::load_lanes(x + i + P::kStep, c, e);
    a = a - vm;
    b = b - vm;
    c = c - vm;
    e = e - vm;
    d0 += a;
    d1 += b;
    d2 += c;
    d3 += e;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
    q2 = at::vec::fmadd(c, c, q2);
    q3 = at::vec::fmadd(e, e, q3);
  }
  for (; i + P::kStep <= n; i += P::kStep) {
    side.step();
    V a, b;
    P::load_lanes(x + i, a, b);
    a = a - vm;
    b = b - vm;
    d0 += a;
    d1 += b;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
  }
  if (n - i >= kVecTail && n >= P::kStep) {  // the tail as a masked whole step (see tail_mask)
    const acc_t<T>* mk = static_cast<const acc_t<T>*>(tail_mask<T>(n - i));
    V a, b;
    P::load_lanes(x + n - P::kStep, a, b);
    a = (a - vm) & V::loadu(mk);
    b = (b - vm) & V::loadu(mk + V::size());
    d2 += a;
    d3 += b;
    q2 = at::vec::fmadd(a, a, q2);
    q3 = at::vec::fmadd(b, b, q3);
    i = n;
  }
  d[0] = d0, d[1] = d1, d[2] = d2, d[3] = d3, q[0] = q0, q[1] = q1, q[2] = q2, q[3] = q3;
  side_.i = side.i;  // where the side got to
  return i;
}

// Pass 2 over n contiguous values with shift m.
template <typename T, typename Side = NoSide>
inline Sum2 span_pass2(const T* x, int64_t n, acc_t<T> m, Side&& side = NoSide{}) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  Sum2 out;
  const V vm(m);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    V d[4] = {V(A(0)), V(A(0)), V(A(0)), V(A(0))}, q[4] = {V(A(0)), V(A(0)), V(A(0)), V(A(0))};
    int64_t i = c0 + pass2_lanes(x + c0, c1 - c0, vm, d, q, side);
    A sd = hsum((d[0] + d[2]) + (d[1] + d[3])), sdd = hsum((q[0] + q[2]) + (q[1] + q[3]));
    for (; i < c1; ++i) {
      const A v = static_cast<A>(x[i]) - m;
      sd += v;
      sdd += v * v;
    }
    out.sd += sd;
    out.sdd += sdd;
  }
  return out;
}

// The pass-2 shift for n values joining a group whose moments so far are `acc`: the group's
// running mean (rounded to acc_t), so that pass 1 can be skipped. The shifted sums lose accuracy
// only by (mean of the new values - shift)^2 relative to their M2, and merging them into `acc`
// adds at least acc.n * n / (acc.n + n) times that same square to the merged M2; with
// acc.n >= n the error stays within a few float roundings of the result. Returns false (run
// pass 1) for a group's first piece, a piece longer than the group so far, and a mean that is
// not finite (Inf/NaN, see span_shift) or past acc_t's range.
template <typename A>
inline bool running_shift(const Moments& acc, int64_t n, A& m) {
  if (acc.n < static_cast<double>(n) || !std::isfinite(acc.mean)) return false;
  m = static_cast<A>(acc.mean);
  return std::isfinite(m);
}

// Moments of n contiguous values. Long spans go one kChunk-sized piece at a time (in L1 for both
// passes, so the data come from memory once); after the first, a piece takes the running shift
// and one pass. The pieces merge in order.
// Side: a Sidecar that takes a step along with each whole step of the pass that reads a piece
// first (pass 1, or pass 2 where the running shift stands in for it).
template <typename T, typename Side = NoSide>
inline Moments span_moments(const T* x, int64_t n, Side&& side = NoSide{}) {
  Moments out;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    acc_t<T> m;
    Sum2 s2;
    if (running_shift(out, len, m)) {
      s2 = span_pass2(x + c0, len, m, side);
    } else {
      m = span_shift(x + c0, len, side);
      s2 = span_pass2(x + c0, len, m);
    }
    out.merge(moments_from(static_cast<double>(m), s2.sd, s2.sdd, len));
  }
  return out;
}

// Pass 2 over x[0, n) around m into pending sums not yet in double: four vector lanes each of
// sum(d) and sum(d*d) (pass2_lanes) and the tail's sums dt, qt. pending_spill adds them into
// double sums and clears them. MomentsAcc and short_spans_moments keep such lanes over at most
// kChunk values, so no span takes a horizontal sum (which costs as much as a small plane).
template <typename T, typename V, typename A, typename Side = NoSide>
NORMEXT_INLINE void pending_add(const T* x, int64_t n, A m, V (&d)[4], V (&q)[4], A& dt, A& qt,
                                Side&& side = NoSide{}) {
  int64_t i = pass2_lanes(x, n, V(m), d, q, side);
  for (; i < n; ++i) {
    const A v = static_cast<A>(x[i]) - m;
    dt += v;
    qt += v * v;
  }
}
template <typename V, typename A>
inline void pending_spill(V (&d)[4], V (&q)[4], A& dt, A& qt, double& sd, double& sdd) {
  sd += static_cast<double>(hsum((d[0] + d[2]) + (d[1] + d[3])) + dt);
  sdd += static_cast<double>(hsum((q[0] + q[2]) + (q[1] + q[3])) + qt);
  for (int k = 0; k < 4; ++k) d[k] = q[k] = V(A(0));
  dt = qt = 0;
}

// Moments of a group fed span by span in a fixed order (the planes of a BatchNorm channel):
// pending spans share one pass-2 shift, the group's mean when they began, and their sums simply
// add; they merge into the group's moments once they would outnumber it. So the running-shift
// bound above holds (pending count <= merged count), pass 1 runs for the first span only, and a
// channel of many small planes costs about log2(planes) merges, not one per plane.
template <typename A>
struct MomentsAcc {
  using V = at::vec::Vectorized<A>;
  Moments done;
  A shift = 0;
  double sd = 0, sdd = 0;  // pending sums, in double
  int64_t pending = 0;
  // Pending sums not yet in double: vector lanes (no horizontal sum per span, which would cost
  // as much as a small plane) over at most kChunk values, as span_pass2's chunks.
  V d[4] = {V(A(0)), V(A(0)), V(A(0)), V(A(0))}, q[4] = {V(A(0)), V(A(0)), V(A(0)), V(A(0))};
  A dt = 0, qt = 0;
  int64_t in_vec = 0;

  void spill() {
    if (in_vec == 0) return;
    pending_spill(d, q, dt, qt, sd, sdd);
    in_vec = 0;
  }
  void flush() {
    spill();
    if (pending == 0) return;
    done.merge(moments_from(static_cast<double>(shift), sd, sdd, pending));
    sd = sdd = 0;
    pending = 0;
  }
  // Side: a Sidecar that takes a step along with each whole step of pass 2 (a span that takes
  // both passes, a group's first, leaves all of it to the caller's finish()).
  template <typename T, typename Side = NoSide>
  void add(const T* x, int64_t n, Side&& side = NoSide{}) {
    if (n == 0) return;
    if (static_cast<double>(pending + n) > done.n) flush();
    if (pending == 0 && !running_shift(done, n, shift)) {
      done.merge(span_moments(x, n));
      return;
    }
    pending += n;
    if (n > kChunk) {
      spill();
      const Sum2 s = span_pass2(x, n, shift, side);
      sd += s.sd;
      sdd += s.sdd;
      return;
    }
    if (in_vec + n > kChunk) spill();
    in_vec += n;
    // The lanes go through locals: summed into the members themselves, they stayed in memory,
    // a store and a load a vector (the compiler cannot keep a member array in registers).
    V dl[4] = {d[0], d[1], d[2], d[3]}, ql[4] = {q[0], q[1], q[2], q[3]};
    pending_add(x, n, shift, dl, ql, dt, qt, side);
    for (int k = 0; k < 4; ++k) {
      d[k] = dl[k];
      q[k] = ql[k];
    }
  }
  void merge(MomentsAcc o) {
    flush();
    o.flush();
    done.merge(o.done);
  }
  Moments result() {
    flush();
    return done;
  }
};

// The moments of `planes` spans of `len` values each (len <= kChunk), `stride` values apart (a
// BatchNorm channel's short planes), in MomentsAcc's order and grouping: the first span takes
// both passes, then the spans go in groups as large as what is merged so far (1, 2, 4, ...),
// each group summed in one pass around the running mean and merged once. MomentsAcc does the
// same span by span, but its lanes live in the accumulator between calls (memory, reloaded per
// span) and each span is a call: for planes of 49 values that bookkeeping cost more than the
// sums. Here the lanes stay in registers across a group.
template <typename T>
inline Moments short_spans_moments(const T* x, int64_t stride, int64_t planes, int64_t len) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  Moments done;
  if (planes == 0 || len == 0) return done;
  done = span_moments(x, len);
  int64_t p = 1;
  while (p < planes) {
    const int64_t g = std::min(p, planes - p);  // g * len <= done.n: running_shift's bound
    A m;
    if (!running_shift(done, g * len, m)) {  // a mean that is not finite: span by span
      for (; p < planes; ++p) done.merge(span_moments(x + p * stride, len));
      break;
    }
    V d[4] = {V(A(0)), V(A(0)), V(A(0)), V(A(0))}, q[4] = {V(A(0)), V(A(0)), V(A(0)), V(A(0))};
    A dt = 0, qt = 0;
    double sd = 0, sdd = 0;
    int64_t in_vec = 0;
    for (int64_t i = p; i < p + g; ++i) {
      if (in_vec + len > kChunk) {
        pending_spill(d, q, dt, qt, sd, sdd);
        in_vec = 0;
      }
      in_vec += len;
      pending_add(x + i * stride, len, m, d, q, dt, qt);
    }
    pending_spill(d, q, dt, qt, sd, sdd);
    done.merge(moments_from(static_cast<double>(m), sd, sdd, g * len));
    p += g;
  }
  return done;
}

// y[i] = (x[i] - mean) * scale + shift over n contiguous values. Subtracting the mean first
// keeps large offsets (mean 1e4, std 1e-2) exact where x * scale - mean * scale would cancel.
template <typename T, bool NT, bool NoNan>
NORMEXT_INLINE auto affine_body(const T* x, T* y, acc_t<T> mean, acc_t<T> scale, acc_t<T> shift) {
  using V = typename VecPair<T>::V;
  const V vm(mean), vs(scale), vb(shift);
  auto fv = [vm, vs, vb](const V& v) { return at::vec::fmadd(v - vm, vs, vb); };
  auto fs = [mean, scale, shift](acc_t<T> v) { return (v - mean) * scale + shift; };
  return MapBody<T, NT, NoNan, decltype(fv), decltype(fs)>{x, y, fv, fs};
}
template <typename T, bool NT = false, bool NoNan = false>
NORMEXT_INLINE void span_affine(const T* x, T* y, int64_t n, acc_t<T> mean, acc_t<T> scale,
                                acc_t<T> shift) {
  auto body = affine_body<T, NT, NoNan>(x, y, mean, scale, shift);
  Sidecar<T, NT, decltype(body)>(body, n).finish();
}

// y = x * scale + beta over n contiguous values: span_affine folded, for a channel or row whose
// mean is within a few standard deviations of 0 (kFoldOffset in batch_norm.cpp and
// layer_norm.cpp), where beta = shift - mean * scale loses nothing. One operation a vector less:
// measured, bfloat16 (32, 512, 7, 7) and (32, 256, 14, 14) forward 5-10% faster, float32 as much.
template <typename T, bool NT, bool NoNan>
NORMEXT_INLINE auto scale_shift_body(const T* x, T* y, acc_t<T> scale, acc_t<T> beta) {
  using V = typename VecPair<T>::V;
  const V vs(scale), vb(beta);
  auto fv = [vs, vb](const V& v) { return at::vec::fmadd(v, vs, vb); };
  auto fs = [scale, beta](acc_t<T> v) { return v * scale + beta; };
  return MapBody<T, NT, NoNan, decltype(fv), decltype(fs)>{x, y, fv, fs};
}
template <typename T, bool NT = false, bool NoNan = false>
NORMEXT_INLINE void span_scale_shift(const T* x, T* y, int64_t n, acc_t<T> scale, acc_t<T> beta) {
  auto body = scale_shift_body<T, NT, NoNan>(x, y, scale, beta);
  Sidecar<T, NT, decltype(body)>(body, n).finish();
}

// Sums of dy and dy * (x - mean) over n contiguous values (the two per-group sums that the
// backward needs), chunked into double like pass 2. A step of `side` (Sidecar) goes along with
// each whole step. Fold: the whole steps sum dy * x, and each lane takes mean * sum(dy) off once
// a chunk (one subtraction a vector less; for a mean within a few standard deviations of 0,
// see kFoldBackward in batch_norm.cpp).
template <typename T, bool Fold = false, typename Side = NoSide>
NORMEXT_INLINE Sum2 span_grad_sums(const T* dy, const T* x, int64_t n, acc_t<T> mean,
                                   Side&& side_ = NoSide{}) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  std::remove_reference_t<Side> side = side_;  // a local: see pass2_lanes
  Sum2 out;
  const V vm(mean);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    V g0(A(0)), g1(A(0)), p0(A(0)), p1(A(0));
    int64_t i = c0;
    for (; i + P::kStep <= c1; i += P::kStep) {
      side.step();
      V ga, gb, a, b;
      P::load_lanes(dy + i, ga, gb);
      P::load_lanes(x + i, a, b);
      g0 += ga;
      g1 += gb;
      if constexpr (Fold) {
        p0 = at::vec::fmadd(ga, a, p0);
        p1 = at::vec::fmadd(gb, b, p1);
      } else {
        p0 = at::vec::fmadd(ga, a - vm, p0);
        p1 = at::vec::fmadd(gb, b - vm, p1);
      }
    }
    if constexpr (Fold) {  // sum(dy * x) - mean * sum(dy), lane by lane
      p0 = at::vec::fmadd(g0, V(-mean), p0);
      p1 = at::vec::fmadd(g1, V(-mean), p1);
    }
    // the tail as a masked whole step (see tail_mask)
    if (c1 - i >= kVecTail && c1 - c0 >= P::kStep) {
      const A* mk = static_cast<const A*>(tail_mask<T>(c1 - i));
      const V ma = V::loadu(mk), mb = V::loadu(mk + V::size());
      V ga, gb, a, b;
      P::load_lanes(dy + c1 - P::kStep, ga, gb);
      P::load_lanes(x + c1 - P::kStep, a, b);
      ga = ga & ma;
      gb = gb & mb;
      g0 += ga;
      g1 += gb;
      p0 = at::vec::fmadd(ga, (a - vm) & ma, p0);
      p1 = at::vec::fmadd(gb, (b - vm) & mb, p1);
      i = c1;
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
  side_.i = side.i;  // where the side got to
  return out;
}

// dx[i] = a * dy[i] + b * (x[i] - mean) + k over n contiguous values (BatchNorm's dx with the
// per-channel constants of the backward formula). With x == nullptr, dx = a * dy.
// NT: dx is written with non-temporal stores (from its first aligned value on).
template <typename T, bool NT = false, bool NoNan = false>
NORMEXT_INLINE void span_dx(const T* dy, const T* x, T* dx, int64_t n, acc_t<T> a, acc_t<T> b,
                            acc_t<T> mean, acc_t<T> k) {
  if (x == nullptr)
    Sidecar<T, NT, DxBody<T, NT, NoNan, false>>({dy, x, dx, a, b, mean, k}, n).finish();
  else
    Sidecar<T, NT, DxBody<T, NT, NoNan, true>>({dy, x, dx, a, b, mean, k}, n).finish();
}

// ---- short planes as one stream ----------------------------------------------------------------
//
// NCHW planes lie one after another: planes u0 .. u1 - 1 (plane u of channel u % C) are one run
// of (u1 - u0) * S values. planes_map walks that run in whole steps that do not restart at each
// plane: the steps inside a plane take its channel's constants; the one step that straddles two
// planes takes the first plane's constants in the lanes of its values and the next plane's in
// the others (a blend with tail_mask); the run's last step overlaps the one before it (as in
// Sidecar::finish). Each value gets the same arithmetic with its own channel's constants as the
// span loops give it, so the results are the same. Walked plane by plane, a (32, 256, 14, 14)
// bfloat16 apply paid a loop entry, a partial step and its constants every 196 values: measured,
// one thread, eval forward 0.193 ns a value, against 0.138 for 56 x 56 planes. Raw ops, 2
// threads, interleaved in one process, plane by plane -> planes_map (with planes_grad_sums for
// the backward's sums), quartile ms: bf16 (32, 256, 14, 14) eval forward 0.196 -> 0.146,
// training forward 0.306 -> 0.251, backward 0.406 -> 0.367; (32, 512, 7, 7) 0.176 -> 0.092,
// 0.295 -> 0.205, 0.379 -> 0.314; float32 and float16 7-34% faster at both shapes.
// Needs S >= kStep (a step straddles at most two planes). NoNan: as MapBody. Op gives kIn
// (1: in0 only; 2: in0 and in1), kK constants per channel (consts(c, k) broadcasts them) and the
// map (vec).
template <typename T, bool NoNan = false, typename Op>
NORMEXT_INLINE void planes_map(const Op& op, const T* in0, const T* in1, T* out, int64_t u0,
                               int64_t u1, int64_t S, int64_t C) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  constexpr int64_t K = P::kStep;
  constexpr int NK = Op::kK;
  if (u0 >= u1) return;
  auto step = [&](int64_t i, const V* ka, const V* kb) {
    V a0, b0, a1, b1;
    P::load_lanes(in0 + i, a0, b0);
    if constexpr (Op::kIn == 2) P::load_lanes(in1 + i, a1, b1);
    P::template put_lanes<false, NoNan>(out + i, op.vec(a0, a1, ka), op.vec(b0, b1, kb));
  };
  int64_t c = u0 % C;
  V k[NK];
  op.consts(c, k);
  int64_t i = u0 * S;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t e = (u + 1) * S;
    for (; i + K <= e; i += K) step(i, k, k);
    if (++c == C) c = 0;
    if (u + 1 == u1) {
      if (i < e) step(e - K, k, k);  // the run's end: overlap the last whole step
      break;
    }
    V nk[NK];
    op.consts(c, nk);
    if (i < e) {  // the step over the end of plane u and the start of plane u + 1
      const A* mk = static_cast<const A*>(tail_mask<T>(K - (e - i)));
      const V ma = V::loadu(mk), mb = V::loadu(mk + V::size());
      V ka[NK], kb[NK];
      for (int j = 0; j < NK; ++j) {
        ka[j] = V::blendv(k[j], nk[j], ma);
        kb[j] = V::blendv(k[j], nk[j], mb);
      }
      step(i, ka, kb);
      i += K;
    }
    for (int j = 0; j < NK; ++j) k[j] = nk[j];
  }
}

// The backward's sums of each plane of planes [u0, u1) (sum(dy) and sum(dy * (x - m[c])), as
// span_grad_sums), walked as planes_map walks them, added into part[c] for plane u's channel
// c = u % C (part: C entries). Each plane's values are summed in acc_t lanes, then added to the
// channel's double sums (so S <= kChunk). Measured, interleaved in one process, raw backward:
// (32, 512, 7, 7) bf16 7-9% faster than span_grad_sums plane by plane, (32, 256, 14, 14) the
// same. (The forward's statistics walked this way, in memory order around each channel's first
// plane's mean, were 7-11% slower in bf16 than short_spans_moments channel by channel.)
// The step that straddles two planes adds its lanes to the plane each holds
// (blends: the other plane's lanes add zero, after the subtraction, so an Inf there cannot turn
// into NaN). Needs S >= kStep. Fold: each plane sums dy * x, and mean * sum(dy) comes off its
// second sum in double (as span_grad_sums<T, true>).
template <typename T, bool Fold = false>
NORMEXT_INLINE void planes_grad_sums(const T* dy, const T* x, int64_t u0, int64_t u1, int64_t S,
                                     int64_t C, const acc_t<T>* m, Sum2* part) {
  using P = VecPair<T>;
  using A = typename P::A;
  using V = typename P::V;
  constexpr int64_t K = P::kStep;
  if (u0 >= u1) return;
  const V zero(A(0));
  V s0 = zero, s1 = zero, q0 = zero, q1 = zero;
  // the step at j: g = dy, d = x - vm
  auto load = [&](int64_t j, const V& vm, V& ga, V& gb, V& da, V& db) {
    V a, b;
    P::load_lanes(x + j, a, b);
    if constexpr (Fold) {
      da = a;
      db = b;
    } else {
      da = a - vm;
      db = b - vm;
    }
    P::load_lanes(dy + j, ga, gb);
  };
  auto add = [&](const V& ga, const V& gb, const V& da, const V& db) {
    s0 += ga;
    s1 += gb;
    q0 = at::vec::fmadd(ga, da, q0);
    q1 = at::vec::fmadd(gb, db, q1);
  };
  int64_t c = u0 % C;
  V vm(m[c]);
  int64_t i = u0 * S;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t e = (u + 1) * S;
    for (; i + K <= e; i += K) {
      V ga, gb, da, db;
      load(i, vm, ga, gb, da, db);
      add(ga, gb, da, db);
    }
    const bool last = u + 1 == u1;
    V ma, mb;
    if (i < e) {
      // the last run's tail: the last whole step, its lanes before i masked out (tail_mask);
      // else the step that straddles into plane u + 1, whose lanes mb/ma mark
      const A* mk = static_cast<const A*>(tail_mask<T>(last ? e - i : K - (e - i)));
      ma = V::loadu(mk);
      mb = V::loadu(mk + V::size());
      V ga, gb, da, db;
      load(last ? e - K : i, vm, ga, gb, da, db);
      if (last)
        add(ga & ma, gb & mb, da & ma, db & mb);
      else
        add(V::blendv(ga, zero, ma), V::blendv(gb, zero, mb), V::blendv(da, zero, ma),
            V::blendv(db, zero, mb));
    }
    const A sg = hsum(s0 + s1), sq = hsum(q0 + q1);
    part[c].sd += sg;
    if constexpr (Fold)
      part[c].sdd += static_cast<double>(sq) - static_cast<double>(m[c]) * sg;
    else
      part[c].sdd += sq;
    if (last) break;
    s0 = s1 = q0 = q1 = zero;
    if (++c == C) c = 0;
    vm = V(m[c]);
    if (i < e) {
      V ga, gb, da, db;
      load(i, vm, ga, gb, da, db);
      add(V::blendv(zero, ga, ma), V::blendv(zero, gb, mb), V::blendv(zero, da, ma),
          V::blendv(zero, db, mb));
      i += K;
    }
  }
}

// planes_map's maps: y = x * s + b (ScaleShiftOp, the folded forward), (x - m) * s + h
// (AffineOp), and BatchNorm's dx = a * dy + b * (x - m) + k (DxOp; DxFoldOp: the folded
// a * dy + b * x + k; GradScaleOp: dx = a * dy).
template <typename T>
struct ScaleShiftOp {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int kIn = 1, kK = 2;
  const A *s, *b;
  NORMEXT_INLINE void consts(int64_t c, V* k) const {
    k[0] = V(s[c]);
    k[1] = V(b[c]);
  }
  NORMEXT_INLINE V vec(const V& x, const V&, const V* k) const {
    return at::vec::fmadd(x, k[0], k[1]);
  }
};
template <typename T>
struct AffineOp {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int kIn = 1, kK = 3;
  const A *m, *s, *h;
  NORMEXT_INLINE void consts(int64_t c, V* k) const {
    k[0] = V(m[c]);
    k[1] = V(s[c]);
    k[2] = V(h[c]);
  }
  NORMEXT_INLINE V vec(const V& x, const V&, const V* k) const {
    return at::vec::fmadd(x - k[0], k[1], k[2]);
  }
};
template <typename T>
struct GradScaleOp {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int kIn = 1, kK = 1;
  const A* a;
  NORMEXT_INLINE void consts(int64_t c, V* k) const { k[0] = V(a[c]); }
  NORMEXT_INLINE V vec(const V& g, const V&, const V* k) const { return g * k[0]; }
};
template <typename T>
struct DxOp {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int kIn = 2, kK = 4;
  const A *a, *b, *m, *k;
  NORMEXT_INLINE void consts(int64_t c, V* v) const {
    v[0] = V(a[c]);
    v[1] = V(b[c]);
    v[2] = V(m[c]);
    v[3] = V(k[c]);
  }
  NORMEXT_INLINE V vec(const V& g, const V& x, const V* v) const {
    return at::vec::fmadd(g, v[0], at::vec::fmadd(x - v[2], v[1], v[3]));
  }
};
template <typename T>
struct DxFoldOp {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int kIn = 2, kK = 3;
  const A *a, *b, *k;
  NORMEXT_INLINE void consts(int64_t c, V* v) const {
    v[0] = V(a[c]);
    v[1] = V(b[c]);
    v[2] = V(k[c]);
  }
  NORMEXT_INLINE V vec(const V& g, const V& x, const V* v) const {
    return at::vec::fmadd(g, v[0], at::vec::fmadd(x, v[1], v[2]));
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace normext::cpu
