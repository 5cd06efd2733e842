// Large outputs in transparent huge pages (Linux).
//
// A large output tensor is often fresh memory: glibc hands allocations above its mmap threshold
// (up to 32 MB) straight to mmap, and gives the top of the heap back to the system after a
// large free. The first write to each 4 KB page of fresh memory then traps into the kernel,
// which zeroes and maps that page. On this project's 2-core EPYC that costs 16 ms for a 25.7 MB
// tensor written by one thread, against 1.3 ms to write it again once mapped: a fresh output
// costs twelve times the write itself (a memset in C, one thread).
//
// Where the system leaves transparent huge pages to madvise (/sys/kernel/mm/
// transparent_hugepage/enabled = madvise, a common default), asking for them maps an output
// 2 MB per trap: the same first write takes 4.2-5.1 ms, and later writes are faster too (0.9
// against 1.3 ms; fewer TLB misses). The output cache (output_cache.h) asks for them on its
// blocks of 4 MB or more, which it allocates 2 MB aligned, and keeps those blocks mapped for the
// next outputs. The advice is a hint: where huge pages are off or unavailable, madvise fails or
// does nothing and the kernel falls back to 4 KB pages. NORMEXT_HUGE_PAGES=0 turns it off.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace normext::cpu {

constexpr uintptr_t kHugePageBytes = uintptr_t{1} << 21;  // a transparent huge page on x86-64

inline bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("NORMEXT_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// Advise huge pages for the whole 2 MB pages inside [p, p + bytes) (output_cache.cpp calls it
// for its blocks of 4 MB or more, which are 2 MB aligned).
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_pages_enabled()) return;
  const auto begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t first = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePageBytes - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace normext::cpu
