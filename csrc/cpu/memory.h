// Large fresh CPU buffers and page faults.
//
// Every output of a kernel is a fresh allocation, and glibc serves large ones with new mmap'd
// pages: the first touch of each 4 KiB page faults. Measured on the development VM, allocating
// and filling a 42 MB tensor took 43 ms against 5 ms for refilling an existing one. Advising
// transparent huge pages before the first touch (as torch itself does under
// THP_MEM_ALLOC_ENABLE) makes that one fault per 2 MiB. Harmless where THP is off.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bnn_fast {
namespace cpu {

constexpr int64_t kHugePage = int64_t(1) << 21;

// Call on a tensor that has not been written yet.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = int64_t(t.nbytes());
  if (bytes < 2 * kHugePage) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  const uintptr_t last = (begin + uintptr_t(bytes)) & ~uintptr_t(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// A contiguous tensor for a kernel's large output (memory.cpp). From `kCacheMinBytes` up, its
// memory comes from a cache of blocks that earlier tensors gave back when they were freed: their
// pages are already mapped, so writing them costs no page faults. A fresh 64 MiB buffer cost 15 ms
// more to fill than a reused one on a 2-vCPU VM, and a 4096x4096 training step spent about 40%
// of its time in the kernel, faulting in its three weight-sized buffers. The cache keeps at most
// BNN_FAST_CPU_CACHE_MB (default 512) of free blocks and reports every block it hands out and
// takes back to the profiler's memory accounting, so peak-memory measurements still see the
// tensors; bnn_fast.utils.release_cpu_cache() frees the cached blocks. BNN_FAST_CPU_CACHE_MB=0
// turns it off. Smaller outputs are at::empty with the huge-page advice.
//
// Blocks are mmap'd (whole 64 KiB below 2 MiB, whole huge pages from there), never taken from
// malloc's heap. That is what makes the cache safe for PyTorch's own tensors too (see
// install_allocator): with glibc, a large buffer freed inside the heap becomes a hole that the
// next small allocations split, so the next buffer of the same size no longer fits there and the
// heap grows. The seed article's prediction loop, which keeps one small output per pass among
// 1.2 MB hidden activations, grew by about 0.6 MB per pass that way.
constexpr int64_t kCacheMinBytes = int64_t(1) << 17;
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// Makes the cache PyTorch's CPU allocator for requests of kCacheMinBytes and up (glibc's default
// mmap threshold: smaller ones go to the allocator it replaces), for the process's lifetime.
// Returns false when an allocator of higher priority is installed (it is left in place). Called
// once when bnn_fast loads, unless BNN_FAST_CPU_ALLOCATOR=0.
bool install_allocator();

// empty_large with t's sizes and options.
inline at::Tensor empty_like_huge(const at::Tensor& t) { return empty_large(t.sizes(), t.options()); }

// The cache's state: bytes handed out and not yet given back, bytes held free.
struct CacheInfo {
  int64_t in_use;
  int64_t cached;
};
CacheInfo cache_info();
// Frees every cached block (blocks in use are unaffected).
void release_cache();

}  // namespace cpu
}  // namespace bnn_fast
