// Element math of a diagonal Gaussian posterior N(mu, sigma^2), sigma = exp(log_sigma), against a
// Gaussian prior N(m, s^2). Shared by the CPU and CUDA kernels; its Python twin is
// bnn_fast/reference.py. Everything here is a pure function of its arguments.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define BNN_HD __host__ __device__ __forceinline__
#else
// always_inline: the CPU kernels instantiate these templates with AVX2 vector types inside
// target("avx2,fma") functions; inlined, they are compiled for the caller's target.
#define BNN_HD inline __attribute__((always_inline))
#endif

namespace bnn_fast {

// The prior, with the constants the KL needs precomputed once per call.
struct GaussianPrior {
  double mu;          // m
  double log_sigma;   // log s
  double inv_var;     // 1 / s^2
  BNN_HD static GaussianPrior make(double mu, double log_sigma) {
    GaussianPrior p;
    p.mu = mu;
    p.log_sigma = log_sigma;
    p.inv_var = exp(-2.0 * log_sigma);
    return p;
  }
};

// The formulas take var = sigma^2 = exp(2 log_sigma) from the caller, so a SIMD kernel can supply
// its vector exp; T is double or a GCC vector of doubles. The kernels evaluate them in double
// (float32 inputs are widened): exp(2 * log_sigma) of a float32 log_sigma near 44 overflows in
// float, and a float32 element error would be the same for every element of a freshly
// initialised layer, so it would add up instead of averaging out.

// KL(N(mu, sigma^2) || N(m, s^2)) = log s - log sigma + (sigma^2 + (mu - m)^2) / (2 s^2) - 1/2.
template <typename T>
BNN_HD T kl_element(T mu, T log_sigma, T var, const GaussianPrior& p) {
  const T d = mu - p.mu;
  return p.log_sigma - log_sigma + 0.5 * (var + d * d) * p.inv_var - 0.5;
}

// d KL / d mu = (mu - m) / s^2
template <typename T>
BNN_HD T kl_grad_mu(T mu, const GaussianPrior& p) {
  return (mu - p.mu) * p.inv_var;
}

// d KL / d log_sigma = sigma^2 / s^2 - 1
template <typename T>
BNN_HD T kl_grad_log_sigma(T var, const GaussianPrior& p) {
  return var * p.inv_var - 1.0;
}

// A sampled weight: mu + exp(log_sigma) * eps (eps is the standard normal noise).
template <typename T>
BNN_HD T sample_element(T mu, T log_sigma, float eps) {
  return mu + std::exp(log_sigma) * static_cast<T>(eps);
}

}  // namespace bnn_fast
