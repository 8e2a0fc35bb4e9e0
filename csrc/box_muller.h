// The log and sincos of the RNG contract's Box-Muller step (DESIGN.md section 3), written once as
// scalar __host__ __device__ code: the CPU's scalar path and every CUDA kernel run these
// functions, and cpu/fastmath.h runs the same operations on 8 lanes (AVX2) and 16 (AVX-512F),
// from the same coefficients below. Each function is a fixed sequence of correctly rounded float operations
// (+, -, *, fmaf, sqrtf, int <-> float conversions) with every fused multiply-add written out, so
// the CPU (scalar, AVX2 or AVX-512) and the GPU give the same bits: no libm, whose log/sin/cos differ
// between the host and the device, and no contraction (device code uses the _rn intrinsics,
// which nvcc never fuses; host code is built with -ffp-contract=off).
//
// The domains are what the contract produces:
//   u     = fl32(r * 2^-32 + 2^-33), r a uint32     -> u in [2^-33, 1]
//   theta = fl32(kTwoPi * u2)                        -> theta in [0, fl32(2 pi)]
// (u reaches 1.0f exactly: fl32(r) rounds up to 2^32 for r >= 2^32 - 128.) Outside them the
// results are unspecified: no NaN, infinity, zero, negative or subnormal handling in the log, no
// large-argument reduction in sincos.
//
// The polynomial coefficients were fitted for this project (weighted minimax by Lawson's
// iteration in double precision, then rounded to float one coefficient at a time with the rest
// refitted). benchmarks/fastmath_check.cpp checks them exhaustively over their domains against
// double-precision libm, the scalar form against the AVX2 form and the AVX-512 form against the
// AVX2 one bit for bit.
//
// Measured there (every float of each domain):
//   log_open01: max 0.887 ulp (at u = 0.706188679), max absolute error 9.65e-7 (at u = 2.094e-8,
//     where log u = -17.7 and 1 ulp = 1.9e-6);
//   sincos_0_2pi: sin 1.474 ulp at most (at x = 3.66440034), cos 1.481 ulp (at x = 1.31916893),
//     over the whole domain, zero crossings (x near pi, 2 pi) included.
#pragma once

#include <cstdint>
#include <cstring>

#include "gaussian.h"  // BNN_HD

namespace bnn_fast {
namespace bm {

// ---- coefficients (shared with cpu/fastmath.h) --------------------------------------------------

// log u = e ln2 + log1p(f), u = 2^e (1 + f), 1 + f in [sqrt(1/2), sqrt(2)); log1p(f) = f + f^2 Q(f)
// with Q of degree 8, Horner from the highest power (log_q(0)) down (weighted minimax relative
// error of log1p on [sqrt(1/2) - 1, sqrt(2) - 1]: 2^-27.8 after rounding to float).
constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;  // 0.70710677f
// (The arrays are local to constexpr functions: a namespace-scope constexpr array is host-only
// in CUDA, a function's is folded into either side's code.)
BNN_HD constexpr float log_q(int k) {
  constexpr float c[9] = {-0x1.381470p-4f, 0x1.087532p-3f,  -0x1.0f5200p-3f,
                          0x1.226c80p-3f,  -0x1.5423e8p-3f, 0x1.99a41cp-3f,
                          -0x1.000438p-2f, 0x1.555550p-2f,  -0x1.fffff8p-2f};
  return c[k];
}
// ln2 = kLn2Hi + kLn2Lo, kLn2Hi on 17 bits: e * kLn2Hi is exact for |e| < 2^7.
constexpr float kLn2Hi = 0x1.62e400p-1f;  // 0.693145751953125
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;

// sincos: q = round(x 2/pi), r = x - q pi/2 with pi/2 = pio2(0) + pio2(1) + pio2(2) (within
// 1.1e-23); the reduction subtracts q * pio2(k) in that order, and x - q pio2(0) is exact (one
// FMA). sin r = r + r^3 S(r^2) (S of degree 2, relative error 2^-27.9), cos r = 1 + r^2 C(r^2)
// (C of degree 3, 2^-33.0), fitted on |r| <= pi/4 (1 + 1e-4); Horner from sin_s(0) / cos_c(0).
constexpr float kTwoOverPi = 0x1.45f306p-1f;
BNN_HD constexpr float pio2(int k) {
  constexpr float c[3] = {0x1.921fb6p+0f, -0x1.777a5cp-25f, -0x1.ee59dap-50f};
  return c[k];
}
BNN_HD constexpr float sin_s(int k) {
  constexpr float c[3] = {-0x1.9953fep-13f, 0x1.110778p-7f, -0x1.555546p-3f};
  return c[k];
}
BNN_HD constexpr float cos_c(int k) {
  constexpr float c[4] = {0x1.99e80cp-16f, -0x1.6c0c28p-10f, 0x1.55554ap-5f, -0.5f};
  return c[k];
}
// Adding then subtracting 1.5 * 2^23 rounds a float in [0, 2^22) to the nearest integer (ties to
// even, as rint), and leaves that integer in the low mantissa bits of the sum.
constexpr float kRoundMagic = 0x1.8p23f;

// ---- float operations that are never fused ------------------------------------------------------

BNN_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
BNN_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
BNN_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
BNN_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
BNN_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}
BNN_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

// ---- the functions ------------------------------------------------------------------------------

// Natural log of u for u in [2^-33, 1]. a + f is summed with its rounding error kept (Fast2Sum:
// |e kLn2Hi| >= |f| whenever e != 0, and the sum is exact when e == 0).
BNN_HD float log_open01(float u) {
  const uint32_t t = float_bits(u) - kSqrtHalfBits;
  const int32_t e = static_cast<int32_t>(t) >> 23;  // arithmetic shift: e < 0 for u < sqrt(1/2)
  const float m = bits_float((t & 0x007fffffu) + kSqrtHalfBits);
  const float f = sub_rn(m, 1.0f);  // exact
  const float fe = static_cast<float>(e);  // exact
  float q = log_q(0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 1; k < 9; ++k) q = fma_rn(q, f, log_q(k));
  const float a = mul_rn(fe, kLn2Hi);  // exact
  const float s = add_rn(a, f);
  const float s_err = sub_rn(f, sub_rn(s, a));  // a + f = s + s_err exactly
  const float tail = mul_rn(mul_rn(f, f), q);   // f^2 Q(f)
  const float lo = add_rn(fma_rn(fe, kLn2Lo, tail), s_err);
  return add_rn(s, lo);
}

// sin x and cos x for x in [0, fl32(2 pi)] (correct for |x| up to a few hundred: the reduction
// constants are sized for q <= 4 but stay exact well beyond).
BNN_HD void sincos_0_2pi(float x, float* sin_x, float* cos_x) {
  const float shifted = add_rn(mul_rn(x, kTwoOverPi), kRoundMagic);
  const float q = sub_rn(shifted, kRoundMagic);   // round(x 2/pi), exact
  const uint32_t iq = float_bits(shifted);        // q in the low bits
  const float nq = -q;
  float r = fma_rn(nq, pio2(0), x);  // exact
  r = fma_rn(nq, pio2(1), r);
  r = fma_rn(nq, pio2(2), r);
  const float r2 = mul_rn(r, r);

  float sp = sin_s(0);
  sp = fma_rn(sp, r2, sin_s(1));
  sp = fma_rn(sp, r2, sin_s(2));
  const float sin_r = fma_rn(mul_rn(r, r2), sp, r);

  float cp = cos_c(0);
  cp = fma_rn(cp, r2, cos_c(1));
  cp = fma_rn(cp, r2, cos_c(2));
  cp = fma_rn(cp, r2, cos_c(3));
  const float cos_r = fma_rn(cp, r2, 1.0f);

  // Quadrant q mod 4: odd q swaps sin and cos; sin is negated for q mod 4 in {2, 3}, cos for
  // q mod 4 in {1, 2}.
  const bool swap = (iq & 1u) != 0;
  const uint32_t sign_s = ((iq >> 1) & 1u) << 31;
  const uint32_t sign_c = (((iq + 1u) >> 1) & 1u) << 31;
  *sin_x = bits_float(float_bits(swap ? cos_r : sin_r) ^ sign_s);
  *cos_x = bits_float(float_bits(swap ? sin_r : cos_r) ^ sign_c);
}

}  // namespace bm
}  // namespace bnn_fast
