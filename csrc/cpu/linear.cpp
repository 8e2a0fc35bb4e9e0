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
#include <cstdlib>
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

// ---- inference: sampling and multiplying in cache-sized blocks ----------------------------------
//
// Without a backward, W need not exist as a whole: each block of kBlockWeights weights is sampled
// into an L1 buffer and multiplied with the (few) input rows at once, so the weights are read once
// (mu and log_sigma) and never written. Each W element is the same as sample() gives (the same
// noise and the same elementwise combine). Past kFusedMaxRows input rows the dot products lose to
// the GEMM, and the forward samples W into a temporary instead.
constexpr int64_t kBlockWeights = 4096;  // 16 KiB of float32 weights per block
constexpr int64_t kFusedMaxRows = 8;

// kFusedMaxRows, or BNN_FAST_CPU_FUSED_MAX_ROWS when set (read on every call, so the benchmark
// can measure both paths at every batch size: benchmarks/bench_linear.py).
inline int64_t fused_max_rows() {
  const char* env = std::getenv("BNN_FAST_CPU_FUSED_MAX_ROWS");
  return env != nullptr && *env != '\0' ? std::strtoll(env, nullptr, 10) : kFusedMaxRows;
}

template <typename T>
T dot_scalar(const T* a, const T* b, int64_t n) {
  T acc = T(0);
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

#if BNN_HAVE_X86_SIMD
BNN_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
  }
  for (; k + 8 <= n; k += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  float sum = _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
  for (; k < n; ++k) sum += a[k] * b[k];
  return sum;
}
#endif

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
#if BNN_HAVE_X86_SIMD
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx2()) return dot_avx2(a, b, n);
  }
#endif
  return dot_scalar(a, b, n);
}

// y[s, n, o] = W_s[o, :] . x[xs, n, :] + b[s, o], W_s sampled block by block (rows o0..o1 of
// sample s per task); b: the sampled bias [S, out] or null. With w_out null the block lives in an
// L1 buffer and W is never written (inference); otherwise it is written to w_out [S, out, in]
// (training keeps it for the backward) and multiplied while still in L1, saving the GEMM's
// re-read of W.
template <typename T>
void linear_fused_small_batch(const T* x, const T* mu, const T* ls, const T* b, T* y, T* w_out,
                              int64_t S, int64_t X, int64_t N, int64_t in, int64_t out,
                              uint64_t seed) {
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockWeights / std::max<int64_t>(in, 1));
  const int64_t blocks_per_sample = (out + rows_per_block - 1) / rows_per_block;
  at::parallel_for(0, S * blocks_per_sample, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(w_out == nullptr ? rows_per_block * in : 0);
    float eps[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / blocks_per_sample;
      const int64_t o0 = (task % blocks_per_sample) * rows_per_block;
      const int64_t o1 = std::min(out, o0 + rows_per_block);
      const int64_t j0 = o0 * in, len = (o1 - o0) * in;
      const uint64_t base = uint64_t(s) * uint64_t(out * in) + uint64_t(j0);
      T* w = w_out != nullptr ? w_out + int64_t(base) : buffer.data();
      for (int64_t k = 0; k < len;) {  // tiles aligned like sample()'s, for the same noise calls
        const int64_t step = std::min(kTile - int64_t((base + k) % kTile), len - k);
        fill_normal(eps, step, seed, 0, base + uint64_t(k));
        combine(mu + j0 + k, ls + j0 + k, eps, w + k, step);
        k += step;
      }
      const T* xs = x + (X == 1 ? 0 : s) * N * in;
      for (int64_t o = o0; o < o1; ++o) {
        const T* wo = w + (o - o0) * in;
        const T bias = b != nullptr ? b[s * out + o] : T(0);
        for (int64_t n = 0; n < N; ++n) y[(s * N + n) * out + o] = dot(wo, xs + n * in, in) + bias;
      }
    }
  });
}

// A GEMM with a short K (in_features) is bound by writing y: with a bias, the GEMM path writes
// y twice (the broadcast bias, then beta = 1) and reads it once. This loop writes it once.
// Measured on the seed article's first layer (in 1, out 1000, 300 rows, 20 samples): see
// benchmarks/bench_predictive.py.
constexpr int64_t kDirectMaxIn = 8;

// y[s, n, o] = b[s, o] + sum_k x[xs, n, k] W[s, o, k], k in order; b may be null.
template <typename T>
void linear_small_in(const T* x, const T* w, const T* b, T* y, int64_t S, int64_t X, int64_t N,
                     int64_t in, int64_t out) {
  at::parallel_for(0, S * N, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(out, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row / N, n = row % N;
      const T* xr = x + ((X == 1 ? 0 : s) * N + n) * in;
      const T* ws = w + s * out * in;
      const T* bs = b != nullptr ? b + s * out : nullptr;
      T* yr = y + row * out;
      if (in == 1) {  // the common case (a scalar input feature): a vectorizable axpy
        const T x0 = xr[0];
        if (bs != nullptr) {
          for (int64_t o = 0; o < out; ++o) yr[o] = bs[o] + x0 * ws[o];
        } else {
          for (int64_t o = 0; o < out; ++o) yr[o] = x0 * ws[o];
        }
        continue;
      }
      for (int64_t o = 0; o < out; ++o) {
        T acc = bs != nullptr ? bs[o] : T(0);
        for (int64_t k = 0; k < in; ++k) acc += xr[k] * ws[o * in + k];
        yr[o] = acc;
      }
    }
  });
}

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
  if (N >= 1 && N <= fused_max_rows() && in > kDirectMaxIn) {
    // Small batch: W is written once (kept for the backward) and multiplied while in L1.
    const at::Tensor x = x_in.contiguous(), mu = w_mu_in.contiguous(), ls = w_ls_in.contiguous();
    const at::Tensor b = b_mu.has_value() ? sample(b_mu->contiguous(), b_ls->contiguous(), S, seed, 1)
                                          : at::Tensor();
    at::Tensor w = at::empty({S, out, in}, mu.options());
    advise_huge_pages(w);
    at::Tensor y = at::empty({S, N, out}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bayes_linear_cpu", [&] {
      linear_fused_small_batch(x.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(),
                               ls.const_data_ptr<scalar_t>(),
                               b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                               y.mutable_data_ptr<scalar_t>(), w.mutable_data_ptr<scalar_t>(), S,
                               x.size(0), N, in, out, uint64_t(seed));
    });
    return {y, w};
  }
  const at::Tensor w = sample(w_mu_in.contiguous(), w_ls_in.contiguous(), S, seed, 0);
  // [S, N, out] written in place by one batched GEMM; a broadcast x is an expanded view (batch
  // stride 0), never copied S times.
  const at::Tensor xs = x_in.expand({S, N, in});
  at::Tensor y = at::empty({S, N, out}, x_in.options());
  advise_huge_pages(y);
  if (in <= kDirectMaxIn) {
    const at::Tensor x = x_in.contiguous();
    const at::Tensor b = b_mu.has_value() ? sample(b_mu->contiguous(), b_ls->contiguous(), S, seed, 1)
                                          : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bayes_linear_cpu", [&] {
      linear_small_in(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                      b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                      y.mutable_data_ptr<scalar_t>(), S, x.size(0), N, in, out);
    });
  } else if (b_mu.has_value()) {
    y.copy_(sample(b_mu->contiguous(), b_ls->contiguous(), S, seed, 1).unsqueeze(1).expand({S, N, out}));
    y.baddbmm_(xs, w.transpose(1, 2));
  } else {
    at::bmm_out(y, xs, w.transpose(1, 2));
  }
  return {y, w};
}

// The forward without a backward: y only (see linear_fused_small_batch).
at::Tensor bayes_linear_inference_cpu(const at::Tensor& x_in, const at::Tensor& w_mu_in,
                                      const at::Tensor& w_ls_in,
                                      const std::optional<at::Tensor>& b_mu,
                                      const std::optional<at::Tensor>& b_ls, int64_t seed,
                                      int64_t n_samples) {
  const int64_t N = x_in.dim() == 3 ? x_in.size(1) : 0;
  if (N < 1 || N > fused_max_rows() || x_in.size(2) <= kDirectMaxIn) {
    return std::get<0>(bayes_linear_cpu(x_in, w_mu_in, w_ls_in, b_mu, b_ls, seed, n_samples));
  }
  check_bayes_linear_args(x_in, w_mu_in, w_ls_in, b_mu, b_ls, n_samples);
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
                   "bayes_linear: x must be float32 or float64 on the CPU, got ",
                   x_in.scalar_type());
  const int64_t S = n_samples, in = w_mu_in.size(1), out = w_mu_in.size(0);
  const at::Tensor x = x_in.contiguous(), mu = w_mu_in.contiguous(), ls = w_ls_in.contiguous();
  const at::Tensor b = b_mu.has_value() ? sample(b_mu->contiguous(), b_ls->contiguous(), S, seed, 1)
                                        : at::Tensor();
  at::Tensor y = at::empty({S, N, out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bayes_linear_inference_cpu", [&] {
    linear_fused_small_batch(x.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(),
                             ls.const_data_ptr<scalar_t>(),
                             b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                             y.mutable_data_ptr<scalar_t>(), static_cast<scalar_t*>(nullptr), S,
                             x.size(0), N, in, out,
                             uint64_t(seed));
  });
  return y;
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

// The same pass also forms grad_x = dy W while each W row is in L1 (gx non-null: [N, in], written
// when first_gx, else accumulated), instead of a GEMM that reads W once more. The rows are split
// into one range per thread; each range sums into its own partial grad_x, and the partials are
// added in range order.
template <typename T>
void accumulate_weight_grads_small_batch(const T* dy, const T* x, const T* w, const T* mu, T* gmu,
                                         T* gls, T* gx, int64_t N, int64_t in, int64_t out,
                                         bool first, bool first_gx) {
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), out));
  std::vector<T> partial(gx != nullptr ? ranges * N * in : 0, T(0));
  at::parallel_for(0, ranges, 1, [&](int64_t rb, int64_t re) {
    std::vector<T> dw(in);
    for (int64_t range = rb; range < re; ++range) {
      T* px = gx != nullptr ? partial.data() + range * N * in : nullptr;
      for (int64_t o = out * range / ranges; o < out * (range + 1) / ranges; ++o) {
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
        if (px != nullptr) {
          for (int64_t n = 0; n < N; ++n) {
            const T g = dy[n * out + o];
            T* pn = px + n * in;
            for (int64_t j = 0; j < in; ++j) pn[j] += g * wo[j];
          }
        }
      }
    }
  });
  if (gx == nullptr) return;
  for (int64_t range = 0; range < ranges; ++range) {
    const T* p = partial.data() + range * N * in;
    if (first_gx && range == 0) {
      std::copy(p, p + N * in, gx);
    } else {
      for (int64_t i = 0; i < N * in; ++i) gx[i] += p[i];
    }
  }
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

  const bool small_batch = (mask[1] || mask[2]) && N >= 1 && N <= kSmallBatchRows;
  if (mask[0] && !small_batch) {
    gx = x.size(0) == 1
             ? at::mm(dy.transpose(0, 1).reshape({N, S * out}), w.view({S * out, in})).unsqueeze(0)
             : at::bmm(dy, w);
  }
  if (small_batch) {
    gmu = empty_like_huge(w_mu);
    gls = empty_like_huge(w_mu);
    if (mask[0]) gx = at::empty(x.sizes(), opts);
    const at::Tensor xc = x.contiguous();
    const bool broadcast = x.size(0) == 1;
    AT_DISPATCH_FLOATING_TYPES(w_mu.scalar_type(), "bayes_linear_backward_cpu", [&] {
      for (int64_t s = 0; s < S; ++s) {
        scalar_t* gxs = mask[0] ? gx[broadcast ? 0 : s].mutable_data_ptr<scalar_t>() : nullptr;
        accumulate_weight_grads_small_batch(
            dy[s].const_data_ptr<scalar_t>(), xc[broadcast ? 0 : s].const_data_ptr<scalar_t>(),
            w[s].const_data_ptr<scalar_t>(), w_mu.const_data_ptr<scalar_t>(),
            gmu.mutable_data_ptr<scalar_t>(), gls.mutable_data_ptr<scalar_t>(), gxs, N, in, out,
            s == 0, !broadcast || s == 0);
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
  m.impl("bayes_linear_inference", &bayes_linear_inference_cpu);
  m.impl("bayes_linear_backward", &bayes_linear_backward_cpu);
}

}  // namespace cpu
}  // namespace bnn_fast
