// The emulated cases: every launch_* entry point of csrc/cuda/launchers.h, run on the unmodified
// kernels with buffers of exactly the size they need (heap allocations that AddressSanitizer
// guards on both sides) and with buffers that start one element into their allocation (not
// 16-byte aligned: a float4 access there is a UBSan alignment error), against references built
// from the same element functions (gaussian.h, estimators.h, mlp.h, philox.h) in the kernels'
// order of operations, compared bit for bit. Grid-stride kernels also run with the grid capped
// to 1 and 3 blocks.
//
// Prints one line per group ("group <name> <cases>") and a last line "cases <n> launches <n>
// blocks <n> failures <n>"; exits 1 on a mismatch. Usage: emu [group ...] (default: all), or
// emu --selftest NAME (selftest_kernel.cu: must abort).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/launchers.h"
#include "estimators.h"
#include "gaussian.h"
#include "mlp.h"
#include "philox.h"

using namespace bnn_fast;
using namespace bnn_fast::cuda;

namespace {

int64_t g_cases = 0, g_failures = 0;

// An allocation of exactly n elements, or of n + 1 with the buffer one element in.
template <class T>
struct Buf {
  T* base;
  T* p;
  int64_t n;
  Buf(int64_t count, bool shifted) : n(count) {
    base = static_cast<T*>(std::malloc(sizeof(T) * size_t(count + (shifted ? 1 : 0))));
    p = base + (shifted ? 1 : 0);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(base); }
  T& operator[](int64_t i) { return p[i]; }
};

template <class T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kFloat32; }
template <> DType dtype_of<double>() { return DType::kFloat64; }
template <> DType dtype_of<__half>() { return DType::kFloat16; }
template <> DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

template <class T> const char* name_of();
template <> const char* name_of<float>() { return "float32"; }
template <> const char* name_of<double>() { return "float64"; }
template <> const char* name_of<__half>() { return "float16"; }
template <> const char* name_of<__nv_bfloat16>() { return "bfloat16"; }

template <class T>
T make(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return from_acc<T>(float(v));
  }
}

uint64_t g_rng = 0x243F6A8885A308D3ull;
double uniform(double lo, double hi) {  // xorshift64*: the inputs, the same on every run
  g_rng ^= g_rng >> 12;
  g_rng ^= g_rng << 25;
  g_rng ^= g_rng >> 27;
  const uint64_t r = g_rng * 0x2545F4914F6CDD1Dull;
  return lo + (hi - lo) * double(r >> 11) * 0x1.0p-53;
}

template <class T>
void fill(Buf<T>& b, double lo, double hi) {
  for (int64_t i = 0; i < b.n; ++i) b[i] = make<T>(uniform(lo, hi));
}

// Output buffers start as NaN: an element the kernel does not write is a mismatch.
template <class T>
void poison(Buf<T>& b) {
  for (int64_t i = 0; i < b.n; ++i) b[i] = make<T>(NAN);
}

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
double as_double(T v) {
  return double(to_acc(v));
}

// Compares got with want bit for bit; reports the first difference.
template <class T>
void expect_equal(const std::string& what, const T* got, const T* want, int64_t n) {
  ++g_cases;
  for (int64_t i = 0; i < n; ++i) {
    if (!same_bits(got[i], want[i])) {
      ++g_failures;
      std::printf("MISMATCH %s: element %lld of %lld: got %.9g, expected %.9g\n", what.c_str(),
                  static_cast<long long>(i), static_cast<long long>(n), as_double(got[i]),
                  as_double(want[i]));
      return;
    }
  }
}

void expect_status(const std::string& what, cudaError_t got, cudaError_t want) {
  ++g_cases;
  if (got != want) {
    ++g_failures;
    std::printf("MISMATCH %s: launch returned %d, expected %d\n", what.c_str(), int(got), int(want));
  }
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// Runs body() under each grid cap: the launch's own grid, then 1 and 3 blocks.
template <class F>
void with_caps(F&& body) {
  for (unsigned cap : {0u, 1u, 3u}) {
    emu::rt.grid_cap = cap;
    body(cap);
  }
  emu::rt.grid_cap = 0;
}

constexpr cudaStream_t kStream = nullptr;
constexpr uint64_t kSeeds[] = {0x0123456789ABCDEFull, 0xFFFFFFFF00000001ull};

// ---- fill_normal ---------------------------------------------------------------------------

void fill_normal_cases() {
  const uint64_t offsets[] = {0, 1, 2, 3, 5, (uint64_t(1) << 34) - 6, (uint64_t(1) << 34) + 1,
                              (uint64_t(1) << 62) + 3};
  const int64_t sizes[] = {0, 1, 2, 3, 4, 5, 7, 1030, 3077};
  for (uint64_t seed : kSeeds) {
    for (uint64_t stream : {uint64_t(0), (uint64_t(1) << 33) + 5}) {
      for (uint64_t offset : offsets) {
        for (int64_t n : sizes) {
          std::vector<float> want(static_cast<size_t>(n));
          for (int64_t k = 0; k < n; ++k) want[size_t(k)] = normal_at(seed, stream, offset + uint64_t(k));
          with_caps([&](unsigned cap) {
            for (bool shifted : {false, true}) {
              Buf<float> out(n, shifted);
              poison(out);
              const std::string what = fmt("fill_normal offset=%llu n=%lld cap=%u shifted=%d",
                                           static_cast<unsigned long long>(offset),
                                           static_cast<long long>(n), cap, int(shifted));
              expect_status(what, launch_fill_normal(out.p, n, seed, stream, offset, kStream), cudaSuccess);
              expect_equal(what, out.p, want.data(), n);
            }
          });
        }
      }
    }
  }
}

// ---- sample --------------------------------------------------------------------------------

template <class T>
void sample_cases() {
  using A = typename Acc<T>::type;
  struct Shape { int64_t numel, samples; };
  const Shape shapes[] = {{1, 1}, {2, 3}, {3, 2}, {4, 1}, {4, 3}, {5, 2}, {6, 3}, {7, 1},
                          {8, 2}, {1028, 1}, {1031, 2}, {516, 3}};
  for (const Shape& sh : shapes) {
    const int64_t total = sh.numel * sh.samples;
    for (bool has_mu : {true, false}) {
      // Which buffer starts one element in: none, mu, log_sigma, out.
      for (int shift = 0; shift < 4; ++shift) {
        if (shift == 1 && !has_mu) continue;
        Buf<T> mu(has_mu ? sh.numel : 0, shift == 1), ls(sh.numel, shift == 2);
        fill(mu, -1, 1);
        fill(ls, -3, 0.5);
        const uint64_t seed = kSeeds[shift & 1], stream = uint64_t(shift);
        std::vector<T> want(static_cast<size_t>(total));
        for (int64_t i = 0; i < total; ++i) {
          const int64_t j = i % sh.numel;
          want[size_t(i)] = from_acc<T>(sample_element<A>(has_mu ? to_acc(mu[j]) : A(0),
                                                          to_acc(ls[j]), normal_at(seed, stream, uint64_t(i))));
        }
        with_caps([&](unsigned cap) {
          Buf<T> out(total, shift == 3);
          poison(out);
          const std::string what = fmt("sample %s numel=%lld S=%lld mu=%d shift=%d cap=%u", name_of<T>(),
                                       static_cast<long long>(sh.numel), static_cast<long long>(sh.samples),
                                       int(has_mu), shift, cap);
          expect_status(what, launch_sample(dtype_of<T>(), has_mu ? mu.p : nullptr, ls.p, out.p, sh.numel,
                                            sh.samples, seed, stream, kStream), cudaSuccess);
          expect_equal(what, out.p, want.data(), total);
        });
      }
    }
  }
}

// ---- weight_grads --------------------------------------------------------------------------

template <class T>
void weight_grads_cases() {
  using A = typename Acc<T>::type;
  const int64_t numels[] = {1, 3, 4, 5, 8, 1028, 1029};
  for (int64_t numel : numels) {
    for (int64_t S : {1, 2, 3}) {
      for (bool has_gmu : {true, false}) {
        for (bool shifted : {false, true}) {
          Buf<T> dw(S * numel, shifted), ls(numel, shifted);
          fill(dw, -1, 1);
          fill(ls, -3, 0.5);
          const uint64_t seed = kSeeds[S & 1];
          const uint64_t stream_id = shifted ? 0 : 5;  // the linears' weight stream, and another
          std::vector<T> want_mu(static_cast<size_t>(numel)), want_ls(static_cast<size_t>(numel));
          for (int64_t j = 0; j < numel; ++j) {
            A sum_g = A(0), sum_ge = A(0);
            for (int64_t s = 0; s < S; ++s) {
              const A g = to_acc(dw[s * numel + j]);
              sum_g += g;
              sum_ge += g * A(normal_at(seed, stream_id, uint64_t(s * numel + j)));
            }
            want_mu[size_t(j)] = from_acc<T>(sum_g);
            want_ls[size_t(j)] = from_acc<T>(sum_ge * exp(to_acc(ls[j])));
          }
          with_caps([&](unsigned cap) {
            Buf<T> gmu(has_gmu ? numel : 0, shifted), gls(numel, shifted);
            poison(gmu);
            poison(gls);
            const std::string what = fmt("weight_grads %s numel=%lld S=%lld stream=%llu grad_mu=%d shifted=%d cap=%u",
                                         name_of<T>(), static_cast<long long>(numel), static_cast<long long>(S),
                                         static_cast<unsigned long long>(stream_id), int(has_gmu), int(shifted), cap);
            expect_status(what, launch_weight_grads(dtype_of<T>(), dw.p, ls.p, has_gmu ? gmu.p : nullptr,
                                                    gls.p, numel, S, seed, stream_id, kStream), cudaSuccess);
            if (has_gmu) expect_equal(what + " grad_mu", gmu.p, want_mu.data(), numel);
            expect_equal(what + " grad_log_sigma", gls.p, want_ls.data(), numel);
          });
        }
      }
    }
  }
}

// ---- fused small-batch linear --------------------------------------------------------------

struct FusedCase {
  int64_t rows, in, out, samples, x_samples;
  bool bias;
  int shift;  // the buffers that start one element in: 0 none, 1 x and y, 2 weight_mu,
              // 3 weight_log_sigma and the bias
};

// The kernel's order: lane l sums the quads l, l + 32, ... of the row (aligned to the Philox
// blocks of the noise index space), then a butterfly over the lanes (offsets 16, 8, 4, 2, 1).
template <class T>
void fused_case(const FusedCase& c) {
  using A = typename Acc<T>::type;
  const int64_t R = c.rows, in = c.in, out = c.out, S = c.samples;
  Buf<T> x(c.x_samples * R * in, c.shift == 1), mu(out * in, c.shift == 2), ls(out * in, c.shift == 3);
  Buf<T> bmu(c.bias ? out : 0, c.shift == 3), bls(c.bias ? out : 0, c.shift == 3);
  fill(x, -1, 1);
  fill(mu, -0.5, 0.5);
  fill(ls, -3, 0);
  fill(bmu, -0.5, 0.5);
  fill(bls, -3, 0);
  const uint64_t seed = kSeeds[(R + in) & 1];
  std::vector<T> want(static_cast<size_t>(S * R * out));
  std::vector<A> acc(static_cast<size_t>(32 * R));
  for (int64_t s = 0; s < S; ++s) {
    const T* xs = x.p + (c.x_samples == 1 ? 0 : s) * R * in;
    for (int64_t o = 0; o < out; ++o) {
      const uint64_t base = uint64_t(s) * uint64_t(out * in) + uint64_t(o * in);
      const int64_t lead = int64_t(base & 3);
      for (int lane = 0; lane < 32; ++lane) {
        A* a = &acc[size_t(lane * R)];
        for (int64_t n = 0; n < R; ++n) a[n] = A(0);
        for (int64_t j0 = int64_t(lane) * 4 - lead; j0 < in; j0 += 128) {
          float z[4];
          box_muller4(philox_block(seed, 0, (base + uint64_t(j0)) >> 2), z);
          A w[4];
          for (int k = 0; k < 4; ++k) {
            const int64_t j = j0 + k;
            w[k] = (j >= 0 && j < in) ? sample_element<A>(to_acc(mu[o * in + j]), to_acc(ls[o * in + j]), z[k]) : A(0);
          }
          for (int64_t n = 0; n < R; ++n) {
            for (int k = 0; k < 4; ++k) {
              const int64_t j = j0 + k;
              a[n] += w[k] * ((j >= 0 && j < in) ? to_acc(xs[n * in + j]) : A(0));
            }
          }
        }
      }
      for (int64_t n = 0; n < R; ++n) {
        for (int offset = 16; offset > 0; offset /= 2) {
          std::vector<A> next(32);
          for (int lane = 0; lane < 32; ++lane) {
            next[size_t(lane)] = acc[size_t(lane * R + n)] + acc[size_t((lane ^ offset) * R + n)];
          }
          for (int lane = 0; lane < 32; ++lane) acc[size_t(lane * R + n)] = next[size_t(lane)];
        }
        A bias = A(0);
        if (c.bias) bias = sample_element<A>(to_acc(bmu[o]), to_acc(bls[o]), normal_at(seed, 1, uint64_t(s * out + o)));
        want[size_t((s * R + n) * out + o)] = from_acc<T>(acc[size_t(n * R + n)] + bias);
      }
    }
  }
  Buf<T> y(S * R * out, c.shift == 1);
  poison(y);
  const std::string what = fmt("fused_small_batch %s rows=%lld in=%lld out=%lld S=%lld x_samples=%lld bias=%d shift=%d",
                               name_of<T>(), static_cast<long long>(R), static_cast<long long>(in),
                               static_cast<long long>(out), static_cast<long long>(S),
                               static_cast<long long>(c.x_samples), int(c.bias), c.shift);
  expect_status(what, launch_linear_fused_small_batch(dtype_of<T>(), x.p, mu.p, ls.p, c.bias ? bmu.p : nullptr,
                                                      c.bias ? bls.p : nullptr, y.p, c.x_samples, S, R, in, out,
                                                      seed, kStream), cudaSuccess);
  expect_equal(what, y.p, want.data(), S * R * out);
}

template <class T>
void fused_cases() {
  // Every row count, with and without a vector tail, aligned and with x one element in.
  for (int64_t R = 1; R <= kFusedMaxRows; ++R) {
    for (int64_t in : {5, 8, 133}) {
      for (int shift : {0, 1}) fused_case<T>({R, in, 3, 2, 2, true, shift});
    }
  }
  // Row starts at every offset in a Philox block, several quads per lane, each misaligned
  // buffer, broadcast and per-sample x, with and without bias.
  for (int64_t R : {1, 16}) {
    for (int64_t in : {1, 2, 3, 4, 7, 9, 128, 130}) {
      for (int shift = 0; shift < 4; ++shift) {
        fused_case<T>({R, in, 3, 2, 1, shift != 2, shift});
      }
    }
  }
  fused_case<T>({4, 12, 9, 3, 3, true, 0});  // more warps than one block holds (27 rows of 32 lanes)
  Buf<T> none(0, false);
  expect_status(fmt("fused_small_batch %s rows=0", name_of<T>()),
                launch_linear_fused_small_batch(dtype_of<T>(), none.p, none.p, none.p, nullptr, nullptr, none.p,
                                                1, 1, 0, 4, 2, 1, kStream), cudaErrorInvalidValue);
  expect_status(fmt("fused_small_batch %s rows=17", name_of<T>()),
                launch_linear_fused_small_batch(dtype_of<T>(), none.p, none.p, none.p, nullptr, nullptr, none.p,
                                                1, 1, kFusedMaxRows + 1, 4, 2, 1, kStream), cudaErrorInvalidValue);
  expect_status(fmt("fused_small_batch %s out=0", name_of<T>()),
                launch_linear_fused_small_batch(dtype_of<T>(), none.p, none.p, none.p, nullptr, nullptr, none.p,
                                                1, 2, 3, 4, 0, 1, kStream), cudaSuccess);
}

// ---- local / flipout passes ------------------------------------------------------------------

struct PassShape { int64_t per_sample, samples, x_samples; };
constexpr PassShape kPassShapes[] = {{1, 1, 1}, {3, 2, 1}, {3, 2, 2}, {4, 3, 1}, {5, 3, 3},
                                     {6, 1, 1}, {7, 2, 2}, {1030, 1, 1}, {1030, 2, 1}, {517, 3, 3}};

template <class T>
void local_cases() {
  using A = typename Acc<T>::type;
  const uint64_t seed = kSeeds[0];
  for (const PassShape& sh : kPassShapes) {
    const int64_t Rn = sh.per_sample, S = sh.samples, X = sh.x_samples;
    for (double tiny : {double(std::numeric_limits<float>::min()), 1e-3}) {
      Buf<T> mean(X * Rn, false), var(X * Rn, true), g(S * Rn, true);
      fill(mean, -1, 1);
      fill(var, -0.01, 2);
      fill(g, -1, 1);
      for (int64_t i = 0; i < var.n; i += 3) var[i] = make<T>(i % 2 ? 0.0 : 2e-6);  // at the floor
      std::vector<T> want_y(static_cast<size_t>(S * Rn));
      for (int64_t i = 0; i < S * Rn; ++i) {
        const int64_t src = (X == 1 ? 0 : i / Rn) * Rn + i % Rn;
        want_y[size_t(i)] = from_acc<T>(local_output<A>(to_acc(mean[src]), to_acc(var[src]),
                                                        normal_at(seed, 2, uint64_t(i)), A(tiny)));
      }
      const bool summed = X == 1 && S > 1;
      std::vector<T> want_gm(static_cast<size_t>(X * Rn)), want_gv(static_cast<size_t>(X * Rn));
      for (int64_t i = 0; i < X * Rn; ++i) {
        A sm = A(0), sv = A(0);
        for (int64_t s = 0; s < (summed ? S : 1); ++s) {
          const int64_t k = summed ? s * Rn + i : i;
          const A gk = to_acc(g[k]);
          sm += gk;
          sv += local_grad_var<A>(gk, to_acc(var[i]), normal_at(seed, 2, uint64_t(k)), A(tiny));
        }
        want_gm[size_t(i)] = from_acc<T>(sm);
        want_gv[size_t(i)] = from_acc<T>(sv);
      }
      with_caps([&](unsigned cap) {
        const std::string what = fmt("%s R=%lld S=%lld X=%lld tiny=%g cap=%u", name_of<T>(),
                                     static_cast<long long>(Rn), static_cast<long long>(S),
                                     static_cast<long long>(X), tiny, cap);
        Buf<T> y(S * Rn, true);
        poison(y);
        expect_status("local_combine " + what, launch_local_combine(dtype_of<T>(), mean.p, var.p, y.p, X, S, Rn,
                                                                    seed, tiny, kStream), cudaSuccess);
        expect_equal("local_combine " + what, y.p, want_y.data(), S * Rn);
        Buf<T> gm(X * Rn, false), gv(X * Rn, true);
        poison(gm);
        poison(gv);
        expect_status("local_grads " + what, launch_local_grads(dtype_of<T>(), g.p, var.p, gm.p, gv.p, X, S, Rn,
                                                                seed, tiny, kStream), cudaSuccess);
        expect_equal("local_grads gm " + what, gm.p, want_gm.data(), X * Rn);
        expect_equal("local_grads gv " + what, gv.p, want_gv.data(), X * Rn);
      });
    }
  }
}

template <class T>
void flipout_cases() {
  using A = typename Acc<T>::type;
  const uint64_t seed = kSeeds[1];
  for (const PassShape& sh : kPassShapes) {
    const int64_t Rn = sh.per_sample, S = sh.samples, X = sh.x_samples;
    // apply_signs: out of place, and in place where the shapes allow it.
    Buf<T> src(X * Rn, true);
    fill(src, -1, 1);
    std::vector<T> want(static_cast<size_t>(S * Rn));
    for (int64_t i = 0; i < S * Rn; ++i) {
      const int64_t from = (X == 1 ? 0 : i / Rn) * Rn + i % Rn;
      want[size_t(i)] = from_acc<T>(flip(to_acc(src[from]), normal_at(seed, 3, uint64_t(i))));
    }
    with_caps([&](unsigned cap) {
      const std::string what = fmt("apply_signs %s R=%lld S=%lld X=%lld cap=%u", name_of<T>(),
                                   static_cast<long long>(Rn), static_cast<long long>(S),
                                   static_cast<long long>(X), cap);
      Buf<T> dst(S * Rn, false);
      poison(dst);
      expect_status(what, launch_apply_signs(dtype_of<T>(), src.p, dst.p, X, S, Rn, seed, 3, kStream), cudaSuccess);
      expect_equal(what, dst.p, want.data(), S * Rn);
      if (X == S) {
        Buf<T> inplace(X * Rn, true);
        std::memcpy(inplace.p, src.p, sizeof(T) * size_t(X * Rn));
        expect_status(what + " in place", launch_apply_signs(dtype_of<T>(), inplace.p, inplace.p, X, S, Rn, seed, 3,
                                                             kStream), cudaSuccess);
        expect_equal(what + " in place", inplace.p, want.data(), S * Rn);
      }
    });
    // flipout_combine: per_sample = N * out.
    const int64_t out = Rn % 3 == 0 ? 3 : 1;
    for (bool has_bias : {true, false}) {
      Buf<T> mean(X * Rn, true), y0(S * Rn, false), bias(has_bias ? S * out : 0, true);
      fill(mean, -1, 1);
      fill(y0, -1, 1);
      fill(bias, -1, 1);
      std::vector<T> want_y(static_cast<size_t>(S * Rn));
      for (int64_t i = 0; i < S * Rn; ++i) {
        const int64_t s = i / Rn, r = i % Rn;
        A v = to_acc(mean[(X == 1 ? 0 : s) * Rn + r]) + flip(to_acc(y0[i]), normal_at(seed, 4, uint64_t(i)));
        if (has_bias) v += to_acc(bias[s * out + r % out]);
        want_y[size_t(i)] = from_acc<T>(v);
      }
      with_caps([&](unsigned cap) {
        const std::string what = fmt("flipout_combine %s R=%lld S=%lld X=%lld bias=%d cap=%u", name_of<T>(),
                                     static_cast<long long>(Rn), static_cast<long long>(S),
                                     static_cast<long long>(X), int(has_bias), cap);
        Buf<T> y(S * Rn, true);
        std::memcpy(y.p, y0.p, sizeof(T) * size_t(S * Rn));
        expect_status(what, launch_flipout_combine(dtype_of<T>(), mean.p, y.p, has_bias ? bias.p : nullptr, X, S,
                                                   Rn, out, seed, kStream), cudaSuccess);
        expect_equal(what, y.p, want_y.data(), S * Rn);
      });
    }
  }
}

// ---- mlp_inference ---------------------------------------------------------------------------

template <class T>
void mlp_case(int64_t in, int64_t hidden, int64_t out, int64_t rows, int64_t S, int64_t X, bool b1_on,
              bool b2_on, bool shifted, bool caps) {
  Buf<T> x(X * rows * in, shifted), w1(S * hidden * in, shifted), b1(b1_on ? S * hidden : 0, shifted);
  Buf<T> w2(S * out * hidden, shifted), b2(b2_on ? S * out : 0, shifted);
  for (Buf<T>* b : {&x, &w1, &b1, &w2, &b2}) fill(*b, -1, 1);
  std::vector<T> want(static_cast<size_t>(S * rows * out));
  std::vector<T> xv(static_cast<size_t>(in > 0 ? in : 1));
  for (int64_t r = 0; r < S * rows; ++r) {
    const int64_t s = r / rows, n = r % rows;
    for (int64_t i = 0; i < in; ++i) xv[size_t(i)] = x[((X == 1 ? 0 : s) * rows + n) * in + i];
    std::vector<T> acc(static_cast<size_t>(out), T(0));
    for (int64_t j = 0; j < hidden; ++j) {
      const T h = mlp_hidden_unit(xv.data(), w1.p + s * hidden * in + j * in, 1,
                                  b1_on ? b1[s * hidden + j] : T(0), in);
      for (int64_t o = 0; o < out; ++o) acc[size_t(o)] += h * w2[s * out * hidden + o * hidden + j];
    }
    for (int64_t o = 0; o < out; ++o) want[size_t(r * out + o)] = acc[size_t(o)] + (b2_on ? b2[s * out + o] : T(0));
  }
  const auto run = [&](unsigned cap) {
    Buf<T> y(S * rows * out, shifted);
    poison(y);
    const std::string what = fmt("mlp_inference %s in=%lld hidden=%lld out=%lld rows=%lld S=%lld X=%lld b1=%d b2=%d "
                                 "shifted=%d cap=%u", name_of<T>(), static_cast<long long>(in),
                                 static_cast<long long>(hidden), static_cast<long long>(out),
                                 static_cast<long long>(rows), static_cast<long long>(S),
                                 static_cast<long long>(X), int(b1_on), int(b2_on), int(shifted), cap);
    expect_status(what, launch_mlp_inference(dtype_of<T>(), x.p, w1.p, b1_on ? b1.p : nullptr, w2.p,
                                             b2_on ? b2.p : nullptr, y.p, X, S, rows, in, hidden, out, kStream),
                  cudaSuccess);
    expect_equal(what, y.p, want.data(), S * rows * out);
  };
  if (caps) {
    with_caps(run);
  } else {
    run(0);
  }
}

template <class T>
void mlp_cases() {
  // Every (in, out) instantiation once, small.
  for (int64_t in = 0; in <= kMlpMaxIn; ++in) {
    for (int64_t out = 1; out <= kMlpMaxOut; ++out) mlp_case<T>(in, 3, out, 2, 2, 1, true, true, (in + out) % 2, false);
  }
  // The edges: in 0 / 1 / max, out 1 / max, hidden 0 / 1 / 5, biases, broadcast and per-sample
  // x, enough rows for several stride turns under the capped grids.
  for (int64_t in : {int64_t(0), int64_t(1), kMlpMaxIn}) {
    for (int64_t out : {int64_t(1), kMlpMaxOut}) {
      for (int64_t hidden : {0, 1, 5}) {
        mlp_case<T>(in, hidden, out, 3, 2, 2, hidden != 1, hidden != 0, false, true);
        mlp_case<T>(in, hidden, out, 130, 3, 1, true, false, true, true);
      }
    }
  }
  Buf<T> none(0, false);
  expect_status("mlp_inference in=9", launch_mlp_inference(dtype_of<T>(), none.p, none.p, nullptr, none.p, nullptr,
                                                           none.p, 1, 1, 1, kMlpMaxIn + 1, 1, 1, kStream),
                cudaErrorInvalidValue);
  expect_status("mlp_inference out=9", launch_mlp_inference(dtype_of<T>(), none.p, none.p, nullptr, none.p, nullptr,
                                                            none.p, 1, 1, 1, 1, 1, kMlpMaxOut + 1, kStream),
                cudaErrorInvalidValue);
  expect_status("mlp_inference out=0", launch_mlp_inference(dtype_of<T>(), none.p, none.p, nullptr, none.p, nullptr,
                                                            none.p, 1, 1, 1, 1, 1, 0, kStream), cudaSuccess);
  expect_status("mlp_inference rows=0", launch_mlp_inference(dtype_of<T>(), none.p, none.p, nullptr, none.p, nullptr,
                                                             none.p, 1, 1, 0, 1, 1, 1, kStream), cudaSuccess);
}

void mlp_dtype_cases() {
  Buf<__half> none(0, false);
  expect_status("mlp_inference float16", launch_mlp_inference(DType::kFloat16, none.p, none.p, nullptr, none.p,
                                                              nullptr, none.p, 1, 1, 1, 1, 1, 1, kStream),
                cudaErrorInvalidValue);
}

// ---- gaussian_kl -----------------------------------------------------------------------------

// The kernels' reduction: thread t sums elements t, t + 256, ... of its chunk, then a tree over
// the 256 sums (strides 128 .. 1).
double block_sum_ref(std::vector<double> v) {
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    for (int t = 0; t < stride; ++t) v[size_t(t)] += v[size_t(t + stride)];
  }
  return v[0];
}

template <class T>
void kl_case(const std::vector<int64_t>& numels, bool shifted) {
  const GaussianPrior prior = GaussianPrior::make(0.1, -1.2);
  std::vector<Buf<T>*> mus, lss, gmus, glss;
  for (int64_t n : numels) {
    mus.push_back(new Buf<T>(n, shifted));
    lss.push_back(new Buf<T>(n, shifted));
    gmus.push_back(new Buf<T>(n, shifted));
    glss.push_back(new Buf<T>(n, shifted));
    fill(*mus.back(), -1, 1);
    fill(*lss.back(), -4, 1);
    poison(*gmus.back());
    poison(*glss.back());
  }
  // The table as cuda/kl.cpp builds it: empty tensors get no entry and no chunk.
  std::vector<KlEntry> entries;
  std::vector<size_t> owner;
  int64_t chunks = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] == 0) continue;
    entries.push_back({mus[t]->p, lss[t]->p, gmus[t]->p, glss[t]->p, numels[t], chunks});
    owner.push_back(t);
    chunks += (numels[t] + kKlChunk - 1) / kKlChunk;
  }
  std::string what = fmt("gaussian_kl %s shifted=%d numels=", name_of<T>(), int(shifted));
  for (int64_t n : numels) what += fmt("%lld,", static_cast<long long>(n));
  if (chunks == 0) {
    expect_status(what, launch_gaussian_kl(dtype_of<T>(), entries.data(), 0, 0, nullptr, nullptr, 0.1, -1.2, kStream),
                  cudaErrorInvalidConfiguration);
  } else {
    std::vector<double> partial_want;
    for (size_t e = 0; e < entries.size(); ++e) {
      const Buf<T>& mu = *mus[owner[e]];
      const Buf<T>& ls = *lss[owner[e]];
      for (int64_t begin = 0; begin < entries[e].numel; begin += kKlChunk) {
        const int64_t end = std::min(entries[e].numel, begin + kKlChunk);
        std::vector<double> acc(kThreads, 0.0);
        for (int t = 0; t < kThreads; ++t) {
          for (int64_t i = begin + t; i < end; i += kThreads) {
            const double l = static_cast<double>(ls.p[i]);
            acc[size_t(t)] += kl_element<double>(static_cast<double>(mu.p[i]), l, exp(2.0 * l), prior);
          }
        }
        partial_want.push_back(block_sum_ref(acc));
      }
    }
    std::vector<double> acc(kThreads, 0.0);
    for (int t = 0; t < kThreads; ++t) {
      for (int64_t c = t; c < chunks; c += kThreads) acc[size_t(t)] += partial_want[size_t(c)];
    }
    const T out_want = static_cast<T>(block_sum_ref(acc));
    Buf<double> partial(chunks, false);
    Buf<T> out(1, shifted);
    poison(partial);
    poison(out);
    expect_status(what, launch_gaussian_kl(dtype_of<T>(), entries.data(), int(entries.size()), chunks, partial.p,
                                           out.p, 0.1, -1.2, kStream), cudaSuccess);
    expect_equal(what + " partial", partial.p, partial_want.data(), chunks);
    expect_equal(what + " sum", out.p, &out_want, 1);

    Buf<T> grad(1, shifted);
    grad[0] = T(0.75);
    expect_status(what + " backward", launch_gaussian_kl_backward(dtype_of<T>(), entries.data(), int(entries.size()),
                                                                  chunks, grad.p, 0.1, -1.2, kStream), cudaSuccess);
    for (size_t t = 0; t < numels.size(); ++t) {
      std::vector<T> want_mu(static_cast<size_t>(numels[t])), want_ls(static_cast<size_t>(numels[t]));
      for (int64_t i = 0; i < numels[t]; ++i) {
        const double l = static_cast<double>(lss[t]->p[i]);
        want_mu[size_t(i)] = static_cast<T>(0.75 * kl_grad_mu<double>(static_cast<double>(mus[t]->p[i]), prior));
        want_ls[size_t(i)] = static_cast<T>(0.75 * kl_grad_log_sigma<double>(exp(2.0 * l), prior));
      }
      expect_equal(what + fmt(" backward grad_mu[%zu]", t), gmus[t]->p, want_mu.data(), numels[t]);
      expect_equal(what + fmt(" backward grad_log_sigma[%zu]", t), glss[t]->p, want_ls.data(), numels[t]);
    }
  }
  for (auto* v : {&mus, &lss, &gmus, &glss}) {
    for (Buf<T>* b : *v) delete b;
  }
}

void kl_cases() {
  const std::vector<std::vector<int64_t>> lists = {
      {1},
      {0},
      {0, 0},
      {5, 0, 3},
      {kKlChunk},
      {kKlChunk + 1, 0, 2 * kKlChunk + 300, 7, 0, kKlChunk - 1, 3 * kKlChunk},
      {0, 2 * kKlChunk, 1, 0},
  };
  for (const auto& numels : lists) {
    for (bool shifted : {false, true}) {
      kl_case<float>(numels, shifted);
      kl_case<double>(numels, shifted);
    }
  }
  // More chunks than the finishing block has threads: its loop takes two turns.
  kl_case<float>({kThreads * kKlChunk - 5, 0, 7, kKlChunk + 2}, false);
  Buf<__half> none(0, false);
  KlEntry e{none.p, none.p, none.p, none.p, 1, 0};
  expect_status("gaussian_kl float16", launch_gaussian_kl(DType::kFloat16, &e, 1, 1, nullptr, nullptr, 0, 0, kStream),
                cudaErrorInvalidValue);
}

template <template <class> class Body>
void every_dtype() {
  Body<float>::run();
  Body<double>::run();
  Body<__half>::run();
  Body<__nv_bfloat16>::run();
}

template <class T> struct Sample { static void run() { sample_cases<T>(); } };
template <class T> struct WeightGrads { static void run() { weight_grads_cases<T>(); } };
template <class T> struct Fused { static void run() { fused_cases<T>(); } };
template <class T> struct Local { static void run() { local_cases<T>(); } };
template <class T> struct Flipout { static void run() { flipout_cases<T>(); } };

struct Group {
  const char* name;
  void (*run)();
};

const Group kGroups[] = {
    {"fill_normal", fill_normal_cases},
    {"sample", every_dtype<Sample>},
    {"weight_grads", every_dtype<WeightGrads>},
    {"fused_small_batch", every_dtype<Fused>},
    {"local", every_dtype<Local>},
    {"flipout", every_dtype<Flipout>},
    {"mlp_inference", [] { mlp_cases<float>(); mlp_cases<double>(); mlp_dtype_cases(); }},
    {"gaussian_kl", kl_cases},
};

}  // namespace

namespace selftest {
int run(const char* name);
}

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--selftest") == 0) {
    const int rc = selftest::run(argv[2]);
    std::printf(rc == 0 ? "selftest %s: not stopped\n" : "selftest %s: unknown\n", argv[2]);
    return rc == 0 ? 3 : rc;
  }
  for (const Group& g : kGroups) {
    bool selected = argc == 1;
    for (int a = 1; a < argc; ++a) selected |= std::strcmp(argv[a], g.name) == 0;
    if (!selected) continue;
    const int64_t before = g_cases;
    g.run();
    std::printf("group %s %lld\n", g.name, static_cast<long long>(g_cases - before));
    std::fflush(stdout);
  }
  std::printf("cases %lld launches %llu blocks %llu failures %lld\n", static_cast<long long>(g_cases),
              static_cast<unsigned long long>(emu::rt.launches), static_cast<unsigned long long>(emu::rt.blocks),
              static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
