// The "local" and "flipout" operators on CUDA: the elementwise passes of estimators_ops.h as
// launches of cuda/estimators_kernel.cu on the current stream, under a device guard. The flipout
// backward regenerates the perturbation sigma * eps instead of saving it.
#include <torch/library.h>

#include <limits>

#include "cuda/glue.h"
#include "estimators_ops.h"

namespace bnn_fast {
namespace cuda {
namespace {

// The variance floor: the smallest normal number of the type the kernels compute in (float for
// float32, float16 and bfloat16; double for float64). float16's own (6.1e-5) would pin the output
// std at 7.8e-3 and zero the gradient to log_sigma below it.
double tiny_of(at::ScalarType t) {
  return t == at::kDouble ? std::numeric_limits<double>::min()
                          : double(std::numeric_limits<float>::min());
}

int64_t per_sample(const at::Tensor& t) { return t.size(0) == 0 ? 0 : t.numel() / t.size(0); }

struct CudaKernels {
  static constexpr bool kSaveDelta = false;  // regenerated from (seed, stream 0) in the backward

  static void check_dtype(const at::Tensor& x, const char* op) {
    (void)to_dtype(x.scalar_type(), op, "x");
  }

  static at::Tensor sample(const at::Tensor& mu, const at::Tensor& ls, int64_t S, uint64_t seed,
                           uint64_t stream, const char* op) {
    return cuda::sample(mu, ls, S, seed, stream, op);
  }

  static at::Tensor normal(int64_t n, uint64_t seed, uint64_t stream, const at::Tensor& like) {
    at::Tensor out = at::empty({n}, like.options().dtype(at::kFloat));
    // The bias noise of either estimator's backward.
    BNN_CUDA_CHECK("bayes_linear_local/flipout_backward (bias noise)",
                   launch_fill_normal(out.mutable_data_ptr<float>(), n, seed, stream, 0,
                                      current_stream()));
    return out;
  }

  static void local_combine(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& y,
                            uint64_t seed) {
    BNN_CUDA_CHECK("bayes_linear_local",
                   launch_local_combine(to_dtype(y.scalar_type(), "bayes_linear_local", "x"),
                                        mean.const_data_ptr(), var.const_data_ptr(),
                                        y.mutable_data_ptr(), mean.size(0), y.size(0),
                                        per_sample(y), seed, tiny_of(y.scalar_type()),
                                        current_stream()));
  }

  static void local_grads(const at::Tensor& g, const at::Tensor& var, const at::Tensor& gm,
                          const at::Tensor& gv, uint64_t seed) {
    const char* op = "bayes_linear_local_backward";
    BNN_CUDA_CHECK(op, launch_local_grads(to_dtype(g.scalar_type(), op, "grad_out"),
                                          g.const_data_ptr(), var.const_data_ptr(),
                                          gm.mutable_data_ptr(), gv.mutable_data_ptr(),
                                          var.size(0), g.size(0), per_sample(g), seed,
                                          tiny_of(g.scalar_type()), current_stream()));
  }

  static void apply_signs(const at::Tensor& src, const at::Tensor& dst, uint64_t seed,
                          uint64_t stream) {
    const char* op = "bayes_linear_flipout";
    BNN_CUDA_CHECK(op, launch_apply_signs(to_dtype(dst.scalar_type(), op, "x"),
                                          src.const_data_ptr(), dst.mutable_data_ptr(),
                                          src.size(0), dst.size(0), per_sample(dst), seed, stream,
                                          current_stream()));
  }

  static void flipout_combine(const at::Tensor& mean, const at::Tensor& y, const at::Tensor& bias,
                              uint64_t seed) {
    const char* op = "bayes_linear_flipout";
    BNN_CUDA_CHECK(op, launch_flipout_combine(to_dtype(y.scalar_type(), op, "x"),
                                              mean.const_data_ptr(), y.mutable_data_ptr(),
                                              bias.defined() ? bias.const_data_ptr() : nullptr,
                                              mean.size(0), y.size(0), per_sample(y), y.size(2),
                                              seed, current_stream()));
  }
};

std::tuple<at::Tensor, at::Tensor> local_cuda(const at::Tensor& x, const at::Tensor& w_mu,
                                              const at::Tensor& w_ls,
                                              const std::optional<at::Tensor>& b_mu,
                                              const std::optional<at::Tensor>& b_ls, int64_t seed,
                                              int64_t n_samples) {
  const c10::OptionalDeviceGuard guard(at::device_of(x));  // a CPU x: the checks name it
  return estimators::local_forward<CudaKernels>(x, w_mu, w_ls, b_mu, b_ls, seed, n_samples);
}

estimators::Grads local_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                      const at::Tensor& w_mu, const at::Tensor& w_ls,
                                      const std::optional<at::Tensor>& b_ls, const at::Tensor& var,
                                      int64_t seed, int64_t n_samples, std::array<bool, 5> mask) {
  const c10::OptionalDeviceGuard guard(at::device_of(x));  // a CPU x: the checks name it
  return estimators::local_backward<CudaKernels>(grad, x, w_mu, w_ls, b_ls, var, seed, n_samples,
                                                 mask);
}

std::tuple<at::Tensor, at::Tensor> flipout_cuda(const at::Tensor& x, const at::Tensor& w_mu,
                                                const at::Tensor& w_ls,
                                                const std::optional<at::Tensor>& b_mu,
                                                const std::optional<at::Tensor>& b_ls,
                                                int64_t seed, int64_t n_samples) {
  const c10::OptionalDeviceGuard guard(at::device_of(x));  // a CPU x: the checks name it
  return estimators::flipout_forward<CudaKernels>(x, w_mu, w_ls, b_mu, b_ls, seed, n_samples);
}

estimators::Grads flipout_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& w_mu, const at::Tensor& w_ls,
                                        const std::optional<at::Tensor>& b_ls,
                                        const at::Tensor& saved, int64_t seed, int64_t n_samples,
                                        std::array<bool, 5> mask) {
  const c10::OptionalDeviceGuard guard(at::device_of(x));  // a CPU x: the checks name it
  return estimators::flipout_backward<CudaKernels>(grad, x, w_mu, w_ls, b_ls, saved, seed,
                                                   n_samples, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CUDA, m) {
  m.impl("bayes_linear_local", &local_cuda);
  m.impl("bayes_linear_local_backward", &local_backward_cuda);
  m.impl("bayes_linear_flipout", &flipout_cuda);
  m.impl("bayes_linear_flipout_backward", &flipout_backward_cuda);
}

}  // namespace cuda
}  // namespace bnn_fast
