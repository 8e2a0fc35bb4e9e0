// bayes_mlp_inference on the CPU: BayesLinear -> ReLU -> BayesLinear in one pass, for the
// many-sample predictive pass (bnn_fast.predictive recognizes the pattern in an nn.Sequential).
//
// Why: in a network with a narrow input and a narrow output (the seed article's regression net,
// 1 -> 1000 -> 1), each sample's work is tiny (300 points x 1000 hidden units: 0.3 M
// multiply-adds per layer), but the hidden activations are not: [S * N, hidden] written by layer 1,
// read and written again by the ReLU, read by layer 2. Run as three operators, a chunk of 6
// samples spent 236 + 112 + 156 us on that traffic (benchmarks/small_layer_overhead.py). Here each
// hidden activation lives in a register: it is computed, clamped and multiplied into the outputs
// at once, so the pass touches only x, the sampled weights (a few KiB per sample, in L1) and y.
//
// The weights are sampled whole first, exactly as bayes_linear samples them (cpu/sample.h: the
// same (seed, stream, index) and the same combine), so the result is that of
// bayes_linear_inference, torch.relu, bayes_linear_inference with the same seeds, up to the order
// of the sums. in_features and out_features are at most 8, so a row's outputs fit in registers;
// wider layers are what the GEMM path of bayes_linear is for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "checks.h"
#include "cpu/sample.h"
#include "cpu/simd.h"

namespace bnn_fast {
namespace cpu {
namespace {

constexpr int64_t kMaxIn = 8;
constexpr int64_t kMaxOut = 8;

// The weights of one sample: w1t [in, hidden] (layer 1 transposed, so hidden units are
// contiguous), b1 [hidden] or null, w2 [out, hidden], b2 [out] or null.
template <typename T>
struct SampleWeights {
  const T* w1t;
  const T* b1;
  const T* w2;
  const T* b2;
};

// Hidden unit j of row xr after the ReLU: relu(v) = v < 0 ? 0 : v keeps a NaN as torch.relu
// does.
template <typename T>
T hidden_unit(const T* xr, const SampleWeights<T>& w, int64_t in, int64_t hidden, int64_t j) {
  T h = w.b1 != nullptr ? w.b1[j] : T(0);
  for (int64_t i = 0; i < in; ++i) h += xr[i] * w.w1t[i * hidden + j];
  return h < T(0) ? T(0) : h;
}

// Rows x[0..rows) ([rows, in], contiguous) -> y[0..rows) ([rows, out]). Sums over the hidden
// units in order.
template <typename T>
void mlp_rows_scalar(const T* x, T* y, int64_t rows, const SampleWeights<T>& w, int64_t in,
                     int64_t hidden, int64_t out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * in;
    std::array<T, kMaxOut> acc{};
    for (int64_t j = 0; j < hidden; ++j) {
      const T h = hidden_unit(xr, w, in, hidden, j);
      for (int64_t o = 0; o < out; ++o) acc[o] += h * w.w2[o * hidden + j];
    }
    for (int64_t o = 0; o < out; ++o) y[r * out + o] = acc[o] + (w.b2 != nullptr ? w.b2[o] : T(0));
  }
}

#if BNN_HAVE_X86_SIMD
BNN_AVX2 inline float hsum8(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

// R rows at a time (they share each weight load), OUT outputs per row, 8 hidden units per step;
// R * OUT accumulators stay in registers. The hidden tail (hidden % 8 units) is summed in scalar
// after the vector part. Each row's arithmetic is the same whichever rows share its group.
template <int R, int OUT>
BNN_AVX2 void mlp_group_avx2(const float* const* xr, float* const* yr,
                             const SampleWeights<float>& w, int64_t in, int64_t hidden) {
  __m256 acc[R][OUT];
  for (int r = 0; r < R; ++r) {
    for (int o = 0; o < OUT; ++o) acc[r][o] = _mm256_setzero_ps();
  }
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= hidden; j += 8) {
    const __m256 bias = w.b1 != nullptr ? _mm256_loadu_ps(w.b1 + j) : zero;
    __m256 h[R];
    for (int r = 0; r < R; ++r) h[r] = bias;
    for (int64_t i = 0; i < in; ++i) {
      const __m256 wi = _mm256_loadu_ps(w.w1t + i * hidden + j);
      for (int r = 0; r < R; ++r) h[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr[r] + i), wi, h[r]);
    }
    // max(0, h) returns its second operand when either is NaN: a NaN passes, as in torch.relu.
    for (int r = 0; r < R; ++r) h[r] = _mm256_max_ps(zero, h[r]);
    for (int o = 0; o < OUT; ++o) {
      const __m256 wo = _mm256_loadu_ps(w.w2 + o * hidden + j);
      for (int r = 0; r < R; ++r) acc[r][o] = _mm256_fmadd_ps(h[r], wo, acc[r][o]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float sum[OUT];
    for (int o = 0; o < OUT; ++o) sum[o] = hsum8(acc[r][o]);
    for (int64_t k = j; k < hidden; ++k) {
      const float v = hidden_unit(xr[r], w, in, hidden, k);
      for (int o = 0; o < OUT; ++o) sum[o] += v * w.w2[o * hidden + k];
    }
    for (int o = 0; o < OUT; ++o) yr[r][o] = sum[o] + (w.b2 != nullptr ? w.b2[o] : 0.0f);
  }
}

// Rows in groups of R; a short last group repeats its last row (the copies' results are
// discarded into a scratch row).
template <int R, int OUT>
BNN_AVX2 void mlp_rows_avx2_out(const float* x, float* y, int64_t rows,
                                const SampleWeights<float>& w, int64_t in, int64_t hidden) {
  float scratch[OUT];
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const float* xr[R];
    float* yr[R];
    for (int r = 0; r < R; ++r) {
      const int64_t row = std::min(r0 + r, rows - 1);
      xr[r] = x + row * in;
      yr[r] = r0 + r < rows ? y + (r0 + r) * OUT : scratch;
    }
    mlp_group_avx2<R, OUT>(xr, yr, w, in, hidden);
  }
}

// R * OUT <= 8 accumulators, plus R hidden vectors.
void mlp_rows_avx2(const float* x, float* y, int64_t rows, const SampleWeights<float>& w,
                   int64_t in, int64_t hidden, int64_t out) {
  switch (out) {
    case 1: return mlp_rows_avx2_out<4, 1>(x, y, rows, w, in, hidden);
    case 2: return mlp_rows_avx2_out<4, 2>(x, y, rows, w, in, hidden);
    case 3: return mlp_rows_avx2_out<2, 3>(x, y, rows, w, in, hidden);
    case 4: return mlp_rows_avx2_out<2, 4>(x, y, rows, w, in, hidden);
    case 5: return mlp_rows_avx2_out<1, 5>(x, y, rows, w, in, hidden);
    case 6: return mlp_rows_avx2_out<1, 6>(x, y, rows, w, in, hidden);
    case 7: return mlp_rows_avx2_out<1, 7>(x, y, rows, w, in, hidden);
    default: return mlp_rows_avx2_out<1, 8>(x, y, rows, w, in, hidden);
  }
}
#endif

template <typename T>
void mlp_rows(const T* x, T* y, int64_t rows, const SampleWeights<T>& w, int64_t in,
              int64_t hidden, int64_t out, bool simd) {
#if BNN_HAVE_X86_SIMD
  if constexpr (std::is_same_v<T, float>) {
    if (simd) return mlp_rows_avx2(x, y, rows, w, in, hidden, out);
  }
#endif
  mlp_rows_scalar(x, y, rows, w, in, hidden, out);
}

at::Tensor bayes_mlp_inference_cpu(const at::Tensor& x_in, const at::Tensor& w1_mu,
                                   const at::Tensor& w1_ls, const std::optional<at::Tensor>& b1_mu,
                                   const std::optional<at::Tensor>& b1_ls, int64_t seed1,
                                   const at::Tensor& w2_mu, const at::Tensor& w2_ls,
                                   const std::optional<at::Tensor>& b2_mu,
                                   const std::optional<at::Tensor>& b2_ls, int64_t seed2,
                                   int64_t n_samples) {
  constexpr const char* op = "bayes_mlp_inference";
  check_bayes_linear_args(x_in, w1_mu, w1_ls, b1_mu, b1_ls, n_samples, op, 1);
  TORCH_CHECK_VALUE(w2_mu.dim() == 2 && w2_mu.size(1) == w1_mu.size(0), op,
                    ": weight2_mu must be 2-D [out_features, ", w1_mu.size(0),
                    "] (layer 2's in_features = layer 1's out_features), got ", w2_mu.sizes());
  // Layer 2's parameters, checked against a stand-in for its input (the hidden activations).
  check_bayes_linear_args(at::empty({1, 0, w2_mu.size(1)}, x_in.options()), w2_mu, w2_ls, b2_mu,
                          b2_ls, n_samples, op, 2);
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64 on the CPU, got ", x_in.scalar_type());
  const int64_t S = n_samples, X = x_in.size(0), N = x_in.size(1);
  const int64_t in = w1_mu.size(1), hidden = w1_mu.size(0), out = w2_mu.size(0);
  TORCH_CHECK_VALUE(in <= kMaxIn && out <= kMaxOut, op, ": the CPU kernel takes in_features <= ",
                    kMaxIn, " and out_features <= ", kMaxOut, ", got ", in, " and ", out,
                    " (run the layers one by one instead)");

  // Every sample's weights, sampled as bayes_linear samples them: weights from stream 0, biases
  // from stream 1 of each layer's seed.
  const at::Tensor w1 = sample(w1_mu.contiguous(), w1_ls.contiguous(), S, uint64_t(seed1), 0);
  const at::Tensor w1t = in == 1 ? w1 : w1.transpose(1, 2).contiguous();  // [S, in, hidden]
  const at::Tensor b1 = b1_mu.has_value()
                            ? sample(b1_mu->contiguous(), b1_ls->contiguous(), S, uint64_t(seed1), 1)
                            : at::Tensor();
  const at::Tensor w2 = sample(w2_mu.contiguous(), w2_ls.contiguous(), S, uint64_t(seed2), 0);
  const at::Tensor b2 = b2_mu.has_value()
                            ? sample(b2_mu->contiguous(), b2_ls->contiguous(), S, uint64_t(seed2), 1)
                            : at::Tensor();
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({S, N, out}, x.options());
  if (y.numel() == 0) return y;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* w1p = w1t.const_data_ptr<scalar_t>();
    const scalar_t* b1p = b1.defined() ? b1.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* w2p = w2.const_data_ptr<scalar_t>();
    const scalar_t* b2p = b2.defined() ? b2.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool simd = use_avx2();
    // Tasks: blocks of up to kRows rows of one sample. Each row is computed by the same
    // instructions whatever the split, so the result does not depend on the thread count.
    constexpr int64_t kRows = 64;
    const int64_t blocks = (N + kRows - 1) / kRows;
    const int64_t cost = std::max<int64_t>(1, kRows * hidden * (in + out));
    at::parallel_for(0, S * blocks, std::max<int64_t>(1, (1 << 16) / cost), [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t s = task / blocks, n0 = (task % blocks) * kRows;
        const int64_t rows = std::min(kRows, N - n0);
        const SampleWeights<scalar_t> w{w1p + s * in * hidden,
                                        b1p != nullptr ? b1p + s * hidden : nullptr,
                                        w2p + s * out * hidden,
                                        b2p != nullptr ? b2p + s * out : nullptr};
        mlp_rows(xp + ((X == 1 ? 0 : s) * N + n0) * in, yp + (s * N + n0) * out, rows, w, in,
                 hidden, out, simd);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CPU, m) {
  m.impl("bayes_mlp_inference", &bayes_mlp_inference_cpu);
}

}  // namespace cpu
}  // namespace bnn_fast
