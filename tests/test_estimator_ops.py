"""bnn_fast::bayes_linear_local and bnn_fast::bayes_linear_flipout: the fused operators against
their PyTorch twins (bnn_fast.estimators.local / flipout) fed the exact noise of the RNG contract."""

import pytest
import torch

import bnn_fast
from bnn_fast import _ops, estimators
from conftest import (
    BAD_LINEAR_ARGS, CUDA, DEVICES, assert_closed_form_moments, linear_args, make_layer, requires_ext,
)

pytestmark = requires_ext

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
OPS = {"local": _ops.bayes_linear_local, "flipout": _ops.bayes_linear_flipout}


def signs(shape, seed, stream, like):
    z = _ops.normal(shape, seed, stream, dtype=like.dtype, device=like.device)
    return torch.where(z >= 0, 1.0, -1.0).to(like.dtype)


def twin(name, x, mu, ls, bmu, bls, seed, S):
    """The PyTorch composition fed the noise the operator draws (streams of DESIGN.md section 3)."""
    out_f, in_f = mu.shape
    n = x.shape[1]
    normal = lambda shape, stream: _ops.normal(shape, seed, stream, dtype=mu.dtype, device=mu.device)  # noqa: E731
    if name == "local":
        return estimators.local(x, mu, ls, bmu, bls, n_samples=S, output_eps=normal((S, n, out_f), 2))
    return estimators.flipout(
        x, mu, ls, bmu, bls, n_samples=S,
        weight_eps=normal((S, out_f, in_f), 0),
        bias_eps=normal((S, out_f), 1) if bmu is not None else None,
        input_signs=signs((S, n, in_f), seed, 3, mu),
        output_signs=signs((S, n, out_f), seed, 4, mu),
    )


CASES = [  # (S, x_samples, N, in, out, bias)
    (1, 1, 1, 16, 8, True),
    (1, 1, 5, 33, 7, True),
    (1, 1, 40, 64, 24, False),
    (3, 1, 4, 17, 5, True),
    (3, 3, 6, 12, 9, True),
    (2, 2, 20, 8, 3, False),
    (5, 1, 300, 1, 30, True),  # the demo's first layer: in_features 1, broadcast input
]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs,N,in_f,out_f,bias", CASES)
def test_forward_equals_twin(name, device, dtype, S, xs, N, in_f, out_f, bias):
    mu, ls, bmu, bls = make_layer(out_f, in_f, dtype, device, bias)
    x = torch.randn(xs, N, in_f, dtype=dtype, device=device)
    seed = 1234567890123
    got = OPS[name](x, mu, ls, bmu, bls, seed, S)
    assert got.shape == (S, N, out_f)
    torch.testing.assert_close(got, twin(name, x, mu, ls, bmu, bls, seed, S), **TOL[dtype])


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs,N,in_f,out_f,bias", CASES)
def test_gradients_equal_twin(name, device, dtype, S, xs, N, in_f, out_f, bias):
    params = [p for p in make_layer(out_f, in_f, dtype, device, bias, seed=1) if p is not None]
    x = torch.randn(xs, N, in_f, dtype=dtype, device=device)
    grads = []
    for fn in (OPS[name], lambda *a: twin(name, *a)):
        leaves = [t.detach().clone().requires_grad_(True) for t in [x] + params]
        xx, mu, ls = leaves[:3]
        bmu, bls = (leaves[3], leaves[4]) if bias else (None, None)
        y = fn(xx, mu, ls, bmu, bls, 99, S)
        weights = torch.linspace(-1, 1, y.numel(), dtype=dtype, device=device).reshape(y.shape)
        grads.append(torch.autograd.grad((y * weights).sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S,xs,bias", [(1, 1, True), (2, 1, True), (2, 2, False)])
def test_gradcheck_float64(name, device, S, xs, bias):
    mu, ls, bmu, bls = make_layer(4, 5, torch.float64, device, bias, seed=2)
    x = torch.randn(xs, 3, 5, dtype=torch.float64, device=device)
    inputs = [t.requires_grad_(True) for t in (x, mu, ls, bmu, bls) if t is not None]
    if bias:
        fn = lambda *a: OPS[name](*a, 77, S)  # noqa: E731
    else:
        fn = lambda x, mu, ls: OPS[name](x, mu, ls, None, None, 77, S)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", OPS)
def test_double_backward_raises_clear_error(name):
    mu, ls, bmu, bls = make_layer(3, 4, torch.float64, "cpu")
    x = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    y = OPS[name](x, mu, ls, bmu, bls, 1, 1)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs", [(1, 1), (3, 1), (3, 3)])
def test_opcheck(name, device, dtype, S, xs):
    mu, ls, bmu, bls = make_layer(6, 5, dtype, device, seed=3)
    x = torch.randn(xs, 4, 5, dtype=dtype, device=device)
    for t in (x, mu, ls, bmu, bls):
        t.requires_grad_(True)
    op = getattr(torch.ops.bnn_fast, "bayes_linear_" + name).default
    torch.library.opcheck(op, (x, mu, ls, bmu, bls, 5, S))


@pytest.mark.parametrize("name", OPS)
def test_s_samples_equal_the_twin_sample_by_sample(name):
    # Sample s of one S-sample call is the twin's sample s: the noise index s * R + r.
    mu, ls, bmu, bls = make_layer(7, 9, torch.float64, "cpu", seed=5)
    x = torch.randn(1, 4, 9, dtype=torch.float64)
    y = OPS[name](x, mu, ls, bmu, bls, 31, 4)
    full = twin(name, x, mu, ls, bmu, bls, 31, 4)
    for s in range(4):
        torch.testing.assert_close(y[s], full[s], **TOL[torch.float64])
    # ... and a per-sample input [S, N, in] equal to the broadcast one gives the same samples.
    torch.testing.assert_close(OPS[name](x.expand(4, 4, 9).contiguous(), mu, ls, bmu, bls, 31, 4), y, **TOL[torch.float64])


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_output_mean_and_variance_match_closed_form(name, device):
    # Every estimator gives each row the exact marginal of y = x W^T + b with W ~ N(mu, sigma^2).
    assert_closed_form_moments(OPS[name], device)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(name, device):
    mu, ls, bmu, bls = make_layer(3, 4, torch.float32, device)
    x = torch.randn(1, 0, 4, device=device, requires_grad=True)
    mu.requires_grad_(True)
    y = OPS[name](x, mu, ls, bmu, bls, 0, 2)
    assert y.shape == (2, 0, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(mu.grad, torch.zeros_like(mu))


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_input(name):
    mu, ls, bmu, bls = make_layer(3, 4, torch.float64, "cpu")
    x = torch.randn(1, 4, 5, dtype=torch.float64).transpose(1, 2)  # [1, 5, 4], not contiguous
    got = OPS[name](x, mu, ls, bmu, bls, 3, 2)
    torch.testing.assert_close(got, twin(name, x, mu, ls, bmu, bls, 3, 2))


def test_local_zero_row_without_bias_has_finite_gradients():
    # var = 0 there: the floor (std = sqrt(tiny), about 1e-154 in float64) keeps the output at the
    # mean and the gradient zero, not NaN.
    mu, ls, _, _ = make_layer(3, 4, torch.float64, "cpu")
    x = torch.zeros(1, 2, 4, dtype=torch.float64, requires_grad=True)
    mu.requires_grad_(True)
    ls.requires_grad_(True)
    y = _ops.bayes_linear_local(x, mu, ls, None, None, 5, 3)
    torch.testing.assert_close(y, torch.zeros_like(y), rtol=0, atol=1e-150)
    y.sum().backward()
    for t in (x, mu, ls):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(ls.grad, torch.zeros_like(ls))


@pytest.mark.parametrize("name", OPS)
def test_non_finite_parameters_propagate(name):
    mu, ls, bmu, bls = make_layer(3, 4, torch.float32, "cpu")
    mu[0, 0] = float("nan")
    y = OPS[name](torch.ones(1, 2, 4), mu, ls, bmu, bls, 3, 1)
    assert torch.isnan(y[0, :, 0]).all() and torch.isfinite(y[0, :, 1:]).all()


@pytest.mark.parametrize("name", OPS)
def test_same_seed_same_output_and_new_seed_new_output(name):
    mu, ls, bmu, bls = make_layer(5, 6, torch.float32, "cpu")
    x = torch.randn(1, 3, 6)
    a, b, c = (OPS[name](x, mu, ls, bmu, bls, s, 1) for s in (10, 10, 11))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", OPS)
def test_thread_count_does_not_change_the_output(name):
    mu, ls, bmu, bls = make_layer(64, 300, torch.float32, "cpu")
    x = torch.randn(1, 50, 300)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS[name](x, mu, ls, bmu, bls, 8, 3)
        torch.set_num_threads(max(2, before))
        many = OPS[name](x, mu, ls, bmu, bls, 8, 3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("kwargs,exc,match", BAD_LINEAR_ARGS)
def test_bad_input_names_the_argument(name, kwargs, exc, match):
    with pytest.raises(exc, match="bayes_linear_" + name + ": " + match):
        OPS[name](**linear_args(**kwargs))


@pytest.mark.parametrize("name", OPS)
def test_layer_uses_the_operator(name):
    # An unfrozen BayesLinear with the kernels in use runs the fused operator: same seed, same
    # output as calling the operator with the seed the layer draws.
    layer = bnn_fast.BayesLinear(0, 0.1, 6, 4, estimator=name)
    x = torch.randn(5, 6)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    seed = _ops.new_seed()
    want = OPS[name](x.unsqueeze(0), layer.weight_mu, layer.weight_log_sigma, layer.bias_mu, layer.bias_log_sigma, seed, 1)[0]
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled")
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("S,xs", [(1, 1), (3, 1), (3, 3)])
def test_cuda_equals_cpu(name, S, xs):
    mu, ls, bmu, bls = make_layer(33, 70, torch.float32, "cpu")
    x = torch.randn(xs, 37, 70)
    leaves_cpu = [t.clone().requires_grad_(True) for t in (x, mu, ls, bmu, bls)]
    leaves_gpu = [t.detach().cuda().requires_grad_(True) for t in leaves_cpu]
    cpu = OPS[name](*leaves_cpu, 8, S)
    gpu = OPS[name](*leaves_gpu, 8, S)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    w = torch.randn_like(cpu)
    (cpu * w).sum().backward()
    (gpu * w.cuda()).sum().backward()
    for a, b in zip(leaves_cpu, leaves_gpu):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled")
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_against_float32(name, dtype):
    mu, ls, bmu, bls = make_layer(64, 128, torch.float32, "cuda")
    x = torch.randn(1, 16, 128, device="cuda")
    want = twin(name, x, mu, ls, bmu, bls, 4, 2)
    got = OPS[name](*(t.to(dtype) for t in (x, mu, ls, bmu, bls)), 4, 2).float()
    # Judged against what PyTorch itself gets at this precision.
    lp = [t.to(dtype) for t in (x, mu, ls, bmu, bls)]
    torch_lp = twin(name, *lp, 4, 2).float()
    assert (got - want).abs().max() <= 2 * (torch_lp - want).abs().max() + 1e-2


# Direct operator calls under autocast: the kernels' internal ATen calls (bmm, exp, ...) must run
# in the inputs' dtype, not autocast's, or the raw-pointer code would read bfloat16 results as
# float (the operators have no Autocast kernel, so the key falls through to them).
AUTOCAST_OPS = ["bayes_linear", "bayes_linear_inference", "bayes_linear_local", "bayes_linear_flipout",
                "bayes_mlp", "bayes_mlp_inference"]


@pytest.mark.parametrize("name", AUTOCAST_OPS)
@pytest.mark.parametrize("N", [3, 40])  # the small-batch and the GEMM paths
def test_direct_calls_under_cpu_autocast_compute_in_the_input_dtype(name, N):
    op = getattr(torch.ops.bnn_fast, name)
    if name.startswith("bayes_mlp"):
        layer1, layer2 = make_layer(50, 3, torch.float32, "cpu", seed=1), make_layer(2, 50, torch.float32, "cpu", seed=2)
        args = (torch.randn(2, N, 3), *layer1, 5, *layer2, 6, 2)
    else:
        args = (torch.randn(2, N, 70), *make_layer(60, 70, torch.float32, "cpu"), 5, 2)
    plain = op(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = op(*args)
    plain, under = (t[0] if isinstance(t, tuple) else t for t in (plain, under))
    assert under.dtype == torch.float32
    assert torch.equal(under, plain)
    if name in ("bayes_linear", "bayes_linear_local", "bayes_linear_flipout", "bayes_mlp"):
        leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        out = op(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        grad_y = torch.randn_like(out)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = torch.autograd.grad(out, leaves[0], grad_y, retain_graph=True)[0]
        want = torch.autograd.grad(out, leaves[0], grad_y)[0]
        assert got.dtype == torch.float32 and torch.equal(got, want)
