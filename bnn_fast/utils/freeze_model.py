"""Freezing the noise of every Bayesian layer in a model (torchbnn's ``utils.freeze_model``)."""
# The layer classes and BKLLoss unused: torchbnn's module star-imports torchbnn.modules, so its
# import path holds them.
from ..modules import BKLLoss, BayesBatchNorm2d, BayesConv2d, BayesLinear  # noqa: F401
from ..modules.module import BayesLayer

__all__ = ["freeze", "unfreeze"]

# The layers that draw noise. Containers (a BayesModule subclass holding layers) are not in it:
# calling their freeze() as well would freeze their layers twice and draw the noise twice.
_BAYES_LAYERS = (BayesLayer,)


def freeze(module):
    r"""Freezes every Bayesian layer in `module` (itself included): each draws its noise once
    (``weight_eps``, ``bias_eps``) and reuses it, so the model becomes deterministic.

    Layers are visited as torchbnn visits them (the module, then each child recursively), so
    under one ``torch.manual_seed`` both libraries draw the same noise.

    Args:
        module (nn.Module): the model to freeze.

    Example::

        >>> model = nn.Sequential(BayesLinear(0, 0.1, 4, 3))
        >>> freeze(model)
        >>> x = torch.randn(2, 4)
        >>> torch.equal(model(x), model(x))
        True
    """
    if isinstance(module, _BAYES_LAYERS):
        module.freeze()
    for submodule in module.children():
        freeze(submodule)


def unfreeze(module):
    r"""Unfreezes every Bayesian layer in `module` (itself included): the fixed noise buffers
    become ``None`` and each forward draws new noise again.

    Args:
        module (nn.Module): the model to unfreeze.
    """
    if isinstance(module, _BAYES_LAYERS):
        module.unfreeze()
    for submodule in module.children():
        unfreeze(submodule)
