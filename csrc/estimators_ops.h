// The "local" and "flipout" Bayesian linear operators, written once for both devices.
//
// Each is a few GEMMs (ATen: MKL/OpenBLAS on the CPU, cuBLAS on CUDA) around fused elementwise
// passes that generate the contract's noise in registers and consume it at once; nothing
// noise-sized is written except where a GEMM needs its operand. A device supplies the passes as
// the static members of a `Kernels` class (cpu/estimators.cpp, cuda/estimators.cpp):
//
//   check_dtype(x, op)                            the dtypes the device's passes support
//   sample(mu, log_sigma, S, seed, stream, op)    [S, *shape] = mu + sigma * eps (undefined mu: 0)
//   local_combine(mean, var, y, seed)             y[s, r] = mean[x(s), r] + sqrt(var[x(s), r]) * eps2
//   local_grads(g, var, gm, gv, seed)             gm[x, r] = sum g[s, r], gv[x, r] = sum g eps2 / (2 std)
//   apply_signs(src, dst, seed, stream)           dst[s, r] = src[x(s), r] * sign(eps_stream)
//   flipout_combine(mean, y, bias, seed)          y[s, n, o] = mean[x(s), n, o] + y * sign(eps4) + bias[s, o]
//   normal(n, seed, stream, like)                 float32 noise [n]
//   kSaveDelta                                    whether flipout keeps sigma * eps for its backward
//
// x(s) is s when the tensor holds S samples and 0 when it holds one (broadcast input); the
// sample's noise index is s * R + r (R elements per sample), as the RNG contract prescribes.
// Streams: weight 0, bias 1, local output 2, flipout input signs 3, output signs 4.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "bias_grads.h"
#include "checks.h"

namespace bnn_fast {
namespace estimators {

constexpr uint64_t kWeightStream = 0;
constexpr uint64_t kBiasStream = 1;
constexpr uint64_t kLocalStream = 2;
constexpr uint64_t kInputSignStream = 3;
constexpr uint64_t kOutputSignStream = 4;

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_grad_out(const char* op, const at::Tensor& grad, int64_t S, int64_t N,
                           int64_t out) {
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(0) == S && grad.size(1) == N && grad.size(2) == out,
                    op, ": grad_out must have shape [", S, ", ", N, ", ", out, "], got ",
                    grad.sizes());
}

// x [X, N, in] -> [X * N, in] (X is 1 or S): sums over samples and rows become one GEMM's K.
inline at::Tensor rows(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// ---- local reparameterization ----------------------------------------------------------------

// y = x mu^T + b_mu + sqrt(x^2 (sigma^2)^T + sigma_b^2) * eps, eps of stream 2 at index
// (s * N + n) * out + o. Returns (y [S, N, out], var [X, N, out]); var is kept for the backward.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> local_forward(const at::Tensor& x_in, const at::Tensor& w_mu,
                                                 const at::Tensor& w_ls,
                                                 const std::optional<at::Tensor>& b_mu,
                                                 const std::optional<at::Tensor>& b_ls,
                                                 int64_t seed, int64_t n_samples) {
  BNN_NO_AUTOCAST();
  const char* op = "bayes_linear_local";
  check_bayes_linear_args(x_in, w_mu, w_ls, b_mu, b_ls, n_samples, op);
  Kernels::check_dtype(x_in, op);
  const int64_t S = n_samples, N = x_in.size(1), out = w_mu.size(0);
  const at::Tensor x = x_in.contiguous();
  // With a broadcast x (X = 1) both GEMMs run once for all S samples.
  at::Tensor mean = at::matmul(x, w_mu.t());
  at::Tensor var = at::matmul(x * x, at::exp(w_ls * 2).t());
  if (b_mu.has_value()) {
    mean.add_(*b_mu);
    var.add_(at::exp(*b_ls * 2));
  }
  mean = mean.contiguous();
  var = var.contiguous();
  at::Tensor y = at::empty({S, N, out}, x.options());
  Kernels::local_combine(mean, var, y, uint64_t(seed));
  return {y, var};
}

template <class Kernels>
Grads local_backward(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& w_mu_in,
                     const at::Tensor& w_ls, const std::optional<at::Tensor>& b_ls,
                     const at::Tensor& var_in, int64_t seed, int64_t n_samples,
                     std::array<bool, 5> mask) {
  BNN_NO_AUTOCAST();
  const char* op = "bayes_linear_local_backward";
  check_linear_backward_args(op, x_in, w_mu_in, w_ls, b_ls, n_samples);
  const int64_t S = n_samples, X = x_in.size(0), N = x_in.size(1), in = x_in.size(2);
  const int64_t out = w_mu_in.size(0);
  check_grad_out(op, grad, S, N, out);
  TORCH_CHECK_VALUE(var_in.dim() == 3 && var_in.size(0) == X && var_in.size(1) == N &&
                        var_in.size(2) == out,
                    op, ": var must have shape [", X, ", ", N, ", ", out, "], got ", var_in.sizes());
  check_same_dtype(op, "var", var_in, w_mu_in);  // read by the kernels as weight_mu's dtype
  check_same_device(op, "var", var_in, w_mu_in);
  const auto opts = w_mu_in.options();
  const at::Tensor g = grad.to(w_mu_in.scalar_type()).contiguous();
  const at::Tensor var = var_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w_mu = w_mu_in.contiguous();
  const auto none = [&] { return at::empty({0}, opts); };
  at::Tensor gx = none(), gmu = none(), gls = none(), gbmu = none(), gbls = none();

  // d loss / d mean and d loss / d var, summed over the samples that share an input row.
  at::Tensor gm = at::empty({X, N, out}, opts), gv = at::empty({X, N, out}, opts);
  Kernels::local_grads(g, var, gm, gv, uint64_t(seed));
  const at::Tensor xr = rows(x), gmr = rows(gm), gvr = rows(gv);
  const at::Tensor w_var = at::exp(w_ls * 2);
  if (mask[0]) {  // d mean / dx = mu, d var / dx = 2 x sigma^2
    gx = at::addcmul(at::mm(gmr, w_mu), xr * 2, at::mm(gvr, w_var)).view({X, N, in});
  }
  if (mask[1]) gmu = at::mm(gmr.t(), xr);
  if (mask[2]) gls = at::mm(gvr.t(), xr * xr).mul_(w_var).mul_(2);  // d sigma^2 / d log_sigma
  if (b_ls.has_value()) {
    if (mask[3]) gbmu = gmr.sum(0);
    if (mask[4]) gbls = gvr.sum(0).mul_(at::exp(*b_ls * 2)).mul_(2);
  }
  return {gx, gmu, gls, gbmu, gbls};
}

// ---- flipout -----------------------------------------------------------------------------------

// y_s = x_s mu^T + ((x_s * s_in) (sigma * eps_s)^T) * s_out + b_mu + sigma_b * eps_b: one
// weight perturbation per sample (stream 0, index s * out * in + j), its signs per row (streams
// 3 and 4, indexed like x_s and y_s), the bias noise of stream 1. Returns (y [S, N, out], saved):
// saved is the perturbation [S, out, in] where the device keeps it, else empty.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> flipout_forward(const at::Tensor& x_in, const at::Tensor& w_mu,
                                                   const at::Tensor& w_ls,
                                                   const std::optional<at::Tensor>& b_mu,
                                                   const std::optional<at::Tensor>& b_ls,
                                                   int64_t seed, int64_t n_samples) {
  BNN_NO_AUTOCAST();
  const char* op = "bayes_linear_flipout";
  check_bayes_linear_args(x_in, w_mu, w_ls, b_mu, b_ls, n_samples, op);
  Kernels::check_dtype(x_in, op);
  const int64_t S = n_samples, N = x_in.size(1), in = w_mu.size(1);
  const uint64_t sd = uint64_t(seed);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor delta = Kernels::sample(at::Tensor(), w_ls.contiguous(), S, sd, kWeightStream, op);
  at::Tensor xs = at::empty({S, N, in}, x.options());
  Kernels::apply_signs(x, xs, sd, kInputSignStream);
  at::Tensor y = at::bmm(xs, delta.transpose(1, 2));  // [S, N, out], the perturbation's product
  xs.reset();
  const at::Tensor mean = at::matmul(x, w_mu.t()).contiguous();  // [X, N, out]
  const at::Tensor bias = b_mu.has_value()
                              ? Kernels::sample(b_mu->contiguous(), b_ls->contiguous(), S, sd,
                                                kBiasStream, op)
                              : at::Tensor();
  Kernels::flipout_combine(mean, y, bias, sd);
  return {y, Kernels::kSaveDelta ? delta : at::empty({0}, x.options())};
}

template <class Kernels>
Grads flipout_backward(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& w_mu_in,
                       const at::Tensor& w_ls, const std::optional<at::Tensor>& b_ls,
                       const at::Tensor& saved, int64_t seed, int64_t n_samples,
                       std::array<bool, 5> mask) {
  BNN_NO_AUTOCAST();
  const char* op = "bayes_linear_flipout_backward";
  check_linear_backward_args(op, x_in, w_mu_in, w_ls, b_ls, n_samples);
  const int64_t S = n_samples, X = x_in.size(0), N = x_in.size(1), in = x_in.size(2);
  const int64_t out = w_mu_in.size(0);
  const uint64_t sd = uint64_t(seed);
  check_grad_out(op, grad, S, N, out);
  const auto opts = w_mu_in.options();
  const at::Tensor g = grad.to(w_mu_in.scalar_type()).contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w_mu = w_mu_in.contiguous();
  const auto none = [&] { return at::empty({0}, opts); };
  at::Tensor gx = none(), gmu = none(), gls = none(), gbmu = none(), gbls = none();

  at::Tensor delta;  // sigma * eps [S, out, in]: kept by the forward, or regenerated
  at::Tensor gp;     // g * s_out: the gradient of the perturbation's product
  if (mask[0] || mask[2]) {
    if (saved.numel() > 0) {
      TORCH_CHECK_VALUE(saved.dim() == 3 && saved.size(0) == S && saved.size(1) == out &&
                            saved.size(2) == in,
                        op, ": saved must be the perturbation [", S, ", ", out, ", ", in,
                        "], got ", saved.sizes());
      delta = saved.contiguous();
    } else {
      delta = Kernels::sample(at::Tensor(), w_ls.contiguous(), S, sd, kWeightStream, op);
    }
    gp = at::empty_like(g);
    Kernels::apply_signs(g, gp, sd, kOutputSignStream);
  }
  // A broadcast x receives the sum over samples.
  const at::Tensor g_rows = X == 1 ? g.sum(0, /*keepdim=*/true) : g;  // [X, N, out]
  if (mask[0]) {
    at::Tensor t = at::bmm(gp, delta);  // [S, N, in]
    Kernels::apply_signs(t, t, sd, kInputSignStream);
    gx = at::matmul(g_rows, w_mu).add_(X == 1 ? t.sum(0, /*keepdim=*/true) : t);
  }
  if (mask[1]) gmu = at::mm(rows(g_rows).t(), rows(x));
  if (mask[2]) {
    at::Tensor xs = at::empty({S, N, in}, x.options());
    Kernels::apply_signs(x, xs, sd, kInputSignStream);
    at::Tensor d_delta = at::bmm(gp.transpose(1, 2), xs);  // [S, out, in]
    xs.reset();
    gls = d_delta.mul_(delta).sum(0);  // d delta / d log_sigma = delta
  }
  if (b_ls.has_value()) {
    sampled_bias_grads(g, *b_ls, mask[3], mask[4],
                       [&] { return Kernels::normal(S * out, sd, kBiasStream, g); }, gbmu, gbls);
  }
  return {gx, gmu, gls, gbmu, gbls};
}

}  // namespace estimators
}  // namespace bnn_fast
