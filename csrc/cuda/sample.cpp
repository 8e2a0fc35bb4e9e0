// sample_gaussian on CUDA: the checks, then the kernels of cuda/linear_kernel.cu that sample the
// linears' weights. The forward is sample_kernel (one pass: reads mu and log_sigma, writes the S
// samples); the backward is weight_grads_kernel, which regenerates the noise from (seed, stream)
// while summing over the samples, so the forward saves nothing parameter-sized (grad_mu alone is
// a plain sum over the samples).
#include <torch/library.h>

#include <array>

#include "checks.h"
#include "cuda/glue.h"

namespace bnn_fast {
namespace cuda {
namespace {

at::Tensor sample_gaussian_cuda(const std::optional<at::Tensor>& mu_in,
                                const at::Tensor& log_sigma_in, int64_t seed, int64_t stream,
                                int64_t n_samples) {
  BNN_NO_AUTOCAST();
  check_sample_gaussian_args(mu_in, log_sigma_in, n_samples);
  to_dtype(log_sigma_in.scalar_type(), "sample_gaussian", "log_sigma");
  const c10::cuda::CUDAGuard guard(log_sigma_in.device());
  const at::Tensor mu = mu_in.has_value() ? mu_in->contiguous() : at::Tensor();
  return sample(mu, log_sigma_in.contiguous(), n_samples, uint64_t(seed), uint64_t(stream),
                "sample_gaussian");
}

std::tuple<at::Tensor, at::Tensor> sample_gaussian_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& log_sigma_in, int64_t seed, int64_t stream,
    int64_t n_samples, std::array<bool, 2> mask) {
  BNN_NO_AUTOCAST();
  check_sample_gaussian_backward_args(grad_in, log_sigma_in, n_samples);
  const DType dt = to_dtype(log_sigma_in.scalar_type(), "sample_gaussian_backward", "log_sigma");
  const c10::cuda::CUDAGuard guard(log_sigma_in.device());
  const auto opts = log_sigma_in.options();
  at::Tensor gmu = at::empty({0}, opts), gls = at::empty({0}, opts);
  if (!(mask[0] || mask[1])) return {gmu, gls};
  if (!mask[1]) return {grad_in.sum(0).contiguous(), gls};  // grad_mu alone needs no noise
  const at::Tensor grad = grad_in.contiguous();
  gls = at::empty(log_sigma_in.sizes(), opts);
  if (mask[0]) gmu = at::empty(log_sigma_in.sizes(), opts);
  const at::Tensor ls = log_sigma_in.contiguous();
  BNN_CUDA_CHECK("sample_gaussian_backward",
                 launch_weight_grads(dt, grad.const_data_ptr(), ls.const_data_ptr(),
                                     mask[0] ? gmu.mutable_data_ptr() : nullptr,
                                     gls.mutable_data_ptr(), ls.numel(), n_samples,
                                     uint64_t(seed), uint64_t(stream), current_stream()));
  return {gmu, gls};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CUDA, m) {
  m.impl("sample_gaussian", &sample_gaussian_cuda);
  m.impl("sample_gaussian_backward", &sample_gaussian_backward_cuda);
}

}  // namespace cuda
}  // namespace bnn_fast
