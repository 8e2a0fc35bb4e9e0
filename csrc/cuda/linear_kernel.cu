// bayes_linear on CUDA.
//
// sample_kernel: one pass, reads mu and log_sigma (8 B/weight in float32), writes W (4 B/weight);
//   each thread generates one Philox block (4 normals) in registers. Used at large batch, where
//   the GEMM (cuBLAS through ATen) dominates, and in the backward to rebuild W for grad_x.
// fused_small_batch_kernel: one warp per output row (sample s, feature o); W is generated in
//   registers and multiplied at once, so weights are read once and never written: the floor is
//   reading mu and log_sigma. x rows (N <= kFusedMaxRows) stay in L1/L2. Templated on N, so the
//   per-row accumulators are registers.
// weight_grads_kernel: grad_mu = sum_s dW_s, grad_log_sigma = sum_s dW_s * eps_s * sigma with eps
//   regenerated from (seed, stream 0): nothing weight-sized is saved by the forward. grad_mu may
//   be null (one sample: the caller uses dW as grad_mu).
// All indices are 64-bit; every kernel bounds-checks its own range.
#include <type_traits>

#include "cuda/common.cuh"
#include "gaussian.h"
#include "philox.h"

namespace bnn_fast {
namespace cuda {
namespace {

template <typename T>
__global__ void sample_kernel(const T* __restrict__ mu, const T* __restrict__ ls, T* __restrict__ out,
                              int64_t numel, int64_t total, uint64_t seed, uint64_t stream_id) {
  using A = typename Acc<T>::type;
  for_each_normal(total, seed, stream_id, [&](int64_t i, float z) {
    const int64_t j = i % numel;
    out[i] = from_acc<T>(sample_element<A>(mu != nullptr ? to_acc(mu[j]) : A(0), to_acc(ls[j]), z));
  });
}

// v[k] = p[j0 + k] for k < 4 (zero past n); one 16-byte load for float32 when `vec` (n % 4 == 0
// and p 16-byte aligned, so every j0, a multiple of 4, is aligned too).
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ p, int64_t j0, int64_t n, bool vec,
                                      typename Acc<T>::type v[4]) {
  using A = typename Acc<T>::type;
  if constexpr (std::is_same_v<T, float>) {
    if (vec) {
      const float4 q = *reinterpret_cast<const float4*>(p + j0);
      v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = (j0 + k < n) ? to_acc(p[j0 + k]) : A(0);
}

// R = rows, a template parameter so that acc[] lives in registers (a runtime row count put it in
// local memory).
template <typename T, int R>
__global__ void fused_small_batch_kernel(const T* __restrict__ x, const T* __restrict__ w_mu,
                                         const T* __restrict__ w_ls, const T* __restrict__ b_mu,
                                         const T* __restrict__ b_ls, T* __restrict__ y,
                                         int64_t x_samples, int64_t n_samples, int64_t in,
                                         int64_t out, uint64_t seed, bool vec) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;  // s * out + o
  if (row >= n_samples * out) return;  // whole warps leave together
  const int64_t s = row / out;
  const int64_t o = row % out;
  const T* xs = x + (x_samples == 1 ? 0 : s) * R * in;
  const T* mu = w_mu + o * in;
  const T* ls = w_ls + o * in;
  const uint64_t base = uint64_t(s) * uint64_t(out * in) + uint64_t(o * in);
  A acc[R];
#pragma unroll
  for (int n = 0; n < R; ++n) acc[n] = A(0);
  for (int64_t j0 = int64_t(lane) * 4; j0 < in; j0 += 128) {
    float z[4];
    normals4(seed, 0, base + uint64_t(j0), z);
    A m[4], l[4], w[4];
    load4(mu, j0, in, vec, m);
    load4(ls, j0, in, vec, l);
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = j0 + k < in ? sample_element<A>(m[k], l[k], z[k]) : A(0);
#pragma unroll
    for (int n = 0; n < R; ++n) {
      A xv[4];
      load4(xs + n * in, j0, in, vec, xv);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (j0 + k < in) acc[n] += w[k] * xv[k];
      }
    }
  }
#pragma unroll
  for (int n = 0; n < R; ++n) {
    for (int offset = 16; offset > 0; offset /= 2) acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], offset);
  }
  // Lane n < R writes row n (a constant index into acc, which keeps it in registers).
  A mine = A(0);
#pragma unroll
  for (int n = 0; n < R; ++n) {
    if (lane == n) mine = acc[n];
  }
  if (lane < R) {
    A bias = A(0);
    if (b_mu != nullptr) {
      bias = sample_element<A>(to_acc(b_mu[o]), to_acc(b_ls[o]),
                               normal_at(seed, 1, uint64_t(s * out + o)));
    }
    y[(s * R + lane) * out + o] = from_acc<T>(mine + bias);
  }
}

template <typename T>
__global__ void weight_grads_kernel(const T* __restrict__ dw, const T* __restrict__ ls,
                                    T* __restrict__ gmu /* may be null */, T* __restrict__ gls, int64_t numel,
                                    int64_t n_samples, uint64_t seed) {
  using A = typename Acc<T>::type;
  const int64_t n_quads = (numel + 3) / 4;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n_quads;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j0 = q * 4;
    A sum_g[4] = {A(0), A(0), A(0), A(0)};
    A sum_ge[4] = {A(0), A(0), A(0), A(0)};
    for (int64_t s = 0; s < n_samples; ++s) {
      float z[4];
      normals4(seed, 0, uint64_t(s) * uint64_t(numel) + uint64_t(j0), z);
      for (int k = 0; k < 4; ++k) {
        if (j0 + k < numel) {
          const A g = to_acc(dw[s * numel + j0 + k]);
          sum_g[k] += g;
          sum_ge[k] += g * A(z[k]);
        }
      }
    }
    for (int k = 0; k < 4; ++k) {
      const int64_t j = j0 + k;
      if (j < numel) {
        if (gmu != nullptr) gmu[j] = from_acc<T>(sum_g[k]);
        gls[j] = from_acc<T>(sum_ge[k] * exp(to_acc(ls[j])));
      }
    }
  }
}

}  // namespace

cudaError_t launch_sample(DType dtype, const void* mu, const void* log_sigma, void* out,
                          int64_t numel, int64_t n_samples, uint64_t seed, uint64_t stream_id,
                          cudaStream_t stream) {
  const int64_t total = numel * n_samples;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    sample_kernel<T><<<grid_for((total + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(mu), static_cast<const T*>(log_sigma), static_cast<T*>(out), numel,
        total, seed, stream_id);
    return cudaGetLastError();
  });
}

cudaError_t launch_linear_fused_small_batch(DType dtype, const void* x, const void* w_mu,
                                            const void* w_log_sigma, const void* b_mu,
                                            const void* b_log_sigma, void* y, int64_t x_samples,
                                            int64_t n_samples, int64_t rows, int64_t in_features,
                                            int64_t out_features, uint64_t seed,
                                            cudaStream_t stream) {
  if (rows < 1 || rows > kFusedMaxRows) return cudaErrorInvalidValue;
  const int64_t warps = n_samples * out_features;
  if (warps == 0) return cudaSuccess;
  const int64_t blocks = (warps * 32 + kThreads - 1) / kThreads;
  if (blocks > int64_t(INT32_MAX)) return cudaErrorInvalidConfiguration;
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool vec = in_features % 4 == 0 && aligned(x) && aligned(w_mu) && aligned(w_log_sigma);
  return dispatch_dtype(dtype, [&]<typename T>() {
    return dispatch_int<1, kFusedMaxRows>(rows, [&]<int R>() {
      fused_small_batch_kernel<T, R><<<unsigned(blocks), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(w_mu),
          static_cast<const T*>(w_log_sigma), static_cast<const T*>(b_mu),
          static_cast<const T*>(b_log_sigma), static_cast<T*>(y), x_samples, n_samples,
          in_features, out_features, seed, vec);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_weight_grads(DType dtype, const void* dw, const void* log_sigma, void* grad_mu,
                                void* grad_log_sigma, int64_t numel, int64_t n_samples,
                                uint64_t seed, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    weight_grads_kernel<T><<<grid_for((numel + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(dw), static_cast<const T*>(log_sigma), static_cast<T*>(grad_mu),
        static_cast<T*>(grad_log_sigma), numel, n_samples, seed);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace bnn_fast
