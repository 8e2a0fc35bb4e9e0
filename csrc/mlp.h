// BayesLinear -> ReLU -> BayesLinear, one row at a time: the element math of
// bayes_mlp_inference, shared by the CPU kernel (cpu/mlp.cpp, whose scalar path the tests run) and
// the CUDA kernel (cuda/mlp_kernel.cu). Torch-free.
#pragma once

#include <cstdint>

#include "gaussian.h"  // BNN_HD

namespace bnn_fast {

// The fused kernels' limits: layer 1's in_features and layer 2's out_features (a row's inputs and
// outputs are held in registers).
constexpr int64_t kMlpMaxIn = 8;
constexpr int64_t kMlpMaxOut = 8;

// One hidden unit of one row after the ReLU: bias + sum_i x[i] * w[i * stride], summed in order
// of i. `w` points at the unit's first weight: stride 1 for a weight laid out [hidden, in],
// stride hidden for [in, hidden]. relu(v) = v < 0 ? 0 : v keeps a NaN, as torch.relu does.
template <typename T>
BNN_HD T mlp_hidden_unit(const T* x, const T* w, int64_t stride, T bias, int64_t in) {
  T h = bias;
  for (int64_t i = 0; i < in; ++i) h += x[i] * w[i * stride];
  return h < T(0) ? T(0) : h;
}

}  // namespace bnn_fast
