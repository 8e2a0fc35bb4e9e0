"""Conversion between a deterministic torch.nn model and its Bayesian counterpart.

:func:`to_bayesian` turns a model's ``nn.Linear``, ``nn.ConvNd``, ``nn.ConvTransposeNd`` and
``nn.BatchNormNd`` layers into the Bayesian layers of this package, optionally centred on the
pretrained weights (MOPED); :func:`to_deterministic` turns them back, their means becoming the
weights, for deployment.
"""
import copy

import torch
from torch import nn

from .modules import (
    BayesBatchNorm1d, BayesBatchNorm2d, BayesBatchNorm3d, BayesConv1d, BayesConv2d, BayesConv3d,
    BayesConvTranspose1d, BayesConvTranspose2d, BayesConvTranspose3d, BayesLinear,
)

__all__ = ["to_bayesian", "to_deterministic"]

_INITS = ("prior", "moped")

# Exact types on both sides: a subclass may rely on the attributes of its base
# (nn.MultiheadAttention reads its NonDynamicallyQuantizableLinear's `.weight`; a BayesLinear
# subclass may add a method), which the counterpart would not have.
_TO_BAYES = {
    nn.Linear: BayesLinear,
    nn.Conv1d: BayesConv1d,
    nn.Conv2d: BayesConv2d,
    nn.Conv3d: BayesConv3d,
    nn.ConvTranspose1d: BayesConvTranspose1d,
    nn.ConvTranspose2d: BayesConvTranspose2d,
    nn.ConvTranspose3d: BayesConvTranspose3d,
    nn.BatchNorm1d: BayesBatchNorm1d,
    nn.BatchNorm2d: BayesBatchNorm2d,
    nn.BatchNorm3d: BayesBatchNorm3d,
}
_TO_NN = {bayes: plain for plain, bayes in _TO_BAYES.items()}

_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode")
_NORM_ARGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def to_bayesian(model, prior_mu=0.0, prior_sigma=0.1, *, init="prior", moped_delta=0.1,
                include=None, exclude=None, inplace=False):
    r"""Replaces every deterministic layer of `model` that has a Bayesian counterpart by it.

    ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and ``nn.BatchNorm1d/2d/3d``
    become :class:`BayesLinear`, :class:`BayesConv1d`, ... :class:`BayesBatchNorm3d`, built with
    every argument of the layer they replace (kernel size, stride, padding, its strings
    ``'same'``/``'valid'`` included, dilation, groups, output padding, padding mode, bias,
    eps, momentum, affine, track_running_stats), on its device, in its dtype and in its
    training mode. Only these exact types are converted: their subclasses (``nn.LazyLinear``,
    ``nn.SyncBatchNorm``, the ``NonDynamicallyQuantizableLinear`` that ``nn.MultiheadAttention``
    holds and reads the ``.weight`` of, ...) are left as they are, since their owners may rely on
    what only the deterministic layer has.

    With ``init="prior"`` a new layer's Gaussian parameters are initialized by its constructor;
    with ``init="moped"`` (MOPED, Krishnan et al., AAAI 2020) they start at the pretrained
    weights: :math:`\mu = w` and :math:`\sigma = \max(\delta |w|, \text{floor})`, for the
    weight and the bias (a batch norm's scale and shift), where the floor, the largest of
    :math:`10^{-8}` and the dtype's smallest normal number, keeps :math:`\log\sigma` finite
    where :math:`w = 0`. The prior stays :math:`N(\text{prior\_mu}, \text{prior\_sigma}^2)` for
    every weight (the layers' priors are scalars). A batch norm's running statistics
    (``running_mean``, ``running_var``, ``num_batches_tracked``) are not Bayesian: they are
    copied under both inits.

    A module reachable under several names is converted once and stays shared. Forward hooks and
    other state attached to a replaced layer are not carried over.

    Args:
        model (nn.Module): the model to convert; if it is itself a convertible layer, the new
            layer is returned in its place.
        prior_mu (float, optional): mean of the Gaussian prior of every new layer. Default: 0.0
        prior_sigma (float, optional): standard deviation of that prior (the initial sigma under
            ``init="prior"``). Default: 0.1
        init (str, optional): ``"prior"`` or ``"moped"``, as above. Default: ``"prior"``
        moped_delta (float, optional): :math:`\delta`, the initial sigma relative to
            :math:`|w|` under ``init="moped"``. Default: 0.1
        include (iterable, optional): if given, only the layers it selects are converted. Its
            items are layer types (among the ten above) and qualified names as
            ``model.named_modules()`` gives them (``""`` is `model`); a name selects that
            module and every module inside it. A single type or name may be given alone.
            Default: ``None`` (every convertible layer)
        exclude (iterable, optional): layers not to convert, selected as by `include`; it wins
            over `include`. Default: ``None``
        inplace (bool, optional): if ``False``, `model` is left as it is and a converted deep
            copy is returned. Default: ``False``

    Shape:
        Every new layer takes and returns tensors of the shapes its predecessor does;
        ``weight_mu`` and ``weight_log_sigma`` have the shape of ``weight``, ``bias_mu`` and
        ``bias_log_sigma`` that of ``bias`` (transposed convolutions: :math:`(C_{in},
        C_{out}/\text{groups}, *\text{kernel\_size})`, as in ``torch.nn``).

    Returns:
        nn.Module: the converted model.

    Raises:
        ValueError: if `init` is not ``"prior"`` or ``"moped"``, `moped_delta` is negative or
            not a number, or `include`/`exclude` names a module `model` does not have or a type
            that is not convertible.
        TypeError: if an item of `include`/`exclude` is neither a type nor a string.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
        >>> bnet = to_bayesian(net, prior_sigma=0.1, init="moped", exclude=[nn.BatchNorm2d])
        >>> [type(m).__name__ for m in bnet]
        ['BayesConv2d', 'BatchNorm2d', 'ReLU', 'Flatten', 'BayesLinear']
        >>> torch.equal(bnet[0].weight_mu, net[0].weight)
        True
    """
    if init not in _INITS:
        raise ValueError(f"to_bayesian: init must be one of {_INITS}, got {init!r}")
    if not moped_delta >= 0:
        raise ValueError(
            f"to_bayesian: moped_delta must be a non-negative number, got {moped_delta!r}"
        )
    if not inplace:
        model = copy.deepcopy(model)
    selected = {id(m) for m in _selection(model, include, exclude)}

    def convert(layer):
        return _bayesian_layer(layer, prior_mu, prior_sigma, init, moped_delta)

    return _replace(model, lambda m: id(m) in selected, convert, {})


def to_deterministic(model, *, inplace=False):
    r"""Replaces every Bayesian layer of `model` by its ``torch.nn`` counterpart, with the means
    as weights: the deterministic model a Bayesian one predicts with at zero noise, for deployment.

    :class:`BayesLinear` becomes ``nn.Linear``, :class:`BayesConv1d` ``nn.Conv1d``, ...,
    :class:`BayesBatchNorm3d` ``nn.BatchNorm3d``, built with the layer's arguments, on its device,
    in its dtype and training mode; ``weight_mu`` and ``bias_mu`` become ``weight`` and ``bias``
    and a batch norm's running statistics are copied. The sigmas and the priors are dropped. As in
    :func:`to_bayesian`, only these exact types are converted (a subclass may add what the
    ``torch.nn`` layer lacks), and a shared layer stays shared.

    Args:
        model (nn.Module): the model to convert; if it is itself a Bayesian layer, the new layer
            is returned in its place.
        inplace (bool, optional): if ``False``, `model` is left as it is and a converted deep
            copy is returned. Default: ``False``

    Shape:
        ``weight`` and ``bias`` have the shapes of ``weight_mu`` and ``bias_mu``; inputs and
        outputs keep theirs.

    Returns:
        nn.Module: the deterministic model.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> back = to_deterministic(to_bayesian(net, init="moped"))
        >>> x = torch.randn(5, 4)
        >>> torch.equal(back(x), net(x))
        True
    """
    if not inplace:
        model = copy.deepcopy(model)
    return _replace(model, lambda m: type(m) in _TO_NN, _deterministic_layer, {})


def _replace(module, chosen, convert, done):
    """`module` with every submodule for which `chosen` holds replaced by ``convert(it)``.

    `done` maps id(old module) -> (old module, result), so that a module reachable twice is
    converted once; holding the old module keeps its id from being reused meanwhile.
    """
    if id(module) in done:
        return done[id(module)][1]
    if chosen(module):
        result = convert(module)
    else:
        result = module
        # _modules rather than named_children(), which skips a child registered under two names.
        for name, child in list(module._modules.items()):
            if child is not None:
                setattr(module, name, _replace(child, chosen, convert, done))
    done[id(module)] = (module, result)
    return result


def _selection(model, include, exclude):
    """The modules of `model` that to_bayesian converts, as a list."""
    named = list(model.named_modules(remove_duplicate=False))
    include = None if include is None else _parse_selector(include, "include", named)
    exclude = None if exclude is None else _parse_selector(exclude, "exclude", named)
    included, excluded = {}, {}
    for name, m in named:
        if type(m) not in _TO_BAYES:
            continue
        if include is None or _selects(include, name, m):
            included[id(m)] = m
        if exclude is not None and _selects(exclude, name, m):
            excluded[id(m)] = m
    return [m for key, m in included.items() if key not in excluded]


def _parse_selector(items, argument, named):
    """`items` of include/exclude as (set of types, list of names), checked against `named`."""
    if isinstance(items, (type, str)):  # one type or name, not an iterable of them
        items = [items]
    types, names = set(), []
    known = {name for name, _ in named}
    for item in items:
        if isinstance(item, type):
            if item not in _TO_BAYES:
                raise ValueError(
                    f"to_bayesian: {argument} holds {item.__name__}, which is not converted; "
                    f"the convertible types are {', '.join(t.__name__ for t in _TO_BAYES)} "
                    "(exactly these: their subclasses are left as they are)"
                )
            types.add(item)
        elif isinstance(item, str):
            if item not in known:
                raise ValueError(f"to_bayesian: {argument} names {item!r}, which is not a module "
                                 "of the model (see model.named_modules())")
            names.append(item)
        else:
            raise TypeError(f"to_bayesian: {argument} must hold layer types and module names, "
                            f"got {type(item).__name__}")
    return types, names


def _selects(selector, name, module):
    types, names = selector
    return type(module) in types or any(
        prefix == "" or name == prefix or name.startswith(prefix + ".") for prefix in names
    )


def _factory(layer):
    """The device and dtype of `layer`'s first tensor of floating point (none: the defaults)."""
    for tensor in list(layer.parameters()) + list(layer.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _bayesian_layer(layer, prior_mu, prior_sigma, init, moped_delta):
    cls = _TO_BAYES[type(layer)]
    factory = _factory(layer)
    if isinstance(layer, nn.Linear):
        new = cls(prior_mu, prior_sigma, layer.in_features, layer.out_features,
                  bias=layer.bias is not None, **factory)
    elif isinstance(layer, nn.modules.conv._ConvNd):
        kwargs = {key: getattr(layer, key) for key in _CONV_ARGS}
        if layer.transposed:
            kwargs["output_padding"] = layer.output_padding
        new = cls(prior_mu, prior_sigma, bias=layer.bias is not None, **kwargs, **factory)
    else:
        # torch.nn's keyword-only bias=False (an affine scale without a shift) is carried too.
        new = cls(prior_mu, prior_sigma, **{key: getattr(layer, key) for key in _NORM_ARGS},
                  **factory, bias=not layer.affine or layer.bias is not None)
    new.train(layer.training)
    with torch.no_grad():
        _copy_running_stats(layer, new)
        if init == "moped":
            for name in ("weight", "bias"):
                w = getattr(layer, name)
                if w is not None:
                    getattr(new, name + "_mu").copy_(w)
                    getattr(new, name + "_log_sigma").copy_(_moped_log_sigma(w, moped_delta))
    return new


def _moped_log_sigma(w, delta):
    floor = max(1e-8, torch.finfo(w.dtype).tiny)
    return torch.log(torch.clamp(delta * w.abs(), min=floor))


def _deterministic_layer(layer):
    cls = _TO_NN[type(layer)]
    factory = _factory(layer)
    if isinstance(layer, BayesLinear):
        new = cls(layer.in_features, layer.out_features, bias=layer.bias, **factory)
    elif issubclass(cls, nn.modules.conv._ConvNd):
        kwargs = {key: getattr(layer, key) for key in _CONV_ARGS}
        if issubclass(cls, nn.modules.conv._ConvTransposeNd):
            kwargs["output_padding"] = layer.output_padding
        new = cls(bias=layer.bias, **kwargs, **factory)
    else:
        kwargs = {key: getattr(layer, key) for key in _NORM_ARGS}
        if layer.affine and layer.bias_mu is None:
            kwargs["bias"] = False  # torch.nn's keyword-only bias (recent torch versions only)
        new = cls(**kwargs, **factory)
    new.train(layer.training)
    with torch.no_grad():
        _copy_running_stats(layer, new)
        for name in ("weight", "bias"):
            mu = getattr(layer, name + "_mu", None)
            if mu is not None:
                getattr(new, name).copy_(mu)
    return new


def _copy_running_stats(source, target):
    for name in _RUNNING_STATS:
        value = getattr(source, name, None)
        if value is not None:
            getattr(target, name).copy_(value)
