// Torch-side helpers of the CUDA glue files: dtype mapping, the launch check, sampling.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "cuda/launchers.h"

// Raises a Python RuntimeError naming the operator if a launch failed.
#define BNN_CUDA_CHECK(op, expr)                                                              \
  do {                                                                                        \
    const cudaError_t bnn_err = (expr);                                                       \
    TORCH_CHECK(bnn_err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(bnn_err)); \
  } while (0)

namespace bnn_fast {
namespace cuda {

inline DType to_dtype(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name,
                       " must be float32, float64, float16 or bfloat16 on CUDA, got ", t);
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// out[s, j] = mu[j] + exp(log_sigma[j]) * normal(seed, stream_id, s * numel + j), shape
// [n_samples, *log_sigma.shape]; an undefined mu means zero (the perturbation sigma * eps).
// mu and log_sigma: contiguous, on the current device.
inline at::Tensor sample(const at::Tensor& mu, const at::Tensor& log_sigma, int64_t n_samples,
                         uint64_t seed, uint64_t stream_id, const char* op) {
  std::vector<int64_t> shape{n_samples};
  shape.insert(shape.end(), log_sigma.sizes().begin(), log_sigma.sizes().end());
  at::Tensor out = at::empty(shape, log_sigma.options());
  BNN_CUDA_CHECK(op, launch_sample(to_dtype(log_sigma.scalar_type(), op, "weight_log_sigma"),
                                   mu.defined() ? mu.const_data_ptr() : nullptr,
                                   log_sigma.const_data_ptr(), out.mutable_data_ptr(),
                                   log_sigma.numel(), n_samples, seed, stream_id,
                                   current_stream()));
  return out;
}

}  // namespace cuda
}  // namespace bnn_fast
