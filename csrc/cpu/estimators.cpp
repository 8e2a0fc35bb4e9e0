// The "local" and "flipout" operators on the CPU: the elementwise passes of estimators_ops.h.
//
// Every pass walks its [S, R] index space in tiles of at most kTile elements that stay inside one
// sample, generates the tile's noise with the SIMD generator (cpu/noise.h) into an L1 buffer and
// consumes it at once. A tile's noise depends only on its indices, so the results are
// bit-identical for any thread count. Sums over samples run in sample order: deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cpu/memory.h"
#include "cpu/noise.h"
#include "cpu/simd.h"
#include "cpu/sample.h"
#include "estimators.h"
#include "estimators_ops.h"

namespace bnn_fast {
namespace cpu {
namespace {

constexpr int64_t kTile = 1024;
constexpr int64_t kGrain = 1 << 14;

// f(s, r, len, eps) over the flat [S, R] range, eps[k] = normal(seed, stream, s * R + r + k).
// Tiles start on multiples of kTile (the generator's 32-element groups then never split),
// except where a sample begins.
template <class F>
void for_each_noise_tile(int64_t S, int64_t R, uint64_t seed, uint64_t stream, const F& f) {
  const int64_t total = S * R;
  if (total == 0) return;
  const SimdLevel simd = simd_level();
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    float eps[kTile];
    for (int64_t i = begin; i < end;) {
      const int64_t s = i / R, r = i % R;
      const int64_t len = std::min({kTile - i % kTile, end - i, R - r});
      fill_normal(eps, len, seed, stream, uint64_t(i), simd);
      f(s, r, len, eps);
      i += len;
    }
  });
}

// Sample s of a tensor that holds X = 1 (broadcast) or S samples.
inline int64_t source(int64_t X, int64_t s) { return X == 1 ? 0 : s; }

struct CpuKernels {
  static constexpr bool kSaveDelta = true;  // noise generation is the CPU's floor: keep sigma*eps

  static void check_dtype(const at::Tensor& x, const char* op) {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                     ": x must be float32 or float64 on the CPU, got ", x.scalar_type());
  }

  static at::Tensor sample(const at::Tensor& mu, const at::Tensor& ls, int64_t S, uint64_t seed,
                           uint64_t stream, const char*) {
    return cpu::sample(mu, ls, S, seed, stream);
  }

  static at::Tensor normal(int64_t n, uint64_t seed, uint64_t stream, const at::Tensor& like) {
    at::Tensor out = at::empty({n}, like.options().dtype(at::kFloat));
    fill_normal_parallel(out.mutable_data_ptr<float>(), n, seed, stream, 0);
    return out;
  }

  static void local_combine(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& y,
                            uint64_t seed) {
    const int64_t X = mean.size(0), S = y.size(0), R = y.numel() / std::max<int64_t>(S, 1);
    advise_huge_pages(y);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bayes_linear_local_cpu", [&] {
      const scalar_t* m = mean.const_data_ptr<scalar_t>();
      const scalar_t* v = var.const_data_ptr<scalar_t>();
      scalar_t* o = y.mutable_data_ptr<scalar_t>();
      const scalar_t tiny = std::numeric_limits<scalar_t>::min();
      for_each_noise_tile(S, R, seed, estimators::kLocalStream,
                          [&](int64_t s, int64_t r, int64_t len, const float* eps) {
        const int64_t src = source(X, s) * R + r;
        scalar_t* dst = o + s * R + r;
        for (int64_t k = 0; k < len; ++k) dst[k] = local_output(m[src + k], v[src + k], eps[k], tiny);
      });
    });
  }

  static void local_grads(const at::Tensor& g, const at::Tensor& var, const at::Tensor& gm,
                          const at::Tensor& gv, uint64_t seed) {
    const int64_t X = var.size(0), S = g.size(0), R = g.numel() / std::max<int64_t>(S, 1);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bayes_linear_local_backward_cpu", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* v = var.const_data_ptr<scalar_t>();
      scalar_t* om = gm.mutable_data_ptr<scalar_t>();
      scalar_t* ov = gv.mutable_data_ptr<scalar_t>();
      const scalar_t tiny = std::numeric_limits<scalar_t>::min();
      if (X == S) {  // one sample per row: no sum
        for_each_noise_tile(S, R, seed, estimators::kLocalStream,
                            [&](int64_t s, int64_t r, int64_t len, const float* eps) {
          const int64_t i = s * R + r;
          for (int64_t k = 0; k < len; ++k) {
            om[i + k] = gp[i + k];
            ov[i + k] = local_grad_var(gp[i + k], v[i + k], eps[k], tiny);
          }
        });
        return;
      }
      // Broadcast input: each thread owns a range of r and sums the S samples in order.
      const SimdLevel simd = simd_level();
      at::parallel_for(0, R, std::max<int64_t>(1, kGrain / S), [&](int64_t begin, int64_t end) {
        float eps[kTile];
        for (int64_t r = begin; r < end;) {
          const int64_t len = std::min(kTile - r % kTile, end - r);
          for (int64_t s = 0; s < S; ++s) {
            fill_normal(eps, len, seed, estimators::kLocalStream, uint64_t(s * R + r), simd);
            const scalar_t* gs = gp + s * R + r;
            for (int64_t k = 0; k < len; ++k) {
              const scalar_t dv = local_grad_var(gs[k], v[r + k], eps[k], tiny);
              om[r + k] = s == 0 ? gs[k] : om[r + k] + gs[k];
              ov[r + k] = s == 0 ? dv : ov[r + k] + dv;
            }
          }
          r += len;
        }
      });
    });
  }

  // src [X, R] (X = 1 or S), dst [S, R]; src may be dst.
  static void apply_signs(const at::Tensor& src, const at::Tensor& dst, uint64_t seed,
                          uint64_t stream) {
    const int64_t X = src.size(0), S = dst.size(0), R = dst.numel() / std::max<int64_t>(S, 1);
    AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "bayes_linear_flipout_signs_cpu", [&] {
      const scalar_t* a = src.const_data_ptr<scalar_t>();
      scalar_t* o = dst.mutable_data_ptr<scalar_t>();
      for_each_noise_tile(S, R, seed, stream, [&](int64_t s, int64_t r, int64_t len, const float* z) {
        const scalar_t* in = a + source(X, s) * R + r;
        scalar_t* out = o + s * R + r;
        for (int64_t k = 0; k < len; ++k) out[k] = flip(in[k], z[k]);
      });
    });
  }

  // y [S, N, out] holds the perturbation's product; mean [X, N, out]; bias [S, out] or undefined.
  static void flipout_combine(const at::Tensor& mean, const at::Tensor& y, const at::Tensor& bias,
                              uint64_t seed) {
    const int64_t X = mean.size(0), S = y.size(0), out = y.size(2);
    const int64_t R = y.numel() / std::max<int64_t>(S, 1);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bayes_linear_flipout_cpu", [&] {
      const scalar_t* m = mean.const_data_ptr<scalar_t>();
      const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* o = y.mutable_data_ptr<scalar_t>();
      for_each_noise_tile(S, R, seed, estimators::kOutputSignStream,
                          [&](int64_t s, int64_t r, int64_t len, const float* z) {
        const scalar_t* ms = m + source(X, s) * R + r;
        scalar_t* ys = o + s * R + r;
        if (b == nullptr) {
          for (int64_t k = 0; k < len; ++k) ys[k] = ms[k] + flip(ys[k], z[k]);
          return;
        }
        const scalar_t* bs = b + s * out;
        int64_t col = r % out;
        for (int64_t k = 0; k < len; ++k) {
          ys[k] = (ms[k] + flip(ys[k], z[k])) + bs[col];
          if (++col == out) col = 0;
        }
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor> local_cpu(const at::Tensor& x, const at::Tensor& w_mu,
                                             const at::Tensor& w_ls,
                                             const std::optional<at::Tensor>& b_mu,
                                             const std::optional<at::Tensor>& b_ls, int64_t seed,
                                             int64_t n_samples) {
  return estimators::local_forward<CpuKernels>(x, w_mu, w_ls, b_mu, b_ls, seed, n_samples);
}

estimators::Grads local_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                     const at::Tensor& w_mu, const at::Tensor& w_ls,
                                     const std::optional<at::Tensor>& b_ls, const at::Tensor& var,
                                     int64_t seed, int64_t n_samples, std::array<bool, 5> mask) {
  return estimators::local_backward<CpuKernels>(grad, x, w_mu, w_ls, b_ls, var, seed, n_samples,
                                                mask);
}

std::tuple<at::Tensor, at::Tensor> flipout_cpu(const at::Tensor& x, const at::Tensor& w_mu,
                                               const at::Tensor& w_ls,
                                               const std::optional<at::Tensor>& b_mu,
                                               const std::optional<at::Tensor>& b_ls, int64_t seed,
                                               int64_t n_samples) {
  return estimators::flipout_forward<CpuKernels>(x, w_mu, w_ls, b_mu, b_ls, seed, n_samples);
}

estimators::Grads flipout_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                       const at::Tensor& w_mu, const at::Tensor& w_ls,
                                       const std::optional<at::Tensor>& b_ls,
                                       const at::Tensor& saved, int64_t seed, int64_t n_samples,
                                       std::array<bool, 5> mask) {
  return estimators::flipout_backward<CpuKernels>(grad, x, w_mu, w_ls, b_ls, saved, seed,
                                                  n_samples, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CPU, m) {
  m.impl("bayes_linear_local", &local_cpu);
  m.impl("bayes_linear_local_backward", &local_backward_cpu);
  m.impl("bayes_linear_flipout", &flipout_cpu);
  m.impl("bayes_linear_flipout_backward", &flipout_backward_cpu);
}

}  // namespace cpu
}  // namespace bnn_fast
