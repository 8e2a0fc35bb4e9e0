"""bnn_fast::gaussian_kl: the fused closed-form KL against its reference and torch.distributions."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import bnn_fast
from bnn_fast import _ops, reference
from conftest import DEVICES, SIMD_LEVELS, requires_ext

pytestmark = requires_ext


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mus = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]
    lss = [(torch.randn(s, generator=g, dtype=dtype) * 0.5 - 2).to(device) for s in shapes]
    return mus, lss


SHAPES = [(7, 5), (13,), (3, 4, 2), (1,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_equals_reference(device, dtype):
    mus, lss = make_params(SHAPES, dtype, device)
    got = _ops.gaussian_kl(mus, lss, 0.1, math.log(0.3))
    want = reference.gaussian_kl(mus, lss, 0.1, math.log(0.3))
    assert got.dtype == dtype and got.device.type == device and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-10 if dtype == torch.float64 else 1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_equals_torch_distributions_float64(device):
    mus, lss = make_params(SHAPES, torch.float64, device)
    got = _ops.gaussian_kl(mus, lss, -0.2, math.log(0.5))
    prior = Normal(torch.tensor(-0.2, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    want = sum(kl_divergence(Normal(m.cpu(), s.cpu().exp()), prior).sum() for m, s in zip(mus, lss))
    assert abs(got.item() - want.item()) <= 1e-10 * abs(want.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_gradients_equal_reference(device, dtype):
    mus, lss = make_params(SHAPES, dtype, device, seed=1)
    for t in mus + lss:
        t.requires_grad_(True)
    got = torch.autograd.grad(_ops.gaussian_kl(mus, lss, 0.0, -1.0) * 3.0, mus + lss)
    want = torch.autograd.grad(reference.gaussian_kl(mus, lss, 0.0, -1.0) * 3.0, mus + lss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_gradcheck_float64(device):
    mus, lss = make_params([(3, 4), (5,)], torch.float64, device, seed=2)
    inputs = [t.requires_grad_(True) for t in mus + lss]

    def f(*ts):
        return _ops.gaussian_kl(list(ts[:2]), list(ts[2:]), 0.3, math.log(0.7))

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_opcheck(device, dtype):
    mus, lss = make_params([(6, 3), (4,)], dtype, device, seed=3)
    for t in mus + lss:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.bnn_fast.gaussian_kl.default, (mus, lss, 0.0, -2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_kl_extreme_log_sigma_is_finite_and_correct(device):
    ls = torch.linspace(-20, 20, 41, dtype=torch.float64, device=device)
    mu = torch.zeros_like(ls)
    got = _ops.gaussian_kl([mu], [ls], 0.0, 0.0)
    want = reference.gaussian_kl([mu], [ls], 0.0, 0.0)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    g_mu, g_ls = torch.ops.bnn_fast.gaussian_kl_backward(torch.ones((), dtype=torch.float64, device=device), [mu], [ls], 0.0, 0.0)
    assert torch.isfinite(g_ls[0]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_kl_large_float32_does_not_drift(device):
    # 2^22 identical elements: a float32 accumulator would lose several digits.
    n = 1 << 22
    mu = torch.full((n,), 0.25, device=device)
    ls = torch.full((n,), math.log(0.1), device=device)
    got = _ops.gaussian_kl([mu], [ls], 0.0, math.log(0.1)).item()
    one = reference.gaussian_kl_elements(torch.tensor(0.25, dtype=torch.float64), torch.tensor(math.log(0.1), dtype=torch.float32).double(), 0.0, math.log(0.1)).item()
    assert abs(got - one * n) <= 1e-6 * abs(one * n)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_is_deterministic_across_thread_counts(device):
    mus, lss = make_params([(300, 700), (5000,)], torch.float32, device, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops.gaussian_kl(mus, lss, 0.0, -1.0)
        torch.set_num_threads(2)
        two = _ops.gaussian_kl(mus, lss, 0.0, -1.0)
    finally:
        torch.set_num_threads(before)
    assert one.item() == two.item()


@pytest.mark.parametrize("level", ["1", "avx2"])  # "1": AVX-512 where the CPU has it
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_cpu_scalar_path_equals_simd_path(monkeypatch, level, dtype):
    mus, lss = make_params([(257, 3), (11,), (40,)], dtype, "cpu", seed=5)
    results = []
    for setting in (level, "0"):
        monkeypatch.setenv("BNN_FAST_CPU_SIMD", setting)
        leaves = [t.detach().clone().requires_grad_(True) for t in mus + lss]
        kl = _ops.gaussian_kl(leaves[:len(mus)], leaves[len(mus):], 0.2, -1.5)
        results.append([kl] + list(torch.autograd.grad(kl, leaves)))
    # float64 differs only in the order of the sums; float32 also in the exp of 2 log_sigma (the
    # vector paths' float exp against the scalar path's double exp: an ulp of sigma^2 / s^2, about
    # 1, which grad_log_sigma = sigma^2 / s^2 - 1 keeps as an absolute error where it is near 0).
    tol = dict(rtol=1e-13, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log_sigma,prior_log_sigma", [(50.0, 45.0), (-50.0, -50.0)])
def test_kl_float32_log_sigma_past_the_float_exp_range(monkeypatch, simd, device, log_sigma, prior_log_sigma):
    # exp(2 * 50) overflows float32 and exp(-100) is below its smallest subnormal, not so the KL:
    # with a prior sigma of e^45, each element at 50 is 45 - 50 + e^100 / (2 e^90) - 1/2 =
    # e^10 / 2 - 5.5; at -50 against a prior sigma of e^-50 it is 0. 40 elements: five AVX2 blocks,
    # or two AVX-512 blocks and a scalar tail.
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    ls = torch.full((40,), log_sigma, device=device)
    ls[3] = log_sigma - 1.0  # another value in the first block
    mu = torch.zeros_like(ls)
    got = _ops.gaussian_kl([mu], [ls], 0.0, prior_log_sigma)
    want = reference.gaussian_kl([mu.double()], [ls.double()], 0.0, prior_log_sigma)
    assert torch.isfinite(got) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("device", DEVICES)
def test_kl_past_the_float32_range_is_inf_not_an_error(monkeypatch, simd, device):
    # sigma^2 / s^2 = e^2 / e^-100: the KL itself exceeds float32, as in float arithmetic.
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    ls = torch.ones(16, device=device)
    got = _ops.gaussian_kl([torch.zeros_like(ls)], [ls], 0.0, -50.0)
    assert got.dtype == torch.float32 and got.item() == math.inf


def test_kl_empty_list_is_zero():
    assert _ops.gaussian_kl([], [], 0.0, 0.0).item() == 0.0


def test_kl_empty_tensors_are_zero():
    got = _ops.gaussian_kl([torch.empty(0, 3)], [torch.empty(0, 3)], 0.0, 0.0)
    assert got.item() == 0.0


def test_kl_rejects_mixed_dtypes():
    with pytest.raises(TypeError, match=r"mus\[1\].*float64"):
        _ops.gaussian_kl([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], [torch.zeros(2), torch.zeros(2)], 0.0, 0.0)


def test_kl_rejects_mixed_devices():
    with pytest.raises(ValueError, match=r"log_sigmas\[0\].*meta"):
        _ops.gaussian_kl([torch.zeros(2)], [torch.zeros(2, device="meta")], 0.0, 0.0)


def test_kl_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"log_sigmas\[0\]"):
        _ops.gaussian_kl([torch.zeros(2)], [torch.zeros(3)], 0.0, 0.0)


def test_kl_op_rejects_mixed_dtypes_directly():
    with pytest.raises(TypeError, match=r"mu\[1\]"):
        torch.ops.bnn_fast.gaussian_kl([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], [torch.zeros(2), torch.zeros(2, dtype=torch.float64)], 0.0, 0.0)


def test_kl_rejects_integer_dtype():
    with pytest.raises(TypeError, match="float32 or float64"):
        _ops.gaussian_kl([torch.zeros(2, dtype=torch.int32)], [torch.zeros(2, dtype=torch.int32)], 0.0, 0.0)


def test_kl_nan_propagates():
    got = _ops.gaussian_kl([torch.tensor([float("nan"), 0.0])], [torch.zeros(2)], 0.0, 0.0)
    assert torch.isnan(got)


def test_kl_double_backward_raises_clear_error():
    mu = torch.randn(3, dtype=torch.float64, requires_grad=True)
    ls = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(_ops.gaussian_kl([mu], [ls], 0.0, 0.0), mu, create_graph=True)
