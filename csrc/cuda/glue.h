// Torch-side helpers of the CUDA glue files: dtype mapping and the launch check.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"

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

}  // namespace cuda
}  // namespace bnn_fast

// Raises a Python RuntimeError naming the operator if a launch failed.
#define BNN_CUDA_CHECK(op, expr)                                                              \
  do {                                                                                        \
    const cudaError_t bnn_err = (expr);                                                       \
    TORCH_CHECK(bnn_err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(bnn_err)); \
  } while (0)
