// Large CPU outputs from a small cache of freed blocks (csrc/cpu/output_cache.cpp).
//
// A training loop allocates the same outputs every step: BatchNorm's y in the forward, dx in the
// backward. glibc serves a large allocation with fresh pages (it maps allocations above its
// mmap threshold afresh, and gives the top of its heap back to the system after large frees),
// and the first write to each fresh 4 KB page traps into the kernel, which zeroes it. Measured
// on this project's 2-core EPYC, a (32, 256, 14, 14) bfloat16 forward + backward in a loop
// (benchmarks' "full" mode): normext took 110-150 faults a call, and its two 3.2 MB outputs
// were all fresh (perf: 1500 faults a step, clear_page and the fault path 10% of the time).
//
// So outputs of kCacheMinBytes or more come from blocks that normext's own allocator keeps
// when their tensors die, reused for the next output of the same rounded size: the pages stay
// mapped, and a loop's outputs are written without a fault. Blocks of 4 MB or more are 2 MB
// aligned and advised into transparent huge pages (huge_pages.h says what that saves).
// At most kDefaultCacheBytes (256 MB) of freed blocks are kept, the least recently freed going
// back to the system first; NORMEXT_CPU_CACHE_MB sets that limit (0: no cache, every block
// goes back at once), and normext.empty_cache() returns every cached block. Outputs are
// ordinary tensors (resizable: a resize takes a new block from the same allocator).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace normext::cpu {

// An uninitialized CPU tensor of x's sizes and dtype, from the output cache where it is large
// enough: contiguous (as at::empty(x.sizes(), x.options())), or with same_strides as
// at::empty_like(x) lays it out (x's own strides where x is dense).
at::Tensor empty_output(const at::Tensor& x, bool same_strides);

struct OutputCacheStats {
  int64_t cached_bytes = 0;  // freed blocks held for reuse
  int64_t limit_bytes = 0;   // the most that is held
  int64_t hits = 0;          // outputs served from a cached block
  int64_t misses = 0;        // outputs of cacheable size that needed a fresh block
};
OutputCacheStats output_cache_stats();
// Returns every cached block to the system; returns the bytes released.
int64_t output_cache_release();

}  // namespace normext::cpu
