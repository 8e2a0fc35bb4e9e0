from torch.nn import Module

from .. import functional as BF

__all__ = ["BKLLoss"]


class _Loss(Module):
    """The base of the losses, holding their `reduction` (torchbnn's ``modules.loss._Loss``)."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction


class BKLLoss(_Loss):
    r"""The KL divergence of a Bayesian model's weights from their priors, as a loss.

    Calling ``BKLLoss(reduction, last_layer_only)(model)`` is
    ``bnn_fast.functional.bayesian_kl_loss(model, reduction, last_layer_only)``; see it for the
    details. A drop-in replacement for ``torchbnn.BKLLoss``.

    Args:
        reduction (str, optional): ``'mean'``: the summed KL divided by the number of Bayesian
            parameters (elements of the ``*_mu`` tensors); ``'sum'``: the summed KL.
            Default: ``'mean'``
        last_layer_only (bool, optional): if ``True``, only the last Bayesian layer's KL (its
            weight and bias), reduced as asked. Default: ``False``

    Shape:
        - Input: a :class:`torch.nn.Module` (the model), not a tensor.
        - Output: :math:`(1)`, or :math:`()` with ``last_layer_only=True``, like torchbnn.

    Examples::

        >>> kl_loss = BKLLoss(reduction='mean', last_layer_only=False)
        >>> cost = ce_loss(model(x), y) + 0.01 * kl_loss(model)
    """

    def __init__(self, reduction="mean", last_layer_only=False):
        super().__init__(reduction)
        self.last_layer_only = last_layer_only

    def forward(self, model):
        return BF.bayesian_kl_loss(model, reduction=self.reduction,
                                   last_layer_only=self.last_layer_only)
