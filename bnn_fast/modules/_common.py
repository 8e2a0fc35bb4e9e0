"""Helpers shared by the Bayesian layers: reparameterized sampling, noise and input validation."""
import torch

from .. import _ops, reference

# The RNG contract's streams (DESIGN.md section 3): one per kind of noise of a forward pass, so
# that the draws of one seed never overlap.
WEIGHT_STREAM = 0
BIAS_STREAM = 1
LOCAL_OUTPUT_STREAM = 2
INPUT_SIGNS_STREAM = 3
OUTPUT_SIGNS_STREAM = 4


def sample_gaussian(mu, log_sigma, eps):
    """mu + exp(log_sigma) * eps, drawing eps with ``torch.randn_like(log_sigma)`` when it is None.

    The expression and the draw are torchbnn's, so that under one ``torch.manual_seed`` both
    libraries consume the generator identically and produce bit-identical samples. An `eps` of
    shape ``[S, *mu.shape]`` gives S samples.
    """
    if eps is None:
        eps = torch.randn_like(log_sigma)
    return mu + torch.exp(log_sigma) * eps


def gaussian_names(layer):
    """The prefixes ("weight", "bias") of the Gaussian parameters `layer` has, in torchbnn's order."""
    return [name for name in ("weight", "bias") if getattr(layer, name + "_mu", None) is not None]


def reset_uniform(layer, stdv):
    """torchbnn's (Adv-BNN's) initialization: every mu ~ U(-stdv, stdv), every log_sigma =
    log(prior_sigma), weight then bias, so that one seed gives both libraries the same parameters."""
    for name in gaussian_names(layer):
        getattr(layer, name + "_mu").data.uniform_(-stdv, stdv)
        getattr(layer, name + "_log_sigma").data.fill_(layer.prior_log_sigma)


def freeze_noise(layer):
    """Draws the fixed noise ``weight_eps``, then ``bias_eps``, as torchbnn's freeze() does."""
    for name in gaussian_names(layer):
        setattr(layer, name + "_eps", torch.randn_like(getattr(layer, name + "_log_sigma")))


def unfreeze_noise(layer):
    """Drops the fixed noise: every forward draws new noise again."""
    for name in gaussian_names(layer):
        setattr(layer, name + "_eps", None)


def new_noise_seed():
    """The seed of one forward pass's noise (see :func:`draw_normal`): a fresh 64-bit seed when
    the compiled kernels are in use, ``None`` on the pure-PyTorch path."""
    return _ops.new_seed() if _ops.use_kernels() else None


def draw_normal(shape, seed, stream, like):
    """Standard normal noise of `shape`, in `like`'s dtype and on its device.

    With an int `seed`, the counter-based RNG (``_ops.normal(shape, seed, stream)``, DESIGN.md
    section 3); with ``None``, ``torch.randn``, so that the pure-PyTorch path does not depend on
    the extension.
    """
    if seed is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return _ops.normal(shape, seed, stream, dtype=like.dtype, device=like.device)


def sample_noise(n_samples, eps, like, seed, stream):
    """Noise ``[S, *like.shape]`` for S samples of a parameter: a frozen layer's `eps` for every
    sample, or fresh noise from :func:`draw_normal` when `eps` is None."""
    shape = (n_samples,) + tuple(like.shape)
    if eps is not None:
        return eps.expand(shape)
    return draw_normal(shape, seed, stream, like)


def sample_parameter(mu, log_sigma, eps, n_samples, seed, stream):
    """``[S, *log_sigma.shape]`` samples of one Gaussian parameter (mu None: the perturbation
    ``exp(log_sigma) * eps`` alone): the sampling operator with an int `seed`; with None (a frozen
    layer, or the pure-PyTorch path), its fixed noise `eps` for every sample or, when that is
    None too, ``torch.randn`` noise (:func:`sample_noise`)."""
    if seed is None:
        return reference.sample_gaussian(mu, log_sigma, sample_noise(n_samples, eps, log_sigma,
                                                                     None, stream))
    return _ops.sample_gaussian(mu, log_sigma, seed, stream, n_samples)


def sample_parameters(layer, n_samples, seed):
    """(weight ``[S, *weight_shape]``, bias ``[S, *bias_shape]`` or None): S samples of a
    layer's weight (stream 0) and bias (stream 1) by :func:`sample_parameter`."""
    weight = sample_parameter(layer.weight_mu, layer.weight_log_sigma, layer.weight_eps,
                              n_samples, seed, WEIGHT_STREAM)
    bias = None
    if layer.bias_mu is not None:
        bias = sample_parameter(layer.bias_mu, layer.bias_log_sigma, layer.bias_eps, n_samples,
                                seed, BIAS_STREAM)
    return weight, bias


def check_input(layer, input, reference):
    """Raise a clear error when `input` is not a floating-point tensor on `reference`'s device.

    `reference` is any tensor the layer owns (None when it owns none, and then any device goes).
    Only non-floating dtypes are refused: a floating dtype that differs from the parameters' is
    left to torch, so autocast keeps working.
    """
    if (
        isinstance(input, torch.Tensor) and input.is_floating_point()
        and (reference is None or input.device == reference.device)
    ):
        return  # the common case: one test (this runs on every forward of every layer)
    name = type(layer).__name__
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor, got dtype {input.dtype}")
    if reference is not None and input.device != reference.device:
        raise RuntimeError(
            f"{name}: input is on device {input.device} but the layer's parameters and buffers "
            f"are on device {reference.device}; move one of them so both are on the same device"
        )
