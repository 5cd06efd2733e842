// The CPU output cache: see output_cache.h for why. One cache for the process (this file is
// compiled once, not per ISA), guarded by a mutex: tensors may die on any thread.
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#if defined(__unix__)
#include <pthread.h>
#endif

#include "cpu/huge_pages.h"

namespace normext::cpu {
namespace {

constexpr size_t kCacheMinBytes = size_t{1} << 20;
constexpr size_t kDefaultCacheBytes = size_t{256} << 20;
constexpr size_t kHugeMinBytes = 2 * kHugePageBytes;  // huge-page aligned and advised from here on
constexpr size_t kRoundBytes = size_t{64} << 10;
constexpr size_t kAlign = 64;  // c10's CPU alignment

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

struct Block {
  void* ptr;
  size_t bytes;    // as allocated: a rounded size for cacheable blocks
  bool cacheable;  // kCacheMinBytes or more
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() {
    limit_ = kDefaultCacheBytes;
    if (const char* v = std::getenv("NORMEXT_CPU_CACHE_MB")) {
      char* end = nullptr;
      const long long mb = std::strtoll(v, &end, 10);
      TORCH_CHECK(end != v && *end == '\0' && mb >= 0,
                  "NORMEXT_CPU_CACHE_MB must be a whole number of megabytes, got '", v, "'");
      limit_ = static_cast<size_t>(mb) << 20;
    }
  }

  c10::DataPtr allocate(size_t n) override {
    Block* b = nullptr;
    if (n >= kCacheMinBytes) {
      const size_t bytes = round_up(n, n >= kHugeMinBytes ? kHugePageBytes : kRoundBytes);
      b = take(bytes);
      if (b == nullptr) b = fresh(bytes, true);
    } else {
      b = fresh(n, false);
    }
    return {b->ptr, b, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(limit_), hits_, misses_};
  }

  int64_t release_all() {
    std::vector<Block*> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      out.swap(free_);
      cached_ = 0;
    }
    int64_t bytes = 0;
    for (Block* b : out) {
      bytes += static_cast<int64_t>(b->bytes);
      destroy(b);
    }
    return bytes;
  }

  static OutputCache& get() {
    static OutputCache* cache = [] {
      auto* c = new OutputCache;  // never destroyed: tensors may outlive statics
#if defined(__unix__)
      // A child forked while another thread held the lock (a DataLoader worker, say) would
      // wait for it forever: the child starts with a fresh lock and an empty list (the
      // parent's cached blocks stay with the parent; the child's copies are not reused).
      pthread_atfork(nullptr, nullptr, [] {
        OutputCache& c = get();
        new (&c.mu_) std::mutex;
        new (&c.free_) std::vector<Block*>;
        c.cached_ = 0;
      });
#endif
      return c;
    }();
    return *cache;
  }

 private:
  // The most recently freed block of exactly `bytes`, or null.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = free_.size(); i-- > 0;) {
      if (free_[i]->bytes != bytes) continue;
      Block* b = free_[i];
      free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
      cached_ -= bytes;
      ++hits_;
      return b;
    }
    ++misses_;
    return nullptr;
  }

  static Block* fresh(size_t bytes, bool cacheable) {
    const size_t align = bytes >= kHugeMinBytes && cacheable ? kHugePageBytes : kAlign;
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes == 0 ? 1 : bytes) != 0) {
      // Out of memory: give back what the cache holds and try once more.
      get().release_all();
      TORCH_CHECK(posix_memalign(&p, align, bytes == 0 ? 1 : bytes) == 0,
                  "normext: out of CPU memory allocating ", bytes, " bytes");
    }
    if (align == kHugePageBytes) advise_huge_pages(p, bytes);
    return new Block{p, bytes, cacheable};
  }

  static void destroy(Block* b) {
    std::free(b->ptr);
    delete b;
  }

  // A dying tensor's block: kept (most recent last) if cacheable and the limit allows, the
  // least recently freed ones going back to the system to make room.
  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    OutputCache& c = get();
    std::vector<Block*> evicted;
    bool keep = false;
    if (b->cacheable) {
      std::lock_guard<std::mutex> lock(c.mu_);
      if (b->bytes <= c.limit_) {
        size_t drop = 0;
        while (c.cached_ + b->bytes > c.limit_) {
          evicted.push_back(c.free_[drop]);
          c.cached_ -= c.free_[drop]->bytes;
          ++drop;
        }
        c.free_.erase(c.free_.begin(), c.free_.begin() + static_cast<std::ptrdiff_t>(drop));
        c.free_.push_back(b);
        c.cached_ += b->bytes;
        keep = true;
      }
    }
    for (Block* e : evicted) destroy(e);  // outside the lock
    if (!keep) destroy(b);
  }

  std::mutex mu_;
  std::vector<Block*> free_;  // least recently freed first
  size_t cached_ = 0, limit_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(const at::Tensor& x, bool same_strides) {
  const size_t bytes = static_cast<size_t>(x.numel()) * x.element_size();
  c10::Allocator* cache = &OutputCache::get();
  const auto cpu = c10::DispatchKeySet(c10::DispatchKey::CPU);
  if (!same_strides) {
    if (bytes < kCacheMinBytes) return at::empty(x.sizes(), x.options());
    return at::detail::empty_generic(x.sizes(), cache, cpu, x.scalar_type(),
                                     at::MemoryFormat::Contiguous);
  }
  if (bytes < kCacheMinBytes || !x.is_non_overlapping_and_dense()) return at::empty_like(x);
  // at::empty_like's own choice for a dense x: the same sizes and strides.
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), cache, cpu, x.scalar_type());
}

OutputCacheStats output_cache_stats() { return OutputCache::get().stats(); }

int64_t output_cache_release() { return OutputCache::get().release_all(); }

}  // namespace normext::cpu
