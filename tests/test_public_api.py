"""The package's top level: the calls the README shows are reachable from `import bnn_fast as bnn`."""
import importlib
import types

import torch
from torch import nn

import bnn_fast as bnn


def test_predictive_is_the_function_at_the_top_level():
    model = nn.Sequential(bnn.BayesLinear(0, 0.1, 2, 3))
    res = bnn.predictive(model, torch.randn(5, 2), n_samples=8)
    assert isinstance(res, bnn.PredictiveResult) and res.mean.shape == (5, 3)


def test_predictive_classification_is_the_function_at_the_top_level():
    model = nn.Sequential(bnn.BayesLinear(0, 0.1, 2, 4))
    res = bnn.predictive_classification(model, torch.randn(5, 2), n_samples=8)
    assert isinstance(res, bnn.ClassificationResult) and res.probs.shape == (5, 4)


def test_the_predictive_module_stays_importable_by_its_path():
    from bnn_fast.predictive import PredictiveResult, predictive, predictive_classification

    module = importlib.import_module("bnn_fast.predictive")
    assert isinstance(module, types.ModuleType)
    assert predictive is bnn.predictive and predictive_classification is bnn.predictive_classification
    assert PredictiveResult is bnn.PredictiveResult


def test_the_readme_entry_points_are_at_the_top_level():
    for name in ("BayesLinear", "BayesConv2d", "BayesBatchNorm2d", "BKLLoss", "fuse", "FusedSequential",
                 "estimator", "freeze", "unfreeze", "transform_model", "backend", "reference_path",
                 "sample_many", "predictive", "predictive_classification"):
        assert callable(getattr(bnn, name)), name
    assert isinstance(bnn.fusion, types.ModuleType) and isinstance(bnn.utils, types.ModuleType)
