"""The Bayesian layer family: BayesConv1d/2d/3d, BayesConvTranspose1d/2d/3d and
BayesBatchNorm1d/2d/3d against their torch.nn counterparts (sigma = 0 and injected noise), the
counter-based noise they draw, S samples in one call, the closed-form output statistics,
gradcheck, the estimators, freeze, the KL and the argument errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnn_fast
import bnn_fast as bnn
from bnn_fast import _ops, reference
from bnn_fast.modules import _common
from bnn_fast.sampling import sample_many
from conftest import requires_ext

S, N = 3, 2

# (Bayesian class, torch.nn class, constructor arguments after the priors, input shape [N, ...])
CONVS = {
    "conv1d": (bnn.BayesConv1d, nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3,
                                                stride=2, padding=1, dilation=2, groups=2), (N, 4, 11)),
    "conv1d_reflect_same": (bnn.BayesConv1d, nn.Conv1d,
                            dict(in_channels=3, out_channels=2, kernel_size=4, padding="same",
                                 padding_mode="reflect", bias=False), (N, 3, 9)),
    "conv2d_nonsquare": (bnn.BayesConv2d, nn.Conv2d,
                         dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1),
                              padding=(1, 2), dilation=(1, 2), groups=2), (N, 4, 7, 6)),
    "conv2d_circular": (bnn.BayesConv2d, nn.Conv2d,
                        dict(in_channels=2, out_channels=3, kernel_size=3, padding=1,
                             padding_mode="circular"), (N, 2, 5, 6)),
    "conv3d": (bnn.BayesConv3d, nn.Conv3d,
               dict(in_channels=2, out_channels=4, kernel_size=(2, 3, 1), stride=(1, 2, 1),
                    padding=(1, 0, 1)), (N, 2, 4, 5, 3)),
    "conv3d_replicate": (bnn.BayesConv3d, nn.Conv3d,
                         dict(in_channels=2, out_channels=2, kernel_size=2, padding=1,
                              padding_mode="replicate", bias=False), (N, 2, 3, 3, 3)),
    "convT1d": (bnn.BayesConvTranspose1d, nn.ConvTranspose1d,
                dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1,
                     output_padding=1, groups=2), (N, 4, 5)),
    "convT2d_nonsquare": (bnn.BayesConvTranspose2d, nn.ConvTranspose2d,
                          dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(2, 3),
                               padding=(1, 0), output_padding=(1, 2), dilation=(1, 1)),
                          (N, 3, 4, 3)),
    "convT2d_dilated_nobias": (bnn.BayesConvTranspose2d, nn.ConvTranspose2d,
                               dict(in_channels=2, out_channels=2, kernel_size=2, dilation=2,
                                    bias=False), (N, 2, 3, 4)),
    "convT3d": (bnn.BayesConvTranspose3d, nn.ConvTranspose3d,
                dict(in_channels=2, out_channels=3, kernel_size=(2, 1, 2), stride=2), (N, 2, 2, 3, 2)),
}
NORMS = {
    "bn1d_2d": (bnn.BayesBatchNorm1d, nn.BatchNorm1d, dict(num_features=3), (4, 3)),
    "bn1d_3d": (bnn.BayesBatchNorm1d, nn.BatchNorm1d, dict(num_features=3, momentum=None), (4, 3, 5)),
    "bn2d": (bnn.BayesBatchNorm2d, nn.BatchNorm2d, dict(num_features=3, eps=1e-3), (4, 3, 2, 3)),
    "bn3d": (bnn.BayesBatchNorm3d, nn.BatchNorm3d, dict(num_features=2), (3, 2, 2, 2, 3)),
    "bn2d_nostats": (bnn.BayesBatchNorm2d, nn.BatchNorm2d,
                     dict(num_features=3, track_running_stats=False), (4, 3, 2, 2)),
    "bn3d_nobias": (bnn.BayesBatchNorm3d, nn.BatchNorm3d, dict(num_features=2, bias=False),
                    (3, 2, 2, 2, 2)),
}
CASES = {**CONVS, **NORMS}


def make(case, dtype=torch.float32):
    cls, _, kwargs, shape = CASES[case]
    torch.manual_seed(0)
    layer = cls(0.0, 0.1, **kwargs).to(dtype)
    with torch.no_grad():  # spread the sigmas so that every element counts
        for name, p in layer.named_parameters():
            if name.endswith("log_sigma"):
                p.uniform_(-3, -1)
            elif name.endswith("mu"):
                p.normal_()
    if hasattr(layer, "running_mean") and layer.running_mean is not None:
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
    return layer, torch.randn(shape, dtype=dtype)


def nn_twin(case, layer, weight, bias):
    """torch.nn's layer of `case` holding the given weight and bias (and the running stats)."""
    _, nn_cls, kwargs, _ = CASES[case]
    twin = nn_cls(**kwargs).to(layer.weight_mu.dtype)
    with torch.no_grad():
        twin.weight.copy_(weight)
        if bias is not None:
            twin.bias.copy_(bias)
    if hasattr(layer, "running_mean") and layer.running_mean is not None:
        twin.running_mean.copy_(layer.running_mean)
        twin.running_var.copy_(layer.running_var)
        twin.num_batches_tracked.copy_(layer.num_batches_tracked)
    return twin.train(layer.training)


@pytest.fixture
def recorded(monkeypatch):
    """Records what the sampling operator returns, per stream (its last call)."""
    samples = {}
    real = _ops.sample_gaussian

    def sample_gaussian(mu, log_sigma, seed, stream=0, n_samples=1):
        samples[stream] = real(mu, log_sigma, seed, stream, n_samples)
        return samples[stream]

    monkeypatch.setattr(_ops, "sample_gaussian", sample_gaussian)
    return samples


def zero_sigma(layer):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("log_sigma"):
                p.fill_(-math.inf)


# ----------------------------------------------------------------------------------------------
# against torch.nn


@pytest.mark.parametrize("reference_path", [False, True], ids=["kernels", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_zero_sigma_equals_the_torch_nn_layer(case, training, reference_path):
    layer, x = make(case)
    layer.train(training)
    zero_sigma(layer)
    twin = nn_twin(case, layer, layer.weight_mu, layer.bias_mu)
    with torch.no_grad():
        if reference_path:
            with bnn_fast.reference_path():
                got = layer(x)
        else:
            got = layer(x)
        want = twin(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if hasattr(layer, "running_mean") and layer.running_mean is not None:
        torch.testing.assert_close(layer.running_mean, twin.running_mean, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_equal_torch_nn_with_the_drawn_weights(case, recorded):
    layer, x = make(case)
    x.requires_grad_(True)
    torch.manual_seed(5)
    y = layer(x)
    weight = recorded[0][0]
    bias = recorded[1][0] if layer.bias_mu is not None else None
    twin = nn_twin(case, layer, weight.detach(), None if bias is None else bias.detach())
    if hasattr(layer, "running_mean") and layer.running_mean is not None:
        twin.running_mean.copy_(make(case)[0].running_mean)  # the state before the forward
        twin.running_var.copy_(make(case)[0].running_var)
        twin.num_batches_tracked.zero_()
    torch.testing.assert_close(y, twin(x))
    # Gradients: the reparameterization W = mu + exp(log_sigma) * eps by hand.
    g = torch.randn_like(y)
    params = [p for p in (layer.weight_mu, layer.weight_log_sigma, layer.bias_mu,
                          layer.bias_log_sigma) if p is not None]
    got = torch.autograd.grad(y, [x] + params, g)
    gw = torch.autograd.grad(twin(x), [x, twin.weight] + ([twin.bias] if bias is not None else []), g)
    eps_w = (weight - layer.weight_mu) / layer.weight_log_sigma.exp()
    torch.testing.assert_close(got[0], gw[0])
    torch.testing.assert_close(got[1], gw[1])
    torch.testing.assert_close(got[2], gw[1] * layer.weight_log_sigma.exp() * eps_w,
                               rtol=1e-4, atol=1e-5)
    if bias is not None:
        eps_b = (bias - layer.bias_mu) / layer.bias_log_sigma.exp()
        torch.testing.assert_close(got[3], gw[2])
        torch.testing.assert_close(got[4], gw[2] * layer.bias_log_sigma.exp() * eps_b,
                                   rtol=1e-4, atol=1e-5)


@requires_ext
@pytest.mark.parametrize("case", list(CASES))
def test_layers_draw_the_counter_based_noise_of_streams_0_and_1(case, recorded):
    layer, x = make(case)
    torch.manual_seed(11)
    layer(x)
    torch.manual_seed(11)
    seed = _ops.new_seed()
    eps_w = _ops.normal((1,) + tuple(layer.weight_mu.shape), seed, 0)
    torch.testing.assert_close(recorded[0], layer.weight_mu + layer.weight_log_sigma.exp() * eps_w)
    if layer.bias_mu is not None:
        eps_b = _ops.normal((1,) + tuple(layer.bias_mu.shape), seed, 1)
        torch.testing.assert_close(recorded[1], layer.bias_mu + layer.bias_log_sigma.exp() * eps_b)


@pytest.mark.parametrize("case", list(CASES))
def test_the_torchbnn_draws_on_the_reference_path_and_when_frozen(case):
    """Reference path and frozen layers draw with torch.randn_like, weight then bias."""
    layer, x = make(case)
    layer.eval()
    torch.manual_seed(2)
    with bnn_fast.reference_path():
        got = layer(x)
    torch.manual_seed(2)
    eps_w = torch.randn_like(layer.weight_log_sigma)
    bias = None
    if layer.bias_mu is not None:
        bias = layer.bias_mu + layer.bias_log_sigma.exp() * torch.randn_like(layer.bias_log_sigma)
    twin = nn_twin(case, layer, layer.weight_mu + layer.weight_log_sigma.exp() * eps_w, bias)
    torch.testing.assert_close(got, twin(x))
    torch.manual_seed(2)
    layer.freeze()
    assert torch.equal(layer.weight_eps, eps_w)
    torch.testing.assert_close(layer(x), twin(x))
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.unfreeze()
    assert layer.weight_eps is None and layer.bias_eps is None


# ----------------------------------------------------------------------------------------------
# S samples in one call


@pytest.mark.parametrize("grouped", [False, True], ids=["per-sample", "grouped"])
@pytest.mark.parametrize("folded", [False, True], ids=["broadcast", "folded"])
@pytest.mark.parametrize("case", list(CASES))
def test_sample_many_equals_separate_passes_with_the_same_weights(case, folded, grouped, recorded,
                                                                   monkeypatch):
    if grouped:  # the CUDA form (one grouped convolution), run on the CPU
        if case not in CONVS:
            pytest.skip("batch norm has one form")
        monkeypatch.setattr(bnn.modules.conv, "_GROUPED_DEVICES", {"cpu", "cuda"})
    layer, x = make(case)
    layer.eval()
    x = torch.randn((S * N,) + tuple(x.shape[1:])) if folded else x[:N]
    x.requires_grad_(True)
    with sample_many(S) as state:
        if folded:
            state.batch = N
        got = layer(x)
    got = got.reshape(S, N, *got.shape[1:])
    weights = recorded[0]
    biases = recorded[1] if layer.bias_mu is not None else [None] * S
    inputs = x.reshape(S, N, *x.shape[1:]) if folded else x.expand(S, *x.shape)
    want = []
    for s in range(S):
        if isinstance(layer, bnn.modules.batchnorm._BayesBatchNorm):
            stats = layer.track_running_stats
            want.append(F.batch_norm(inputs[s], layer.running_mean, layer.running_var,
                                     weights[s], biases[s], not stats, 0.0, layer.eps))
        else:
            want.append(layer._conv_forward(inputs[s], weights[s], biases[s]))
    want = torch.stack(want)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    params = [p for p in (x, layer.weight_mu, layer.weight_log_sigma, layer.bias_mu,
                          layer.bias_log_sigma) if p is not None]
    torch.testing.assert_close(torch.autograd.grad(got, params, g, retain_graph=True),
                               torch.autograd.grad(want, params, g))


@requires_ext
def test_sample_many_draws_sample_s_at_the_contract_index():
    layer, x = make("conv2d_nonsquare")
    torch.manual_seed(3)
    with sample_many(S):
        got = layer(x)
    got = got.reshape(S, N, *got.shape[1:])
    torch.manual_seed(3)
    seed = _ops.new_seed()
    eps_w = _ops.normal((S,) + tuple(layer.weight_mu.shape), seed, 0)
    eps_b = _ops.normal((S, 6), seed, 1)
    for s in range(S):
        want = layer._conv_forward(x, layer.weight_mu + layer.weight_log_sigma.exp() * eps_w[s],
                                   layer.bias_mu + layer.bias_log_sigma.exp() * eps_b[s])
        torch.testing.assert_close(got[s], want)


@pytest.mark.parametrize("case", ["conv1d", "convT2d_nonsquare", "conv3d", "bn2d"])
def test_output_statistics_match_the_closed_form(case):
    """Over many samples, every output element's mean and variance are the Gaussian's:
    E y = f(x; mu), Var y = f(x^2; sigma^2) (+ sigma_b^2) for the convolutions, and
    xhat * mu_g + mu_b, xhat^2 sigma_g^2 + sigma_b^2 for batch norm."""
    layer, x = make(case, torch.float64)
    layer.eval()
    x = x[:1]
    n_samples = 20000
    with torch.no_grad(), sample_many(n_samples):
        y = layer(x)
    y = y.reshape(n_samples, *y.shape[1:])
    sigma_w, sigma_b = layer.weight_log_sigma.exp(), None
    if layer.bias_mu is not None:
        sigma_b = layer.bias_log_sigma.exp()
    if isinstance(layer, bnn.modules.batchnorm._BayesBatchNorm):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (x - layer.running_mean.reshape(shape)) / (layer.running_var.reshape(shape) + layer.eps).sqrt()
        mean = xhat * layer.weight_mu.reshape(shape) + layer.bias_mu.reshape(shape)
        var = xhat ** 2 * sigma_w.reshape(shape) ** 2 + sigma_b.reshape(shape) ** 2
    else:
        mean = layer._conv_forward(x, layer.weight_mu, layer.bias_mu)
        var = layer._conv_forward(x * x, sigma_w ** 2, None if sigma_b is None else sigma_b ** 2)
    z_mean = (y.mean(0) - mean[0]) / (var[0] / n_samples).sqrt()
    # The sample variance of a Gaussian: standard error var * sqrt(2 / (n - 1)).
    z_var = (y.var(0) - var[0]) / (var[0] * math.sqrt(2 / (n_samples - 1)))
    assert z_mean.abs().max() < 5, z_mean.abs().max()
    assert z_var.abs().max() < 5, z_var.abs().max()


# ----------------------------------------------------------------------------------------------
# gradcheck


@pytest.mark.parametrize("case", ["conv1d", "conv2d_circular", "convT1d", "conv3d_replicate",
                                  "bn1d_3d", "bn2d_nostats"])
def test_gradcheck_float64(case):
    layer, x = make(case, torch.float64)
    layer.eval()
    names = [n for n, p in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = x[:2].clone().requires_grad_(True)

    def f(x, *values):
        torch.manual_seed(0)  # the same noise on every call
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# estimators


@pytest.mark.parametrize("estimator", ["local", "flipout"])
@pytest.mark.parametrize("case", ["conv1d", "conv2d_nonsquare", "convT2d_nonsquare", "conv3d"])
def test_estimators_give_every_output_the_reparameterized_distribution(case, estimator):
    layer, x = make(case, torch.float64)
    layer.estimator = estimator
    x = x[:1]
    n_samples = 20000
    with torch.no_grad(), sample_many(n_samples):
        y = layer(x)
    y = y.reshape(n_samples, *y.shape[1:])
    sigma_b = layer.bias_log_sigma.exp() ** 2 if layer.bias_mu is not None else None
    mean = layer._conv_forward(x, layer.weight_mu, layer.bias_mu)[0]
    var = layer._conv_forward(x * x, layer.weight_log_sigma.exp() ** 2, sigma_b)[0]
    z_mean = (y.mean(0) - mean) / (var / n_samples).sqrt()
    z_var = (y.var(0) - var) / (var * math.sqrt(2 / (n_samples - 1)))
    assert z_mean.abs().max() < 5 and z_var.abs().max() < 5, (z_mean.abs().max(), z_var.abs().max())


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_estimators_run_single_passes_unbatched_inputs_and_gradients(estimator):
    layer, x = make("conv2d_nonsquare")
    layer.estimator = estimator
    y = layer(x)
    assert y.shape == (N, 6, 4, 8)
    assert layer(x[0]).shape == (6, 4, 8)
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # A zero input without bias: "local"'s variance is 0 there and the gradient stays finite.
    layer = bnn.BayesConv1d(0, 0.1, 2, 3, 3, bias=False, estimator=estimator)
    layer(torch.zeros(2, 2, 5)).sum().backward()
    assert torch.isfinite(layer.weight_log_sigma.grad).all()


@requires_ext
def test_flipout_follows_its_formula_over_the_counter_based_noise():
    layer, x = make("conv1d")
    layer.estimator = "flipout"
    torch.manual_seed(9)
    got = layer(x)
    torch.manual_seed(9)
    seed = _ops.new_seed()
    like = layer.weight_mu
    delta = layer.weight_log_sigma.exp() * _ops.normal((1,) + tuple(like.shape), seed, 0)[0]
    s_in = torch.where(_ops.normal((1,) + tuple(x.shape), seed, 3)[0] >= 0, 1.0, -1.0)
    perturbation = layer._conv_forward(x * s_in, delta, None)
    s_out = torch.where(_ops.normal((1,) + tuple(perturbation.shape), seed, 4)[0] >= 0, 1.0, -1.0)
    bias = layer.bias_mu + layer.bias_log_sigma.exp() * _ops.normal((1, 6), seed, 1)[0]
    want = layer._conv_forward(x, layer.weight_mu, None) + perturbation * s_out + bias[:, None]
    torch.testing.assert_close(got, want)


def test_the_estimator_block_and_frozen_layers():
    layer, x = make("conv1d")
    with bnn_fast.estimator("local"):
        assert layer(x).shape == (N, 6, 5)
    layer.freeze()
    with bnn_fast.estimator("flipout"):  # frozen: the fixed noise, "reparam"
        torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="BayesConv1d: estimator must be one of"):
        layer.estimator = "mc"


# ----------------------------------------------------------------------------------------------
# transposed convolutions: output_size


def test_transposed_output_size_as_in_torch_nn():
    layer, x = make("convT2d_nonsquare")
    zero_sigma(layer)
    twin = nn_twin("convT2d_nonsquare", layer, layer.weight_mu, layer.bias_mu)
    for size in [(7, 9), (8, 10)]:
        with torch.no_grad():
            torch.testing.assert_close(layer(x, output_size=size), twin(x, output_size=size))
    with pytest.raises(TypeError, match="output_size"):
        make("conv1d")[0](make("conv1d")[1], output_size=[3])


# ----------------------------------------------------------------------------------------------
# construction: torch.nn's arguments and errors, dtype and device, repr


@pytest.mark.parametrize("cls,nn_cls,kwargs", [
    (bnn.BayesConv2d, nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, groups=2)),
    (bnn.BayesConv1d, nn.Conv1d, dict(in_channels=4, out_channels=4, kernel_size=3, groups=0)),
    (bnn.BayesConv3d, nn.Conv3d, dict(in_channels=2, out_channels=2, kernel_size=3, stride=2,
                                      padding="same")),
    (bnn.BayesConv1d, nn.Conv1d, dict(in_channels=2, out_channels=2, kernel_size=3,
                                      padding="full")),
    (bnn.BayesConv2d, nn.Conv2d, dict(in_channels=2, out_channels=2, kernel_size=3,
                                      padding_mode="mirror")),
    (bnn.BayesConvTranspose2d, nn.ConvTranspose2d, dict(in_channels=2, out_channels=2,
                                                        kernel_size=3, padding_mode="reflect")),
])
def test_constructor_errors_are_torch_nn_errors(cls, nn_cls, kwargs):
    with pytest.raises(ValueError) as theirs:
        nn_cls(**kwargs)
    with pytest.raises(ValueError) as ours:
        cls(0, 0.1, **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("case", list(CASES))
def test_float64_parameters_and_state_dict_round_trip(case):
    cls, nn_cls, kwargs, shape = CASES[case]
    layer = cls(0, 0.1, **kwargs, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer(torch.randn(shape, dtype=torch.float64)).dtype == torch.float64
    assert layer.weight_mu.shape == nn_cls(**kwargs).weight.shape
    other = cls(0, 0.1, **kwargs, dtype=torch.float64)
    other.load_state_dict(layer.state_dict(), strict=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    assert type(layer).__name__ in repr(layer)


def test_conv_repr_and_attributes_follow_torch_nn():
    layer = bnn.BayesConvTranspose2d(0, 0.1, 4, 6, (3, 2), stride=2, output_padding=1, groups=2,
                                     bias=False)
    assert repr(layer) == ("BayesConvTranspose2d(0, 0.1, 4, 6, kernel_size=(3, 2), stride=(2, 2), "
                           "output_padding=(1, 1), groups=2, bias=False)")
    assert layer.transposed and layer.bias is False and layer.bias_mu is None
    assert layer.weight_mu.shape == (4, 3, 3, 2)
    bound = 1 / math.sqrt(4 * 3 * 2)
    assert layer.weight_mu.abs().max() <= bound
    assert torch.all(layer.weight_log_sigma == math.log(0.1))


def test_layers_reject_bad_inputs_with_named_errors():
    with pytest.raises(ValueError, match=r"BayesConv3d: input must be 5D \(N, C, D, H, W\) or 4D"):
        bnn.BayesConv3d(0, 0.1, 2, 2, 2)(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match=r"BayesConv1d: input must have 2 channels \(in_channels\), got 3"):
        bnn.BayesConv1d(0, 0.1, 2, 2, 2)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"BayesBatchNorm1d: input must be 2D \(N, C\) or 3D"):
        bnn.BayesBatchNorm1d(0, 0.1, 2)(torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match=r"BayesBatchNorm3d: input must have 2 channels"):
        bnn.BayesBatchNorm3d(0, 0.1, 2)(torch.randn(2, 3, 2, 2, 2))
    with pytest.raises(TypeError, match="BayesConvTranspose1d: input must be a floating-point"):
        bnn.BayesConvTranspose1d(0, 0.1, 2, 2, 2)(torch.ones(2, 2, 3, dtype=torch.long))
    with sample_many(2), pytest.raises(ValueError, match="under sample_many the input must be 3D"):
        bnn.BayesConv1d(0, 0.1, 2, 2, 2)(torch.randn(2, 5))


def test_empty_batches_give_empty_outputs():
    for layer, x in [(bnn.BayesConv2d(0, 0.1, 2, 3, 3), torch.randn(0, 2, 5, 5)),
                     (bnn.BayesConvTranspose1d(0, 0.1, 2, 3, 3), torch.randn(0, 2, 4))]:
        y = layer(x)
        assert y.shape[0] == 0
        y.sum().backward()


# ----------------------------------------------------------------------------------------------
# the model level: KL, freeze, BayesModule, a torchbnn CNN script


def all_kinds_model():
    return nn.Sequential(
        bnn.BayesConv2d(0, 0.1, 1, 4, 3, padding=1), bnn.BayesBatchNorm2d(0, 0.1, 4), nn.ReLU(),
        bnn.BayesConvTranspose2d(0, 0.1, 4, 2, 2, stride=2), nn.Flatten(),
        bnn.BayesLinear(0, 0.1, 2 * 8 * 8, 5), bnn.BayesBatchNorm1d(0, 0.1, 5),
    )


def test_the_kl_counts_every_layer_of_the_family():
    model = all_kinds_model()
    kl = bnn.BKLLoss(reduction="sum")(model)
    want = sum(
        reference.gaussian_kl_elements(getattr(m, n + "_mu"), getattr(m, n + "_log_sigma"),
                                       m.prior_mu, m.prior_log_sigma).sum()
        for m in model.modules() if isinstance(m, bnn.modules.module.BayesLayer)
        for n in ("weight", "bias") if getattr(m, n + "_mu") is not None
    )
    torch.testing.assert_close(kl[0], want)
    n_params = sum(p.numel() for name, p in model.named_parameters() if name.endswith("_mu"))
    torch.testing.assert_close(bnn.BKLLoss()(model)[0], want / n_params)


def test_freeze_and_bayes_module_act_on_every_layer():
    model = all_kinds_model().eval()
    x = torch.randn(3, 1, 4, 4)
    bnn.utils.freeze(model)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    bnn.utils.unfreeze(model)
    assert not torch.equal(model(x), model(x))

    class Net(bnn.BayesModule):
        def __init__(self):
            super(bnn.BayesModule, self).__init__()  # as public scripts do: BayesModule skipped
            self.body = all_kinds_model()

        def forward(self, x):
            return self.body(x)

    net = Net().eval()
    assert net.freeze() is net
    assert all(m.weight_eps is not None for m in net.modules()
               if isinstance(m, bnn.modules.module.BayesLayer))
    torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
    assert net.unfreeze() is net
    assert all(m.weight_eps is None for m in net.modules()
               if isinstance(m, bnn.modules.module.BayesLayer))


def test_a_torchbnn_cnn_script_runs_unchanged():
    """A torchbnn-style CNN (BayesConv2d, BayesBatchNorm2d, BayesLinear, BKLLoss) trains and
    predicts with `import bnn_fast as bnn` in place of `import torchbnn as bnn`."""
    torch.manual_seed(0)
    model = nn.Sequential(
        bnn.BayesConv2d(prior_mu=0, prior_sigma=0.1, in_channels=1, out_channels=8, kernel_size=3),
        bnn.BayesBatchNorm2d(prior_mu=0, prior_sigma=0.1, num_features=8),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        bnn.BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=8 * 5 * 5, out_features=2),
    )
    x = torch.randn(64, 1, 12, 12)
    y = (x[:, 0, :6].sum((1, 2)) > x[:, 0, 6:].sum((1, 2))).long()
    ce_loss, kl_loss = nn.CrossEntropyLoss(), bnn.BKLLoss(reduction="mean", last_layer_only=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        cost = ce_loss(model(x), y) + 0.01 * kl_loss(model)
        optimizer.zero_grad()
        cost.backward()
        optimizer.step()
    model.eval()
    accuracy = (model(x).argmax(1) == y).float().mean()
    assert accuracy > 0.9, accuracy
    result = bnn.predictive(model, x[:8], 200, seed=0)
    assert result.mean.shape == (8, 2) and (result.std > 0).all()


# ----------------------------------------------------------------------------------------------
# half precision, autocast, empty batches, torchbnn-style subclasses


def test_local_keeps_small_spreads_in_half_precision():
    """float16's smallest normal (6.1e-5) as the variance floor would pin the std at 7.8e-3."""
    layer = bnn.BayesConv2d(0, 1e-3, 1, 1, 1, bias=False, estimator="local")
    with torch.no_grad():
        layer.weight_mu.zero_()
    x = torch.ones(256, 1, 8, 8)
    std32 = layer(x).std().item()
    std16 = layer.half()(x.half()).float().std().item()
    assert abs(std16 / std32 - 1) < 0.1, (std16, std32)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_estimators_keep_the_autocast_dtype(estimator):
    layer = bnn.BayesConv2d(0, 0.1, 2, 3, 3, estimator=estimator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 2, 5, 5))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("grouped", [False, True])
def test_empty_batches_under_sample_many(grouped, monkeypatch):
    if grouped:
        monkeypatch.setattr(bnn.modules.conv, "_GROUPED_DEVICES", {"cpu", "cuda"})
    layer = bnn.BayesConv2d(0, 0.1, 2, 4, 3).eval()
    with sample_many(3):
        assert layer(torch.randn(0, 2, 5, 5)).shape == (0, 4, 3, 3)


def test_torchbnn_style_subclasses_of_the_private_bases():
    """torchbnn 1.2 ships only 2D layers; users write theirs on its private bases."""
    from bnn_fast.modules.batchnorm import _BayesBatchNorm
    from bnn_fast.modules.conv import _BayesConvNd

    class BayesBatchNorm1d(_BayesBatchNorm):
        def _check_input_dim(self, input):
            if input.dim() not in (2, 3):
                raise ValueError("expected 2D or 3D input")

    bn = BayesBatchNorm1d(0, 0.1, 3)
    assert bn(torch.randn(4, 3)).shape == (4, 3)
    with pytest.raises(ValueError, match="expected 2D or 3D"):
        bn(torch.randn(4, 3, 2, 2))

    class BayesConv1d(_BayesConvNd):
        def __init__(self, prior_mu, prior_sigma, in_channels, out_channels, kernel_size):
            super().__init__(prior_mu, prior_sigma, in_channels, out_channels, (kernel_size,),
                             (1,), (0,), (1,), False, (0,), 1, True, "zeros")

        def forward(self, input):
            weight = self.weight_mu + torch.exp(self.weight_log_sigma) * torch.randn_like(self.weight_log_sigma)
            bias = self.bias_mu + torch.exp(self.bias_log_sigma) * torch.randn_like(self.bias_log_sigma)
            return F.conv1d(input, weight, bias)

    conv = BayesConv1d(0, 0.1, 2, 3, 3)
    assert conv.weight_mu.shape == (3, 2, 3)
    assert conv(torch.randn(4, 2, 7)).shape == (4, 3, 5)
    assert bnn.BKLLoss()(conv).shape == (1,)


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ops.has_kernel("sample_gaussian", "cuda")),
    reason="needs a CUDA GPU and the CUDA kernels compiled")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_layers_draw_the_cpus_noise_and_match_its_outputs(case, dtype):
    """The noise is bit-identical between CPU and CUDA (the RNG contract); the outputs and
    gradients agree to rounding, one sample and under sample_many (the grouped form on CUDA)."""
    cpu_layer, x = make(case, dtype)
    cpu_layer.eval()
    gpu = copy.deepcopy(cpu_layer).cuda()  # the same parameters and buffers on the GPU
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for n_samples in (None, 3):
        outputs = []
        for module, xx in ((cpu_layer, x), (gpu, x.cuda())):
            torch.manual_seed(4)
            xx = xx.clone().requires_grad_(True)
            if n_samples is None:
                y = module(xx)
            else:
                with sample_many(n_samples):
                    y = module(xx)
            (y * torch.linspace(-1, 1, y.numel(), dtype=dtype, device=y.device).reshape(y.shape)).sum().backward()
            outputs.append([y.detach().cpu(), xx.grad.cpu()] + [p.grad.cpu() for p in module.parameters()])
            module.zero_grad()
        for a, b in zip(*outputs):
            torch.testing.assert_close(b, a, **tol)


def test_a_compiled_cnn_gives_the_eager_outputs_and_gradients():
    """torch.compile traces the layers through the sampling operator's fake; the seed draw is a
    graph break, so the compiled model draws the eager model's noise under one seed."""
    model = nn.Sequential(bnn.BayesConv2d(0, 0.1, 1, 4, 3), bnn.BayesBatchNorm2d(0, 0.1, 4),
                          nn.ReLU(), nn.Flatten(), bnn.BayesLinear(0, 0.1, 4 * 6 * 6, 3))
    x = torch.randn(2, 1, 8, 8)
    compiled = torch.compile(model)
    grads = []
    for run in (compiled, model):
        torch.manual_seed(0)
        y = run(x)
        y.sum().backward()
        grads.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_one_sample_under_sample_many_equals_a_pass_with_that_weight(case, recorded):
    """sample_many(1) (predictive's chunks of large activations) takes its own short paths."""
    layer, x = make(case)
    layer.eval()
    with sample_many(1):
        got = layer(x)
    weight = recorded[0][0]
    bias = recorded[1][0] if layer.bias_mu is not None else None
    if isinstance(layer, bnn.modules.batchnorm._BayesBatchNorm):
        stats = layer.track_running_stats
        want = F.batch_norm(x, layer.running_mean, layer.running_var, weight, bias, not stats, 0.0,
                            layer.eps)
    else:
        want = layer._conv_forward(x, weight, bias)
    torch.testing.assert_close(got, want)
