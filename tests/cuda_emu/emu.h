// Host emulation of the CUDA execution model, enough for csrc/cuda/*_kernel.cu compiled by g++
// (tests/cuda_emu/build.py rewrites `k<<<grid, block, shmem, stream>>>(args)` into
// `::emu::launch(::emu::Config{grid, block, shmem, stream}, k, args)`).
//
// Blocks run one after another. The threads of a block run as fibers (ucontext) on one OS
// thread under a cooperative scheduler: a thread runs until it reaches __syncthreads or
// __shfl_xor_sync, or returns. Then
//   - a shuffle completes when all 32 lanes of its warp wait at the same shuffle (same source
//     line, full mask, same lane mask); a lane that has returned or waits elsewhere is an error;
//   - a barrier completes when every live (not returned) thread of the block waits at it; threads
//     waiting at different barriers are an error.
// An error prints what was waiting where and aborts. `__shared__` is a static: one block runs at
// a time, so it is the block's shared memory. Grid-stride kernels can run with the grid capped
// (grid_cap), so that their stride loops take several turns.
//
// AddressSanitizer intercepts swapcontext and clears the shadow of the stack it switches to: the
// redzones of a thread's locals that live across a barrier or shuffle are gone once it resumes,
// so out-of-bounds indexing of such a local array is left to UBSan's bounds check (heap buffers,
// which every kernel argument is, keep their redzones).
#pragma once

#include <math.h>  // exp(float), sqrt(float), ... in the global namespace, as CUDA's headers give
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#undef __shared__
#define __shared__ static

namespace emu {

enum class State { kReady, kBarrier, kShuffle, kDone };

struct Thread {
  uint3 idx;
  State state;
  int site;  // the source line of the barrier or shuffle it waits at
  unsigned mask;
  int lane_mask;
  unsigned char in[8], out[8];
  ucontext_t ctx;
};

constexpr size_t kStackBytes = size_t(64) << 10;
constexpr unsigned kMaxThreads = 1024;

struct Runtime {
  dim3 grid, block, block_idx;
  Thread* current = nullptr;
  ucontext_t scheduler;
  unsigned grid_cap = 0;  // 0: the launch's own grid
  cudaError_t last_error = cudaSuccess;
  uint64_t launches = 0, blocks = 0;
  std::vector<Thread> threads;
  char* stacks = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  const char* kernel = "";
};

inline Runtime rt;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "EMULATION ERROR in %s, block (%u, %u, %u): %s\n", rt.kernel, rt.block_idx.x,
               rt.block_idx.y, rt.block_idx.z, what);
  for (size_t t = 0; t < rt.threads.size(); ++t) {
    const Thread& th = rt.threads[t];
    const char* s = th.state == State::kDone      ? "returned"
                    : th.state == State::kBarrier ? "at __syncthreads"
                    : th.state == State::kShuffle ? "at __shfl_xor_sync"
                                                  : "ready";
    if (t < 64 || th.state != State::kDone) {
      std::fprintf(stderr, "  thread %zu (warp %zu lane %zu): %s line %d\n", t, t / 32, t % 32, s,
                   th.site);
    }
  }
  std::abort();
}

inline void yield() { swapcontext(&rt.current->ctx, &rt.scheduler); }

inline void thread_entry() {
  rt.body(rt.body_arg);
  rt.current->state = State::kDone;
}  // returns to uc_link: the scheduler

// After a pass every thread has returned or waits: completes the shuffles of whole warps, else
// the block's barrier. Returns false when nothing could be released (every thread returned).
inline bool release() {
  const size_t n = rt.threads.size();
  bool released = false;
  for (size_t first = 0; first < n; first += 32) {
    const size_t last = first + 32 < n ? first + 32 : n;
    bool any = false;
    for (size_t t = first; t < last; ++t) any |= rt.threads[t].state == State::kShuffle;
    if (!any) continue;
    if (last - first != 32) fail("__shfl_xor_sync in a partial warp");
    const Thread& lead = rt.threads[first];
    for (size_t t = first; t < last; ++t) {
      const Thread& th = rt.threads[t];
      if (th.state != State::kShuffle || th.site != lead.site) {
        fail("a full-mask __shfl_xor_sync not reached by every lane of the warp");
      }
      if (th.mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask (not emulated)");
      if (th.lane_mask != lead.lane_mask || th.lane_mask < 0 || th.lane_mask > 31) {
        fail("__shfl_xor_sync with lane masks that differ within the warp");
      }
    }
    for (size_t t = first; t < last; ++t) {
      const size_t from = first + ((t - first) ^ size_t(lead.lane_mask));
      std::memcpy(rt.threads[t].out, rt.threads[from].in, sizeof rt.threads[t].out);
    }
    for (size_t t = first; t < last; ++t) rt.threads[t].state = State::kReady;
    released = true;
  }
  if (released) return true;
  int site = -1;
  for (const Thread& th : rt.threads) {
    if (th.state == State::kDone) continue;
    if (th.state != State::kBarrier) fail("a thread neither returned nor waits at a barrier");
    if (site >= 0 && th.site != site) fail("threads of a block wait at different __syncthreads");
    site = th.site;
  }
  if (site < 0) return false;
  for (Thread& th : rt.threads) {
    if (th.state == State::kBarrier) th.state = State::kReady;
  }
  return true;
}

inline void run_block() {
  const unsigned n = rt.block.x * rt.block.y * rt.block.z;
  if (rt.stacks == nullptr) {
    void* p = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map the fiber stacks");
    rt.stacks = static_cast<char*>(p);
  }
  rt.threads.assign(n, Thread{});
  for (unsigned t = 0; t < n; ++t) {
    Thread& th = rt.threads[t];
    th.idx = uint3{t % rt.block.x, (t / rt.block.x) % rt.block.y, t / (rt.block.x * rt.block.y)};
    th.state = State::kReady;
    th.site = 0;
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = rt.stacks + size_t(t) * kStackBytes;
    th.ctx.uc_stack.ss_size = kStackBytes;
    th.ctx.uc_link = &rt.scheduler;
    makecontext(&th.ctx, thread_entry, 0);
  }
  do {
    for (Thread& th : rt.threads) {
      if (th.state != State::kReady) continue;
      rt.current = &th;
      swapcontext(&rt.scheduler, &th.ctx);
    }
  } while (release());
  rt.current = nullptr;
  ++rt.blocks;
}

inline void run_grid(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* arg) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      threads == 0 || threads > kMaxThreads || block.z > 64) {
    rt.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (rt.grid_cap != 0 && grid.x > rt.grid_cap) grid.x = rt.grid_cap;
  rt.kernel = kernel;
  rt.grid = grid;
  rt.block = block;
  rt.body = body;
  rt.body_arg = arg;
  ++rt.launches;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        rt.block_idx = dim3(x, y, z);
        run_block();
      }
    }
  }
}

struct Config {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  cudaStream_t stream = nullptr;
};

template <class... P, class... A>
void launch(const char* name, const Config& cfg, void (*kernel)(P...), A&&... args) {
  if (cfg.shared_bytes != 0) {  // no kernel here uses dynamic shared memory
    rt.last_error = cudaErrorInvalidValue;
    return;
  }
  // Each thread calls the kernel with its own copy of the arguments, as on the device.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  auto call = [&] { std::apply(kernel, params); };
  run_grid(name, cfg.grid, cfg.block,
           [](void* f) { (*static_cast<decltype(call)*>(f))(); }, &call);
}

inline void syncthreads(int line) {
  rt.current->state = State::kBarrier;
  rt.current->site = line;
  yield();
}

template <class T>
T shfl_xor(int line, unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  if (width != 32) fail("__shfl_xor_sync with a width other than 32 (not emulated)");
  Thread* self = rt.current;
  std::memcpy(self->in, &value, sizeof value);
  self->mask = mask;
  self->lane_mask = lane_mask;
  self->site = line;
  self->state = State::kShuffle;
  yield();
  T out;
  std::memcpy(&out, self->out, sizeof out);
  return out;
}

}  // namespace emu

#define threadIdx (::emu::rt.current->idx)
#define blockIdx (::emu::rt.block_idx)
#define blockDim (::emu::rt.block)
#define gridDim (::emu::rt.grid)
#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __shfl_xor_sync(...) ::emu::shfl_xor(__LINE__, __VA_ARGS__)

template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
