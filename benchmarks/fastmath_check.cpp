// Exhaustive accuracy check and throughput of csrc/cpu/fastmath.h (no torch needed), and a check
// that box_muller.h's scalar log and sincos (the CPU's scalar path and the CUDA kernels run them)
// give the same bits as the AVX2 forms on every input of their domains, and the same for the
// AVX-512 forms where the CPU has AVX-512F.
//
//   g++ -O2 -mavx2 -mfma -ffp-contract=off -std=c++17 -Icsrc benchmarks/fastmath_check.cpp
//       -o /tmp/fastmath_check && /tmp/fastmath_check        (one line; from the repository root)
//
// With -DWITH_SLEEF (and linked to libtorch_cpu, which exports Sleef) it also checks and times
// Sleef_logf8_u35avx2 and Sleef_sincosf8_u35avx2, the functions fastmath.h replaced:
//
//   TL=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
//   g++ -O2 -mavx2 -mfma -ffp-contract=off -std=c++17 -Icsrc -DWITH_SLEEF
//       benchmarks/fastmath_check.cpp -o /tmp/fastmath_check -L$TL -ltorch_cpu -Wl,-rpath,$TL
//
// Accuracy: every float u in [2^-33, 1] for the log (a superset of the values
// fl32(r 2^-32 + 2^-33) takes), every float x in [0, fl32(2 pi)] for sincos (a superset of
// fl32(kTwoPi u2)), every float x in [-104, 89] for exp (outside it exp is 0 or +inf in float),
// against double-precision std::log / std::sin / std::cos / std::exp of the same float, plus
// exp's special values (NaN, infinities, the ends of its range). Errors are in ulps of the float32
// result (ulp of the exact value's binade; subnormal results in units of 2^-149) and absolute.
// Targets: log <= 2 ulp; sin, cos <= 2 ulp where |result| >= 2^-10, absolute <= 2^-30 elsewhere;
// exp <= 2 ulp and every special value exact.
// The program exits 1 if one of ours misses its target.
//
// Throughput: ns per element over a 4096-element buffer of contract-distributed inputs (L1
// resident), ours and Sleef's interleaved, the median of several repetitions. `--bench` skips the
// accuracy part (which takes about 4 minutes).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/fastmath.h"

using bnn_fast::cpu::fastmath::exp8;
using bnn_fast::cpu::fastmath::log8_open01;
using bnn_fast::cpu::fastmath::sincos8;
using bnn_fast::cpu::fastmath::exp16;
using bnn_fast::cpu::fastmath::log16_open01;
using bnn_fast::cpu::fastmath::sincos16;

namespace {

float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

double ulp_of(double y) {  // ulp of a float32 in the binade of y
  if (y == 0) return std::ldexp(1.0, -149);
  return std::ldexp(1.0, std::max(std::ilogb(y), -126) - 23);
}

struct Err {
  const char* name;
  double max_ulp = 0, max_ulp_at = 0;          // over |ref| >= big (all inputs for the log)
  double max_abs = 0, max_abs_at = 0;          // over all inputs
  double max_abs_small = 0, max_abs_small_at = 0;  // over |ref| < big
  double max_ulp_all = 0;                      // over all inputs, for information
  double big;
  const char* var;  // the argument's name in the report
  Err(const char* n, double b, const char* v = "u") : name(n), big(b), var(v) {}
  void add(float got, double ref, float in) {
    const double abs_err = std::fabs(double(got) - ref);
    const double u = abs_err / ulp_of(ref);
    if (!(abs_err <= max_abs)) max_abs = abs_err, max_abs_at = in;  // !(<=) catches NaN
    if (!(u <= max_ulp_all)) max_ulp_all = u;
    if (std::fabs(ref) >= big) {
      if (!(u <= max_ulp)) max_ulp = u, max_ulp_at = in;
    } else if (!(abs_err <= max_abs_small)) {
      max_abs_small = abs_err, max_abs_small_at = in;
    }
  }
  void print() const {
    if (big > 0) {
      std::printf(
          "  %-12s max %.3f ulp where |ref| >= 2^%d (at x = %.9g); max abs %.3g = 2^%.1f where "
          "|ref| < 2^%d (at x = %.9g); max abs overall %.3g (at x = %.9g); max ulp overall %.3f\n",
          name, max_ulp, std::ilogb(big), max_ulp_at, max_abs_small,
          max_abs_small > 0 ? std::log2(max_abs_small) : -INFINITY, std::ilogb(big),
          max_abs_small_at, max_abs, max_abs_at, max_ulp_all);
    } else {
      std::printf("  %-12s max %.3f ulp (at %s = %.9g); max abs %.3g (at %s = %.9g)\n", name,
                  max_ulp, var, max_ulp_at, max_abs, var, max_abs_at);
    }
  }
};

#ifdef WITH_SLEEF
extern "C" {
struct SleefFloat8x2 {
  __m256 x, y;
};
__m256 Sleef_logf8_u35avx2(__m256);
SleefFloat8x2 Sleef_sincosf8_u35avx2(__m256);
__m256 Sleef_expf8_u10avx2(__m256);
}
#endif

bool check_log() {
  const uint32_t lo = float_to_bits(0x1p-33f), hi = float_to_bits(1.0f);
  Err ours("log (ours)", 0);
  unsigned long long scalar_differs = 0;
#ifdef WITH_SLEEF
  Err sleef("log (Sleef)", 0);
#endif
  alignas(32) float in[8], out[8];
  for (uint64_t b = lo; b <= hi; b += 8) {
    int n = 0;
    for (; n < 8 && b + n <= hi; ++n) in[n] = bits_to_float(uint32_t(b + n));
    for (int k = n; k < 8; ++k) in[k] = 0.5f;
    _mm256_store_ps(out, log8_open01(_mm256_load_ps(in)));
    for (int k = 0; k < n; ++k) {
      if (float_to_bits(bnn_fast::bm::log_open01(in[k])) != float_to_bits(out[k])) ++scalar_differs;
    }
    double ref[8];
    for (int k = 0; k < n; ++k) ref[k] = std::log(double(in[k]));
    for (int k = 0; k < n; ++k) ours.add(out[k], ref[k], in[k]);
#ifdef WITH_SLEEF
    _mm256_store_ps(out, Sleef_logf8_u35avx2(_mm256_load_ps(in)));
    for (int k = 0; k < n; ++k) sleef.add(out[k], ref[k], in[k]);
#endif
  }
  std::printf("log over every float in [2^-33, 1] (%u inputs):\n", hi - lo + 1);
  ours.print();
  std::printf("  scalar log_open01 (box_muller.h) != log8_open01 on %llu inputs\n", scalar_differs);
#ifdef WITH_SLEEF
  sleef.print();
#endif
  return ours.max_ulp <= 2.0 && scalar_differs == 0;
}

bool check_sincos() {
  const uint32_t hi = float_to_bits(6.2831853071795864769f);
  const double big = 0x1p-10;
  Err s_ours("sin (ours)", big), c_ours("cos (ours)", big);
  unsigned long long scalar_differs = 0;
#ifdef WITH_SLEEF
  Err s_sleef("sin (Sleef)", big), c_sleef("cos (Sleef)", big);
#endif
  alignas(32) float in[8], so[8], co[8];
  for (uint64_t b = 0; b <= hi; b += 8) {
    int n = 0;
    for (; n < 8 && b + n <= hi; ++n) in[n] = bits_to_float(uint32_t(b + n));
    for (int k = n; k < 8; ++k) in[k] = 1.0f;
    __m256 vs, vc;
    sincos8(_mm256_load_ps(in), &vs, &vc);
    _mm256_store_ps(so, vs);
    _mm256_store_ps(co, vc);
    for (int k = 0; k < n; ++k) {
      float ss, cc;
      bnn_fast::bm::sincos_0_2pi(in[k], &ss, &cc);
      if (float_to_bits(ss) != float_to_bits(so[k]) || float_to_bits(cc) != float_to_bits(co[k])) {
        ++scalar_differs;
      }
    }
    double rs[8], rc[8];
    for (int k = 0; k < n; ++k) rs[k] = std::sin(double(in[k])), rc[k] = std::cos(double(in[k]));
    for (int k = 0; k < n; ++k) s_ours.add(so[k], rs[k], in[k]), c_ours.add(co[k], rc[k], in[k]);
#ifdef WITH_SLEEF
    const SleefFloat8x2 sc = Sleef_sincosf8_u35avx2(_mm256_load_ps(in));
    _mm256_store_ps(so, sc.x);
    _mm256_store_ps(co, sc.y);
    for (int k = 0; k < n; ++k) s_sleef.add(so[k], rs[k], in[k]), c_sleef.add(co[k], rc[k], in[k]);
#endif
  }
  std::printf("sincos over every float in [0, fl32(2 pi)] (%u inputs):\n", hi + 1);
  s_ours.print();
  c_ours.print();
  std::printf("  scalar sincos_0_2pi (box_muller.h) != sincos8 on %llu inputs\n", scalar_differs);
#ifdef WITH_SLEEF
  s_sleef.print();
  c_sleef.print();
#endif
  const double small_limit = 0x1p-30;
  return s_ours.max_ulp <= 2.0 && c_ours.max_ulp <= 2.0 && s_ours.max_abs_small <= small_limit &&
         c_ours.max_abs_small <= small_limit && scalar_differs == 0;
}

bool check_exp() {
  // Every float in [-104, 89]: the negative ones from -0 down to -104, then +0 up to 89.
  const uint32_t neg_hi = float_to_bits(-104.0f), pos_hi = float_to_bits(89.0f);
  // Where exp x rounds past FLT_MAX (x > 88.7228394) the float result is +inf: those inputs are
  // counted as right when the result is +inf and wrong otherwise, not measured in ulps.
  Err ours("exp (ours)", 0, "x");
  uint64_t ours_overflow_wrong = 0;
#ifdef WITH_SLEEF
  Err sleef("exp (Sleef u10)", 0, "x");
#endif
  const auto add = [](Err& e, uint64_t& wrong, float got, double ref, float x) {
    if (std::isinf(static_cast<float>(ref))) {
      wrong += std::isinf(got) && got > 0 ? 0 : 1;
    } else {
      e.add(got, ref, x);
    }
  };
  uint64_t overflow = 0, sleef_overflow_wrong = 0;
  alignas(32) float in[8], out[8];
  uint64_t count = 0;
  for (const uint32_t sign : {0x80000000u, 0u}) {
    const uint32_t hi = sign != 0 ? neg_hi : pos_hi;
    for (uint64_t b = sign; b <= hi; b += 8) {
      int n = 0;
      for (; n < 8 && b + n <= hi; ++n) in[n] = bits_to_float(uint32_t(b + n));
      for (int k = n; k < 8; ++k) in[k] = 0.0f;
      count += uint64_t(n);
      _mm256_store_ps(out, exp8(_mm256_load_ps(in)));
      double ref[8];
      for (int k = 0; k < n; ++k) ref[k] = std::exp(double(in[k]));
      for (int k = 0; k < n; ++k) overflow += std::isinf(static_cast<float>(ref[k])) ? 1 : 0;
      for (int k = 0; k < n; ++k) add(ours, ours_overflow_wrong, out[k], ref[k], in[k]);
#ifdef WITH_SLEEF
      _mm256_store_ps(out, Sleef_expf8_u10avx2(_mm256_load_ps(in)));
      for (int k = 0; k < n; ++k) add(sleef, sleef_overflow_wrong, out[k], ref[k], in[k]);
#endif
    }
  }
  std::printf("exp over every float in [-104, 89] (%llu inputs):\n", (unsigned long long)count);
  ours.print();
  std::printf("  %-12s +inf where the float result overflows: %llu of %llu wrong\n", "exp (ours)",
              (unsigned long long)ours_overflow_wrong, (unsigned long long)overflow);
#ifdef WITH_SLEEF
  sleef.print();
  std::printf("  %-12s +inf where the float result overflows: %llu of %llu wrong\n", "exp (Sleef)",
              (unsigned long long)sleef_overflow_wrong, (unsigned long long)overflow);
#endif
  // Special values: NaN, infinities and zeros exactly as float libm gives them; a finite nonzero
  // result within 2 ulp of the exact value.
  alignas(32) const float special[16] = {NAN, -NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 88.72283f,
                                         88.72284f, 89.0f, 1e30f, -103.97f, -103.98f, -104.0f,
                                         -1e30f, -87.33655f, 3.4028235e38f};
  bool special_ok = true;
  for (int half = 0; half < 2; ++half) {
    _mm256_store_ps(out, exp8(_mm256_load_ps(special + 8 * half)));
    for (int k = 0; k < 8; ++k) {
      const float x = special[8 * half + k], want = std::exp(x), got = out[k];
      const double exact = std::exp(double(x));
      const bool finite_nonzero = std::isfinite(want) && want != 0.0f && std::isfinite(got);
      const bool same = (std::isnan(want) && std::isnan(got)) ||
                        float_to_bits(want) == float_to_bits(got) ||
                        (finite_nonzero && std::fabs(double(got) - exact) <= 2 * ulp_of(exact));
      if (!same) {
        std::printf("  exp(%.9g): got %.9g, libm %.9g\n", x, got, want);
        special_ok = false;
      }
    }
  }
  std::printf("  special values (NaN, +-inf, +-0, overflow and underflow edges): %s\n",
              special_ok ? "as libm" : "WRONG");
  return ours.max_ulp <= 2.0 && ours_overflow_wrong == 0 && special_ok;
}

// ---- throughput ----
constexpr int kN = 4096;

template <class F>
double ns_per_element(F&& body, int reps) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) body();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / (double(reps) * kN);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The 16-lane (AVX-512F) forms against the 8-lane ones, bit for bit: log and sincos over their
// domains, exp over every float (NaN and infinities included). Skipped where the CPU has no
// AVX-512F. Returns false if one input differs.
BNN_AVX512 bool check_avx512() {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("16-lane forms: skipped (no AVX-512F on this CPU)\n");
    return true;
  }
  // f16(v, in, out16, out8) runs both forms on 16 inputs; returns the count of differing lanes.
  const auto sweep = [](uint64_t first, uint64_t last, auto&& f) {
    alignas(64) float in[16];
    unsigned long long differs = 0;
    for (uint64_t b = first; b <= last; b += 16) {
      for (int k = 0; k < 16; ++k) {
        in[k] = bits_to_float(uint32_t(std::min<uint64_t>(b + uint64_t(k), last)));
      }
      differs += f(in);
    }
    return differs;
  };
  const auto count = [](const float* a, const float* b) {
    unsigned long long d = 0;
    for (int k = 0; k < 16; ++k) d += float_to_bits(a[k]) != float_to_bits(b[k]) ? 1 : 0;
    return d;
  };
  const unsigned long long log_differs =
      sweep(float_to_bits(0x1p-33f), float_to_bits(1.0f), [&](const float* in) BNN_AVX512 {
        alignas(64) float o16[16], o8[16];
        _mm512_store_ps(o16, log16_open01(_mm512_load_ps(in)));
        _mm256_store_ps(o8, log8_open01(_mm256_load_ps(in)));
        _mm256_store_ps(o8 + 8, log8_open01(_mm256_load_ps(in + 8)));
        return count(o16, o8);
      });
  const unsigned long long sincos_differs =
      sweep(0, float_to_bits(6.2831853071795864769f), [&](const float* in) BNN_AVX512 {
        alignas(64) float s16[16], c16[16], s8[16], c8[16];
        __m512 s, c;
        sincos16(_mm512_load_ps(in), &s, &c);
        _mm512_store_ps(s16, s);
        _mm512_store_ps(c16, c);
        for (int h = 0; h < 2; ++h) {
          __m256 s_, c_;
          sincos8(_mm256_load_ps(in + 8 * h), &s_, &c_);
          _mm256_store_ps(s8 + 8 * h, s_);
          _mm256_store_ps(c8 + 8 * h, c_);
        }
        return count(s16, s8) + count(c16, c8);
      });
  const unsigned long long exp_differs = sweep(0, 0xFFFFFFFFull, [&](const float* in) BNN_AVX512 {
    alignas(64) float o16[16], o8[16];
    _mm512_store_ps(o16, exp16(_mm512_load_ps(in)));
    _mm256_store_ps(o8, exp8(_mm256_load_ps(in)));
    _mm256_store_ps(o8 + 8, exp8(_mm256_load_ps(in + 8)));
    return count(o16, o8);
  });
  std::printf("16-lane forms != 8-lane forms: log on %llu inputs, sincos on %llu, exp on %llu "
              "(of every float)\n", log_differs, sincos_differs, exp_differs);
  return log_differs == 0 && sincos_differs == 0 && exp_differs == 0;
}

void bench() {
  alignas(32) static float u[kN], x[kN], l[kN], o1[kN], o2[kN];
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < kN; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const uint32_t r1 = uint32_t(state >> 32);
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const uint32_t r2 = uint32_t(state >> 32);
    u[i] = float(r1) * 0x1p-32f + 0x1p-33f;
    x[i] = 6.2831853071795864769f * (float(r2) * 0x1p-32f + 0x1p-33f);
    l[i] = -9.0f + 8.0f * (float(r1 ^ r2) * 0x1p-32f);  // log_sigma-like values in [-9, -1]
  }
  auto log_ours = [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_ps(o1 + i, log8_open01(_mm256_load_ps(u + i)));
  };
  auto sincos_ours = [&] {
    for (int i = 0; i < kN; i += 8) {
      __m256 s, c;
      sincos8(_mm256_load_ps(x + i), &s, &c);
      _mm256_store_ps(o1 + i, s);
      _mm256_store_ps(o2 + i, c);
    }
  };
  auto exp_ours = [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_ps(o2 + i, exp8(_mm256_load_ps(l + i)));
  };
#ifdef WITH_SLEEF
  auto exp_sleef = [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_ps(o2 + i, Sleef_expf8_u10avx2(_mm256_load_ps(l + i)));
  };
  auto log_sleef = [&] {
    for (int i = 0; i < kN; i += 8)
      _mm256_store_ps(o1 + i, Sleef_logf8_u35avx2(_mm256_load_ps(u + i)));
  };
  auto sincos_sleef = [&] {
    for (int i = 0; i < kN; i += 8) {
      const SleefFloat8x2 sc = Sleef_sincosf8_u35avx2(_mm256_load_ps(x + i));
      _mm256_store_ps(o1 + i, sc.x);
      _mm256_store_ps(o2 + i, sc.y);
    }
  };
#endif
  const int reps = 2000, rounds = 15;
  std::vector<double> lo, so, eo;
#ifdef WITH_SLEEF
  std::vector<double> ls, ss, es;
#endif
  for (int w = 0; w < 3; ++w) log_ours(), sincos_ours(), exp_ours();  // warm up
  for (int r = 0; r < rounds; ++r) {
    lo.push_back(ns_per_element(log_ours, reps));
#ifdef WITH_SLEEF
    ls.push_back(ns_per_element(log_sleef, reps));
#endif
    so.push_back(ns_per_element(sincos_ours, reps));
#ifdef WITH_SLEEF
    ss.push_back(ns_per_element(sincos_sleef, reps));
#endif
    eo.push_back(ns_per_element(exp_ours, reps));
#ifdef WITH_SLEEF
    es.push_back(ns_per_element(exp_sleef, reps));
#endif
  }
  std::printf("throughput, ns per element (median of %d interleaved rounds of %d x %d):\n", rounds,
              reps, kN);
  std::printf("  log    ours %.3f", median(lo));
#ifdef WITH_SLEEF
  std::printf("   Sleef_logf8_u35avx2    %.3f", median(ls));
#endif
  std::printf("\n  sincos ours %.3f", median(so));
#ifdef WITH_SLEEF
  std::printf("   Sleef_sincosf8_u35avx2 %.3f", median(ss));
#endif
  std::printf("\n  exp    ours %.3f", median(eo));
#ifdef WITH_SLEEF
  std::printf("   Sleef_expf8_u10avx2    %.3f", median(es));
#endif
  double sum = 0;
  for (int i = 0; i < kN; ++i) sum += o1[i] + o2[i];
  std::printf("\n  (checksum %g)\n", sum);
}

}  // namespace

int main(int argc, char** argv) {
  const bool bench_only = argc > 1 && std::strcmp(argv[1], "--bench") == 0;
  bool ok = true;
  if (!bench_only) {
    ok = check_log() && ok;
    ok = check_sincos() && ok;
    ok = check_exp() && ok;
    ok = check_avx512() && ok;
    std::printf("targets %s\n", ok ? "met" : "MISSED");
  }
  bench();
  return ok ? 0 : 1;
}
