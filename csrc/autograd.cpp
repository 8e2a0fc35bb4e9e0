// Autograd for the differentiable operators, in C++ (dispatch key Autograd, every device).
//
// Each forward redispatches below autograd to the device kernel and saves what its *_backward
// operator takes; each backward calls that operator. Written in Python with
// torch.library.register_autograd, the same formulas ran a Python kernel, a context object and a
// redispatch on every call: a small layer's operator call with gradients took 89 us that way on
// the development VM, 11-14 us this way (benchmarks/small_layer_overhead.py). The fake (meta)
// implementations stay in Python (bnn_fast/_ops.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace bnn_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The backward operators are not differentiable: with create_graph=True, refuse instead of
// returning gradients that silently lack their own gradient.
void check_no_double_backward(const char* op, const std::vector<at::Tensor>& tensors) {
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(!(t.defined() && t.requires_grad()), op,
                ": double backward (create_graph=True through this operator) is not supported; "
                "use the pure-PyTorch path (BNN_FAST_FORCE_REFERENCE=1) for higher-order "
                "gradients");
  }
}

// The operator bnn_fast::<name> with its C++ signature (each call site keeps it in a static).
template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const std::string& name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(("bnn_fast::" + name).c_str(), "")
      .template typed<Signature>();
}

// An undefined tensor (what a saved absent optional comes back as) as an absent optional.
std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// ---- bayes_linear, bayes_linear_local, bayes_linear_flipout ------------------------------------
//
// All three return (y, saved) and have a *_backward(grad_out, x, weight_mu, weight_log_sigma,
// bias_log_sigma, saved, seed, n_samples, output_mask) giving the five input gradients. `saved`
// never receives a gradient.

constexpr char kReparam[] = "bayes_linear";
constexpr char kLocal[] = "bayes_linear_local";
constexpr char kFlipout[] = "bayes_linear_flipout";

using LinearForward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, int64_t);
using LinearBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, int64_t, int64_t, std::array<bool, 5>);

template <const char* Name>
class LinearFunction : public torch::autograd::Function<LinearFunction<Name>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_mu,
                               const at::Tensor& w_ls, const std::optional<at::Tensor>& b_mu,
                               const std::optional<at::Tensor>& b_ls, int64_t seed,
                               int64_t n_samples) {
    static const auto op = find_op<LinearForward>(Name);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, saved] = op.call(x, w_mu, w_ls, b_mu, b_ls, seed, n_samples);
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["n_samples"] = n_samples;
    ctx->saved_data["has_bias"] = b_mu.has_value();
    // An undefined tensor stands for a missing bias_log_sigma.
    ctx->save_for_backward({x, w_mu, w_ls, b_ls.value_or(at::Tensor()), saved});
    ctx->mark_non_differentiable({saved});
    // Nothing flows into `saved`: without this, autograd would allocate a zero gradient of its
    // (weight-sized, on the CPU) shape on every backward.
    ctx->set_materialize_grads(false);
    return {y, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_y = grads[0];
    variable_list none(7);
    if (!grad_y.defined()) return none;  // nothing flowed back into y
    static const auto op = find_op<LinearBackward>(std::string(Name) + "_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w_mu = saved[1], &w_ls = saved[2], &b_ls = saved[3];
    check_no_double_backward(Name, {grad_y, x, w_mu, w_ls, b_ls});
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 5> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->needs_input_grad(2), has_bias && ctx->needs_input_grad(3),
                                   has_bias && ctx->needs_input_grad(4)};
    auto [gx, gmu, gls, gbmu, gbls] =
        op.call(grad_y, x, w_mu, w_ls, defined_or_none(b_ls), saved[4],
                ctx->saved_data["seed"].toInt(), ctx->saved_data["n_samples"].toInt(), mask);
    if (mask[0] && gx.sizes() != x.sizes()) gx = gx.reshape(x.sizes());  // x broadcast over S
    return {mask[0] ? gx : at::Tensor(), mask[1] ? gmu : at::Tensor(),
            mask[2] ? gls : at::Tensor(), mask[3] ? gbmu : at::Tensor(),
            mask[4] ? gbls : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <const char* Name>
std::tuple<at::Tensor, at::Tensor> linear_autograd(const at::Tensor& x, const at::Tensor& w_mu,
                                                   const at::Tensor& w_ls,
                                                   const std::optional<at::Tensor>& b_mu,
                                                   const std::optional<at::Tensor>& b_ls,
                                                   int64_t seed, int64_t n_samples) {
  auto out = LinearFunction<Name>::apply(x, w_mu, w_ls, b_mu, b_ls, seed, n_samples);
  return {out[0], out[1]};
}

// ---- bayes_linear_inference --------------------------------------------------------------------
//
// The forward without a backward (the Python wrapper picks it when nothing needs a gradient). Its
// Autograd kernel says so: an input that needs a gradient gets a clear error naming it, instead of
// PyTorch's autograd fallback (a warning, and an output without a gradient).
using LinearInference = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, int64_t, int64_t);

// Refuses an input that needs a gradient under grad mode, naming it (operators without a
// backward). inputs: (name, tensor or null for an absent optional).
void refuse_grad(const char* op,
                 std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs,
                 const char* instead) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK(t == nullptr || !t->requires_grad(), op, ": ", name,
                " requires grad, but this operator has no backward; ", instead,
                " (or run under torch.no_grad())");
  }
}

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

at::Tensor linear_inference_autograd(const at::Tensor& x, const at::Tensor& w_mu,
                                     const at::Tensor& w_ls, const std::optional<at::Tensor>& b_mu,
                                     const std::optional<at::Tensor>& b_ls, int64_t seed,
                                     int64_t n_samples) {
  static const auto op = find_op<LinearInference>("bayes_linear_inference");
  refuse_grad("bayes_linear_inference",
              {{"x", &x}, {"weight_mu", &w_mu}, {"weight_log_sigma", &w_ls},
               {"bias_mu", opt(b_mu)}, {"bias_log_sigma", opt(b_ls)}},
              "use bnn_fast::bayes_linear");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, w_mu, w_ls, b_mu, b_ls, seed, n_samples);
}

// ---- bayes_mlp_inference -----------------------------------------------------------------------
//
// Inference only, like bayes_linear_inference.
using MlpInference = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, int64_t, const at::Tensor&,
                                const at::Tensor&, const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, int64_t, int64_t);

at::Tensor mlp_inference_autograd(const at::Tensor& x, const at::Tensor& w1_mu,
                                  const at::Tensor& w1_ls, const std::optional<at::Tensor>& b1_mu,
                                  const std::optional<at::Tensor>& b1_ls, int64_t seed1,
                                  const at::Tensor& w2_mu, const at::Tensor& w2_ls,
                                  const std::optional<at::Tensor>& b2_mu,
                                  const std::optional<at::Tensor>& b2_ls, int64_t seed2,
                                  int64_t n_samples) {
  static const auto op = find_op<MlpInference>("bayes_mlp_inference");
  refuse_grad("bayes_mlp_inference",
              {{"x", &x}, {"weight1_mu", &w1_mu}, {"weight1_log_sigma", &w1_ls},
               {"bias1_mu", opt(b1_mu)}, {"bias1_log_sigma", opt(b1_ls)},
               {"weight2_mu", &w2_mu}, {"weight2_log_sigma", &w2_ls},
               {"bias2_mu", opt(b2_mu)}, {"bias2_log_sigma", opt(b2_ls)}},
              "run the layers one by one");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, w1_mu, w1_ls, b1_mu, b1_ls, seed1, w2_mu, w2_ls, b2_mu, b2_ls, seed2,
                 n_samples);
}

// ---- bayes_mlp -------------------------------------------------------------------------------
//
// Saves the inputs and the seeds; the backward operator samples the weights again.
using MlpBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, int64_t, std::array<bool, 9>);

class MlpFunction : public torch::autograd::Function<MlpFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1_mu,
                            const at::Tensor& w1_ls, const std::optional<at::Tensor>& b1_mu,
                            const std::optional<at::Tensor>& b1_ls, int64_t seed1,
                            const at::Tensor& w2_mu, const at::Tensor& w2_ls,
                            const std::optional<at::Tensor>& b2_mu,
                            const std::optional<at::Tensor>& b2_ls, int64_t seed2,
                            int64_t n_samples) {
    static const auto op = find_op<MlpInference>("bayes_mlp");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = op.call(x, w1_mu, w1_ls, b1_mu, b1_ls, seed1, w2_mu, w2_ls, b2_mu, b2_ls,
                           seed2, n_samples);
    ctx->saved_data["seed1"] = seed1;
    ctx->saved_data["seed2"] = seed2;
    ctx->saved_data["n_samples"] = n_samples;
    // Undefined tensors stand for absent biases.
    ctx->save_for_backward({x, w1_mu, w1_ls, b1_mu.value_or(at::Tensor()),
                            b1_ls.value_or(at::Tensor()), w2_mu, w2_ls,
                            b2_mu.value_or(at::Tensor()), b2_ls.value_or(at::Tensor())});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<MlpBackward>("bayes_mlp_backward");
    const at::Tensor& grad_y = grads[0];
    const variable_list s = ctx->get_saved_variables();
    check_no_double_backward("bayes_mlp", {grad_y, s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                                           s[7], s[8]});
    // needs_input_grad counts the tensors passed (an absent bias is no input edge); the
    // returned list has one entry per argument of apply(): x, w1_mu, w1_ls, b1_mu, b1_ls, seed1,
    // w2_mu, w2_ls, b2_mu, b2_ls, seed2, n_samples. The tensors' positions in it:
    constexpr std::array<int, 9> input{0, 1, 2, 3, 4, 6, 7, 8, 9};
    std::array<bool, 9> mask{};
    size_t edge = 0;
    for (size_t k = 0; k < 9; ++k) {
      if (s[k].defined()) mask[k] = ctx->needs_input_grad(edge++);
    }
    auto g = op.call(grad_y, s[0], s[1], s[2], defined_or_none(s[3]), defined_or_none(s[4]),
                     ctx->saved_data["seed1"].toInt(), s[5], s[6], defined_or_none(s[7]),
                     defined_or_none(s[8]), ctx->saved_data["seed2"].toInt(),
                     ctx->saved_data["n_samples"].toInt(), mask);
    const std::array<at::Tensor, 9> got{std::get<0>(g), std::get<1>(g), std::get<2>(g),
                                        std::get<3>(g), std::get<4>(g), std::get<5>(g),
                                        std::get<6>(g), std::get<7>(g), std::get<8>(g)};
    variable_list out(12);
    for (size_t k = 0; k < 9; ++k) {
      if (mask[k]) out[input[k]] = got[k];  // gx has x's shape [S or 1, N, in]
    }
    return out;
  }
};

at::Tensor mlp_autograd(const at::Tensor& x, const at::Tensor& w1_mu, const at::Tensor& w1_ls,
                        const std::optional<at::Tensor>& b1_mu,
                        const std::optional<at::Tensor>& b1_ls, int64_t seed1,
                        const at::Tensor& w2_mu, const at::Tensor& w2_ls,
                        const std::optional<at::Tensor>& b2_mu,
                        const std::optional<at::Tensor>& b2_ls, int64_t seed2, int64_t n_samples) {
  return MlpFunction::apply(x, w1_mu, w1_ls, b1_mu, b1_ls, seed1, w2_mu, w2_ls, b2_mu, b2_ls,
                            seed2, n_samples);
}

// ---- sample_gaussian ---------------------------------------------------------------------------
//
// Saves log_sigma and the integers; the backward regenerates the noise from (seed, stream).
using SampleForward = at::Tensor(const std::optional<at::Tensor>&, const at::Tensor&, int64_t,
                                 int64_t, int64_t);
using SampleBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          int64_t, int64_t, int64_t,
                                                          std::array<bool, 2>);

class SampleFunction : public torch::autograd::Function<SampleFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const std::optional<at::Tensor>& mu,
                            const at::Tensor& log_sigma, int64_t seed, int64_t stream,
                            int64_t n_samples) {
    static const auto op = find_op<SampleForward>("sample_gaussian");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(mu, log_sigma, seed, stream, n_samples);
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["stream"] = stream;
    ctx->saved_data["n_samples"] = n_samples;
    ctx->saved_data["has_mu"] = mu.has_value();
    ctx->save_for_backward({log_sigma});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<SampleBackward>("sample_gaussian_backward");
    const at::Tensor& grad = grads[0];
    const at::Tensor log_sigma = ctx->get_saved_variables()[0];
    check_no_double_backward("sample_gaussian", {grad, log_sigma});
    // needs_input_grad counts the tensors passed: an absent mu is no input edge.
    const bool has_mu = ctx->saved_data["has_mu"].toBool();
    const std::array<bool, 2> mask{has_mu && ctx->needs_input_grad(0),
                                   ctx->needs_input_grad(has_mu ? 1 : 0)};
    auto [gmu, gls] = op.call(grad, log_sigma, ctx->saved_data["seed"].toInt(),
                              ctx->saved_data["stream"].toInt(),
                              ctx->saved_data["n_samples"].toInt(), mask);
    // One entry per argument of apply(): mu, log_sigma, seed, stream, n_samples.
    return {mask[0] ? gmu : at::Tensor(), mask[1] ? gls : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor sample_gaussian_autograd(const std::optional<at::Tensor>& mu,
                                    const at::Tensor& log_sigma, int64_t seed, int64_t stream,
                                    int64_t n_samples) {
  return SampleFunction::apply(mu, log_sigma, seed, stream, n_samples);
}

// ---- gaussian_kl -----------------------------------------------------------------------------

using KlForward = at::Tensor(at::TensorList, at::TensorList, double, double);
using KlBackward = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
    const at::Tensor&, at::TensorList, at::TensorList, double, double);

class KlFunction : public torch::autograd::Function<KlFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList mu, at::TensorList log_sigma,
                            double prior_mu, double prior_log_sigma) {
    static const auto op = find_op<KlForward>("gaussian_kl");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor kl = op.call(mu, log_sigma, prior_mu, prior_log_sigma);
    ctx->saved_data["n"] = int64_t(mu.size());
    ctx->saved_data["prior_mu"] = prior_mu;
    ctx->saved_data["prior_log_sigma"] = prior_log_sigma;
    std::vector<at::Tensor> to_save(mu.begin(), mu.end());
    to_save.insert(to_save.end(), log_sigma.begin(), log_sigma.end());
    ctx->save_for_backward(to_save);
    return kl;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<KlBackward>("gaussian_kl_backward");
    const variable_list saved = ctx->get_saved_variables();
    const int64_t n = ctx->saved_data["n"].toInt();
    const std::vector<at::Tensor> mu(saved.begin(), saved.begin() + n);
    const std::vector<at::Tensor> log_sigma(saved.begin() + n, saved.end());
    std::vector<at::Tensor> check{grads[0]};
    check.insert(check.end(), saved.begin(), saved.end());
    check_no_double_backward("gaussian_kl", check);
    auto [gmu, gls] = op.call(grads[0], mu, log_sigma, ctx->saved_data["prior_mu"].toDouble(),
                              ctx->saved_data["prior_log_sigma"].toDouble());
    // One gradient per tensor of mu, then of log_sigma (the order apply() extracted them in);
    // an input that needs none gets an undefined tensor.
    variable_list out;
    out.reserve(2 * n + 2);
    for (int64_t i = 0; i < 2 * n; ++i) {
      out.push_back(ctx->needs_input_grad(i) ? (i < n ? gmu[i] : gls[i - n]) : at::Tensor());
    }
    out.emplace_back();
    out.emplace_back();
    return out;
  }
};

at::Tensor gaussian_kl_autograd(at::TensorList mu, at::TensorList log_sigma, double prior_mu,
                                double prior_log_sigma) {
  return KlFunction::apply(mu, log_sigma, prior_mu, prior_log_sigma);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnn_fast, Autograd, m) {
  m.impl("bayes_linear", &linear_autograd<kReparam>);
  m.impl("bayes_linear_inference", &linear_inference_autograd);
  m.impl("bayes_mlp_inference", &mlp_inference_autograd);
  m.impl("bayes_mlp", &mlp_autograd);
  m.impl("bayes_linear_local", &linear_autograd<kLocal>);
  m.impl("bayes_linear_flipout", &linear_autograd<kFlipout>);
  m.impl("gaussian_kl", &gaussian_kl_autograd);
  m.impl("sample_gaussian", &sample_gaussian_autograd);
}

}  // namespace bnn_fast
