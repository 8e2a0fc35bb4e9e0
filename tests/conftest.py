import math

import pytest
import torch

import bnn_fast

EXT = bnn_fast._ops.extension_loaded()
CUDA = torch.cuda.is_available() and bnn_fast.backend().cuda_compiled

requires_ext = pytest.mark.skipif(not EXT, reason="compiled extension not loaded: " + bnn_fast.backend().reason)

# BNN_FAST_CPU_SIMD settings the CPU kernels are tested under: the best the CPU has ("1": AVX-512F
# for the noise and the weight sampling where the CPU has it, else AVX2), AVX2 at most, scalar.
SIMD_LEVELS = ["1", "avx2", "0"]

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled"),
    ),
]


def make_layer(out_f, in_f, dtype, device, bias=True, seed=0):
    """Random (weight_mu, weight_log_sigma, bias_mu, bias_log_sigma) of a Bayesian linear layer;
    the bias pair is (None, None) without bias."""
    g = torch.Generator().manual_seed(seed)
    mu = (torch.rand(out_f, in_f, generator=g, dtype=dtype) - 0.5).to(device)
    ls = (torch.randn(out_f, in_f, generator=g, dtype=dtype) * 0.3 - 1.5).to(device)
    if not bias:
        return mu, ls, None, None
    bmu = (torch.rand(out_f, generator=g, dtype=dtype) - 0.5).to(device)
    bls = (torch.randn(out_f, generator=g, dtype=dtype) * 0.3 - 1.5).to(device)
    return mu, ls, bmu, bls


def assert_closed_form_moments(op, device):
    """`op(x, mu, ls, bmu, bls, seed, S)` -> [S, N, out] gives each row the exact marginal of
    y = x W^T + b with W ~ N(mu, sigma^2): mean x mu^T + b_mu, variance x^2 (sigma^2)^T + sigma_b^2
    (z-scores of the sample mean and variance over 40,000 samples below 5)."""
    mu, ls, bmu, bls = make_layer(3, 10, torch.float64, device, seed=4)
    x = torch.randn(1, 2, 10, dtype=torch.float64, device=device)
    S = 40_000
    y = op(x, mu, ls, bmu, bls, 2025, S)  # [S, 2, 3]
    mean = x[0] @ mu.T + bmu
    var = (x[0] ** 2) @ torch.exp(2 * ls).T + torch.exp(2 * bls)
    z_mean = (y.mean(0) - mean) / torch.sqrt(var / S)
    z_var = (y.var(0) - var) / (var * math.sqrt(2 / (S - 1)))
    assert z_mean.abs().max() < 5 and z_var.abs().max() < 5


def linear_args(**changes):
    """Valid keyword arguments of a fused linear operator (x [1, 2, 4], 3 outputs), updated."""
    args = dict(x=torch.randn(1, 2, 4), weight_mu=torch.zeros(3, 4), weight_log_sigma=torch.zeros(3, 4),
                bias_mu=torch.zeros(3), bias_log_sigma=torch.zeros(3), seed=0, n_samples=1)
    args.update(changes)
    return args


# (changes to linear_args(), exception, message after "<op>: ") of every fused linear operator.
BAD_LINEAR_ARGS = [
    (dict(x=torch.randn(1, 2, 5)), ValueError, r"x must have last dim 4 \(in_features\), got 5"),
    (dict(x=torch.randn(2, 4)), ValueError, r"x must be 3-D"),
    (dict(x=torch.randn(2, 2, 4), n_samples=3), ValueError, r"x.size\(0\) must be 1 or n_samples"),
    (dict(n_samples=0), ValueError, r"n_samples must be >= 1, got 0"),
    (dict(x=torch.ones(1, 2, 4, dtype=torch.int64)), TypeError, r"x must be a floating-point"),
    (dict(x=torch.randn(1, 2, 4, dtype=torch.float64)), TypeError, r"weight_mu must have dtype"),
    (dict(bias_mu=torch.zeros(5), bias_log_sigma=torch.zeros(5)), ValueError, r"bias_mu must have shape \[3\]"),
    (dict(weight_log_sigma=torch.zeros(3, 5)), ValueError, r"weight_log_sigma must have the shape of weight_mu"),
    (dict(bias_log_sigma=None), ValueError, r"bias_mu and bias_log_sigma must be given together"),
    (dict(x=torch.randn(1, 2, 4, dtype=torch.float16), weight_mu=torch.zeros(3, 4, dtype=torch.float16),
          weight_log_sigma=torch.zeros(3, 4, dtype=torch.float16), bias_mu=None, bias_log_sigma=None),
     TypeError, r"x must be float32 or float64 on the CPU"),
]


# Filled by test_cuda_emulation.py: the emulated kernel cases, launches and seconds.
EMULATION = {}


def pytest_terminal_summary(terminalreporter):
    if "cases" in EMULATION:
        terminalreporter.write_line(
            f"CUDA kernels emulated on the CPU (ASan + UBSan): {EMULATION['cases']} cases, "
            f"{EMULATION['launches']} launches in {EMULATION['run_s']:.1f} s "
            f"(build {EMULATION.get('build_s', 0.0):.1f} s)")
