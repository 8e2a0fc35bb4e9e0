// The elementwise passes of the "local" and "flipout" estimators on CUDA (estimators_ops.h).
//
// Over a flat [S, R] range whose noise index is the flat index itself, each thread generates one
// Philox block (4 normals) in registers and handles those 4 elements: the noise is never
// written. local_grads with a broadcast input instead gives each thread 4 consecutive columns r
// and loops over the samples in order (deterministic sums). 64-bit indices throughout; every
// element is bounds-checked.
#include "cuda/common.cuh"
#include "estimators.h"

namespace bnn_fast {
namespace cuda {
namespace {

constexpr uint64_t kLocalStream = 2;
constexpr uint64_t kOutputSignStream = 4;

__device__ __forceinline__ int64_t source(int64_t x_samples, int64_t s) {
  return x_samples == 1 ? 0 : s;
}

template <typename T>
__global__ void local_combine_kernel(const T* __restrict__ mean, const T* __restrict__ var,
                                     T* __restrict__ y, int64_t x_samples, int64_t total,
                                     int64_t per_sample, uint64_t seed, double tiny) {
  using A = typename Acc<T>::type;
  for_each_normal(total, seed, kLocalStream, [&](int64_t i, float z) {
    const int64_t src = source(x_samples, i / per_sample) * per_sample + i % per_sample;
    y[i] = from_acc<T>(local_output<A>(to_acc(mean[src]), to_acc(var[src]), z, A(tiny)));
  });
}

// Thread q owns columns 4q..4q+3 of every row x it covers: with x_samples == S, the flat range
// (no sum); with x_samples == 1, the R columns summed over all S samples.
template <typename T>
__global__ void local_grads_kernel(const T* __restrict__ g, const T* __restrict__ var,
                                   T* __restrict__ gm, T* __restrict__ gv, int64_t x_samples,
                                   int64_t n_samples, int64_t per_sample, uint64_t seed,
                                   double tiny) {
  using A = typename Acc<T>::type;
  const int64_t items = x_samples * per_sample;  // elements of gm and gv
  const int64_t n_quads = (items + 3) / 4;
  const bool summed = x_samples == 1 && n_samples > 1;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n_quads;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i0 = q * 4;
    A sum_m[4] = {A(0), A(0), A(0), A(0)};
    A sum_v[4] = {A(0), A(0), A(0), A(0)};
    const int64_t samples = summed ? n_samples : 1;
    for (int64_t s = 0; s < samples; ++s) {
      // Noise of element i0 + k of sample s: index s * R + i0 + k when summed, else i0 + k.
      const int64_t base = summed ? s * per_sample + i0 : i0;
      float z[4];
      normals4(seed, kLocalStream, uint64_t(base), z);
      for (int k = 0; k < 4; ++k) {
        if (i0 + k >= items) break;
        const A gk = to_acc(g[base + k]);
        sum_m[k] += gk;
        sum_v[k] += local_grad_var<A>(gk, to_acc(var[i0 + k]), z[k], A(tiny));
      }
    }
    for (int k = 0; k < 4; ++k) {
      if (i0 + k >= items) break;
      gm[i0 + k] = from_acc<T>(sum_m[k]);
      gv[i0 + k] = from_acc<T>(sum_v[k]);
    }
  }
}

template <typename T>
__global__ void apply_signs_kernel(const T* src, T* dst, int64_t x_samples, int64_t total,
                                   int64_t per_sample, uint64_t seed, uint64_t stream_id) {
  // src may alias dst (each element is read, then written, by the same thread): no __restrict__.
  for_each_normal(total, seed, stream_id, [&](int64_t i, float z) {
    const int64_t from = source(x_samples, i / per_sample) * per_sample + i % per_sample;
    dst[i] = from_acc<T>(flip(to_acc(src[from]), z));  // exact: a widening round trip
  });
}

template <typename T>
__global__ void flipout_combine_kernel(const T* __restrict__ mean, T* __restrict__ y,
                                       const T* __restrict__ bias, int64_t x_samples,
                                       int64_t total, int64_t per_sample, int64_t out,
                                       uint64_t seed) {
  using A = typename Acc<T>::type;
  for_each_normal(total, seed, kOutputSignStream, [&](int64_t i, float z) {
    const int64_t s = i / per_sample, r = i % per_sample;
    A v = to_acc(mean[source(x_samples, s) * per_sample + r]) + flip(to_acc(y[i]), z);
    if (bias != nullptr) v += to_acc(bias[s * out + r % out]);
    y[i] = from_acc<T>(v);
  });
}

}  // namespace

cudaError_t launch_local_combine(DType dtype, const void* mean, const void* var, void* y,
                                 int64_t x_samples, int64_t n_samples, int64_t per_sample,
                                 uint64_t seed, double tiny, cudaStream_t stream) {
  const int64_t total = n_samples * per_sample;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    local_combine_kernel<T><<<grid_for((total + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(mean), static_cast<const T*>(var), static_cast<T*>(y), x_samples,
        total, per_sample, seed, tiny);
    return cudaGetLastError();
  });
}

cudaError_t launch_local_grads(DType dtype, const void* g, const void* var, void* gm, void* gv,
                               int64_t x_samples, int64_t n_samples, int64_t per_sample,
                               uint64_t seed, double tiny, cudaStream_t stream) {
  const int64_t items = x_samples * per_sample;
  if (items == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    local_grads_kernel<T><<<grid_for((items + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(var), static_cast<T*>(gm),
        static_cast<T*>(gv), x_samples, n_samples, per_sample, seed, tiny);
    return cudaGetLastError();
  });
}

cudaError_t launch_apply_signs(DType dtype, const void* src, void* dst, int64_t x_samples,
                               int64_t n_samples, int64_t per_sample, uint64_t seed,
                               uint64_t stream_id, cudaStream_t stream) {
  const int64_t total = n_samples * per_sample;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    apply_signs_kernel<T><<<grid_for((total + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(src), static_cast<T*>(dst), x_samples, total, per_sample, seed,
        stream_id);
    return cudaGetLastError();
  });
}

cudaError_t launch_flipout_combine(DType dtype, const void* mean, void* y, const void* bias,
                                   int64_t x_samples, int64_t n_samples, int64_t per_sample,
                                   int64_t out_features, uint64_t seed, cudaStream_t stream) {
  const int64_t total = n_samples * per_sample;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    flipout_combine_kernel<T><<<grid_for((total + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(mean), static_cast<T*>(y), static_cast<const T*>(bias), x_samples,
        total, per_sample, out_features, seed);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace bnn_fast
