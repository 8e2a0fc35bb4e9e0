// Reparameterized sampling on the CPU, shared by the fused layers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace bnn_fast {
namespace cpu {

// out[s, j] = mu[j] + exp(log_sigma[j]) * normal(seed, stream, s * numel + j) for s < n_samples,
// shape [n_samples, *log_sigma.shape]; an undefined mu means zero (the perturbation
// sigma * eps alone). mu and log_sigma: contiguous, float32 or float64. One parallel pass with
// the noise generated in registers.
at::Tensor sample(const at::Tensor& mu, const at::Tensor& log_sigma, int64_t n_samples,
                  uint64_t seed, uint64_t stream);

}  // namespace cpu
}  // namespace bnn_fast
