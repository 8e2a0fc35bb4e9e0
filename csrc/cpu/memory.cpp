// The cache of large CPU output buffers (cpu/memory.h).
#include "cpu/memory.h"

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace bnn_fast {
namespace cpu {
namespace {

constexpr size_t kBlockRound = size_t(1) << 21;  // blocks are whole 2 MiB huge pages

struct Cache {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void*>> free_blocks;  // by block size
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

void report(void* p, int64_t delta, const Cache& c) {
  c10::reportMemoryUsageToProfiler(p, delta, c.in_use, c.in_use + c.cached,
                                   c10::Device(c10::DeviceType::CPU));
}

void* fresh_block(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, kBlockRound, bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

// The deleter of a cached tensor's memory.
void give_back(void* p, size_t bytes) {
  Cache& c = the_cache();
  bool keep;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    c.in_use -= bytes;
    keep = c.cached + bytes <= cache_limit();
    if (keep) {
      c.free_blocks[bytes].push_back(p);
      c.cached += bytes;
    }
    report(p, -int64_t(bytes), c);
  }
  if (!keep) std::free(p);
}

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t nbytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
  if (nbytes < kCacheMinBytes || cache_limit() == 0) {
    at::Tensor t = at::empty(sizes, options);
    advise_huge_pages(t);
    return t;
  }
  const size_t bytes = (size_t(nbytes) + kBlockRound - 1) / kBlockRound * kBlockRound;
  Cache& c = the_cache();
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.free_blocks.find(bytes);
    if (it != c.free_blocks.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      c.cached -= bytes;
      c.in_use += bytes;
      report(p, int64_t(bytes), c);
    }
  }
  if (p == nullptr) {
    p = fresh_block(bytes);
    if (p == nullptr) {  // give the cached blocks back to the system and try once more
      release_cache();
      p = fresh_block(bytes);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "bnn_fast: out of CPU memory allocating ",
                     bytes, " bytes");
    std::lock_guard<std::mutex> lock(c.mutex);
    c.in_use += bytes;
    report(p, int64_t(bytes), c);
  }
  return at::from_blob(
      p, sizes, [bytes](void* q) { give_back(q, bytes); }, options.device(at::kCPU));
}

CacheInfo cache_info() {
  Cache& c = the_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {int64_t(c.in_use), int64_t(c.cached)};
}

void release_cache() {
  Cache& c = the_cache();
  std::vector<void*> blocks;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (auto& [bytes, list] : c.free_blocks) {
      blocks.insert(blocks.end(), list.begin(), list.end());
      list.clear();
    }
    c.cached = 0;
  }
  for (void* p : blocks) std::free(p);
}

}  // namespace cpu
}  // namespace bnn_fast
