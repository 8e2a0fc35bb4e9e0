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
#include <tuple>
#include <utility>

#include "bias_grads.h"
#include "checks.h"
#include "cpu/noise.h"
#include "cpu/sample.h"
#include "mlp.h"
#include "cpu/simd.h"

namespace bnn_fast {
namespace cpu {
namespace {

constexpr int64_t kMaxIn = kMlpMaxIn;
constexpr int64_t kMaxOut = kMlpMaxOut;

// The weights of one sample: w1t [in, hidden] (layer 1 transposed, so hidden units are
// contiguous), b1 [hidden] or null, w2 [out, hidden], b2 [out] or null.
template <typename T>
struct SampleWeights {
  const T* w1t;
  const T* b1;
  const T* w2;
  const T* b2;
};

// Hidden unit j of row xr after the ReLU (mlp.h, shared with the CUDA kernel).
template <typename T>
T hidden_unit(const T* xr, const SampleWeights<T>& w, int64_t in, int64_t hidden, int64_t j) {
  return mlp_hidden_unit(xr, w.w1t + j, hidden, w.b1 != nullptr ? w.b1[j] : T(0), in);
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
// R rows at a time (they share each weight load), OUT outputs per row, 8 hidden units per step;
// R * OUT accumulators stay in registers. The hidden tail (hidden % 8 units) is summed in scalar
// after the vector part. Each row's arithmetic is the same whichever rows share its group.
// The rows' inputs (in <= kMaxIn) are broadcast once per group, not once per 8 hidden units.
// IN > 0: in_features known at compile time (== in), so the loop over them unrolls and the
// broadcasts stay in registers; IN == 0: any in_features. Either way the same FMAs in the same
// order, so the same bits.
template <int R, int OUT, int IN>
BNN_AVX2 void mlp_group_avx2(const float* const* xr, float* const* yr,
                             const SampleWeights<float>& w, int64_t in, int64_t hidden) {
  const int64_t n_in = IN > 0 ? IN : in;
  __m256 acc[R][OUT];
  __m256 xb[R][kMaxIn];
  for (int r = 0; r < R; ++r) {
    for (int o = 0; o < OUT; ++o) acc[r][o] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n_in; ++i) xb[r][i] = _mm256_broadcast_ss(xr[r] + i);
  }
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= hidden; j += 8) {
    const __m256 bias = w.b1 != nullptr ? _mm256_loadu_ps(w.b1 + j) : zero;
    __m256 h[R];
    for (int r = 0; r < R; ++r) h[r] = bias;
    for (int64_t i = 0; i < n_in; ++i) {
      const __m256 wi = _mm256_loadu_ps(w.w1t + i * hidden + j);
      for (int r = 0; r < R; ++r) h[r] = _mm256_fmadd_ps(xb[r][i], wi, h[r]);
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

// The same kernel on 16 lanes where the CPU has AVX-512F: 16 hidden units per step, the last
// partial step under a mask (masked-off lanes load zeros, so their hidden units are 0 and add
// nothing), 8 rows per group for one or two outputs (32 registers; 8, 12 and 16 rows timed the
// same within noise for the seed article's network). The sums run in another
// order than the 8-lane kernel's, so the two differ by rounding (both are tested against the
// reference at their own SIMD level).
BNN_AVX512_WARNINGS_BEGIN
template <int R, int OUT, int IN>
BNN_AVX512 void mlp_group_avx512(const float* const* xr, float* const* yr,
                                 const SampleWeights<float>& w, int64_t in, int64_t hidden) {
  const int64_t n_in = IN > 0 ? IN : in;
  __m512 acc[R][OUT];
  __m512 xb[R][kMaxIn];
  for (int r = 0; r < R; ++r) {
    for (int o = 0; o < OUT; ++o) acc[r][o] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n_in; ++i) xb[r][i] = _mm512_set1_ps(xr[r][i]);
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < hidden; j += 16) {
    const __mmask16 m = first_lanes16(hidden - j);
    const __m512 bias = w.b1 != nullptr ? _mm512_maskz_loadu_ps(m, w.b1 + j) : zero;
    __m512 h[R];
    for (int r = 0; r < R; ++r) h[r] = bias;
    for (int64_t i = 0; i < n_in; ++i) {
      const __m512 wi = _mm512_maskz_loadu_ps(m, w.w1t + i * hidden + j);
      for (int r = 0; r < R; ++r) h[r] = _mm512_fmadd_ps(xb[r][i], wi, h[r]);
    }
    for (int r = 0; r < R; ++r) h[r] = _mm512_max_ps(zero, h[r]);  // NaN passes, as above
    for (int o = 0; o < OUT; ++o) {
      const __m512 wo = _mm512_maskz_loadu_ps(m, w.w2 + o * hidden + j);
      for (int r = 0; r < R; ++r) acc[r][o] = _mm512_fmadd_ps(h[r], wo, acc[r][o]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int o = 0; o < OUT; ++o) {
      yr[r][o] = _mm512_reduce_add_ps(acc[r][o]) + (w.b2 != nullptr ? w.b2[o] : 0.0f);
    }
  }
}
BNN_AVX512_WARNINGS_END

// The group kernels of one vector width: group<R, OUT, IN> computes R rows, and rows<OUT, IN>
// is how many rows share each weight load (R * OUT accumulators, R hidden vectors and R * IN
// input broadcasts in the registers: 16 of them for AVX2, 32 for AVX-512).
struct MlpAvx2 {
  template <int R, int OUT, int IN>
  static void group(const float* const* xr, float* const* yr, const SampleWeights<float>& w,
                    int64_t in, int64_t hidden) {
    mlp_group_avx2<R, OUT, IN>(xr, yr, w, in, hidden);
  }
  template <int OUT, int IN>
  static constexpr int rows() {
    return OUT == 1 ? (IN == 1 ? 6 : 4) : OUT == 2 ? 4 : OUT <= 4 ? 2 : 1;
  }
};

struct MlpAvx512 {
  template <int R, int OUT, int IN>
  static void group(const float* const* xr, float* const* yr, const SampleWeights<float>& w,
                    int64_t in, int64_t hidden) {
    mlp_group_avx512<R, OUT, IN>(xr, yr, w, in, hidden);
  }
  template <int OUT, int IN>
  static constexpr int rows() {
    return OUT <= 2 ? 8 : OUT <= 4 ? 4 : 2;
  }
};

// Rows in groups of R; a short last group repeats its last row (the copies' results are
// discarded into a scratch row).
template <typename Kernel, int OUT, int IN>
void mlp_rows_out(const float* x, float* y, int64_t rows, const SampleWeights<float>& w,
                  int64_t in, int64_t hidden) {
  constexpr int R = Kernel::template rows<OUT, IN>();
  float scratch[OUT];
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const float* xr[R];
    float* yr[R];
    for (int r = 0; r < R; ++r) {
      const int64_t row = std::min(r0 + r, rows - 1);
      xr[r] = x + row * in;
      yr[r] = r0 + r < rows ? y + (r0 + r) * OUT : scratch;
    }
    Kernel::template group<R, OUT, IN>(xr, yr, w, in, hidden);
  }
}

template <typename Kernel, int IN>
void mlp_rows_in(const float* x, float* y, int64_t rows, const SampleWeights<float>& w,
                 int64_t in, int64_t hidden, int64_t out) {
  switch (out) {
    case 1: return mlp_rows_out<Kernel, 1, IN>(x, y, rows, w, in, hidden);
    case 2: return mlp_rows_out<Kernel, 2, IN>(x, y, rows, w, in, hidden);
    case 3: return mlp_rows_out<Kernel, 3, IN>(x, y, rows, w, in, hidden);
    case 4: return mlp_rows_out<Kernel, 4, IN>(x, y, rows, w, in, hidden);
    case 5: return mlp_rows_out<Kernel, 5, IN>(x, y, rows, w, in, hidden);
    case 6: return mlp_rows_out<Kernel, 6, IN>(x, y, rows, w, in, hidden);
    case 7: return mlp_rows_out<Kernel, 7, IN>(x, y, rows, w, in, hidden);
    default: return mlp_rows_out<Kernel, 8, IN>(x, y, rows, w, in, hidden);
  }
}

// One input feature (a scalar regression input, the seed article's case) gets the compile-time
// kernel: the article's 10,000-sample prediction took 225 ms instead of 301 (medians of 5
// alternated runs of each build), and with 6 rows per group for one output, 185 instead of 216
// (AVX2, on the AMD machine).
template <typename Kernel>
void mlp_rows_simd(const float* x, float* y, int64_t rows, const SampleWeights<float>& w,
                   int64_t in, int64_t hidden, int64_t out) {
  if (in == 1) return mlp_rows_in<Kernel, 1>(x, y, rows, w, in, hidden, out);
  return mlp_rows_in<Kernel, 0>(x, y, rows, w, in, hidden, out);
}
#endif

template <typename T>
void mlp_rows(const T* x, T* y, int64_t rows, const SampleWeights<T>& w, int64_t in,
              int64_t hidden, int64_t out, SimdLevel simd) {
#if BNN_HAVE_X86_SIMD
  if constexpr (std::is_same_v<T, float>) {
    if (simd == kAvx512) return mlp_rows_simd<MlpAvx512>(x, y, rows, w, in, hidden, out);
    if (simd == kAvx2) return mlp_rows_simd<MlpAvx2>(x, y, rows, w, in, hidden, out);
  }
#endif
  mlp_rows_scalar(x, y, rows, w, in, hidden, out);
}

// Every sample's weights, sampled as bayes_linear samples them: weights from stream 0, biases
// from stream 1 of each layer's seed. w1t is layer 1 transposed ([S, in, hidden]: hidden units
// contiguous); w1 is kept as sampled ([S, hidden, in]) for the backward's fold.
struct SampledMlp {
  at::Tensor w1, w1t, b1, w2, b2;
};

SampledMlp sample_mlp(const at::Tensor& w1_mu, const at::Tensor& w1_ls,
                      const std::optional<at::Tensor>& b1_mu,
                      const std::optional<at::Tensor>& b1_ls, int64_t seed1,
                      const at::Tensor& w2_mu, const at::Tensor& w2_ls,
                      const std::optional<at::Tensor>& b2_mu,
                      const std::optional<at::Tensor>& b2_ls, int64_t seed2, int64_t S) {
  SampledMlp w;
  w.w1 = sample(w1_mu.contiguous(), w1_ls.contiguous(), S, uint64_t(seed1), 0);
  w.w1t = w1_mu.size(1) == 1 ? w.w1 : w.w1.transpose(1, 2).contiguous();
  if (b1_mu.has_value()) {
    w.b1 = sample(b1_mu->contiguous(), b1_ls->contiguous(), S, uint64_t(seed1), 1);
  }
  w.w2 = sample(w2_mu.contiguous(), w2_ls.contiguous(), S, uint64_t(seed2), 0);
  if (b2_mu.has_value()) {
    w.b2 = sample(b2_mu->contiguous(), b2_ls->contiguous(), S, uint64_t(seed2), 1);
  }
  return w;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
SampleWeights<T> weights_of_sample(const SampledMlp& w, int64_t s, int64_t in, int64_t hidden,
                                   int64_t out) {
  const T* b1 = ptr_or_null<T>(w.b1);
  const T* b2 = ptr_or_null<T>(w.b2);
  return {w.w1t.const_data_ptr<T>() + s * in * hidden, b1 != nullptr ? b1 + s * hidden : nullptr,
          w.w2.const_data_ptr<T>() + s * out * hidden, b2 != nullptr ? b2 + s * out : nullptr};
}

// The forward of bayes_mlp_inference and of bayes_mlp (Op: the operator's name for errors): one
// pass; bayes_mlp's backward samples the weights again from the seeds, so nothing is saved but
// the inputs.
constexpr char kInference[] = "bayes_mlp_inference";
constexpr char kTraining[] = "bayes_mlp";

template <const char* Op>
at::Tensor bayes_mlp_cpu(const at::Tensor& x_in, const at::Tensor& w1_mu, const at::Tensor& w1_ls,
                         const std::optional<at::Tensor>& b1_mu,
                         const std::optional<at::Tensor>& b1_ls, int64_t seed1,
                         const at::Tensor& w2_mu, const at::Tensor& w2_ls,
                         const std::optional<at::Tensor>& b2_mu,
                         const std::optional<at::Tensor>& b2_ls, int64_t seed2,
                         int64_t n_samples) {
  constexpr const char* op = Op;
  BNN_NO_AUTOCAST();
  const auto [in, hidden, out] = check_mlp_args(op, x_in, w1_mu, w1_ls, b1_mu, b1_ls, w2_mu,
                                                w2_ls, b2_mu, b2_ls, n_samples);
  const int64_t S = n_samples, X = x_in.size(0), N = x_in.size(1);
  const SampledMlp w =
      sample_mlp(w1_mu, w1_ls, b1_mu, b1_ls, seed1, w2_mu, w2_ls, b2_mu, b2_ls, seed2, S);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({S, N, out}, x.options());
  if (y.numel() == 0) return y;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bayes_mlp_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const SimdLevel simd = simd_level();
    // Tasks: blocks of up to kRows rows of one sample. Each row is computed by the same
    // instructions whatever the split, so the result does not depend on the thread count.
    constexpr int64_t kRows = 64;
    const int64_t blocks = (N + kRows - 1) / kRows;
    const int64_t cost = std::max<int64_t>(1, kRows * hidden * (in + out));
    at::parallel_for(0, S * blocks, std::max<int64_t>(1, (1 << 16) / cost), [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t s = task / blocks, n0 = (task % blocks) * kRows;
        const int64_t rows = std::min(kRows, N - n0);
        mlp_rows(xp + ((X == 1 ? 0 : s) * N + n0) * in, yp + (s * N + n0) * out, rows,
                 weights_of_sample<scalar_t>(w, s, in, hidden, out), in, hidden, out, simd);
      }
    });
  });
  return y;
}

// ---- backward ---------------------------------------------------------------------------------
//
// For each sample s, with a = x W1^T + b1, h = relu(a), g = (dy W2) * (a > 0):
//   dW2 = dy^T h, db2 = sum_n dy, dW1 = g^T x, db1 = sum_n g, dx = g W1,
// folded into the parameters' gradients as bayes_linear folds them (grad_mu += dW,
// grad_log_sigma += dW * (W - mu)). Two passes, neither writing [N, hidden]:
//   pass 1, one task per block of kUnits hidden units: recomputes a and g row by row and sums
//     dW1, db1, dW2 of its units over the samples and rows in order;
//   pass 2, one task per block of rows: recomputes a and g and sums dx over the hidden units.
// Each output element is summed by one task in a fixed order: the gradients do not depend on the
// thread count. The mask is torch.relu's backward, threshold_backward(grad, relu(a), 0): the
// gradient is zeroed where relu(a) <= 0 and passes elsewhere, a NaN included; h keeps a NaN.

constexpr int64_t kUnits = 64;

// a -> h (relu) and g (dy W2, masked) for hidden units [j0, j0 + L) of one row.
template <typename T>
inline void hidden_and_grad(const T* xr, const T* dyr, const SampleWeights<T>& w, int64_t in,
                            int64_t hidden, int64_t out, int64_t j0, int64_t L, T* h, T* g) {
  for (int64_t k = 0; k < L; ++k) h[k] = w.b1 != nullptr ? w.b1[j0 + k] : T(0);
  for (int64_t i = 0; i < in; ++i) {
    const T xi = xr[i];
    const T* wr = w.w1t + i * hidden + j0;
    for (int64_t k = 0; k < L; ++k) h[k] += xi * wr[k];
  }
  for (int64_t k = 0; k < L; ++k) g[k] = T(0);
  for (int64_t o = 0; o < out; ++o) {
    const T d = dyr[o];
    const T* wr = w.w2 + o * hidden + j0;
    for (int64_t k = 0; k < L; ++k) g[k] += d * wr[k];
  }
  for (int64_t k = 0; k < L; ++k) {
    const T a = h[k];
    g[k] = a <= T(0) ? T(0) : g[k];
    h[k] = a < T(0) ? T(0) : a;
  }
}

// Pass 1 for units [j0, j0 + L) of one sample: adds dW1^T ([in, L], unit-minor), db1 and dW2
// ([out, L]) of rows [0, N) into the accumulators.
template <typename T>
inline void unit_grads(const T* x, const T* dy, int64_t N, const SampleWeights<T>& w, int64_t in,
                       int64_t hidden, int64_t out, int64_t j0, int64_t L, T* dw1t, T* db1,
                       T* dw2) {
  T h[kUnits], g[kUnits];
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * in;
    const T* dyr = dy + n * out;
    hidden_and_grad(xr, dyr, w, in, hidden, out, j0, L, h, g);
    for (int64_t o = 0; o < out; ++o) {
      const T d = dyr[o];
      T* acc = dw2 + o * kUnits;
      for (int64_t k = 0; k < L; ++k) acc[k] += d * h[k];
    }
    for (int64_t i = 0; i < in; ++i) {
      const T xi = xr[i];
      T* acc = dw1t + i * kUnits;
      for (int64_t k = 0; k < L; ++k) acc[k] += g[k] * xi;
    }
    for (int64_t k = 0; k < L; ++k) db1[k] += g[k];
  }
}

// Pass 2 for rows [0, rows) of one sample: adds dx = g W1 into gx ([rows, in]); the lanes of
// the sum over hidden units are kept apart (acc[i][k]) and added in order at the end.
template <typename T>
inline void row_grads(const T* x, const T* dy, int64_t rows, const SampleWeights<T>& w,
                      int64_t in, int64_t hidden, int64_t out, T* gx) {
  T h[kUnits], g[kUnits], acc[kMaxIn][kUnits];
  for (int64_t n = 0; n < rows; ++n) {
    const T* xr = x + n * in;
    for (int64_t i = 0; i < in; ++i) std::fill(acc[i], acc[i] + kUnits, T(0));
    for (int64_t j0 = 0; j0 < hidden; j0 += kUnits) {
      const int64_t L = std::min(kUnits, hidden - j0);
      hidden_and_grad(xr, dy + n * out, w, in, hidden, out, j0, L, h, g);
      for (int64_t i = 0; i < in; ++i) {
        const T* wr = w.w1t + i * hidden + j0;
        for (int64_t k = 0; k < L; ++k) acc[i][k] += g[k] * wr[k];
      }
    }
    for (int64_t i = 0; i < in; ++i) {
      T sum = T(0);
      for (int64_t k = 0; k < kUnits; ++k) sum += acc[i][k];
      gx[n * in + i] += sum;
    }
  }
}

#if BNN_HAVE_X86_SIMD
// AVX2 versions for float: 8 hidden units per step, h, g and the accumulators in registers
// (hence the templates on the layer widths: with a run-time width the accumulators live on the
// stack, and each step waits on a store and a reload, about 3x slower here). The units past the
// last multiple of 8 go through the scalar loops above.

// h (after the ReLU) and the masked g of units [j, j + 8) of one row.
template <int IN, int OUT>
BNN_AVX2 inline void hidden_and_grad8(const float* xr, const float* dyr,
                                      const SampleWeights<float>& w, int64_t hidden, int64_t j,
                                      __m256& h, __m256& g) {
  const __m256 zero = _mm256_setzero_ps();
  h = w.b1 != nullptr ? _mm256_loadu_ps(w.b1 + j) : zero;
  for (int i = 0; i < IN; ++i) {
    h = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + i), _mm256_loadu_ps(w.w1t + i * hidden + j), h);
  }
  g = zero;
  for (int o = 0; o < OUT; ++o) {
    g = _mm256_fmadd_ps(_mm256_broadcast_ss(dyr + o), _mm256_loadu_ps(w.w2 + o * hidden + j), g);
  }
  g = _mm256_and_ps(g, _mm256_cmp_ps(h, zero, _CMP_NLE_UQ));  // !(a <= 0): true for NaN
  h = _mm256_max_ps(zero, h);                                // relu; a NaN passes
}

template <int IN, int OUT>
BNN_AVX2 void unit_grads_avx2(const float* x, const float* dy, int64_t N,
                              const SampleWeights<float>& w, int64_t hidden, int64_t j0,
                              int64_t L, float* dw1t, float* db1, float* dw2) {
  int64_t c = 0;
  for (; c + 8 <= L; c += 8) {
    __m256 a1[IN], a2[OUT];
    for (int i = 0; i < IN; ++i) a1[i] = _mm256_loadu_ps(dw1t + i * kUnits + c);
    for (int o = 0; o < OUT; ++o) a2[o] = _mm256_loadu_ps(dw2 + o * kUnits + c);
    __m256 ab = _mm256_loadu_ps(db1 + c);
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x + n * IN;
      const float* dyr = dy + n * OUT;
      __m256 h, g;
      hidden_and_grad8<IN, OUT>(xr, dyr, w, hidden, j0 + c, h, g);
      for (int o = 0; o < OUT; ++o) a2[o] = _mm256_fmadd_ps(_mm256_broadcast_ss(dyr + o), h, a2[o]);
      for (int i = 0; i < IN; ++i) a1[i] = _mm256_fmadd_ps(g, _mm256_broadcast_ss(xr + i), a1[i]);
      ab = _mm256_add_ps(ab, g);
    }
    for (int i = 0; i < IN; ++i) _mm256_storeu_ps(dw1t + i * kUnits + c, a1[i]);
    for (int o = 0; o < OUT; ++o) _mm256_storeu_ps(dw2 + o * kUnits + c, a2[o]);
    _mm256_storeu_ps(db1 + c, ab);
  }
  if (c < L) unit_grads(x, dy, N, w, IN, hidden, OUT, j0 + c, L - c, dw1t + c, db1 + c, dw2 + c);
}

template <int IN, int OUT>
BNN_AVX2 void row_grads_avx2(const float* x, const float* dy, int64_t rows,
                             const SampleWeights<float>& w, int64_t hidden, float* gx) {
  const int64_t vec = hidden - hidden % 8;
  for (int64_t n = 0; n < rows; ++n) {
    const float* xr = x + n * IN;
    const float* dyr = dy + n * OUT;
    __m256 acc[IN];
    for (int i = 0; i < IN; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < vec; j += 8) {
      __m256 h, g;
      hidden_and_grad8<IN, OUT>(xr, dyr, w, hidden, j, h, g);
      for (int i = 0; i < IN; ++i) {
        acc[i] = _mm256_fmadd_ps(g, _mm256_loadu_ps(w.w1t + i * hidden + j), acc[i]);
      }
    }
    float sum[IN];
    for (int i = 0; i < IN; ++i) sum[i] = hsum8(acc[i]);
    if (vec < hidden) {
      float h[8], g[8];
      hidden_and_grad(xr, dyr, w, IN, hidden, OUT, vec, hidden - vec, h, g);
      for (int i = 0; i < IN; ++i) {
        for (int64_t k = 0; k < hidden - vec; ++k) sum[i] += g[k] * w.w1t[i * hidden + vec + k];
      }
    }
    for (int i = 0; i < IN; ++i) gx[n * IN + i] += sum[i];
  }
}

// The instantiations, by layer widths.
using UnitGradsFn = void (*)(const float*, const float*, int64_t, const SampleWeights<float>&,
                             int64_t, int64_t, int64_t, float*, float*, float*);
using RowGradsFn = void (*)(const float*, const float*, int64_t, const SampleWeights<float>&,
                            int64_t, float*);

// Table[in - 1][out - 1] = Maker::fn<in, out>() for in <= kMaxIn, out <= kMaxOut.
template <class Maker, int IN, int... O>
constexpr auto table_row(std::integer_sequence<int, O...>) {
  return std::array{Maker::template fn<IN, O + 1>()...};
}
template <class Maker, int... I>
constexpr auto table(std::integer_sequence<int, I...>) {
  return std::array{table_row<Maker, I + 1>(std::make_integer_sequence<int, kMaxOut>())...};
}
struct UnitGrads {
  template <int IN, int OUT>
  static constexpr UnitGradsFn fn() { return &unit_grads_avx2<IN, OUT>; }
};
struct RowGrads {
  template <int IN, int OUT>
  static constexpr RowGradsFn fn() { return &row_grads_avx2<IN, OUT>; }
};
constexpr auto kUnitGrads = table<UnitGrads>(std::make_integer_sequence<int, kMaxIn>());
constexpr auto kRowGrads = table<RowGrads>(std::make_integer_sequence<int, kMaxIn>());
#endif

// The passes for one dtype: AVX2 for float where the CPU has it (simd), else the scalar loops.
template <typename T>
void unit_grads_any(bool simd, const T* x, const T* dy, int64_t N, const SampleWeights<T>& w,
                    int64_t in, int64_t hidden, int64_t out, int64_t j0, int64_t L, T* dw1t,
                    T* db1, T* dw2) {
#if BNN_HAVE_X86_SIMD
  if constexpr (std::is_same_v<T, float>) {
    if (simd && in >= 1 && out >= 1) {
      return kUnitGrads[in - 1][out - 1](x, dy, N, w, hidden, j0, L, dw1t, db1, dw2);
    }
  }
#endif
  unit_grads(x, dy, N, w, in, hidden, out, j0, L, dw1t, db1, dw2);
}

template <typename T>
void row_grads_any(bool simd, const T* x, const T* dy, int64_t rows, const SampleWeights<T>& w,
                   int64_t in, int64_t hidden, int64_t out, T* gx) {
#if BNN_HAVE_X86_SIMD
  if constexpr (std::is_same_v<T, float>) {
    if (simd && in >= 1 && out >= 1) return kRowGrads[in - 1][out - 1](x, dy, rows, w, hidden, gx);
  }
#endif
  row_grads(x, dy, rows, w, in, hidden, out, gx);
}

using MlpGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor>;

MlpGrads bayes_mlp_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& w1_mu,
    const at::Tensor& w1_ls, const std::optional<at::Tensor>& b1_mu,
    const std::optional<at::Tensor>& b1_ls, int64_t seed1, const at::Tensor& w2_mu,
    const at::Tensor& w2_ls, const std::optional<at::Tensor>& b2_mu,
    const std::optional<at::Tensor>& b2_ls, int64_t seed2, int64_t n_samples,
    std::array<bool, 9> mask) {
  BNN_NO_AUTOCAST();
  constexpr const char* op = "bayes_mlp_backward";
  const auto [in, hidden, out] = check_mlp_args(op, x_in, w1_mu, w1_ls, b1_mu, b1_ls, w2_mu,
                                                w2_ls, b2_mu, b2_ls, n_samples);
  const int64_t S = n_samples, X = x_in.size(0), N = x_in.size(1);
  TORCH_CHECK_VALUE(grad_y.dim() == 3 && grad_y.size(0) == S && grad_y.size(1) == N &&
                        grad_y.size(2) == out,
                    op, ": grad_y must have shape [", S, ", ", N, ", ", out, "], got ",
                    grad_y.sizes());
  check_same_dtype(op, "grad_y", grad_y, x_in);
  check_same_device(op, "grad_y", grad_y, x_in);
  const bool has_b1 = b1_mu.has_value(), has_b2 = b2_mu.has_value();
  mask[3] = mask[3] && has_b1;
  mask[4] = mask[4] && has_b1;
  mask[7] = mask[7] && has_b2;
  mask[8] = mask[8] && has_b2;

  const SampledMlp w =
      sample_mlp(w1_mu, w1_ls, b1_mu, b1_ls, seed1, w2_mu, w2_ls, b2_mu, b2_ls, seed2, S);
  const at::Tensor x = x_in.contiguous(), dy = grad_y.contiguous();
  const auto opts = x.options();
  const bool layer1 = mask[1] || mask[2] || mask[3] || mask[4];
  const bool layer2 = mask[5] || mask[6];
  std::array<at::Tensor, 9> grads;
  // Gradients not asked for come back empty, as bayes_linear_backward's do.
  for (at::Tensor& t : grads) t = at::empty({0}, opts);
  at::Tensor gx = mask[0] ? at::zeros({X, N, in}, opts) : grads[0];
  at::Tensor gw1_mu = at::zeros({hidden, in}, opts), gw1_ls = at::zeros({hidden, in}, opts);
  at::Tensor gb1_mu = at::zeros({hidden}, opts), gb1_ls = at::zeros({hidden}, opts);
  at::Tensor gw2_mu = at::zeros({out, hidden}, opts), gw2_ls = at::zeros({out, hidden}, opts);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* dyp = dy.const_data_ptr<T>();
    const bool simd = use_avx2();
    const auto xs = [&](int64_t s) { return xp + (X == 1 ? 0 : s) * N * in; };

    if ((layer1 || layer2) && N > 0) {
      const T* w1p = w.w1.const_data_ptr<T>();
      const at::Tensor w1_mu_c = w1_mu.contiguous(), w2_mu_c = w2_mu.contiguous();
      const at::Tensor b1_mu_c = has_b1 ? b1_mu->contiguous() : at::Tensor();
      const T* m1 = w1_mu_c.const_data_ptr<T>();
      const T* m2 = w2_mu_c.const_data_ptr<T>();
      const T* mb1 = has_b1 ? b1_mu_c.const_data_ptr<T>() : nullptr;
      const T* b1s = ptr_or_null<T>(w.b1);
      const T* w2p = w.w2.const_data_ptr<T>();
      T *g1m = gw1_mu.mutable_data_ptr<T>(), *g1l = gw1_ls.mutable_data_ptr<T>();
      T *gb1m = gb1_mu.mutable_data_ptr<T>(), *gb1l = gb1_ls.mutable_data_ptr<T>();
      T *g2m = gw2_mu.mutable_data_ptr<T>(), *g2l = gw2_ls.mutable_data_ptr<T>();
      const int64_t blocks = (hidden + kUnits - 1) / kUnits;
      const int64_t cost = std::max<int64_t>(1, S * N * kUnits * (in + out));
      at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 16) / cost), [&](int64_t b, int64_t e) {
        T dw1t[kMaxIn * kUnits], db1[kUnits], dw2[kMaxOut * kUnits];
        for (int64_t blk = b; blk < e; ++blk) {
          const int64_t j0 = blk * kUnits, L = std::min(kUnits, hidden - j0);
          for (int64_t s = 0; s < S; ++s) {
            std::fill(dw1t, dw1t + in * kUnits, T(0));
            std::fill(db1, db1 + kUnits, T(0));
            std::fill(dw2, dw2 + out * kUnits, T(0));
            const SampleWeights<T> ws = weights_of_sample<T>(w, s, in, hidden, out);
            const T* dys = dyp + s * N * out;
            unit_grads_any(simd, xs(s), dys, N, ws, in, hidden, out, j0, L, dw1t, db1, dw2);
            // Fold this sample's dW into the parameters' gradients (W - mu = sigma * eps).
            for (int64_t k = 0; k < L; ++k) {
              const int64_t j = j0 + k;
              for (int64_t i = 0; i < in; ++i) {
                const int64_t e1 = j * in + i;
                const T d = dw1t[i * kUnits + k];
                g1m[e1] += d;
                g1l[e1] += d * (w1p[s * hidden * in + e1] - m1[e1]);
              }
              if (b1s != nullptr) {
                gb1m[j] += db1[k];
                gb1l[j] += db1[k] * (b1s[s * hidden + j] - mb1[j]);
              }
              for (int64_t o = 0; o < out; ++o) {
                const int64_t e2 = o * hidden + j;
                const T d = dw2[o * kUnits + k];
                g2m[e2] += d;
                g2l[e2] += d * (w2p[s * out * hidden + e2] - m2[e2]);
              }
            }
          }
        }
      });
    }

    if (mask[0] && N > 0) {
      T* gxp = gx.mutable_data_ptr<T>();
      constexpr int64_t kRows = 16;
      const int64_t blocks = (N + kRows - 1) / kRows;
      const int64_t cost = std::max<int64_t>(1, S * kRows * hidden * (in + out));
      at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 16) / cost), [&](int64_t b, int64_t e) {
        for (int64_t blk = b; blk < e; ++blk) {
          const int64_t n0 = blk * kRows, rows = std::min(kRows, N - n0);
          // With x shared by the samples (X == 1), its gradient sums them in order.
          for (int64_t s = 0; s < S; ++s) {
            const SampleWeights<T> ws = weights_of_sample<T>(w, s, in, hidden, out);
            const T* xr = xs(s) + n0 * in;
            const T* dyr = dyp + (s * N + n0) * out;
            T* gxr = gxp + ((X == 1 ? 0 : s) * N + n0) * in;
            row_grads_any(simd, xr, dyr, rows, ws, in, hidden, out, gxr);
          }
        }
      });
    }
  });

  grads[0] = gx;
  if (mask[1]) grads[1] = gw1_mu;
  if (mask[2]) grads[2] = gw1_ls;
  if (mask[3]) grads[3] = gb1_mu;
  if (mask[4]) grads[4] = gb1_ls;
  if (mask[5]) grads[5] = gw2_mu;
  if (mask[6]) grads[6] = gw2_ls;
  if (has_b2) {
    // Layer 2's bias gradients, as bayes_linear_backward computes them (its noise: stream 1 of
    // seed2).
    sampled_bias_grads(dy, *b2_ls, mask[7], mask[8], [&] {
      at::Tensor eps = at::empty({S * out}, opts.dtype(at::kFloat));
      fill_normal_parallel(eps.mutable_data_ptr<float>(), S * out, uint64_t(seed2), 1, 0);
      return eps;
    }, grads[7], grads[8]);
  }
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6], grads[7],
          grads[8]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CPU, m) {
  m.impl("bayes_mlp_inference", &bayes_mlp_cpu<kInference>);
  m.impl("bayes_mlp", &bayes_mlp_cpu<kTraining>);
  m.impl("bayes_mlp_backward", &bayes_mlp_backward_cpu);
}

}  // namespace cpu
}  // namespace bnn_fast
