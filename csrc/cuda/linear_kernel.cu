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
//   regenerated from (seed, stream_id): nothing weight-sized is saved by the forward. grad_mu may
//   be null (one sample: the caller uses dW as grad_mu).
// All indices are 64-bit; every kernel bounds-checks its own range.
#include <type_traits>

#include "cuda/common.cuh"
#include "gaussian.h"
#include "philox.h"

namespace bnn_fast {
namespace cuda {
namespace {

// v[k] = p[j0 + k], k < 4, for a quad inside [0, n): one 16-byte load for float32 when `vec`
// (n % 4 == 0 and p 16-byte aligned, so every j0, a multiple of 4, is aligned too).
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ p, int64_t j0, bool vec,
                                      typename Acc<T>::type v[4]) {
  if constexpr (std::is_same_v<T, float>) {
    if (vec) {
      const float4 q = *reinterpret_cast<const float4*>(p + j0);
      v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = to_acc(p[j0 + k]);
}

// The same for a quad that may reach outside [0, n): zero there.
template <typename T>
__device__ __forceinline__ void load4_partial(const T* __restrict__ p, int64_t j0, int64_t n,
                                              typename Acc<T>::type v[4]) {
  using A = typename Acc<T>::type;
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = (j0 + k >= 0 && j0 + k < n) ? to_acc(p[j0 + k]) : A(0);
}

// out[i] = mu[i % numel] + exp(log_sigma[i % numel]) * normal(seed, stream_id, i), i < total
// (mu null: 0). Thread-quads follow the Philox blocks: quad q is normals 4q..4q+3. With `vec`
// (float32, numel % 4 == 0, aligned pointers) a quad lies inside one sample and moves as float4.
template <typename T>
__global__ void sample_kernel(const T* __restrict__ mu, const T* __restrict__ ls, T* __restrict__ out,
                              int64_t numel, int64_t total, uint64_t seed, uint64_t stream_id,
                              bool vec) {
  using A = typename Acc<T>::type;
  const int64_t n_quads = (total + 3) / 4;
  const bool one_sample = total == numel;  // then i % numel == i: no 64-bit division
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n_quads;
       q += int64_t(gridDim.x) * blockDim.x) {
    float z[4];
    box_muller4(philox_block(seed, stream_id, uint64_t(q)), z);
    const int64_t i0 = q * 4;
    if constexpr (std::is_same_v<T, float>) {
      if (vec) {
        const int64_t j0 = one_sample ? i0 : i0 % numel;
        float m[4] = {0.f, 0.f, 0.f, 0.f}, l[4];
        if (mu != nullptr) load4(mu, j0, true, m);
        load4(ls, j0, true, l);
        float4 w;
        w.x = sample_element<float>(m[0], l[0], z[0]);
        w.y = sample_element<float>(m[1], l[1], z[1]);
        w.z = sample_element<float>(m[2], l[2], z[2]);
        w.w = sample_element<float>(m[3], l[3], z[3]);
        *reinterpret_cast<float4*>(out + i0) = w;
        continue;
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = i0 + k;
      if (i < total) {
        const int64_t j = one_sample ? i : i % numel;
        out[i] = from_acc<T>(sample_element<A>(mu != nullptr ? to_acc(mu[j]) : A(0), to_acc(ls[j]), z[k]));
      }
    }
  }
}

// One warp per output row (s, o): y[s, n, o] = sum_j x[n, j] W_s[o, j] + b_s[o], n < R. The lanes
// walk the row in quads aligned to the Philox blocks of the noise index space (quad b holds
// normals 4b..4b+3, the columns 4b - base .. 4b - base + 3 of the row starting at noise index
// base), so each quad is one block and nothing is generated twice. R = rows, a template
// parameter so that acc[] lives in registers (a runtime row count put it in local memory).
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
  const int64_t lead = int64_t(base & 3);  // the first quad starts at column -lead (0 with vec)
  A acc[R];
#pragma unroll
  for (int n = 0; n < R; ++n) acc[n] = A(0);
  for (int64_t j0 = int64_t(lane) * 4 - lead; j0 < in; j0 += 128) {
    float z[4];
    box_muller4(philox_block(seed, 0, (base + uint64_t(j0)) >> 2), z);  // base + j0 = 4b >= 0
    A m[4], l[4], w[4];
    if (j0 >= 0 && j0 + 4 <= in) {  // a whole quad: no per-element bounds
      load4(mu, j0, vec, m);
      load4(ls, j0, vec, l);
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = sample_element<A>(m[k], l[k], z[k]);
#pragma unroll
      for (int n = 0; n < R; ++n) {
        A xv[4];
        load4(xs + n * in, j0, vec, xv);
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[n] += w[k] * xv[k];
      }
    } else {  // a quad at either end of the row (in % 4 != 0 or a misaligned row)
      load4_partial(mu, j0, in, m);
      load4_partial(ls, j0, in, l);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        w[k] = (j0 + k >= 0 && j0 + k < in) ? sample_element<A>(m[k], l[k], z[k]) : A(0);
      }
#pragma unroll
      for (int n = 0; n < R; ++n) {
        A xv[4];
        load4_partial(xs + n * in, j0, in, xv);
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[n] += w[k] * xv[k];
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
                                    int64_t n_samples, uint64_t seed, uint64_t stream_id, bool vec) {
  using A = typename Acc<T>::type;
  const int64_t n_quads = (numel + 3) / 4;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n_quads;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j0 = q * 4;
    const bool whole = j0 + 4 <= numel;
    A sum_g[4] = {A(0), A(0), A(0), A(0)};
    A sum_ge[4] = {A(0), A(0), A(0), A(0)};
    for (int64_t s = 0; s < n_samples; ++s) {
      float z[4];
      const int64_t i0 = s * numel + j0;
      if (numel % 4 == 0) {  // every sample's quads are Philox blocks
        box_muller4(philox_block(seed, stream_id, uint64_t(i0) >> 2), z);
      } else {
        normals4(seed, stream_id, uint64_t(i0), z);
      }
      A g[4];
      if (whole) {
        load4(dw, i0, vec, g);  // vec: numel % 4 == 0, so i0 is a multiple of 4
      } else {
        load4_partial(dw + s * numel, j0, numel, g);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        sum_g[k] += g[k];
        sum_ge[k] += g[k] * A(z[k]);
      }
    }
#pragma unroll
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
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool vec = numel % 4 == 0 && (mu == nullptr || aligned(mu)) && aligned(log_sigma) && aligned(out);
  return dispatch_dtype(dtype, [&]<typename T>() {
    sample_kernel<T><<<grid_for((total + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(mu), static_cast<const T*>(log_sigma), static_cast<T*>(out), numel,
        total, seed, stream_id, vec);
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
                                uint64_t seed, uint64_t stream_id, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const bool vec = numel % 4 == 0 && (reinterpret_cast<uintptr_t>(dw) & 15) == 0;
  return dispatch_dtype(dtype, [&]<typename T>() {
    weight_grads_kernel<T><<<grid_for((numel + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(dw), static_cast<const T*>(log_sigma), static_cast<T*>(grad_mu),
        static_cast<T*>(grad_log_sigma), numel, n_samples, seed, stream_id, vec);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace bnn_fast
