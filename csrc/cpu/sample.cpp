// sample_gaussian on the CPU: W_s = mu + exp(log_sigma) * eps_s for a parameter of any shape.
//
// Forward: cpu::sample (cpu/linear.cpp), the pass the fused linears sample their weights with:
// reads mu and log_sigma (8 B/element in float32), writes the S samples.
// Backward: regenerates the noise from (seed, stream) instead of keeping it, so the forward saves
// nothing parameter-sized. One parallel pass over tiles of kTile elements: per tile, for s in
// order, the noise of sample s goes into a stack buffer and is accumulated with grad[s] into two
// stack accumulators; then grad_mu = sum_s g_s, grad_log_sigma = exp(log_sigma) * sum_s g_s eps_s
// (exp by the forward's vector exp in float32).
// Reads grad once (S * 4 B/element) and log_sigma once, writes the two gradients. The tiles are
// fixed and each element sums its samples in order, so the bits do not depend on the thread
// count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>

#include "checks.h"
#include "cpu/fastmath.h"
#include "cpu/noise.h"
#include "cpu/sample.h"
#include "cpu/simd.h"

namespace bnn_fast {
namespace cpu {
namespace {

// The noise tile of cpu::sample (cpu/linear.cpp): the noise is generated in pieces that start on
// multiples of kTile of the flat index, as the forward generates it.
constexpr int64_t kTile = 1024;

void check_cpu_dtype(const char* op, const at::Tensor& log_sigma) {
  TORCH_CHECK_TYPE(log_sigma.scalar_type() == at::kFloat || log_sigma.scalar_type() == at::kDouble,
                   op, ": log_sigma must be float32 or float64 on the CPU, got ",
                   log_sigma.scalar_type());
}

at::Tensor sample_gaussian_cpu(const std::optional<at::Tensor>& mu, const at::Tensor& log_sigma,
                               int64_t seed, int64_t stream, int64_t n_samples) {
  BNN_NO_AUTOCAST();
  check_sample_gaussian_args(mu, log_sigma, n_samples);
  check_cpu_dtype("sample_gaussian", log_sigma);
  return sample(mu.has_value() ? mu->contiguous() : at::Tensor(), log_sigma.contiguous(),
                n_samples, uint64_t(seed), uint64_t(stream));
}

// eps[k] = normal(seed, stream, index + k), k < n <= kTile, in pieces cut at multiples of kTile.
void fill_tile(float* eps, int64_t n, uint64_t seed, uint64_t stream, uint64_t index,
               SimdLevel simd) {
  for (int64_t k = 0; k < n;) {
    const int64_t len = std::min(kTile - int64_t((index + uint64_t(k)) % kTile), n - k);
    fill_normal(eps + k, len, seed, stream, index + uint64_t(k), simd);
    k += len;
  }
}

// out[k] = sum[k] * exp(ls[k]), k < n. float32 takes the forward's vector exp (fastmath::exp8,
// every element through it, a short tail padded) where the CPU has AVX2: libm's scalar expf cost
// as much as generating the noise.
#if BNN_HAVE_X86_SIMD
BNN_AVX2 void scale_by_sigma_avx2(const float* sum, const float* ls, float* out, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_loadu_ps(sum + k),
                                            fastmath::exp8(_mm256_loadu_ps(ls + k))));
  }
  if (k < n) {
    float s[8] = {0}, l[8] = {0}, o[8];
    std::copy(sum + k, sum + n, s);
    std::copy(ls + k, ls + n, l);
    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(s), fastmath::exp8(_mm256_loadu_ps(l))));
    std::copy(o, o + (n - k), out + k);
  }
}
#endif

template <typename T>
void scale_by_sigma(const T* sum, const T* ls, T* out, int64_t n, SimdLevel simd) {
#if BNN_HAVE_X86_SIMD
  if constexpr (std::is_same_v<T, float>) {
    if (simd != kScalar) return scale_by_sigma_avx2(sum, ls, out, n);
  }
#endif
  for (int64_t k = 0; k < n; ++k) out[k] = sum[k] * std::exp(ls[k]);
}

template <typename T>
void gradients(const T* grad, const T* ls, T* gmu /* may be null */, T* gls /* may be null */,
               int64_t numel, int64_t n_samples, uint64_t seed, uint64_t stream) {
  const SimdLevel simd = simd_level();
  const int64_t n_tiles = (numel + kTile - 1) / kTile;
  // About 32K elements of grad per task.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (kTile * std::max<int64_t>(n_samples, 1)));
  at::parallel_for(0, n_tiles, grain, [&](int64_t begin, int64_t end) {
    float eps[kTile];
    T sum_g[kTile], sum_ge[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j0 = t * kTile, n = std::min(kTile, numel - j0);
      std::fill(sum_g, sum_g + n, T(0));
      std::fill(sum_ge, sum_ge + n, T(0));
      for (int64_t s = 0; s < n_samples; ++s) {
        const T* g = grad + s * numel + j0;
        if (gmu != nullptr) {
          for (int64_t k = 0; k < n; ++k) sum_g[k] += g[k];
        }
        if (gls != nullptr) {
          fill_tile(eps, n, seed, stream, uint64_t(s * numel + j0), simd);
          for (int64_t k = 0; k < n; ++k) sum_ge[k] += g[k] * T(eps[k]);
        }
      }
      if (gmu != nullptr) std::copy(sum_g, sum_g + n, gmu + j0);
      if (gls != nullptr) scale_by_sigma(sum_ge, ls + j0, gls + j0, n, simd);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sample_gaussian_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& log_sigma_in, int64_t seed, int64_t stream,
    int64_t n_samples, std::array<bool, 2> mask) {
  BNN_NO_AUTOCAST();
  check_sample_gaussian_backward_args(grad_in, log_sigma_in, n_samples);
  check_cpu_dtype("sample_gaussian_backward", log_sigma_in);
  const auto opts = log_sigma_in.options();
  at::Tensor gmu = mask[0] ? at::empty(log_sigma_in.sizes(), opts) : at::empty({0}, opts);
  at::Tensor gls = mask[1] ? at::empty(log_sigma_in.sizes(), opts) : at::empty({0}, opts);
  const int64_t numel = log_sigma_in.numel();
  if (!(mask[0] || mask[1]) || numel == 0) return {gmu, gls};
  const at::Tensor grad = grad_in.contiguous(), ls = log_sigma_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ls.scalar_type(), "sample_gaussian_backward_cpu", [&] {
    gradients<scalar_t>(grad.const_data_ptr<scalar_t>(), ls.const_data_ptr<scalar_t>(),
                        mask[0] ? gmu.mutable_data_ptr<scalar_t>() : nullptr,
                        mask[1] ? gls.mutable_data_ptr<scalar_t>() : nullptr, numel, n_samples,
                        uint64_t(seed), uint64_t(stream));
  });
  return {gmu, gls};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CPU, m) {
  m.impl("sample_gaussian", &sample_gaussian_cpu);
  m.impl("sample_gaussian_backward", &sample_gaussian_backward_cpu);
}

}  // namespace cpu
}  // namespace bnn_fast
