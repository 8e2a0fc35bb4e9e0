r"""A mergeable quantile sketch over many samples of a tensor, with a deterministic rank-error bound.

Used by a distributed :func:`bnn_fast.predictive.predictive` when the samples of every rank do not
fit the memory budget (docs/distributed.md). It is the buffer hierarchy of Manku, Rajagopalan and
Lindsay (1998), run on every output element at once:

- samples arrive in rows ``[c, E]`` (E output elements) and collect in a base buffer of weight 1;
- every ``k`` rows become a sorted buffer of level 0 (each element's column sorted on its own);
- two buffers of level l (weight ``2^l``) are merged (sorted) and every other row kept, from an
  offset that alternates, into one buffer of level l + 1 (weight ``2^(l+1)``).

Every row of a buffer has the same weight, so one weight per buffer row serves all E elements.

Error bound. For any value v, let ``W(<v)`` and ``W(<=v)`` be the summed weights of the sketch's
points below (at most) v, and ``R(<v)``, ``R(<=v)`` the true counts among the samples. A base
buffer and a plain union of sketches change no count; one compaction of 2k points of weight w
keeps ``floor(r/2)`` or ``ceil(r/2)`` of the r points at most v, so it moves each count by at most
w. Summing over the compactions, ``|W - R| <= e`` with ``e = sum of the weights w of all
compactions``, which the sketch counts exactly (:attr:`rank_error`). The query for level q returns
the smallest point v with ``W(<=v) >= q n``; then ``R(<v) < q n + e`` and ``R(<=v) >= q n - e``:
v is a true sample quantile at a level within ``e / n`` of q. With n samples,
``e <= n * log2(n / k) / (2 k)`` (each level's compactions add at most n / (2k)); merging sketches
adds their errors. Memory: ``k`` rows per level, about ``log2(n / k) + 2`` levels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class QuantileSketch:
    """Streams rows ``[c, E]`` (:meth:`add`) into a summary of weighted points (:meth:`summary`).

    Args:
        k: rows per buffer (the accuracy knob: ``e / n <= log2(n / k) / (2k)``).
    """

    def __init__(self, k: int) -> None:
        if k < 2:
            raise ValueError(f"QuantileSketch: k must be >= 2, got {k}")
        self.k = k
        self.n = 0
        self.rank_error = 0  # e, in samples
        self._base: list[Tensor] = []
        self._base_rows = 0
        self._levels: list[Optional[Tensor]] = []
        self._offsets: list[int] = []

    def add(self, rows: Tensor) -> None:
        """Adds c samples of E elements: ``rows`` is ``[c, E]``."""
        self.n += rows.shape[0]
        self._base.append(rows)
        self._base_rows += rows.shape[0]
        if self._base_rows < self.k:
            return
        base = torch.cat(self._base)
        full = (base.shape[0] // self.k) * self.k
        for start in range(0, full, self.k):
            self._push(base[start:start + self.k].sort(0).values, 0)
        rest = base[full:]
        self._base = [rest.clone()] if rest.shape[0] else []
        self._base_rows = rest.shape[0]

    def _push(self, buffer: Tensor, level: int) -> None:
        while True:
            if level == len(self._levels):
                self._levels.append(None)
                self._offsets.append(0)
            if self._levels[level] is None:
                self._levels[level] = buffer
                return
            merged = torch.cat([self._levels[level], buffer]).sort(0).values
            offset = self._offsets[level]
            self._offsets[level] ^= 1
            self._levels[level] = None
            buffer = merged[offset::2]
            self.rank_error += 1 << level
            level += 1

    def summary(self) -> tuple[Tensor, Tensor]:
        """(values ``[M, E]``, weights ``[M]`` float64): the sketch's points."""
        values, weights = [], []
        for rows in self._base:
            values.append(rows)
            weights.append(torch.ones(rows.shape[0], dtype=torch.float64))
        for level, buffer in enumerate(self._levels):
            if buffer is not None:
                values.append(buffer)
                weights.append(torch.full((buffer.shape[0],), float(1 << level), dtype=torch.float64))
        return torch.cat(values), torch.cat(weights)


def query(values: Tensor, weights: Tensor, q: Tensor) -> Tensor:
    """For each level of ``q`` and each element, the smallest point v with summed weight of the
    points at most v reaching ``q * sum(weights)``: ``[len(q), E]``, in `values`' dtype.

    `values` ``[M, E]`` and `weights` ``[M]`` may be the union of several sketches' summaries."""
    order = values.sort(0)
    cumulative = weights[order.indices].cumsum(0).T.contiguous()  # [E, M], rising along M
    target = (q.to(torch.float64) * weights.sum()).expand(cumulative.shape[0], -1).contiguous()
    # The first row whose cumulative weight reaches the target is v's.
    row = torch.searchsorted(cumulative, target).clamp_max(values.shape[0] - 1)  # [E, Q]
    return order.values.gather(0, row.T)


def rows_for_budget(n: int, elements: int, item_bytes: int, budget_bytes: float) -> int:
    """The largest k (at least 2) whose sketch of n samples of `elements` values of
    `item_bytes` bytes stays within `budget_bytes`."""
    k = max(2, int(budget_bytes // max(1, elements * item_bytes)))
    while k > 2:
        levels = max(1, (max(n, 1) // k).bit_length()) + 2
        if k * levels * elements * item_bytes <= budget_bytes:
            break
        k = max(2, k * 3 // 4)
    return k
