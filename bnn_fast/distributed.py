r"""bnn_fast on torch.distributed: sample-parallel prediction and per-rank weight noise for
data-parallel training. docs/distributed.md has the full story (collectives, scaling, torchrun).

- :func:`bnn_fast.predictive.predictive` and :func:`~bnn_fast.predictive.predictive_classification`
  take ``group=`` (a process group, or ``"default"``): the ranks split a fixed grid of sample
  chunks and merge their float64 statistics with collectives; the result does not depend on the
  number of processes (up to float64 summation order).
- Under :class:`~torch.nn.parallel.DistributedDataParallel` the ranks draw the same weight noise
  when their generators are seeded alike (as torchbnn does); :class:`independent_noise` makes each
  rank draw its own, so the averaged gradient is a multi-sample estimate.

The helpers below (``Comm``) are what predictive uses; every collective is entered by every rank,
including a rank that has no sample to draw or that failed (it reports the failure through the
collective instead of leaving the others waiting).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _ops

__all__ = ["independent_noise", "resolve_group"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("bnn_fast.distributed: this torch build has no torch.distributed")
    return dist


def resolve_group(group, caller: str = "predictive"):
    """`group` as a process group: ``None`` stays ``None``; ``"default"`` is the default group
    (``torch.distributed`` must be initialized); a ``ProcessGroup`` is checked for membership.

    Raises:
        TypeError: for any other value.
        RuntimeError: when torch.distributed is not initialized, or this process is not a member.
    """
    if group is None:
        return None
    dist = _dist()
    if isinstance(group, str):
        if group != "default":
            raise ValueError(f'{caller}: group must be a ProcessGroup, "default" or None, got {group!r}')
        if not dist.is_initialized():
            raise RuntimeError(
                f'{caller}: group="default" needs torch.distributed.init_process_group() first')
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f'{caller}: group must be a ProcessGroup, "default" or None, got {type(group).__name__}')
    if not dist.is_initialized():
        raise RuntimeError(f"{caller}: torch.distributed is not initialized")
    if dist.get_rank(group) < 0:
        raise RuntimeError(f"{caller}: this process (rank {dist.get_rank()}) is not in the group")
    return group


class RankFailed(RuntimeError):
    """Raised on the other ranks when one rank of a distributed call failed (that rank raises
    its own error)."""


class Comm:
    """One process group as predictive uses it: its rank and size, the device its collectives
    take (CUDA for NCCL, the CPU otherwise), and the few collectives predictive needs."""

    def __init__(self, group) -> None:
        dist = _dist()
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
                       else torch.device("cpu"))

    def share(self, n_chunks: int) -> range:
        """The chunks of the global grid this rank draws: a contiguous block, the blocks in rank
        order (so the gathered samples come in sample order)."""
        return range(n_chunks * self.rank // self.world, n_chunks * (self.rank + 1) // self.world)

    def all_gather(self, tensor: Tensor) -> Tensor:
        """``[world, *tensor.shape]``: every rank's `tensor` (same shape and dtype on every rank)."""
        tensor = tensor.to(self.device).contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        self.dist.all_gather(out, tensor, group=self.group)
        return torch.stack(out)

    def gather(self, tensor: Tensor, all_ranks: bool) -> Optional[Tensor]:
        """Like :meth:`all_gather`, or only to the group's rank 0 (``None`` elsewhere)."""
        if all_ranks:
            return self.all_gather(tensor)
        tensor = tensor.to(self.device).contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world)] if self.rank == 0 else None
        self.dist.gather(tensor, out, group=self.group, group_dst=0)
        return torch.stack(out) if out is not None else None

    def exchange(self, row: Sequence[int], error: Optional[BaseException] = None,
                 caller: str = "predictive") -> Tensor:
        """All ranks' int64 `row` ``[world, len(row)]``, after an error check: if any rank passed
        an `error`, every rank raises (that rank its own error, the others :class:`RankFailed`)."""
        status = 0 if error is None else 1
        table = self.all_gather(torch.tensor([status, *row], dtype=torch.int64)).cpu()
        failed = table[:, 0].nonzero().flatten().tolist()
        if failed:
            if error is not None:
                raise error
            raise RankFailed(f"{caller}: rank(s) {failed} of the process group failed (see their "
                             "errors); no result")
        return table[:, 1:]


def pack_shape(shape: Sequence[int], dtype: torch.dtype, slots: int = 16) -> list[int]:
    """A tensor's shape and dtype as ints for :meth:`Comm.exchange`."""
    if len(shape) > slots:
        raise ValueError(f"predictive: outputs of more than {slots} dimensions are not supported")
    return [len(shape), *shape, *([0] * (slots - len(shape))), _DTYPES.index(dtype)]


def unpack_shape(row: Sequence[int]) -> tuple[tuple[int, ...], torch.dtype]:
    ndim = int(row[0])
    return tuple(int(v) for v in row[1:1 + ndim]), _DTYPES[int(row[-1])]


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
           torch.complex128, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
           torch.bool]


def wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype samples travel in: their own when gloo and NCCL both reduce/gather it exactly,
    else float32 (which holds float16 and bfloat16 values exactly)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class independent_noise:
    r"""Makes every rank of `group` draw its own weight noise (or, with ``enabled=False``, the
    same noise again). Takes effect when called, like :func:`torch.set_grad_enabled`; used as a
    context manager, the previous setting comes back on exit.

    By default, processes whose generators are seeded alike (``torch.manual_seed(s)`` on every
    rank, torchbnn's behaviour under DDP) draw identical weights on every forward pass, so the
    gradient DDP averages is a one-sample estimate. Under this setting each layer's seed (still
    drawn from the default generator, which advances as before, so everything else stays in step
    across ranks) is mixed with the rank: rank r's noise is its own, and the averaged gradient
    is a ``world_size``-sample estimate of the expected gradient.

    Applies to the compiled kernels' counter-based noise (every estimator, fused or not). Frozen
    layers keep their fixed noise, and the pure-PyTorch path (no compiled extension) draws with
    ``torch.randn`` and is not affected (a warning says so). :func:`bnn_fast.predictive.predictive`
    ignores the setting (its samples never depend on the rank).

    Args:
        group: a process group or ``"default"`` (the default group). Default: ``"default"``
        enabled (bool): ``True``: per-rank noise; ``False``: the same noise on every rank.

    Example::

        bnn_fast.distributed.independent_noise()        # from here on, for the whole run
        with bnn_fast.distributed.independent_noise():  # or for a block
            loss = criterion(ddp_model(x), y) + kl_weight * kl_loss(model)
    """

    def __init__(self, group="default", enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"independent_noise: enabled must be a bool, got {enabled!r}")
        salt = None
        if enabled:
            resolved = resolve_group(group, "independent_noise")
            if resolved is None:
                raise ValueError('independent_noise: group must be a ProcessGroup or "default"')
            if not _ops.use_kernels():
                warnings.warn("independent_noise: the compiled kernels are not in use; the "
                              "pure-PyTorch path draws the same noise on every rank",
                              RuntimeWarning, stacklevel=2)
            salt = _dist().get_rank(resolved) + 1
        self._previous = _ops.set_noise_salt(salt)

    def __enter__(self) -> "independent_noise":
        return self

    def __exit__(self, *exc) -> None:
        _ops.set_noise_salt(self._previous)
