// fill_normal_ on CUDA.
#include <torch/library.h>

#include "cuda/glue.h"

namespace bnn_fast {
namespace cuda {
namespace {

void fill_normal_cuda(const at::Tensor& out, int64_t seed, int64_t stream, int64_t offset) {
  TORCH_CHECK_VALUE(out.is_contiguous(), "fill_normal_: out must be contiguous");
  TORCH_CHECK_VALUE(offset >= 0, "fill_normal_: offset must be >= 0, got ", offset);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  // The contract computes in float32 whatever the dtype, then casts.
  at::Tensor f = out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  BNN_CUDA_CHECK("fill_normal_", launch_fill_normal(f.mutable_data_ptr<float>(), f.numel(),
                                                    uint64_t(seed), uint64_t(stream),
                                                    uint64_t(offset), current_stream()));
  if (!f.is_same(out)) out.copy_(f);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CUDA, m) { m.impl("fill_normal_", &fill_normal_cuda); }

}  // namespace cuda
}  // namespace bnn_fast
