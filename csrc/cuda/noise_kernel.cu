// The RNG contract on CUDA: each thread generates one Philox block (4 normals) and writes the ones
// inside [offset, offset + n). Global memory is written once, 4 floats per thread.
#include "cuda/common.cuh"
#include "philox.h"

namespace bnn_fast {
namespace cuda {
namespace {

__global__ void fill_normal_kernel(float* out, int64_t n, uint64_t seed, uint64_t stream_id,
                                   uint64_t offset) {
  const uint64_t first_block = offset >> 2;
  const uint64_t n_blocks = ((offset + uint64_t(n) + 3) >> 2) - first_block;
  for (uint64_t b = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; b < n_blocks;
       b += uint64_t(gridDim.x) * blockDim.x) {
    float z[4];
    box_muller4(philox_block(seed, stream_id, first_block + b), z);
    for (int k = 0; k < 4; ++k) {
      const uint64_t i = (first_block + b) * 4 + k;
      if (i >= offset && i < offset + uint64_t(n)) out[i - offset] = z[k];
    }
  }
}

}  // namespace

cudaError_t launch_fill_normal(float* out, int64_t n, uint64_t seed, uint64_t stream_id,
                               uint64_t offset, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + 3) / 4 + 1;
  fill_normal_kernel<<<grid_for(blocks), kThreads, 0, stream>>>(out, n, seed, stream_id, offset);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bnn_fast
