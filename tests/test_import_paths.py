"""Every import path of torchbnn 1.2 resolves under bnn_fast to the same names, and code written
against those paths (a model-based RL script's pattern) runs unchanged."""
import importlib
import inspect
import io
import math
import pkgutil

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

torchbnn = pytest.importorskip("torchbnn")

from bnn_fast import BKLLoss  # noqa: E402
from bnn_fast.modules.linear import BayesLinear  # noqa: E402
from bnn_fast.modules.module import BayesModule  # noqa: E402
from bnn_fast.utils import freeze, unfreeze  # noqa: E402

TORCHBNN_MODULES = ["torchbnn"] + sorted(
    info.name for info in pkgutil.walk_packages(torchbnn.__path__, "torchbnn.")
)


def ours(name):
    return "bnn_fast" + name[len("torchbnn"):]


def torchbnn_names(module):
    """The classes and functions of torchbnn that `module` holds (defined there or imported from
    elsewhere in torchbnn): what code may import from that path. Modules and what torchbnn
    imports from torch or the standard library are left out."""
    names = []
    for name in dir(module):
        obj = getattr(module, name)
        if name.startswith("__") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", "").split(".")[0] == "torchbnn":
            names.append(name)
    return names


def test_the_walk_finds_every_torchbnn_module():
    assert {"torchbnn.modules.module", "torchbnn.modules.linear", "torchbnn.modules.conv",
            "torchbnn.modules.batchnorm", "torchbnn.modules.loss", "torchbnn.functional",
            "torchbnn.utils", "torchbnn.utils.freeze_model",
            "torchbnn.utils._convert_model"} <= set(TORCHBNN_MODULES)


@pytest.mark.parametrize("name", TORCHBNN_MODULES)
def test_each_torchbnn_module_has_a_bnn_fast_twin_with_its_names(name):
    theirs = importlib.import_module(name)
    mine = importlib.import_module(ours(name))
    missing = [n for n in torchbnn_names(theirs) if not hasattr(mine, n)]
    assert not missing, f"{ours(name)} lacks {missing}"


@pytest.mark.parametrize("name", TORCHBNN_MODULES)
def test_each_torchbnn_module_is_reachable_as_an_attribute(name):
    # `import bnn_fast` alone then `bnn_fast.utils.freeze_model.freeze(...)`, as after
    # `import torchbnn` (torchbnn's packages import their submodules).
    module = importlib.import_module("bnn_fast")
    for part in ours(name).split(".")[1:]:
        module = getattr(module, part)
    assert module is importlib.import_module(ours(name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_loss_is_torchbnns_summed_kl(dtype):
    from bnn_fast.functional import _kl_loss

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 5, generator=g, dtype=dtype, requires_grad=True)
    log_sigma = (torch.randn(7, 5, generator=g, dtype=dtype) - 2).requires_grad_()
    ours = _kl_loss(mu, log_sigma, 0.3, math.log(0.2))
    theirs = torchbnn.functional._kl_loss(mu, log_sigma, 0.3, math.log(0.2))
    assert ours.shape == theirs.shape == () and ours.dtype == dtype
    assert_close(ours, theirs)
    ours_grads = torch.autograd.grad(ours, (mu, log_sigma))
    assert_close(ours_grads, torch.autograd.grad(theirs, (mu, log_sigma)))


# ------------------------------------------------------------------------------------------
# A model-based RL script's pattern: a BayesLinear subclass that samples its own weights, inside
# a BayesModule container that skips BayesModule's __init__.


class BayesLayerWithSample(BayesLinear):
    def sample_weight(self):
        eps = torch.randn_like(self.weight_log_sigma)
        return self.weight_mu + torch.exp(self.weight_log_sigma) * eps

    def forward_with_sample(self, x):
        bias = None
        if self.bias:
            eps = torch.randn_like(self.bias_log_sigma)
            bias = self.bias_mu + torch.exp(self.bias_log_sigma) * eps
        return F.linear(x, self.sample_weight(), bias)


class BNN(BayesModule):
    def __init__(self, state_dim, action_dim, hidden=16):
        super(BayesModule, self).__init__()
        self.layers = torch.nn.ModuleList([
            BayesLayerWithSample(0, 0.1, state_dim + action_dim, hidden),
            BayesLayerWithSample(0, 0.1, hidden, state_dim),
        ])

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))


def make_rl_model():
    torch.manual_seed(0)
    return BNN(state_dim=3, action_dim=2)


def test_the_rl_pattern_trains_with_the_kl_loss():
    model = make_rl_model()
    x, y = torch.randn(64, 5), torch.randn(64, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    kl = BKLLoss(reduction="mean", last_layer_only=False)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), y) + 0.01 * kl(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])


def test_the_rl_pattern_layers_sample_their_weights():
    layer = make_rl_model().layers[0]
    w = layer.sample_weight()
    assert w.shape == layer.weight_mu.shape and not torch.equal(w, layer.weight_mu)
    assert layer.forward_with_sample(torch.randn(4, 5)).shape == (4, 16)


def test_the_rl_pattern_freezes_and_unfreezes():
    model = make_rl_model()
    x = torch.randn(8, 5)
    freeze(model)
    assert all(layer.weight_eps is not None for layer in model.layers)
    assert_close(model(x), model(x), rtol=0, atol=0)
    unfreeze(model)
    assert all(layer.weight_eps is None and layer.bias_eps is None for layer in model.layers)
    assert not torch.equal(model(x), model(x))


def test_the_rl_pattern_freezes_through_the_container_method():
    model = make_rl_model()
    x = torch.randn(8, 5)
    assert model.freeze() is model
    assert_close(model(x), model(x), rtol=0, atol=0)
    assert model.unfreeze() is model
    assert not torch.equal(model(x), model(x))


def test_the_rl_pattern_state_dict_round_trips():
    model = make_rl_model()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    other = BNN(state_dim=3, action_dim=2)
    other.load_state_dict(torch.load(buffer))
    assert other.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert_close(other.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(8, 5)
    torch.manual_seed(2)
    expected = model(x)
    torch.manual_seed(2)
    assert_close(other(x), expected, rtol=0, atol=0)
