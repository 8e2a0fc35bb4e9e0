// gaussian_kl on CUDA: argument checks, the device table of tensors, the launches.
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cuda/glue.h"

namespace bnn_fast {
namespace cuda {
namespace {

// The table of (mu, log_sigma[, grads]) entries, copied to the device on the current stream.
// Empty tensors get no chunk. Returns the device table and the chunk count.
std::pair<at::Tensor, int64_t> make_table(const std::vector<at::Tensor>& mu,
                                          const std::vector<at::Tensor>& ls,
                                          const std::vector<at::Tensor>* gmu,
                                          const std::vector<at::Tensor>* gls, int* n_entries) {
  std::vector<KlEntry> entries;
  int64_t chunks = 0;
  for (size_t t = 0; t < mu.size(); ++t) {
    const int64_t n = mu[t].numel();
    if (n == 0) continue;
    entries.push_back({mu[t].const_data_ptr(), ls[t].const_data_ptr(),
                       gmu ? (*gmu)[t].mutable_data_ptr() : nullptr,
                       gls ? (*gls)[t].mutable_data_ptr() : nullptr, n, chunks});
    chunks += (n + kKlChunk - 1) / kKlChunk;
  }
  *n_entries = int(entries.size());
  const int64_t bytes = int64_t(entries.size() * sizeof(KlEntry));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), entries.data(), size_t(bytes));
  at::Tensor dev = host.to(mu[0].device(), /*non_blocking=*/true);
  return {dev, chunks};
}

at::Tensor gaussian_kl_cuda(at::TensorList mu_in, at::TensorList ls_in, double prior_mu,
                            double prior_log_sigma) {
  check_gaussian_kl_args(mu_in, ls_in);
  const c10::cuda::CUDAGuard guard(mu_in[0].device());
  const auto mu = contiguous_all(mu_in);
  const auto ls = contiguous_all(ls_in);
  at::Tensor out = at::zeros({}, mu[0].options());
  int n_entries = 0;
  auto [table, chunks] = make_table(mu, ls, nullptr, nullptr, &n_entries);
  if (chunks == 0) return out;
  at::Tensor partial = at::empty({chunks}, mu[0].options().dtype(at::kDouble));
  BNN_CUDA_CHECK("gaussian_kl",
                 launch_gaussian_kl(to_dtype(mu[0].scalar_type(), "gaussian_kl", "mu"),
                                    static_cast<const KlEntry*>(table.const_data_ptr()), n_entries,
                                    chunks, partial.mutable_data_ptr<double>(),
                                    out.mutable_data_ptr(), prior_mu, prior_log_sigma,
                                    current_stream()));
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> gaussian_kl_backward_cuda(
    const at::Tensor& grad, at::TensorList mu_in, at::TensorList ls_in, double prior_mu,
    double prior_log_sigma) {
  check_gaussian_kl_args(mu_in, ls_in);
  const c10::cuda::CUDAGuard guard(mu_in[0].device());
  TORCH_CHECK_VALUE(grad.numel() == 1, "gaussian_kl_backward: grad must hold one element, got ",
                    grad.sizes());
  const auto mu = contiguous_all(mu_in);
  const auto ls = contiguous_all(ls_in);
  // The scalar gradient stays on the device: no host synchronization.
  const at::Tensor g = grad.to(mu[0].device(), mu[0].scalar_type()).contiguous();
  std::vector<at::Tensor> gmu, gls;
  for (size_t t = 0; t < mu.size(); ++t) {
    gmu.push_back(at::empty_like(mu[t]));
    gls.push_back(at::empty_like(ls[t]));
  }
  int n_entries = 0;
  auto [table, chunks] = make_table(mu, ls, &gmu, &gls, &n_entries);
  if (chunks > 0) {
    BNN_CUDA_CHECK("gaussian_kl_backward",
                   launch_gaussian_kl_backward(
                       to_dtype(mu[0].scalar_type(), "gaussian_kl_backward", "mu"),
                       static_cast<const KlEntry*>(table.const_data_ptr()), n_entries, chunks,
                       g.const_data_ptr(), prior_mu, prior_log_sigma, current_stream()));
  }
  return {gmu, gls};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, CUDA, m) {
  m.impl("gaussian_kl", &gaussian_kl_cuda);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cuda);
}

}  // namespace cuda
}  // namespace bnn_fast
