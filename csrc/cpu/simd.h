// CPU SIMD support: run-time AVX2 detection and the Sleef vector functions that libtorch_cpu
// already exports (torch ships them; we declare only what we call, to avoid sleef.h's
// per-ISA macro setup). Kernels mark their AVX2 bodies BNN_AVX2 and keep a scalar path that
// always works; BNN_FAST_CPU_SIMD=0 forces the scalar path (tests run both).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define BNN_HAVE_X86_SIMD 1
#include <immintrin.h>
#define BNN_AVX2 __attribute__((target("avx2,fma")))

extern "C" {
__m256 Sleef_expf8_u10avx2(__m256);
__m256d Sleef_expd4_u10avx2(__m256d);
}
#else
#define BNN_HAVE_X86_SIMD 0
#endif

namespace bnn_fast {
namespace cpu {

// Reads the environment (about 40 ns): kernels call it once per call or parallel task and pass
// the answer down, never per element, row or tile.
inline bool use_avx2() {
#if BNN_HAVE_X86_SIMD
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  // Read on every call (cheap next to any kernel) so tests can switch paths within one process.
  const char* env = std::getenv("BNN_FAST_CPU_SIMD");
  return supported && !(env != nullptr && std::strcmp(env, "0") == 0);
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace bnn_fast
