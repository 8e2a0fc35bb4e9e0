// Helpers shared by the torch-free CUDA kernels: element types, launch shapes, 64-bit indexing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launchers.h"
#include "philox.h"

namespace bnn_fast {
namespace cuda {

constexpr int kThreads = 256;

// Accumulation type: float for float32/float16/bfloat16, double for float64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never over the limit.
inline unsigned int grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// z[k] = normal(seed, stream_id, base + k), k < 4: one Philox block when base is aligned, two
// otherwise. Every array index is a compile-time constant (selects, not a runtime index), so the
// arrays stay in registers rather than local memory.
__device__ __forceinline__ void normals4(uint64_t seed, uint64_t stream_id, uint64_t base,
                                         float z[4]) {
  const uint64_t block = base >> 2;
  const unsigned shift = unsigned(base & 3);
  float a[4];
  box_muller4(philox_block(seed, stream_id, block), a);
  if (shift == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) z[k] = a[k];
    return;
  }
  float b[4];
  box_muller4(philox_block(seed, stream_id, block + 1), b);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const unsigned i = shift + unsigned(k);  // 1..6: a[i] for i < 4, else b[i - 4]
    float v = b[2];
#pragma unroll
    for (unsigned c = 0; c < 6; ++c) {
      if (i == c + 1) v = c + 1 < 4 ? a[c + 1] : b[c - 3];
    }
    z[k] = v;
  }
}

// Grid-stride loop over the Philox blocks of [0, total): calls f(i, z) for every i < total with
// z = normal(seed, stream_id, i). Each thread generates one block (4 normals) in registers at a
// time, so the noise is never written.
template <typename F>
__device__ __forceinline__ void for_each_normal(int64_t total, uint64_t seed, uint64_t stream_id,
                                                F&& f) {
  const int64_t n_blocks = (total + 3) / 4;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < n_blocks;
       b += int64_t(gridDim.x) * blockDim.x) {
    float z[4];
    box_muller4(philox_block(seed, stream_id, uint64_t(b)), z);
    for (int k = 0; k < 4; ++k) {
      const int64_t i = b * 4 + k;
      if (i >= total) break;
      f(i, z[k]);
    }
  }
}

// Calls f.template operator()<T>() with T the C++ type of dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f.template operator()<float>();
    case DType::kFloat64: return f.template operator()<double>();
    case DType::kFloat16: return f.template operator()<__half>();
    case DType::kBFloat16: return f.template operator()<__nv_bfloat16>();
  }
  return cudaErrorInvalidValue;
}

// Calls f.template operator()<V>() with V == v, for a v in [Lo, Hi] (else cudaErrorInvalidValue):
// turns a small runtime count (rows, widths) into a template parameter, so that per-row or
// per-width arrays in the kernels are registers.
template <int Lo, int Hi, typename F>
cudaError_t dispatch_int(int64_t v, F&& f) {
  if constexpr (Lo > Hi) {
    return cudaErrorInvalidValue;
  } else {
    if (v == Lo) return f.template operator()<Lo>();
    return dispatch_int<Lo + 1, Hi>(v, f);
  }
}

}  // namespace cuda
}  // namespace bnn_fast
