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
"""
from __future__ import annotations

import numbers
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import fusion
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
    """

    mean: Tensor
    std: Tensor
    quantiles: Optional[Tensor]
    samples: Optional[Tensor]
    n_samples: int
    chunk_size: int


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
) -> PredictiveResult:
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

    Returns:
        PredictiveResult

    Raises:
        TypeError / ValueError: for an argument of the wrong type or value (the message names it).
        RuntimeError: if the model does not fold the samples as the protocol says (a Bayesian
            layer claims sampling support but its output rows are not ``S*N``).

    Example::

        r = predictive(model, x_test, 10_000, quantiles=[0.025, 0.975])
        lower, upper = r.quantiles    # a 95% interval around r.mean, each [N, ...]
    """
    _check_arguments(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed)
    q = _check_quantiles(quantiles)
    if not isinstance(return_samples, bool):
        raise TypeError(f"return_samples must be a bool, got {type(return_samples).__name__}")

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

    used_chunk = _stream(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed, consume)
    mean, std = moments.result()
    quantile_values = None
    if q is not None:
        # torch.quantile takes float32 and float64 only.
        values = samples if samples.dtype in (torch.float32, torch.float64) else samples.float()
        quantile_values = torch.quantile(values, q.to(values.dtype), dim=0)
    return PredictiveResult(
        mean=mean,
        std=std,
        quantiles=quantile_values,
        samples=samples if return_samples else None,
        n_samples=n_samples,
        chunk_size=used_chunk,
    )


def predictive_classification(
    model: nn.Module,
    x: Tensor,
    n_samples: int = 10_000,
    *,
    chunk_size: Optional[int] = None,
    memory_budget_mb: float = 256,
    progress: Optional[bool] = None,
    seed: Optional[int] = None,
) -> ClassificationResult:
    r"""The predictive class distribution of a classifier and its uncertainty decomposition, from
    `n_samples` weight samples in one streaming pass.

    ``model(x)`` must return logits ``[N, C, ...]`` with the classes in dimension 1 (as
    :class:`torch.nn.CrossEntropyLoss` takes them); softmax and entropies are computed in float64.
    The arguments are those of :func:`predictive`.

    Returns:
        ClassificationResult: probs ``[N, C, ...]``; entropy, expected_entropy and
        mutual_information ``[N, ...]``.
    """
    _check_arguments(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed)
    # float64 running sums over samples of softmax(logits) [N, C, ...] and of its entropy [N, ...].
    sum_probs: Optional[Tensor] = None
    sum_entropy: Optional[Tensor] = None
    dtype = None

    def consume(y: Tensor) -> None:
        nonlocal sum_probs, sum_entropy, dtype
        if y.dim() < 3:
            raise ValueError(
                f"predictive_classification: the model must return logits [N, C, ...], got shape "
                f"{tuple(y.shape[1:])}"
            )
        log_p = torch.log_softmax(y.double(), dim=2)  # y is [c, N, C, ...]: classes in dim 2
        p = log_p.exp()
        entropy = -(p * log_p).sum(2)
        if sum_probs is None:
            sum_probs, sum_entropy, dtype = p.sum(0), entropy.sum(0), y.dtype
        else:
            sum_probs += p.sum(0)
            sum_entropy += entropy.sum(0)

    used_chunk = _stream(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed, consume)
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
        c = y.shape[0]
        y64 = y.double()
        mean_b = y64.mean(0)
        m2_b = (y64 - mean_b).square_().sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2, self.dtype = c, mean_b, m2_b, y.dtype
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
) -> int:
    """Draws `n_samples` outputs of `model` at `x`, passing each chunk ``[c, N, ...]`` to `consume`
    in order; returns the chunk size used."""
    batched = _supports_sampling(model)
    # BayesLinear -> ReLU -> BayesLinear runs of an nn.Sequential in one operator (bnn_fast.fusion).
    steps = fusion.plan(model, x) if batched else None
    done = 0
    with torch.no_grad(), _seeded(seed, x.device):
        if chunk_size is None:
            # The probe chunk counts as the first sample, so no draw is wasted. It runs the
            # modules one by one (its hooks see every activation) and does not charge the
            # activations that a fused run never writes.
            skip = fusion.fused_modules(steps) if steps is not None else set()
            y, per_sample_bytes = _probe(model, x, batched, skip)
            consume(y)
            done = 1
            budget = memory_budget_mb * _MB
            if x.device.type == "cpu":
                budget = min(budget, _CPU_CHUNK_BYTES)
            chunk_size = int(budget // per_sample_bytes)
        chunk_size = max(1, min(chunk_size, n_samples))
        show = progress
        if show is None:
            show = sys.stderr.isatty() and n_samples > 4 * chunk_size
        bar = tqdm(total=n_samples, initial=done, unit="sample", desc="predictive",
                   disable=not show)
        with bar:
            while done < n_samples:
                c = min(chunk_size, n_samples - done)
                consume(_draw(model, x, c, batched, bar.update, steps))
                done += c
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
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Seeds the CPU generator (and `device`'s, if CUDA) with `seed`, restoring them on exit."""
    if seed is None:
        yield
        return
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------
# Argument checks


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(model, x, n_samples, chunk_size, memory_budget_mb, progress, seed) -> None:
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
