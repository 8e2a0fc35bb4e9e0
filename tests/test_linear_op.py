"""bnn_fast::bayes_linear: the fused kernel against its pure-PyTorch twin with the same noise."""

import shutil
import subprocess

import pytest
import torch

from bnn_fast import _ops, reference
from conftest import (
    BAD_LINEAR_ARGS, CUDA, DEVICES, SIMD_LEVELS, assert_closed_form_moments, linear_args, make_layer,
    requires_ext,
)

pytestmark = requires_ext

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def reference_with_kernel_noise(x, mu, ls, bmu, bls, seed, S):
    """The reference computation fed the exact noise the kernel draws (the RNG contract)."""
    out_f, in_f = mu.shape
    eps_w = _ops.normal((S, out_f, in_f), seed, 0, dtype=mu.dtype, device=mu.device)
    eps_b = _ops.normal((S, out_f), seed, 1, dtype=mu.dtype, device=mu.device) if bmu is not None else None
    return reference.bayes_linear(x, mu, ls, bmu, bls, eps_w, eps_b)


def kernel_and_reference_grads(x, params, bias, seed, S):
    """Gradients of sum(y * w) (w a fixed ramp) with respect to x and every parameter, from the
    kernel and from the reference fed the kernel's noise: [kernel grads, reference grads]."""
    grads = []
    for fn in (_ops.bayes_linear, reference_with_kernel_noise):
        leaves = [t.detach().clone().requires_grad_(True) for t in [x] + params]
        xx, mu, ls = leaves[:3]
        bmu, bls = (leaves[3], leaves[4]) if bias else (None, None)
        y = fn(xx, mu, ls, bmu, bls, seed, S)
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)
        grads.append(torch.autograd.grad((y * weights).sum(), leaves))
    return grads


CASES = [  # (S, x_samples, N, in, out, bias)
    (1, 1, 1, 16, 8, True),
    (1, 1, 5, 33, 7, True),
    (1, 1, 40, 64, 24, False),
    (3, 1, 4, 17, 5, True),
    (3, 3, 6, 12, 9, True),
    (2, 2, 20, 8, 3, False),
    (5, 1, 300, 1, 30, True),  # in_features <= 8: the direct loop instead of the GEMM (CPU)
    (3, 3, 7, 3, 11, True),
    (1, 1, 3, 1, 4, False),
    # out_features <= 8: the CPU's row-dot forward and column-block backward; 700 columns are
    # two full blocks of 256 and a part block whose length is not a multiple of 8
    (2, 1, 30, 700, 1, True),
    (3, 3, 12, 300, 2, False),
    (2, 1, 40, 2, 603, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs,N,in_f,out_f,bias", CASES)
def test_forward_equals_reference(device, dtype, S, xs, N, in_f, out_f, bias):
    mu, ls, bmu, bls = make_layer(out_f, in_f, dtype, device, bias)
    x = torch.randn(xs, N, in_f, dtype=dtype, device=device)
    seed = 1234567890123
    got = _ops.bayes_linear(x, mu, ls, bmu, bls, seed, S)
    want = reference_with_kernel_noise(x, mu, ls, bmu, bls, seed, S)
    assert got.shape == (S, N, out_f)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs,N,in_f,out_f,bias", CASES)
def test_gradients_equal_reference(device, dtype, S, xs, N, in_f, out_f, bias):
    params = [p for p in make_layer(out_f, in_f, dtype, device, bias, seed=1) if p is not None]
    x = torch.randn(xs, N, in_f, dtype=dtype, device=device)
    for a, b in zip(*kernel_and_reference_grads(x, params, bias, 99, S)):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wants", ["x", "weights"])
@pytest.mark.parametrize("S,xs,N,in_f,out_f", [(2, 1, 30, 300, 1), (2, 2, 9, 40, 24), (2, 1, 3, 40, 24),
                                               (2, 2, 20, 3, 300)])
def test_partial_gradients_equal_reference(device, wants, S, xs, N, in_f, out_f):
    # Only grad_x, or only the parameters' gradients: each backward path skips the other part.
    mu, ls, bmu, bls = make_layer(out_f, in_f, torch.float64, device, seed=4)
    x = torch.randn(xs, N, in_f, dtype=torch.float64, device=device)
    leaves = [x] if wants == "x" else [mu, ls, bmu, bls]
    grads = []
    for fn in (_ops.bayes_linear, reference_with_kernel_noise):
        for t in (x, mu, ls, bmu, bls):
            t.requires_grad_(any(t is leaf for leaf in leaves))
        y = fn(x, mu, ls, bmu, bls, 5, S)
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).reshape(y.shape)
        grads.append(torch.autograd.grad((y * weights).sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs,N,in_f,out_f,bias", [
    (1, 1, 1, 37, 12, True),   # 37 columns: four 8-wide vectors and a tail of 5
    (1, 1, 4, 64, 9, False),   # no tail
    (2, 1, 2, 13, 10, True),   # a broadcast x: grad_x summed over the samples
    (3, 3, 3, 21, 11, False),
])
def test_small_batch_backward_equals_reference(monkeypatch, simd, dtype, S, xs, N, in_f, out_f, bias):
    # 1 to 4 rows with out_features > 8: the CPU backward forms each dW row next to its use (in
    # registers on the AVX2 path, with a scalar tail) instead of by a GEMM.
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    params = [p for p in make_layer(out_f, in_f, dtype, "cpu", bias, seed=8) if p is not None]
    x = torch.randn(xs, N, in_f, dtype=dtype)
    for a, b in zip(*kernel_and_reference_grads(x, params, bias, 31, S)):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("S,N,in_f,out_f", [(1, 1, 300, 70), (1, 40, 64, 33), (3, 2, 129, 17)])
def test_avx512_and_avx2_sample_the_same_weights(monkeypatch, S, N, in_f, out_f):
    # The AVX-512 noise and exp (cpu/fastmath.h's 16-lane forms) give the AVX2 forms' bits, so the
    # layer's outputs and gradients are identical under both; the rest of the kernel is the same
    # code. (Without AVX-512F on the CPU both runs take the AVX2 path.)
    params = list(make_layer(out_f, in_f, torch.float32, "cpu", seed=4))
    x = torch.randn(1, N, in_f)
    results = []
    for level in ("1", "avx2"):
        monkeypatch.setenv("BNN_FAST_CPU_SIMD", level)
        results.append(kernel_and_reference_grads(x, params, True, 77, S)[0])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("in_f,out_f", [(700, 1), (700, 3), (2, 603)])
def test_backward_thread_count_does_not_change_the_gradients(in_f, out_f):
    params = make_layer(out_f, in_f, torch.float32, "cpu", seed=6)
    x = torch.randn(2, 40, in_f)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
            y = _ops.bayes_linear(*leaves, 3, 2)
            results.append(torch.autograd.grad(y.square().sum(), leaves))
    finally:
        torch.set_num_threads(before)
    for one, many in zip(*results):
        assert torch.equal(one, many)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S,xs", [(1, 1), (2, 1), (2, 2)])
def test_gradcheck_float64(device, S, xs):
    mu, ls, bmu, bls = make_layer(4, 5, torch.float64, device, seed=2)
    x = torch.randn(xs, 3, 5, dtype=torch.float64, device=device)
    inputs = [t.requires_grad_(True) for t in (x, mu, ls, bmu, bls)]
    assert torch.autograd.gradcheck(lambda *a: _ops.bayes_linear(*a, 77, S), inputs)


def test_double_backward_raises_clear_error():
    mu, ls, bmu, bls = make_layer(3, 4, torch.float64, "cpu")
    x = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    mu.requires_grad_(True)
    y = _ops.bayes_linear(x, mu, ls, bmu, bls, 1, 1)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs", [(1, 1), (3, 1), (3, 3)])
def test_opcheck(device, dtype, S, xs):
    mu, ls, bmu, bls = make_layer(6, 5, dtype, device, seed=3)
    x = torch.randn(xs, 4, 5, dtype=dtype, device=device)
    for t in (x, mu, ls, bmu, bls):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.bnn_fast.bayes_linear.default, (x, mu, ls, bmu, bls, 5, S))


@pytest.mark.parametrize("device", DEVICES)
def test_output_mean_and_variance_match_closed_form(device):
    assert_closed_form_moments(_ops.bayes_linear, device)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    mu, ls, bmu, bls = make_layer(3, 4, torch.float32, device)
    x = torch.randn(1, 0, 4, device=device, requires_grad=True)
    y = _ops.bayes_linear(x, mu, ls, bmu, bls, 0, 2)
    assert y.shape == (2, 0, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_input():
    mu, ls, bmu, bls = make_layer(3, 4, torch.float64, "cpu")
    x = torch.randn(1, 4, 5, dtype=torch.float64).transpose(1, 2)  # [1, 5, 4], not contiguous
    got = _ops.bayes_linear(x, mu, ls, bmu, bls, 3, 2)
    torch.testing.assert_close(got, reference_with_kernel_noise(x, mu, ls, bmu, bls, 3, 2))


@pytest.mark.parametrize("simd", SIMD_LEVELS)
def test_non_finite_parameters_propagate(monkeypatch, simd):
    # log_sigma NaN, +inf and -inf go through the CPU's vector exp (fastmath::exp8) or std::exp:
    # sigma NaN, inf and 0 (the weight is then its mean).
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    mu, ls, bmu, bls = make_layer(5, 4, torch.float32, "cpu")
    mu[0, 0] = float("nan")
    ls[1, 1] = float("inf")
    ls[3, 2] = float("nan")
    ls[4, 0] = float("-inf")
    y = _ops.bayes_linear(torch.ones(1, 2, 4), mu, ls, bmu, bls, 3, 1)
    assert torch.isnan(y[0, :, 0]).all() and not torch.isfinite(y[0, :, 1]).any()
    assert torch.isnan(y[0, :, 3]).all()
    assert torch.isfinite(y[0, :, 2]).all() and torch.isfinite(y[0, :, 4]).all()


def test_same_seed_same_output_and_new_seed_new_output():
    mu, ls, bmu, bls = make_layer(5, 6, torch.float32, "cpu")
    x = torch.randn(1, 3, 6)
    a, b, c = (_ops.bayes_linear(x, mu, ls, bmu, bls, s, 1) for s in (10, 10, 11))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs,exc,match", BAD_LINEAR_ARGS)
def test_bad_input_names_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match="bayes_linear: " + match):
        _ops.bayes_linear(**linear_args(**kwargs))


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_extension_uses_the_shared_libstdcxx():
    """_C must use the process's libstdc++ (PyTorch's), not a private static copy: a compiler
    wrapper that linked -static-libstdc++ made every C++ error message with a number segfault on
    the GPU machine (numbers silently missing elsewhere). setup.py links -lstdc++ explicitly."""
    import bnn_fast._C

    linked = subprocess.run(["ldd", bnn_fast._C.__file__], capture_output=True, text=True).stdout
    assert "libstdc++" in linked, linked
    with pytest.raises(ValueError, match=r"n_samples must be >= 1, got -3$"):
        torch.ops.bnn_fast.bayes_linear(torch.randn(1, 2, 4), torch.zeros(3, 4), torch.zeros(3, 4), None, None, 0, -3)


def test_wrong_device_names_the_argument():
    with pytest.raises(ValueError, match=r"weight_mu must be on meta like x, got cpu"):
        torch.ops.bnn_fast.bayes_linear(torch.randn(1, 2, 4, device="meta"), torch.zeros(3, 4), torch.zeros(3, 4), None, None, 0, 1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled")
@pytest.mark.parametrize("N", [1, 8, 9, 100])
def test_cuda_equals_cpu(N):
    mu, ls, bmu, bls = make_layer(33, 70, torch.float32, "cpu")
    x = torch.randn(1, N, 70)
    cpu = _ops.bayes_linear(x, mu, ls, bmu, bls, 8, 2)
    gpu = _ops.bayes_linear(*(t.cuda() for t in (x, mu, ls, bmu, bls)), 8, 2).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled")
@pytest.mark.parametrize("max_rows", ["0", "16"])  # the sample-then-GEMM path; the fused kernel up to 16 rows
@pytest.mark.parametrize("N", range(1, 18))  # every row count the fused kernel is instantiated for
@pytest.mark.parametrize("in_f,offset", [(132, 0), (70, 0), (132, 1)])  # float4 loads; element loads (in % 4, alignment)
def test_cuda_both_forward_paths_equal_reference(monkeypatch, max_rows, N, in_f, offset):
    monkeypatch.setenv("BNN_FAST_CUDA_FUSED_MAX_ROWS", max_rows)
    for dtype in (torch.float32, torch.float64):
        mu, ls, bmu, bls = make_layer(9, in_f, dtype, "cuda", seed=N)
        # offset 1: x starts 1 element into its storage, so it is not 16-byte aligned
        x = torch.randn(offset + 2 * N * in_f, dtype=dtype, device="cuda")[offset:].view(2, N, in_f)
        got = torch.ops.bnn_fast.bayes_linear(x, mu, ls, bmu, bls, 5, 2)[0]
        torch.testing.assert_close(got, reference_with_kernel_noise(x, mu, ls, bmu, bls, 5, 2), **TOL[dtype])
        got = torch.ops.bnn_fast.bayes_linear_inference(x[:1], mu, ls, None, None, 6, 3)
        torch.testing.assert_close(got, reference_with_kernel_noise(x[:1], mu, ls, None, None, 6, 3), **TOL[dtype])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [4, 64])
def test_cuda_low_precision_against_float32(dtype, N):
    mu, ls, bmu, bls = make_layer(64, 128, torch.float32, "cuda")
    x = torch.randn(1, N, 128, device="cuda")
    want = reference_with_kernel_noise(x, mu, ls, bmu, bls, 4, 1)
    got = _ops.bayes_linear(*(t.to(dtype) for t in (x, mu, ls, bmu, bls)), 4, 1).float()
    # Judged against what PyTorch itself gets at this precision (flash-attention's rule).
    eps_w = _ops.normal((1, 64, 128), 4, 0, device="cuda")
    eps_b = _ops.normal((1, 64), 4, 1, device="cuda")
    torch_lp = reference.bayes_linear(*(t.to(dtype) for t in (x, mu, ls, bmu, bls, eps_w, eps_b))).float()
    assert (got - want).abs().max() <= 2 * (torch_lp - want).abs().max() + 1e-3


# ----------------------------------------------------------------------------------------------
# bayes_linear_inference: the forward without a backward (CPU: sampled and multiplied in blocks,
# the weight never written, for up to 8 input rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs,N,in_f,out_f,bias", CASES + [(2, 1, 8, 1030, 9, True), (2, 2, 3, 5000, 3, False)])
def test_inference_equals_reference(device, dtype, S, xs, N, in_f, out_f, bias):
    mu, ls, bmu, bls = make_layer(out_f, in_f, dtype, device, bias)
    x = torch.randn(xs, N, in_f, dtype=dtype, device=device)
    got = torch.ops.bnn_fast.bayes_linear_inference(x, mu, ls, bmu, bls, 77, S)
    # Dot products of thousands of float32 terms summed in another order than the GEMM's.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 and in_f > 1000 else TOL[dtype]
    torch.testing.assert_close(got, reference_with_kernel_noise(x, mu, ls, bmu, bls, 77, S), **tol)


def test_wrapper_runs_inference_only_when_nothing_needs_a_gradient(monkeypatch):
    mu, ls, bmu, bls = make_layer(5, 12, torch.float32, "cpu")
    x = torch.randn(1, 2, 12)
    calls = []
    original = torch.ops.bnn_fast.bayes_linear_inference

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(torch.ops.bnn_fast, "bayes_linear_inference", spy)
    a = _ops.bayes_linear(x, mu, ls, bmu, bls, 3, 2)
    assert calls == [1]
    mu.requires_grad_(True)
    b = _ops.bayes_linear(x, mu, ls, bmu, bls, 3, 2)
    assert calls == [1] and b.requires_grad
    with torch.no_grad():
        c = _ops.bayes_linear(x, mu, ls, bmu, bls, 3, 2)
    assert calls == [1, 1]
    torch.testing.assert_close(a, b.detach(), **TOL[torch.float32])
    assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S,xs,N", [(1, 1, 1), (3, 1, 4), (2, 2, 12)])
def test_inference_opcheck(device, S, xs, N):
    mu, ls, bmu, bls = make_layer(6, 40, torch.float32, device, seed=3)
    x = torch.randn(xs, N, 40, device=device)
    torch.library.opcheck(torch.ops.bnn_fast.bayes_linear_inference.default, (x, mu, ls, bmu, bls, 5, S))


def test_inference_refuses_inputs_that_need_a_gradient():
    mu, ls, bmu, bls = make_layer(3, 4, torch.float32, "cpu")
    x = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="bayes_linear_inference: weight_mu requires grad"):
        torch.ops.bnn_fast.bayes_linear_inference(x, mu.requires_grad_(), ls, bmu, bls, 1, 1)
    with torch.no_grad():  # no gradient will be taken: allowed
        torch.ops.bnn_fast.bayes_linear_inference(x, mu, ls, bmu, bls, 1, 1)


def test_inference_thread_count_does_not_change_the_output():
    mu, ls, bmu, bls = make_layer(70, 300, torch.float32, "cpu")
    x = torch.randn(1, 3, 300)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.bnn_fast.bayes_linear_inference(x, mu, ls, bmu, bls, 8, 3)
        torch.set_num_threads(max(2, before))
        many = torch.ops.bnn_fast.bayes_linear_inference(x, mu, ls, bmu, bls, 8, 3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("kwargs,exc,match", BAD_LINEAR_ARGS)
def test_inference_bad_input_names_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match="bayes_linear: " + match):
        torch.ops.bnn_fast.bayes_linear_inference(**linear_args(**kwargs))


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("max_rows", ["0", "1000"])
@pytest.mark.parametrize("N,in_f", [(12, 300), (13, 300), (3, 37), (5, 1024)])
def test_inference_both_cpu_paths_equal_reference(monkeypatch, simd, max_rows, N, in_f):
    # BNN_FAST_CPU_FUSED_MAX_ROWS forces the blocked path (1000) or the sample-then-GEMM path (0).
    # The blocked path's dot products take four input rows at a time, then one (N = 13, 3, 5), and
    # the part of in_features past the last whole vector pair under a mask (AVX-512) or in scalar
    # code (AVX2): 300 = 9 * 32 + 12, 37 = 32 + 5.
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    monkeypatch.setenv("BNN_FAST_CPU_FUSED_MAX_ROWS", max_rows)
    mu, ls, bmu, bls = make_layer(19, in_f, torch.float32, "cpu")
    x = torch.randn(2, N, in_f, generator=torch.Generator().manual_seed(N * in_f))
    got = torch.ops.bnn_fast.bayes_linear_inference(x, mu, ls, bmu, bls, 21, 2)
    # Dot products of over a thousand float32 terms summed in another order than the GEMM's (as
    # in test_inference_equals_reference): outputs of about 10 differ by a few 1e-5.
    tol = dict(rtol=1e-4, atol=1e-4) if in_f > 1000 else TOL[torch.float32]
    torch.testing.assert_close(got, reference_with_kernel_noise(x, mu, ls, bmu, bls, 21, 2), **tol)


# BNN_FAST_CPU_SAVE_WEIGHT=0: the CPU forward keeps no sampled weight and the backward samples it
# again (with one sample, into the buffer that becomes grad_log_sigma).
@pytest.mark.parametrize("S,xs,N,in_f,out_f,bias", [(1, 1, 1, 16, 8, True), (1, 1, 40, 64, 24, False),
                                                     (1, 1, 30, 700, 1, True), (3, 1, 4, 17, 5, True),
                                                     (3, 3, 6, 12, 9, True)])
def test_backward_without_kept_weight_equals_reference(monkeypatch, S, xs, N, in_f, out_f, bias):
    monkeypatch.setenv("BNN_FAST_CPU_SAVE_WEIGHT", "0")
    assert not _ops.cpu_keeps_weight()
    params = [p for p in make_layer(out_f, in_f, torch.float64, "cpu", bias, seed=7) if p is not None]
    x = torch.randn(xs, N, in_f, dtype=torch.float64)
    y, saved = torch.ops.bnn_fast.bayes_linear(x, *make_layer(out_f, in_f, torch.float64, "cpu", bias), 3, S)
    assert saved.shape == (0,)
    for a, b in zip(*kernel_and_reference_grads(x, params, bias, 11, S)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_without_kept_weight_passes_gradcheck_and_opcheck(monkeypatch):
    monkeypatch.setenv("BNN_FAST_CPU_SAVE_WEIGHT", "0")
    mu, ls, bmu, bls = make_layer(4, 5, torch.float64, "cpu", seed=2)
    x = torch.randn(1, 3, 5, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, mu, ls, bmu, bls)]
    assert torch.autograd.gradcheck(lambda *a: _ops.bayes_linear(*a, 77, 1), inputs)
    torch.library.opcheck(torch.ops.bnn_fast.bayes_linear.default, (x, mu, ls, bmu, bls, 5, 1))


def test_saved_weight_of_the_wrong_shape_is_refused():
    mu, ls, bmu, bls = make_layer(3, 4, torch.float32, "cpu")
    x, g = torch.randn(1, 2, 4), torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="saved must be the sampled weight"):
        torch.ops.bnn_fast.bayes_linear_backward(g, x, mu, ls, bls, torch.empty(2, 3), 1, 1, [True] * 5)


def test_new_seed_follows_torch_manual_seed():
    # The compiled new_seed reads PyTorch's default CPU generator itself (no tensor): it must be
    # reproducible under torch.manual_seed, advance that generator, and cover the int64 range.
    torch.manual_seed(1234)
    first = [_ops.new_seed() for _ in range(64)]
    after = torch.rand(())
    torch.manual_seed(1234)
    assert [_ops.new_seed() for _ in range(64)] == first
    assert torch.equal(torch.rand(()), after)  # the same state after the same draws
    torch.manual_seed(1234)
    assert not torch.equal(torch.rand(()), after)  # so the draws did advance it
    assert len(set(first)) == 64
    assert all(isinstance(s, int) and -(1 << 63) <= s < (1 << 63) for s in first)
    assert any(s < 0 for s in first) and any(s > 0 for s in first)
    assert max(s.bit_length() for s in first) >= 60  # 64 random bits, not 32


def test_new_seed_is_eager_under_torch_compile():
    # Traced, the draw would come from inductor's generator; the compiled function must take the
    # same seeds from the default generator as eager code does.
    @torch.compile(backend="eager")
    def two_seeds(x):
        return x + 1, _ops.new_seed(), _ops.new_seed()

    torch.manual_seed(7)
    eager = (_ops.new_seed(), _ops.new_seed())
    torch.manual_seed(7)
    _, a, b = two_seeds(torch.zeros(2))
    assert (a, b) == eager
