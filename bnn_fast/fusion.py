r"""Fused execution of ``BayesLinear -> ReLU -> BayesLinear`` runs, for prediction and training.

A run of three children of a plain :class:`torch.nn.Sequential`

    BayesLinear(in_features <= 8)  ->  nn.ReLU  ->  BayesLinear(out_features <= 8)

can be computed by one compiled operator that keeps every hidden activation in a register and
never writes them: ``bnn_fast::bayes_mlp_inference`` without gradients (CPU and CUDA:
csrc/cpu/mlp.cpp, csrc/cuda/mlp_kernel.cu), ``bnn_fast::bayes_mlp`` with them (CPU; its backward
samples the weights again from the seeds and computes every gradient the same way). The layers draw their seeds in the order they would draw
them run one by one, so the samples are the same; only the order of the sums differs.
Everything else in the model runs as usual.

Two places use it:

- :func:`bnn_fast.predictive` runs a plain ``nn.Sequential`` child by child itself and fuses
  each such run (prediction needs no change to the model);
- :class:`FusedSequential` (or :func:`fuse`, which makes one from an ``nn.Sequential``) is an
  ``nn.Sequential`` whose forward does the same, with or without gradients: the one-line
  opt-in for training. It holds the same modules, so parameters, ``state_dict`` keys (torchbnn
  checkpoints load as they are) and the KL are those of the ``nn.Sequential``.

Narrow ends and a wide middle are the shape of the small regression and classification networks
that Bayesian predictive uncertainty is most often drawn for (the seed article's is 1-1000-1):
there the hidden activations, not the arithmetic, are what a sample costs.

The fusion applies only where it cannot change what the model computes:

- at plan time: the model is exactly ``nn.Sequential`` or :class:`FusedSequential`; the three
  children are exactly ``BayesLinear``, ``nn.ReLU``, ``BayesLinear`` (a subclass may override
  ``forward``); none of them, nor the model, has a forward, forward-pre, backward or
  backward-pre hook, and no such global module hook is set (a hook expects to see the
  activations or their gradients);
- at run time: the compiled kernels are in use, the input is a 2-D tensor on the CPU (or, without
  gradients, on a CUDA GPU with the CUDA kernels compiled), the input and all parameters share a
  device and a dtype of float32 or float64, autocast is off, neither layer is frozen, and both
  layers' estimator (``bnn_fast.estimator`` block first) is ``"reparam"``.

Otherwise the three modules run one by one. ``fusion.enabled = False`` turns it off.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _ops, estimators, sampling
from .modules.linear import BayesLinear

__all__ = ["enabled", "MAX_IN", "MAX_OUT", "plan", "run", "FusedSequential", "fuse"]

#: Whether :func:`plan` fuses at all (tests and benchmarks compare both ways).
enabled = True
#: The operator's limits: layer 1's in_features and layer 2's out_features.
MAX_IN = 8
MAX_OUT = 8

# A step of a plan: a module run as usual, or a fused (layer 1, relu, layer 2) triple.
Step = Union[nn.Module, tuple]


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module: nn.Module) -> bool:
    # Forward and backward hooks alike: a fused run neither calls the modules nor gives them
    # gradients of their own.
    return any(getattr(module, name, None) for name in _HOOKS)


def _global_hooks() -> bool:
    state = nn.modules.module
    return any(getattr(state, "_global" + name, None) for name in _HOOKS)


def _fusable(a: nn.Module, r: nn.Module, b: nn.Module) -> bool:
    return (
        type(a) is BayesLinear and type(r) is nn.ReLU and type(b) is BayesLinear
        and a.in_features <= MAX_IN and b.out_features <= MAX_OUT
        and a.out_features == b.in_features
        and not any(_has_hooks(m) for m in (a, r, b))
    )


def plan(model: nn.Module, x: Optional[Tensor] = None, grad: bool = False) -> Optional[list[Step]]:
    """The children of `model` as steps, fusable triples grouped; ``None`` when nothing can be
    fused (or fusion is off, the extension missing, `model` not a plain ``nn.Sequential``, or a
    hook set).

    With `x`, the input the model will be run on, a triple is grouped only if the run-time
    conditions (device, dtypes, frozen layers, estimators, autocast) hold for it, so that a
    caller sizing memory from the plan (``predictive``'s chunks) does not count on a fusion that
    will not happen; with ``grad=True`` too, only where the fused backward can train it (the
    CPU). :func:`run` checks them again on every call either way."""
    if not enabled or not _ops.extension_loaded() or type(model) not in (nn.Sequential, FusedSequential):
        return None
    if _has_hooks(model) or _global_hooks():
        return None
    children = list(model)
    steps: list[Step] = []
    i = 0
    while i < len(children):
        if (i + 2 < len(children) and _fusable(*children[i:i + 3])
                and (x is None or _fused_params(children[i], children[i + 2], x, grad) is not None)):
            steps.append(tuple(children[i:i + 3]))
            i += 3
        else:
            steps.append(children[i])
            i += 1
    return steps if any(isinstance(step, tuple) for step in steps) else None


def fused_modules(steps: Sequence[Step]) -> set[nn.Module]:
    """The modules whose outputs a fused step never materializes (layer 1 and the ReLU)."""
    return {m for step in steps if isinstance(step, tuple) for m in step[:2]}


def run(steps: Sequence[Step], x: Tensor) -> Tensor:
    """Runs a :func:`plan` on `x` (inside :func:`bnn_fast.sampling.sample_many`, or not)."""
    for step in steps:
        x = _run_fused(*step, x) if isinstance(step, tuple) else step(x)
    return x


def _layer_params(layer: BayesLinear) -> tuple:
    # Each attribute read goes through nn.Module.__getattr__ (about 1.5 us): read them once.
    return layer.weight_mu, layer.weight_log_sigma, layer.bias_mu, layer.bias_log_sigma


def _fused_params(a: BayesLinear, b: BayesLinear, x: Tensor, grad: bool = False) -> Optional[tuple]:
    """(layer 1's, layer 2's parameters) when the triple can run fused on `x` now (with a
    backward if `grad`), else None."""
    op = "bayes_mlp" if grad else "bayes_mlp_inference"
    if x.dim() != 2 or not _ops.has_kernel(op, x.device.type):
        return None
    if a.weight_eps is not None or b.weight_eps is not None:
        return None  # frozen: torchbnn's fixed-noise path
    override = estimators.current()
    if (override or a.estimator) != "reparam" or (override or b.estimator) != "reparam":
        return None
    layer1, layer2 = _layer_params(a), _layer_params(b)
    # kernel_dtype: the dtype the kernels would run x and layer 1's weights in (None when they
    # are not in use); the fused ones run float32 and float64 as they are, without autocast.
    if x.dtype not in (torch.float32, torch.float64) or _ops.kernel_dtype(x, layer1[0]) != x.dtype:
        return None
    for p in layer1 + layer2:
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            return None
    return layer1, layer2


def _run_fused(a: BayesLinear, r: nn.ReLU, b: BayesLinear, x: Tensor) -> Tensor:
    params = _fused_params(a, b, x)
    if params is None:
        return b(r(a(x)))
    layer1, layer2 = params
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in layer1 + layer2))
    if needs_grad and not _ops.has_kernel("bayes_mlp", x.device.type):
        return b(r(a(x)))  # no fused backward on this device
    a._check_input(x, layer1[0])
    state = sampling.current()
    if state is None:
        xs, n_samples = x.unsqueeze(0), 1
    else:
        xs, n_samples = sampling.fold_input(x, "BayesLinear")
    # Seeds in the order the layers would draw them run one by one.
    seed1 = _ops.new_seed()
    seed2 = _ops.new_seed()
    op = _ops.bayes_mlp if needs_grad else _ops.bayes_mlp_inference
    y = op(xs, layer1, seed1, layer2, seed2, n_samples)
    # squeeze(0), not y[0]: select's backward would zero-fill and copy the gradient
    return y.squeeze(0) if state is None else sampling.unfold_output(y)


class FusedSequential(nn.Sequential):
    """An :class:`torch.nn.Sequential` that runs each ``BayesLinear(in_features <= 8) ->
    nn.ReLU -> BayesLinear(out_features <= 8)`` run of its children as one fused operator,
    forward and backward on the CPU, forward only on CUDA (see the module docstring for when it
    applies; elsewhere it is an ``nn.Sequential``). Build it as an ``nn.Sequential``, or with
    :func:`fuse`.

    Shape: as the children's (the fused run takes ``[N, in_features]`` and gives
    ``[N, out_features]``).
    """

    def forward(self, input: Tensor) -> Tensor:
        steps = plan(self)
        return run(steps, input) if steps is not None else super().forward(input)


def fuse(model: nn.Sequential) -> FusedSequential:
    """A :class:`FusedSequential` holding `model`'s children under the same names (the same
    module objects: parameters are shared, the ``state_dict`` keys are the same, an optimizer
    built on ``model.parameters()`` trains it) in `model`'s training mode. The one-line opt-in
    that fuses training too: ``model = bnn_fast.fuse(model)``. Only the children are carried
    over: hooks and attributes set on the ``nn.Sequential`` itself are not.

    Raises:
        TypeError: when `model` is not an ``nn.Sequential`` (for a custom module, fuse the
            ``nn.Sequential`` inside it: ``self.body = bnn_fast.fuse(self.body)``).
    """
    if isinstance(model, FusedSequential):
        return model
    if type(model) is not nn.Sequential:
        raise TypeError(f"fuse: model must be an nn.Sequential, got {type(model).__name__} "
                        "(fuse the nn.Sequential inside a custom module instead)")
    fused = FusedSequential(OrderedDict(model.named_children()))
    fused.train(model.training)
    return fused
