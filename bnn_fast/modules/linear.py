import math

import torch
import torch.nn.functional as F
from torch.nn import Parameter

from .. import _ops, estimators, reference, sampling
from ._common import (
    BIAS_STREAM, WEIGHT_STREAM, check_input, new_noise_seed, reset_uniform, sample_gaussian,
    sample_noise,
)
from .module import BayesLayer

__all__ = ["BayesLinear"]


class BayesLinear(BayesLayer):
    r"""Applies a Bayesian linear transformation to the incoming data: :math:`y = xW^T + b`,
    with every weight and bias drawn from its own Gaussian on each forward pass.

    Each weight is :math:`W = \mu + \exp(\log\sigma) \cdot \epsilon`, :math:`\epsilon \sim N(0, 1)`
    (the reparameterization trick), and likewise the bias. The noise is drawn afresh on every call
    unless the layer is frozen (see :meth:`freeze`). A drop-in replacement for
    ``torchbnn.BayesLinear``: same arguments, parameter names and initialization (and, on the
    pure-PyTorch path, the same random draws; see below).

    Args:
        prior_mu (float): mean of the Gaussian prior of every weight and bias.
        prior_sigma (float): standard deviation of that prior; also the initial sigma.
        in_features (int): size of each input sample.
        out_features (int): size of each output sample.
        bias (bool): if ``False`` (or ``None``), the layer learns no additive bias.
            Default: ``True``
        device, dtype: where and of which dtype the parameters are made (as in
            :class:`torch.nn.Linear`).
        estimator (str, keyword-only): how the noise is drawn: ``"reparam"`` (torchbnn's: one
            weight sample per forward pass, shared by the batch), ``"local"`` (local
            reparameterization: independent noise per output element) or ``"flipout"`` (one
            shared weight perturbation, sign-flipped per row); see :mod:`bnn_fast.estimators`.
            Every row's output has the same distribution under each; ``"local"`` and
            ``"flipout"`` give lower-variance gradients. A ``with bnn_fast.estimator(...)``
            block overrides it; a frozen layer always uses ``"reparam"`` with its fixed noise.
            Default: ``"reparam"``

    Shape:
        - Input: :math:`(*, H_{in})` where :math:`*` means any number of dimensions including
          none and :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})` where all but the last dimension are the same shape as
          the input and :math:`H_{out} = \text{out\_features}`.

    Attributes:
        weight_mu, weight_log_sigma: the learnable mean and log standard deviation of the
            weights, of shape :math:`(\text{out\_features}, \text{in\_features})`, initialized
            :math:`\mu \sim U(-1/\sqrt{\text{in\_features}}, 1/\sqrt{\text{in\_features}})` and
            :math:`\log\sigma = \log(\text{prior\_sigma})`.
        bias_mu, bias_log_sigma: the same for the bias, of shape :math:`(\text{out\_features})`;
            ``None`` without bias.
        weight_eps, bias_eps: buffers holding the fixed noise while frozen, ``None`` otherwise.
        bias (bool): whether the layer has a bias.
        estimator (str): the layer's estimator; may be reassigned (it is checked).

    Examples::

        >>> m = BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=20, out_features=30)
        >>> output = m(torch.randn(128, 20))
        >>> print(output.size())
        torch.Size([128, 30])

    With the compiled extension, the forward is one fused operator (``bnn_fast::bayes_linear``):
    the noise comes from the counter-based RNG (a fresh 64-bit seed from PyTorch's default CPU
    generator per call, so ``torch.manual_seed`` makes runs reproducible) instead of
    ``torch.randn_like``, so the samples differ from torchbnn's while the distribution is the
    same. Without the extension, or while frozen, the layer computes exactly what torchbnn does.
    Inside :func:`bnn_fast.sampling.sample_many` it draws S weight samples per call (the sample
    axis folded into the batch, sample-major). The ``"local"`` and ``"flipout"`` estimators run
    the fused operators ``bnn_fast::bayes_linear_local`` and ``bnn_fast::bayes_linear_flipout``
    over the same counter-based noise (PyTorch compositions drawing with ``torch.randn`` on the
    pure-PyTorch path).
    """

    # Follows the sampling.sample_many protocol.
    _supports_sampling = True

    def __init__(self, prior_mu, prior_sigma, in_features, out_features, bias=True, device=None,
                 dtype=None, *, estimator="reparam"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.estimator = estimator

        self.prior_mu = prior_mu
        self.prior_sigma = prior_sigma
        self.prior_log_sigma = math.log(prior_sigma)

        factory = {"device": device, "dtype": dtype}
        self.weight_mu = Parameter(torch.empty(out_features, in_features, **factory))
        self.weight_log_sigma = Parameter(torch.empty(out_features, in_features, **factory))
        self.register_buffer("weight_eps", None)

        # torchbnn's rule: only None and False mean "no bias"; anything else, a tensor included
        # (what nn.Linear's `.bias` holds), means a bias.
        self.bias = not (bias is None or bias is False)
        if self.bias:
            self.bias_mu = Parameter(torch.empty(out_features, **factory))
            self.bias_log_sigma = Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_log_sigma", None)
        self.register_buffer("bias_eps", None)

        self.reset_parameters()

    estimator = estimators.layer_estimator

    def reset_parameters(self):
        reset_uniform(self, 1.0 / math.sqrt(self.weight_mu.size(1)))

    def forward(self, input):
        # A small layer's forward is mostly Python (benchmarks/README.md), so the common case
        # takes few and cheap steps. The parameters come straight from _parameters / _buffers
        # (nn.Module.__getattr__ costs about 1.5 us a read here); a layer whose parameters live
        # elsewhere (torch.nn.utils.parametrize) reads them as attributes.
        params, buffers = self._parameters, self._buffers
        weight_mu = params["weight_mu"] if "weight_mu" in params else self.weight_mu
        weight_eps = buffers["weight_eps"] if "weight_eps" in buffers else self.weight_eps
        self._check_input(input, weight_mu)
        state = sampling.current()
        if state is None:
            x_rows, n_samples = input.reshape(1, -1, self.in_features), 1
        else:
            x, n_samples = sampling.fold_input(input, type(self).__name__)
            x_rows = x.reshape(x.shape[0], -1, self.in_features)
        # Frozen noise is a weight sample: only "reparam" can use it (torchbnn's semantics).
        frozen = weight_eps is not None
        estimator = "reparam" if frozen else estimators.current() or self.estimator
        dtype = None if frozen else _ops.kernel_dtype(input, weight_mu)
        if estimator != "reparam":
            y = self._forward_estimator(estimator, x_rows, n_samples, dtype)
        elif dtype is not None:
            y = self._forward_fused(x_rows, n_samples, dtype)
        elif state is None:
            return self._forward_reference(input)
        else:
            y = self._forward_reference_samples(x_rows, n_samples)
        # y: [S, rows, out]
        if state is None:
            # squeeze(0) for the usual [N, in] input: under 1 us, where the general reshape costs
            # 8 us (its shape tuple is built in Python) and a small layer's call is mostly such
            # costs. Not y[0]: its backward (select_backward) zero-fills a [1, N, out] gradient and
            # copies into it, 112 us at N = 256, out = 1024; squeeze's backward is a view.
            if input.dim() == 2:
                return y.squeeze(0)
            return y.reshape(input.shape[:-1] + (self.out_features,))
        # x: [1 or S, N, *, in]; the output keeps x's middle dims, [S, N, *, out], then folds.
        return sampling.unfold_output(y.reshape((n_samples,) + tuple(x.shape[1:-1]) + (self.out_features,)))

    def _check_input(self, input, weight_mu):
        check_input(self, input, weight_mu)
        if input.dim() == 0:
            raise ValueError(
                f"{type(self).__name__}: input must have at least 1 dimension "
                f"(*, {self.in_features}), got a 0-dim tensor"
            )
        if input.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input must have last dim {self.in_features} "
                f"(in_features), got {input.shape[-1]}"
            )

    def _forward_reference(self, input):
        # torchbnn's semantics: weight noise is drawn before bias noise.
        weight = sample_gaussian(self.weight_mu, self.weight_log_sigma, self.weight_eps)
        bias = None
        if self.bias:
            bias = sample_gaussian(self.bias_mu, self.bias_log_sigma, self.bias_eps)
        return F.linear(input, weight, bias)

    def _forward_estimator(self, name, x, n_samples, dtype):
        """The "local" or "flipout" estimator: x [1 or S, N, in] -> [S, N, out]; the fused
        operator when `dtype` (the kernels' dtype) is given, else the PyTorch composition."""
        if dtype is not None:
            op = _ops.bayes_linear_local if name == "local" else _ops.bayes_linear_flipout
            return op(x if x.dtype == dtype else x.to(dtype), *self._params_in(dtype),
                      _ops.new_seed(), n_samples)
        function = estimators.local if name == "local" else estimators.flipout
        return function(x, self.weight_mu, self.weight_log_sigma, self.bias_mu, self.bias_log_sigma,
                        n_samples=n_samples, seed=new_noise_seed())

    def _params_in(self, dtype):
        """(weight_mu, weight_log_sigma, bias_mu, bias_log_sigma), in `dtype` (bias: None
        without one)."""
        p = self._parameters
        try:
            params = (p["weight_mu"], p["weight_log_sigma"], p["bias_mu"], p["bias_log_sigma"])
        except KeyError:  # parametrized: the attributes resolve them
            params = (self.weight_mu, self.weight_log_sigma, self.bias_mu, self.bias_log_sigma)
        wmu, wls, bmu, bls = params
        if wmu.dtype == dtype and wls.dtype == dtype and (
            bmu is None or (bmu.dtype == dtype and bls.dtype == dtype)
        ):
            return params
        return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in params)

    def _forward_fused(self, x, n_samples, dtype):
        """The compiled operator: x [1 or S, N, in] -> [S, N, out]."""
        return _ops.bayes_linear(x if x.dtype == dtype else x.to(dtype), *self._params_in(dtype),
                                 _ops.new_seed(), n_samples)

    def _forward_reference_samples(self, x, n_samples):
        """S weight samples in pure PyTorch (x [1 or S, N, in] -> [S, N, out]); frozen layers
        reuse their fixed noise for every sample."""
        eps_w = sample_noise(n_samples, self.weight_eps, self.weight_log_sigma, None, WEIGHT_STREAM)
        eps_b = None
        if self.bias:
            eps_b = sample_noise(n_samples, self.bias_eps, self.bias_log_sigma, None, BIAS_STREAM)
        return reference.bayes_linear(x, self.weight_mu, self.weight_log_sigma, self.bias_mu,
                                      self.bias_log_sigma, eps_w, eps_b)

    def extra_repr(self):
        return (
            f"prior_mu={self.prior_mu}, prior_sigma={self.prior_sigma}, "
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias}"
            + (f", estimator={self.estimator!r}" if self.estimator != "reparam" else "")
        )
