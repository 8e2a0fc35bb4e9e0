// bayes_linear on the CPU: reparameterized sampling fused into one pass, then ATen's GEMM.
//
// Forward: one parallel pass reads mu and log_sigma (8 B/weight in float32), generates the noise
// in registers (cpu/noise.h) and writes the sampled weight W (4 B/weight); the GEMM reads W once.
// Noise generation dominates at small batch, so the backward does not regenerate it: W is kept
// (one weight-sized buffer per sample) and eps * sigma = W - mu.
// Backward: dW_s = dy_s^T x_s by GEMM (one reused weight-sized buffer), then one fused pass
// accumulates grad_mu += dW_s and grad_log_sigma += dW_s * (W_s - mu); at small batch the dW rows
// are formed in L1 inside that pass instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "checks.h"
#include "cpu/memory.h"
#include "cpu/noise.h"
#include "cpu/sample.h"
#include "cpu/simd.h"
#include "gaussian.h"

namespace bnn_fast {
namespace cpu {
namespace {

constexpr int64_t kTile = 1024;  // noise tile kept on the stack (4 KiB, stays in L1)

template <typename T>
void combine_scalar(const T* mu, const T* ls, const float* eps, T* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = sample_element<T>(mu[k], ls[k], eps[k]);
}

#if BNN_HAVE_X86_SIMD
BNN_AVX2 inline __m256 sample8(__m256 mu, __m256 ls, __m256 eps) {
  return _mm256_add_ps(mu, _mm256_mul_ps(Sleef_expf8_u10avx2(ls), eps));
}

// Every element goes through the vector exp (a short tail is padded), so a weight does not
// depend on where a thread's range happens to end.
BNN_AVX2 void combine_avx2(const float* mu, const float* ls, const float* eps, float* out,
                           int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    _mm256_storeu_ps(out + k, sample8(_mm256_loadu_ps(mu + k), _mm256_loadu_ps(ls + k),
                                      _mm256_loadu_ps(eps + k)));
  }
  if (k < n) {
    float m[8] = {0}, l[8] = {0}, e[8] = {0}, o[8];
    std::copy(mu + k, mu + n, m);
    std::copy(ls + k, ls + n, l);
    std::copy(eps + k, eps + n, e);
    _mm256_storeu_ps(o, sample8(_mm256_loadu_ps(m), _mm256_loadu_ps(l), _mm256_loadu_ps(e)));
    std::copy(o, o + (n - k), out + k);
  }
}
#endif

template <typename T>
void combine(const T* mu, const T* ls, const float* eps, T* out, int64_t n) {
#if BNN_HAVE_X86_SIMD
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx2()) return combine_avx2(mu, ls, eps, out, n);
  }
#endif
  combine_scalar(mu, ls, eps, out, n);
}

}  // namespace

at::Tensor sample(const at::Tensor& mu, const at::Tensor& ls, int64_t n_samples, uint64_t seed,
                  uint64_t stream) {
  std::vector<int64_t> shape{n_samples};
  shape.insert(shape.end(), ls.sizes().begin(), ls.sizes().end());
  at::Tensor out = at::empty(shape, ls.options());
  advise_huge_pages(out);
  const int64_t numel = ls.numel();
  const int64_t total = n_samples * numel;
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(ls.scalar_type(), "bayes_linear_sample_cpu", [&] {
    const scalar_t* m = mu.defined() ? mu.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* l = ls.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, total, 1 << 15, [&](int64_t begin, int64_t end) {
      float eps[kTile];
      // Without mu, the mean is a tile of zeros: 0 + sigma * eps is exactly sigma * eps.
      std::vector<scalar_t> zeros(m == nullptr ? kTile : 0, scalar_t(0));
      for (int64_t i = begin; i < end;) {
        const int64_t j = i % numel;
        const int64_t len = std::min({kTile - i % kTile, end - i, numel - j});
        fill_normal(eps, len, seed, stream, uint64_t(i));
        combine(m != nullptr ? m + j : zeros.data(), l + j, eps, o + i, len);
        i += len;
      }
    });
  });
  return out;
}

namespace {

std::tuple<at::Tensor, at::Tensor> bayes_linear_cpu(const at::Tensor& x_in,
                                                    const at::Tensor& w_mu_in,
                                                    const at::Tensor& w_ls_in,
                                                    const std::optional<at::Tensor>& b_mu,
                                                    const std::optional<at::Tensor>& b_ls,
                                                    int64_t seed, int64_t n_samples) {
  check_bayes_linear_args(x_in, w_mu_in, w_ls_in, b_mu, b_ls, n_samples);
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
                   "bayes_linear: x must be float32 or float64 on the CPU, got ",
                   x_in.scalar_type());
  const int64_t S = n_samples, N = x_in.size(1), in = w_mu_in.size(1), out = w_mu_in.size(0);
  const at::Tensor w = sample(w_mu_in.contiguous(), w_ls_in.contiguous(), S, seed, 0);
  // [S, N, out] written in place by one batched GEMM; a broadcast x is an expanded view (batch
  // stride 0), never copied S times.
  const at::Tensor xs = x_in.expand({S, N, in});
  at::Tensor y = at::empty({S, N, out}, x_in.options());
  advise_huge_pages(y);
  if (b_mu.has_value()) {
    y.copy_(sample(b_mu->contiguous(), b_ls->contiguous(), S, seed, 1).unsqueeze(1).expand({S, N, out}));
    y.baddbmm_(xs, w.transpose(1, 2));
  } else {
    at::bmm_out(y, xs, w.transpose(1, 2));
  }
  return {y, w};
}

// grad_mu (+)= dW, grad_ls (+)= dW * (W - mu), one pass. The first sample writes without reading:
// the outputs are fresh pages, and reading one first would fault it in twice.
template <typename T>
void accumulate_weight_grads(const T* dw, const T* w, const T* mu, T* gmu, T* gls, int64_t n,
                             bool first) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    if (first) {
      if (gmu != dw) std::copy(dw + b, dw + e, gmu + b);  // S == 1 passes dW as grad_mu itself
      for (int64_t j = b; j < e; ++j) gls[j] = dw[j] * (w[j] - mu[j]);
    } else {
      for (int64_t j = b; j < e; ++j) {
        gmu[j] += dw[j];
        gls[j] += dw[j] * (w[j] - mu[j]);
      }
    }
  });
}

// Small batch: dW_s = dy_s^T x_s is a sum of N outer products; computing each dW row in L1 next
// to its use saves the GEMM's weight-sized write and re-read.
// Measured at 4096x4096: at 1-4 rows this path and the GEMM path are even, at 16 rows it is 1.6x
// slower.
constexpr int64_t kSmallBatchRows = 4;

template <typename T>
void accumulate_weight_grads_small_batch(const T* dy, const T* x, const T* w, const T* mu, T* gmu,
                                         T* gls, int64_t N, int64_t in, int64_t out, bool first) {
  at::parallel_for(0, out, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(in, 1)),
                   [&](int64_t b, int64_t e) {
    std::vector<T> dw(in);
    for (int64_t o = b; o < e; ++o) {
      std::fill(dw.begin(), dw.end(), T(0));
      for (int64_t n = 0; n < N; ++n) {
        const T g = dy[n * out + o];
        const T* xn = x + n * in;
        for (int64_t j = 0; j < in; ++j) dw[j] += g * xn[j];
      }
      const T* wo = w + o * in;
      const T* mo = mu + o * in;
      T* gm = gmu + o * in;
      T* gl = gls + o * in;
      if (first) {  // write without reading: see accumulate_weight_grads
        for (int64_t j = 0; j < in; ++j) {
          gm[j] = dw[j];
          gl[j] = dw[j] * (wo[j] - mo[j]);
        }
      } else {
        for (int64_t j = 0; j < in; ++j) {
          gm[j] += dw[j];
          gl[j] += dw[j] * (wo[j] - mo[j]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bayes_linear_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& w_mu_in,
    const at::Tensor& w_ls, const std::optional<at::Tensor>& b_ls, const at::Tensor& w,
    int64_t seed, int64_t n_samples, std::array<bool, 5> mask) {
  const int64_t S = n_samples, N = x.size(1), in = w_mu_in.size(1), out = w_mu_in.size(0);
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == S && w.size(1) == out && w.size(2) == in,
                    "bayes_linear_backward: saved must be the sampled weight [", S, ", ", out,
                    ", ", in, "], got ", w.sizes());
  TORCH_CHECK_VALUE(grad_in.dim() == 3 && grad_in.size(0) == S && grad_in.size(1) == N &&
                        grad_in.size(2) == out,
                    "bayes_linear_backward: grad_out must have shape [", S, ", ", N, ", ", out,
                    "], got ", grad_in.sizes());
  const at::Tensor dy = grad_in.contiguous();
  const at::Tensor w_mu = w_mu_in.contiguous();
  const auto opts = w_mu.options();
  // A gradient not asked for is an empty tensor (each its own: outputs must not alias).
  const auto none = [&] { return at::empty({0}, opts); };
  at::Tensor gx = none(), gmu = none(), gls = none(), gbmu = none(), gbls = none();

  if (mask[0]) {
    gx = x.size(0) == 1
             ? at::mm(dy.transpose(0, 1).reshape({N, S * out}), w.view({S * out, in})).unsqueeze(0)
             : at::bmm(dy, w);
  }
  if ((mask[1] || mask[2]) && N <= kSmallBatchRows) {
    gmu = empty_like_huge(w_mu);
    gls = empty_like_huge(w_mu);
    const at::Tensor xc = x.contiguous();
    AT_DISPATCH_FLOATING_TYPES(w_mu.scalar_type(), "bayes_linear_backward_cpu", [&] {
      for (int64_t s = 0; s < S; ++s) {
        accumulate_weight_grads_small_batch(
            dy[s].const_data_ptr<scalar_t>(), xc[x.size(0) == 1 ? 0 : s].const_data_ptr<scalar_t>(),
            w[s].const_data_ptr<scalar_t>(), w_mu.const_data_ptr<scalar_t>(),
            gmu.mutable_data_ptr<scalar_t>(), gls.mutable_data_ptr<scalar_t>(), N, in, out, s == 0);
      }
    });
  } else if (mask[1] || mask[2]) {
    // S == 1: dW itself becomes grad_mu; otherwise one dW buffer is reused for every sample.
    at::Tensor dw = empty_like_huge(w_mu);
    gmu = S == 1 ? dw : empty_like_huge(w_mu);
    gls = empty_like_huge(w_mu);
    for (int64_t s = 0; s < S; ++s) {
      at::mm_out(dw, dy[s].t(), x[x.size(0) == 1 ? 0 : s]);
      AT_DISPATCH_FLOATING_TYPES(dw.scalar_type(), "bayes_linear_backward_cpu", [&] {
        accumulate_weight_grads(dw.const_data_ptr<scalar_t>(), w[s].const_data_ptr<scalar_t>(),
                                w_mu.const_data_ptr<scalar_t>(), gmu.mutable_data_ptr<scalar_t>(),
                                gls.mutable_data_ptr<scalar_t>(), w_mu.numel(), s == 0);
      });
    }
  }
  if ((mask[3] || mask[4]) && b_ls.has_value()) {
    const at::Tensor db = dy.sum(1);  // [S, out]
    gbmu = db.sum(0);
    if (mask[4]) {
      at::Tensor eps = at::empty({S, out}, opts.dtype(at::kFloat));
      fill_normal(eps.mutable_data_ptr<float>(), S * out, uint64_t(seed), 1, 0);
      gbls = (db * eps.to(db.scalar_type()) * b_ls->exp()).sum(0);
    }
  }
  return {gx, gmu, gls, gbmu, gbls};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CPU, m) {
  m.impl("bayes_linear", &bayes_linear_cpu);
  m.impl("bayes_linear_backward", &bayes_linear_backward_cpu);
}

}  // namespace cpu
}  // namespace bnn_fast
