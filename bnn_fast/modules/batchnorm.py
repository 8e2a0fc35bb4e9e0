import math

import torch
import torch.nn.functional as F
from torch.nn import Module, Parameter

from .. import sampling
from ._common import (
    BIAS_STREAM, WEIGHT_STREAM, check_input, freeze_noise, new_noise_seed, sample_gaussian,
    sample_noise, unfreeze_noise,
)

__all__ = ["BayesBatchNorm2d"]


class BayesBatchNorm2d(Module):
    r"""Applies Batch Normalization over a 4D input with a Bayesian affine transform: the
    per-channel scale and shift are drawn from their own Gaussians on each forward pass.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta,
        \quad \gamma = \mu_\gamma + \exp(\log\sigma_\gamma) \cdot \epsilon_\gamma,
        \quad \beta = \mu_\beta + \exp(\log\sigma_\beta) \cdot \epsilon_\beta

    The noise is drawn afresh on every call unless the layer is frozen (see :meth:`freeze`).
    Running statistics are kept as in :class:`torch.nn.BatchNorm2d`. A drop-in replacement for
    ``torchbnn.BayesBatchNorm2d``: same arguments, parameter and buffer names, initialization and
    random draws.

    Args:
        prior_mu (float): mean of the Gaussian prior of every scale and shift.
        prior_sigma (float): standard deviation of that prior; also the initial sigma.
        num_features (int): :math:`C` from an expected input of size :math:`(N, C, H, W)`.
        eps (float): a value added to the denominator for numerical stability. Default: 1e-5
        momentum (float or None): the value used for the running_mean and running_var
            computation; ``None`` for a cumulative moving average. Default: 0.1
        affine (bool): if ``True``, the layer has the Bayesian scale and shift. Default: ``True``
        track_running_stats (bool): if ``True``, the layer tracks the running mean and variance
            and uses them in evaluation mode; if ``False``, it always uses batch statistics.
            Default: ``True``

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)` (same shape as input)

    Attributes:
        weight_mu, weight_log_sigma: the learnable mean and log standard deviation of the scale,
            of shape :math:`(C)`, initialized :math:`\mu \sim U(0, 1)` and
            :math:`\log\sigma = \log(\text{prior\_sigma})`; ``None`` when ``affine=False``.
        bias_mu, bias_log_sigma: the same for the shift, initialized :math:`\mu = 0`.
        weight_eps, bias_eps: buffers holding the fixed noise while frozen, ``None`` otherwise.
        running_mean, running_var, num_batches_tracked: as in :class:`torch.nn.BatchNorm2d`;
            ``None`` when ``track_running_stats=False``.

    Examples::

        >>> m = BayesBatchNorm2d(prior_mu=0, prior_sigma=0.1, num_features=100)
        >>> output = m(torch.randn(20, 100, 35, 45))

    Inside :func:`bnn_fast.sampling.sample_many` it draws S samples of the scale and shift per
    call (the noise then from the counter-based RNG when the extension is loaded, ``torch.randn``
    otherwise) and normalizes with the running statistics, or, with
    ``track_running_stats=False``, with each sample's own batch statistics. Training mode with
    running statistics is not supported there (S samples would update them at once): call
    ``model.eval()`` before :func:`bnn_fast.predictive`.
    """

    # Follows the sampling.sample_many protocol.
    _supports_sampling = True
    _version = 2

    def __init__(self, prior_mu, prior_sigma, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        # Kept even without affine parameters (torchbnn drops them, and its repr then raises).
        self.prior_mu = prior_mu
        self.prior_sigma = prior_sigma
        self.prior_log_sigma = math.log(prior_sigma)
        if self.affine:
            self.weight_mu = Parameter(torch.empty(num_features))
            self.weight_log_sigma = Parameter(torch.empty(num_features))
            self.register_buffer("weight_eps", None)
            self.bias_mu = Parameter(torch.empty(num_features))
            self.bias_log_sigma = Parameter(torch.empty(num_features))
            self.register_buffer("bias_eps", None)
        else:
            self.register_parameter("weight_mu", None)
            self.register_parameter("weight_log_sigma", None)
            self.register_buffer("weight_eps", None)
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_log_sigma", None)
            self.register_buffer("bias_eps", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            # Registered as parameters, like torchbnn (and torch 1.2), so the names exist as None.
            self.register_parameter("running_mean", None)
            self.register_parameter("running_var", None)
            self.register_parameter("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            # torchbnn's (Adv-BNN's) initialization: a U(0, 1) scale rather than nn's ones, the
            # only random draw, so that one seed gives both libraries the same parameters.
            self.weight_mu.data.uniform_()
            self.weight_log_sigma.data.fill_(self.prior_log_sigma)
            self.bias_mu.data.zero_()
            self.bias_log_sigma.data.fill_(self.prior_log_sigma)

    def freeze(self):
        r"""Fixes the noise (``weight_eps``, then ``bias_eps``) so that forward is deterministic."""
        freeze_noise(self)

    def unfreeze(self):
        r"""Drops the fixed noise: every forward draws new noise again."""
        unfreeze_noise(self)

    def forward(self, input):
        self._check_input(input)
        if sampling.current() is None:
            return self._forward_reference(input)
        return self._forward_samples(input)

    def _check_input(self, input):
        reference = self.weight_mu if self.affine else self.running_mean
        check_input(self, input, reference)
        if input.dim() != 4:
            raise ValueError(
                f"{type(self).__name__}: input must be 4D (N, C, H, W), got {input.dim()}D input"
            )
        # Without per-channel state any channel count works, as in torchbnn and nn.BatchNorm2d.
        if reference is not None and input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input must have {self.num_features} channels "
                f"(num_features) in dim 1, got {input.shape[1]} in input of shape "
                f"{tuple(input.shape)}"
            )

    def _forward_reference(self, input):
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum

        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)

        weight = bias = None
        if self.affine:
            # torchbnn's semantics: scale noise is drawn before shift noise.
            weight = sample_gaussian(self.weight_mu, self.weight_log_sigma, self.weight_eps)
            bias = sample_gaussian(self.bias_mu, self.bias_log_sigma, self.bias_eps)

        return F.batch_norm(
            input, self.running_mean, self.running_var, weight, bias,
            self.training or not self.track_running_stats,
            exponential_average_factor, self.eps,
        )

    def _forward_samples(self, input):
        """S affine samples (inside sampling.sample_many): ``[N or S*N, C, H, W]`` ->
        ``[S*N, C, H, W]``, sample s normalized, then scaled and shifted by affine sample s."""
        name = type(self).__name__
        if self.training and self.track_running_stats:
            raise NotImplementedError(
                f"{name}: training mode is not supported under sample_many (the S samples would "
                "update the running statistics at once); call model.eval() first, e.g. before "
                "bnn_fast.predictive"
            )
        x, n_samples = sampling.fold_input(input, name)  # [1 or S, N, C, H, W]
        shape = (-1, 1, x.shape[2], 1, 1)  # per sample and channel
        if self.track_running_stats:
            mean, var = self.running_mean.reshape(shape), self.running_var.reshape(shape)
        else:
            # Each sample's own batch, as if its N rows had been run alone.
            var, mean = torch.var_mean(x, dim=(1, 3, 4), correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            seed = new_noise_seed()
            eps_w = sample_noise(n_samples, self.weight_eps, self.weight_log_sigma, seed,
                                 WEIGHT_STREAM)
            eps_b = sample_noise(n_samples, self.bias_eps, self.bias_log_sigma, seed, BIAS_STREAM)
            weight = sample_gaussian(self.weight_mu, self.weight_log_sigma, eps_w).reshape(shape)
            bias = sample_gaussian(self.bias_mu, self.bias_log_sigma, eps_b).reshape(shape)
            scale, shift = scale * weight, shift * weight + bias
        y = x * scale.to(x.dtype) + shift.to(x.dtype)
        return sampling.unfold_output(y.expand(n_samples, *y.shape[1:]))

    def extra_repr(self):
        return (
            "{prior_mu}, {prior_sigma}, {num_features}, eps={eps}, momentum={momentum}, "
            "affine={affine}, track_running_stats={track_running_stats}".format(**self.__dict__)
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # State dicts older than version 2 lack num_batches_tracked; start it at 0 as torch does.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            num_batches_tracked_key = prefix + "num_batches_tracked"
            if num_batches_tracked_key not in state_dict:
                state_dict[num_batches_tracked_key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
