"""to_bayesian / to_deterministic: every layer kind with every constructor argument carried, MOPED
initialization, selection, sharing, dtypes and devices, and the torchbnn wrappers."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import bnn_fast as bnn
from bnn_fast import to_bayesian, to_deterministic
from bnn_fast.utils import freeze_model
from bnn_fast.utils._convert_model import bayes_to_nonbayes, nonbayes_to_bayes

from conftest import DEVICES

PAIRS = {
    nn.Linear: bnn.BayesLinear,
    nn.Conv1d: bnn.BayesConv1d,
    nn.Conv2d: bnn.BayesConv2d,
    nn.Conv3d: bnn.BayesConv3d,
    nn.ConvTranspose1d: bnn.BayesConvTranspose1d,
    nn.ConvTranspose2d: bnn.BayesConvTranspose2d,
    nn.ConvTranspose3d: bnn.BayesConvTranspose3d,
    nn.BatchNorm1d: bnn.BayesBatchNorm1d,
    nn.BatchNorm2d: bnn.BayesBatchNorm2d,
    nn.BatchNorm3d: bnn.BayesBatchNorm3d,
}
CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
             "groups", "padding_mode")
NORM_ARGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")


# ------------------------------------------------------------------------------------------
# Models: every layer kind and argument between them.


class Block2d(nn.Module):
    """A residual block: a non-square 'same' kernel with reflect padding, a dilated grouped
    kernel with circular padding, no biases, a cumulative-average batch norm."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, (3, 1), padding="same", padding_mode="reflect", bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=2, padding_mode="circular",
                               bias=False)
        self.bn2 = nn.BatchNorm2d(c, momentum=None)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class Net2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2))
        self.bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.2)
        block = Block2d(8)
        self.blocks = nn.Sequential(block, nn.ReLU(), block)  # one block under two names
        self.up = nn.ConvTranspose2d(8, 4, (3, 2), stride=2, padding=1, output_padding=1, groups=2)
        self.valid = nn.Conv2d(4, 4, 2, padding="valid")
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6),
                                  nn.ReLU(), nn.Linear(6, 3, bias=False))

    def forward(self, x):
        return self.head(self.valid(self.up(self.blocks(torch.relu(self.bn(self.stem(x)))))))


def net1d():
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding="valid"),
        nn.BatchNorm1d(4, affine=False),
        nn.ConvTranspose1d(4, 2, 4, stride=3, output_padding=2, dilation=2),
        nn.BatchNorm1d(2, track_running_stats=False),
        nn.Conv1d(2, 2, 5, padding=2, padding_mode="replicate"),
        nn.Flatten(),
        nn.Linear(2 * 48, 3),
        nn.BatchNorm1d(3),
    )


def net3d():
    return nn.Sequential(
        nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), padding_mode="replicate"),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.ConvTranspose3d(4, 2, 2, stride=(1, 2, 2), bias=False),
        nn.Conv3d(2, 2, (3, 1, 2), padding="same", padding_mode="circular", dilation=(1, 1, 2)),
        nn.BatchNorm3d(2, affine=False, track_running_stats=False),
    )


MODELS = {
    "2d": (Net2d, (4, 3, 10, 12)),
    "1d": (net1d, (4, 2, 16)),
    "3d": (net3d, (4, 2, 3, 5, 6)),
}


def trained(name, dtype=torch.float32):
    """The model `name` with random weights (a few exact zeros), biases and batch-norm scales
    and shifts, and running statistics from a few training batches; and an input for it."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if type(m) in PAIRS and m.weight is not None:
                m.weight.view(-1)[0] = 0.0
        for _ in range(3):
            model(torch.randn(shape, dtype=dtype))
    return model, torch.randn(shape, dtype=dtype)


def zero_sigma(model):
    """Sigma = 0 everywhere: a Bayesian layer then computes with its means."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_log_sigma"):
                p.fill_(-math.inf)
    return model


def convertible(model):
    return [(name, m) for name, m in model.named_modules() if type(m) in PAIRS]


# ------------------------------------------------------------------------------------------
# Layer types and constructor arguments


@pytest.mark.parametrize("name", MODELS)
def test_every_layer_becomes_its_bayesian_counterpart(name):
    model, _ = trained(name)
    converted = to_bayesian(model)
    old, new = dict(model.named_modules()), dict(converted.named_modules())
    assert old.keys() == new.keys()
    for key, m in old.items():
        assert type(new[key]) is PAIRS.get(type(m), type(m)), key


@pytest.mark.parametrize("name", MODELS)
def test_every_constructor_argument_is_carried(name):
    model, _ = trained(name)
    converted = dict(to_bayesian(model, 0.5, 0.2).named_modules())
    for key, m in convertible(model):
        new = converted[key]
        assert (new.prior_mu, new.prior_sigma) == (0.5, 0.2)
        if isinstance(m, nn.Linear):
            assert (new.in_features, new.out_features, new.bias) == (
                m.in_features, m.out_features, m.bias is not None)
        elif isinstance(m, nn.modules.conv._ConvNd):
            for arg in CONV_ARGS:
                assert getattr(new, arg) == getattr(m, arg), (key, arg)
            assert new.bias == (m.bias is not None)
            if m.transposed:
                assert new.output_padding == m.output_padding
        else:
            for arg in NORM_ARGS:
                assert getattr(new, arg) == getattr(m, arg), (key, arg)
        assert new.training == m.training


# ------------------------------------------------------------------------------------------
# MOPED: mu = w, sigma = delta * |w|; at sigma = 0 the model computes as before.


@pytest.mark.parametrize("name", MODELS)
def test_moped_at_zero_sigma_reproduces_the_model_in_eval_mode(name):
    model, x = trained(name)
    model.eval()
    converted = zero_sigma(to_bayesian(model, init="moped"))
    with torch.no_grad():
        assert_close(converted(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_moped_at_zero_sigma_reproduces_the_model_in_training_mode(name):
    model, x = trained(name)
    converted = zero_sigma(to_bayesian(model, init="moped"))
    assert converted.training
    with torch.no_grad():
        assert_close(converted(x), model(x))
    # The running statistics moved alike.
    old, new = model.state_dict(), converted.state_dict()
    for key in old:
        if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(new[key], old[key])


@pytest.mark.parametrize("delta", [0.1, 0.5])
@pytest.mark.parametrize("name", MODELS)
def test_moped_centres_on_the_weights_with_sigma_delta_times_their_size(name, delta):
    model, _ = trained(name)
    converted = dict(to_bayesian(model, init="moped", moped_delta=delta).named_modules())
    for key, m in convertible(model):
        new = converted[key]
        for param in ("weight", "bias"):
            w = getattr(m, param)
            if w is None:
                assert getattr(new, param + "_mu", None) is None
                continue
            assert_close(getattr(new, param + "_mu"), w, rtol=0, atol=0)
            sigma = (delta * w.abs()).clamp(min=1e-8)
            assert_close(getattr(new, param + "_log_sigma"), sigma.log(), rtol=0, atol=0)


def test_moped_floors_sigma_where_the_weight_is_zero():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.zero_()
    new = to_bayesian(layer, init="moped")
    assert torch.isfinite(new.weight_log_sigma).all()
    assert_close(new.weight_log_sigma, torch.full((2, 3), math.log(1e-8)), rtol=0, atol=0)


def test_moped_delta_zero_gives_the_floor_everywhere():
    new = to_bayesian(nn.Linear(3, 2), init="moped", moped_delta=0.0)
    assert_close(new.weight_log_sigma, torch.full((2, 3), math.log(1e-8)), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_running_statistics_are_copied_under_the_prior_init_too(name):
    model, _ = trained(name)
    converted = to_bayesian(model, init="prior")
    old, new = model.state_dict(), converted.state_dict()
    stats = [k for k in old if k.rsplit(".", 1)[-1] in ("running_mean", "running_var",
                                                         "num_batches_tracked")]
    assert stats
    for key in stats:
        assert_close(new[key], old[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# init="prior": the constructors' initialization


LAYERS = [
    lambda: nn.Linear(5, 4),
    lambda: nn.Linear(5, 4, bias=False),
    lambda: nn.Conv1d(4, 6, 3, stride=2, groups=2),
    lambda: nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode="reflect"),
    lambda: nn.Conv3d(2, 2, (1, 2, 3), dilation=(1, 2, 1), bias=False),
    lambda: nn.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1),
    lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 3), output_padding=(1, 2), groups=2),
    lambda: nn.ConvTranspose3d(2, 3, 2, dilation=2, bias=False),
    lambda: nn.BatchNorm1d(4, momentum=None),
    lambda: nn.BatchNorm2d(4, eps=1e-3, affine=False),
    lambda: nn.BatchNorm3d(4, track_running_stats=False),
]


def constructor_twin(layer, prior_mu, prior_sigma):
    """The Bayesian layer built directly from `layer`'s arguments."""
    cls = PAIRS[type(layer)]
    if isinstance(layer, nn.Linear):
        return cls(prior_mu, prior_sigma, layer.in_features, layer.out_features,
                   bias=layer.bias is not None)
    if isinstance(layer, nn.modules.conv._ConvNd):
        kwargs = {arg: getattr(layer, arg) for arg in CONV_ARGS}
        if layer.transposed:
            kwargs["output_padding"] = layer.output_padding
        return cls(prior_mu, prior_sigma, bias=layer.bias is not None, **kwargs)
    return cls(prior_mu, prior_sigma, **{arg: getattr(layer, arg) for arg in NORM_ARGS})


@pytest.mark.parametrize("make", LAYERS)
def test_prior_init_initializes_as_the_constructor(make):
    layer = make()
    torch.manual_seed(7)
    converted = to_bayesian(layer, 0.0, 0.3)
    torch.manual_seed(7)
    expected = constructor_twin(layer, 0.0, 0.3)
    assert converted.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert_close(converted.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("make", LAYERS)
def test_a_root_layer_is_returned_converted_and_the_original_kept(make):
    layer = make()
    before = copy.deepcopy(layer.state_dict())
    converted = to_bayesian(layer)
    assert type(converted) is PAIRS[type(layer)] and type(layer) in PAIRS
    for key, value in layer.state_dict().items():
        assert_close(value, before[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# In place, sharing, training mode


def test_inplace_converts_the_model_itself():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert to_bayesian(model, inplace=True) is model
    assert type(model[0]) is bnn.BayesLinear and type(model[2]) is bnn.BayesLinear


def test_without_inplace_the_model_is_left_as_it_is():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    converted = to_bayesian(model)
    assert converted is not model and type(model[0]) is nn.Linear


def test_a_shared_module_stays_shared():
    model = to_bayesian(Net2d())
    assert model.blocks[0] is model.blocks[2]
    assert type(model.blocks[0].conv1) is bnn.BayesConv2d
    linear = nn.Linear(3, 3)
    pair = to_bayesian(nn.Sequential(linear, nn.ReLU(), linear))
    assert pair[0] is pair[2] and type(pair[0]) is bnn.BayesLinear


def test_training_mode_is_carried_per_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].eval()
    converted = to_bayesian(model)
    assert converted[0].training and not converted[1].training


# ------------------------------------------------------------------------------------------
# include / exclude


def test_include_by_type_converts_only_those_types():
    converted = to_bayesian(Net2d(), include=[nn.Linear, nn.ConvTranspose2d])
    assert type(converted.up) is bnn.BayesConvTranspose2d
    assert type(converted.head[2]) is bnn.BayesLinear and type(converted.head[4]) is bnn.BayesLinear
    assert type(converted.stem) is nn.Conv2d and type(converted.bn) is nn.BatchNorm2d


def test_exclude_by_type_keeps_those_types():
    converted = to_bayesian(Net2d(), exclude=[nn.BatchNorm2d])
    assert type(converted.bn) is nn.BatchNorm2d and type(converted.blocks[0].bn1) is nn.BatchNorm2d
    assert type(converted.stem) is bnn.BayesConv2d


def test_include_by_name_selects_that_layer():
    converted = to_bayesian(Net2d(), include=["head.4"])
    assert type(converted.head[4]) is bnn.BayesLinear
    assert type(converted.head[2]) is nn.Linear and type(converted.stem) is nn.Conv2d


def test_a_container_name_selects_everything_inside_it():
    converted = to_bayesian(Net2d(), include=["head"], exclude=["head.2"])
    assert type(converted.head[4]) is bnn.BayesLinear and type(converted.head[2]) is nn.Linear
    assert type(converted.stem) is nn.Conv2d


def test_a_single_type_or_name_may_be_given_alone():
    converted = to_bayesian(Net2d(), include=nn.Linear, exclude="head.4")
    assert type(converted.head[2]) is bnn.BayesLinear and type(converted.head[4]) is nn.Linear
    assert type(converted.stem) is nn.Conv2d


def test_exclude_wins_over_include():
    converted = to_bayesian(Net2d(), include=[nn.Conv2d], exclude=["stem"])
    assert type(converted.stem) is nn.Conv2d and type(converted.valid) is bnn.BayesConv2d


def test_a_shared_module_excluded_under_one_name_is_excluded_under_all():
    converted = to_bayesian(Net2d(), exclude=["blocks.0.conv1"])
    assert type(converted.blocks[2].conv1) is nn.Conv2d
    assert type(converted.blocks[2].conv2) is bnn.BayesConv2d
    assert converted.blocks[0] is converted.blocks[2]


# ------------------------------------------------------------------------------------------
# Subclasses of the torch.nn types are left alone


def test_multihead_attention_is_left_untouched():
    model = nn.Sequential()
    model.attention = nn.MultiheadAttention(8, 2)
    model.out = nn.Linear(8, 8)
    converted = to_bayesian(model)
    assert type(converted.attention.out_proj) is type(model.attention.out_proj)
    assert type(converted.out) is bnn.BayesLinear
    x = torch.randn(5, 1, 8)
    converted.attention(x, x, x)


def test_lazy_and_sync_layers_are_left_untouched():
    model = nn.Sequential(nn.LazyLinear(4), nn.SyncBatchNorm(4), nn.Linear(4, 2))
    converted = to_bayesian(model)
    assert type(converted[0]) is nn.LazyLinear and type(converted[1]) is nn.SyncBatchNorm
    assert type(converted[2]) is bnn.BayesLinear


def test_a_subclass_of_a_bayesian_layer_is_left_by_to_deterministic():
    class Sampled(bnn.BayesLinear):
        pass

    model = nn.Sequential(Sampled(0, 0.1, 3, 4), bnn.BayesLinear(0, 0.1, 4, 2))
    back = to_deterministic(model)
    assert type(back[0]) is Sampled and type(back[1]) is nn.Linear


# ------------------------------------------------------------------------------------------
# Errors


def test_an_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init must be one of"):
        to_bayesian(nn.Linear(2, 2), init="xavier")


@pytest.mark.parametrize("delta", [-0.1, math.nan])
def test_a_negative_or_nan_delta_is_refused(delta):
    with pytest.raises(ValueError, match="moped_delta must be a non-negative number"):
        to_bayesian(nn.Linear(2, 2), init="moped", moped_delta=delta)


def test_an_unknown_module_name_is_refused():
    with pytest.raises(ValueError, match="'head.9', which is not a module of the model"):
        to_bayesian(Net2d(), exclude=["head.9"])


@pytest.mark.parametrize("kind", [nn.ReLU, nn.LazyLinear])
def test_a_type_that_is_not_converted_is_refused(kind):
    with pytest.raises(ValueError, match=f"include holds {kind.__name__}, which is not converted"):
        to_bayesian(Net2d(), include=[kind])


def test_a_selector_item_of_another_kind_is_refused():
    with pytest.raises(TypeError, match="exclude must hold layer types and module names, got int"):
        to_bayesian(Net2d(), exclude=[3])


# ------------------------------------------------------------------------------------------
# Dtypes and devices


@pytest.mark.parametrize("name", MODELS)
def test_float64_is_carried(name):
    model, x = trained(name, torch.float64)
    model.eval()
    converted = to_bayesian(model, init="moped")
    assert all(p.dtype == torch.float64 for p in converted.parameters())
    with torch.no_grad():
        assert_close(zero_sigma(converted)(x), model(x))
    back = to_deterministic(converted)
    assert all(p.dtype == torch.float64 for p in back.parameters())


def test_half_precision_moped_keeps_log_sigma_finite():
    layer = nn.Linear(3, 2).half()
    with torch.no_grad():
        layer.weight.zero_()
    new = to_bayesian(layer, init="moped")
    assert new.weight_log_sigma.dtype == torch.float16
    assert torch.isfinite(new.weight_log_sigma).all()


@pytest.mark.parametrize("device", DEVICES)
def test_the_device_is_carried(device):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model.to(device)
    converted = to_bayesian(model, init="moped")
    tensors = list(converted.parameters()) + list(converted.buffers())
    assert all(t.device.type == device for t in tensors)
    back = to_deterministic(converted)
    assert all(t.device.type == device for t in list(back.parameters()) + list(back.buffers()))


# ------------------------------------------------------------------------------------------
# to_deterministic


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_to_deterministic_undoes_moped_exactly(name, train):
    model, x = trained(name)
    model.train(train)
    back = to_deterministic(to_bayesian(model, 0.0, 0.1, init="moped"))
    old, new = dict(model.named_modules()), dict(back.named_modules())
    assert {k: type(m) for k, m in old.items()} == {k: type(m) for k, m in new.items()}
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        assert_close(back(x), model(x), rtol=0, atol=0)


def test_to_deterministic_takes_the_means():
    layer = bnn.BayesConv2d(0, 0.1, 2, 4, 3)
    plain = to_deterministic(layer)
    assert type(plain) is nn.Conv2d
    assert_close(plain.weight, layer.weight_mu, rtol=0, atol=0)
    assert_close(plain.bias, layer.bias_mu, rtol=0, atol=0)


def test_to_deterministic_leaves_the_bayesian_model_as_it_is():
    model = nn.Sequential(bnn.BayesLinear(0, 0.1, 3, 4))
    to_deterministic(model)
    assert type(model[0]) is bnn.BayesLinear
    assert to_deterministic(model, inplace=True) is model and type(model[0]) is nn.Linear


@pytest.mark.parametrize("name", MODELS)
def test_freeze_model_reaches_every_converted_layer(name):
    model, x = trained(name)
    converted = to_bayesian(model).eval()
    layers = [m for m in converted.modules() if getattr(m, "weight_mu", None) is not None]
    assert {type(m) for m in layers} >= {PAIRS[type(m)] for _, m in convertible(model)
                                         if getattr(m, "weight", None) is not None}
    freeze_model.freeze(converted)
    assert all(m.weight_eps is not None for m in layers)
    with torch.no_grad():
        assert_close(converted(x), converted(x), rtol=0, atol=0)
    freeze_model.unfreeze(converted)
    assert all(m.weight_eps is None and m.bias_eps is None for m in layers)


# ------------------------------------------------------------------------------------------
# torchbnn's utils._convert_model


def test_nonbayes_to_bayes_converts_in_place_by_default():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert nonbayes_to_bayes(model, 0, 0.1) is model
    assert [type(m) for m in model] == [bnn.BayesConv2d, bnn.BayesBatchNorm2d, nn.Flatten,
                                        bnn.BayesLinear]
    assert model[0].prior_sigma == 0.1


def test_bayes_to_nonbayes_converts_in_place_by_default_keeping_the_means():
    model = nn.Sequential(bnn.BayesLinear(0, 0.1, 3, 4))
    mu = model[0].weight_mu.detach().clone()
    copy_ = bayes_to_nonbayes(model, inplace=False)
    assert type(model[0]) is bnn.BayesLinear and type(copy_[0]) is nn.Linear
    assert bayes_to_nonbayes(model) is model and type(model[0]) is nn.Linear
    assert_close(model[0].weight, mu, rtol=0, atol=0)


def test_batchnorm_without_shift_round_trips():
    """torch.nn's keyword-only bias=False (a scale without a shift) is carried both ways."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, bias=False)).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2)
        net[1].running_mean.normal_()
    bnet = to_bayesian(net, init="moped")
    assert bnet[1].bias_mu is None and bnet[1].weight_mu is not None
    back = to_deterministic(bnet)
    assert back[1].bias is None
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
