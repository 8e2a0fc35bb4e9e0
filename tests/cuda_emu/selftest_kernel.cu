// Kernels that break a rule on purpose: the emulation must stop each one. tests/test_cuda_
// emulation.py runs them one at a time (`emu --selftest NAME`) and expects the abort and its
// report, so that a clean run of the real kernels means something.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace selftest {
namespace {

constexpr int kThreads = 64;

// Lane 5 of each warp returns before the full-mask shuffle the other lanes reach.
__global__ void shuffle_after_early_return(float* out) {
  if (threadIdx.x % 32 == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

// Half the block waits at one barrier, half at another.
__global__ void barriers_in_branches(float* out) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 0.0f;
}

// A 16-byte load from an address 4 bytes past a 16-byte boundary.
__global__ void misaligned_float4(const float* in, float* out) {
  const float4 q = *reinterpret_cast<const float4*>(in + 1);
  out[threadIdx.x] = q.x;
}

// One thread more than the buffer holds.
__global__ void write_past_end(float* out) { out[threadIdx.x] = 1.0f; }

}  // namespace

// Returns 0 after running `name` (which should not return), 2 for an unknown name.
int run(const char* name) {
  float* buf = static_cast<float*>(std::aligned_alloc(16, sizeof(float) * (kThreads + 4)));
  int rc = 0;
  if (std::strcmp(name, "shuffle_after_early_return") == 0) {
    shuffle_after_early_return<<<1, kThreads>>>(buf);
  } else if (std::strcmp(name, "barriers_in_branches") == 0) {
    barriers_in_branches<<<1, kThreads>>>(buf);
  } else if (std::strcmp(name, "misaligned_float4") == 0) {
    misaligned_float4<<<1, kThreads>>>(buf, buf);
  } else if (std::strcmp(name, "write_past_end") == 0) {
    float* small = static_cast<float*>(std::malloc(sizeof(float) * (kThreads - 1)));
    write_past_end<<<1, kThreads>>>(small);
    std::free(small);
  } else {
    rc = 2;
  }
  std::free(buf);
  return rc;
}

}  // namespace selftest
