r"""Bayesian batch normalization: :class:`BayesBatchNorm1d`, :class:`BayesBatchNorm2d`,
:class:`BayesBatchNorm3d`, whose per-channel scale and shift are Gaussians.

With the compiled extension the scale and shift are drawn by ``bnn_fast::sample_gaussian``
(counter-based noise, streams 0 and 1 of one seed per forward pass; the backward regenerates the
noise); on the pure-PyTorch path and while frozen, with ``torch.randn_like`` as torchbnn draws
them, so that a ``BayesBatchNorm2d`` reproduces ``torchbnn.BayesBatchNorm2d`` under one seed.
"""
import math

import torch
import torch.nn.functional as F
from torch.nn import Parameter

from .. import sampling
from ._common import check_input, new_noise_seed, sample_gaussian, sample_parameters
from .module import BayesLayer

__all__ = ["BayesBatchNorm1d", "BayesBatchNorm2d", "BayesBatchNorm3d"]


class _BayesBatchNorm(BayesLayer):
    """The batch norms' common body; subclasses set ``_input_dims`` (the input ranks accepted)."""

    _input_dims = (4,)
    _input_names = "4D (N, C, H, W)"
    # Follows the sampling.sample_many protocol.
    _supports_sampling = True
    _version = 2

    def __init__(self, prior_mu, prior_sigma, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        # Kept even without affine parameters (torchbnn drops them, and its repr then raises).
        self.prior_mu = prior_mu
        self.prior_sigma = prior_sigma
        self.prior_log_sigma = math.log(prior_sigma)
        has_weight = bool(affine)
        has_bias = bool(affine) and bool(bias)  # torch.nn's keyword-only bias=False: no shift
        for name, present in (("weight", has_weight), ("bias", has_bias)):
            if present:
                self.register_parameter(name + "_mu", Parameter(torch.empty(num_features, **factory)))
                self.register_parameter(name + "_log_sigma",
                                        Parameter(torch.empty(num_features, **factory)))
            else:
                self.register_parameter(name + "_mu", None)
                self.register_parameter(name + "_log_sigma", None)
            self.register_buffer(name + "_eps", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
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
            if self.bias_mu is not None:
                self.bias_mu.data.zero_()
                self.bias_log_sigma.data.fill_(self.prior_log_sigma)

    def forward(self, input):
        self._check_input(input)
        frozen = self.weight_eps is not None
        seed = None if frozen or not self.affine else new_noise_seed()
        if sampling.current() is not None:
            return self._forward_samples(input, seed)
        if seed is None:
            weight = bias = None
            if self.affine:
                # torchbnn's semantics: scale noise is drawn before shift noise.
                weight = sample_gaussian(self.weight_mu, self.weight_log_sigma, self.weight_eps)
                if self.bias_mu is not None:
                    bias = sample_gaussian(self.bias_mu, self.bias_log_sigma, self.bias_eps)
        else:
            # The sampling operator: one sample of the scale (stream 0) and the shift (stream 1).
            weight, bias = sample_parameters(self, 1, seed)
            weight, bias = weight[0], None if bias is None else bias[0]
        return self._batch_norm(input, weight, bias)

    def _check_input_dim(self, input):
        """Raises unless `input` has a rank this layer takes (torchbnn's and torch.nn's hook: a
        subclass of ``_BayesBatchNorm`` may override it)."""
        if input.dim() not in self._input_dims:
            raise ValueError(
                f"{type(self).__name__}: input must be {self._input_names}, got {input.dim()}D input"
            )

    def _batch_norm(self, input, weight, bias):
        """torch.nn's batch norm (running statistics updated in training mode)."""
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            input, self.running_mean, self.running_var, weight, bias,
            self.training or not self.track_running_stats,
            exponential_average_factor, self.eps,
        )

    def _check_input(self, input):
        reference = self.weight_mu if self.affine else self.running_mean
        check_input(self, input, reference)
        self._check_input_dim(input)
        # Without per-channel state any channel count works, as in torchbnn and nn.BatchNorm2d.
        if reference is not None and input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input must have {self.num_features} channels "
                f"(num_features) in dim 1, got {input.shape[1]} in input of shape "
                f"{tuple(input.shape)}"
            )

    def _forward_samples(self, input, seed):
        """S affine samples (inside sampling.sample_many): ``[N or S*N, C, *]`` ->
        ``[S*N, C, *]``, sample s normalized, then scaled and shifted by affine sample s."""
        name = type(self).__name__
        if self.training and self.track_running_stats:
            raise NotImplementedError(
                f"{name}: training mode is not supported under sample_many (the S samples would "
                "update the running statistics at once); call model.eval() first, e.g. before "
                "bnn_fast.predictive"
            )
        x, n_samples = sampling.fold_input(input, name)  # [1 or S, N, C, *]
        if n_samples == 1:
            # One sample (predictive's chunks of large activations on the CPU): torch's batch
            # norm in one pass, about half the time of the broadcast form below.
            weight = bias = None
            if self.affine:
                weight, bias = sample_parameters(self, 1, seed)
                weight = weight[0]
                bias = None if bias is None else bias[0]
            stats = self.track_running_stats
            y = F.batch_norm(x[0], self.running_mean if stats else None,
                             self.running_var if stats else None, weight, bias, not stats, 0.0,
                             self.eps)
            return y
        spatial = x.dim() - 3
        shape = (-1, 1, x.shape[2]) + (1,) * spatial  # per sample and channel
        if self.track_running_stats:
            mean, var = self.running_mean.reshape(shape), self.running_var.reshape(shape)
        else:
            # Each sample's own batch, as if its N rows had been run alone.
            dims = (1,) + tuple(range(3, x.dim()))
            # In float32 at least, as F.batch_norm computes its statistics.
            var, mean = torch.var_mean(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x,
                                       dim=dims, correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            weight, bias = sample_parameters(self, n_samples, seed)
            scale, shift = scale * weight.reshape(shape), shift * weight.reshape(shape)
            if bias is not None:
                shift = shift + bias.reshape(shape)
        # shift + x * scale in one pass (x * scale + shift took two: 2.3x the time, measured on
        # ResNet-8's activations).
        y = torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))
        return sampling.unfold_output(y.expand(n_samples, *y.shape[1:]))

    def extra_repr(self):
        s = (
            "{prior_mu}, {prior_sigma}, {num_features}, eps={eps}, momentum={momentum}, "
            "affine={affine}, track_running_stats={track_running_stats}".format(**self.__dict__)
        )
        if self.affine and self.bias_mu is None:
            s += ", bias=False"
        return s

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


_DOC = r"""Applies Batch Normalization over a {rank} input with a Bayesian affine transform: the
    per-channel scale and shift are drawn from their own Gaussians on each forward pass.

    .. math::
        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} * \gamma + \beta,
        \quad \gamma = \mu_\gamma + \exp(\log\sigma_\gamma) \cdot \epsilon_\gamma,
        \quad \beta = \mu_\beta + \exp(\log\sigma_\beta) \cdot \epsilon_\beta

    The noise is drawn afresh on every call unless the layer is frozen (see :meth:`freeze`).
    Running statistics are kept as in :class:`torch.nn.{nn}`.{compat}

    Args:
        prior_mu (float): mean of the Gaussian prior of every scale and shift.
        prior_sigma (float): standard deviation of that prior; also the initial sigma.
        num_features (int): :math:`C` from an expected input of size {shape}.
        eps (float): a value added to the denominator for numerical stability. Default: 1e-5
        momentum (float or None): the value used for the running_mean and running_var
            computation; ``None`` for a cumulative moving average. Default: 0.1
        affine (bool): if ``True``, the layer has the Bayesian scale and shift. Default: ``True``
        track_running_stats (bool): if ``True``, the layer tracks the running mean and variance
            and uses them in evaluation mode; if ``False``, it always uses batch statistics.
            Default: ``True``
        device, dtype: where and of which dtype the parameters and buffers are made.
        bias (bool, keyword-only): with ``affine``, whether the layer has the Bayesian shift
            (torch.nn's ``bias``). Default: ``True``

    Shape:
        - Input: {shape}
        - Output: the same shape as the input

    Attributes:
        weight_mu, weight_log_sigma: the learnable mean and log standard deviation of the scale,
            of shape :math:`(C)`, initialized :math:`\mu \sim U(0, 1)` (torchbnn's) and
            :math:`\log\sigma = \log(\text{{prior\_sigma}})`; ``None`` when ``affine=False``.
        bias_mu, bias_log_sigma: the same for the shift, initialized :math:`\mu = 0`.
        weight_eps, bias_eps: buffers holding the fixed noise while frozen, ``None`` otherwise.
        running_mean, running_var, num_batches_tracked: as in :class:`torch.nn.{nn}`;
            ``None`` when ``track_running_stats=False``.

    Inside :func:`bnn_fast.sampling.sample_many` it draws S samples of the scale and shift per
    call and normalizes with the running statistics, or, with ``track_running_stats=False``,
    with each sample's own batch statistics. Training mode with running statistics is not
    supported there (S samples would update them at once): call ``model.eval()`` before
    :func:`bnn_fast.predictive`.
    """


class BayesBatchNorm1d(_BayesBatchNorm):
    _input_dims = (2, 3)
    _input_names = "2D (N, C) or 3D (N, C, L)"


class BayesBatchNorm2d(_BayesBatchNorm):
    _input_dims = (4,)
    _input_names = "4D (N, C, H, W)"


class BayesBatchNorm3d(_BayesBatchNorm):
    _input_dims = (5,)
    _input_names = "5D (N, C, D, H, W)"


BayesBatchNorm1d.__doc__ = _DOC.format(rank="2D or 3D", nn="BatchNorm1d", compat="",
                                       shape=r":math:`(N, C)` or :math:`(N, C, L)`")
BayesBatchNorm2d.__doc__ = _DOC.format(
    rank="4D", nn="BatchNorm2d", shape=r":math:`(N, C, H, W)`",
    compat=(" A drop-in replacement for ``torchbnn.BayesBatchNorm2d``: same arguments, parameter"
            " and buffer names, initialization and, on the pure-PyTorch path, random draws."),
)
BayesBatchNorm3d.__doc__ = _DOC.format(rank="5D", nn="BatchNorm3d", compat="",
                                       shape=r":math:`(N, C, D, H, W)`")
