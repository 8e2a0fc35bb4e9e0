// bayes_mlp_inference on CUDA (the kernel: cuda/mlp_kernel.cu). Samples both layers' weights for
// every sample as bayes_linear samples them (weights stream 0, biases stream 1 of each layer's
// seed), then runs the fused rows. float32 and float64, in_features <= 8, out_features <= 8.
#include <torch/library.h>

#include "checks.h"
#include "cuda/glue.h"

namespace bnn_fast {
namespace cuda {
namespace {

at::Tensor bayes_mlp_inference_cuda(const at::Tensor& x_in, const at::Tensor& w1_mu,
                                    const at::Tensor& w1_ls, const std::optional<at::Tensor>& b1_mu,
                                    const std::optional<at::Tensor>& b1_ls, int64_t seed1,
                                    const at::Tensor& w2_mu, const at::Tensor& w2_ls,
                                    const std::optional<at::Tensor>& b2_mu,
                                    const std::optional<at::Tensor>& b2_ls, int64_t seed2,
                                    int64_t n_samples) {
  BNN_NO_AUTOCAST();
  constexpr const char* op = "bayes_mlp_inference";
  const auto [in, hidden, out] = check_mlp_args(op, x_in, w1_mu, w1_ls, b1_mu, b1_ls, w2_mu,
                                                w2_ls, b2_mu, b2_ls, n_samples);
  const c10::OptionalDeviceGuard guard(at::device_of(x_in));
  const int64_t S = n_samples, N = x_in.size(1);
  const auto sampled = [&](const std::optional<at::Tensor>& mu, const std::optional<at::Tensor>& ls,
                           int64_t seed, uint64_t stream_id) {
    return mu.has_value() ? sample(mu->contiguous(), ls->contiguous(), S, uint64_t(seed), stream_id, op)
                          : at::Tensor();
  };
  const at::Tensor w1 = sampled(w1_mu, w1_ls, seed1, 0);  // [S, hidden, in]
  const at::Tensor b1 = sampled(b1_mu, b1_ls, seed1, 1);  // [S, hidden]
  const at::Tensor w2 = sampled(w2_mu, w2_ls, seed2, 0);  // [S, out, hidden]
  const at::Tensor b2 = sampled(b2_mu, b2_ls, seed2, 1);  // [S, out]
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({S, N, out}, x.options());
  if (y.numel() == 0) return y;
  BNN_CUDA_CHECK(op, launch_mlp_inference(
                         to_dtype(x.scalar_type(), op, "x"), x.const_data_ptr(),
                         w1.const_data_ptr(), b1.defined() ? b1.const_data_ptr() : nullptr,
                         w2.const_data_ptr(), b2.defined() ? b2.const_data_ptr() : nullptr,
                         y.mutable_data_ptr(), x.size(0), S, N, in, hidden, out,
                         current_stream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CUDA, m) { m.impl("bayes_mlp_inference", &bayes_mlp_inference_cuda); }

}  // namespace cuda
}  // namespace bnn_fast
