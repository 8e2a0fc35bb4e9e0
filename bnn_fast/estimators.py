r"""Gradient estimators of the Bayesian linear layer, and the block that selects one.

A :class:`~bnn_fast.BayesLinear` computes ``y = x W^T + b`` with ``W ~ N(mu, sigma^2)``
elementwise; the estimators differ in how the noise is shared across the rows of a batch, not
in the distribution of each row's output:

- ``"reparam"`` (default, torchbnn's): one weight sample per forward pass, shared by the batch.
  The fused operator ``bnn_fast::bayes_linear`` (or the reference path) computes it.
- ``"local"`` (local reparameterization, Kingma, Salimans & Welling 2015): each output element
  is drawn from its exact Gaussian, ``y = x mu^T + b_mu + sqrt(x^2 (sigma^2)^T + sigma_b^2) *
  eps`` with one standard normal per output element; no weight-sized noise at all. Rows are
  independent, so the gradient noise averages out over the batch.
- ``"flipout"`` (Wen et al. 2018): one shared weight perturbation ``sigma * eps``, decorrelated
  across rows by random signs, ``y = x mu^T + ((x * s_in) (sigma * eps)^T) * s_out + b_mu +
  sigma_b * eps_b``, ``s_in`` and ``s_out`` of +-1 per row.

:func:`local` and :func:`flipout` below are the PyTorch compositions: the pure-PyTorch path of
the layer and the reference twins of the fused operators ``bnn_fast::bayes_linear_local`` and
``bnn_fast::bayes_linear_flipout`` (``bnn_fast._ops.bayes_linear_local`` / ``_flipout``), which a
BayesLinear runs whenever the compiled kernels are in use. Both draw the noise from the
counter-based RNG under one seed per forward pass, one stream per kind of noise (weight 0, bias
1, local output 2, flipout input signs 3, flipout output signs 4): given the same seed, the
composition and the operator compute the same thing up to rounding. On the pure-PyTorch path the
composition draws with ``torch.randn`` instead; every noise tensor can also be passed in
explicitly.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

from .modules._common import (
    BIAS_STREAM,
    INPUT_SIGNS_STREAM,
    LOCAL_OUTPUT_STREAM,
    OUTPUT_SIGNS_STREAM,
    WEIGHT_STREAM,
    draw_normal,
)

__all__ = ["ESTIMATORS", "estimator", "current", "check_estimator", "local", "flipout", "combine_local"]

ESTIMATORS = ("reparam", "local", "flipout")

class _ThreadState(threading.local):
    # A class-level default: reading an attribute a thread never set is then a plain lookup,
    # not getattr's AttributeError path (about 1 us; this is read on every layer's forward).
    name = None


_local = _ThreadState()


def check_estimator(name, argument: str) -> str:
    """Returns `name` if it is one of :data:`ESTIMATORS`; raises ValueError naming `argument`."""
    if not isinstance(name, str) or name not in ESTIMATORS:
        valid = ", ".join(repr(e) for e in ESTIMATORS)
        raise ValueError(f"{argument} must be one of {valid}, got {name!r}")
    return name


def _get_layer_estimator(layer) -> str:
    # A layer pickled whole before estimators existed has no _estimator: it was "reparam".
    return getattr(layer, "_estimator", "reparam")


def _set_layer_estimator(layer, name) -> None:
    layer._estimator = check_estimator(name, f"{type(layer).__name__}: estimator")


# A layer's `estimator` attribute (BayesLinear, the convolutions): checked on assignment.
layer_estimator = property(_get_layer_estimator, _set_layer_estimator)


def current() -> Optional[str]:
    """The estimator set by the innermost :func:`estimator` block on this thread, or ``None``."""
    return _local.name


@contextmanager
def estimator(name: str) -> Iterator[None]:
    """Makes every (unfrozen) BayesLinear use estimator `name` in this block, whatever its own.

    Thread-local; blocks nest (the innermost wins, leaving it restores the enclosing one).

    Args:
        name (str): ``"reparam"``, ``"local"`` or ``"flipout"``.

    Raises:
        ValueError: if `name` is not one of them.

    Example::

        with bnn_fast.estimator("local"):
            loss = criterion(model(x), y)
    """
    check_estimator(name, "estimator: name")
    before = current()
    _local.name = name
    try:
        yield
    finally:
        _local.name = before


def local(
    x: Tensor,
    weight_mu: Tensor,
    weight_log_sigma: Tensor,
    bias_mu: Optional[Tensor] = None,
    bias_log_sigma: Optional[Tensor] = None,
    *,
    n_samples: int = 1,
    seed: Optional[int] = None,
    output_eps: Optional[Tensor] = None,
) -> Tensor:
    """Bayesian linear by local reparameterization, S samples.

    ``y = x mu^T + b_mu + sqrt(x^2 (sigma^2)^T + sigma_b^2) * output_eps`` with
    ``sigma = exp(weight_log_sigma)``, ``sigma_b = exp(bias_log_sigma)``.

    Args:
        seed: the counter-based RNG's seed for the noise not given (stream 2); ``None`` draws it
            with ``torch.randn``.
        output_eps: the standard normal noise, one per output element; drawn when ``None``.

    Shape:
        x: ``[S or 1, N, in]`` (1: the same rows for every sample); weight_*: ``[out, in]``;
        bias_*: ``[out]``; output_eps: ``[S, N, out]``. Output: ``[S, N, out]``.
    """
    out_features = weight_mu.shape[0]
    if output_eps is None:
        shape = (n_samples, x.shape[1], out_features)
        output_eps = draw_normal(shape, seed, LOCAL_OUTPUT_STREAM, weight_mu)
    # With a broadcast x both GEMMs run once, not once per sample.
    mean = torch.matmul(x, weight_mu.t())
    var = torch.matmul(x * x, torch.exp(2.0 * weight_log_sigma).t())
    if bias_mu is not None:
        mean = mean + bias_mu
        var = var + torch.exp(2.0 * bias_log_sigma)
    return combine_local(mean, var, output_eps)


def combine_local(mean: Tensor, var: Tensor, eps: Tensor) -> Tensor:
    """``mean + sqrt(var) * eps``, the last step of every "local" estimator (the linear layer's
    and the convolutions'), in `mean`'s dtype.

    A zero row without bias has var = 0, where sqrt's derivative is infinite and the chain rule
    gives 0 * inf = NaN; clamping sends a zero gradient there instead. The floor is the smallest
    normal number of the type the kernels compute in: float32 for float16 and bfloat16 (float16's
    own, 6.1e-5, would pin the std at 7.8e-3 and zero the gradient below), which are combined in
    float32.
    """
    half = (torch.float16, torch.bfloat16)
    if mean.dtype in half or var.dtype in half:
        std = var.float().clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        return (mean.float() + std * eps.float()).to(mean.dtype)
    std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
    return mean + std * eps


def flipout(
    x: Tensor,
    weight_mu: Tensor,
    weight_log_sigma: Tensor,
    bias_mu: Optional[Tensor] = None,
    bias_log_sigma: Optional[Tensor] = None,
    *,
    n_samples: int = 1,
    seed: Optional[int] = None,
    weight_eps: Optional[Tensor] = None,
    bias_eps: Optional[Tensor] = None,
    input_signs: Optional[Tensor] = None,
    output_signs: Optional[Tensor] = None,
) -> Tensor:
    """Bayesian linear by flipout, S samples.

    ``y = x mu^T + ((x * input_signs) (sigma * weight_eps)^T) * output_signs + b_mu + sigma_b *
    bias_eps``: sample s shares one weight perturbation across its rows, sign-flipped per row.

    Args:
        seed: the counter-based RNG's seed for the noise not given (streams 0, 1, 3 and 4; a sign
            is +1 where the stream's normal is >= 0, else -1); ``None`` draws it with
            ``torch.randn``.
        weight_eps, bias_eps: the standard normal weight and bias noise; drawn when ``None``.
        input_signs, output_signs: the +-1 signs of each row; drawn when ``None``.

    Shape:
        x: ``[S or 1, N, in]`` (1: the same rows for every sample); weight_*: ``[out, in]``;
        bias_*: ``[out]``; weight_eps: ``[S, out, in]``; bias_eps: ``[S, out]``; input_signs:
        ``[S, N, in]``; output_signs: ``[S, N, out]``. Output: ``[S, N, out]``.
    """
    out_features, in_features = weight_mu.shape
    n = x.shape[1]
    if weight_eps is None:
        shape = (n_samples, out_features, in_features)
        weight_eps = draw_normal(shape, seed, WEIGHT_STREAM, weight_mu)
    if input_signs is None:
        input_signs = _signs((n_samples, n, in_features), seed, INPUT_SIGNS_STREAM, weight_mu)
    if output_signs is None:
        output_signs = _signs((n_samples, n, out_features), seed, OUTPUT_SIGNS_STREAM, weight_mu)
    delta = torch.exp(weight_log_sigma) * weight_eps  # [S, out, in]
    perturbation = torch.matmul(x * input_signs, delta.transpose(-1, -2)) * output_signs
    y = torch.matmul(x, weight_mu.t()) + perturbation
    if bias_mu is not None:
        if bias_eps is None:
            bias_eps = draw_normal((n_samples, out_features), seed, BIAS_STREAM, bias_mu)
        y = y + (bias_mu + torch.exp(bias_log_sigma) * bias_eps).unsqueeze(-2)
    return y


def _signs(shape, seed, stream, like) -> Tensor:
    """Random +-1 of `shape` in `like`'s dtype: the sign of :func:`draw_normal`'s noise."""
    noise = draw_normal(shape, seed, stream, like)
    return torch.where(noise >= 0, 1.0, -1.0).to(like.dtype)
