from .batchnorm import BayesBatchNorm2d
from .conv import BayesConv2d
from .linear import BayesLinear
from .loss import BKLLoss

__all__ = ["BayesLinear", "BayesConv2d", "BayesBatchNorm2d", "BKLLoss"]
