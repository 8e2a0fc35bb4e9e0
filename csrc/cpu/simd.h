// CPU SIMD support: run-time AVX2 detection and the Sleef vector functions that libtorch_cpu
// already exports (torch ships them; we declare only what we call, to avoid sleef.h's
// per-ISA macro setup). Kernels mark their AVX2 bodies BNN_AVX2 (AVX-512 ones BNN_AVX512) and
// keep a scalar path that always works; BNN_FAST_CPU_SIMD=0 forces the scalar path (tests run
// every level the CPU has).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define BNN_HAVE_X86_SIMD 1
#include <immintrin.h>
#define BNN_AVX2 __attribute__((target("avx2,fma")))
#define BNN_AVX512 __attribute__((target("avx512f,avx2,fma")))

// Around AVX-512 code: GCC 12's avx512fintrin.h builds the unmasked forms of many intrinsics from
// _mm512_undefined_*(), which -W(maybe-)uninitialized then reports at every use (GCC bug 105593,
// fixed in GCC 13). Nothing of ours reads an undefined value.
#define BNN_AVX512_WARNINGS_BEGIN                                    \
  _Pragma("GCC diagnostic push")                                     \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")              \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define BNN_AVX512_WARNINGS_END _Pragma("GCC diagnostic pop")

extern "C" {
__m256 Sleef_expf8_u10avx2(__m256);
__m256d Sleef_expd4_u10avx2(__m256d);
}
#else
#define BNN_HAVE_X86_SIMD 0
#endif

namespace bnn_fast {
namespace cpu {

// The widest vector path a kernel may take. Unscoped on purpose: a level converts to bool
// (kScalar -> false), so code that only has an AVX2 path takes it as "vector or not".
enum SimdLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Reads the environment (about 40 ns): kernels call it once per call or parallel task and pass
// the answer down, never per element, row or tile. BNN_FAST_CPU_SIMD=0 forces the scalar paths,
// BNN_FAST_CPU_SIMD=avx2 caps them at AVX2; otherwise the best the CPU has (the AVX-512 paths: the
// noise, the weight sampling, the KL and the blocked forward's dot products; the rest stops at AVX2).
inline SimdLevel simd_level() {
#if BNN_HAVE_X86_SIMD
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  // Read on every call (cheap next to any kernel) so tests can switch paths within one process.
  const char* env = std::getenv("BNN_FAST_CPU_SIMD");
  if (!avx2 || (env != nullptr && std::strcmp(env, "0") == 0)) return kScalar;
  if (!avx512 || (env != nullptr && std::strcmp(env, "avx2") == 0)) return kAvx2;
  return kAvx512;
#else
  return kScalar;
#endif
}

inline bool use_avx2() { return simd_level() != kScalar; }

#if BNN_HAVE_X86_SIMD
// The sum of v's 8 lanes, ((0+4) + (2+6)) + ((1+5) + (3+7)).
BNN_AVX2 inline float hsum8(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

// The first min(n, 16) lanes (n >= 1): the last, possibly partial, step of a 16-lane loop.
inline __mmask16 first_lanes16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}
#endif

// Software prefetch for the read streams of loops that do much arithmetic per byte (the KL, the
// weight sampling): there the hardware prefetcher fell behind on the development VM, and the KL
// forward's loop over 10.5M float32 elements ran at 2.25 ns per element without this, 0.72 with
// it (a scratch program; 4 KiB ahead, one prefetch per cache line). Prefetching past the end of
// an array is harmless: the instruction never faults.
constexpr int64_t kPrefetchAhead = 4096;  // bytes

// Prefetches the cache lines of [p + kPrefetchAhead, p + kPrefetchAhead + bytes): call once per
// `bytes` of the stream consumed.
template <int64_t bytes, typename T>
inline __attribute__((always_inline)) void prefetch_ahead(const T* p) {
  const char* c = reinterpret_cast<const char*>(p) + kPrefetchAhead;
  for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(c + line, 0, 3);
}

}  // namespace cpu
}  // namespace bnn_fast
