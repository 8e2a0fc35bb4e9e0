r"""Many-sample forward passes: the sample-folding protocol that Bayesian layers follow.

Inside ``with sample_many(S):`` one forward pass of a model draws ``S`` independent weight
samples in every Bayesian layer, instead of one. The sample axis travels through the model folded
into the batch dimension, sample-major, so that every deterministic layer in between (ReLU,
``nn.Linear``, ``nn.Conv2d``, pooling, flatten, ...) sees an ordinary, bigger batch and needs no
change::

    x                        [N, ...]      the un-repeated input, never copied S times
    first Bayesian layer     [N, ...]   -> [S*N, ...]
    deterministic layers     [S*N, ...] -> [S*N, ...]
    later Bayesian layers    [S*N, ...] -> [S*N, ...]
    model output             [S*N, ...]    .reshape(S, N, ...): out[s] is weight sample s

Row ``s*N + n`` holds sample ``s`` of input row ``n`` (sample ``s`` owns rows ``s*N`` to
``s*N + N - 1``). The first Bayesian layer receives the un-repeated ``[N, ...]`` input and
broadcasts it against its ``S`` weight samples; deterministic layers placed before it run once,
on ``N`` rows.

What a Bayesian layer does
--------------------------
When :func:`current` returns ``None`` the layer behaves as usual (one weight sample). Otherwise::

    x, S = fold_input(input, "BayesLinear")   # [1, N, ...] (broadcast) or [S, N, ...]
    y = ...                                    # [S, N, ...]: sample s uses weight sample s
    return unfold_output(y)                    # [S*N, ...]

:func:`fold_input` tells the two cases apart by the input's first dimension ``L``: the first
Bayesian layer of the pass records ``N = L`` in the :class:`SamplingState`; a later layer accepts
``L == S*N`` (folded activations) or ``L == N`` (the raw input again, e.g. through a skip
connection) and raises :class:`ValueError` for anything else.

Scope
-----
``state.batch`` is set by the first folded layer and kept for the rest of the ``with`` block, so
one block serves one input batch size: run several forward passes on inputs of the same ``N``
inside it, or open a new block per batch (:func:`bnn_fast.predictive` opens one per
chunk of samples). The state is thread-local, so a model run on another thread (e.g. by
``nn.DataParallel``) does not see it. Blocks nest: the innermost one is in force, and leaving it
restores the enclosing one.

Example::

    model = nn.Sequential(BayesLinear(0, 0.1, 3, 16), nn.ReLU(), BayesLinear(0, 0.1, 16, 2))
    with sample_many(100):
        y = model(torch.randn(8, 3))    # [100*8, 2]
    y = y.reshape(100, 8, 2)            # y[s]: the outputs of weight sample s
"""
from __future__ import annotations

import operator
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from torch import Tensor

__all__ = ["SamplingState", "current", "sample_many", "fold_input", "unfold_output"]


@dataclass
class SamplingState:
    """The sampling context of one ``with sample_many(n_samples):`` block.

    Attributes:
        n_samples: S, the number of weight samples every Bayesian layer draws.
        batch: N, the un-repeated batch size; ``None`` until the first Bayesian layer of the
            block folds its input (see :func:`fold_input`).
    """

    n_samples: int
    batch: Optional[int] = None


class _ThreadState(threading.local):
    # A class-level default: reading an attribute a thread never set is then a plain lookup,
    # not getattr's AttributeError path (about 1 us; this is read on every layer's forward).
    state = None


_local = _ThreadState()


def current() -> Optional[SamplingState]:
    """The sampling state in force on this thread, or ``None`` outside :func:`sample_many`."""
    return _local.state


@contextmanager
def sample_many(n_samples: int) -> Iterator[SamplingState]:
    """Makes every Bayesian layer draw `n_samples` weight samples per forward pass in this block.

    Args:
        n_samples (int): S >= 1, the number of samples.

    Yields:
        SamplingState: the block's state (``batch`` fills in on the first Bayesian layer).

    Raises:
        TypeError: if `n_samples` is not an integer.
        ValueError: if `n_samples` < 1.
    """
    if isinstance(n_samples, bool):  # a bool is an int to operator.index, never a sample count
        raise TypeError(f"sample_many: n_samples must be an int, got {n_samples!r}")
    try:
        n_samples = operator.index(n_samples)
    except TypeError:
        raise TypeError(
            f"sample_many: n_samples must be an int, got {type(n_samples).__name__}"
        ) from None
    if n_samples < 1:
        raise ValueError(f"sample_many: n_samples must be >= 1, got {n_samples}")
    outer = current()
    state = SamplingState(n_samples)
    _local.state = state
    try:
        yield state
    finally:
        _local.state = outer


def fold_input(x: Tensor, layer_name: str) -> tuple[Tensor, int]:
    """Gives a Bayesian layer its input with the sample axis in front (call inside sample_many).

    Args:
        x: the layer's input, ``[L, ...]`` with the batch first.
        layer_name: the layer's name, for error messages.

    Returns:
        ``(x_s, S)``: ``x_s`` is ``[1, N, ...]`` (a view of an un-repeated input: one batch shared
        by all S samples) or ``[S, N, ...]`` (a view of folded activations); S is the number of
        samples the layer must draw.

    Raises:
        RuntimeError: outside :func:`sample_many`.
        ValueError: if ``L`` is neither ``S*N`` nor ``N`` for the block's N.
    """
    state = current()
    if state is None:
        raise RuntimeError(
            f"{layer_name}: fold_input must be called inside bnn_fast.sampling.sample_many"
        )
    if x.dim() == 0:
        raise ValueError(
            f"{layer_name}: under sample_many the input needs a batch dimension, got a 0-dim tensor"
        )
    s, length = state.n_samples, x.shape[0]
    if state.batch is None:
        state.batch = length
        return x.unsqueeze(0), s
    # Folded activations first: with S == 1 both tests hold and both views are the same.
    if length == s * state.batch:
        return x.reshape(s, state.batch, *x.shape[1:]), s
    if length == state.batch:
        return x.unsqueeze(0), s
    raise ValueError(
        f"{layer_name}: under sample_many({s}) the input's first dimension must be the batch size "
        f"N={state.batch} (an un-repeated input) or S*N={s * state.batch} (activations folded "
        f"sample-major), got {length}; one sample_many block serves one batch size"
    )


def unfold_output(y: Tensor) -> Tensor:
    """Folds a layer's ``[S, N, ...]`` output back into the batch: ``[S*N, ...]``, sample-major."""
    if y.dim() < 2:
        raise ValueError(
            f"unfold_output: expected an output of shape [S, N, ...], got {tuple(y.shape)}"
        )
    return y.reshape(y.shape[0] * y.shape[1], *y.shape[2:])
