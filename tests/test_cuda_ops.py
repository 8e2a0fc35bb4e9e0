"""The CUDA operators where only a GPU can tell: low-precision gradients, misaligned and sliced
weights, the noise past Philox block 2^32, multi-chunk KL, streams, autocast, non-contiguous
inputs and CUDA graphs. Every test skips without a GPU and the CUDA kernels (conftest's gate);
benchmarks/run_gpu.sh runs them on a lent GPU. (The kernels' index arithmetic, bounds and
alignment paths are also executed on the CPU on every run: test_cuda_emulation.py.)
"""
import pytest
import torch
import torch.nn.functional as F

import bnn_fast as bnn
from bnn_fast import _ops, reference
from conftest import CUDA, make_layer

pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled")

OPS = {"reparam": _ops.bayes_linear, "local": _ops.bayes_linear_local, "flipout": _ops.bayes_linear_flipout}
LOW = [torch.float16, torch.bfloat16]


def layer_on(dtype, out_f=7, in_f=37, bias=True, seed=0):
    return [t if t is None else t.to("cuda", dtype) for t in make_layer(out_f, in_f, torch.float32, "cpu", bias, seed)]


def grads(op, x, params, seed, S):
    """(y, gradients of sum(y^2) with respect to x and each parameter), in float32."""
    x = x.detach().clone().requires_grad_()
    params = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    y = op(x, *params, seed, S)
    g = torch.autograd.grad(y.float().square().sum(), [x] + [p for p in params if p is not None])
    return y.float(), [t.float() for t in g]


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# Relative error allowed where only the GEMMs' choice of kernel differs (a misaligned or copied
# operand): a few roundings of the dtype.
GEMM_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def torch_rel_err(dtype):
    """PyTorch's own relative error at `dtype` on a linear layer of the tests' size: the yardstick
    of the low-precision tolerances (gradients of sum(F.linear(x, w)^2))."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(4, 37, generator=g).cuda(), (torch.rand(7, 37, generator=g) - 0.5).cuda()

    def run(dt):
        xs, ws = x.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        return [t.float() for t in torch.autograd.grad(F.linear(xs, ws).float().square().sum(), [xs, ws])]

    return max(rel_err(a, b) for a, b in zip(run(dtype), run(torch.float32)))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", list(OPS))
def test_low_precision_backward_matches_float32(name, dtype):
    # Same seed, so the same noise: the float16/bfloat16 gradients differ from float32's by
    # rounding only, within a few times PyTorch's own error at that precision.
    params32 = layer_on(torch.float32)
    x32 = torch.randn(3, 4, 37, device="cuda")
    y32, g32 = grads(OPS[name], x32, params32, 99, 3)
    y, g = grads(OPS[name], x32.to(dtype), [p.to(dtype) for p in params32], 99, 3)
    tol = max(8 * torch_rel_err(dtype), 16 * torch.finfo(dtype).eps)
    assert rel_err(y, y32) <= tol
    for got, want in zip(g, g32):
        assert rel_err(got, want) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPS))
def test_misaligned_and_sliced_weights_give_the_aligned_results(name, dtype):
    mu, ls, bmu, bls = layer_on(dtype, 7, 36)
    x = torch.randn(1, 3, 36, device="cuda", dtype=dtype)
    want_y, want_g = grads(OPS[name], x, [mu, ls, bmu, bls], 5, 2)

    def misaligned(t):  # contiguous, one element into its storage (not 16-byte aligned)
        return torch.empty(t.numel() + 1, device="cuda", dtype=dtype)[1:].view_as(t).copy_(t)

    def sliced(t):  # a column slice of a wider tensor: not contiguous
        wide = torch.zeros(t.shape[0], t.shape[1] + 3, device="cuda", dtype=dtype)
        wide[:, 1:-2] = t
        return wide[:, 1:-2]

    for change in (misaligned, sliced):
        y, g = grads(OPS[name], misaligned(x), [change(mu), change(ls), bmu, bls], 5, 2)
        assert rel_err(y, want_y) <= GEMM_TOL[dtype]
        for got, want in zip(g, want_g):
            assert rel_err(got, want) <= GEMM_TOL[dtype]


def test_non_contiguous_x_gives_the_contiguous_results():
    mu, ls, bmu, bls = layer_on(torch.float32, 5, 12)
    x = torch.randn(1, 12, 6, device="cuda").transpose(1, 2)  # [1, 6, 12], strides (72, 1, 6)
    for op in OPS.values():
        want_y, want_g = grads(op, x.contiguous(), [mu, ls, bmu, bls], 8, 3)
        y, g = grads(op, x, [mu, ls, bmu, bls], 8, 3)
        assert rel_err(y, want_y) <= GEMM_TOL[torch.float32]
        for got, want in zip(g, want_g):
            assert rel_err(got, want) <= GEMM_TOL[torch.float32]


@pytest.mark.parametrize("offset", [(1 << 34) - 9, (1 << 34), (1 << 40) + 3])
def test_noise_past_philox_block_2_32_is_the_cpus_bit_for_bit(offset):
    got = _ops.normal((5, 7), 0xDEADBEEF12345, 3, device="cuda", offset=offset)
    want = _ops.normal((5, 7), 0xDEADBEEF12345, 3, device="cpu", offset=offset)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_of_several_multi_chunk_tensors_and_its_backward_beyond_the_first_chunk(dtype):
    chunk = 8192
    shapes = [(3 * chunk + 5,), (0,), (2, chunk), (7,), (chunk + 1, 1)]
    g = torch.Generator().manual_seed(3)
    mus = [torch.randn(s, generator=g, dtype=dtype).cuda().requires_grad_() for s in shapes]
    lss = [(torch.randn(s, generator=g, dtype=dtype) * 0.5 - 1).cuda().requires_grad_() for s in shapes]
    kl = _ops.gaussian_kl(mus, lss, 0.2, -1.1)
    want = reference.gaussian_kl([m.detach().cpu().double() for m in mus], [s.detach().cpu().double() for s in lss],
                                 0.2, -1.1)
    torch.testing.assert_close(kl.double().cpu(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    grads_ = torch.autograd.grad(kl * 0.5, mus + lss)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    inv_var = torch.exp(torch.tensor(2.2, dtype=torch.float64))
    for m, s, gm, gs in zip(mus, lss, grads_[: len(mus)], grads_[len(mus):]):
        want_gm = 0.5 * (m.detach().double() - 0.2) * inv_var.cuda()
        want_gs = 0.5 * (torch.exp(2 * s.detach().double()) * inv_var.cuda() - 1)
        torch.testing.assert_close(gm.double(), want_gm, **tol)
        torch.testing.assert_close(gs.double(), want_gs, **tol)


def test_operators_run_on_the_current_stream():
    # x is written on a side stream after a long sleep there: an operator that ran on another
    # stream would read it before the write.
    mu, ls, bmu, bls = layer_on(torch.float32, 5, 9)
    x_value = torch.randn(1, 4, 9, device="cuda")
    want = {name: op(x_value, mu, ls, bmu, bls, 21, 2) for name, op in OPS.items()}
    want_kl = _ops.gaussian_kl([x_value], [x_value * 0.1], 0.0, -1.0)
    want_noise = _ops.normal((3, 5), 4, 1, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    x = torch.zeros_like(x_value)
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(x_value)
        got = {name: op(x, mu, ls, bmu, bls, 21, 2) for name, op in OPS.items()}
        got_kl = _ops.gaussian_kl([x], [x * 0.1], 0.0, -1.0)
        got_noise = _ops.normal((3, 5), 4, 1, device="cuda")
    side.synchronize()
    for name in OPS:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(got_kl, want_kl) and torch.equal(got_noise, want_noise)


def test_direct_calls_under_autocast_run_in_the_inputs_dtype():
    mu, ls, bmu, bls = layer_on(torch.float32, 5, 9)
    x = torch.randn(1, 4, 9, device="cuda")
    want = {name: op(x, mu, ls, bmu, bls, 3, 2) for name, op in OPS.items()}
    with torch.autocast("cuda", dtype=torch.float16):
        got = {name: op(x, mu, ls, bmu, bls, 3, 2) for name, op in OPS.items()}
    for name in OPS:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), name


def test_a_float64_layer_stays_float64_under_autocast_as_nn_linear_does():
    layer = bnn.BayesLinear(0.0, 0.1, 9, 5).cuda().double()
    x = torch.randn(4, 9, device="cuda", dtype=torch.float64)
    with torch.autocast("cuda", dtype=torch.float16):
        assert layer(x).dtype == torch.float64
        assert torch.nn.Linear(9, 5).cuda().double()(x).dtype == torch.float64


def test_float16_local_output_std_goes_below_float16s_tiny():
    # var = 1e-6 (below float16's smallest normal 6.1e-5): std 1e-3, not 7.8e-3.
    x = torch.ones(1, 1, 1, device="cuda", dtype=torch.float16)
    mu = torch.zeros(1, 1, device="cuda", dtype=torch.float16)
    ls = torch.full((1, 1), -6.9078, device="cuda", dtype=torch.float16)
    y = _ops.bayes_linear_local(x, mu, ls, None, None, 1, 4000)
    assert abs(y.float().std().item() - 1e-3) < 2e-4


def test_kl_inside_a_captured_cuda_graph_follows_its_inputs():
    g = torch.Generator().manual_seed(4)
    mus = [torch.randn(2 * 8192 + 3, generator=g).cuda(), torch.randn(5, generator=g).cuda()]
    lss = [torch.randn(2 * 8192 + 3, generator=g).cuda() * 0.1, torch.randn(5, generator=g).cuda() * 0.1]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _ops.gaussian_kl(mus, lss, 0.0, -1.0)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _ops.gaussian_kl(mus, lss, 0.0, -1.0)
    for step in range(3):
        for t in mus + lss:
            t.mul_(0.9).add_(0.01 * step)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, _ops.gaussian_kl(mus, lss, 0.0, -1.0), rtol=0, atol=0)


def sample_and_grads(mu, ls, seed, stream, S, upstream, fn):
    """(out, grad_mu, grad_log_sigma) of fn(mu, ls, seed, stream, S) against `upstream`, in float64."""
    mu, ls = mu.detach().clone().requires_grad_(), ls.detach().clone().requires_grad_()
    out = fn(mu, ls, seed, stream, S)
    g = torch.autograd.grad((out.double() * upstream).sum(), [mu, ls])
    return [t.double() for t in (out, *g)]


def sample_twin_float64(mu, ls, seed, stream, S):
    """The twin computed in float64 from the float32 noise (what the kernels compute, unrounded)."""
    eps = _ops.normal((S,) + tuple(ls.shape), seed, stream, device=ls.device).double()
    return reference.sample_gaussian(mu.double(), ls.double(), eps)


def sample_twin(mu, ls, seed, stream, S):
    eps = _ops.normal((S,) + tuple(ls.shape), seed, stream, dtype=ls.dtype, device=ls.device)
    return reference.sample_gaussian(mu, ls, eps)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(7,), (16, 3, 3, 3), (1031,)], ids=str)
def test_low_precision_sample_gaussian_within_twice_pytorchs_error(dtype, shape):
    # Judged against the float64 computation from the same inputs and noise: the kernel (float32
    # inside, one rounding at the end) may be off by at most twice what PyTorch's own twin at
    # `dtype` is, in the samples and in both gradients.
    g = torch.Generator().manual_seed(11)
    mu = (torch.rand(shape, generator=g) - 0.5).to("cuda", dtype)
    ls = (torch.randn(shape, generator=g) * 0.3 - 1.5).to("cuda", dtype)
    upstream = torch.randn((3,) + shape, generator=g, dtype=torch.float64).cuda()
    want = sample_and_grads(mu, ls, 21, 6, 3, upstream, sample_twin_float64)
    got = sample_and_grads(mu, ls, 21, 6, 3, upstream, _ops.sample_gaussian)
    torch_ = sample_and_grads(mu, ls, 21, 6, 3, upstream, sample_twin)
    for a, b, t in zip(got, want, torch_):
        assert rel_err(a, b) <= max(2 * rel_err(t, b), torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel", [12, 1030])
def test_misaligned_sample_gaussian_gives_the_aligned_results(dtype, numel):
    # One element into their storage, mu and log_sigma leave the float4 path; the results are the
    # aligned ones (the same per-element code).
    g = torch.Generator().manual_seed(12)
    mu = (torch.rand(numel, generator=g) - 0.5).to("cuda", dtype)
    ls = (torch.randn(numel, generator=g) * 0.3 - 1.5).to("cuda", dtype)
    upstream = torch.randn(2, numel, generator=g, dtype=torch.float64).cuda()

    def misaligned(t):
        return torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)[1:].view_as(t).copy_(t)

    want = sample_and_grads(mu, ls, 3, 9, 2, upstream, _ops.sample_gaussian)
    got = sample_and_grads(misaligned(mu), misaligned(ls), 3, 9, 2, upstream, _ops.sample_gaussian)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_sample_gaussian_noise_is_the_cpus():
    # The perturbation exp(0) * eps is the noise itself, bit for bit the CPU's.
    got = _ops.sample_gaussian(None, torch.zeros(3, 1029, device="cuda"), 44, 7, 2)
    assert torch.equal(got.cpu(), _ops.normal((2, 3, 1029), 44, 7))
