// The bias gradients shared by the fused linear operators (reparam and flipout), whose sample s
// adds the bias b_s = b_mu + exp(b_log_sigma) * eps_s, eps_s[o] = normal(seed, stream 1, s * out + o).
#pragma once

#include <ATen/ATen.h>

namespace bnn_fast {

// grad_out g: [S, N, out]. eps(): the bias noise, float32, S * out elements, called only when
// grad_log_sigma is needed. A gradient not needed is left as it is.
template <class Eps>
void sampled_bias_grads(const at::Tensor& g, const at::Tensor& b_log_sigma, bool need_mu,
                        bool need_log_sigma, const Eps& eps, at::Tensor& grad_mu,
                        at::Tensor& grad_log_sigma) {
  if (!need_mu && !need_log_sigma) return;
  const at::Tensor db = g.sum(1);  // [S, out]
  if (need_mu) grad_mu = db.sum(0);
  if (need_log_sigma) {
    const at::Tensor e = eps().view(db.sizes()).to(db.scalar_type());
    grad_log_sigma = (db * e).sum(0).mul_(b_log_sigma.exp());
  }
}

}  // namespace bnn_fast
