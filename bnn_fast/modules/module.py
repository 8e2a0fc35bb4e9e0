"""The base classes of Bayesian modules (``torchbnn.modules.module.BayesModule``'s path)."""
from torch.nn import Module

from ._common import freeze_noise, unfreeze_noise

__all__ = ["BayesModule"]


class BayesModule(Module):
    r"""Base class of Bayesian modules: a :class:`torch.nn.Module` whose :meth:`freeze` and
    :meth:`unfreeze` act on every Bayesian layer inside it.

    Every layer of bnn_fast (:class:`BayesLinear`, the convolutions and the batch norms) is a
    ``BayesModule``, and models may subclass it as they subclass ``torchbnn``'s. It has no state
    and no ``__init__`` of its own, so a subclass that calls ``super(BayesModule, self).__init__()``
    (skipping it) works too. (torchbnn 1.2's ``BayesModule.freeze`` raises ``NameError``; here
    both methods work and return ``self``.)
    """

    def freeze(self):
        r"""Fixes the noise of every Bayesian layer in this module (each layer's :meth:`freeze`,
        once per layer, in :meth:`~torch.nn.Module.modules` order), so that the forward pass is
        deterministic. Returns ``self``. (:func:`bnn_fast.utils.freeze` visits as torchbnn does:
        a layer shared by two parents is frozen twice there.)"""
        for module in self.modules():
            if isinstance(module, BayesLayer):
                module.freeze()
        return self

    def unfreeze(self):
        r"""Drops the fixed noise of every Bayesian layer in this module: each forward pass
        draws new noise again. Returns ``self``."""
        for module in self.modules():
            if isinstance(module, BayesLayer):
                module.unfreeze()
        return self


class BayesLayer(BayesModule):
    r"""Base class of the layers that own Gaussian parameters (``weight_mu``,
    ``weight_log_sigma``, ``bias_mu``, ``bias_log_sigma``, the frozen noise ``weight_eps`` and
    ``bias_eps``, the prior ``prior_mu`` and ``prior_log_sigma``): what :func:`bnn_fast.utils.freeze`
    freezes and :func:`bnn_fast.functional.bayesian_kl_loss` measures."""

    def freeze(self):
        r"""Fixes the noise (``weight_eps``, then ``bias_eps``, drawn with ``torch.randn_like``
        as torchbnn draws them) so that forward is deterministic. Returns ``self``."""
        freeze_noise(self)
        return self

    def unfreeze(self):
        r"""Drops the fixed noise: every forward draws new noise again. Returns ``self``."""
        unfreeze_noise(self)
        return self
