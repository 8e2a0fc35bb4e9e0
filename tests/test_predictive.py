"""bnn_fast.predictive: streamed posterior predictive statistics against closed forms, the
one-chunk result, torch.quantile and brute-force classification statistics."""
import math
import warnings

import pytest
import torch
from torch import nn

import bnn_fast
from bnn_fast.predictive import predictive, predictive_classification
from bnn_fast.sampling import current, fold_input, unfold_output

real_layers_wired = pytest.mark.skipif(
    not getattr(bnn_fast.BayesLinear, "_supports_sampling", False),
    reason="bnn_fast.BayesLinear does not follow bnn_fast.sampling yet (_supports_sampling unset)",
)


class ToyBayesLinear(nn.Module):
    """A float64 Bayesian linear layer that follows bnn_fast.sampling, with given means and
    standard deviations: sample s uses W_s = mu + sigma * eps_s, y = x W_s^T + b_s.

    The noise is drawn sample by sample, so a run's samples do not depend on the chunking;
    `draws` records the number of samples of every forward pass.
    """

    _supports_sampling = True

    def __init__(self, weight_mu, weight_sigma, bias_mu, bias_sigma):
        super().__init__()
        f64 = dict(dtype=torch.float64)
        self.weight_mu = nn.Parameter(torch.as_tensor(weight_mu, **f64))
        self.weight_log_sigma = nn.Parameter(torch.as_tensor(weight_sigma, **f64).log())
        self.bias_mu = nn.Parameter(torch.as_tensor(bias_mu, **f64))
        self.bias_log_sigma = nn.Parameter(torch.as_tensor(bias_sigma, **f64).log())
        self.draws = []

    def forward(self, x):
        if current() is None:
            return self._sampled(x.unsqueeze(0), 1)[0]
        xs, s = fold_input(x, "ToyBayesLinear")
        return unfold_output(self._sampled(xs, s))

    def _sampled(self, xs, s):
        self.draws.append(s)
        eps = [(torch.randn_like(self.weight_mu), torch.randn_like(self.bias_mu)) for _ in range(s)]
        w = self.weight_mu + self.weight_log_sigma.exp() * torch.stack([e for e, _ in eps])
        b = self.bias_mu + self.bias_log_sigma.exp() * torch.stack([e for _, e in eps])
        return xs @ w.transpose(-1, -2) + b.unsqueeze(1)


class Unwired(ToyBayesLinear):
    """The same layer, not declaring sampling support: predictive must loop over plain passes."""

    _supports_sampling = False


W_MU, W_SIGMA, B_MU, B_SIGMA = [[0.5, -1.0, 2.0]], [[0.3, 0.1, 0.2]], [0.7], [0.4]
X = torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.5, 0.5], [-2.0, 1.0, 3.0], [0.0, 0.0, 0.0]],
                 dtype=torch.float64)


def toy(cls=ToyBayesLinear):
    return cls(W_MU, W_SIGMA, B_MU, B_SIGMA)


def closed_form(x, w_mu, w_sigma, b_mu, b_sigma):
    """Mean and std of x W^T + b with independent Gaussian W and b: [N, out] each."""
    mean = x @ w_mu.T + b_mu
    var = (x**2) @ (w_sigma**2).T + b_sigma**2
    return mean, var.sqrt()


def toy_closed_form():
    values = (torch.tensor(v, dtype=torch.float64) for v in (W_MU, W_SIGMA, B_MU, B_SIGMA))
    return closed_form(X, *values)


def layer_closed_form(layer):
    p = {name: t.detach().double() for name, t in layer.named_parameters()}
    return closed_form(X, p["weight_mu"], p["weight_log_sigma"].exp(),
                       p["bias_mu"], p["bias_log_sigma"].exp())


def assert_matches_closed_form(result, mean, std, n):
    # The sample mean has standard error std/sqrt(n); a Gaussian's sample std, std/sqrt(2n).
    z_mean = (result.mean.double() - mean) / (std / math.sqrt(n))
    z_std = (result.std.double() - std) / (std / math.sqrt(2 * n))
    assert z_mean.abs().max() < 5, z_mean
    assert z_std.abs().max() < 5, z_std


# ----------------------------------------------------------------------------------------------
# Statistics


def test_mean_and_std_of_one_bayesian_linear_match_the_closed_form():
    torch.manual_seed(0)
    n = 20_000
    result = predictive(toy(), X, n)
    mean, std = toy_closed_form()
    assert result.mean.shape == result.std.shape == (4, 1)
    assert result.mean.dtype == torch.float64 and result.n_samples == n
    assert_matches_closed_form(result, mean, std, n)


@pytest.mark.parametrize("chunk_size", [1, 37, None])
def test_streaming_over_chunks_equals_the_one_chunk_result(chunk_size):
    whole = predictive(toy(), X, 1000, chunk_size=1000, seed=3, return_samples=True)
    chunked = predictive(toy(), X, 1000, chunk_size=chunk_size, seed=3)
    torch.testing.assert_close(chunked.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.std, whole.std, rtol=1e-12, atol=1e-12)
    # ... and both equal the two-pass statistics of the samples (population std).
    two_pass = whole.samples.mean(0), whole.samples.std(0, correction=0)
    torch.testing.assert_close(whole.mean, two_pass[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.std, two_pass[1], rtol=1e-12, atol=1e-12)


def test_std_stays_accurate_when_it_is_tiny_next_to_the_mean():
    # y ~ N(1e9, 1): E[y^2] - E[y]^2 would lose everything in float64; Chan's merge does not.
    layer = ToyBayesLinear([[0.0]], [[1e-30]], [1e9], [1.0])
    result = predictive(layer, torch.zeros(2, 1, dtype=torch.float64), 2000, chunk_size=64,
                        seed=0, return_samples=True)
    # float64 holds 1e9 + y to ~1e-7, so agreement with the two-pass std is all one can ask.
    torch.testing.assert_close(result.std, result.samples.std(0, correction=0), rtol=1e-6, atol=0)
    assert (result.std - 1).abs().max() < 0.1
    naive = ((result.samples**2).mean(0) - result.samples.mean(0) ** 2).clamp_min(0).sqrt()
    assert (naive - result.std).abs().max() > 0.1  # what a sum-of-squares merge would give


def test_quantiles_agree_with_torch_quantile_of_the_samples():
    q = [0.025, 0.5, 0.975]
    result = predictive(toy(), X, 3000, chunk_size=256, quantiles=q, return_samples=True, seed=0)
    assert result.samples.shape == (3000, 4, 1) and result.samples.device.type == "cpu"
    assert result.quantiles.shape == (3, 4, 1)
    expected = torch.quantile(result.samples, torch.tensor(q, dtype=torch.float64), dim=0)
    torch.testing.assert_close(result.quantiles, expected)
    # Without return_samples the samples are kept only to compute the quantiles.
    q_tensor = torch.tensor(q, dtype=torch.float64)
    again = predictive(toy(), X, 3000, chunk_size=256, quantiles=q_tensor, seed=0)
    assert again.samples is None
    torch.testing.assert_close(again.quantiles, expected)


# ----------------------------------------------------------------------------------------------
# Chunking: memory bounded by the chunk, whatever n_samples


def test_no_forward_pass_draws_more_than_the_chunk():
    layer = toy()
    result = predictive(layer, X, 1000, chunk_size=64)
    assert result.chunk_size == 64
    assert max(layer.draws) == 64 and sum(layer.draws) == 1000
    assert layer.draws == [64] * 15 + [40]


def test_automatic_chunk_size_follows_the_budget_not_n_samples():
    # A wide hidden layer, not the one-column output, sets the per-sample cost (about 100 KB:
    # twice its [4, 512] float64 activation and twice its 4 KB * 8 parameters).
    def model():
        torch.manual_seed(0)
        return nn.Sequential(ToyBayesLinear(torch.randn(512, 3), torch.full((512, 3), 0.1),
                                            torch.zeros(512), torch.full((512,), 0.1)),
                             nn.Linear(512, 1, dtype=torch.float64))

    sizes = []
    for n in (500, 2000):
        m = model()
        result = predictive(m, X, n, memory_budget_mb=2)
        draws = m[0].draws
        assert draws[0] == 1  # the probe pass, which counts as the first sample
        assert max(draws) <= result.chunk_size and sum(draws) == n
        sizes.append(result.chunk_size)
    assert sizes[0] == sizes[1] and 5 < sizes[0] < 50


def test_automatic_chunk_size_is_capped_by_n_samples():
    assert predictive(toy(), X, 50).chunk_size == 50


# ----------------------------------------------------------------------------------------------
# Models that do not (all) follow the protocol


def test_unwired_bayesian_layers_fall_back_to_one_pass_per_sample_with_a_warning():
    layer = toy(Unwired)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="Unwired do not support"):
        result = predictive(layer, X, 4000, chunk_size=500)
    assert set(layer.draws) == {1} and len(layer.draws) == 4000
    assert_matches_closed_form(result, *toy_closed_form(), 4000)


def test_a_model_without_bayesian_layers_runs_plain_passes_silently():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = predictive(model, X, 10)
    torch.testing.assert_close(result.mean, model(X).detach())
    assert result.std.abs().max() < 1e-12


def test_a_layer_that_claims_support_but_does_not_fold_is_reported():
    class Liar(nn.Module):
        _supports_sampling = True

        def forward(self, x):
            return x

    message = r"returned 4 rows for a batch of 4, expected 3\*4=12.*fold_input"
    with pytest.raises(RuntimeError, match=message):
        predictive(Liar(), X, 10, chunk_size=3)


def test_real_bayes_linear_matches_the_closed_form():
    # Folded when BayesLinear supports sampling, one pass per sample (with a warning) otherwise.
    torch.manual_seed(0)
    layer = bnn_fast.BayesLinear(prior_mu=0, prior_sigma=0.2, in_features=3, out_features=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = predictive(layer, X.float(), 20_000)
    assert result.mean.shape == (4, 2) and result.mean.dtype == torch.float32
    assert_matches_closed_form(result, *layer_closed_form(layer), 20_000)


@real_layers_wired
def test_real_bayes_linear_is_sampled_in_folded_chunks():
    torch.manual_seed(0)
    model = nn.Sequential(bnn_fast.BayesLinear(0, 0.2, 3, 16), nn.ReLU(),
                          bnn_fast.BayesLinear(0, 0.2, 16, 1))
    x = X.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: every layer folds
        chunked = predictive(model, x, 2000, chunk_size=250, return_samples=True, seed=1)
    torch.testing.assert_close(chunked.mean, chunked.samples.mean(0))
    torch.testing.assert_close(chunked.std, chunked.samples.std(0, correction=0))
    assert chunked.samples.std(0).min() > 0



# ----------------------------------------------------------------------------------------------
# Classification


def two_class_model(sigma):
    """logits [z, -z] with z ~ N(0.5, sigma^2) per sample (the same z for every row)."""
    linear = nn.Linear(1, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    return nn.Sequential(ToyBayesLinear([[0.0]], [[1e-30]], [0.5], [sigma]), linear)


def test_classification_statistics_equal_brute_force_over_the_same_samples():
    x = torch.zeros(3, 1, dtype=torch.float64)
    result = predictive_classification(two_class_model(3.0), x, 2000, chunk_size=128, seed=5)
    logits = predictive(two_class_model(3.0), x, 2000, chunk_size=128, seed=5,
                        return_samples=True).samples
    p = logits.softmax(-1)  # [S, N, C]
    probs = p.mean(0)
    entropy = -(probs * probs.log()).sum(-1)
    expected_entropy = -(p * p.log()).sum(-1).mean(0)
    torch.testing.assert_close(result.probs, probs)
    torch.testing.assert_close(result.entropy, entropy)
    torch.testing.assert_close(result.expected_entropy, expected_entropy)
    torch.testing.assert_close(result.mutual_information, entropy - expected_entropy)
    # Models disagree (z spreads over both signs): most of the uncertainty is epistemic.
    assert (result.mutual_information > 0.3).all()


def test_classification_of_a_deterministic_model_has_no_epistemic_part():
    x = torch.randn(5, 1, dtype=torch.float64)
    result = predictive_classification(two_class_model(1e-30), x, 20, chunk_size=8)
    p = torch.tensor([0.5, -0.5], dtype=torch.float64).softmax(0)
    torch.testing.assert_close(result.probs, p.expand(5, 2))
    torch.testing.assert_close(result.entropy, result.expected_entropy)
    assert result.entropy.shape == (5,) and (result.mutual_information.abs() < 1e-12).all()


def test_classification_needs_class_logits():
    with pytest.raises(ValueError, match=r"logits \[N, C, \.\.\.\]"):
        predictive_classification(nn.Flatten(0), X, 4)


# ----------------------------------------------------------------------------------------------
# Reproducibility and progress


def test_reproducible_under_torch_manual_seed():
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        results.append(predictive(toy(), X, 300, chunk_size=50))
    assert torch.equal(results[0].mean, results[1].mean)
    assert torch.equal(results[0].std, results[1].std)


def test_seed_argument_is_reproducible_and_leaves_the_global_generator_alone():
    state = torch.get_rng_state()
    a = predictive(toy(), X, 300, seed=7)
    b = predictive(toy(), X, 300, seed=7)
    c = predictive(toy(), X, 300, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.mean, b.mean) and not torch.equal(a.mean, c.mean)


def test_progress_bar_shows_on_request_only(capsys):
    predictive(toy(), X, 20, chunk_size=5, progress=True)
    assert "20/20" in capsys.readouterr().err
    predictive(toy(), X, 20, chunk_size=5, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_results_stay_on_the_device_and_samples_go_to_the_cpu():
    result = predictive(toy().cuda(), X.cuda(), 500, chunk_size=100, quantiles=[0.5],
                        return_samples=True, seed=0)
    assert result.mean.device.type == result.std.device.type == "cuda"
    assert result.samples.device.type == result.quantiles.device.type == "cpu"


# ----------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(model=lambda x: x), TypeError, "model must be a torch.nn.Module"),
        (dict(x=[[1.0, 2.0, 3.0]]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have a batch dimension"),
        (dict(n_samples=0), ValueError, "n_samples must be >= 1, got 0"),
        (dict(n_samples=10.0), TypeError, "n_samples must be an int"),
        (dict(n_samples=True), TypeError, "n_samples must be an int"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
        (dict(chunk_size="8"), TypeError, "chunk_size must be an int or None"),
        (dict(memory_budget_mb=0), ValueError, "memory_budget_mb must be > 0"),
        (dict(memory_budget_mb="1"), TypeError, "memory_budget_mb must be a number"),
        (dict(quantiles=[0.5, 1.0]), ValueError, r"quantiles must lie in \(0, 1\)"),
        (dict(quantiles=[0.0]), ValueError, r"quantiles must lie in \(0, 1\)"),
        (dict(quantiles=[]), ValueError, "quantiles must be a non-empty 1-D sequence"),
        (dict(quantiles=[[0.5]]), ValueError, "quantiles must be a non-empty 1-D sequence"),
        (dict(quantiles=["a"]), TypeError, "quantiles must be a sequence of floats"),
        (dict(return_samples=1), TypeError, "return_samples must be a bool"),
        (dict(progress="yes"), TypeError, "progress must be True, False or None"),
        (dict(seed=1.5), TypeError, "seed must be an int or None"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(kwargs, error, message):
    arguments = dict(model=toy(), x=X, n_samples=10) | kwargs
    with pytest.raises(error, match=message):
        predictive(arguments.pop("model"), arguments.pop("x"), **arguments)


def test_classification_validates_its_arguments_too():
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        predictive_classification(toy(), X, 0)


def test_a_model_returning_a_tuple_is_refused():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="the model must return a tensor"):
        predictive(Pair(), X, 2)


def test_retain_cpu_memory_applies_on_linux_glibc():
    import platform
    import sys

    applied = bnn_fast.utils.retain_cpu_memory()
    assert isinstance(applied, bool)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied
    # Idempotent, and tensors still allocate and free normally afterwards.
    assert bnn_fast.utils.retain_cpu_memory() == applied
    for _ in range(3):
        assert torch.ones(3_000_000).sum().item() == 3_000_000
