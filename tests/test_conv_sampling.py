"""BayesConv2d and BayesBatchNorm2d under bnn_fast.sampling.sample_many: S samples in one call
equal S separate computations with the same noise, and a small CNN runs under predictive()."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnn_fast
from bnn_fast import _ops
from bnn_fast.modules import BayesBatchNorm2d, BayesConv2d, BayesLinear, _common
from bnn_fast.predictive import predictive
from bnn_fast.sampling import sample_many
from conftest import requires_ext

S, N = 3, 2


@pytest.fixture
def known_noise(monkeypatch):
    """Records the noise the layers draw: a dict stream -> the last noise tensor drawn on it,
    whether drawn by the sampling operator (patched to draw with torch.randn here) or, on the
    pure-PyTorch path, by _common.draw_normal."""
    drawn = {}

    def draw_normal(shape, seed, stream, like):
        drawn[stream] = torch.randn(shape, dtype=like.dtype, device=like.device)
        return drawn[stream]

    def sample_gaussian(mu, log_sigma, seed, stream=0, n_samples=1):
        eps = draw_normal((n_samples,) + tuple(log_sigma.shape), seed, stream, log_sigma)
        return bnn_fast.reference.sample_gaussian(mu, log_sigma, eps)

    monkeypatch.setattr(_common, "draw_normal", draw_normal)
    monkeypatch.setattr(_ops, "sample_gaussian", sample_gaussian)
    return drawn


def run_folded(layer, x, folded):
    """`layer` under sample_many(S) -> [S, N, ...]. x: [N, ...], or [S*N, ...] when `folded`
    (activations of an earlier Bayesian layer, sample-major)."""
    with sample_many(S) as state:
        if folded:
            state.batch = N  # as if an earlier Bayesian layer had folded the input
        y = layer(x)
    assert y.shape[0] == S * N
    return y.reshape(S, N, *y.shape[1:])


def per_sample_inputs(x, folded):
    return x.reshape(S, N, *x.shape[1:]) if folded else x.expand(S, *x.shape)


def sampled(mu, log_sigma, eps):
    return mu + log_sigma.exp() * eps


# ----------------------------------------------------------------------------------------------
# BayesConv2d


@pytest.mark.parametrize("folded", [False, True], ids=["broadcast", "folded"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding", [1, "same"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_samples_equal_separate_convolutions(padding_mode, padding, groups, folded,
                                                  known_noise):
    torch.manual_seed(0)
    layer = BayesConv2d(0, 0.1, 4, 6, (3, 2), padding=padding, dilation=(1, 2), groups=groups,
                        padding_mode=padding_mode)
    x = torch.randn(S * N if folded else N, 4, 6, 7, requires_grad=True)
    got = run_folded(layer, x, folded)
    eps_w, eps_b = known_noise[0], known_noise[1]
    assert eps_w.shape == (S, 6, 4 // groups, 3, 2) and eps_b.shape == (S, 6)
    want = torch.stack([
        layer._conv_forward(xs, sampled(layer.weight_mu, layer.weight_log_sigma, eps_w[s]),
                            sampled(layer.bias_mu, layer.bias_log_sigma, eps_b[s]))
        for s, xs in enumerate(per_sample_inputs(x, folded))
    ])
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    params = [x, layer.weight_mu, layer.weight_log_sigma, layer.bias_mu, layer.bias_log_sigma]
    torch.testing.assert_close(torch.autograd.grad(got, params, g),
                               torch.autograd.grad(want, params, g))


@pytest.mark.parametrize("padding_mode", ["replicate", "circular"])
def test_conv_samples_follow_the_other_padding_modes(padding_mode, known_noise):
    layer = BayesConv2d(0, 0.1, 2, 3, 3, stride=2, padding=(2, 1), bias=False,
                        padding_mode=padding_mode)
    x = torch.randn(N, 2, 7, 6)
    got = run_folded(layer, x, folded=False)
    want = torch.stack([
        layer._conv_forward(x, sampled(layer.weight_mu, layer.weight_log_sigma, eps), None)
        for eps in known_noise[0]
    ])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("folded", [False, True], ids=["broadcast", "folded"])
def test_frozen_conv_uses_its_fixed_noise_for_every_sample(folded):
    layer = BayesConv2d(0, 0.1, 2, 3, 3, padding=1)
    layer.freeze()
    x = torch.randn(S * N if folded else N, 2, 5, 5)
    want = torch.stack([layer(xs) for xs in per_sample_inputs(x, folded)])
    torch.testing.assert_close(run_folded(layer, x, folded), want)


@requires_ext
def test_conv_samples_draw_the_counter_based_noise_of_streams_0_and_1():
    layer = BayesConv2d(0, 0.1, 2, 3, 3)
    x = torch.randn(N, 2, 5, 5)
    torch.manual_seed(4)
    got = run_folded(layer, x, folded=False)
    torch.manual_seed(4)
    seed = _ops.new_seed()
    eps_w = _ops.normal((S, 3, 2, 3, 3), seed, 0)
    eps_b = _ops.normal((S, 3), seed, 1)
    want = torch.stack([
        layer._conv_forward(x, sampled(layer.weight_mu, layer.weight_log_sigma, eps_w[s]),
                            sampled(layer.bias_mu, layer.bias_log_sigma, eps_b[s]))
        for s in range(S)
    ])
    torch.testing.assert_close(got, want)


def test_conv_under_sample_many_needs_a_batched_input():
    message = r"BayesConv2d: under sample_many the input must be 4D \(N, C, H, W\), got 3D"
    with sample_many(S), pytest.raises(ValueError, match=message):
        BayesConv2d(0, 0.1, 2, 3, 3)(torch.randn(2, 5, 5))


def small_cnn(batch_norm=False):
    torch.manual_seed(0)
    layers = [BayesConv2d(0, 0.1, 2, 4, 3, padding=1)]
    if batch_norm:
        layers.append(BayesBatchNorm2d(0, 0.1, 4))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), BayesLinear(0, 0.1, 4 * 3 * 3, 3)]
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_small_cnn_runs_folded_under_predictive(batch_norm):
    model = small_cnn(batch_norm)
    x = torch.randn(5, 2, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: every Bayesian layer folds
        result = predictive(model, x, 400, chunk_size=200, seed=0)
    assert result.mean.shape == (5, 3) and (result.std > 0).all()
    with torch.no_grad():
        plain = torch.stack([model(x) for _ in range(400)])  # one sample per pass
    z = (result.mean - plain.mean(0)) / ((result.std ** 2 + plain.var(0)) / 400).sqrt()
    assert z.abs().max() < 5, z


# ----------------------------------------------------------------------------------------------
# BayesBatchNorm2d


def make_batchnorm(**kwargs):
    torch.manual_seed(0)
    layer = BayesBatchNorm2d(0, 0.1, 3, **kwargs).eval()
    if layer.track_running_stats:
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
    return layer


@pytest.mark.parametrize("folded", [False, True], ids=["broadcast", "folded"])
def test_batchnorm_eval_samples_equal_per_sample_batch_norm(folded, known_noise):
    layer = make_batchnorm()
    x = torch.randn(S * N if folded else N, 3, 4, 4)
    state_before = {k: v.clone() for k, v in layer.state_dict().items()}
    got = run_folded(layer, x, folded)
    eps_w, eps_b = known_noise[0], known_noise[1]
    want = torch.stack([
        F.batch_norm(xs, layer.running_mean, layer.running_var,
                     sampled(layer.weight_mu, layer.weight_log_sigma, eps_w[s]),
                     sampled(layer.bias_mu, layer.bias_log_sigma, eps_b[s]), False, 0.0, layer.eps)
        for s, xs in enumerate(per_sample_inputs(x, folded))
    ])
    torch.testing.assert_close(got, want)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state_before[key]), key  # running statistics untouched


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("folded", [False, True], ids=["broadcast", "folded"])
def test_batchnorm_without_running_stats_normalizes_each_sample_by_its_own_batch(
        folded, training, known_noise):
    layer = make_batchnorm(track_running_stats=False).train(training)
    x = torch.randn(S * N if folded else N, 3, 4, 4)
    got = run_folded(layer, x, folded)
    eps_w, eps_b = known_noise[0], known_noise[1]
    want = torch.stack([
        F.batch_norm(xs, None, None, sampled(layer.weight_mu, layer.weight_log_sigma, eps_w[s]),
                     sampled(layer.bias_mu, layer.bias_log_sigma, eps_b[s]), True, 0.0, layer.eps)
        for s, xs in enumerate(per_sample_inputs(x, folded))
    ])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("folded", [False, True], ids=["broadcast", "folded"])
def test_batchnorm_without_affine_normalizes_every_sample(folded):
    layer = make_batchnorm(affine=False)
    x = torch.randn(S * N if folded else N, 3, 4, 4)
    want = torch.stack([layer(xs) for xs in per_sample_inputs(x, folded)])
    torch.testing.assert_close(run_folded(layer, x, folded), want)


def test_frozen_batchnorm_uses_its_fixed_noise_for_every_sample():
    layer = make_batchnorm()
    layer.freeze()
    x = torch.randn(N, 3, 4, 4)
    torch.testing.assert_close(run_folded(layer, x, folded=False), layer(x).expand(S, *x.shape))


def test_batchnorm_in_training_mode_under_sample_many_asks_for_eval_mode():
    layer = make_batchnorm().train()
    message = r"BayesBatchNorm2d: .*model\.eval\(\)"
    with sample_many(S), pytest.raises(NotImplementedError, match=message):
        layer(torch.randn(N, 3, 4, 4))
    with pytest.raises(NotImplementedError, match=r"model\.eval\(\)"):
        predictive(small_cnn(batch_norm=True).train(), torch.randn(N, 2, 6, 6), 10)
