"""Functional interface: the KL divergence of a Bayesian model from its priors."""
import functools

import torch

from . import _ops
from .modules._common import gaussian_names
from .modules.module import BayesLayer
# Unused here: torchbnn's functional star-imports torchbnn.modules, so its import path holds them.
from .modules.batchnorm import BayesBatchNorm2d  # noqa: F401
from .modules.conv import BayesConv2d  # noqa: F401
from .modules.linear import BayesLinear  # noqa: F401

__all__ = ["bayesian_kl_loss"]

_BAYES_LAYERS = (BayesLayer,)
_REDUCTIONS = ("mean", "sum")


def _gaussian_parameters(layer):
    """The (mus, log_sigmas) lists of a Bayesian layer's parameters; empty when it has none.
    (Read from ``_parameters``, as nn.Module.__getattr__ costs about 1 us a read; a parametrized
    layer's parameters are not there, and are read as attributes.)"""
    params = layer._parameters
    mus, log_sigmas = [], []
    for name in ("weight", "bias"):
        mu_key, log_sigma_key = name + "_mu", name + "_log_sigma"
        if mu_key in params and log_sigma_key in params:
            mu, log_sigma = params[mu_key], params[log_sigma_key]
        else:
            mu, log_sigma = getattr(layer, mu_key, None), getattr(layer, log_sigma_key, None)
        if mu is not None:
            mus.append(mu)
            log_sigmas.append(log_sigma)
    return mus, log_sigmas


def _kernel_dtype(tensors):
    # gaussian_kl takes float32 and float64 only; half and bfloat16 are summed in float32.
    return [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors]


def _kl_loss(mu_0, log_sigma_0, mu_1, log_sigma_1):
    r"""torchbnn's ``functional._kl_loss``: the summed KL divergence
    :math:`\sum_i KL(N(\mu_{0,i}, \sigma_{0,i}^2) \,\|\, N(\mu_1, \sigma_1^2))`.

    Args:
        mu_0 (Tensor): means of the first Gaussians.
        log_sigma_0 (Tensor): their log standard deviations, of `mu_0`'s shape, dtype and device.
        mu_1 (float): mean of the second Gaussian, shared by every element.
        log_sigma_1 (float): its log standard deviation.

    Returns:
        A differentiable 0-dim tensor of `mu_0`'s dtype, on its device (half and bfloat16 are
        summed in float32).
    """
    kl = _ops.gaussian_kl(_kernel_dtype([mu_0]), _kernel_dtype([log_sigma_0]), mu_1, log_sigma_1)
    return kl if kl.dtype == mu_0.dtype else kl.to(mu_0.dtype)


def _kl(layers, reduction):
    """KL of `layers`, (layer, mus, log_sigmas) triples: one gaussian_kl call per distinct prior
    (and per dtype and device, which one call cannot mix).

    Kept lean: a small model's training step calls this every step, and Python overhead here
    (about 70 us of a 1.8 ms step for the seed article's network before it was trimmed) is paid
    in full. The parameters come from the layers, so their pairing is right by construction and
    the operator's own argument checks suffice (``validate=False``)."""
    # The common case, one prior, dtype and device for every parameter, is one group, known
    # without building the dict of groups.
    first = layers[0]
    prior = (float(first[0].prior_mu), float(first[0].prior_log_sigma))
    dtype, device = first[1][0].dtype, first[1][0].device
    all_mus, all_log_sigmas, numel, uniform = [], [], 0, True
    for layer, mus, log_sigmas in layers:
        if uniform and (float(layer.prior_mu), float(layer.prior_log_sigma)) != prior:
            uniform = False
        for mu in mus:
            if uniform and (mu.dtype != dtype or mu.device != device):
                uniform = False
            numel += mu.numel()
        all_mus += mus
        all_log_sigmas += log_sigmas
    if uniform:
        groups = {prior + (dtype, device): (all_mus, all_log_sigmas)}
    else:
        groups = {}
        for layer, mus, log_sigmas in layers:
            key = (float(layer.prior_mu), float(layer.prior_log_sigma))
            for mu, log_sigma in zip(mus, log_sigmas):
                group_mus, group_log_sigmas = groups.setdefault(key + (mu.dtype, mu.device), ([], []))
                group_mus.append(mu)
                group_log_sigmas.append(log_sigma)
    total = None
    for (prior_mu, prior_log_sigma, _, group_device), (mus, log_sigmas) in groups.items():
        kl = _ops.gaussian_kl(_kernel_dtype(mus), _kernel_dtype(log_sigmas), prior_mu,
                              prior_log_sigma, validate=False)
        if group_device != device:
            kl = kl.to(device)
        total = kl if total is None else total + kl
    if reduction == "mean":
        # An exact integer count: torchbnn counts in float32, inexact past 2**24 elements.
        total = total / numel
    dtype = functools.reduce(torch.promote_types, (key[2] for key in groups))
    return total if total.dtype == dtype else total.to(dtype)


def bayesian_kl_loss(model, reduction="mean", last_layer_only=False):
    r"""The KL divergence of a model's Bayesian weights from their Gaussian priors, in closed form.

    For every Bayesian layer (:class:`BayesLinear`, the convolutions and the affine batch
    norms: every :class:`~bnn_fast.modules.module.BayesLayer`) and each of its weight and bias,
    :math:`\sum_i KL(N(\mu_i, \sigma_i^2) \,\|\, N(\text{prior\_mu}, \text{prior\_sigma}^2))`.

    Args:
        model (nn.Module): the model whose Bayesian layers are measured.
        reduction (str, optional): ``'mean'``: the summed KL divided by the number of Bayesian
            parameters (elements of the ``*_mu`` tensors); ``'sum'``: the summed KL.
            Default: ``'mean'``
        last_layer_only (bool, optional): if ``True``, only the KL of the last Bayesian layer in
            ``model.modules()`` order (its weight and bias), reduced over that layer's
            parameters. Default: ``False``

    Returns:
        A differentiable tensor of shape :math:`(1)`, or :math:`()` with
        ``last_layer_only=True``, as torchbnn returns; in the parameters' dtype (the promoted
        one if they mix; half and bfloat16 are summed in float32) and on their device (the first
        Bayesian layer's if they are spread over several). A model without Bayesian layers gives
        zero, in its first parameter's dtype and on its device (the default dtype on the CPU
        when it has no parameters).

    Raises:
        ValueError: if `reduction` is neither ``'mean'`` nor ``'sum'``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")

    layers = []
    for m in model.modules():
        if isinstance(m, _BAYES_LAYERS):
            mus, log_sigmas = _gaussian_parameters(m)
            if mus:
                layers.append((m, mus, log_sigmas))
    if not layers:
        first = next(model.parameters(), None)
        if first is not None and first.is_floating_point():
            return torch.zeros(1, dtype=first.dtype, device=first.device)
        return torch.zeros(1)
    if last_layer_only:
        return _kl(layers[-1:], reduction)
    return _kl(layers, reduction).reshape(1)
