"""Pure-PyTorch twins of every bnn_fast operator.

They are the fallback when the C++/CUDA extension is not built, and the oracle the kernels are
tested against. Every function that draws noise also accepts the noise as an explicit tensor, so a
kernel and its twin can be compared exactly; `normal` reproduces the counter-based RNG contract
(DESIGN.md section 3) bit for bit in the integer part and to float32 rounding in Box-Muller.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "gaussian_kl",
    "gaussian_kl_elements",
    "philox4x32_10",
    "normal",
    "sample_weight",
    "sample_gaussian",
    "bayes_linear",
    "bayes_mlp",
]

_MASK32 = 0xFFFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85


# --------------------------------------------------------------------------------------------
# KL divergence


def gaussian_kl_elements(mu: Tensor, log_sigma: Tensor, prior_mu: float, prior_log_sigma: float) -> Tensor:
    """Per-element KL(N(mu, exp(log_sigma)^2) || N(prior_mu, exp(prior_log_sigma)^2)), same shape."""
    inv_var = math.exp(-2.0 * prior_log_sigma)
    return (
        prior_log_sigma
        - log_sigma
        + 0.5 * (torch.exp(2.0 * log_sigma) + (mu - prior_mu) ** 2) * inv_var
        - 0.5
    )


def gaussian_kl(
    mus: Sequence[Tensor], log_sigmas: Sequence[Tensor], prior_mu: float, prior_log_sigma: float
) -> Tensor:
    """Summed KL of the diagonal Gaussians (mus[i], exp(log_sigmas[i])) against one Gaussian prior.

    Accumulates in float64 (so a float32 model of 10^8 elements does not drift) and returns a
    0-dim tensor of the parameters' dtype and device.
    """
    if len(mus) == 0:
        return torch.zeros(())
    total = torch.zeros((), dtype=torch.float64, device=mus[0].device)
    for mu, ls in zip(mus, log_sigmas):
        total = total + gaussian_kl_elements(mu.double(), ls.double(), prior_mu, prior_log_sigma).sum()
    return total.to(mus[0].dtype)


# --------------------------------------------------------------------------------------------
# The counter-based RNG contract


def _mulhilo32(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a uint32 held in int64.

    Split a into 16-bit halves so no partial product leaves int64's range.
    """
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    t_lo = a_lo * b  # < 2^48
    t_hi = a_hi * b  # < 2^48
    s = t_lo + ((t_hi & 0xFFFF) << 16)
    return (t_hi >> 16) + (s >> 32), s & _MASK32


def philox4x32_10(counter: Sequence[Tensor], key: Sequence[Tensor | int]) -> list[Tensor]:
    """Random123 Philox4x32-10 on int64 tensors holding uint32 values (broadcasting)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return [c0, c1, c2, c3]


def _uniform_open01(r: Tensor) -> Tensor:
    # r * 2^-32 is exact in float32 (a power-of-two scale of the rounded r), so this equals the
    # kernels' result whether or not their compiler fuses the multiply-add.
    return r.to(torch.float32) * 2.0**-32 + 2.0**-33


def normal(
    shape: Sequence[int],
    seed: int,
    stream: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    offset: int = 0,
) -> Tensor:
    """Standard normal noise of the RNG contract: element i (flat, row-major) is
    normal(seed, stream, offset + i), computed in float32, then cast to `dtype`.

    Shape: `shape`. Deterministic in (seed, stream, offset); independent of device and threads.
    """
    numel = math.prod(shape)
    dev = torch.device(device)
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=dev)
    block = idx >> 2
    lane = idx & 3
    seed &= (1 << 64) - 1
    stream &= (1 << 64) - 1
    ctr = [block & _MASK32, block >> 32, torch.full_like(block, stream & _MASK32), torch.full_like(block, stream >> 32)]
    r = philox4x32_10(ctr, [seed & _MASK32, seed >> 32])
    pair = lane >> 1
    ra = torch.where(pair == 0, r[0], r[2])
    rb = torch.where(pair == 0, r[1], r[3])
    u1 = _uniform_open01(ra)
    u2 = _uniform_open01(rb)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    theta = u2 * (2.0 * math.pi)
    z = torch.where((lane & 1) == 0, radius * torch.cos(theta), radius * torch.sin(theta))
    return z.reshape(tuple(shape)).to(dtype)


# --------------------------------------------------------------------------------------------
# Sampled weights and the Bayesian linear layer


def sample_weight(mu: Tensor, log_sigma: Tensor, eps: Tensor) -> Tensor:
    """mu + exp(log_sigma) * eps, broadcasting eps of shape [S, *mu.shape]."""
    return mu + torch.exp(log_sigma) * eps


def sample_gaussian(mu: Optional[Tensor], log_sigma: Tensor, eps: Tensor) -> Tensor:
    """The twin of ``bnn_fast::sample_gaussian``: ``mu + exp(log_sigma) * eps`` (``exp(log_sigma) *
    eps`` for a `mu` of None), with eps of shape ``[S, *log_sigma.shape]``; output ``[S, *]``."""
    perturbation = torch.exp(log_sigma) * eps
    return perturbation if mu is None else mu + perturbation


def bayes_linear(
    x: Tensor,
    weight_mu: Tensor,
    weight_log_sigma: Tensor,
    bias_mu: Optional[Tensor],
    bias_log_sigma: Optional[Tensor],
    weight_eps: Tensor,
    bias_eps: Optional[Tensor],
) -> Tensor:
    """Reparameterized Bayesian linear with S explicit noise samples.

    Shape:
        x: [S or 1, N, in]; weight_eps: [S, out, in]; bias_eps: [S, out]. Output: [S, N, out],
        where sample s uses W_s = weight_mu + exp(weight_log_sigma) * weight_eps[s].
    """
    w = sample_weight(weight_mu, weight_log_sigma, weight_eps)  # [S, out, in]
    y = torch.matmul(x, w.transpose(-1, -2))
    if bias_mu is not None:
        b = sample_weight(bias_mu, bias_log_sigma, bias_eps)  # [S, out]
        y = y + b.unsqueeze(-2)
    return y


def bayes_mlp(
    x: Tensor,
    layer1: Sequence[Optional[Tensor]],
    layer2: Sequence[Optional[Tensor]],
) -> Tensor:
    """Two reparameterized Bayesian linear layers with a ReLU between, with explicit noise: the
    twin of ``bnn_fast::bayes_mlp_inference``.

    Args:
        x: [S or 1, N, in].
        layer1, layer2: (weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, weight_eps,
            bias_eps) each, as :func:`bayes_linear` takes them (the biases and bias_eps None
            for a layer without bias).
    Returns:
        [S, N, out]: ``bayes_linear(relu(bayes_linear(x, *layer1)), *layer2)``.
    """
    return bayes_linear(torch.relu(bayes_linear(x, *layer1)), *layer2)
