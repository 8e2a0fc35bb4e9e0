// Element math of the "local" and "flipout" estimators, shared by the CPU and CUDA kernels. Its
// Python twins are bnn_fast.estimators.local and bnn_fast.estimators.flipout (given the noise).
#pragma once

#include <cmath>

#include "gaussian.h"  // BNN_HD

namespace bnn_fast {

// Local reparameterization: an output element is mean + std * eps with std = sqrt(var) of the
// pre-activation's exact variance. var is floored at `tiny` (the smallest normal number of T, the
// type it is computed in: float for float16 and bfloat16 tensors) before the square root: a zero
// input row without bias has var = 0, where the derivative of sqrt is infinite.
template <typename T>
BNN_HD T local_std(T var, T tiny) {
  return std::sqrt(var < tiny ? tiny : var);
}

template <typename T>
BNN_HD T local_output(T mean, T var, float eps, T tiny) {
  return mean + local_std(var, tiny) * static_cast<T>(eps);
}

// d y / d var times the incoming gradient g: g * eps / (2 std), and 0 where the floor was active
// (the floor's derivative is 0 there, as torch's clamp_min gives).
template <typename T>
BNN_HD T local_grad_var(T g, T var, float eps, T tiny) {
  return var >= tiny ? g * static_cast<T>(eps) / (T(2) * local_std(var, tiny)) : T(0);
}

// Flipout's random sign from the contract's normal of the sign stream: +1 where it is >= 0.
// Multiplying by it is a sign flip, which is exact.
template <typename T>
BNN_HD T flip(T value, float z) {
  return z >= 0.0f ? value : -value;
}

}  // namespace bnn_fast
