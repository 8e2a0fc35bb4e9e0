// gaussian_kl on CUDA: all (mu, log_sigma) tensors of a call in one launch.
//
// Block c reduces chunk c (kKlChunk elements of one tensor; the table's first_chunk prefix finds
// the tensor) into partial[c] in float64 with a fixed shared-memory tree; a one-block kernel then
// adds the partials in chunk order. Fixed chunks and a fixed tree make the sum deterministic.
// Reads 8 bytes per float32 element; the per-element formula is gaussian.h's.
#include "cuda/common.cuh"
#include "gaussian.h"

namespace bnn_fast {
namespace cuda {
namespace {

__device__ int find_entry(const KlEntry* entries, int n_entries, int64_t chunk) {
  int lo = 0, hi = n_entries - 1;
  while (lo < hi) {  // last entry whose first_chunk <= chunk
    const int mid = (lo + hi + 1) / 2;
    if (entries[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ double block_sum(double v) {
  __shared__ double shared[kThreads];
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

template <typename T>
__global__ void kl_partial_kernel(const KlEntry* entries, int n_entries, double* partial,
                                  GaussianPrior prior) {
  const int64_t chunk = blockIdx.x;
  const KlEntry e = entries[find_entry(entries, n_entries, chunk)];
  const int64_t begin = (chunk - e.first_chunk) * kKlChunk;
  const int64_t end = min(e.numel, begin + kKlChunk);
  const T* mu = static_cast<const T*>(e.mu);
  const T* ls = static_cast<const T*>(e.log_sigma);
  double acc = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double l = static_cast<double>(ls[i]);
    acc += kl_element<double>(static_cast<double>(mu[i]), l, exp(2.0 * l), prior);
  }
  const double total = block_sum(acc);
  if (threadIdx.x == 0) partial[chunk] = total;
}

template <typename T>
__global__ void kl_finish_kernel(const double* partial, int64_t n_chunks, T* out) {
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < n_chunks; c += kThreads) acc += partial[c];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<T>(total);
}

template <typename T>
__global__ void kl_backward_kernel(const KlEntry* entries, int n_entries, const T* grad,
                                   GaussianPrior prior) {
  const int64_t chunk = blockIdx.x;
  const KlEntry e = entries[find_entry(entries, n_entries, chunk)];
  const int64_t begin = (chunk - e.first_chunk) * kKlChunk;
  const int64_t end = min(e.numel, begin + kKlChunk);
  const T* mu = static_cast<const T*>(e.mu);
  const T* ls = static_cast<const T*>(e.log_sigma);
  T* gmu = static_cast<T*>(e.grad_mu);
  T* gls = static_cast<T*>(e.grad_log_sigma);
  const double g = static_cast<double>(*grad);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double l = static_cast<double>(ls[i]);
    gmu[i] = static_cast<T>(g * kl_grad_mu<double>(static_cast<double>(mu[i]), prior));
    gls[i] = static_cast<T>(g * kl_grad_log_sigma<double>(exp(2.0 * l), prior));
  }
}

}  // namespace

cudaError_t launch_gaussian_kl(DType dtype, const KlEntry* entries, int n_entries,
                               int64_t n_chunks, double* partial, void* out, double prior_mu,
                               double prior_log_sigma, cudaStream_t stream) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat64) return cudaErrorInvalidValue;
  if (n_chunks <= 0 || n_chunks > int64_t(INT32_MAX)) return cudaErrorInvalidConfiguration;
  const GaussianPrior prior = GaussianPrior::make(prior_mu, prior_log_sigma);
  if (dtype == DType::kFloat32) {
    kl_partial_kernel<float><<<unsigned(n_chunks), kThreads, 0, stream>>>(entries, n_entries, partial, prior);
    kl_finish_kernel<float><<<1, kThreads, 0, stream>>>(partial, n_chunks, static_cast<float*>(out));
  } else {
    kl_partial_kernel<double><<<unsigned(n_chunks), kThreads, 0, stream>>>(entries, n_entries, partial, prior);
    kl_finish_kernel<double><<<1, kThreads, 0, stream>>>(partial, n_chunks, static_cast<double*>(out));
  }
  return cudaGetLastError();
}

cudaError_t launch_gaussian_kl_backward(DType dtype, const KlEntry* entries, int n_entries,
                                        int64_t n_chunks, const void* grad, double prior_mu,
                                        double prior_log_sigma, cudaStream_t stream) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat64) return cudaErrorInvalidValue;
  if (n_chunks <= 0 || n_chunks > int64_t(INT32_MAX)) return cudaErrorInvalidConfiguration;
  const GaussianPrior prior = GaussianPrior::make(prior_mu, prior_log_sigma);
  if (dtype == DType::kFloat32) {
    kl_backward_kernel<float><<<unsigned(n_chunks), kThreads, 0, stream>>>(
        entries, n_entries, static_cast<const float*>(grad), prior);
  } else {
    kl_backward_kernel<double><<<unsigned(n_chunks), kThreads, 0, stream>>>(
        entries, n_entries, static_cast<const double*>(grad), prior);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bnn_fast
