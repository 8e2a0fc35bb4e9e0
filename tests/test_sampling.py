"""The sample-folding protocol of bnn_fast.sampling: the context manager, fold_input /
unfold_output, and a model of protocol-following layers run under sample_many."""
import threading

import numpy as np
import pytest
import torch
from torch import nn

import bnn_fast
from bnn_fast.sampling import SamplingState, current, fold_input, sample_many, unfold_output

real_layers_wired = pytest.mark.skipif(
    not getattr(bnn_fast.BayesLinear, "_supports_sampling", False),
    reason="bnn_fast.BayesLinear does not follow bnn_fast.sampling yet (_supports_sampling unset)",
)


class ToyBayesLinear(nn.Module):
    """A minimal Bayesian linear layer that follows the protocol: sample s uses
    W_s = mu + exp(log_sigma) * eps_s and y = x W_s^T + b_s. It keeps the last noise it drew."""

    _supports_sampling = True

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight_mu = nn.Parameter(torch.randn(out_features, in_features))
        self.weight_log_sigma = nn.Parameter(torch.full((out_features, in_features), -1.0))
        self.bias_mu = nn.Parameter(torch.randn(out_features))
        self.bias_log_sigma = nn.Parameter(torch.full((out_features,), -1.0))
        self.folded = []  # (S, shape, data_ptr) of every folded input

    def forward(self, x):
        state = current()
        if state is None:
            return self._sampled(x.unsqueeze(0), 1)[0]
        xs, s = fold_input(x, "ToyBayesLinear")
        self.folded.append((s, tuple(xs.shape), xs.data_ptr()))
        return unfold_output(self._sampled(xs, s))

    def _sampled(self, xs, s):
        # xs: [1 or S, N, in] -> [S, N, out]; the noise is drawn sample by sample, weight first,
        # so sample_many(1) consumes the generator exactly as a plain forward does.
        eps = [(torch.randn_like(self.weight_mu), torch.randn_like(self.bias_mu)) for _ in range(s)]
        weight_eps, bias_eps = (torch.stack(e) for e in zip(*eps))
        self.weight = self.weight_mu + self.weight_log_sigma.exp() * weight_eps
        self.bias = self.bias_mu + self.bias_log_sigma.exp() * bias_eps
        return xs @ self.weight.transpose(-1, -2) + self.bias.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# The context


def test_current_is_none_outside_and_the_state_inside():
    assert current() is None
    with sample_many(3) as state:
        assert current() is state
        assert state == SamplingState(n_samples=3, batch=None)
    assert current() is None


def test_nested_blocks_inner_wins_and_exit_restores_the_outer_state():
    with sample_many(4) as outer:
        outer.batch = 7
        with sample_many(2) as inner:
            assert current() is inner and inner.n_samples == 2 and inner.batch is None
        assert current() is outer and outer.batch == 7
    assert current() is None


def test_state_is_restored_when_the_block_raises():
    with pytest.raises(KeyError):
        with sample_many(2):
            raise KeyError("boom")
    assert current() is None


@pytest.mark.parametrize("bad", [0, -3])
def test_n_samples_below_one_raises_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=f"n_samples must be >= 1, got {bad}"):
        with sample_many(bad):
            pass


@pytest.mark.parametrize("bad", [2.5, True, "3", None])
def test_non_integer_n_samples_raises_type_error_naming_it(bad):
    with pytest.raises(TypeError, match="n_samples must be an int"):
        with sample_many(bad):
            pass


def test_numpy_integer_n_samples_is_accepted():
    with sample_many(np.int64(5)) as state:
        assert state.n_samples == 5 and type(state.n_samples) is int


def test_state_is_thread_local():
    seen = []
    with sample_many(3):
        thread = threading.Thread(target=lambda: seen.append(current()))
        thread.start()
        thread.join()
    assert seen == [None]


# ----------------------------------------------------------------------------------------------
# fold_input / unfold_output


def test_fold_input_broadcasts_the_first_input_then_unfolds_or_broadcasts():
    x = torch.randn(5, 3)
    with sample_many(4) as state:
        xs, s = fold_input(x, "L1")
        assert (s, xs.shape, state.batch) == (4, (1, 5, 3), 5)
        assert xs.data_ptr() == x.data_ptr()  # a view: the input is not copied S times

        h = torch.randn(20, 7)
        hs, s = fold_input(h, "L2")
        assert (s, hs.shape) == (4, (4, 5, 7))
        assert torch.equal(hs[2], h[10:15])  # sample-major: sample s owns rows s*N..s*N+N-1

        again, _ = fold_input(torch.randn(5, 2), "L3")  # the raw batch again (a skip connection)
        assert again.shape == (1, 5, 2)


def test_fold_input_rejects_a_batch_that_is_neither_n_nor_s_times_n():
    with sample_many(3):
        fold_input(torch.randn(5, 3), "First")
        with pytest.raises(ValueError, match=r"Second: .*N=5.*S\*N=15.*got 6"):
            fold_input(torch.randn(6, 3), "Second")


def test_fold_input_outside_sample_many_raises():
    with pytest.raises(RuntimeError, match="Layer: fold_input must be called inside"):
        fold_input(torch.randn(2, 3), "Layer")


def test_fold_input_rejects_a_0_dim_input():
    with sample_many(2), pytest.raises(ValueError, match="Layer: .*0-dim"):
        fold_input(torch.tensor(1.0), "Layer")


def test_unfold_output_is_sample_major():
    y = torch.randn(3, 5, 2)
    flat = unfold_output(y)
    assert flat.shape == (15, 2)
    assert torch.equal(flat[1 * 5 + 4], y[1, 4])
    with pytest.raises(ValueError, match=r"\[S, N, \.\.\.\]"):
        unfold_output(torch.randn(4))


# ----------------------------------------------------------------------------------------------
# A model of protocol-following layers


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(ToyBayesLinear(3, 8), nn.ReLU(), nn.Linear(8, 8), ToyBayesLinear(8, 2))


def test_model_under_sample_many_runs_sample_s_with_weight_sample_s():
    model = toy_model()
    first, _, linear, last = model
    x = torch.randn(5, 3)
    with torch.no_grad(), sample_many(4):
        y = model(x)
    assert y.shape == (4 * 5, 2)
    assert first.folded == [(4, (1, 5, 3), x.data_ptr())]  # broadcast, never repeated
    assert last.folded[0][:2] == (4, (4, 5, 8))
    y = y.reshape(4, 5, 2)
    for s in range(4):
        h = torch.relu(x @ first.weight[s].T + first.bias[s])
        expected = linear(h) @ last.weight[s].T + last.bias[s]
        torch.testing.assert_close(y[s], expected.detach())


def test_sample_many_of_one_equals_a_plain_forward_under_the_same_seed():
    model = toy_model()
    x = torch.randn(5, 3)
    torch.manual_seed(1)
    plain = model(x)
    torch.manual_seed(1)
    with sample_many(1):
        folded = model(x)
    torch.testing.assert_close(folded, plain)


def test_a_second_batch_size_in_one_block_is_refused():
    model = toy_model()
    with sample_many(2):
        model(torch.randn(5, 3))
        with pytest.raises(ValueError, match="one sample_many block serves one batch size"):
            model(torch.randn(6, 3))


@real_layers_wired
def test_real_bayes_linear_draws_s_samples_under_sample_many():
    torch.manual_seed(0)
    model = nn.Sequential(bnn_fast.BayesLinear(0, 0.1, 3, 8), nn.ReLU(),
                          bnn_fast.BayesLinear(0, 0.1, 8, 2))
    x = torch.randn(5, 3)
    with torch.no_grad():
        with sample_many(4):
            y = model(x)
        plain = model(x)
    assert y.shape == (20, 2) and plain.shape == (5, 2)
    y = y.reshape(4, 5, 2)
    assert not torch.equal(y[0], y[1])  # independent weight samples


@real_layers_wired
def test_real_bayes_linear_sample_many_of_one_keeps_the_plain_shape():
    layer = bnn_fast.BayesLinear(0, 0.1, 3, 2)
    with torch.no_grad(), sample_many(1):
        assert layer(torch.randn(5, 3)).shape == (5, 2)
