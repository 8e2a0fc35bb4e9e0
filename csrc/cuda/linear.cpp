// bayes_linear on CUDA: checks, then the fused small-batch kernel (N <= fused_max_rows(in * out)) or one
// sampling pass plus cuBLAS through ATen. The backward rebuilds W from (seed, stream) into a
// temporary for grad_x and regenerates the noise inside the weight-gradient kernel, so the
// forward saves nothing weight-sized.
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>

#include "bias_grads.h"
#include "checks.h"
#include "cuda/glue.h"

namespace bnn_fast {
namespace cuda {
namespace {

// The fused small-batch kernel runs for 1 <= N <= fused_max_rows(weights). Measured on an H200
// (benchmarks/bench_linear.py, the GPU crossover table): at 4096x4096 the fused kernel is 1.1x
// faster up to 8 rows, even at 12 and 0.8x at 16 (it is bound by generating the noise, while the
// GEMM path reads the weight twice more); at 1024x1024, where both are launch-bound, it is 1.9-3.5x
// faster up to 16 rows. So: up to 16 rows for at most 2^22 weights (between the two measured
// sizes), else up to 8. BNN_FAST_CUDA_FUSED_MAX_ROWS (read on every call, clamped to [0,
// kFusedMaxRows]; 0 always takes the sample-then-GEMM path) overrides it.
int64_t fused_max_rows(int64_t weights) {
  const char* env = std::getenv("BNN_FAST_CUDA_FUSED_MAX_ROWS");
  if (env != nullptr && *env != '\0') {
    return std::clamp<int64_t>(std::strtoll(env, nullptr, 10), 0, kFusedMaxRows);
  }
  return weights <= (int64_t(1) << 22) ? kFusedMaxRows : 8;
}

std::tuple<at::Tensor, at::Tensor> bayes_linear_cuda(const at::Tensor& x_in,
                                                     const at::Tensor& w_mu_in,
                                                     const at::Tensor& w_ls_in,
                                                     const std::optional<at::Tensor>& b_mu_in,
                                                     const std::optional<at::Tensor>& b_ls_in,
                                                     int64_t seed, int64_t n_samples) {
  BNN_NO_AUTOCAST();
  check_bayes_linear_args(x_in, w_mu_in, w_ls_in, b_mu_in, b_ls_in, n_samples);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const DType dt = to_dtype(x_in.scalar_type(), "bayes_linear", "x");
  const int64_t S = n_samples, N = x_in.size(1), in = w_mu_in.size(1), out = w_mu_in.size(0);
  const at::Tensor w_mu = w_mu_in.contiguous(), w_ls = w_ls_in.contiguous();
  const bool has_bias = b_mu_in.has_value();
  const at::Tensor b_mu = has_bias ? b_mu_in->contiguous() : at::Tensor();
  const at::Tensor b_ls = has_bias ? b_ls_in->contiguous() : at::Tensor();
  const at::Tensor saved = at::empty({0}, x_in.options());
  if (N >= 1 && N <= fused_max_rows(in * out)) {
    const at::Tensor x = x_in.contiguous();
    at::Tensor y = at::empty({S, N, out}, x.options());
    BNN_CUDA_CHECK("bayes_linear",
                   launch_linear_fused_small_batch(
                       dt, x.const_data_ptr(), w_mu.const_data_ptr(), w_ls.const_data_ptr(),
                       has_bias ? b_mu.const_data_ptr() : nullptr,
                       has_bias ? b_ls.const_data_ptr() : nullptr, y.mutable_data_ptr(), x.size(0),
                       S, N, in, out, uint64_t(seed), current_stream()));
    return {y, saved};
  }
  const at::Tensor w = sample(w_mu, w_ls, S, uint64_t(seed), 0, "bayes_linear");
  const at::Tensor xs = x_in.expand({S, N, in});  // batch stride 0 when broadcast: no copy
  if (!has_bias) return {at::bmm(xs, w.transpose(1, 2)), saved};
  const at::Tensor b = sample(b_mu, b_ls, S, uint64_t(seed), 1, "bayes_linear");
  return {at::baddbmm(b.unsqueeze(1), xs, w.transpose(1, 2)), saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bayes_linear_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& w_mu_in,
    const at::Tensor& w_ls_in, const std::optional<at::Tensor>& b_ls, const at::Tensor& saved,
    int64_t seed, int64_t n_samples, std::array<bool, 5> mask) {
  BNN_NO_AUTOCAST();
  check_linear_backward_args("bayes_linear_backward", x, w_mu_in, w_ls_in, b_ls, n_samples);
  // Optional: a CPU x (a CUDA weight) gets the shape and device checks' error, not the guard's.
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  const int64_t S = n_samples, N = x.size(1), in = w_mu_in.size(1), out = w_mu_in.size(0);
  TORCH_CHECK_VALUE(grad_in.dim() == 3 && grad_in.size(0) == S && grad_in.size(1) == N &&
                        grad_in.size(2) == out,
                    "bayes_linear_backward: grad_out must have shape [", S, ", ", N, ", ", out,
                    "], got ", grad_in.sizes());
  const DType dt = to_dtype(w_mu_in.scalar_type(), "bayes_linear_backward", "weight_mu");
  const at::Tensor dy = grad_in.contiguous().to(w_mu_in.scalar_type());
  const at::Tensor w_mu = w_mu_in.contiguous(), w_ls = w_ls_in.contiguous();
  const auto opts = w_mu.options();
  const auto none = [&] { return at::empty({0}, opts); };
  at::Tensor gx = none(), gmu = none(), gls = none(), gbmu = none(), gbls = none();
  if (mask[0]) {
    const at::Tensor w = sample(w_mu, w_ls, S, uint64_t(seed), 0, "bayes_linear");  // a temporary, not saved
    gx = x.size(0) == 1
             ? at::mm(dy.transpose(0, 1).reshape({N, S * out}), w.view({S * out, in})).unsqueeze(0)
             : at::bmm(dy, w);
  }
  if (mask[1] || mask[2]) {
    const at::Tensor dw = at::bmm(dy.transpose(1, 2), x.expand({S, N, in}));  // [S, out, in]
    // One sample: dW itself is grad_mu, so the kernel writes grad_log_sigma alone and the step
    // holds two weight-sized buffers (the two gradients) instead of three.
    gmu = S == 1 ? dw.view_as(w_mu) : at::empty_like(w_mu);
    gls = at::empty_like(w_mu);
    BNN_CUDA_CHECK("bayes_linear_backward",
                   launch_weight_grads(dt, dw.const_data_ptr(), w_ls.const_data_ptr(),
                                       S == 1 ? nullptr : gmu.mutable_data_ptr(),
                                       gls.mutable_data_ptr(), w_mu.numel(), S, uint64_t(seed), 0,
                                       current_stream()));
  }
  if (b_ls.has_value()) {
    sampled_bias_grads(dy, *b_ls, mask[3], mask[4], [&] {
      at::Tensor eps = at::empty({S * out}, opts.dtype(at::kFloat));
      BNN_CUDA_CHECK("bayes_linear_backward",
                     launch_fill_normal(eps.mutable_data_ptr<float>(), S * out, uint64_t(seed), 1,
                                        0, current_stream()));
      return eps;
    }, gbmu, gbls);
  }
  return {gx, gmu, gls, gbmu, gbls};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CUDA, m) {
  m.impl("bayes_linear", &bayes_linear_cuda);
  m.impl("bayes_linear_inference",
         [](const at::Tensor& x, const at::Tensor& w_mu, const at::Tensor& w_ls,
            const std::optional<at::Tensor>& b_mu, const std::optional<at::Tensor>& b_ls,
            int64_t seed, int64_t n_samples) {
           // The forward saves nothing weight-sized on CUDA already.
           return std::get<0>(bayes_linear_cuda(x, w_mu, w_ls, b_mu, b_ls, seed, n_samples));
         });
  m.impl("bayes_linear_backward", &bayes_linear_backward_cuda);
}

}  // namespace cuda
}  // namespace bnn_fast
