// Every bnn_fast operator schema, in one place. Importing bnn_fast._C runs these registrations;
// the kernels register themselves under their dispatch keys in cpu/ and cuda/.
#include <Python.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include "cpu/memory.h"

#include <cstdint>
#include <mutex>

namespace {

// new_seed() -> int: 64 random bits from PyTorch's default CPU generator (the one
// torch.manual_seed seeds), as a signed int64. A layer takes one per forward pass; this is
// torch.randint(...).item() without the 0-dim tensor (about 0.3 us against 3 here).
PyObject* new_seed(PyObject* /*self*/, PyObject* /*args*/) {
  uint64_t bits;
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    bits = at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
  }
  return PyLong_FromLongLong(static_cast<long long>(static_cast<int64_t>(bits)));
}

// cpu_cache_info() -> (in_use, cached): bytes of the CPU output cache (cpu/memory.h) handed
// out, and held free.
PyObject* cpu_cache_info(PyObject* /*self*/, PyObject* /*args*/) {
  const bnn_fast::cpu::CacheInfo info = bnn_fast::cpu::cache_info();
  return Py_BuildValue("(LL)", static_cast<long long>(info.in_use),
                       static_cast<long long>(info.cached));
}

PyObject* release_cpu_cache(PyObject* /*self*/, PyObject* /*args*/) {
  bnn_fast::cpu::release_cache();
  Py_RETURN_NONE;
}

// install_cpu_allocator() -> bool: makes the CPU cache PyTorch's CPU allocator for large
// requests (cpu/memory.h); False when a higher-priority allocator is installed.
PyObject* install_cpu_allocator(PyObject* /*self*/, PyObject* /*args*/) {
  if (bnn_fast::cpu::install_allocator()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"new_seed", new_seed, METH_NOARGS,
     "new_seed() -> int: 64 random bits from PyTorch's default CPU generator, as an int64."},
    {"cpu_cache_info", cpu_cache_info, METH_NOARGS,
     "cpu_cache_info() -> (in_use, cached): bytes of the CPU output cache."},
    {"release_cpu_cache", release_cpu_cache, METH_NOARGS,
     "release_cpu_cache(): frees the CPU output cache's free blocks."},
    {"install_cpu_allocator", install_cpu_allocator, METH_NOARGS,
     "install_cpu_allocator() -> bool: routes PyTorch's large CPU allocations through the cache."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing _C loads this library, whose static initializers register the operators with the
// dispatcher; the module itself holds new_seed and the CPU output cache's two functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(bnn_fast, m) {
  // Summed KL(N(mu_i, exp(log_sigma_i)^2) || N(prior_mu, exp(prior_log_sigma)^2)) over all
  // elements of all tensors, in one launch. Returns a 0-dim tensor of the inputs' dtype.
  m.def("gaussian_kl(Tensor[] mu, Tensor[] log_sigma, float prior_mu, float prior_log_sigma) -> Tensor");
  m.def(
      "gaussian_kl_backward(Tensor grad, Tensor[] mu, Tensor[] log_sigma, float prior_mu, "
      "float prior_log_sigma) -> (Tensor[], Tensor[])");

  // Raw Philox4x32-10 (the C++ definition in philox.h), for the known-answer tests:
  // counter int64 [n, 4] and key int64 [n, 2] hold uint32 values; returns int64 [n, 4].
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");

  // Fills `out` with the contract's noise: out.flatten()[i] = normal(seed, stream, offset + i).
  // seed and stream are uint64 reinterpreted as int64.
  m.def("fill_normal_(Tensor(a!) out, int seed, int stream, int offset) -> ()");

  // n_samples reparameterized samples of a Gaussian parameter of any shape, [n_samples,
  // *log_sigma.shape]: out[s].flatten()[j] = mu[j] + exp(log_sigma[j]) * normal(seed, stream,
  // s * numel + j); a mu of None is zero (the perturbation alone). The backward regenerates the
  // noise: grad_mu[j] = sum_s grad[s, j], grad_log_sigma[j] = exp(log_sigma[j]) *
  // sum_s grad[s, j] * eps_s[j]; a gradient not asked for in output_mask comes back empty.
  m.def("sample_gaussian(Tensor? mu, Tensor log_sigma, int seed, int stream, int n_samples) -> Tensor");
  m.def(
      "sample_gaussian_backward(Tensor grad, Tensor log_sigma, int seed, int stream, "
      "int n_samples, bool[2] output_mask) -> (Tensor, Tensor)");

  // Reparameterized Bayesian linear with n_samples weight samples.
  //   x: [S or 1, N, in]; weight_*: [out, in]; bias_*: [out]. Returns (y [S, N, out], saved),
  //   where saved is the sampled weight [S, out, in] when the backend keeps it for the backward
  //   (CPU) and an empty tensor when the backward regenerates the noise (CUDA).
  //   Weight noise: stream 0, index s * out * in + j; bias noise: stream 1, index s * out + o.
  m.def(
      "bayes_linear(Tensor x, Tensor weight_mu, Tensor weight_log_sigma, Tensor? bias_mu, "
      "Tensor? bias_log_sigma, int seed, int n_samples) -> (Tensor, Tensor)");
  // The same forward without a backward (y only; no autograd formula): where nothing needs the
  // sampled weight, the CPU samples and multiplies in cache-sized blocks without writing it.
  m.def(
      "bayes_linear_inference(Tensor x, Tensor weight_mu, Tensor weight_log_sigma, Tensor? bias_mu, "
      "Tensor? bias_log_sigma, int seed, int n_samples) -> Tensor");
  // Two reparameterized Bayesian linear layers with a ReLU between, without a backward (the
  // many-sample predictive pass): y = relu(x W1_s^T + b1_s) W2_s^T + b2_s, each layer sampled
  // exactly as bayes_linear samples it from its own seed (seed1, seed2), so the result is that of
  // bayes_linear_inference, torch.relu, bayes_linear_inference. The hidden activations are
  // never written. x: [S or 1, N, in]; weight1_*: [hidden, in]; weight2_*: [out, hidden].
  // Returns [S, N, out]. CPU and CUDA, float32 and float64, for in <= 8 and out <= 8 (see
  // cpu/mlp.cpp, cuda/mlp_kernel.cu).
  m.def(
      "bayes_mlp_inference(Tensor x, Tensor weight1_mu, Tensor weight1_log_sigma, "
      "Tensor? bias1_mu, Tensor? bias1_log_sigma, int seed1, Tensor weight2_mu, "
      "Tensor weight2_log_sigma, Tensor? bias2_mu, Tensor? bias2_log_sigma, int seed2, "
      "int n_samples) -> Tensor");
  // The same two layers with a backward (training; CPU only): the forward is bayes_mlp_inference's pass;
  // the backward samples both layers' weights again from (seed1, seed2), so nothing but the
  // inputs is saved. Gradients (x, weight1_mu, weight1_log_sigma, bias1_mu, bias1_log_sigma,
  // weight2_mu, ..., bias2_log_sigma); one not asked for in output_mask comes back empty.
  m.def(
      "bayes_mlp(Tensor x, Tensor weight1_mu, Tensor weight1_log_sigma, Tensor? bias1_mu, "
      "Tensor? bias1_log_sigma, int seed1, Tensor weight2_mu, Tensor weight2_log_sigma, "
      "Tensor? bias2_mu, Tensor? bias2_log_sigma, int seed2, int n_samples) -> Tensor");
  m.def(
      "bayes_mlp_backward(Tensor grad_y, Tensor x, Tensor weight1_mu, Tensor weight1_log_sigma, "
      "Tensor? bias1_mu, Tensor? bias1_log_sigma, int seed1, Tensor weight2_mu, "
      "Tensor weight2_log_sigma, Tensor? bias2_mu, Tensor? bias2_log_sigma, int seed2, "
      "int n_samples, bool[9] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  // Gradients (x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma); one not asked for in
  // output_mask comes back as an empty tensor.
  m.def(
      "bayes_linear_backward(Tensor grad_out, Tensor x, Tensor weight_mu, Tensor weight_log_sigma, "
      "Tensor? bias_log_sigma, Tensor saved, int seed, int n_samples, bool[5] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The "local" estimator (local reparameterization): y = x mu^T + b_mu +
  // sqrt(x^2 (sigma^2)^T + sigma_b^2) * eps, one normal per output element (stream 2, index
  // (s * N + n) * out + o). Returns (y [S, N, out], var [S or 1, N, out]), var kept for the
  // backward.
  m.def(
      "bayes_linear_local(Tensor x, Tensor weight_mu, Tensor weight_log_sigma, Tensor? bias_mu, "
      "Tensor? bias_log_sigma, int seed, int n_samples) -> (Tensor, Tensor)");
  m.def(
      "bayes_linear_local_backward(Tensor grad_out, Tensor x, Tensor weight_mu, "
      "Tensor weight_log_sigma, Tensor? bias_log_sigma, Tensor var, int seed, int n_samples, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The "flipout" estimator: y_s = x_s mu^T + ((x_s * s_in) (sigma * eps_s)^T) * s_out + b_mu +
  // sigma_b * eps_b, eps_s of stream 0 (index s * out * in + j), the signs of streams 3 and 4
  // (the sign of the stream's normal, indexed like x_s and y_s), eps_b of stream 1. Returns
  // (y [S, N, out], saved): the perturbation sigma * eps [S, out, in] where the backend keeps it
  // (CPU), else empty (CUDA regenerates it).
  m.def(
      "bayes_linear_flipout(Tensor x, Tensor weight_mu, Tensor weight_log_sigma, Tensor? bias_mu, "
      "Tensor? bias_log_sigma, int seed, int n_samples) -> (Tensor, Tensor)");
  m.def(
      "bayes_linear_flipout_backward(Tensor grad_out, Tensor x, Tensor weight_mu, "
      "Tensor weight_log_sigma, Tensor? bias_log_sigma, Tensor saved, int seed, int n_samples, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
