r"""Posterior predictive statistics from many weight samples, streamed in bounded memory.

:func:`predictive` runs a Bayesian model on one input batch ``x`` for ``n_samples`` weight samples
and returns the per-output mean and standard deviation (optionally quantiles and the samples);
:func:`predictive_classification` returns the predictive class probabilities and the entropy
decomposition into its aleatoric and epistemic parts. Both draw the samples in chunks of ``c``
samples, one forward pass per chunk under :func:`bnn_fast.sampling.sample_many` (``c`` samples in
one batched call; see that module for the protocol), and merge each chunk into running float64
statistics, so memory stays bounded whatever ``n_samples`` is.

A model whose Bayesian layers do not all follow the sampling protocol (or that has none, e.g. an
MC-dropout model) is still handled: each chunk is then ``c`` ordinary forward passes, one sample
each. The results are the same in distribution, only slower; a warning names the layers that
lack support.

With ``group=``, the ranks of a torch.distributed process group split the samples and merge the
statistics exactly; the result is the one a single process gets with ``chunk_seeds=True``
(docs/distributed.md).
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _ops, _sketch, fusion
from . import distributed as _dist
from .sampling import sample_many

__all__ = ["PredictiveResult", "ClassificationResult", "predictive", "predictive_classification"]

_MB = 1 << 20
# On the CPU a chunk's activations are fresh buffers on every pass: with glibc's default malloc,
# chunks with activations of tens of MB paid page faults on every pass (the regression demo,
# 1.2 MB of activations per sample, ran 1.5-4x slower in chunks of 20-50 than of 10). With
# bnn_fast.utils.retain_cpu_memory() the chunk size matters little there (10,000 samples:
# 3.1-3.4 s for chunks of 2 to 50, benchmarks/bench_predictive.py). A 16 MiB working set (the
# largest activation charged twice; chunks of 6 for the demo) is fast either way and small.
_CPU_CHUNK_BYTES = 16 * _MB


@dataclass
class PredictiveResult:
    """What :func:`predictive` returns (``[N, ...]`` is the shape of one model output).

    Attributes:
        mean: ``[N, ...]``, the mean over samples; in the model output's dtype and on its device.
        std: ``[N, ...]``, the population standard deviation over samples (divided by S, not
            S - 1, like ``numpy.std``); same dtype and device.
        quantiles: ``[len(quantiles), N, ...]`` on the CPU, or ``None`` if none were asked for.
        samples: ``[S, N, ...]``, every sampled output, on the CPU, or ``None`` unless
            ``return_samples=True``.
        n_samples: S, the number of samples drawn.
        chunk_size: the number of samples drawn per forward pass.
        quantile_method: ``"exact"`` (:func:`torch.quantile` over all samples), ``"sketch"``
            (a distributed call whose samples exceed the memory budget: the mergeable sketch of
            :mod:`bnn_fast._sketch`), or ``None`` without quantiles.
        quantile_rank_error: with the sketch, the bound e / S on how far the level of each
            returned value may be from the one asked (each value is a sample quantile at a level
            within that distance); 0.0 otherwise.
    """

    mean: Tensor
    std: Tensor
    quantiles: Optional[Tensor]
    samples: Optional[Tensor]
    n_samples: int
    chunk_size: int
    quantile_method: Optional[str] = None
    quantile_rank_error: float = 0.0


@dataclass
class ClassificationResult:
    """What :func:`predictive_classification` returns, for logits of shape ``[N, C, ...]``.

    Entropies are in nats. ``entropy = expected_entropy + mutual_information``: the total
    uncertainty, split into the aleatoric part (the noise each sampled model sees) and the
    epistemic part (the disagreement between sampled models). All are in the logits' dtype and
    on their device.

    Attributes:
        probs: ``[N, C, ...]``, the predictive distribution, E_w[softmax(logits)].
        entropy: ``[N, ...]``, the predictive entropy H(E_w[p]).
        expected_entropy: ``[N, ...]``, E_w[H(p)].
        mutual_information: ``[N, ...]``, entropy - expected_entropy, clamped at 0 (it is >= 0
            in exact arithmetic).
        n_samples: S, the number of samples drawn.
        chunk_size: the number of samples drawn per forward pass.
    """

    probs: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    n_samples: int
    chunk_size: int


def predictive(
    model: nn.Module,
    x: Tensor,
    n_samples: int = 10_000,
    *,
    chunk_size: Optional[int] = None,
    memory_budget_mb: float = 256,
    quantiles: Optional[Union[Sequence[float], Tensor]] = None,
    return_samples: bool = False,
    progress: Optional[bool] = None,
    seed: Optional[int] = None,
    group=None,
    all_ranks: bool = True,
    chunk_seeds: Optional[bool] = None,
) -> Optional[PredictiveResult]:
    r"""The posterior predictive mean and standard deviation of `model` at `x`, from
    `n_samples` weight samples.

    Runs under :func:`torch.no_grad` and leaves the model's mode as it is (call ``model.eval()``
    first if it has batch norm or dropout that should not be in training mode). Mean and variance
    are merged chunk by chunk in float64 with Chan et al.'s parallel formula, which stays accurate
    when the spread is tiny next to the mean.

    Each chunk of ``c`` samples is one forward pass under ``sample_many(c)`` when every Bayesian
    layer of the model declares ``_supports_sampling = True``; otherwise (with a warning naming
    the layers, unless the model has no Bayesian layer at all) it is ``c`` plain forward passes.

    Memory: the device holds one chunk of samples at a time. With `quantiles` or
    `return_samples`, every sampled output is also copied to the CPU (``S * N * ...`` elements
    there), since exact quantiles need all samples.

    Args:
        model (nn.Module): the model; ``model(x)`` must return a tensor ``[N, ...]``.
        x (Tensor): ``[N, ...]``, one input batch (batch first), on the model's device.
        n_samples (int): S >= 1, the number of weight samples. Default: 10000
        chunk_size (int, optional): samples per forward pass. ``None`` picks it from
            `memory_budget_mb`: a first forward pass of one sample measures the output and the
            largest module output (activation), and each sample of a chunk is charged
            ``2 * largest activation + 2 * largest Bayesian layer's parameters (its noise and
            sampled weights) + the output (+ 3 float64 copies for the statistics)`` (only the
            output terms when samples are drawn one pass at a time). A rough estimate of the
            working set, excluding the model and `x` themselves.
        memory_budget_mb (float): the working-set budget in MiB when `chunk_size` is ``None``;
            on the CPU at most 16 MiB are used whatever the budget, since bigger chunks run
            slower there (see :func:`bnn_fast.utils.retain_cpu_memory` too). Default: 256
        quantiles (sequence of float or 1-D Tensor, optional): levels in (0, 1); their values are
            computed with :func:`torch.quantile` (linear interpolation) over the samples.
        return_samples (bool): also return all sampled outputs, ``[S, N, ...]`` on the CPU.
        progress (bool, optional): show a tqdm bar over samples. ``None``: only when stderr is a
            terminal and the run takes more than 4 chunks. Default: ``None``
        seed (int, optional): draw from generators seeded with `seed` (the CPU one and, for a
            CUDA `x`, that device's), restored afterwards. ``None`` uses the global generators,
            so ``torch.manual_seed`` makes the run reproducible.
        group (ProcessGroup or "default", optional): sample-parallel over a torch.distributed
            process group (``"default"``: the default one). Every rank of the group must call
            with the same arguments (checked: a mismatch or a failure on any rank raises on
            every rank); the ranks split the chunk grid (see `chunk_seeds`) and merge their
            float64 statistics with collectives whose size is that of the output, not the
            sample count. With `quantiles`, the samples are gathered for exact quantiles when
            all ``S`` of them fit `memory_budget_mb`, else each rank keeps a mergeable sketch
            (``result.quantile_method`` says which ran). The progress bar shows on rank 0 only.
            See docs/distributed.md. Default: ``None`` (this process only)
        all_ranks (bool): with `group`, every rank receives the result; ``False``: only the
            group's rank 0, the others get ``None``. Default: ``True``
        chunk_seeds (bool, optional): draw on a fixed grid of chunks, each from generators
            seeded with a hash of (`seed`, chunk index), so that sample k does not depend on
            which process draws it: with the same `seed` and chunk size, one process and any
            number of ranks draw the same samples. ``None``: ``True`` with a `group` (where it
            is required), ``False`` without (one generator stream over the whole call, as
            before; the same distribution, other samples). With ``seed=None`` the grid's seed is
            one draw from the default generator (rank 0's, with a group). Default: ``None``

    Returns:
        PredictiveResult (``None`` on ranks other than 0 when ``all_ranks=False``)

    Raises:
        TypeError / ValueError: for an argument of the wrong type or value (the message names it).
        RuntimeError: if the model does not fold the samples as the protocol says (a Bayesian
            layer claims sampling support but its output rows are not ``S*N``).
        bnn_fast.distributed.RankFailed: with a `group`, on the ranks whose own call went
            well when another rank's failed (that rank raises its own error).

    Example::

        r = predictive(model, x_test, 10_000, quantiles=[0.025, 0.975])
        lower, upper = r.quantiles    # a 95% interval around r.mean, each [N, ...]
    """
    q = None

    def check() -> list[int]:
        nonlocal q
        _check_arguments(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed,
                         all_ranks, chunk_seeds)
        q = _check_quantiles(quantiles)
        if not isinstance(return_samples, bool):
            raise TypeError(f"return_samples must be a bool, got {type(return_samples).__name__}")
        levels = hash(tuple(q.tolist())) if q is not None else 0
        return [_ops._to_i64(levels), int(return_samples)]

    comm, base = _begin(group, check, n_samples, chunk_size, memory_budget_mb, seed, all_ranks,
                        chunk_seeds)
    if comm is not None:
        return _predictive_distributed(comm, model, x, n_samples, chunk_size, memory_budget_mb,
                                       progress, base, q, return_samples, all_ranks)

    moments = _Moments()
    keep = q is not None or return_samples
    samples: Optional[Tensor] = None  # [S, N, ...] on the CPU, allocated on the first chunk
    done = 0

    def consume(y: Tensor) -> None:
        nonlocal samples, done
        moments.update(y)
        if keep:
            if samples is None:
                samples = torch.empty((n_samples, *y.shape[1:]), dtype=y.dtype)
            samples[done:done + y.shape[0]].copy_(y)
        done += y.shape[0]

    used_chunk = _stream(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed,
                         consume, base=base)
    mean, std = moments.result()
    return PredictiveResult(
        mean=mean,
        std=std,
        quantiles=_exact_quantiles(samples, q) if q is not None else None,
        samples=samples if return_samples else None,
        n_samples=n_samples,
        chunk_size=used_chunk,
        quantile_method="exact" if q is not None else None,
    )


def _exact_quantiles(samples: Tensor, q: Tensor) -> Tensor:
    """torch.quantile of `samples` ``[S, N, ...]`` over the samples at levels `q`."""
    # torch.quantile takes float32 and float64 only.
    values = samples if samples.dtype in (torch.float32, torch.float64) else samples.float()
    return torch.quantile(values, q.to(values.dtype), dim=0)


def predictive_classification(
    model: nn.Module,
    x: Tensor,
    n_samples: int = 10_000,
    *,
    chunk_size: Optional[int] = None,
    memory_budget_mb: float = 256,
    progress: Optional[bool] = None,
    seed: Optional[int] = None,
    group=None,
    all_ranks: bool = True,
    chunk_seeds: Optional[bool] = None,
) -> Optional[ClassificationResult]:
    r"""The predictive class distribution of a classifier and its uncertainty decomposition, from
    `n_samples` weight samples in one streaming pass.

    ``model(x)`` must return logits ``[N, C, ...]`` with the classes in dimension 1 (as
    :class:`torch.nn.CrossEntropyLoss` takes them); softmax and entropies are computed in float64.
    The arguments are those of :func:`predictive`; with a `group`, each rank's float64 sums
    of the probabilities and of the entropies are summed with one gather.

    Returns:
        ClassificationResult: probs ``[N, C, ...]``; entropy, expected_entropy and
        mutual_information ``[N, ...]`` (``None`` on ranks other than 0 when
        ``all_ranks=False``).
    """
    def check() -> list[int]:
        _check_arguments(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed,
                         all_ranks, chunk_seeds)
        return []

    comm, base = _begin(group, check, n_samples, chunk_size, memory_budget_mb, seed, all_ranks,
                        chunk_seeds)
    sums = _ClassSums()
    if comm is not None:
        return _classification_distributed(comm, model, x, n_samples, chunk_size,
                                           memory_budget_mb, progress, base, sums, all_ranks)
    used_chunk = _stream(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed,
                         sums.update, base=base)
    return sums.result(n_samples, used_chunk)


class _ClassSums:
    """float64 running sums over samples of softmax(logits) [N, C, ...] and of its entropy
    [N, ...]."""

    def __init__(self) -> None:
        self.probs: Optional[Tensor] = None
        self.entropy: Optional[Tensor] = None
        self.dtype: Optional[torch.dtype] = None

    def update(self, y: Tensor) -> None:
        if y.dim() < 3:
            raise ValueError(
                f"predictive_classification: the model must return logits [N, C, ...], got shape "
                f"{tuple(y.shape[1:])}"
            )
        log_p = torch.log_softmax(y.double(), dim=2)  # y is [c, N, C, ...]: classes in dim 2
        p = log_p.exp()
        entropy = -(p * log_p).sum(2)
        if self.probs is None:
            self.probs, self.entropy, self.dtype = p.sum(0), entropy.sum(0), y.dtype
        else:
            self.probs += p.sum(0)
            self.entropy += entropy.sum(0)

    def result(self, n_samples: int, used_chunk: int) -> ClassificationResult:
        return _classification_result(self.probs, self.entropy, self.dtype, n_samples, used_chunk)


def _classification_result(sum_probs: Tensor, sum_entropy: Tensor, dtype: torch.dtype,
                           n_samples: int, used_chunk: int) -> ClassificationResult:
    probs = sum_probs / n_samples
    entropy = -torch.special.xlogy(probs, probs).sum(1)  # xlogy: 0 * log 0 = 0
    expected_entropy = sum_entropy / n_samples
    mutual_information = (entropy - expected_entropy).clamp_min(0)
    return ClassificationResult(
        probs=probs.to(dtype),
        entropy=entropy.to(dtype),
        expected_entropy=expected_entropy.to(dtype),
        mutual_information=mutual_information.to(dtype),
        n_samples=n_samples,
        chunk_size=used_chunk,
    )


# ----------------------------------------------------------------------------------------------
# Distributed


def _begin(group, check: Callable[[], list[int]], n_samples, chunk_size, memory_budget_mb, seed,
           all_ranks, chunk_seeds) -> tuple[Optional[_dist.Comm], Optional[int]]:
    """Checks the arguments (`check` returns the caller's own ints that every rank must agree
    on) and returns (the group's Comm or None, the chunk grid's seed or None for one generator
    stream). With a group, every rank learns whether any rank's arguments are bad or differ,
    and every rank raises then: no rank is left waiting in a collective."""
    group = _dist.resolve_group(group)
    comm = _dist.Comm(group) if group is not None else None
    if comm is None:
        check()
        if not chunk_seeds:
            return None, None
        return None, seed if seed is not None else _ops._plain_new_seed()
    error, own = None, []
    try:
        own = check()
        if chunk_seeds is False:
            raise ValueError("chunk_seeds=False cannot be used with a group: the samples must not "
                             "depend on the rank that draws them")
    except (TypeError, ValueError) as e:
        error = e
    given = seed is not None and error is None
    base = _ops._to_i64(seed) if given else _ops._plain_new_seed()
    budget = int(memory_budget_mb * _MB) if error is None else 0
    # A rank with bad arguments sends zeros (it raises its own error after the exchange).
    row = [] if error is not None else [n_samples, chunk_size or 0, int(given),
                                        base if given else 0, budget, int(all_ranks), *own]
    table = comm.exchange(_pad(row, 16) + [base], error)
    if not bool((table[:, :-1] == table[0, :-1]).all()):
        raise ValueError(
            "predictive: the ranks of the group were called with different arguments (n_samples, "
            "chunk_size, seed, memory_budget_mb, all_ranks, quantiles and return_samples must "
            "agree on every rank)")
    return comm, int(table[0, -1])


def _pad(row: list[int], width: int) -> list[int]:
    if len(row) > width:
        raise AssertionError("predictive: argument row too long")
    return [int(v) for v in row] + [0] * (width - len(row))


# The length of _predictive_distributed's header row: 5 ints and a packed shape.
_HEADER = 5 + len(_dist.pack_shape((), torch.float32))


def _predictive_distributed(comm: _dist.Comm, model, x, n_samples, chunk_size, memory_budget_mb,
                            progress, base, q, return_samples, all_ranks):
    """:func:`predictive` on this rank's share of the chunk grid, merged over the group."""
    moments = _Moments()
    kept: list[Tensor] = []  # this rank's samples on the CPU (exact quantiles, return_samples)
    sketch: Optional[_sketch.QuantileSketch] = None
    method = None  # "exact" or "sketch", decided on the first chunk (the same on every rank)
    local_n = 0

    def consume(y: Tensor) -> None:
        nonlocal sketch, method, local_n
        moments.update(y)
        local_n += y.shape[0]
        if q is None and not return_samples:
            return
        if method is None:
            # Exact when all S samples fit the budget where they are gathered.
            size = n_samples * y[0].numel() * _dist.wire_dtype(y.dtype).itemsize
            method = "exact" if return_samples or size <= memory_budget_mb * _MB else "sketch"
            if method == "sketch":
                sketch = _sketch.QuantileSketch(_sketch.rows_for_budget(
                    n_samples, y[0].numel(), y.element_size(), memory_budget_mb * _MB))
        if method == "exact":
            kept.append(y.cpu())
        else:
            sketch.add(y.reshape(y.shape[0], -1))

    error, used_chunk = None, 0
    try:
        used_chunk = _stream(model, x, n_samples, chunk_size, memory_budget_mb, progress, None,
                             consume, base=base, comm=comm)
    except Exception as e:  # every rank enters the exchange below; all raise there
        error = e
    summary, header = None, []
    if error is None:
        try:
            summary = sketch.summary() if sketch is not None else None
            shape = tuple(moments.mean.shape) if moments.n else ()
            header = [local_n, ["exact", "sketch", None].index(method), used_chunk,
                      summary[0].shape[0] if summary is not None else 0,
                      sketch.rank_error if sketch is not None else 0,
                      *_dist.pack_shape(shape, moments.dtype or torch.float32)]
        except Exception as e:
            error = e
    table = comm.exchange(header or [0] * _HEADER, error)
    counts = table[:, 0].tolist()
    source = next(r for r, n in enumerate(counts) if n > 0)  # the grid has >= 1 sample
    method = ["exact", "sketch", None][int(table[source, 1])]
    used_chunk = int(table[source, 2])
    shape, dtype = _dist.unpack_shape(table[source, 5:].tolist())
    elements = math.prod(shape)

    # Mean and M2: one gather of [n, mean, M2] per rank, merged in rank order in float64.
    packed = torch.zeros(1 + 2 * elements, dtype=torch.float64)
    if local_n:
        packed[0] = local_n
        packed[1:1 + elements] = moments.mean.flatten().cpu()
        packed[1 + elements:] = moments.m2.flatten().cpu()
    gathered = comm.gather(packed, all_ranks)
    samples = quantile_values = None
    rank_error = 0.0
    if method == "exact":
        # This rank's samples, padded to the largest count, gathered and cut in rank order.
        wire = _dist.wire_dtype(dtype)
        rows = torch.zeros((max(counts), elements), dtype=wire)
        if kept:
            rows[:local_n] = torch.cat(kept).reshape(local_n, elements).to(wire)
        everyone = comm.gather(rows, all_ranks)
        if everyone is not None:
            samples = torch.cat([everyone[r, :n].cpu() for r, n in enumerate(counts)])
            samples = samples.to(dtype).reshape(n_samples, *shape)
            if q is not None:
                quantile_values = _exact_quantiles(samples, q)
    elif method == "sketch":
        sizes = table[:, 3].tolist()
        values = torch.zeros((max(sizes), elements), dtype=_dist.wire_dtype(dtype))
        weights = torch.zeros(max(sizes), dtype=torch.float64)  # padding weighs nothing
        if summary is not None:
            values[:sizes[comm.rank]] = summary[0].to(values.dtype)
            weights[:sizes[comm.rank]] = summary[1]
        all_values, all_weights = comm.gather(values, all_ranks), comm.gather(weights, all_ranks)
        if all_values is not None:
            points = torch.cat([all_values[r, :m].cpu() for r, m in enumerate(sizes)])
            point_weights = torch.cat([all_weights[r, :m].cpu() for r, m in enumerate(sizes)])
            quantile_values = _sketch.query(points, point_weights, q).to(dtype)
            quantile_values = quantile_values.reshape(len(q), *shape)
            rank_error = float(table[:, 4].sum()) / n_samples
    if gathered is None:
        return None
    merged = _Moments()
    for r in range(comm.world):
        row = gathered[r].cpu()
        merged.merge(int(row[0]), row[1:1 + elements].reshape(shape).clone(),
                     row[1 + elements:].reshape(shape).clone(), dtype)
    mean, std = merged.result()
    return PredictiveResult(
        mean=mean.to(x.device),
        std=std.to(x.device),
        quantiles=quantile_values,
        samples=samples if return_samples else None,
        n_samples=n_samples,
        chunk_size=used_chunk,
        quantile_method=method if q is not None else None,
        quantile_rank_error=rank_error,
    )


def _classification_distributed(comm: _dist.Comm, model, x, n_samples, chunk_size,
                                memory_budget_mb, progress, base, sums: "_ClassSums", all_ranks):
    """:func:`predictive_classification` on this rank's share of the grid, summed over the group."""
    error, used_chunk, header = None, 0, []
    try:
        used_chunk = _stream(model, x, n_samples, chunk_size, memory_budget_mb, progress, None,
                             sums.update, base=base, comm=comm)
        shape = tuple(sums.probs.shape) if sums.probs is not None else ()
        header = [int(sums.probs is not None), used_chunk,
                  *_dist.pack_shape(shape, sums.dtype or torch.float32)]
    except Exception as e:  # every rank enters the exchange below; all raise there
        error = e
    table = comm.exchange(header or [0] * (_HEADER - 3), error)
    source = int(table[:, 0].nonzero()[0])
    used_chunk = int(table[source, 1])
    shape, dtype = _dist.unpack_shape(table[source, 2:].tolist())
    n_probs, n_entropy = math.prod(shape), math.prod(shape[:1] + shape[2:])
    packed = torch.zeros(n_probs + n_entropy, dtype=torch.float64)
    if sums.probs is not None:
        packed[:n_probs] = sums.probs.flatten().cpu()
        packed[n_probs:] = sums.entropy.flatten().cpu()
    gathered = comm.gather(packed, all_ranks)
    if gathered is None:
        return None
    total = gathered.cpu().sum(0)  # in rank order
    sum_probs = total[:n_probs].reshape(shape).to(x.device)
    sum_entropy = total[n_probs:].reshape(shape[:1] + shape[2:]).to(x.device)
    return _classification_result(sum_probs, sum_entropy, dtype, n_samples, used_chunk)


# ----------------------------------------------------------------------------------------------
# Streaming


class _Moments:
    """Running count, mean and M2 (sum of squared deviations) in float64, merged per chunk with
    Chan et al.'s parallel formula; a chunk's own M2 is taken around its own mean, so no
    catastrophic cancellation of E[y^2] - E[y]^2."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None
        self.dtype: Optional[torch.dtype] = None

    def update(self, y: Tensor) -> None:
        """Merges a chunk ``y`` of shape ``[c, N, ...]``."""
        y64 = y.double()
        mean_b = y64.mean(0)
        self.merge(y.shape[0], mean_b, (y64 - mean_b).square_().sum(0), y.dtype)

    def merge(self, c: int, mean_b: Tensor, m2_b: Tensor, dtype: torch.dtype) -> None:
        """Merges the statistics of `c` more samples: their float64 mean and M2."""
        if c == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2, self.dtype = c, mean_b, m2_b, dtype
            return
        n = self.n + c
        delta = mean_b - self.mean
        self.mean += delta * (c / n)
        self.m2 += m2_b + delta.square_() * (self.n * c / n)
        self.n = n

    def result(self) -> tuple[Tensor, Tensor]:
        """(mean, population std), in the outputs' dtype."""
        return self.mean.to(self.dtype), (self.m2 / self.n).sqrt().to(self.dtype)


def _stream(
    model: nn.Module,
    x: Tensor,
    n_samples: int,
    chunk_size: Optional[int],
    memory_budget_mb: float,
    progress: Optional[bool],
    seed: Optional[int],
    consume: Callable[[Tensor], None],
    base: Optional[int] = None,
    comm: Optional[_dist.Comm] = None,
) -> int:
    """Draws `n_samples` outputs of `model` at `x`, passing each chunk ``[c, N, ...]`` to `consume`
    in order; returns the chunk size used.

    With `base` (an int), on the chunk grid: chunk j is drawn from generators seeded with
    ``mix64(base, j)``; with `comm`, only this rank's share of the grid is drawn (the automatic
    chunk size is the smallest over the ranks, so the grid is the same on every rank).
    Without `base`, from the generators as they are (seeded once with `seed` if given)."""
    batched = _supports_sampling(model)
    # BayesLinear -> ReLU -> BayesLinear runs of an nn.Sequential in one operator (bnn_fast.fusion).
    steps = fusion.plan(model, x) if batched else None
    done = 0
    probe: Optional[Tensor] = None
    rng = _seeded(seed, x.device) if base is None else _grid_rng(base, x.device)
    with torch.no_grad(), _without_salt(), rng as reseed:
        if chunk_size is None:
            error = None
            try:
                # The probe chunk counts as the first sample, so no draw is wasted. It runs the
                # modules one by one (its hooks see every activation) and does not charge the
                # activations that a fused run never writes.
                reseed(0)
                skip = fusion.fused_modules(steps) if steps is not None else set()
                probe, per_sample_bytes = _probe(model, x, batched, skip)
                budget = memory_budget_mb * _MB
                if x.device.type == "cpu":
                    budget = min(budget, _CPU_CHUNK_BYTES)
                chunk_size = max(1, int(budget // per_sample_bytes))
            except Exception as e:  # reported to the other ranks, then raised
                if comm is None:
                    raise
                error = e
            if comm is not None:
                chunk_size = int(comm.exchange([chunk_size or 0], error).min())
        chunk_size = max(1, min(chunk_size, n_samples))
        # The grid: [0, 1) for the probe (if any), then chunks of chunk_size samples.
        first = 0 if probe is None else 1
        n_chunks = first + -(-(n_samples - first) // chunk_size)

        def bounds(j: int) -> tuple[int, int]:
            if j < first:
                return 0, 1
            start = first + (j - first) * chunk_size
            return start, min(start + chunk_size, n_samples)

        mine = range(n_chunks) if comm is None else comm.share(n_chunks)
        total = bounds(mine[-1])[1] - bounds(mine[0])[0] if mine else 0  # mine is contiguous
        show = progress
        if show is None:
            show = sys.stderr.isatty() and total > 4 * chunk_size
        if comm is not None:
            show = show and comm.rank == 0
        desc = "predictive" if comm is None else f"predictive (rank 0 of {comm.world})"
        bar = tqdm(total=total, unit="sample", desc=desc, disable=not show)
        with bar:
            for j in mine:
                if j < first:
                    consume(probe)
                    bar.update(1)
                    continue
                start, end = bounds(j)
                reseed(j)
                consume(_draw(model, x, end - start, batched, bar.update, steps))
    return chunk_size


def _draw(model: nn.Module, x: Tensor, c: int, batched: bool,
          advance: Callable[[int], object] = lambda n: None,
          steps: Optional[list] = None) -> Tensor:
    """``c`` sampled outputs ``[c, N, ...]``: one folded forward pass, or `c` plain ones;
    `advance(n)` is called as every n more samples are drawn. `steps`: a bnn_fast.fusion plan
    of `model` to run instead of ``model(x)``."""
    if not batched:
        samples = []
        for _ in range(c):
            samples.append(_as_output(model(x)))
            advance(1)
        return torch.stack(samples)
    with sample_many(c) as state:
        y = _as_output(model(x) if steps is None else fusion.run(steps, x))
    n = x.shape[0]
    if state.batch is None or y.shape[0] != c * n:
        raise RuntimeError(
            f"under sample_many({c}) the model returned {y.shape[0]} rows for a batch of {n}, "
            f"expected {c}*{n}={c * n}: a layer of {type(model).__name__} does not fold the "
            "sample axis into the batch as bnn_fast.sampling describes"
            + (" (no Bayesian layer called fold_input)" if state.batch is None else "")
        )
    advance(c)
    return y.reshape(c, n, *y.shape[1:])


def _as_output(y) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"the model must return a tensor [N, ...], got {type(y).__name__}")
    if y.dim() == 0:
        raise ValueError("the model must return a tensor [N, ...], got a 0-dim tensor")
    return y


def _probe(model: nn.Module, x: Tensor, batched: bool,
           skip: frozenset = frozenset()) -> tuple[Tensor, int]:
    """One sample ``[1, N, ...]``, and the estimated bytes one more sample of a chunk costs (not
    counting the outputs of the modules in `skip`)."""
    largest = 0

    def record(module, inputs, output):
        nonlocal largest
        if isinstance(output, Tensor) and module not in skip:
            largest = max(largest, output.numel() * output.element_size())

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        y = _draw(model, x, 1, batched)
    finally:
        for handle in handles:
            handle.remove()
    # The output, its float64 copy and a float64 temporary of the statistics.
    per_sample = y.numel() * (y.element_size() + 3 * 8)
    if batched:
        # In one folded pass every activation and every sampled weight is S times bigger.
        weights = max(
            (sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
             for m in _bayesian_modules(model)),
            default=0,
        )
        per_sample += 2 * largest + 2 * weights
    return y, max(per_sample, 1)


def _bayesian_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that sample weights: those declaring ``_supports_sampling`` and those following
    torchbnn's naming (a parameter named ``*log_sigma``)."""
    return [
        m for m in model.modules()
        if hasattr(type(m), "_supports_sampling")
        or any(name.endswith("log_sigma") for name, _ in m.named_parameters(recurse=False))
    ]


def _supports_sampling(model: nn.Module) -> bool:
    """True when every Bayesian module follows bnn_fast.sampling (and there is one)."""
    layers = _bayesian_modules(model)
    lacking = sorted({
        type(m).__name__ for m in layers if not getattr(type(m), "_supports_sampling", False)
    })
    if lacking:
        warnings.warn(
            f"predictive: {', '.join(lacking)} do not support bnn_fast.sampling.sample_many yet; "
            "drawing the samples one forward pass at a time (same results, slower)",
            RuntimeWarning,
            stacklevel=4,
        )
    return bool(layers) and not lacking


@contextmanager
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[Callable[[int], None]]:
    """Seeds the CPU generator (and `device`'s, if CUDA) with `seed`, restoring them on exit.
    Yields a no-op ``reseed(chunk)``: one generator stream serves the whole call."""
    if seed is None:
        yield lambda chunk: None
        return
    with _forked(device) as reseed:
        reseed(seed)
        yield lambda chunk: None


@contextmanager
def _grid_rng(base: int, device: torch.device) -> Iterator[Callable[[int], None]]:
    """Yields ``reseed(chunk)``, which seeds the CPU generator (and `device`'s, if CUDA) with
    ``mix64(base, chunk)``; the generators are restored on exit."""
    with _forked(device) as seed_all:
        yield lambda chunk: seed_all(_ops.mix64(base, chunk) % (1 << 64))


@contextmanager
def _forked(device: torch.device) -> Iterator[Callable[[int], None]]:
    """Forks the CPU generator (and `device`'s, if CUDA); yields a function seeding them all."""
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]

    def seed_all(value: int) -> None:
        torch.default_generator.manual_seed(value)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(value)

    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        yield seed_all


@contextmanager
def _without_salt() -> Iterator[None]:
    """Suspends bnn_fast.distributed.independent_noise: predictive's samples never depend on
    the rank."""
    salt = _ops.set_noise_salt(None)
    try:
        yield
    finally:
        _ops.set_noise_salt(salt)


# ----------------------------------------------------------------------------------------------
# Argument checks


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed,
                     all_ranks=True, chunk_seeds=None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension [N, ...], got a 0-dim tensor")
    if not _is_int(n_samples):
        raise TypeError(f"n_samples must be an int, got {type(n_samples).__name__}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if chunk_size is not None:
        if not _is_int(chunk_size):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not isinstance(memory_budget_mb, numbers.Real) or isinstance(memory_budget_mb, bool):
        raise TypeError(f"memory_budget_mb must be a number, got {type(memory_budget_mb).__name__}")
    if not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    if progress not in (None, True, False):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not isinstance(all_ranks, bool):
        raise TypeError(f"all_ranks must be a bool, got {type(all_ranks).__name__}")
    if chunk_seeds not in (None, True, False):
        raise TypeError(f"chunk_seeds must be True, False or None, got {chunk_seeds!r}")


def _check_quantiles(quantiles) -> Optional[Tensor]:
    """The levels as a 1-D float64 CPU tensor, or None."""
    if quantiles is None:
        return None
    try:
        q = torch.as_tensor(quantiles, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"quantiles must be a sequence of floats or a 1-D tensor, got {quantiles!r}"
        ) from None
    if q.dim() != 1 or q.numel() == 0:
        raise ValueError(f"quantiles must be a non-empty 1-D sequence, got shape {tuple(q.shape)}")
    if not bool(((q > 0) & (q < 1)).all()):
        raise ValueError(f"quantiles must lie in (0, 1), got {q.tolist()}")
    return q
