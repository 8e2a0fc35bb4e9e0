"""bnn_fast against torchbnn 1.2, the oracle: same API, same numbers under the same seed (on the
pure-PyTorch path for unfrozen BayesLinear, whose fused kernel draws counter-based noise), and
torchbnn's defects fixed where the fix is deliberate (see the README's list)."""
import inspect
import math

import pytest
import torch
import torch.nn as nn

import bnn_fast
import torchbnn
from bnn_fast import _ops
from bnn_fast import functional as BF
from bnn_fast import utils as BU
from bnn_fast.modules import BayesBatchNorm2d, BayesConv2d, BayesLinear, BKLLoss

# name -> (class name, args, kwargs, input shape); every case is valid in torchbnn too.
LAYER_CASES = {
    "linear": ("BayesLinear", (0.0, 0.1, 5, 3), {}, (4, 5)),
    "linear_no_bias": ("BayesLinear", (0.1, 0.2, 5, 3), {"bias": False}, (2, 6, 5)),
    "conv": ("BayesConv2d", (0.0, 0.1, 3, 4, 3), {"padding": 1}, (2, 3, 6, 6)),
    "conv_grouped_strided_no_bias": (
        "BayesConv2d", (0.0, 0.3, 4, 6, (3, 2)),
        {"stride": 2, "dilation": (1, 2), "groups": 2, "bias": False}, (2, 4, 7, 8),
    ),
    "batchnorm": ("BayesBatchNorm2d", (0.0, 0.1, 3), {}, (4, 3, 2, 2)),
    "batchnorm_cumulative_momentum": (
        "BayesBatchNorm2d", (0.0, 0.1, 3), {"momentum": None}, (4, 3, 2, 2)),
    "batchnorm_no_affine": ("BayesBatchNorm2d", (0.0, 0.1, 3), {"affine": False}, (4, 3, 2, 2)),
    "batchnorm_no_running_stats": (
        "BayesBatchNorm2d", (0.0, 0.1, 3), {"track_running_stats": False}, (4, 3, 2, 2)),
}
CASE_IDS = list(LAYER_CASES)


def make(lib, case, seed=0):
    name, args, kwargs, _ = LAYER_CASES[case]
    torch.manual_seed(seed)
    return getattr(lib, name)(*args, **kwargs)


def make_input(case, seed=123):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYER_CASES[case][3], generator=generator)


def assert_same_tensors(ours, theirs):
    assert list(ours) == list(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def public_attributes(module):
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


# ------------------------------------------------------------------------------------------
# API surface


# Our additions to torchbnn's signatures: torch.nn's device and dtype (positional, as in
# torch.nn, default None), then keyword-only arguments.
FACTORY = ["device", "dtype"]
EXTRA_KEYWORDS = {"BayesLinear": ["estimator"], "BayesConv2d": ["estimator"],
                  "BayesBatchNorm2d": ["bias"]}


@pytest.mark.parametrize("path", [
    "BayesLinear", "BayesConv2d", "BayesBatchNorm2d", "BKLLoss",
    "functional.bayesian_kl_loss", "utils.freeze", "utils.unfreeze",
])
def test_signature_matches_torchbnn(path):
    ours, theirs = bnn_fast, torchbnn
    for part in path.split("."):
        ours, theirs = getattr(ours, part), getattr(theirs, part)
    ours = list(inspect.signature(ours).parameters.values())
    theirs = list(inspect.signature(theirs).parameters.values())
    # torchbnn's parameters, positions and defaults included, then only our keyword-only additions.
    assert ours[:len(theirs)] == theirs
    extra = [(p.name, p.kind, p.default) for p in ours[len(theirs):]]
    keyword_only, positional = inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    factory = [(name, positional, None) for name in FACTORY] if path.startswith("Bayes") and path != "BKLLoss" else []
    keywords = [(p[0], p[1]) for p in extra[len(factory):]]
    assert extra[:len(factory)] == factory
    assert keywords == [(name, keyword_only) for name in EXTRA_KEYWORDS.get(path, [])]


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("case", CASE_IDS)
def test_parameter_and_buffer_registration_matches_torchbnn(case, frozen):
    ours, theirs = make(bnn_fast, case), make(torchbnn, case)
    if frozen:
        ours.freeze()
        theirs.freeze()
    assert list(ours._parameters) == list(theirs._parameters)
    assert list(ours._buffers) == list(theirs._buffers)
    for key in list(ours._parameters) + list(ours._buffers):
        assert (getattr(ours, key) is None) == (getattr(theirs, key) is None), key


@pytest.mark.parametrize("case", CASE_IDS)
def test_public_attributes_match_torchbnn(case):
    ours, theirs = public_attributes(make(bnn_fast, case)), public_attributes(make(torchbnn, case))
    # Ours may hold more (BayesBatchNorm2d(affine=False) keeps its prior); never less or other.
    assert {k: ours[k] for k in theirs} == theirs
    if "bias" in theirs:
        assert type(ours["bias"]) is bool


@pytest.mark.parametrize("case", CASE_IDS)
def test_initialization_matches_torchbnn_under_same_seed(case):
    ours = make(bnn_fast, case)
    rng_after_ours = torch.get_rng_state()
    theirs = make(torchbnn, case)
    assert_same_tensors(ours.state_dict(), theirs.state_dict())
    # The same number of draws, too: whatever the user draws next is the same.
    assert torch.equal(rng_after_ours, torch.get_rng_state())


# ------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("case", CASE_IDS)
def test_unfrozen_forward_matches_torchbnn_under_same_seed(case):
    ours, theirs = make(bnn_fast, case), make(torchbnn, case)
    x = make_input(case)
    # Two calls per seed: each draws fresh noise, and consumes the generator as torchbnn does.
    # The fused kernels draw counter-based noise instead; the reference path is torchbnn's.
    torch.manual_seed(10)
    with bnn_fast.reference_path():
        y_ours = [ours(x) for _ in range(2)]
    torch.manual_seed(10)
    y_theirs = [theirs(x) for _ in range(2)]
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0)
    assert_same_tensors(ours.state_dict(), theirs.state_dict())  # running statistics too


@pytest.mark.parametrize("case", CASE_IDS)
def test_frozen_forward_matches_torchbnn(case):
    ours, theirs = make(bnn_fast, case), make(torchbnn, case)
    torch.manual_seed(7)
    ours.freeze()
    torch.manual_seed(7)
    theirs.freeze()
    assert_same_tensors(ours.state_dict(), theirs.state_dict())
    x = make_input(case)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", [c for c in CASE_IDS if c.startswith("batchnorm")])
def test_batchnorm_eval_forward_matches_torchbnn(case):
    ours, theirs = make(bnn_fast, case), make(torchbnn, case)
    x = make_input(case)
    # torchbnn's draws are the reference path's (the compiled path samples counter-based noise).
    with bnn_fast.reference_path():
        for module in (ours, theirs):
            torch.manual_seed(3)
            module(x)  # one training step moves the running statistics
            module.eval()
        torch.manual_seed(4)
        y_ours = ours(x + 1)
    torch.manual_seed(4)
    torch.testing.assert_close(y_ours, theirs(x + 1), rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["torchbnn_to_ours", "ours_to_torchbnn"])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("case", CASE_IDS)
def test_state_dict_loads_strictly_both_ways(case, frozen, direction):
    source_lib, target_lib = (
        (torchbnn, bnn_fast) if direction == "torchbnn_to_ours" else (bnn_fast, torchbnn))
    source, target = make(source_lib, case, seed=0), make(target_lib, case, seed=1)
    if frozen:
        source.freeze()
        target.freeze()
    target.load_state_dict(source.state_dict(), strict=True)
    assert_same_tensors(target.state_dict(), source.state_dict())


# ------------------------------------------------------------------------------------------
# KL divergence


def make_kl_model(lib, dtype=torch.float32):
    """One layer of each type, with two distinct priors and perturbed sigmas."""
    torch.manual_seed(0)
    model = nn.Sequential(
        lib.BayesConv2d(0.0, 0.1, 3, 4, 3),
        lib.BayesBatchNorm2d(0.0, 0.1, 4),
        nn.ReLU(),
        nn.Flatten(),
        lib.BayesLinear(0.05, 0.2, 4 * 3 * 3, 5),
    ).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if name.endswith("log_sigma") else 0.05))
    return model


def hand_kl(mus, log_sigmas, prior_mu, prior_sigma):
    total = 0.0
    for mu, log_sigma in zip(mus, log_sigmas):
        mu, sigma = mu.double(), log_sigma.double().exp()
        total += (math.log(prior_sigma) - sigma.log()
                  + (sigma**2 + (mu - prior_mu) ** 2) / (2 * prior_sigma**2) - 0.5).sum()
    return total


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kl_value_matches_torchbnn(reduction):
    ours = BF.bayesian_kl_loss(make_kl_model(bnn_fast), reduction=reduction)
    theirs = torchbnn.functional.bayesian_kl_loss(make_kl_model(torchbnn), reduction=reduction)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kl_gradients_match_torchbnn(reduction):
    ours, theirs = make_kl_model(bnn_fast), make_kl_model(torchbnn)
    BF.bayesian_kl_loss(ours, reduction=reduction).sum().backward()
    torchbnn.functional.bayesian_kl_loss(theirs, reduction=reduction).sum().backward()
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        # A log_sigma gradient, -1 + sigma^2 / prior_sigma^2 (scaled), cancels: torchbnn's
        # float32 error there is relative to the tensor's largest gradient, not to each element.
        atol = 1e-6 * p_theirs.grad.abs().max().item()
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=1e-5, atol=atol, msg=name)


def test_kl_is_one_gaussian_kl_call_per_distinct_prior(monkeypatch):
    calls = []
    gaussian_kl = _ops.gaussian_kl

    def counting(mus, log_sigmas, prior_mu, prior_log_sigma, **kwargs):
        calls.append((len(mus), prior_mu, prior_log_sigma))
        return gaussian_kl(mus, log_sigmas, prior_mu, prior_log_sigma, **kwargs)

    monkeypatch.setattr(_ops, "gaussian_kl", counting)
    BF.bayesian_kl_loss(make_kl_model(bnn_fast))
    # The conv and the batchnorm share a prior: one call with their four tensors.
    assert sorted(calls) == [(2, 0.05, math.log(0.2)), (4, 0.0, math.log(0.1))]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_last_layer_only_is_the_last_layers_kl_reduced(reduction):
    model = make_kl_model(bnn_fast)
    last = model[-1]
    expected = hand_kl([last.weight_mu, last.bias_mu],
                       [last.weight_log_sigma, last.bias_log_sigma], 0.05, 0.2)
    if reduction == "mean":
        expected = expected / (last.weight_mu.numel() + last.bias_mu.numel())
    kl = BF.bayesian_kl_loss(model, reduction=reduction, last_layer_only=True)
    assert kl.shape == ()  # as torchbnn's last_layer_only result
    torch.testing.assert_close(kl.double(), expected, rtol=1e-6, atol=0)


def test_mean_divides_by_the_number_of_bayesian_parameters():
    model = make_kl_model(bnn_fast)
    n = sum(p.numel() for name, p in model.named_parameters() if name.endswith("_mu"))
    torch.testing.assert_close(BF.bayesian_kl_loss(model, "mean") * n,
                               BF.bayesian_kl_loss(model, "sum"))


def test_bkl_loss_equals_functional():
    model = make_kl_model(bnn_fast)
    for reduction in ("mean", "sum"):
        for last_layer_only in (False, True):
            loss = BKLLoss(reduction=reduction, last_layer_only=last_layer_only)
            torch.testing.assert_close(loss(model), BF.bayesian_kl_loss(
                model, reduction=reduction, last_layer_only=last_layer_only))


@pytest.mark.parametrize("last_layer_only", [False, True])
def test_kl_of_float64_model_is_float64(last_layer_only):
    model = make_kl_model(bnn_fast, torch.float64)
    kl = BF.bayesian_kl_loss(model, last_layer_only=last_layer_only)
    assert kl.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kl_of_half_precision_model_is_in_its_dtype(dtype):
    model = make_kl_model(bnn_fast)
    expected = BF.bayesian_kl_loss(model)
    kl = BF.bayesian_kl_loss(model.to(dtype))
    assert kl.dtype == dtype
    torch.testing.assert_close(kl.float(), expected, rtol=1e-2, atol=0)


def test_kl_of_mixed_dtype_model_is_in_the_promoted_dtype():
    model = make_kl_model(bnn_fast)
    expected = BF.bayesian_kl_loss(model)
    model[1].double()
    kl = BF.bayesian_kl_loss(model)
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl.float(), expected)


def test_kl_of_float64_model_is_float64_accurate():
    model = make_kl_model(bnn_fast, torch.float64)
    layers = [m for m in model if hasattr(m, "prior_mu")]
    expected = sum(hand_kl([m.weight_mu, m.bias_mu], [m.weight_log_sigma, m.bias_log_sigma],
                           m.prior_mu, m.prior_sigma) for m in layers)
    torch.testing.assert_close(BF.bayesian_kl_loss(model, "sum"), expected.reshape(1),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("model", [
    nn.Sequential(), nn.ReLU(), nn.Linear(3, 2), BayesBatchNorm2d(0, 0.1, 3, affine=False),
], ids=["empty", "no_parameters", "no_bayesian_layers", "batchnorm_no_affine"])
@pytest.mark.parametrize("last_layer_only", [False, True])
def test_kl_of_model_without_bayesian_parameters_is_zero(model, last_layer_only):
    kl = BF.bayesian_kl_loss(model, last_layer_only=last_layer_only)
    assert kl.dtype == torch.float32 and kl.device == torch.device("cpu")
    assert torch.equal(kl, torch.zeros(1))


@pytest.mark.parametrize("model", [nn.Sequential(), BayesLinear(0, 0.1, 3, 2)],
                         ids=["empty", "bayesian"])
@pytest.mark.parametrize("last_layer_only", [False, True])
def test_invalid_reduction_raises_value_error(model, last_layer_only):
    with pytest.raises(ValueError, match="reduction.*'none'"):
        BF.bayesian_kl_loss(model, reduction="none", last_layer_only=last_layer_only)


# ------------------------------------------------------------------------------------------
# repr


@pytest.mark.parametrize("case", [c for c in CASE_IDS if c not in (
    "linear_no_bias",  # torchbnn always prints bias=True
    "batchnorm_no_affine",  # torchbnn raises KeyError
)])
def test_repr_matches_torchbnn(case):
    assert repr(make(bnn_fast, case)) == repr(make(torchbnn, case))


def test_linear_repr_tells_bias_false():
    assert repr(BayesLinear(0, 0.1, 5, 3, bias=False)) == (
        "BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=5, out_features=3, bias=False)")


def test_batchnorm_without_affine_has_a_repr():
    with pytest.raises(KeyError):
        repr(torchbnn.BayesBatchNorm2d(0, 0.1, 3, affine=False))
    assert repr(BayesBatchNorm2d(0, 0.1, 3, affine=False)) == (
        "BayesBatchNorm2d(0, 0.1, 3, eps=1e-05, momentum=0.1, affine=False, "
        "track_running_stats=True)")


@pytest.mark.parametrize("padding,padding_mode,expected", [
    ("same", "zeros", "padding=same)"),
    (1, "reflect", "padding=(1, 1), padding_mode=reflect)"),
])
def test_conv_repr_shows_padding_like_nn_conv2d(padding, padding_mode, expected):
    text = repr(BayesConv2d(0, 0.1, 2, 3, 3, padding=padding, padding_mode=padding_mode))
    assert text == "BayesConv2d(0, 0.1, 2, 3, kernel_size=(3, 3), stride=(1, 1), " + expected


# ------------------------------------------------------------------------------------------
# Conv2d padding: exactly nn.Conv2d's


@pytest.mark.parametrize("padding", [0, 1, (2, 1), "same", "valid"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv_padding_matches_nn_conv2d(padding, padding_mode):
    kwargs = dict(kernel_size=(3, 2), padding=padding, dilation=(1, 2), padding_mode=padding_mode)
    ours = BayesConv2d(0, 0.1, 2, 3, **kwargs)
    ours.freeze()
    reference = nn.Conv2d(2, 3, **kwargs)
    with torch.no_grad():
        reference.weight.copy_(ours.weight_mu + ours.weight_log_sigma.exp() * ours.weight_eps)
        reference.bias.copy_(ours.bias_mu + ours.bias_log_sigma.exp() * ours.bias_eps)
    x = torch.randn(2, 2, 7, 8)
    torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize("kwargs,message", [
    ({"padding": "full"}, "Invalid padding string 'full'"),
    ({"padding": "same", "stride": 2}, "padding='same' is not supported for strided"),
    ({"padding_mode": "mirror"}, "padding_mode must be one of"),
    ({"groups": 0}, "groups must be a positive integer"),
    ({"groups": 4}, "in_channels must be divisible by groups"),
])
def test_conv_rejects_what_nn_conv2d_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nn.Conv2d(2, 4, 3, **kwargs)
    with pytest.raises(ValueError, match=message):
        BayesConv2d(0, 0.1, 2, 4, 3, **kwargs)


# ------------------------------------------------------------------------------------------
# freeze / unfreeze


def make_model(lib):
    torch.manual_seed(0)
    return nn.Sequential(
        lib.BayesConv2d(0, 0.1, 3, 4, 3),
        nn.Sequential(lib.BayesBatchNorm2d(0, 0.1, 4), nn.ReLU()),
        nn.Flatten(),
        lib.BayesLinear(0, 0.1, 4 * 3 * 3, 2),
    )


def test_freeze_draws_the_same_noise_as_torchbnn():
    ours, theirs = make_model(bnn_fast), make_model(torchbnn)
    torch.manual_seed(5)
    BU.freeze(ours)
    torch.manual_seed(5)
    torchbnn.utils.freeze(theirs)
    assert_same_tensors(ours.state_dict(), theirs.state_dict())


def test_frozen_model_is_deterministic():
    model = make_model(bnn_fast).eval()
    BU.freeze(model)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(model(x), model(x))


def test_unfreeze_clears_the_noise_and_restores_sampling():
    model = make_model(bnn_fast).eval()
    BU.freeze(model)
    BU.unfreeze(model)
    assert all(not name.endswith("_eps") for name, _ in model.named_buffers())
    x = torch.randn(2, 3, 5, 5)
    assert not torch.equal(model(x), model(x))


# ------------------------------------------------------------------------------------------
# transform_model


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, (3, 2), stride=2), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
        )
        self.head = nn.Linear(6 * 3 * 4, 2)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def bayesianize(model, inplace=True):
    conv_args = {name: "." + name for name in (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
        "bias", "padding_mode")}
    model = BU.transform_model(model, nn.Conv2d, BayesConv2d, inplace=inplace,
                               args={"prior_mu": 0, "prior_sigma": 0.1, **conv_args})
    model = BU.transform_model(model, nn.BatchNorm2d, BayesBatchNorm2d, args={
        "prior_mu": 0, "prior_sigma": 0.1, "num_features": ".num_features", "eps": ".eps",
        "momentum": ".momentum", "affine": ".affine"})
    return BU.transform_model(model, nn.Linear, BayesLinear, args={
        "prior_mu": 0, "prior_sigma": 0.1, "in_features": ".in_features",
        "out_features": ".out_features", "bias": ".bias"})


def test_transform_model_makes_a_working_bayesian_cnn():
    model = bayesianize(SmallCNN())
    f = model.features
    assert [type(m) for m in f] == [
        BayesConv2d, BayesBatchNorm2d, nn.ReLU, BayesConv2d, BayesBatchNorm2d, nn.ReLU]
    assert isinstance(model.head, BayesLinear) and model.head.bias is True
    assert f[0].bias is False and f[0].padding == (1, 1)
    assert f[3].kernel_size == (3, 2) and f[3].stride == (2, 2) and f[4].affine is False
    out = model(torch.randn(2, 3, 7, 8))
    assert out.shape == (2, 2)
    (out.sum() + bnn_fast.BKLLoss()(model).sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_transform_model_is_available_at_top_level():
    assert bnn_fast.transform_model is BU.transform_model


def test_transform_model_not_inplace_leaves_the_model_alone():
    original = SmallCNN()
    transformed = bayesianize(original, inplace=False)
    assert isinstance(original.head, nn.Linear) and isinstance(transformed.head, BayesLinear)


def test_transform_model_sets_attrs():
    model = BU.transform_model(nn.Sequential(nn.Linear(3, 2)), nn.Linear, BayesLinear, args={
        "prior_mu": 0, "prior_sigma": 0.1, "in_features": 3, "out_features": 2},
        attrs={"origin": ".out_features", "tag": "plain"})
    assert model[0].origin == 2 and model[0].tag == "plain"


def test_transform_model_replaces_the_root_and_keeps_shared_layers_shared():
    shared = nn.Linear(3, 3)
    args = {"prior_mu": 0, "prior_sigma": 0.1, "in_features": 3, "out_features": 3}
    model = BU.transform_model(nn.Sequential(shared, nn.ReLU(), shared), nn.Linear, BayesLinear,
                               args=args)
    assert isinstance(model[0], BayesLinear) and model[0] is model[2]
    assert isinstance(BU.transform_model(shared, nn.Linear, BayesLinear, args=args), BayesLinear)


# ------------------------------------------------------------------------------------------
# torchbnn's README example, with the import swapped


def iris_like_data():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.5, 2.0]])
    y = torch.arange(3).repeat_interleave(50)
    return centers[y] + 0.3 * torch.randn(150, 4, generator=generator), y


def readme_example(bnn, steps):
    x, y = iris_like_data()
    torch.manual_seed(0)
    model = nn.Sequential(
        bnn.BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=4, out_features=100),
        nn.ReLU(),
        bnn.BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=100, out_features=3),
    )
    ce_loss = nn.CrossEntropyLoss()
    kl_loss = bnn.BKLLoss(reduction="mean", last_layer_only=False)
    kl_weight = 0.01
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    costs = []
    for _ in range(steps):
        pre = model(x)
        ce = ce_loss(pre, y)
        kl = kl_loss(model)
        cost = ce + kl_weight * kl
        optimizer.zero_grad()
        cost.backward()
        optimizer.step()
        costs.append(cost.item())
    _, predicted = torch.max(pre.data, 1)
    return costs, float((predicted == y).sum()) / y.size(0)


def test_torchbnn_readme_example_trains():
    costs, accuracy = readme_example(bnn_fast, steps=200)  # the fused kernels when built
    assert costs[-1] < costs[0] / 2 and accuracy > 0.8  # one noisy forward pass: not the predictive mean
    with bnn_fast.reference_path():
        reference_costs, _ = readme_example(bnn_fast, steps=1)
    their_costs, _ = readme_example(torchbnn, steps=1)
    assert reference_costs[0] == pytest.approx(their_costs[0], rel=1e-6)
