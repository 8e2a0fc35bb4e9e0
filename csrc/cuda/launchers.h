// Raw-pointer launchers of the CUDA kernels. This header and the .cu files that implement it
// include no torch header (they compile in seconds); the torch glue in cuda/*.cpp checks the
// arguments, picks the device and stream, and calls these. Each returns the launch's error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace bnn_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ---- gaussian_kl -------------------------------------------------------------------------
// One entry per (mu, log_sigma) pair; first_chunk is the prefix sum of ceil(numel / kKlChunk).
struct KlEntry {
  const void* mu;
  const void* log_sigma;
  void* grad_mu;         // backward only
  void* grad_log_sigma;  // backward only
  int64_t numel;
  int64_t first_chunk;
};
constexpr int64_t kKlChunk = 8192;

// partial[c] = sum of the KL of chunk c (float64); then *out = sum of partial in chunk order,
// cast to dtype. Deterministic: the chunks, the block size and the reduction order are fixed.
cudaError_t launch_gaussian_kl(DType dtype, const KlEntry* entries_dev, int n_entries,
                               int64_t n_chunks, double* partial_dev, void* out_dev,
                               double prior_mu, double prior_log_sigma, cudaStream_t stream);

// grad_mu = g (mu - m) / s^2, grad_log_sigma = g (sigma^2 / s^2 - 1), g read from grad_dev.
cudaError_t launch_gaussian_kl_backward(DType dtype, const KlEntry* entries_dev, int n_entries,
                                        int64_t n_chunks, const void* grad_dev, double prior_mu,
                                        double prior_log_sigma, cudaStream_t stream);

// ---- noise -------------------------------------------------------------------------------
// out[k] = normal(seed, stream_id, offset + k), k < n, float32.
cudaError_t launch_fill_normal(float* out, int64_t n, uint64_t seed, uint64_t stream_id,
                               uint64_t offset, cudaStream_t stream);

// ---- bayes_linear ------------------------------------------------------------------------
// out[s, j] = mu[j] + exp(log_sigma[j]) * normal(seed, stream_id, s * numel + j); mu may be null
// (zero: the perturbation sigma * eps alone).
cudaError_t launch_sample(DType dtype, const void* mu, const void* log_sigma, void* out,
                          int64_t numel, int64_t n_samples, uint64_t seed, uint64_t stream_id,
                          cudaStream_t stream);

// Small-batch forward without materializing W: y[s, n, o] = sum_j W_s[o, j] x[xs, n, j] + b_s[o]
// with W_s and b_s generated in registers. x: [x_samples, N, in] contiguous (x_samples 1 or S),
// y: [S, N, out]. N <= kFusedMaxRows. b_mu/b_log_sigma may be null. The host uses it for
// N <= fused_max_rows(in * out) (cuda/linear.cpp).
constexpr int kFusedMaxRows = 16;
cudaError_t launch_linear_fused_small_batch(DType dtype, const void* x, const void* w_mu,
                                            const void* w_log_sigma, const void* b_mu,
                                            const void* b_log_sigma, void* y, int64_t x_samples,
                                            int64_t n_samples, int64_t rows, int64_t in_features,
                                            int64_t out_features, uint64_t seed,
                                            cudaStream_t stream);

// grad_mu[j] = sum_s dw[s, j]; grad_log_sigma[j] = sum_s dw[s, j] * eps_s[j] * exp(log_sigma[j]),
// eps_s[j] = normal(seed, stream_id, s * numel + j) regenerated. dw: [S, numel]. grad_mu may be
// null: not written (one sample, where dw is grad_mu already).
cudaError_t launch_weight_grads(DType dtype, const void* dw, const void* log_sigma, void* grad_mu,
                                void* grad_log_sigma, int64_t numel, int64_t n_samples,
                                uint64_t seed, uint64_t stream_id, cudaStream_t stream);

// ---- bayes_mlp_inference ----------------------------------------------------------------
// y[s, n, :] = relu(x[xs, n] W1_s^T + b1_s) W2_s^T + b2_s for s < n_samples, n < rows (xs = 0
// when x_samples is 1, else s), one thread per output row, the hidden activations in registers.
// The weights are already sampled: w1 [S, hidden, in], b1 [S, hidden] or null, w2 [S, out,
// hidden], b2 [S, out] or null. float32 or float64 (else cudaErrorInvalidValue);
// out <= kMlpMaxOut (mlp.h).
cudaError_t launch_mlp_inference(DType dtype, const void* x, const void* w1, const void* b1,
                                 const void* w2, const void* b2, void* y, int64_t x_samples,
                                 int64_t n_samples, int64_t rows, int64_t in, int64_t hidden,
                                 int64_t out, cudaStream_t stream);

// ---- estimators (see estimators_ops.h) ----------------------------------------------------
// A tensor of x_samples = 1 holds one sample broadcast to all S; otherwise x_samples = S.
// `per_sample` is R, the elements of one sample; noise index s * R + r.

// y[s, r] = mean[x(s), r] + sqrt(max(var[x(s), r], tiny)) * normal(seed, 2, s * R + r).
cudaError_t launch_local_combine(DType dtype, const void* mean, const void* var, void* y,
                                 int64_t x_samples, int64_t n_samples, int64_t per_sample,
                                 uint64_t seed, double tiny, cudaStream_t stream);

// gm[x, r] = sum_s g[s, r], gv[x, r] = sum_s local_grad_var(g[s, r], var[x, r], eps), over the
// samples s of row x in order.
cudaError_t launch_local_grads(DType dtype, const void* g, const void* var, void* gm, void* gv,
                               int64_t x_samples, int64_t n_samples, int64_t per_sample,
                               uint64_t seed, double tiny, cudaStream_t stream);

// dst[s, r] = src[x(s), r] * sign(normal(seed, stream_id, s * R + r)); src may equal dst.
cudaError_t launch_apply_signs(DType dtype, const void* src, void* dst, int64_t x_samples,
                               int64_t n_samples, int64_t per_sample, uint64_t seed,
                               uint64_t stream_id, cudaStream_t stream);

// y[s, n, o] = (mean[x(s), n, o] + y[s, n, o] * sign(normal(seed, 4, s * R + n * out + o)))
//              + bias[s, o]; bias may be null.
cudaError_t launch_flipout_combine(DType dtype, const void* mean, void* y, const void* bias,
                                   int64_t x_samples, int64_t n_samples, int64_t per_sample,
                                   int64_t out_features, uint64_t seed, cudaStream_t stream);

}  // namespace cuda
}  // namespace bnn_fast
