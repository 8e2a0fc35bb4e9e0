"""Model-level helpers: freezing the noise of Bayesian layers and swapping layer types; the CPU
allocator setting that many-sample inference runs best under.

Laid out as torchbnn's ``utils`` package, so that its import paths resolve here too:
``utils.freeze_model`` (:func:`freeze`, :func:`unfreeze`) and ``utils._convert_model``
(:func:`nonbayes_to_bayes`, :func:`bayes_to_nonbayes`)."""
import copy
import ctypes
import sys

import torch

from ..conversion import _replace
from . import _convert_model, freeze_model
from .freeze_model import freeze, unfreeze

__all__ = ["freeze", "unfreeze", "transform_model", "retain_cpu_memory", "cpu_cache_info", "release_cpu_cache"]


def _resolve(layer, key, value):
    """`value`, or the old layer's attribute it names when it is a string starting with '.'."""
    if not (isinstance(value, str) and value.startswith(".")):
        return value
    value = getattr(layer, value[1:])
    # torch layers hold their bias as a tensor or None, but constructors take a bool.
    if key == "bias" and (value is None or isinstance(value, torch.Tensor)):
        return value is not None
    return value


def transform_model(model, from_inst, to_inst, args={}, attrs={}, inplace=True):
    r"""Replaces every submodule of `model` that is an instance of `from_inst` by a new `to_inst`.

    Each new layer is built as ``to_inst(**kwargs)``, where `kwargs` is `args` with every string
    value that starts with ``"."`` replaced by that attribute of the layer being replaced (a
    tensor-or-None ``.bias`` becomes a bool for the ``bias`` argument); then each `attrs` item is
    set on the new layer with :func:`setattr`, by the same rule. Replaced layers are not searched
    further, the new layers start untrained (weights are not copied), and a layer shared by
    several parents is replaced by one new layer, still shared.

    Args:
        model (nn.Module): the model to transform; if it is itself a `from_inst`, the new layer is
            returned in its place.
        from_inst (type or tuple of types): the layer class(es) to replace.
        to_inst (callable): the class (or factory) of the new layers.
        args (dict, optional): keyword arguments of `to_inst`.
        attrs (dict, optional): attributes to set on each new layer.
        inplace (bool, optional): if ``False``, `model` is left as it is and a transformed deep
            copy is returned. Default: ``True``

    Returns:
        The transformed model.

    Example::

        >>> model = transform_model(model, nn.Linear, BayesLinear,
        ...     args={"prior_mu": 0, "prior_sigma": 0.1, "in_features": ".in_features",
        ...           "out_features": ".out_features", "bias": ".bias"})
    """
    if not inplace:
        model = copy.deepcopy(model)

    def build(layer):
        result = to_inst(**{key: _resolve(layer, key, value) for key, value in args.items()})
        for key, value in attrs.items():
            setattr(result, key, _resolve(layer, key, value))
        return result

    return _replace(model, lambda m: isinstance(m, from_inst), build, {})


def cpu_cache_info() -> tuple[int, int]:
    r"""Bytes of bnn_fast's cache of large CPU buffers: ``(in_use, cached)``.

    CPU buffers of 128 KiB and up take their memory from a cache of mmap'd blocks that earlier
    buffers gave back when freed, so a loop does not pay page faults to map fresh memory on every
    pass, and kept small tensors cannot fragment malloc's heap around large ones (see
    docs/design.md, "CPU memory"). The kernels' outputs always use it; PyTorch's own tensors do
    too, through the CPU allocator bnn_fast installs at import (unless
    ``BNN_FAST_CPU_ALLOCATOR=0``). ``in_use`` counts the blocks held by live tensors, ``cached``
    the free blocks kept for reuse, at most ``BNN_FAST_CPU_CACHE_MB`` (default 512; 0 turns the
    cache off). Both are 0 when the compiled extension is not loaded.
    """
    from .. import _ops

    if not _ops.extension_loaded():
        return 0, 0
    from .. import _C

    in_use, cached = _C.cpu_cache_info()
    return int(in_use), int(cached)


def release_cpu_cache() -> None:
    """Frees the cached free blocks of :func:`cpu_cache_info` (blocks held by live tensors are
    unaffected; they return to the cache when freed, up to its limit)."""
    from .. import _ops

    if _ops.extension_loaded():
        from .. import _C

        _C.release_cpu_cache()


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def retain_cpu_memory() -> bool:
    r"""Makes glibc's malloc keep freed CPU memory for reuse instead of returning it to the system.

    PyTorch's CPU tensors come from malloc, which serves large blocks with fresh pages and gives
    freed ones back to the system, so a loop that allocates and frees the same large activations
    pays a page fault per 4 KiB page on every pass. On the development machine (2 vCPUs) this
    made the seed article's 10,000-sample prediction 1.5-4x slower and erratic, for torchbnn's
    loop as for :func:`bnn_fast.predictive` (``benchmarks/bench_predictive.py``).
    This sets ``M_MMAP_THRESHOLD`` to 32 MiB (blocks below it come from the heap) and
    ``M_TRIM_THRESHOLD`` to 2 GiB (the heap is not trimmed), the effect of preloading jemalloc or
    tcmalloc, as PyTorch's CPU performance guide recommends. It is process-wide and lasts until
    the process ends: memory that was freed stays with the process (its resident size stays at
    its peak). bnn_fast never calls it on its own; the regression example and the benchmarks do.

    Returns:
        bool: True if the setting was applied (Linux with glibc), False otherwise.
    """
    return _mallopt(_M_MMAP_THRESHOLD, 32 << 20) and _mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)


def _mallopt(parameter: int, value: int) -> bool:
    """glibc's mallopt(parameter, value); False where it is unavailable or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(parameter, value))
