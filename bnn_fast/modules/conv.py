r"""Bayesian convolutions: :class:`BayesConv1d`, :class:`BayesConv2d`, :class:`BayesConv3d` and
the transposed :class:`BayesConvTranspose1d`, :class:`BayesConvTranspose2d`,
:class:`BayesConvTranspose3d`.

Every kernel weight and bias is a Gaussian, :math:`W = \mu + \exp(\log\sigma) \cdot \epsilon`,
drawn afresh on each forward pass unless the layer is frozen. With the compiled extension the
weights are drawn by the operator ``bnn_fast::sample_gaussian`` (the counter-based RNG, weight
noise on stream 0 and bias noise on stream 1 of one fresh seed per forward pass), whose backward
regenerates the noise: autograd keeps the sampled weight the convolution needs and nothing else
(no ``eps``, no ``sigma``). On the pure-PyTorch path (no extension, or inside
:func:`bnn_fast.reference_path`), and while frozen, the layers draw as torchbnn does
(``torch.randn_like``, weight then bias), so a ``BayesConv2d`` reproduces ``torchbnn.BayesConv2d``
bit for bit under one ``torch.manual_seed`` (with ``padding_mode='zeros'``: torchbnn pads the
other modes wrongly).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Parameter

from .. import estimators, sampling
from ._common import (
    BIAS_STREAM, INPUT_SIGNS_STREAM, LOCAL_OUTPUT_STREAM, OUTPUT_SIGNS_STREAM, WEIGHT_STREAM,
    check_input, draw_normal, new_noise_seed, reset_uniform, sample_gaussian, sample_parameter,
    sample_parameters,
)
from .module import BayesLayer

__all__ = [
    "BayesConv1d", "BayesConv2d", "BayesConv3d",
    "BayesConvTranspose1d", "BayesConvTranspose2d", "BayesConvTranspose3d",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
# Devices on which S samples run as one grouped convolution (one launch) rather than one
# convolution per sample (see _BayesConvNd._conv_samples).
_GROUPED_DEVICES = {"cuda"}
_NN = {
    (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d,
}


class _BayesConvNd(BayesLayer):
    """The convolutions' common body. Subclasses set ``_dims`` and ``_transposed`` and give the
    constructor torch.nn's signature."""

    _dims = 2
    _transposed = False
    # Follows the sampling.sample_many protocol.
    _supports_sampling = True

    def __init__(self, prior_mu, prior_sigma, in_channels, out_channels, kernel_size, stride,
                 padding, dilation, transposed, output_padding, groups, bias, padding_mode,
                 device=None, dtype=None, *, estimator="reparam"):
        """torchbnn's ``_BayesConvNd`` constructor, for subclasses written against it (the
        number of spatial dimensions is the length of `kernel_size` then)."""
        super().__init__()
        if isinstance(kernel_size, (tuple, list)):
            self._dims = len(kernel_size)
        self._transposed = bool(transposed)
        self._setup(prior_mu, prior_sigma, in_channels, out_channels, kernel_size, stride,
                    padding, dilation, groups, bias, padding_mode, output_padding, device, dtype,
                    estimator)

    def _setup(self, prior_mu, prior_sigma, in_channels, out_channels, kernel_size, stride,
               padding, dilation, groups, bias, padding_mode, output_padding, device, dtype,
               estimator):
        # torch.nn's own layer, on the meta device (no memory), validates the arguments with its
        # own messages and normalizes them (tuples, 'same' padding, F.pad's argument).
        # torchbnn's rule for bias: only None and False mean "no bias".
        has_bias = not (bias is None or bias is False)
        kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                      bias=False, padding_mode=padding_mode, device="meta")
        if self._transposed:
            kwargs["output_padding"] = output_padding
        spec = _NN[(self._dims, self._transposed)](in_channels, out_channels, kernel_size, **kwargs)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode",
                     "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(spec, name))
        self.estimator = estimator

        self.prior_mu = prior_mu
        self.prior_sigma = prior_sigma
        self.prior_log_sigma = math.log(prior_sigma)

        factory = {"device": device, "dtype": dtype}
        shape = tuple(spec.weight.shape)
        self.weight_mu = Parameter(torch.empty(shape, **factory))
        self.weight_log_sigma = Parameter(torch.empty(shape, **factory))
        self.register_buffer("weight_eps", None)
        self.bias = has_bias
        if self.bias:
            self.bias_mu = Parameter(torch.empty(out_channels, **factory))
            self.bias_log_sigma = Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_log_sigma", None)
        self.register_buffer("bias_eps", None)
        self.reset_parameters()

    estimator = estimators.layer_estimator

    def reset_parameters(self):
        # torchbnn's (Adv-BNN's) initialization, mu ~ U(-s, s) and log_sigma = log(prior_sigma),
        # with s = 1 / sqrt(in_channels * prod(kernel_size)).
        reset_uniform(self, 1.0 / math.sqrt(self.in_channels * math.prod(self.kernel_size)))

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, input, output_size=None):
        self._check_input(input)
        output_padding = self.output_padding
        if output_size is not None:
            if not self._transposed:
                raise TypeError(f"{type(self).__name__}.forward() got an unexpected argument "
                                "'output_size'")
            output_padding = self._output_padding_for(input, output_size)
        frozen = self.weight_eps is not None
        estimator = "reparam" if frozen else estimators.current() or self.estimator
        state = sampling.current()
        seed = None if frozen else new_noise_seed()
        if state is not None:
            return self._forward_samples(input, estimator, seed, output_padding)
        if estimator != "reparam":
            batched = input.dim() == self._dims + 2
            x = input.unsqueeze(0) if batched else input.unsqueeze(0).unsqueeze(0)
            y = self._forward_estimator(x, 1, estimator, seed, output_padding)  # [1, N, out, *]
            return y.squeeze(0) if batched else y.squeeze(0).squeeze(0)
        if seed is None:
            return self._forward_reference(input, output_padding)
        # The sampling operator: S = 1 sample of the weight and the bias.
        weight, bias = sample_parameters(self, 1, seed)
        weight, bias = weight[0], None if bias is None else bias[0]
        return self._conv(input, weight, bias, self.groups, output_padding)

    def _check_input(self, input):
        check_input(self, input, self.weight_mu)
        name, dims = type(self).__name__, self._dims
        if input.dim() not in (dims + 1, dims + 2):
            spatial = ", ".join("DHW"[3 - dims:])
            raise ValueError(
                f"{name}: input must be {dims + 2}D (N, C, {spatial}) or {dims + 1}D "
                f"(C, {spatial}), got {input.dim()}D input"
            )
        channels = input.shape[-dims - 1]
        if channels != self.in_channels:
            raise ValueError(
                f"{name}: input must have {self.in_channels} channels (in_channels), got "
                f"{channels} (dim {input.dim() - dims - 1} of input of shape {tuple(input.shape)})"
            )

    def _output_padding_for(self, input, output_size):
        return nn.modules.conv._ConvTransposeNd._output_padding(
            self, input, output_size, self.stride, self.padding, self.kernel_size, self._dims,
            self.dilation,
        )

    def _forward_reference(self, input, output_padding):
        # torchbnn's semantics: weight noise is drawn before bias noise.
        weight = sample_gaussian(self.weight_mu, self.weight_log_sigma, self.weight_eps)
        bias = None
        if self.bias:
            bias = sample_gaussian(self.bias_mu, self.bias_log_sigma, self.bias_eps)
        return self._conv(input, weight, bias, self.groups, output_padding)

    def _pad(self, x):
        """`x` padded for a non-zeros padding mode (then the convolution pads nothing)."""
        return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)

    def _conv_forward(self, input, weight, bias):
        """torch.nn's ``_conv_forward``: the layer's convolution of `input` with a given weight."""
        return self._conv(input, weight, bias, self.groups, self.output_padding)

    def _conv(self, x, weight, bias, groups, output_padding):
        """torch.nn's convolution of `x` (``[N, C, *]`` or ``[C, *]``) with `weight`."""
        if self._transposed:
            if self.padding_mode != "zeros":
                raise ValueError(
                    f'Only "zeros" padding mode is supported for {type(self).__name__}'
                )
            return _CONV_TRANSPOSE[self._dims](x, weight, bias, self.stride, self.padding,
                                               output_padding, groups, self.dilation)
        conv = _CONV[self._dims]
        if self.padding_mode != "zeros":
            return conv(self._pad(x), weight, bias, self.stride, 0, self.dilation, groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _conv_samples(self, x, weight, bias, output_padding):
        """Sample s of `x` ``[X, N, C, *]`` (X = 1: one input for every sample) convolved with
        sample s of `weight` ``[S, *weight_shape]`` and `bias` ``[S, out]`` (or None):
        ``[S, N, out, *]``.

        On the CPU, one convolution per sample over the sample-major activations (no copies): in
        bench_conv's shapes this ran 1.0-2.3x faster than one grouped convolution, whose input
        and output must be transposed to and from ``[N, S*C, *]``, and faster than S*out output
        channels over a shared input (1.1-3x from 8 samples up). On other devices (CUDA), one
        grouped convolution: S times the groups, channels ``[s*C, (s+1)*C)`` of an
        ``[N, S*C, *]`` input meeting kernels ``[s*out, (s+1)*out)``, one launch for all samples.
        """
        x, padded = self._pad_once(x)
        if x.device.type in _GROUPED_DEVICES and x.shape[1] > 0:  # (an empty batch: per sample)
            return self._conv_grouped(x, weight, bias, output_padding, padded)
        shared = x.shape[0] == 1
        outputs = []
        for s in range(weight.shape[0]):
            xs = x[0] if shared else x[s]
            b = None if bias is None else bias[s]
            outputs.append(self._conv_padded(xs, weight[s], b, self.groups, output_padding, padded))
        # One sample (predictive's chunks of large activations): a view, not stack's copy.
        return torch.stack(outputs) if len(outputs) > 1 else outputs[0].unsqueeze(0)

    def _pad_once(self, x):
        """(`x` ``[X, N, C, *]`` padded for a non-zeros padding mode, whether it was): the X
        inputs are padded once, not once per sample."""
        if self.padding_mode == "zeros" or self._transposed:
            return x, False
        rows = self._pad(x.flatten(0, 1))
        return rows.reshape(x.shape[:2] + rows.shape[1:]), True

    def _conv_padded(self, x, weight, bias, groups, output_padding, padded):
        """:meth:`_conv` of an input that :meth:`_pad_once` may have padded already."""
        if padded:
            return _CONV[self._dims](x, weight, bias, self.stride, 0, self.dilation, groups)
        return self._conv(x, weight, bias, groups, output_padding)

    def _conv_grouped(self, x, weight, bias, output_padding, padded):
        """:meth:`_conv_samples` as one grouped convolution (S times the groups)."""
        n_samples, n = weight.shape[0], x.shape[1]
        b = None if bias is None else bias.reshape(-1)
        rows = x.expand(n_samples, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[3:])
        w = weight.flatten(0, 1)  # [S*out, C/g, *k] or, transposed, [S*in, out/g, *k]
        y = self._conv_padded(rows, w, b, n_samples * self.groups, output_padding, padded)
        return y.reshape(n, n_samples, self.out_channels, *y.shape[2:]).transpose(0, 1)

    def _forward_samples(self, input, estimator, seed, output_padding):
        """S samples in one pass (inside sampling.sample_many): ``[N or S*N, C, *]`` ->
        ``[S*N, out, *]``, sample s from weight sample s (sample-major)."""
        name = type(self).__name__
        if input.dim() != self._dims + 2:
            spatial = ", ".join("DHW"[3 - self._dims:])
            raise ValueError(
                f"{name}: under sample_many the input must be {self._dims + 2}D "
                f"(N, C, {spatial}), got {input.dim()}D input"
            )
        x, n_samples = sampling.fold_input(input, name)  # [1 or S, N, C, *]
        if estimator != "reparam":
            y = self._forward_estimator(x, n_samples, estimator, seed, output_padding)
        else:
            weight, bias = sample_parameters(self, n_samples, seed)
            y = self._conv_samples(x, weight, bias, output_padding)
        return sampling.unfold_output(y)

    # ---- local reparameterization and flipout ---------------------------------------------------

    def _forward_estimator(self, x, n_samples, estimator, seed, output_padding):
        """The "local" or "flipout" estimator on `x` ``[X, N, C, *]`` (X = 1 or S; an unbatched
        ``[1, C, *]`` input works too): ``[S, N, out, *]``. PyTorch compositions of torch's
        convolutions over the counter-based noise of `seed` (``torch.randn`` when None)."""
        like = self.weight_mu
        rows = x.flatten(0, 1)
        mean = self._conv(rows, self.weight_mu, self.bias_mu, self.groups, output_padding)
        mean = mean.reshape(x.shape[:2] + mean.shape[1:])  # [X, N, out, *]
        if estimator == "local":
            # Each output element from its exact Gaussian: the variance is the convolution of
            # x^2 with sigma^2 (padding zeros, or the padded x squared).
            var = self._conv(rows * rows, torch.exp(2.0 * self.weight_log_sigma),
                             torch.exp(2.0 * self.bias_log_sigma) if self.bias else None,
                             self.groups, output_padding)
            var = var.reshape(mean.shape)
            shape = (n_samples,) + tuple(mean.shape[1:])
            eps = draw_normal(shape, seed, LOCAL_OUTPUT_STREAM, like)
            # (A zero input patch without bias has var = 0: combine_local's floor.)
            return estimators.combine_local(mean, var, eps)
        # Flipout: one weight perturbation per sample, sign-flipped per input and output element.
        delta = sample_parameter(None, self.weight_log_sigma, None, n_samples, seed, WEIGHT_STREAM)
        # The signs in the activations' dtype (under autocast, not the parameters'): the output
        # keeps the dtype the convolutions give, as with the other estimators.
        in_shape = (n_samples,) + tuple(x.shape[1:])
        flipped = x * estimators._signs(in_shape, seed, INPUT_SIGNS_STREAM, x)
        perturbation = self._conv_samples(flipped, delta, None, output_padding)  # [S, N, out, *]
        signs_out = estimators._signs(tuple(perturbation.shape), seed, OUTPUT_SIGNS_STREAM,
                                      perturbation)
        y = mean + perturbation * signs_out
        if self.bias:
            bias = sample_parameter(self.bias_mu, self.bias_log_sigma, None, n_samples, seed,
                                    BIAS_STREAM)
            # The mean's convolution added bias_mu already; add the bias noise only.
            noise = (bias - self.bias_mu).reshape(n_samples, 1, -1, *([1] * self._dims))
            y = y + noise.to(y.dtype)
        return y

    def extra_repr(self):
        s = (
            "{prior_mu}, {prior_sigma}, {in_channels}, {out_channels}, "
            "kernel_size={kernel_size}, stride={stride}"
        )
        if self.padding != (0,) * len(self.padding):
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.output_padding != (0,) * len(self.output_padding):
            s += ", output_padding={output_padding}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is False:
            s += ", bias=False"
        # torchbnn leaves padding_mode out (it ignored the mode); nn.Conv2d shows it.
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        s = s.format(**self.__dict__)
        if self.estimator != "reparam":
            s += f", estimator={self.estimator!r}"
        return s


_DOC = r"""Applies a Bayesian {kind} over an input signal composed of several input planes, with
    every kernel weight and bias drawn from its own Gaussian on each forward pass.

    Each weight is :math:`W = \mu + \exp(\log\sigma) \cdot \epsilon`,
    :math:`\epsilon \sim N(0, 1)`, and likewise the bias; the noise is drawn afresh on every call
    unless the layer is frozen (see :meth:`freeze`). The arguments after ``prior_sigma`` are
    :class:`torch.nn.{nn}`'s, in its order, with its defaults and its argument errors.{compat}

    Args:
        prior_mu (float): mean of the Gaussian prior of every weight and bias.
        prior_sigma (float): standard deviation of that prior; also the initial sigma.
        in_channels, out_channels, kernel_size, stride, padding, {extra}dilation, groups,
        padding_mode, device, dtype: as in :class:`torch.nn.{nn}`.
        bias (bool, optional): if ``False`` (or ``None``), the layer learns no additive bias.
            Default: ``True``
        estimator (str, keyword-only): ``"reparam"`` (one weight sample per forward pass, shared
            by the batch), ``"local"`` (local reparameterization: each output element drawn from
            its exact Gaussian, a second convolution of :math:`x^2` with :math:`\sigma^2`) or
            ``"flipout"`` (one weight perturbation per pass, sign-flipped per input and output
            element); see :mod:`bnn_fast.estimators`. A frozen layer always uses ``"reparam"``.
            Default: ``"reparam"``

    Shape:
        - Input: :math:`(N, C_{{in}}, {spatial_in})` or :math:`(C_{{in}}, {spatial_in})`
        - Output: :math:`(N, C_{{out}}, {spatial_out})` or :math:`(C_{{out}}, {spatial_out})`,
          sized as by :class:`torch.nn.{nn}`.

    Attributes:
        weight_mu, weight_log_sigma: the learnable mean and log standard deviation of the
            kernel, of :class:`torch.nn.{nn}`'s weight shape {shape}, initialized
            :math:`\mu \sim U(-s, s)` with {init} and :math:`\log\sigma = \log(\text{{prior\_sigma}})`.
        bias_mu, bias_log_sigma: the same for the bias, of shape :math:`(\text{{out\_channels}})`;
            ``None`` without bias.
        weight_eps, bias_eps: buffers holding the fixed noise while frozen, ``None`` otherwise.
        bias (bool): whether the layer has a bias (torchbnn's attribute).

    Inside :func:`bnn_fast.sampling.sample_many` it draws S kernel samples per call and
    convolves the sample-major activations with them (one convolution per sample on the CPU, one
    grouped convolution on CUDA); :func:`bnn_fast.predictive` relies on it.
    """


def _doc(kind, nn_name, dims, transposed, compat="", init=None):
    spatial = ", ".join(f"{d}_{{in}}" for d in "DHW"[3 - dims:])
    spatial_out = ", ".join(f"{d}_{{out}}" for d in "DHW"[3 - dims:])
    k = ", ".join(f"k_{i}" for i in range(dims))
    shape = (r":math:`(\text{in\_channels}, \frac{\text{out\_channels}}{\text{groups}}, " + k + ")`"
             if transposed else
             r":math:`(\text{out\_channels}, \frac{\text{in\_channels}}{\text{groups}}, " + k + ")`")
    init = init or r":math:`s = 1/\sqrt{\text{in\_channels} \cdot \prod k_i}`"
    return _DOC.format(kind=kind, nn=nn_name, compat=compat, spatial_in=spatial,
                       spatial_out=spatial_out, shape=shape, init=init,
                       extra="output_padding, " if transposed else "")


class _BayesConvForwardNd(_BayesConvNd):
    """torch.nn.ConvNd's constructor for the (not transposed) convolutions."""

    def __init__(self, prior_mu, prior_sigma, in_channels, out_channels, kernel_size, stride=1,
                 padding=0, dilation=1, groups=1, bias=True, padding_mode="zeros", device=None,
                 dtype=None, *, estimator="reparam"):
        BayesLayer.__init__(self)
        self._setup(prior_mu, prior_sigma, in_channels, out_channels, kernel_size, stride,
                    padding, dilation, groups, bias, padding_mode, 0, device, dtype, estimator)


class BayesConv1d(_BayesConvForwardNd):
    _dims = 1


class BayesConv2d(_BayesConvForwardNd):
    _dims = 2

    def reset_parameters(self):
        # torchbnn's initialization exactly, fan-in quirks included (groups and kernel_size[1]
        # are ignored), so that one seed gives both libraries the same parameters.
        reset_uniform(self, 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] ** 2))


class BayesConv3d(_BayesConvForwardNd):
    _dims = 3


class _BayesConvTransposeNd(_BayesConvNd):
    _transposed = True

    def __init__(self, prior_mu, prior_sigma, in_channels, out_channels, kernel_size, stride=1,
                 padding=0, output_padding=0, groups=1, bias=True, dilation=1,
                 padding_mode="zeros", device=None, dtype=None, *, estimator="reparam"):
        BayesLayer.__init__(self)
        self._setup(prior_mu, prior_sigma, in_channels, out_channels, kernel_size, stride,
                    padding, dilation, groups, bias, padding_mode, output_padding, device, dtype,
                    estimator)


class BayesConvTranspose1d(_BayesConvTransposeNd):
    _dims = 1


class BayesConvTranspose2d(_BayesConvTransposeNd):
    _dims = 2


class BayesConvTranspose3d(_BayesConvTransposeNd):
    _dims = 3


_TORCHBNN = (
    " A drop-in replacement for ``torchbnn.BayesConv2d`` (same arguments, parameter names,"
    " initialization and, on the pure-PyTorch path, random draws) whose padding behaves exactly"
    " as :class:`torch.nn.Conv2d`'s."
)
BayesConv1d.__doc__ = _doc("1D convolution", "Conv1d", 1, False)
BayesConv2d.__doc__ = _doc(
    "2D convolution", "Conv2d", 2, False, _TORCHBNN,
    r":math:`s = 1/\sqrt{\text{in\_channels} \cdot \text{kernel\_size[0]}^2}` (torchbnn's)",
)
BayesConv3d.__doc__ = _doc("3D convolution", "Conv3d", 3, False)
BayesConvTranspose1d.__doc__ = _doc("1D transposed convolution", "ConvTranspose1d", 1, True)
BayesConvTranspose2d.__doc__ = _doc("2D transposed convolution", "ConvTranspose2d", 2, True)
BayesConvTranspose3d.__doc__ = _doc("3D transposed convolution", "ConvTranspose3d", 3, True)
