// The cache of large CPU buffers (cpu/memory.h): the block cache, the kernels' empty_large, and
// the c10::Allocator that routes PyTorch's own large CPU allocations through the same cache.
#include "cpu/memory.h"

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>
#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace bnn_fast {
namespace cpu {
namespace {

constexpr size_t kHuge = size_t(1) << 21;        // blocks from 2 MiB up are whole huge pages
constexpr size_t kSmallRound = size_t(1) << 16;  // smaller blocks are whole 64 KiB

struct Cache {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void*>> free_blocks;  // by block size
  std::unordered_map<void*, size_t> live;  // blocks handed out by the allocator, and their sizes
  size_t cached = 0;  // bytes in free_blocks
  size_t in_use = 0;  // bytes handed out and not yet given back
};

// Never destroyed: a tensor may give its block back while the process exits.
Cache& the_cache() {
  static Cache* cache = new Cache();
  return *cache;
}

// BNN_FAST_CPU_CACHE_MB, read on every large allocation (cheap next to one) so tests can change it.
size_t cache_limit() {
  const char* env = std::getenv("BNN_FAST_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(512) << 20;
  char* end = nullptr;
  const unsigned long long mb = std::strtoull(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0',
                    "BNN_FAST_CPU_CACHE_MB must be a whole number of MiB, got '", env, "'");
  return size_t(mb) << 20;
}

size_t block_size(size_t nbytes) {
  const size_t round = nbytes >= kHuge ? kHuge : kSmallRound;
  return (nbytes + round - 1) / round * round;
}

void report(void* p, int64_t delta, const Cache& c) {
  c10::reportMemoryUsageToProfiler(p, delta, c.in_use, c.in_use + c.cached,
                                   c10::Device(c10::DeviceType::CPU));
}

// Blocks come straight from mmap, never from malloc's heap: a freed block can then never become
// a hole in that heap for small allocations to split, and giving one back to the system (munmap)
// never raises glibc's dynamic mmap threshold.
void* fresh_block(size_t bytes) {
  if (bytes < kHuge) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }
  // Huge-page aligned: map a huge page more, unmap the slack on both sides.
  void* raw = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + kHuge - 1) & ~uintptr_t(kHuge - 1);
  if (aligned > begin) munmap(raw, aligned - begin);
  const uintptr_t tail = begin + bytes + kHuge - (aligned + bytes);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  void* p = reinterpret_cast<void*>(aligned);
#if defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

// A block for `nbytes` from the cache, else a fresh one, recorded as live (delete_any gives it
// back).
void* take_block(size_t nbytes) {
  const size_t bytes = block_size(nbytes);
  Cache& c = the_cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.free_blocks.find(bytes);
    if (it != c.free_blocks.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      c.cached -= bytes;
      c.in_use += bytes;
      c.live.emplace(p, bytes);
      report(p, int64_t(bytes), c);
      return p;
    }
  }
  void* p = fresh_block(bytes);
  if (p == nullptr) {  // give the cached blocks back to the system and try once more
    release_cache();
    p = fresh_block(bytes);
  }
  TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "bnn_fast: out of CPU memory allocating ",
                   bytes, " bytes");
  std::lock_guard<std::mutex> lock(c.mutex);
  c.in_use += bytes;
  c.live.emplace(p, bytes);
  report(p, int64_t(bytes), c);
  return p;
}

// cache_limit() for the deleters, which must not throw: a malformed setting keeps nothing (the
// next allocation reports it).
size_t cache_limit_or_zero() noexcept {
  try {
    return cache_limit();
  } catch (...) {
    return 0;
  }
}

// Takes back a block of `bytes`; the caller holds the lock. Returns whether the cache kept it
// (else the caller unmaps it, after releasing the lock).
bool keep_block(Cache& c, void* p, size_t bytes) {
  c.in_use -= bytes;
  const bool keep = c.cached + bytes <= cache_limit_or_zero();
  if (keep) {
    c.free_blocks[bytes].push_back(p);
    c.cached += bytes;
  }
  report(p, -int64_t(bytes), c);
  return keep;
}

// ---- the allocator -----------------------------------------------------------------------------

c10::Allocator* g_base = nullptr;  // the CPU allocator it replaced; serves the small requests

// The deleter of every block (empty_large's tensors, the allocator's DataPtrs) and, through the
// allocator's raw_allocate, of the base allocator's pointers: a pointer it does not know is the
// base's.
void delete_any(void* p) {
  if (p == nullptr) return;
  Cache& c = the_cache();
  size_t bytes = 0;
  bool keep = true;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.live.find(p);
    if (it != c.live.end()) {
      bytes = it->second;
      c.live.erase(it);
      keep = keep_block(c, p, bytes);
    }
  }
  if (bytes == 0) {
    g_base->raw_deleter()(p);
  } else if (!keep) {
    munmap(p, bytes);
  }
}

class CachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < size_t(kCacheMinBytes) || cache_limit() == 0) return g_base->allocate(n);
    void* p = take_block(n);
    return {p, p, &delete_any, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_any; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// A fork (a DataLoader worker) must not inherit the lock held by another thread.
void lock_for_fork() { the_cache().mutex.lock(); }
void unlock_after_fork() { the_cache().mutex.unlock(); }

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t nbytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
  if (nbytes < kCacheMinBytes || cache_limit() == 0) {
    at::Tensor t = at::empty(sizes, options);
    advise_huge_pages(t);
    return t;
  }
  return at::from_blob(take_block(size_t(nbytes)), sizes, delete_any, options.device(at::kCPU));
}

bool install_allocator() {
  static bool installed = [] {
    c10::Allocator* current = c10::GetCPUAllocator();
    static CachingAllocator allocator;
    g_base = current;
    c10::SetCPUAllocator(&allocator, /*priority=*/0);
    if (c10::GetCPUAllocator() != &allocator) return false;  // a higher-priority one stays
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
    return true;
  }();
  return installed;
}

CacheInfo cache_info() {
  Cache& c = the_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {int64_t(c.in_use), int64_t(c.cached)};
}

void release_cache() {
  Cache& c = the_cache();
  std::vector<std::pair<void*, size_t>> blocks;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (auto& [bytes, list] : c.free_blocks) {
      for (void* p : list) blocks.emplace_back(p, bytes);
      list.clear();
    }
    c.cached = 0;
  }
  for (const auto& [p, bytes] : blocks) munmap(p, bytes);
}

}  // namespace cpu
}  // namespace bnn_fast
