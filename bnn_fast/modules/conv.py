import math

import torch
import torch.nn.functional as F
from torch.nn import Module, Parameter
from torch.nn.modules.utils import _pair

from .. import sampling
from ._common import (
    BIAS_STREAM, WEIGHT_STREAM, check_input, freeze_noise, new_noise_seed, reset_uniform,
    sample_gaussian, sample_noise, unfreeze_noise,
)

__all__ = ["BayesConv2d"]

_PADDING_STRINGS = {"same", "valid"}
_PADDING_MODES = {"zeros", "reflect", "replicate", "circular"}


class BayesConv2d(Module):
    r"""Applies a Bayesian 2D convolution over an input signal composed of several input planes,
    with every kernel weight and bias drawn from its own Gaussian on each forward pass.

    Each weight is :math:`W = \mu + \exp(\log\sigma) \cdot \epsilon`, :math:`\epsilon \sim N(0, 1)`,
    and likewise the bias; the noise is drawn afresh on every call unless the layer is frozen
    (see :meth:`freeze`). A drop-in replacement for ``torchbnn.BayesConv2d`` (same arguments,
    parameter names, initialization and random draws) whose padding behaves exactly as
    :class:`torch.nn.Conv2d`'s.

    Args:
        prior_mu (float): mean of the Gaussian prior of every weight and bias.
        prior_sigma (float): standard deviation of that prior; also the initial sigma.
        in_channels (int): number of channels in the input image.
        out_channels (int): number of channels produced by the convolution.
        kernel_size (int or tuple): size of the convolving kernel.
        stride (int or tuple, optional): stride of the convolution. Default: 1
        padding (int, tuple or str, optional): padding added to all four sides of the input, or
            ``'valid'`` / ``'same'`` as in :class:`torch.nn.Conv2d`. Default: 0
        dilation (int or tuple, optional): spacing between kernel elements. Default: 1
        groups (int, optional): number of blocked connections from input channels to output
            channels. Default: 1
        bias (bool, optional): if ``False`` (or ``None``), the layer learns no additive bias.
            Default: ``True``
        padding_mode (str, optional): ``'zeros'``, ``'reflect'``, ``'replicate'`` or
            ``'circular'``. Default: ``'zeros'``

    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})` or :math:`(C_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`,
          with :math:`H_{out}` and :math:`W_{out}` as for :class:`torch.nn.Conv2d`.

    Attributes:
        weight_mu, weight_log_sigma: the learnable mean and log standard deviation of the
            kernel, of shape :math:`(\text{out\_channels},
            \frac{\text{in\_channels}}{\text{groups}}, \text{kernel\_size[0]},
            \text{kernel\_size[1]})`, initialized
            :math:`\mu \sim U(-s, s)` with :math:`s = 1/\sqrt{\text{in\_channels} \cdot
            \text{kernel\_size[0]}^2}` and :math:`\log\sigma = \log(\text{prior\_sigma})`.
        bias_mu, bias_log_sigma: the same for the bias, of shape :math:`(\text{out\_channels})`;
            ``None`` without bias.
        weight_eps, bias_eps: buffers holding the fixed noise while frozen, ``None`` otherwise.
        bias (bool): whether the layer has a bias.

    Examples::

        >>> m = BayesConv2d(prior_mu=0, prior_sigma=0.1, in_channels=16, out_channels=33,
        ...                 kernel_size=3, stride=2)
        >>> output = m(torch.randn(20, 16, 50, 100))
        >>> print(output.size())
        torch.Size([20, 33, 24, 49])

    Inside :func:`bnn_fast.sampling.sample_many` it draws S kernel samples per call and runs
    them as one grouped convolution (the sample axis folded into the batch, sample-major); the
    noise then comes from the counter-based RNG when the extension is loaded (``torch.randn``
    otherwise), and the input must be 4D.
    """

    # Follows the sampling.sample_many protocol.
    _supports_sampling = True

    def __init__(self, prior_mu, prior_sigma, in_channels, out_channels, kernel_size, stride=1,
                 padding=0, dilation=1, groups=1, bias=True, padding_mode="zeros"):
        super().__init__()
        kernel_size = _pair(kernel_size)
        stride = _pair(stride)
        padding = padding if isinstance(padding, str) else _pair(padding)
        dilation = _pair(dilation)
        # nn.Conv2d's validation, messages included.
        if groups <= 0:
            raise ValueError("groups must be a positive integer")
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        if isinstance(padding, str):
            if padding not in _PADDING_STRINGS:
                raise ValueError(
                    f"Invalid padding string {padding!r}, should be one of {_PADDING_STRINGS}"
                )
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, "
                             f"but got padding_mode='{padding_mode}'")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.transposed = False
        self.output_padding = _pair(0)
        self.groups = groups
        self.padding_mode = padding_mode
        # F.pad's argument for the non-zeros modes, as nn.Conv2d computes it ('same' puts the odd
        # pixel on the right and bottom).
        if padding == "same":
            totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            sides = [(total // 2, total - total // 2) for total in totals]
        elif padding == "valid":
            sides = [(0, 0)] * len(kernel_size)
        else:
            sides = [(p, p) for p in padding]
        self._reversed_padding_repeated_twice = [p for side in reversed(sides) for p in side]

        self.prior_mu = prior_mu
        self.prior_sigma = prior_sigma
        self.prior_log_sigma = math.log(prior_sigma)

        self.weight_mu = Parameter(torch.empty(out_channels, in_channels // groups, *kernel_size))
        self.weight_log_sigma = Parameter(
            torch.empty(out_channels, in_channels // groups, *kernel_size)
        )
        self.register_buffer("weight_eps", None)

        # torchbnn's rule: only None and False mean "no bias".
        self.bias = not (bias is None or bias is False)
        if self.bias:
            self.bias_mu = Parameter(torch.empty(out_channels))
            self.bias_log_sigma = Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_log_sigma", None)
        self.register_buffer("bias_eps", None)

        self.reset_parameters()

    def reset_parameters(self):
        # torchbnn's (Adv-BNN's) initialization, fan-in quirks included (groups and
        # kernel_size[1] are ignored), so that one seed gives both libraries the same parameters.
        reset_uniform(self, 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] ** 2))

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
        check_input(self, input, self.weight_mu)
        if input.dim() not in (3, 4):
            raise ValueError(
                f"{type(self).__name__}: input must be 4D (N, C, H, W) or 3D (C, H, W), "
                f"got {input.dim()}D input"
            )
        if input.shape[-3] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: input must have {self.in_channels} channels "
                f"(in_channels), got {input.shape[-3]} in input of shape {tuple(input.shape)}"
            )

    def _forward_reference(self, input):
        # torchbnn's semantics: weight noise is drawn before bias noise.
        weight = sample_gaussian(self.weight_mu, self.weight_log_sigma, self.weight_eps)
        bias = None
        if self.bias:
            bias = sample_gaussian(self.bias_mu, self.bias_log_sigma, self.bias_eps)
        return self._conv_forward(input, weight, bias)

    def _forward_samples(self, input):
        """S kernel samples in one grouped convolution (inside sampling.sample_many).

        Input ``[N or S*N, C, H, W]`` -> ``[S*N, out_channels, H', W']``: sample s convolves its
        rows (or all N rows of an un-repeated input) with kernel sample s. The S samples become
        S times the groups: channels ``[s*C, (s+1)*C)`` of an ``[N, S*C, H, W]`` input meet
        kernels ``[s*out, (s+1)*out)``. Frozen layers use their fixed noise for every sample.
        """
        name = type(self).__name__
        if input.dim() != 4:
            raise ValueError(
                f"{name}: under sample_many the input must be 4D (N, C, H, W), "
                f"got {input.dim()}D input"
            )
        x, n_samples = sampling.fold_input(input, name)  # [1 or S, N, C, H, W]
        seed = new_noise_seed()
        eps_w = sample_noise(n_samples, self.weight_eps, self.weight_log_sigma, seed, WEIGHT_STREAM)
        # [S, out, C/groups, kh, kw]
        weight = sample_gaussian(self.weight_mu, self.weight_log_sigma, eps_w)
        bias = None
        if self.bias:
            eps_b = sample_noise(n_samples, self.bias_eps, self.bias_log_sigma, seed, BIAS_STREAM)
            bias = sample_gaussian(self.bias_mu, self.bias_log_sigma, eps_b).reshape(-1)  # [S*out]
        padding = self.padding
        if self.padding_mode != "zeros":
            # Padded before the broadcast input is expanded: N rows instead of S*N.
            rows = F.pad(x.flatten(0, 1), self._reversed_padding_repeated_twice,
                         mode=self.padding_mode)
            x, padding = rows.reshape(x.shape[:2] + rows.shape[1:]), _pair(0)
        n = x.shape[1]
        x = x.expand(n_samples, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[3:])
        y = F.conv2d(x, weight.flatten(0, 1), bias, self.stride, padding, self.dilation,
                     n_samples * self.groups)  # [N, S*out, H', W']
        y = y.reshape(n, n_samples, self.out_channels, *y.shape[2:]).transpose(0, 1)
        return sampling.unfold_output(y)

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(input, weight, bias, self.stride, _pair(0), self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        s = (
            "{prior_mu}, {prior_sigma}, {in_channels}, {out_channels}, "
            "kernel_size={kernel_size}, stride={stride}"
        )
        if self.padding != (0,) * len(self.padding):
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is False:
            s += ", bias=False"
        # torchbnn leaves padding_mode out (it ignored the mode); nn.Conv2d shows it.
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        return s.format(**self.__dict__)
