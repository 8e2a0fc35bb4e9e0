"""Helpers shared by the Bayesian layers: reparameterized sampling and input validation."""
import torch


def sample_gaussian(mu, log_sigma, eps):
    """mu + exp(log_sigma) * eps, drawing eps with ``torch.randn_like(log_sigma)`` when it is None.

    The expression and the draw are torchbnn's, so that under one ``torch.manual_seed`` both
    libraries consume the generator identically and produce bit-identical samples.
    """
    if eps is None:
        eps = torch.randn_like(log_sigma)
    return mu + torch.exp(log_sigma) * eps


def check_input(layer, input, reference):
    """Raise a clear error when `input` is not a floating-point tensor on `reference`'s device.

    `reference` is any tensor the layer owns (None when it owns none, and then any device goes).
    Only non-floating dtypes are refused: a floating dtype that differs from the parameters' is
    left to torch, so autocast keeps working.
    """
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
