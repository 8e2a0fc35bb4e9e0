"""The Bayesian layers (torchbnn's ``torchbnn.modules``, and the rest of the family)."""
from .batchnorm import BayesBatchNorm1d, BayesBatchNorm2d, BayesBatchNorm3d
from .conv import (
    BayesConv1d, BayesConv2d, BayesConv3d, BayesConvTranspose1d, BayesConvTranspose2d,
    BayesConvTranspose3d,
)
from .linear import BayesLinear
from .loss import BKLLoss
from .module import BayesLayer, BayesModule

__all__ = [
    "BayesLinear",
    "BayesConv1d", "BayesConv2d", "BayesConv3d",
    "BayesConvTranspose1d", "BayesConvTranspose2d", "BayesConvTranspose3d",
    "BayesBatchNorm1d", "BayesBatchNorm2d", "BayesBatchNorm3d",
    "BKLLoss", "BayesModule",
]
