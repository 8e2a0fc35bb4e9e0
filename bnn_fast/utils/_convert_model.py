"""torchbnn's model conversion (``utils._convert_model``), on top of :mod:`bnn_fast.conversion`.

torchbnn rebuilt each layer from its printed repr with ``exec``, reached only the model's
children and the layers of its ``nn.Sequential`` children, and returned untrained layers. These
reach every layer at any depth, every layer type :func:`~bnn_fast.to_bayesian` converts, and carry
the weights: :func:`bayes_to_nonbayes` keeps the means, :func:`nonbayes_to_bayes` initializes
as the Bayesian constructors do (``init="prior"``).
"""
from .. import conversion
# Unused here: torchbnn's module star-imports torchbnn.modules, so its import path holds them.
from ..modules import BKLLoss, BayesBatchNorm2d, BayesConv2d, BayesLinear  # noqa: F401

__all__ = ["nonbayes_to_bayes", "bayes_to_nonbayes"]


def nonbayes_to_bayes(model, prior_mu, prior_sigma, inplace=True):
    r"""Replaces every deterministic layer of `model` that has a Bayesian counterpart by it:
    :func:`bnn_fast.to_bayesian` with ``init="prior"``.

    Args:
        model (nn.Module): the model to convert.
        prior_mu (float): mean of the Gaussian prior of every new layer.
        prior_sigma (float): standard deviation of that prior.
        inplace (bool, optional): if ``False``, `model` is left as it is and a converted deep copy
            is returned. Default: ``True``

    Returns:
        nn.Module: the converted model.
    """
    return conversion.to_bayesian(model, prior_mu, prior_sigma, inplace=inplace)


def bayes_to_nonbayes(model, inplace=True):
    r"""Replaces every Bayesian layer of `model` by its ``torch.nn`` counterpart, with the means
    as weights: :func:`bnn_fast.to_deterministic`.

    Args:
        model (nn.Module): the model to convert.
        inplace (bool, optional): if ``False``, `model` is left as it is and a converted deep copy
            is returned. Default: ``True``

    Returns:
        nn.Module: the deterministic model.
    """
    return conversion.to_deterministic(model, inplace=inplace)


def _nonbayes_to_bayes(layer, prior_mu, prior_sigma):
    """One layer as :func:`nonbayes_to_bayes` converts it; `layer` itself if it has no Bayesian
    counterpart (its children are not searched)."""
    if type(layer) not in conversion._TO_BAYES:
        return layer
    return conversion.to_bayesian(layer, prior_mu, prior_sigma, inplace=True)


def _bayes_to_nonbayes(layer):
    """One layer as :func:`bayes_to_nonbayes` converts it; `layer` itself if it is not a Bayesian
    layer (its children are not searched)."""
    if type(layer) not in conversion._TO_NN:
        return layer
    return conversion.to_deterministic(layer, inplace=True)
