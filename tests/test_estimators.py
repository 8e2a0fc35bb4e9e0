"""BayesLinear's estimators ("reparam", "local", "flipout"): each row's output distribution
against the closed form, one predictive distribution for all three, gradients against hand-written
formulas with injected noise, the counter-based noise streams, how an estimator is selected, and
the gradient variance each gives."""
import math
import threading
from contextlib import nullcontext

import pytest
import torch
from torch import nn

import bnn_fast
from bnn_fast import _ops, estimators, reference
from bnn_fast.modules import BayesLinear
from bnn_fast.predictive import predictive
from bnn_fast.sampling import sample_many
from conftest import requires_ext

NAMES = ["reparam", "local", "flipout"]
NOISE_SOURCES = [
    pytest.param("counter", marks=requires_ext),  # the compiled kernels' counter-based RNG
    "torch",  # the pure-PyTorch path: torch.randn
]


def noise_source(source):
    """The block in which the layers draw from `source`."""
    return bnn_fast.reference_path() if source == "torch" else nullcontext()


def make_params(out_f, in_f, bias, dtype=torch.float64, seed=0):
    """(weight_mu, weight_log_sigma, bias_mu, bias_log_sigma), leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.rand(out_f, in_f, generator=g, dtype=dtype) - 0.5,
              torch.randn(out_f, in_f, generator=g, dtype=dtype) * 0.3 - 1.0]
    if bias:
        params += [torch.rand(out_f, generator=g, dtype=dtype) - 0.5,
                   torch.randn(out_f, generator=g, dtype=dtype) * 0.3 - 1.0]
    else:
        params += [None, None]
    return [p if p is None else p.requires_grad_() for p in params]


def make_noise(S, N, in_f, out_f, dtype=torch.float64, seed=1):
    """Every noise tensor an estimator takes, for S samples of N rows."""
    g = torch.Generator().manual_seed(seed)

    def signs(*shape):
        return torch.randint(0, 2, shape, generator=g).to(dtype) * 2 - 1

    return dict(
        weight_eps=torch.randn(S, out_f, in_f, generator=g, dtype=dtype),
        bias_eps=torch.randn(S, out_f, generator=g, dtype=dtype),
        output_eps=torch.randn(S, N, out_f, generator=g, dtype=dtype),
        input_signs=signs(S, N, in_f),
        output_signs=signs(S, N, out_f),
    )


def estimate(name, x, params, noise, S):
    """Estimator `name` with the injected `noise`: x [1 or S, N, in] -> [S, N, out]."""
    w_mu, w_ls, b_mu, b_ls = params
    if name == "reparam":
        return reference.bayes_linear(x, w_mu, w_ls, b_mu, b_ls, noise["weight_eps"],
                                      noise["bias_eps"] if b_mu is not None else None)
    if name == "local":
        return estimators.local(x, *params, n_samples=S, output_eps=noise["output_eps"])
    return estimators.flipout(x, *params, n_samples=S, weight_eps=noise["weight_eps"],
                              bias_eps=noise["bias_eps"], input_signs=noise["input_signs"],
                              output_signs=noise["output_signs"])


def hand_written_gradients(name, x, params, noise, g):
    """The gradients of sum(g * estimate(...)) in (x, w_mu, w_ls, b_mu, b_ls), by hand."""
    w_mu, w_ls, b_mu, b_ls = (p if p is None else p.detach() for p in params)
    x = x.detach()
    xs = x.expand(g.shape[0], *x.shape[1:])  # [S, N, in]
    sigma = w_ls.exp()
    grad_mu = torch.einsum("sno,sni->oi", g, xs)
    grad_b_mu = g.sum((0, 1)) if b_mu is not None else None
    grad_b_ls = None
    if name == "reparam":
        weight = w_mu + sigma * noise["weight_eps"]  # [S, out, in]
        grad_w = torch.einsum("sno,sni->soi", g, xs)
        grad_ls = (grad_w * sigma * noise["weight_eps"]).sum(0)
        grad_x = torch.einsum("sno,soi->sni", g, weight)
        if b_mu is not None:
            grad_b_ls = (g.sum(1) * b_ls.exp() * noise["bias_eps"]).sum(0)
    elif name == "local":
        var = (xs * xs) @ (sigma * sigma).t()
        if b_mu is not None:
            var = var + (2 * b_ls).exp()
        grad_var = g * noise["output_eps"] / (2 * var.sqrt())  # [S, N, out]
        grad_ls = torch.einsum("sno,sni->oi", grad_var, xs * xs) * 2 * sigma * sigma
        grad_x = g @ w_mu + 2 * xs * (grad_var @ (sigma * sigma))
        if b_mu is not None:
            grad_b_ls = grad_var.sum((0, 1)) * 2 * (2 * b_ls).exp()
    else:
        delta = sigma * noise["weight_eps"]  # [S, out, in]
        g_flipped = g * noise["output_signs"]
        grad_delta = torch.einsum("sno,sni->soi", g_flipped, xs * noise["input_signs"])
        grad_ls = (grad_delta * delta).sum(0)
        grad_x = g @ w_mu + (g_flipped @ delta) * noise["input_signs"]
        if b_mu is not None:
            grad_b_ls = (g.sum(1) * b_ls.exp() * noise["bias_eps"]).sum(0)
    if x.shape[0] == 1:  # a broadcast x collects the gradient of every sample
        grad_x = grad_x.sum(0, keepdim=True)
    return grad_x, grad_mu, grad_ls, grad_b_mu, grad_b_ls


def closed_form(layer, x):
    """Each row's output mean and variance, [N, out] each, in float64."""
    x = x.double()
    mean = x @ layer.weight_mu.double().t()
    var = (x * x) @ (2 * layer.weight_log_sigma.double()).exp().t()
    if layer.bias:
        mean = mean + layer.bias_mu.double()
        var = var + (2 * layer.bias_log_sigma.double()).exp()
    return mean.detach(), var.detach()


def which_estimator_ran(layer, x):
    """The estimator a forward pass of `layer` at `x` runs (its fused operator or its PyTorch
    composition)."""
    ran = []

    def spy(module, attr, name):
        original = getattr(module, attr)

        def recorded(*args, **kwargs):
            ran.append(name)
            return original(*args, **kwargs)

        return recorded

    with pytest.MonkeyPatch.context() as patch:
        for name in ("local", "flipout"):
            patch.setattr(estimators, name, spy(estimators, name, name))
            patch.setattr(_ops, "bayes_linear_" + name, spy(_ops, "bayes_linear_" + name, name))
        layer(x)
    return ran[0] if ran else "reparam"


# ----------------------------------------------------------------------------------------------
# The distribution of each row's output


@pytest.mark.parametrize("source", NOISE_SOURCES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_each_rows_output_mean_and_variance_match_the_closed_form(name, bias, source):
    torch.manual_seed(0)
    layer = BayesLinear(0, 0.3, 4, 3, bias=bias, estimator=name)
    x = torch.randn(5, 4)
    S = 20_000
    with torch.no_grad(), noise_source(source), sample_many(S):
        y = layer(x).reshape(S, 5, 3).double()
    mean, var = closed_form(layer, x)
    # Every estimator's row output is exactly Gaussian: the sample variance has variance
    # 2 var^2 / (S - 1).
    z_mean = (y.mean(0) - mean) / (var / S).sqrt()
    z_var = (y.var(0) - var) / (var * (2 / (S - 1)) ** 0.5)
    assert z_mean.abs().max() < 5, z_mean
    assert z_var.abs().max() < 5, z_var


def test_the_three_estimators_give_one_predictive_distribution():
    torch.manual_seed(0)
    model = nn.Sequential(BayesLinear(0, 0.5, 3, 8), nn.ReLU(), BayesLinear(0, 0.5, 8, 2))
    x = torch.randn(4, 3)
    S = 20_000
    moments = {}
    for name in NAMES:
        with bnn_fast.estimator(name):
            y = predictive(model, x, S, return_samples=True, seed=1).samples.double()
        mean = y.mean(0)
        var = y.var(0, correction=0)
        fourth = (y - mean).pow(4).mean(0)
        # Standard errors of the sample mean and variance (the outputs are not Gaussian).
        moments[name] = (mean, (var / S).sqrt(), var, ((fourth - var * var) / S).sqrt())
    mean_r, se_mean_r, var_r, se_var_r = moments["reparam"]
    for name in ("local", "flipout"):
        mean, se_mean, var, se_var = moments[name]
        z_mean = (mean - mean_r) / (se_mean ** 2 + se_mean_r ** 2).sqrt()
        z_var = (var - var_r) / (se_var ** 2 + se_var_r ** 2).sqrt()
        assert z_mean.abs().max() < 5, (name, z_mean)
        assert z_var.abs().max() < 5, (name, z_var)


# ----------------------------------------------------------------------------------------------
# Gradients, with the noise injected

GRADIENT_CASES = [  # (S, x samples, N, in, out, bias)
    (1, 1, 4, 5, 3, True),
    (3, 1, 4, 5, 3, True),
    (3, 3, 2, 6, 4, False),
]


@pytest.mark.parametrize("S,xs,N,in_f,out_f,bias", GRADIENT_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_gradients_equal_the_hand_written_formulas(name, S, xs, N, in_f, out_f, bias):
    params = make_params(out_f, in_f, bias)
    noise = make_noise(S, N, in_f, out_f)
    x = torch.randn(xs, N, in_f, dtype=torch.float64, requires_grad=True)
    y = estimate(name, x, params, noise, S)
    assert y.shape == (S, N, out_f)
    g = torch.randn_like(y)
    inputs = [t for t in [x] + params if t is not None]
    got = torch.autograd.grad(y, inputs, g)
    want = [t for t in hand_written_gradients(name, x, params, noise, g) if t is not None]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("xs", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name, xs):
    params = make_params(3, 4, bias=True)
    noise = make_noise(2, 3, 4, 3)
    x = torch.randn(xs, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: estimate(name, t[0], t[1:], noise, 2), [x] + params)


def test_local_gives_finite_gradients_for_a_zero_row_without_bias():
    params = make_params(3, 4, bias=False)
    x = torch.zeros(1, 2, 4, dtype=torch.float64, requires_grad=True)
    y = estimators.local(x, *params, output_eps=torch.randn(1, 2, 3, dtype=torch.float64))
    grads = torch.autograd.grad(y.sum(), [x, params[0], params[1]])
    assert y.abs().max() < 1e-100
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# The noise


@requires_ext
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["local", "flipout"])
def test_layer_draws_the_counter_based_noise_of_its_streams(name, bias):
    torch.manual_seed(0)
    layer = BayesLinear(0, 0.2, 5, 3, bias=bias, estimator=name).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    S = 3
    torch.manual_seed(7)
    with sample_many(S):
        got = layer(x).reshape(S, 4, 3)
    torch.manual_seed(7)
    seed = _ops.new_seed()  # one seed per forward pass; one stream per kind of noise

    def normal(*shape, stream):
        return _ops.normal(shape, seed, stream, dtype=torch.float64)

    def signs(*shape, stream):
        return torch.where(normal(*shape, stream=stream) >= 0, 1.0, -1.0).double()

    noise = dict(weight_eps=normal(S, 3, 5, stream=0), bias_eps=normal(S, 3, stream=1),
                 output_eps=normal(S, 4, 3, stream=2), input_signs=signs(S, 4, 5, stream=3),
                 output_signs=signs(S, 4, 3, stream=4))
    params = [layer.weight_mu, layer.weight_log_sigma, layer.bias_mu, layer.bias_log_sigma]
    torch.testing.assert_close(got, estimate(name, x.unsqueeze(0), params, noise, S))


@pytest.mark.parametrize("name", ["local", "flipout"])
def test_the_pure_pytorch_path_does_not_use_the_counter_based_noise(name, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("_ops.normal called on the pure-PyTorch path")

    monkeypatch.setattr(_ops, "normal", refuse)
    layer = BayesLinear(0, 0.1, 5, 3, estimator=name)
    with bnn_fast.reference_path():
        assert layer(torch.randn(4, 5)).shape == (4, 3)


@pytest.mark.parametrize("name", ["local", "flipout"])
def test_each_forward_draws_new_noise(name):
    layer = BayesLinear(0, 0.1, 5, 3, estimator=name)
    x = torch.randn(4, 5)
    assert not torch.equal(layer(x), layer(x))


# ----------------------------------------------------------------------------------------------
# Selecting an estimator


def test_reparam_is_the_default():
    assert BayesLinear(0, 0.1, 5, 3).estimator == "reparam"


def test_the_constructor_argument_selects_the_estimator():
    x = torch.randn(2, 5)
    for name in NAMES:
        layer = BayesLinear(0, 0.1, 5, 3, estimator=name)
        assert layer.estimator == name
        assert which_estimator_ran(layer, x) == name


def test_the_estimator_argument_is_keyword_only():
    with pytest.raises(TypeError):
        BayesLinear(0, 0.1, 5, 3, True, None, None, "local")


def test_the_block_overrides_the_layers_choice_and_nests():
    layer = BayesLinear(0, 0.1, 5, 3, estimator="flipout")
    x = torch.randn(2, 5)
    with bnn_fast.estimator("local"):
        assert which_estimator_ran(layer, x) == "local"
        with bnn_fast.estimator("reparam"):
            assert which_estimator_ran(layer, x) == "reparam"
        assert which_estimator_ran(layer, x) == "local"
    assert which_estimator_ran(layer, x) == "flipout"


def test_the_block_is_restored_when_it_raises():
    with pytest.raises(KeyError):
        with bnn_fast.estimator("local"):
            raise KeyError("boom")
    assert estimators.current() is None


def test_the_block_is_thread_local():
    seen = []
    with bnn_fast.estimator("flipout"):
        thread = threading.Thread(target=lambda: seen.append(estimators.current()))
        thread.start()
        thread.join()
    assert seen == [None]


@pytest.mark.parametrize("name", ["local", "flipout"])
def test_a_frozen_layer_uses_reparam_with_its_fixed_noise(name):
    layer = BayesLinear(0, 0.1, 5, 3, estimator=name)
    layer.freeze()
    x = torch.randn(2, 5)
    weight = layer.weight_mu + layer.weight_log_sigma.exp() * layer.weight_eps
    bias = layer.bias_mu + layer.bias_log_sigma.exp() * layer.bias_eps
    want = nn.functional.linear(x, weight, bias)
    with bnn_fast.estimator(name):
        assert which_estimator_ran(layer, x) == "reparam"
        torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("bad", ["Local", "lrt", None, 3])
def test_invalid_names_raise_value_error_listing_the_valid_ones(bad):
    message = r"must be one of 'reparam', 'local', 'flipout', got "
    with pytest.raises(ValueError, match="BayesLinear: estimator " + message):
        BayesLinear(0, 0.1, 5, 3, estimator=bad)
    layer = BayesLinear(0, 0.1, 5, 3)
    with pytest.raises(ValueError, match="BayesLinear: estimator " + message):
        layer.estimator = bad
    assert layer.estimator == "reparam"
    with pytest.raises(ValueError, match="estimator: name " + message):
        with bnn_fast.estimator(bad):
            pass


def test_repr_shows_the_estimator_unless_reparam():
    prefix = "BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=5, out_features=3, bias=True"
    assert repr(BayesLinear(0, 0.1, 5, 3)) == prefix + ")"
    assert repr(BayesLinear(0, 0.1, 5, 3, estimator="reparam")) == prefix + ")"
    assert repr(BayesLinear(0, 0.1, 5, 3, estimator="local")) == prefix + ", estimator='local')"


# ----------------------------------------------------------------------------------------------
# Gradient variance


def weight_mu_gradient_variance(layer, x, target, repeats=40):
    """The variance over noise draws of d loss / d weight_mu, averaged over its elements."""
    grads = []
    for _ in range(repeats):
        loss = (layer(x) - target).square().sum(-1).mean()
        grads.append(torch.autograd.grad(loss, layer.weight_mu)[0])
    return torch.stack(grads).var(0).mean().item()


@pytest.mark.parametrize("name,shrinks", [("reparam", False), ("local", True), ("flipout", True)])
def test_gradient_variance_shrinks_with_the_batch_only_for_per_row_noise(name, shrinks):
    torch.manual_seed(0)
    layer = BayesLinear(0, 0.1, 64, 64, estimator=name)
    x8, target8 = torch.randn(8, 64), torch.randn(8, 64)
    # The big batch repeats the small one 16 times: the same data, so only the noise differs.
    x128, target128 = x8.repeat(16, 1), target8.repeat(16, 1)
    ratio = (weight_mu_gradient_variance(layer, x8, target8)
             / weight_mu_gradient_variance(layer, x128, target128))
    if shrinks:
        assert ratio > 8, ratio  # 16 in expectation: independent noise per row
    else:
        assert 0.5 < ratio < 2, ratio  # 1 in expectation: one weight sample for all rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_low_precision_floors_the_variance_at_float32s_tiny(dtype):
    # The kernels compute in float: float16's own tiny (6.1e-5) pinned the output std at 7.8e-3
    # and zeroed the gradient to log_sigma below it. Here var = 1e-6: std 1e-3, gradient std.
    x = torch.ones(1, 1, 1, dtype=dtype)
    mu = torch.zeros(1, 1, dtype=dtype, requires_grad=True)
    ls = torch.full((1, 1), math.log(1e-3), dtype=dtype, requires_grad=True)
    y = estimators.local(x, mu, ls, output_eps=torch.ones(1, 1, 1, dtype=dtype))
    y.sum().backward()
    assert abs(y.item() - 1e-3) < 1e-4
    assert abs(ls.grad.item() - 1e-3) < 1e-4
