"""bnn-fast: fast Bayesian neural network layers for PyTorch.

A drop-in replacement for torchbnn 1.2 (``import bnn_fast as bnn``) whose C++ and CUDA kernels
fuse weight sampling, the matmul and the closed-form KL, and which draws many posterior samples
in one batched call (``bnn.predictive(model, x)``). ``bnn_fast.backend()`` tells which
implementation is active.
"""
from . import _ops, reference
from ._ops import BackendInfo, backend, normal, reference_path
from . import modules, functional, utils
from .modules import *  # noqa: F401,F403  (torchbnn's surface: BayesLinear, BayesConv2d, ...)
from .modules import (
    BayesLinear, BayesConv1d, BayesConv2d, BayesConv3d, BayesConvTranspose1d, BayesConvTranspose2d,
    BayesConvTranspose3d, BayesBatchNorm1d, BayesBatchNorm2d, BayesBatchNorm3d, BKLLoss, BayesModule,
)
from .utils import freeze, unfreeze, transform_model
from .conversion import to_bayesian, to_deterministic
from . import estimators
from .estimators import estimator
from .fusion import FusedSequential, fuse
from . import sampling
from .sampling import sample_many
# The functions, not their module: bnn.predictive(model, x). The module stays importable by its
# path (from bnn_fast.predictive import PredictiveResult), which the import system resolves
# through sys.modules, not through this attribute.
from .predictive import ClassificationResult, PredictiveResult, predictive, predictive_classification
from . import distributed

__version__ = "0.1.0"
