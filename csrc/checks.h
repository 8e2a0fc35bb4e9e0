// Argument checks shared by the CPU and CUDA glue: each error names the operator and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "mlp.h"

namespace bnn_fast {

// Held by every kernel entry that calls ATen operators. The bnn_fast operators have no Autocast
// kernel: under torch.autocast the Autocast key falls through to them and stays in the thread's
// included set, so at::bmm, at::exp, ... inside a kernel would run in half or bfloat16 while the
// raw-pointer code reads their results as the input's dtype. (The layers cast their inputs to
// the autocast dtype before calling; this matters for direct calls of the operators.)
#define BNN_NO_AUTOCAST() \
  const c10::impl::ExcludeDispatchKeyGuard bnn_no_autocast_(c10::autocast_dispatch_keyset)

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
                    " like the other arguments, got ", t.device());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
                   ref.scalar_type(), " like the other arguments, got ", t.scalar_type());
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name,
                    " ", ref.sizes(), ", got ", t.sizes());
}

// The kernels index raw pointers: a contiguous copy of each tensor that is not already one.
inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

inline void check_gaussian_kl_args(at::TensorList mu, at::TensorList log_sigma) {
  const char* op = "gaussian_kl";
  TORCH_CHECK_VALUE(mu.size() == log_sigma.size(), op, ": mu and log_sigma must be lists of the "
                    "same length, got ", mu.size(), " and ", log_sigma.size());
  TORCH_CHECK_VALUE(!mu.empty(), op, ": mu must hold at least one tensor");
  const at::Tensor& ref = mu[0];
  TORCH_CHECK_TYPE(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op,
                   ": mu[0] must be float32 or float64, got ", ref.scalar_type());
  for (size_t i = 0; i < mu.size(); ++i) {
    const std::string mi = "mu[" + std::to_string(i) + "]";
    const std::string li = "log_sigma[" + std::to_string(i) + "]";
    check_same_device(op, mi.c_str(), mu[i], ref);
    check_same_device(op, li.c_str(), log_sigma[i], ref);
    check_same_dtype(op, mi.c_str(), mu[i], ref);
    check_same_dtype(op, li.c_str(), log_sigma[i], ref);
    check_same_shape(op, li.c_str(), log_sigma[i], mu[i], mi.c_str());
  }
}

// sample_gaussian (CPU and CUDA): log_sigma floating-point, mu (when given) of its dtype, shape
// and device, n_samples >= 0. The dtypes each device has a kernel for are checked by its glue.
inline void check_sample_gaussian_args(const std::optional<at::Tensor>& mu,
                                       const at::Tensor& log_sigma, int64_t n_samples) {
  const char* op = "sample_gaussian";
  TORCH_CHECK_TYPE(at::isFloatingType(log_sigma.scalar_type()), op,
                   ": log_sigma must be a floating-point tensor, got ", log_sigma.scalar_type());
  TORCH_CHECK_VALUE(n_samples >= 0, op, ": n_samples must be >= 0, got ", n_samples);
  if (mu.has_value()) {
    check_same_dtype(op, "mu", *mu, log_sigma);
    check_same_shape(op, "mu", *mu, log_sigma, "log_sigma");
    check_same_device(op, "mu", *mu, log_sigma);
  }
}

// sample_gaussian_backward: grad of shape [n_samples, *log_sigma.shape], dtype and device of
// log_sigma.
inline void check_sample_gaussian_backward_args(const at::Tensor& grad,
                                                const at::Tensor& log_sigma, int64_t n_samples) {
  const char* op = "sample_gaussian_backward";
  TORCH_CHECK_TYPE(at::isFloatingType(log_sigma.scalar_type()), op,
                   ": log_sigma must be a floating-point tensor, got ", log_sigma.scalar_type());
  TORCH_CHECK_VALUE(n_samples >= 0, op, ": n_samples must be >= 0, got ", n_samples);
  std::vector<int64_t> shape{n_samples};
  shape.insert(shape.end(), log_sigma.sizes().begin(), log_sigma.sizes().end());
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(shape), op, ": grad must have shape ",
                    at::IntArrayRef(shape), " ([n_samples, *log_sigma.shape]), got ", grad.sizes());
  check_same_dtype(op, "grad", grad, log_sigma);
  check_same_device(op, "grad", grad, log_sigma);
}

// `layer` > 0 numbers the parameters (weight1_mu, ...) for operators that take two layers.
inline void check_bayes_linear_args(const at::Tensor& x, const at::Tensor& w_mu,
                                    const at::Tensor& w_ls,
                                    const std::optional<at::Tensor>& b_mu,
                                    const std::optional<at::Tensor>& b_ls, int64_t n_samples,
                                    const char* op = "bayes_linear", int layer = 0) {
  const std::string n = layer > 0 ? std::to_string(layer) : "";
  const std::string wm = "weight" + n + "_mu", wl = "weight" + n + "_log_sigma";
  const std::string bm = "bias" + n + "_mu", bl = "bias" + n + "_log_sigma";
  TORCH_CHECK_VALUE(n_samples >= 1, op, ": n_samples must be >= 1, got ", n_samples);
  TORCH_CHECK_VALUE(w_mu.dim() == 2, op, ": ", wm, " must be 2-D [out_features, in_features], got ",
                    w_mu.sizes());
  check_same_shape(op, wl.c_str(), w_ls, w_mu, wm.c_str());
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be 3-D [n_samples or 1, N, in_features], got ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.size(0) == 1 || x.size(0) == n_samples, op,
                    ": x.size(0) must be 1 or n_samples (", n_samples, "), got ", x.size(0));
  TORCH_CHECK_VALUE(x.size(2) == w_mu.size(1), op, ": x must have last dim ", w_mu.size(1),
                    " (in_features", n.empty() ? "" : " of layer " + n, "), got ", x.size(2));
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": x must be a floating-point tensor, got ", x.scalar_type());
  check_same_dtype(op, wm.c_str(), w_mu, x);
  check_same_dtype(op, wl.c_str(), w_ls, x);
  check_same_device(op, wm.c_str(), w_mu, x);
  check_same_device(op, wl.c_str(), w_ls, x);
  TORCH_CHECK_VALUE(b_mu.has_value() == b_ls.has_value(), op, ": ", bm, " and ", bl,
                    " must be given together");
  if (b_mu.has_value()) {
    TORCH_CHECK_VALUE(b_mu->dim() == 1 && b_mu->size(0) == w_mu.size(0), op, ": ", bm,
                      " must have shape [", w_mu.size(0), "] (out_features), got ",
                      b_mu->sizes());
    check_same_shape(op, bl.c_str(), *b_ls, *b_mu, bm.c_str());
    check_same_dtype(op, bm.c_str(), *b_mu, x);
    check_same_dtype(op, bl.c_str(), *b_ls, x);
    check_same_device(op, bm.c_str(), *b_mu, x);
    check_same_device(op, bl.c_str(), *b_ls, x);
  }
}

// The backward operators of the fused linears (reparam, local, flipout): the tensors the forward
// checked, checked again, since a direct call can pass any; the kernels read weight_log_sigma,
// bias_log_sigma and x through raw pointers sized by weight_mu. grad_out and saved are each
// operator's own.
inline void check_linear_backward_args(const char* op, const at::Tensor& x, const at::Tensor& w_mu,
                                       const at::Tensor& w_ls,
                                       const std::optional<at::Tensor>& b_ls, int64_t n_samples) {
  TORCH_CHECK_VALUE(n_samples >= 1, op, ": n_samples must be >= 1, got ", n_samples);
  TORCH_CHECK_VALUE(w_mu.dim() == 2, op, ": weight_mu must be 2-D [out_features, in_features], got ",
                    w_mu.sizes());
  check_same_shape(op, "weight_log_sigma", w_ls, w_mu, "weight_mu");
  check_same_dtype(op, "weight_log_sigma", w_ls, w_mu);
  check_same_device(op, "weight_log_sigma", w_ls, w_mu);
  TORCH_CHECK_VALUE(x.dim() == 3 && (x.size(0) == 1 || x.size(0) == n_samples) &&
                        x.size(2) == w_mu.size(1),
                    op, ": x must have shape [1 or ", n_samples, ", N, ", w_mu.size(1), "], got ",
                    x.sizes());
  check_same_dtype(op, "x", x, w_mu);
  check_same_device(op, "x", x, w_mu);
  if (b_ls.has_value()) {
    TORCH_CHECK_VALUE(b_ls->dim() == 1 && b_ls->size(0) == w_mu.size(0), op,
                      ": bias_log_sigma must have shape [", w_mu.size(0), "] (out_features), got ",
                      b_ls->sizes());
    check_same_dtype(op, "bias_log_sigma", *b_ls, w_mu);
    check_same_device(op, "bias_log_sigma", *b_ls, w_mu);
  }
}

// bayes_mlp_inference / bayes_mlp / bayes_mlp_backward (CPU and CUDA): both layers' arguments,
// the dtype (float32 or float64) and the fused kernels' width limits (mlp.h). Returns (in,
// hidden, out).
inline std::array<int64_t, 3> check_mlp_args(const char* op, const at::Tensor& x,
                                             const at::Tensor& w1_mu, const at::Tensor& w1_ls,
                                             const std::optional<at::Tensor>& b1_mu,
                                             const std::optional<at::Tensor>& b1_ls,
                                             const at::Tensor& w2_mu, const at::Tensor& w2_ls,
                                             const std::optional<at::Tensor>& b2_mu,
                                             const std::optional<at::Tensor>& b2_ls,
                                             int64_t n_samples) {
  check_bayes_linear_args(x, w1_mu, w1_ls, b1_mu, b1_ls, n_samples, op, 1);
  TORCH_CHECK_VALUE(w2_mu.dim() == 2 && w2_mu.size(1) == w1_mu.size(0), op,
                    ": weight2_mu must be 2-D [out_features, ", w1_mu.size(0),
                    "] (layer 2's in_features = layer 1's out_features), got ", w2_mu.sizes());
  // Layer 2's parameters, checked against a stand-in for its input (the hidden activations).
  check_bayes_linear_args(at::empty({1, 0, w2_mu.size(1)}, x.options()), w2_mu, w2_ls, b2_mu,
                          b2_ls, n_samples, op, 2);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64, got ", x.scalar_type());
  const int64_t in = w1_mu.size(1), hidden = w1_mu.size(0), out = w2_mu.size(0);
  TORCH_CHECK_VALUE(in <= kMlpMaxIn && out <= kMlpMaxOut, op,
                    ": the fused kernel takes in_features <= ", kMlpMaxIn,
                    " and out_features <= ", kMlpMaxOut, ", got ", in, " and ", out,
                    " (run the layers one by one instead)");
  return {in, hidden, out};
}

}  // namespace bnn_fast
