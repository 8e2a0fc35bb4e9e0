"""What a device without compiled kernels gets: the pure-PyTorch path, never the dispatcher's
NotImplementedError; and what the layers run in under CUDA autocast.

A C++-only build on a machine with a CUDA torch (nvcc missing, or BNN_FAST_NO_CUDA=1) registers
the operators with CPU kernels only, so CUDA tensors must not reach them. Here the CPU plays that
device: `cpu_kernels_missing` makes bnn_fast's kernel table say the CPU has no kernel and replaces
every CPU kernel in the dispatcher with one that raises NotImplementedError, as the dispatcher
does for a dispatch key without a kernel. Autocast on CUDA runs on fake CUDA tensors
(FakeTensorMode), which need no GPU.
"""
import warnings

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import bnn_fast as bnn
from bnn_fast import _ops, reference
from bnn_fast.sampling import sample_many
from conftest import requires_ext

pytestmark = requires_ext


@pytest.fixture
def cpu_kernels_missing(monkeypatch):
    for key in list(_ops._KERNELS):
        if key[1] == "cpu":
            monkeypatch.setitem(_ops._KERNELS, key, False)
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bnn_fast::")]

    def missing(*args, **kwargs):
        raise NotImplementedError("no kernel for this dispatch key (a test stand-in)")

    lib = torch.library.Library("bnn_fast", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name in names:
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"):
                lib.impl(name.split("::")[1], missing, "CPU")
    yield
    lib._destroy()


def test_the_stand_in_makes_the_operators_raise(cpu_kernels_missing):
    with pytest.raises(NotImplementedError):
        torch.ops.bnn_fast.gaussian_kl([torch.zeros(2)], [torch.zeros(2)], 0.0, 0.0)


@pytest.mark.parametrize("has_mu", [True, False])
def test_sample_gaussian_takes_the_pytorch_path(cpu_kernels_missing, has_mu):
    mu = torch.randn(4, 3, requires_grad=True) if has_mu else None
    ls = torch.randn(4, 3, requires_grad=True)
    out = _ops.sample_gaussian(mu, ls, 8, 2, 3)
    eps = reference.normal((3, 4, 3), 8, 2, torch.float32, "cpu", 0)
    torch.testing.assert_close(out, reference.sample_gaussian(mu, ls, eps))
    out.sum().backward()
    assert ls.grad is not None


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("samples", [None, 3])
def test_bayes_linear_takes_the_pytorch_path(cpu_kernels_missing, estimator, samples):
    layer = bnn.BayesLinear(0.0, 0.1, 5, 3, estimator=estimator)
    x = torch.randn(4, 5)
    if samples is None:
        y = layer(x)
    else:
        with sample_many(samples):
            y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and layer.weight_mu.grad is not None


def test_bayesian_kl_loss_takes_the_pytorch_path(cpu_kernels_missing):
    model = nn.Sequential(bnn.BayesLinear(0.0, 0.1, 5, 3), nn.ReLU(), bnn.BayesLinear(0.0, 0.1, 3, 2))
    kl = bnn.BKLLoss()(model)
    kl.backward()
    mus = [p for n, p in model.named_parameters() if n.endswith("_mu")]
    sigmas = [p for n, p in model.named_parameters() if n.endswith("_log_sigma")]
    want = reference.gaussian_kl(mus, sigmas, 0.0, float(torch.tensor(0.1).log())) / sum(m.numel() for m in mus)
    torch.testing.assert_close(kl.reshape(()), want.detach())


def test_normal_takes_the_pytorch_path_with_the_same_noise(cpu_kernels_missing):
    # The reference implements the same counter-based contract: the same numbers.
    got = _ops.normal((3, 7), 12345, 2, offset=(1 << 34) - 5)
    with _ops.reference_path():
        want = _ops.normal((3, 7), 12345, 2, offset=(1 << 34) - 5)
    assert torch.equal(got, want)


def test_conv_and_batch_norm_under_sample_many_take_the_pytorch_path(cpu_kernels_missing):
    model = nn.Sequential(bnn.BayesConv2d(0.0, 0.1, 2, 3, 3, padding=1), bnn.BayesBatchNorm2d(0.0, 0.1, 3)).eval()
    x = torch.randn(2, 2, 5, 5)
    with sample_many(3):
        y = model(x)
    y.sum().backward()
    assert y.shape == (6, 3, 5, 5) and torch.isfinite(y).all()


def test_a_two_layer_mlp_under_sample_many_takes_the_pytorch_path(cpu_kernels_missing):
    model = nn.Sequential(bnn.BayesLinear(0.0, 0.1, 1, 16), nn.ReLU(), bnn.BayesLinear(0.0, 0.1, 16, 1))
    with torch.no_grad(), sample_many(4):
        y = model(torch.randn(5, 1))
    assert y.shape == (20, 1)


def fake_cuda_layers(dtype):
    """A BayesLinear and an nn.Linear of `dtype` on a fake CUDA device (no GPU needed)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            return bnn.BayesLinear(0.0, 0.1, 4, 3), nn.Linear(4, 3)
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_autocast_casts_a_layer_as_pytorch_does(dtype):
    # PyTorch's autocast never casts float64: nn.Linear stays float64, float32 runs in float16.
    if not _ops.has_kernel("bayes_linear", "cuda"):
        pytest.skip("the CUDA kernels are not compiled")
    with FakeTensorMode():
        bayes, linear = fake_cuda_layers(dtype)
        x = torch.randn(2, 4, device="cuda", dtype=dtype)
        # (torch.autocast("cuda") disables itself without a GPU: enabled by hand.)
        torch.set_autocast_enabled("cuda", True)
        try:
            want = linear(x).dtype
            got = bayes(x).dtype
            kernel = _ops.kernel_dtype(x, bayes.weight_mu)
        finally:
            torch.set_autocast_enabled("cuda", False)
    assert want == (torch.float64 if dtype == torch.float64 else torch.float16)
    assert got == want and kernel == want
