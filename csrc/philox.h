// The RNG contract (DESIGN.md section 3): Philox4x32-10 (Salmon et al., SC'11) and Box-Muller.
// Noise is a pure function of (seed, stream, index), so a backward pass regenerates it instead of
// storing it, and the CPU, the CUDA kernels and every launch shape agree.
// This header is the scalar, __host__ __device__ definition; the CPU SIMD path in
// cpu/noise.cpp computes the same integers eight counters at a time.
#pragma once

#include <cmath>
#include <cstdint>

#include "box_muller.h"
#include "gaussian.h"  // BNN_HD

namespace bnn_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPow32Inv = 2.3283064365386963e-10f;  // 2^-32
constexpr float kTwoPow33Inv = 1.1641532182693481e-10f;  // 2^-33
constexpr float kTwoPi = 6.2831853071795864769f;

struct Philox4 {
  uint32_t v[4];
};

BNN_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

BNN_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c.v[0], &hi0, &lo0);
    mulhilo32(kPhiloxM1, c.v[2], &hi1, &lo1);
    const Philox4 next = {{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    c = next;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// The Philox output block that holds normals 4*block .. 4*block+3 of (seed, stream).
BNN_HD Philox4 philox_block(uint64_t seed, uint64_t stream, uint64_t block) {
  const Philox4 c = {{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                      static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)}};
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// u in (0, 1]: log never sees 0. r * 2^-32 is exact, so the fused multiply-add rounds once, as
// the AVX2 path's multiply then add does.
BNN_HD float uniform_open01(uint32_t r) {
  return bm::fma_rn(static_cast<float>(r), kTwoPow32Inv, kTwoPow33Inv);
}

// The four normals of one Philox block: (r cos, r sin) of pair (v0, v1), then of pair (v2, v3),
// with r = sqrt(-2 log u1) and the angle fl32(kTwoPi * u2). The log and sincos are box_muller.h's:
// the same bits on the CPU (scalar and AVX2) and on the GPU.
BNN_HD void box_muller4(const Philox4& r, float out[4]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = uniform_open01(r.v[2 * pair]);
    const float u2 = uniform_open01(r.v[2 * pair + 1]);
    const float radius = sqrtf(bm::mul_rn(-2.0f, bm::log_open01(u1)));
    float sin_t, cos_t;
    bm::sincos_0_2pi(bm::mul_rn(kTwoPi, u2), &sin_t, &cos_t);
    out[2 * pair] = bm::mul_rn(radius, cos_t);
    out[2 * pair + 1] = bm::mul_rn(radius, sin_t);
  }
}

// normal(seed, stream, i) of the contract, one element (generates its whole block: use
// box_muller4 directly where neighbouring elements are needed too).
BNN_HD float normal_at(uint64_t seed, uint64_t stream, uint64_t i) {
  float z[4];
  box_muller4(philox_block(seed, stream, i >> 2), z);
  return z[i & 3];
}

}  // namespace bnn_fast
