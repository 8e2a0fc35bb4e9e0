"""bnn_fast::sample_gaussian: the compiled operator against its pure-PyTorch twin fed the same noise
(the RNG contract), its backward against the twin's autograd, and its argument checks."""

import pytest
import torch

from bnn_fast import _ops, reference
from conftest import DEVICES, SIMD_LEVELS, requires_ext

pytestmark = requires_ext

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-14, atol=1e-14)}
# The gradients are sums over the samples, in another order than PyTorch's.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-13, atol=1e-14)}

SHAPES = [
    (),                  # a 0-dim parameter
    (1,),
    (7,),                # odd numel
    (5, 3),
    (1031,),             # numel not a multiple of 4, past one noise tile
    (3, 700),            # three noise tiles, the last one partial
    (16, 3, 3, 3),       # a Conv2d weight
    (4, 2, 3, 3, 3),     # a Conv3d weight
    (0,),
    (3, 0, 2),
]
SEED, STREAM = 1234567890123, 5


def params(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = (torch.rand(shape, generator=g, dtype=dtype) - 0.5).to(device)
    ls = (torch.randn(shape, generator=g, dtype=dtype) * 0.3 - 1.5).to(device)
    return mu, ls


def twin(mu, ls, seed, stream, S):
    """The reference twin over the contract's noise for (seed, stream)."""
    eps = _ops.normal((S,) + tuple(ls.shape), seed, stream, dtype=ls.dtype, device=ls.device)
    return reference.sample_gaussian(mu, ls, eps)


def kernel(mu, ls, seed, stream, S):
    return torch.ops.bnn_fast.sample_gaussian(mu, ls, seed, stream, S)


def grads(fn, mu, ls, seed, stream, S, upstream):
    """(grad_mu or None, grad_log_sigma) of sum(fn(...) * upstream)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in ([ls] if mu is None else [mu, ls])]
    out = fn(None if mu is None else leaves[0], leaves[-1], seed, stream, S)
    g = torch.autograd.grad((out * upstream).sum(), leaves)
    return (None, g[0]) if mu is None else g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("has_mu", [True, False])
def test_forward_equals_twin(device, dtype, S, shape, has_mu):
    mu, ls = params(shape, dtype, device)
    mu = mu if has_mu else None
    got = kernel(mu, ls, SEED, STREAM, S)
    assert got.shape == (S,) + shape and got.dtype == dtype
    torch.testing.assert_close(got, twin(mu, ls, SEED, STREAM, S), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("has_mu", [True, False])
def test_backward_equals_twin_autograd(device, dtype, S, shape, has_mu):
    mu, ls = params(shape, dtype, device, seed=1)
    upstream = torch.randn((S,) + shape, dtype=dtype, device=device)
    got = grads(kernel, mu if has_mu else None, ls, SEED, STREAM, S, upstream)
    want = grads(twin, mu if has_mu else None, ls, SEED, STREAM, S, upstream)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **GRAD_TOL[dtype])


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_simd_level_equals_twin(monkeypatch, simd, dtype):
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    mu, ls = params((33, 67), dtype, "cpu", seed=2)
    upstream = torch.randn(2, 33, 67, dtype=dtype)
    torch.testing.assert_close(kernel(mu, ls, 9, 3, 2), twin(mu, ls, 9, 3, 2), **TOL[dtype])
    for a, b in zip(grads(kernel, mu, ls, 9, 3, 2, upstream), grads(twin, mu, ls, 9, 3, 2, upstream)):
        torch.testing.assert_close(a, b, **GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_seed_and_stream_select_the_noise(device):
    mu, ls = params((4, 5), torch.float64, device)
    base = kernel(mu, ls, 1, 0, 2)
    assert torch.equal(kernel(mu, ls, 1, 0, 2), base)
    assert not torch.equal(kernel(mu, ls, 2, 0, 2), base)
    assert not torch.equal(kernel(mu, ls, 1, 1, 2), base)
    # Sample s is indexed s * numel + j: the first of three samples is the one sample.
    assert torch.equal(kernel(mu, ls, 1, 0, 3)[:2], base)


def test_python_entry_runs_the_operator():
    mu, ls = params((6, 4), torch.float32, "cpu")
    mu.requires_grad_(True)
    out = _ops.sample_gaussian(mu, ls, SEED, STREAM, 2)
    assert "SampleFunction" in out.grad_fn.name()
    assert torch.equal(out, kernel(mu, ls, SEED, STREAM, 2))
    with _ops.reference_path():
        assert "SampleFunction" not in _ops.sample_gaussian(mu, ls, SEED, STREAM, 2).grad_fn.name()


def test_python_entry_takes_seeds_as_uint64():
    mu, ls = params((10,), torch.float64, "cpu")
    big = (1 << 64) - 3  # above int64: the same bits as -3
    torch.testing.assert_close(_ops.sample_gaussian(mu, ls, big, big, 2), kernel(mu, ls, -3, -3, 2))
    torch.testing.assert_close(_ops.sample_gaussian(mu, ls, big, big, 2), twin(mu, ls, big, big, 2), **TOL[torch.float64])


def test_dtypes_without_a_cpu_kernel_take_the_twin():
    mu, ls = params((3, 5), torch.float32, "cpu")
    mu, ls = mu.to(torch.bfloat16), ls.to(torch.bfloat16)
    assert torch.equal(_ops.sample_gaussian(mu, ls, 4, 1, 2), twin(mu, ls, 4, 1, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_mu", [True, False])
@pytest.mark.parametrize("S", [1, 3])
def test_gradcheck_float64(device, has_mu, S):
    mu, ls = params((3, 2, 5), torch.float64, device, seed=3)
    inputs = [t.requires_grad_(True) for t in ([mu, ls] if has_mu else [ls])]
    fn = (lambda m, s: kernel(m, s, 77, 2, S)) if has_mu else (lambda s: kernel(None, s, 77, 2, S))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("has_mu", [True, False])
def test_opcheck(device, dtype, has_mu):
    mu, ls = params((6, 3, 3), dtype, device, seed=4)
    mu = mu.requires_grad_(True) if has_mu else None
    torch.library.opcheck(torch.ops.bnn_fast.sample_gaussian.default, (mu, ls.requires_grad_(True), 5, 1, 2))


def test_thread_count_does_not_change_the_bits():
    mu, ls = params((200_003,), torch.float32, "cpu", seed=5)
    upstream = torch.randn(2, 200_003)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            out = kernel(mu, ls, SEED, STREAM, 2)
            results.append((out,) + grads(kernel, mu, ls, SEED, STREAM, 2, upstream))
    finally:
        torch.set_num_threads(before)
    for one, many in zip(*results):
        assert torch.equal(one, many)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    mu, ls = params((9, 14), torch.float64, device, seed=6)
    mu_t, ls_t = mu.t(), ls[:, ::2]  # a transpose and a strided slice, [14, 9] and [9, 7]
    mu_s = mu[:, ::2]
    assert not (mu_t.is_contiguous() or ls_t.is_contiguous() or mu_s.is_contiguous())
    assert torch.equal(kernel(mu_s, ls_t, 3, 0, 2), kernel(mu_s.contiguous(), ls_t.contiguous(), 3, 0, 2))
    torch.testing.assert_close(kernel(mu_t, ls.t(), 3, 0, 2), twin(mu_t, ls.t(), 3, 0, 2), **TOL[torch.float64])
    # A non-contiguous upstream gradient (expanded: stride 0 over the samples).
    upstream = torch.randn(9, 7, dtype=torch.float64, device=device).expand(3, 9, 7)
    for a, b in zip(grads(kernel, mu_s, ls_t, 3, 0, 3, upstream), grads(twin, mu_s, ls_t, 3, 0, 3, upstream)):
        torch.testing.assert_close(a, b, **GRAD_TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates(device):
    mu, ls = params((10,), torch.float32, device)
    mu[2], ls[7] = float("nan"), float("nan")
    out = kernel(mu, ls, 1, 0, 2)
    nan = torch.zeros(10, dtype=torch.bool, device=device)
    nan[2] = nan[7] = True
    assert torch.equal(out.isnan(), nan.expand(2, 10))
    upstream = torch.ones(2, 10, device=device)
    upstream[1, 4] = float("nan")
    gmu, gls = grads(kernel, mu, ls, 1, 0, 2, upstream)
    assert gmu.isnan().nonzero().flatten().tolist() == [4]
    assert gls.isnan().nonzero().flatten().tolist() == [4, 7]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [(True, False), (False, True), (False, False)])
def test_backward_returns_empty_for_gradients_not_asked_for(device, mask):
    _, ls = params((4, 3), torch.float64, device)
    grad = torch.randn(2, 4, 3, dtype=torch.float64, device=device)
    full = torch.ops.bnn_fast.sample_gaussian_backward(grad, ls, 8, 1, 2, [True, True])
    got = torch.ops.bnn_fast.sample_gaussian_backward(grad, ls, 8, 1, 2, list(mask))
    for g, f, asked in zip(got, full, mask):
        assert torch.equal(g, f) if asked else g.numel() == 0
    torch.testing.assert_close(full[0], grad.sum(0), **GRAD_TOL[torch.float64])


def test_double_backward_is_refused():
    mu, ls = params((5,), torch.float64, "cpu")
    ls.requires_grad_(True)
    out = kernel(mu, ls, 1, 0, 1)
    with pytest.raises(RuntimeError, match="sample_gaussian: double backward"):
        torch.autograd.grad(out.sum(), ls, create_graph=True)


BAD_ARGS = [  # (mu, log_sigma, n_samples, exception, words the message must hold)
    (torch.zeros(3, dtype=torch.float64), torch.zeros(3), 1, TypeError, "mu"),
    (torch.zeros(4), torch.zeros(3), 1, ValueError, "mu"),
    (torch.zeros(3, 1), torch.zeros(3), 1, ValueError, "mu"),
    (None, torch.zeros(3, dtype=torch.int64), 1, TypeError, "log_sigma"),
    (torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 1, TypeError, "log_sigma"),
    (None, torch.zeros(3), -1, ValueError, "n_samples"),
]


@pytest.mark.parametrize("mu,ls,S,exc,word", BAD_ARGS)
def test_python_entry_rejects_bad_arguments(mu, ls, S, exc, word):
    with pytest.raises(exc, match=f"sample_gaussian: {word}"):
        _ops.sample_gaussian(mu, ls, 0, 0, S)


@pytest.mark.parametrize("mu,ls,S,exc,word", BAD_ARGS)
def test_operator_rejects_bad_arguments(mu, ls, S, exc, word):
    with pytest.raises(exc, match=f"sample_gaussian: {word}"):
        kernel(mu, ls, 0, 0, S)


def test_python_entry_rejects_a_mu_that_is_not_a_tensor():
    with pytest.raises(TypeError, match="sample_gaussian: mu must be a tensor or None"):
        _ops.sample_gaussian(1.0, torch.zeros(3), 0)


def test_cpu_operator_names_its_dtypes():
    with pytest.raises(TypeError, match="log_sigma must be float32 or float64 on the CPU, got Half"):
        kernel(None, torch.zeros(3, dtype=torch.float16), 0, 0, 1)


def test_backward_operator_checks_grad():
    ls = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"sample_gaussian_backward: grad must have shape \[2, 4, 3\]"):
        torch.ops.bnn_fast.sample_gaussian_backward(torch.zeros(2, 3, 4), ls, 0, 0, 2, [True, True])
    with pytest.raises(TypeError, match="sample_gaussian_backward: grad must have dtype Float"):
        torch.ops.bnn_fast.sample_gaussian_backward(torch.zeros(2, 4, 3, dtype=torch.float64), ls, 0, 0, 2,
                                                    [True, True])
    with pytest.raises(ValueError, match="sample_gaussian_backward: n_samples must be >= 0"):
        torch.ops.bnn_fast.sample_gaussian_backward(torch.zeros(0, 4, 3), ls, 0, 0, -1, [True, True])
