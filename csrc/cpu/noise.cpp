// Counter-based normal noise on the CPU, and the fill_normal_ operator.
//
// The AVX2 path runs Philox on 8 block counters per vector (32x32->64 products with
// _mm256_mul_epu32 on even and odd lanes) and Box-Muller with the inline log and sincos of
// cpu/fastmath.h (polynomials for exactly the contract's domains, within 1.5 ulp of libm, checked
// exhaustively by benchmarks/fastmath_check.cpp): 32 normals per group, two groups per step. Work is done in aligned
// groups of 32 indices (8 Philox blocks), so whichever way a range is split, each index is
// computed by the same instructions: bit-identical results. Where the CPU has AVX-512F the same
// operations run on 16 lanes (64 normals per group), again with the same bits. The scalar path (no AVX2, or
// BNN_FAST_CPU_SIMD=0) runs box_muller.h's scalar log and sincos, the same operations as the
// AVX2 forms, so it gives the same bits too (tests/test_noise.py), and so do the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu/fastmath.h"
#include "cpu/noise.h"
#include "cpu/simd.h"
#include "philox.h"

namespace bnn_fast {
namespace cpu {
namespace {

constexpr int64_t kGroup = 32;  // normals per group: 8 Philox blocks of 4, one per lane

// The scalar loop. box_muller.h writes every fused multiply-add out (fma_rn): built for FMA,
// each is one instruction; without it, a call to libm's fmaf, which made this loop 1.9x slower
// (18 against 9.3 ms per 1M normals on one thread here). So it is built twice, and the FMA copy
// runs wherever the CPU has FMA: the same operations, the same bits.
inline __attribute__((always_inline)) void fill_normal_scalar_body(float* out, int64_t n,
                                                                   uint64_t seed, uint64_t stream,
                                                                   uint64_t start) {
  uint64_t i = start;
  const uint64_t end = start + static_cast<uint64_t>(n);
  while (i < end) {
    const uint64_t block = i >> 2;
    float z[4];
    box_muller4(philox_block(seed, stream, block), z);
    const uint64_t stop = std::min(end, (block + 1) * 4);
    for (; i < stop; ++i) out[i - start] = z[i & 3];
  }
}

void fill_normal_scalar(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start) {
  fill_normal_scalar_body(out, n, seed, stream, start);
}

#if BNN_HAVE_X86_SIMD
__attribute__((target("fma"))) void fill_normal_scalar_fma(float* out, int64_t n, uint64_t seed,
                                                           uint64_t stream, uint64_t start) {
  fill_normal_scalar_body(out, n, seed, stream, start);
}

// (hi, lo) of a * m for 8 lanes.
BNN_AVX2 inline void mulhilo8(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// uint32 -> float rounded to nearest, as static_cast<float>(uint32_t): both halves convert
// exactly, hi * 2^16 is exact, so the one fused multiply-add rounds once.
BNN_AVX2 inline __m256 u32_to_float(__m256i r) {
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(r, 16));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(r, _mm256_set1_epi32(0xFFFF)));
  return _mm256_fmadd_ps(hi, _mm256_set1_ps(65536.0f), lo);
}

// fl32(r) * 2^-32 is exact, so the fused form rounds once, as philox.h's fma_rn does.
BNN_AVX2 inline __m256 uniform_open01_8(__m256i r) {
  return _mm256_fmadd_ps(u32_to_float(r), _mm256_set1_ps(kTwoPow32Inv),
                         _mm256_set1_ps(kTwoPow33Inv));
}

// The ten rounds' keys (k0, k1 of each), broadcast once per fill instead of once per group.
struct RoundKeys {
  __m256i k[20];
};

BNN_AVX2 inline void make_round_keys(uint64_t seed, RoundKeys* keys) {
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    keys->k[2 * round] = _mm256_set1_epi32(static_cast<int>(k0));
    keys->k[2 * round + 1] = _mm256_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Box-Muller on the four output words of 8 Philox blocks (lane k of r[j] is word j of block k),
// written as the 32 normals of those blocks in index order.
BNN_AVX2 inline void box_muller_store_avx2(const __m256i r[4], float* out) {
  __m256 z[4];
  for (int pair = 0; pair < 2; ++pair) {
    const __m256 u1 = uniform_open01_8(r[2 * pair]);
    const __m256 u2 = uniform_open01_8(r[2 * pair + 1]);
    const __m256 radius =
        _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), fastmath::log8_open01(u1)));
    __m256 sin_t, cos_t;
    fastmath::sincos8(_mm256_mul_ps(_mm256_set1_ps(kTwoPi), u2), &sin_t, &cos_t);
    z[2 * pair] = _mm256_mul_ps(radius, cos_t);
    z[2 * pair + 1] = _mm256_mul_ps(radius, sin_t);
  }
  // z[j] lane k is normal 4k + j: transpose the 4 x 8 into 32 consecutive floats.
  const __m256 a = _mm256_unpacklo_ps(z[0], z[1]);
  const __m256 b = _mm256_unpackhi_ps(z[0], z[1]);
  const __m256 c = _mm256_unpacklo_ps(z[2], z[3]);
  const __m256 d = _mm256_unpackhi_ps(z[2], z[3]);
  const __m256 e = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));
  const __m256 f = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));
  const __m256 g = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));
  const __m256 h = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));
  _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(e, f, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(g, h, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(e, f, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(g, h, 0x31));
}

// Normals 4*first_block .. 4*first_block + 32*G - 1 into out[0..32*G): G groups of 8 Philox
// blocks whose rounds are interleaved (independent dependency chains for the out-of-order core:
// two groups ran about 10% faster than one here, on Zen 3). first_block % 8 == 0, so the low
// counter word never carries within a group. Each lane runs the same instructions whatever G is,
// so G changes the speed, never the bits.
template <int G>
BNN_AVX2 void normal_groups_avx2(const RoundKeys& keys, uint64_t stream, uint64_t first_block,
                                 float* out) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    const uint64_t block = first_block + 8 * uint64_t(g);
    c0[g] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(uint32_t(block))), lane);
    c1[g] = _mm256_set1_epi32(static_cast<int>(uint32_t(block >> 32)));
    c2[g] = _mm256_set1_epi32(static_cast<int>(uint32_t(stream)));
    c3[g] = _mm256_set1_epi32(static_cast<int>(uint32_t(stream >> 32)));
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    for (int g = 0; g < G; ++g) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0[g], m0, &hi0, &lo0);
      mulhilo8(c2[g], m1, &hi1, &lo1);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), keys.k[2 * round]);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), keys.k[2 * round + 1]);
      c1[g] = lo1;
      c3[g] = lo0;
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m256i r[4] = {c0[g], c1[g], c2[g], c3[g]};
    box_muller_store_avx2(r, out + kGroup * g);
  }
}

// The range walk of both vector paths: normals start .. start + n - 1 into out, in aligned groups
// of kSize (kWide whole groups per call where the range holds them, then one; a partial group at
// either end through a buffer). groups(std::integral_constant<int, G>, first_block, dst) writes
// the G * kSize normals from Philox block first_block on. Each index goes through the same group
// code whatever the split, so any split gives the same bits. Inlined into each path's function,
// so it is compiled for that path's target.
template <int64_t kSize, int kWide, typename Groups>
inline __attribute__((always_inline)) void fill_in_groups(float* out, int64_t n, uint64_t start,
                                                          const Groups& groups) {
  uint64_t i = start;
  const uint64_t end = start + static_cast<uint64_t>(n);
  while (i < end) {
    const uint64_t g_begin = i / kSize * kSize;
    const uint64_t g_end = g_begin + kSize;
    if (i == g_begin && g_begin + kWide * kSize <= end) {
      groups(std::integral_constant<int, kWide>(), g_begin / 4, out + (i - start));
      i = g_begin + kWide * kSize;
    } else if (i == g_begin && g_end <= end) {
      groups(std::integral_constant<int, 1>(), g_begin / 4, out + (i - start));
      i = g_end;
    } else {  // a partial group at either end of the range
      float z[kSize];
      groups(std::integral_constant<int, 1>(), g_begin / 4, z);
      const uint64_t stop = std::min(end, g_end);
      std::memcpy(out + (i - start), z + (i - g_begin), (stop - i) * sizeof(float));
      i = stop;
    }
  }
}

BNN_AVX2 void fill_normal_avx2(float* out, int64_t n, uint64_t seed, uint64_t stream,
                               uint64_t start) {
  RoundKeys keys;
  make_round_keys(seed, &keys);
  fill_in_groups<kGroup, 2>(out, n, start, [&](auto g, uint64_t first_block, float* dst) BNN_AVX2 {
    normal_groups_avx2<decltype(g)::value>(keys, stream, first_block, dst);
  });
}

// ---- AVX-512F: 16 Philox blocks per vector -------------------------------------------------
// The AVX2 path's arithmetic on 16 lanes: 64 normals per group, four groups interleaved (the
// 32 zmm registers hold their state; 4-5% faster than two in a scratch A/B). The 32x32->64
// products are still even/odd vpmuludq pairs; the uint32 -> float conversion is one
// vcvtudq2ps, which rounds to nearest as u32_to_float's exact halves and single addition do.
// Same bits as the AVX2 and scalar paths (tests/test_noise.py).
constexpr int64_t kGroup16 = 64;

BNN_AVX512_WARNINGS_BEGIN

// The high and low words come out of the even and odd products through one two-source permute
// each (vpermt2d), where the AVX2 form needs a shift and a blend: 12 instead of 16 operations
// per Philox round with the three-way xors below (vpternlogd): 1M normals 7% faster (scratch A/B).
BNN_AVX512 inline void mulhilo16(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  // lane 2i: the even product's word 2i (lo) or 2i + 1 (hi); lane 2i + 1: the odd product's
  // word 2i (lo) or 2i + 1 (hi), index 16 + 2i or 16 + 2i + 1 of the pair (even, odd).
  const __m512i lo_words = _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
  const __m512i hi_words = _mm512_set_epi32(31, 15, 29, 13, 27, 11, 25, 9, 23, 7, 21, 5, 19, 3, 17, 1);
  *lo = _mm512_permutex2var_epi32(even, lo_words, odd);
  *hi = _mm512_permutex2var_epi32(even, hi_words, odd);
}

// fl32(r) * 2^-32 is exact, so the fused form rounds once, as the AVX2 form does.
BNN_AVX512 inline __m512 uniform_open01_16(__m512i r) {
  return _mm512_fmadd_ps(_mm512_cvtepu32_ps(r), _mm512_set1_ps(kTwoPow32Inv),
                         _mm512_set1_ps(kTwoPow33Inv));
}

struct RoundKeys16 {
  __m512i k[20];
};

BNN_AVX512 inline void make_round_keys16(uint64_t seed, RoundKeys16* keys) {
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    keys->k[2 * round] = _mm512_set1_epi32(static_cast<int>(k0));
    keys->k[2 * round + 1] = _mm512_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Box-Muller on the four output words of 16 Philox blocks, stored as their 64 normals in order.
BNN_AVX512 inline void box_muller_store_avx512(const __m512i r[4], float* out) {
  __m512 z[4];
  for (int pair = 0; pair < 2; ++pair) {
    const __m512 u1 = uniform_open01_16(r[2 * pair]);
    const __m512 u2 = uniform_open01_16(r[2 * pair + 1]);
    const __m512 radius =
        _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), fastmath::log16_open01(u1)));
    __m512 sin_t, cos_t;
    fastmath::sincos16(_mm512_mul_ps(_mm512_set1_ps(kTwoPi), u2), &sin_t, &cos_t);
    z[2 * pair] = _mm512_mul_ps(radius, cos_t);
    z[2 * pair + 1] = _mm512_mul_ps(radius, sin_t);
  }
  // z[j] lane k is normal 4k + j: out[4k + j] = z[j][k]. Interleave z0 with z1 and z2 with z3
  // (lanes 0-7, then 8-15), then the resulting (z0, z1) and (z2, z3) pairs as 64-bit elements:
  // eight two-source permutes (vpermt2ps/pd), where unpacks and 128-bit shuffles took sixteen
  // (0-4% faster in scratch A/Bs, within this machine's noise).
  const __m512i pairs_lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i pairs_hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512i quads_lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i quads_hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
  const __m512d z01_lo = _mm512_castps_pd(_mm512_permutex2var_ps(z[0], pairs_lo, z[1]));
  const __m512d z01_hi = _mm512_castps_pd(_mm512_permutex2var_ps(z[0], pairs_hi, z[1]));
  const __m512d z23_lo = _mm512_castps_pd(_mm512_permutex2var_ps(z[2], pairs_lo, z[3]));
  const __m512d z23_hi = _mm512_castps_pd(_mm512_permutex2var_ps(z[2], pairs_hi, z[3]));
  _mm512_storeu_pd(out + 0, _mm512_permutex2var_pd(z01_lo, quads_lo, z23_lo));   // normals 0-15
  _mm512_storeu_pd(out + 16, _mm512_permutex2var_pd(z01_lo, quads_hi, z23_lo));  // 16-31
  _mm512_storeu_pd(out + 32, _mm512_permutex2var_pd(z01_hi, quads_lo, z23_hi));  // 32-47
  _mm512_storeu_pd(out + 48, _mm512_permutex2var_pd(z01_hi, quads_hi, z23_hi));  // 48-63
}

// Normals 4*first_block .. 4*first_block + 64*G - 1; first_block % 16 == 0.
template <int G>
BNN_AVX512 void normal_groups_avx512(const RoundKeys16& keys, uint64_t stream,
                                     uint64_t first_block, float* out) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    const uint64_t block = first_block + 16 * uint64_t(g);
    c0[g] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(uint32_t(block))), lane);
    c1[g] = _mm512_set1_epi32(static_cast<int>(uint32_t(block >> 32)));
    c2[g] = _mm512_set1_epi32(static_cast<int>(uint32_t(stream)));
    c3[g] = _mm512_set1_epi32(static_cast<int>(uint32_t(stream >> 32)));
  }
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    for (int g = 0; g < G; ++g) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0[g], m0, &hi0, &lo0);
      mulhilo16(c2[g], m1, &hi1, &lo1);
      c0[g] = _mm512_ternarylogic_epi32(hi1, c1[g], keys.k[2 * round], 0x96);  // a ^ b ^ c
      c2[g] = _mm512_ternarylogic_epi32(hi0, c3[g], keys.k[2 * round + 1], 0x96);
      c1[g] = lo1;
      c3[g] = lo0;
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512i r[4] = {c0[g], c1[g], c2[g], c3[g]};
    box_muller_store_avx512(r, out + kGroup16 * g);
  }
}

BNN_AVX512 void fill_normal_avx512(float* out, int64_t n, uint64_t seed, uint64_t stream,
                                   uint64_t start) {
  RoundKeys16 keys;
  make_round_keys16(seed, &keys);
  fill_in_groups<kGroup16, 4>(out, n, start, [&](auto g, uint64_t first_block, float* dst) BNN_AVX512 {
    normal_groups_avx512<decltype(g)::value>(keys, stream, first_block, dst);
  });
}
BNN_AVX512_WARNINGS_END
#endif

void fill_normal_cpu(const at::Tensor& out, int64_t seed, int64_t stream, int64_t offset) {
  TORCH_CHECK_VALUE(out.is_contiguous(), "fill_normal_: out must be contiguous");
  TORCH_CHECK_VALUE(offset >= 0, "fill_normal_: offset must be >= 0, got ", offset);
  const int64_t n = out.numel();
  if (n == 0) return;
  const auto fill = [&](float* dst) {
    fill_normal_parallel(dst, n, uint64_t(seed), uint64_t(stream), uint64_t(offset));
  };
  if (out.scalar_type() == at::kFloat) {
    fill(out.mutable_data_ptr<float>());
  } else {
    // The contract computes in float32 whatever the dtype, then casts.
    at::Tensor tmp = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    fill(tmp.mutable_data_ptr<float>());
    out.copy_(tmp);
  }
}

at::Tensor philox4x32_10_cpu(const at::Tensor& counter_in, const at::Tensor& key_in) {
  TORCH_CHECK_VALUE(counter_in.dim() == 2 && counter_in.size(1) == 4,
                    "philox4x32_10: counter must have shape [n, 4], got ", counter_in.sizes());
  TORCH_CHECK_VALUE(key_in.dim() == 2 && key_in.size(1) == 2 && key_in.size(0) == counter_in.size(0),
                    "philox4x32_10: key must have shape [", counter_in.size(0), ", 2], got ",
                    key_in.sizes());
  const at::Tensor counter = counter_in.to(at::kLong).contiguous();
  const at::Tensor key = key_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(counter);
  const int64_t* c = counter.const_data_ptr<int64_t>();
  const int64_t* k = key.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t row = 0; row < counter.size(0); ++row) {
    Philox4 in = {{uint32_t(c[4 * row]), uint32_t(c[4 * row + 1]), uint32_t(c[4 * row + 2]),
                   uint32_t(c[4 * row + 3])}};
    const Philox4 r = philox4x32_10(in, uint32_t(k[2 * row]), uint32_t(k[2 * row + 1]));
    for (int lane = 0; lane < 4; ++lane) o[4 * row + lane] = int64_t(r.v[lane]);
  }
  return out;
}

}  // namespace

void fill_normal(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start,
                 SimdLevel simd) {
#if BNN_HAVE_X86_SIMD
  if (simd == kAvx512) return fill_normal_avx512(out, n, seed, stream, start);
  if (simd == kAvx2) return fill_normal_avx2(out, n, seed, stream, start);
  static const bool has_fma = __builtin_cpu_supports("fma");
  if (has_fma) return fill_normal_scalar_fma(out, n, seed, stream, start);
#endif
  (void)simd;
  fill_normal_scalar(out, n, seed, stream, start);
}

void fill_normal_parallel(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start) {
  const SimdLevel simd = simd_level();
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    fill_normal(out + b, e - b, seed, stream, start + uint64_t(b), simd);
  });
}

TORCH_LIBRARY_IMPL(bnn_fast, CPU, m) {
  m.impl("fill_normal_", &fill_normal_cpu);
  m.impl("philox4x32_10", &philox4x32_10_cpu);
}

}  // namespace cpu
}  // namespace bnn_fast
