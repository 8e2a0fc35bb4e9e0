"""The operator layer: loads the compiled kernels (bnn_fast._C) when present, registers their
fake (meta) implementations and autograd formulas, and falls back to bnn_fast.reference when the
extension is missing, broken, or disabled with BNN_FAST_FORCE_REFERENCE=1.

CPU and CUDA: what is bit-identical. The noise is: ``normal(seed, stream, index)`` gives the same
float32 bits on the CPU (scalar, AVX2, AVX-512) and on CUDA, since both run the same non-
contracting Box-Muller polynomials (csrc/box_muller.h), whatever the thread count or launch shape.
What is computed from it is not: a sampled weight ``mu + exp(log_sigma) * eps`` uses CUDA's expf
(not the CPU kernels' exp) and nvcc contracts multiply-adds into FMAs, so sampled weights and
layer outputs agree to float rounding (a few ulp per element, then the matmul's own summation
order), not bit for bit; gaussian_kl sums in 8192-element chunks on CUDA and in the CPU kernel's
own order, so the two sums agree to rounding. Each device is deterministic on its own: the same
call gives the same bits on every run.
"""
from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference

__all__ = [
    "backend", "BackendInfo", "extension_loaded", "use_kernels", "reference_path", "kernel_dtype",
    "gaussian_kl", "normal", "bayes_linear", "bayes_linear_local", "bayes_linear_flipout", "new_seed",
    "bayes_mlp_inference", "bayes_mlp", "has_kernel", "sample_gaussian",
]

_U64 = 1 << 64


@dataclass(frozen=True)
class BackendInfo:
    """Which implementation bnn_fast runs, and why.

    name: "cuda" (C++ and CUDA kernels compiled), "cpp" (C++ kernels only) or "reference"
    (pure PyTorch). cpp / cuda_compiled: what the extension holds. cuda_available: whether a GPU
    is usable now. reason: a sentence on why this backend was chosen.
    """

    name: str
    cpp: bool
    cuda_compiled: bool
    cuda_available: bool
    reason: str

    def __str__(self) -> str:
        return (
            f"bnn_fast backend: {self.name} (C++ kernels: {'yes' if self.cpp else 'no'}, CUDA kernels "
            f"compiled: {'yes' if self.cuda_compiled else 'no'}, GPU available: "
            f"{'yes' if self.cuda_available else 'no'}) - {self.reason}"
        )


def _load() -> tuple[bool, str]:
    if os.environ.get("BNN_FAST_FORCE_REFERENCE", "").strip() not in ("", "0"):
        return False, "BNN_FAST_FORCE_REFERENCE is set: using the pure-PyTorch reference path"
    try:
        from . import _C  # noqa: F401  (importing it registers the operators)
    except ImportError as exc:
        msg = f"the compiled extension bnn_fast._C is not available ({exc}); using the pure-PyTorch path"
        warnings.warn(f"bnn_fast: {msg}. Build it with `python setup.py build_ext --inplace`.", RuntimeWarning, stacklevel=3)
        return False, msg
    except Exception as exc:  # a broken build must not break `import bnn_fast`
        msg = f"the compiled extension bnn_fast._C failed to load ({type(exc).__name__}: {exc}); using the pure-PyTorch path"
        warnings.warn(f"bnn_fast: {msg}", RuntimeWarning, stacklevel=3)
        return False, msg
    return True, "compiled extension loaded"


_LOADED, _REASON = _load()


def _install_cpu_allocator() -> bool:
    """Routes PyTorch's CPU allocations of 128 KiB and up through bnn_fast's block cache
    (csrc/cpu/memory.h), unless BNN_FAST_CPU_ALLOCATOR=0: with glibc's malloc, a loop that keeps
    small outputs among large short-lived activations (the seed article's prediction loop) leaves
    every freed activation as a hole that small allocations split, and the heap grows by about
    the activation's size per pass, paying fresh page faults each time."""
    if not _LOADED or os.environ.get("BNN_FAST_CPU_ALLOCATOR", "").strip() == "0":
        return False
    from . import _C

    return bool(_C.install_cpu_allocator())


_CPU_ALLOCATOR = _install_cpu_allocator()


class _ThreadState(threading.local):
    # A class-level default: reading an attribute a thread never set is then a plain lookup,
    # not getattr's AttributeError path (about 1 us; this is read on every layer's forward).
    reference = False


_local = _ThreadState()


def extension_loaded() -> bool:
    """True when the compiled kernels are registered."""
    return _LOADED


def use_kernels() -> bool:
    """True when the compiled kernels run now: loaded, and not inside :func:`reference_path`."""
    return _LOADED and not _local.reference


@contextmanager
def reference_path():
    """Runs the pure-PyTorch path in this block (on this thread), whatever is compiled.

    On that path an unfrozen layer draws its noise with ``torch.randn_like`` in torchbnn's order,
    so under the same ``torch.manual_seed`` it reproduces torchbnn's outputs bit for bit.
    """
    before = _local.reference
    _local.reference = True
    try:
        yield
    finally:
        _local.reference = before


def backend() -> BackendInfo:
    """Report the active implementation (see BackendInfo)."""
    cuda_compiled = has_kernel("bayes_linear", "cuda")
    cuda_available = torch.cuda.is_available()
    if not _LOADED:
        name = "reference"
    else:
        name = "cuda" if cuda_compiled else "cpp"
    return BackendInfo(name, _LOADED, bool(cuda_compiled), cuda_available, _REASON)


def kernel_dtype(input: Tensor, weight: Tensor) -> Optional[torch.dtype]:
    """The dtype a fused Bayesian-linear kernel runs in for `input` and `weight`, or None when
    the pure-PyTorch path must run (kernels not in use, a device without compiled kernels, a dtype
    they lack).

    Under CUDA autocast the kernel runs in the autocast dtype (float16/bfloat16, float32
    accumulation), except for float64, which autocast never casts (as for nn.Linear); on the CPU
    it supports float32 and float64, in the parameters' dtype. A device counts only where the
    operator has a kernel for it: a C++-only build on a CUDA machine (nvcc missing, or
    BNN_FAST_NO_CUDA=1) sends CUDA tensors to the pure-PyTorch path, not to the dispatcher's
    NotImplementedError. (Called on every forward of every layer: few and cheap steps, the common
    case first.)
    """
    if not _LOADED or _local.reference:
        return None
    if input.is_cuda:
        if not _KERNELS[("bayes_linear", "cuda")]:
            return None
        if torch.is_autocast_enabled("cuda") and torch.float64 not in (input.dtype, weight.dtype):
            return torch.get_autocast_dtype("cuda")
        dtypes = _CUDA_DTYPES
    elif input.is_cpu:
        if not _KERNELS[("bayes_linear", "cpu")] or torch.is_autocast_enabled("cpu"):
            return None  # CPU autocast means bfloat16/float16 matmuls: leave them to PyTorch
        dtypes = _CPU_DTYPES
    else:
        return None
    dtype = weight.dtype
    # A dtype mismatch goes to PyTorch, which raises its usual error.
    return dtype if input.dtype == dtype and dtype in dtypes else None


_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled operator bnn_fast::`op` has a kernel for `device_type` ("cpu",
    "cuda"); False without the extension. (A table made at import: a plain lookup, which
    torch.compile traces without a graph break or a warning.)"""
    return _KERNELS.get((op, device_type), False)


def _kernel_table() -> dict:
    ops = ("bayes_linear", "bayes_linear_inference", "bayes_linear_local", "bayes_linear_flipout",
           "bayes_mlp_inference", "bayes_mlp", "gaussian_kl", "fill_normal_", "sample_gaussian")
    return {(op, device): _LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"bnn_fast::{op}", key)
            for op in ops for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


_KERNELS = _kernel_table()

# sample_gaussian's compiled operator (taken once: the wrapper runs on every layer's forward) and
# the dtypes its kernels take, by device type.
_sample_op = torch.ops.bnn_fast.sample_gaussian.default if _LOADED else None
_SAMPLE_DTYPES = {"cpu": _CPU_DTYPES, "cuda": _CUDA_DTYPES}


def _to_i64(v: int) -> int:
    """A uint64 as the int64 with the same bits (the schemas take int, which is int64)."""
    v %= _U64
    return v - _U64 if v >= 1 << 63 else v


def new_seed() -> int:
    """A fresh 64-bit seed (an int64) from PyTorch's default CPU generator: torch.manual_seed
    makes it reproducible, and there is no GPU synchronization.

    With the compiled extension this is ``bnn_fast._C.new_seed``, which reads 64 bits from the
    generator without making a tensor (0.3 us against 3 us for ``torch.randint(...).item()``).
    Being a C function, it is never traced by torch.compile: in a compiled function the draw is
    a graph break and runs eagerly, so a compiled model draws the same weights as the same model
    run eagerly under the same seed (traced, the draw would come from inductor's generator).
    Without the extension (where the layers never call it) it is that ``torch.randint`` draw.
    """
    return int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64).item())


if _LOADED:
    from . import _C as _c_module

    new_seed = _c_module.new_seed  # noqa: F811


def mix64(a: int, b: int) -> int:
    """A 64-bit hash of the pair (a, b) (SplitMix64's finalizer over a + (b + 1) * golden ratio),
    as an int64: derives seeds from seeds without consuming any generator."""
    z = (a + (b + 1) * 0x9E3779B97F4A7C15) % _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % _U64
    return _to_i64(z ^ (z >> 31))


# Set through set_noise_salt (bnn_fast.distributed.independent_noise): every seed a layer draws is
# mixed with it, so that processes whose generators are in the same state draw different noise.
# None: off.
noise_salt: Optional[int] = None
_plain_new_seed = new_seed


def _salted_new_seed() -> int:
    return mix64(_plain_new_seed(), noise_salt)


def set_noise_salt(salt: Optional[int]) -> Optional[int]:
    """Sets the salt every new_seed() draw is mixed with (None: off) and returns the previous
    one. While it is off, new_seed stays the bare draw (the C function with the extension), so
    the layers pay nothing for the option; the generator advances the same either way. The
    salted draw is a Python function, kept out of torch.compile's tracing as the C draw is (this
    imports torch._dynamo, once, when a salt is first set)."""
    global noise_salt, new_seed
    previous, noise_salt = noise_salt, salt
    new_seed = _plain_new_seed if salt is None else torch.compiler.disable(_salted_new_seed)
    return previous


# ----------------------------------------------------------------------------------------------
# gaussian_kl


def gaussian_kl(mus: Sequence[Tensor], log_sigmas: Sequence[Tensor], prior_mu: float, prior_log_sigma: float,
                *, validate: bool = True) -> Tensor:
    """Summed closed-form KL(N(mu, exp(log_sigma)^2) || N(prior_mu, exp(prior_log_sigma)^2)) over
    every element of every tensor; differentiable in mus and log_sigmas.

    Args:
        mus, log_sigmas: equally long lists of tensors of equal shapes pairwise, one dtype
            (float32 or float64) and one device for all.
        prior_mu, prior_log_sigma: the prior's mean and log standard deviation (floats).
        validate: check the arguments in Python first (errors naming mus[i] / log_sigmas[i]).
            ``False`` skips that when the compiled operator runs (it checks them itself, with
            messages naming mu[i] / log_sigma[i]): for callers that pass a layer's own
            parameters on every training step.
    Returns:
        a 0-dim tensor of the tensors' dtype and device (float32 CPU zero for empty lists).
    """
    if not validate and mus and use_kernels() and has_kernel("gaussian_kl", mus[0].device.type):
        return torch.ops.bnn_fast.gaussian_kl(mus, log_sigmas, float(prior_mu), float(prior_log_sigma))
    mus, log_sigmas = list(mus), list(log_sigmas)
    if len(mus) != len(log_sigmas):
        raise ValueError(f"gaussian_kl: mus and log_sigmas must have the same length, got {len(mus)} and {len(log_sigmas)}")
    if not mus:
        return torch.zeros(())
    ref = mus[0]
    for i, (m, s) in enumerate(zip(mus, log_sigmas)):
        for name, t in ((f"mus[{i}]", m), (f"log_sigmas[{i}]", s)):
            if not isinstance(t, Tensor):
                raise TypeError(f"gaussian_kl: {name} must be a Tensor, got {type(t).__name__}")
            if t.dtype != ref.dtype:
                raise TypeError(f"gaussian_kl: {name} has dtype {t.dtype}, expected {ref.dtype} like mus[0]")
            if t.device != ref.device:
                raise ValueError(f"gaussian_kl: {name} is on {t.device}, expected {ref.device} like mus[0]")
        if m.shape != s.shape:
            raise ValueError(f"gaussian_kl: log_sigmas[{i}] must have the shape of mus[{i}] {tuple(m.shape)}, got {tuple(s.shape)}")
    if ref.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gaussian_kl: mus[0] must be float32 or float64, got {ref.dtype}")
    if use_kernels() and has_kernel("gaussian_kl", ref.device.type):
        return torch.ops.bnn_fast.gaussian_kl(mus, log_sigmas, float(prior_mu), float(prior_log_sigma))
    return reference.gaussian_kl(mus, log_sigmas, prior_mu, prior_log_sigma)


# ----------------------------------------------------------------------------------------------
# Counter-based noise


def normal(
    shape: Sequence[int],
    seed: int,
    stream: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    offset: int = 0,
) -> Tensor:
    """Standard normal noise of the counter-based RNG contract.

    Element i (flat, row-major) is normal(seed, stream, offset + i): a pure function of the
    integers, computed in float32 and cast to `dtype`; bit-identical on every thread count and
    launch shape, and between CPU and CUDA (see the module docstring for what is not).
    `seed` and `stream` are taken modulo 2^64.

    Shape: `shape`.
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"normal: shape must be non-negative, got {shape}")
    if offset < 0:
        raise ValueError(f"normal: offset must be >= 0, got {offset}")
    if not dtype.is_floating_point:
        raise TypeError(f"normal: dtype must be a floating-point dtype, got {dtype}")
    device = torch.device(device)
    if use_kernels() and has_kernel("fill_normal_", device.type):
        out = torch.empty(shape, dtype=dtype, device=device)
        torch.ops.bnn_fast.fill_normal_(out, _to_i64(seed), _to_i64(stream), int(offset))
        return out
    return reference.normal(shape, seed % _U64, stream % _U64, dtype, device, offset)


# ----------------------------------------------------------------------------------------------
# sample_gaussian: reparameterized samples of a parameter of any shape


def sample_gaussian(
    mu: Optional[Tensor],
    log_sigma: Tensor,
    seed: int,
    stream: int = 0,
    n_samples: int = 1,
) -> Tensor:
    """`n_samples` reparameterized samples of a Gaussian parameter of any shape, differentiable in
    `mu` and `log_sigma`: ``out[s] = mu + exp(log_sigma) * eps_s`` with
    ``eps_s.flatten()[j] = normal(seed, stream, s * numel + j)`` (the RNG contract, as
    :func:`bayes_linear` samples its weight). A `mu` of None gives the perturbation
    ``exp(log_sigma) * eps_s`` alone.

    The backward, ``grad_mu = sum_s g_s`` and ``grad_log_sigma = sum_s g_s * exp(log_sigma) *
    eps_s``, regenerates eps from ``(seed, stream)``: nothing but `log_sigma` is kept for
    autograd. With the extension, the compiled operator ``bnn_fast::sample_gaussian`` runs (CPU:
    float32 and float64; CUDA: float16 and bfloat16 too); otherwise the reference twin over the
    same noise.

    Shape:
        mu, log_sigma: ``[*]`` (equal shapes, dtypes and devices). Output: ``[n_samples, *]``.
    Raises:
        TypeError: `log_sigma` (or `mu`) not a floating-point tensor, or dtypes that differ.
        ValueError: shapes or devices that differ, `n_samples` < 0.
    """
    if not isinstance(log_sigma, Tensor) or not log_sigma.is_floating_point():
        raise TypeError("sample_gaussian: log_sigma must be a floating-point tensor, got "
                        + (str(log_sigma.dtype) if isinstance(log_sigma, Tensor) else type(log_sigma).__name__))
    if mu is not None and (not isinstance(mu, Tensor) or mu.dtype != log_sigma.dtype
                           or mu.shape != log_sigma.shape or mu.device != log_sigma.device):
        if not isinstance(mu, Tensor):
            raise TypeError(f"sample_gaussian: mu must be a tensor or None, got {type(mu).__name__}")
        if mu.dtype != log_sigma.dtype:
            raise TypeError(f"sample_gaussian: mu has dtype {mu.dtype}, log_sigma {log_sigma.dtype}; they must match")
        if mu.shape != log_sigma.shape:
            raise ValueError(f"sample_gaussian: mu has shape {tuple(mu.shape)}, log_sigma "
                             f"{tuple(log_sigma.shape)}; they must match")
        raise ValueError(f"sample_gaussian: mu is on {mu.device}, log_sigma on {log_sigma.device}; they must match")
    n_samples = int(n_samples)
    if n_samples < 0:
        raise ValueError(f"sample_gaussian: n_samples must be >= 0, got {n_samples}")
    if _LOADED and not _local.reference:
        device = "cuda" if log_sigma.is_cuda else "cpu" if log_sigma.is_cpu else None
        if device is not None and _KERNELS[("sample_gaussian", device)] and log_sigma.dtype in _SAMPLE_DTYPES[device]:
            return _sample_op(mu, log_sigma, _to_i64(seed), _to_i64(stream), n_samples)
    eps = normal((n_samples,) + tuple(log_sigma.shape), seed, stream, dtype=log_sigma.dtype,
                 device=log_sigma.device)
    return reference.sample_gaussian(mu, log_sigma, eps)


# ----------------------------------------------------------------------------------------------
# bayes_linear


def _linear_args(op, x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, seed, n_samples) -> tuple:
    """The schema arguments of a fused Bayesian-linear operator (seed as int64); raises if the
    extension is not loaded."""
    if not _LOADED:
        raise RuntimeError(f"{op}: the compiled extension is not loaded; " + _REASON)
    return (x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, _to_i64(seed), int(n_samples))


def bayes_linear(
    x: Tensor,
    weight_mu: Tensor,
    weight_log_sigma: Tensor,
    bias_mu: Optional[Tensor],
    bias_log_sigma: Optional[Tensor],
    seed: int,
    n_samples: int = 1,
) -> Tensor:
    """Fused reparameterized Bayesian linear (the compiled operator; needs the extension).

    Sample s uses W_s = weight_mu + exp(weight_log_sigma) * eps_s with eps from
    normal(seed, stream 0, s * out * in + j), and b_s likewise from stream 1.

    Shape:
        x: [n_samples or 1, N, in_features] (1: the same rows for every sample);
        weight_*: [out_features, in_features]; bias_*: [out_features]. Output: [n_samples, N, out_features].
    """
    args = _linear_args("bayes_linear", x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, seed, n_samples)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight_mu.requires_grad or weight_log_sigma.requires_grad
        or (bias_mu is not None and bias_mu.requires_grad)
        or (bias_log_sigma is not None and bias_log_sigma.requires_grad)
    ):
        return torch.ops.bnn_fast.bayes_linear(*args)[0]
    # Nothing will differentiate: the forward that need not keep the sampled weight.
    return torch.ops.bnn_fast.bayes_linear_inference(*args)


def bayes_linear_local(
    x: Tensor,
    weight_mu: Tensor,
    weight_log_sigma: Tensor,
    bias_mu: Optional[Tensor],
    bias_log_sigma: Optional[Tensor],
    seed: int,
    n_samples: int = 1,
) -> Tensor:
    """Fused local-reparameterization Bayesian linear (the compiled operator).

    ``y = x mu^T + b_mu + sqrt(x^2 (sigma^2)^T + sigma_b^2) * eps`` with sigma = exp(log_sigma)
    and eps[s, n, o] = normal(seed, stream 2, (s * N + n) * out + o).

    Shape:
        x: [n_samples or 1, N, in_features]; weight_*: [out_features, in_features];
        bias_*: [out_features]. Output: [n_samples, N, out_features].
    """
    args = _linear_args("bayes_linear_local", x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, seed, n_samples)
    return torch.ops.bnn_fast.bayes_linear_local(*args)[0]


def bayes_linear_flipout(
    x: Tensor,
    weight_mu: Tensor,
    weight_log_sigma: Tensor,
    bias_mu: Optional[Tensor],
    bias_log_sigma: Optional[Tensor],
    seed: int,
    n_samples: int = 1,
) -> Tensor:
    """Fused flipout Bayesian linear (the compiled operator).

    ``y_s = x_s mu^T + ((x_s * s_in) (sigma * eps_s)^T) * s_out + b_mu + sigma_b * eps_b`` with
    eps_s from stream 0 (index s * out * in + j), eps_b from stream 1 (index s * out + o), and
    the +-1 signs s_in, s_out the signs of streams 3 and 4 indexed like x_s and y_s.

    Shape:
        x: [n_samples or 1, N, in_features]; weight_*: [out_features, in_features];
        bias_*: [out_features]. Output: [n_samples, N, out_features].
    """
    args = _linear_args("bayes_linear_flipout", x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, seed, n_samples)
    return torch.ops.bnn_fast.bayes_linear_flipout(*args)[0]


def bayes_mlp_inference(
    x: Tensor,
    layer1: Sequence[Optional[Tensor]],
    seed1: int,
    layer2: Sequence[Optional[Tensor]],
    seed2: int,
    n_samples: int = 1,
) -> Tensor:
    """Two reparameterized Bayesian linear layers with a ReLU between, in one pass without a
    backward (the compiled operator, CPU and CUDA; see csrc/cpu/mlp.cpp, csrc/cuda/mlp_kernel.cu).

    Each layer samples its weights as :func:`bayes_linear` does from its own seed, so the result
    is ``bayes_linear(relu(bayes_linear(x, *layer1, seed1)), *layer2, seed2)`` (up to the order
    of the sums) without the hidden activations ever being written.

    Args:
        x: [n_samples or 1, N, in_features] (1: the same rows for every sample).
        layer1: (weight_mu [hidden, in], weight_log_sigma, bias_mu [hidden] or None,
            bias_log_sigma or None).
        layer2: the same for [out, hidden].
        seed1, seed2: the layers' seeds.
    Returns:
        [n_samples, N, out_features].
    Raises:
        RuntimeError: without the extension, or when an input requires grad under grad mode
            (:func:`bayes_mlp` has the backward).
        ValueError: on a device other than the CPU or a CUDA GPU (with the CUDA kernels
            compiled), for in_features > 8 or out_features > 8, or for mismatched shapes (the
            message names the argument).
        TypeError: for a dtype other than float32 / float64 or mixed dtypes.
    """
    return _mlp_call("bayes_mlp_inference", x, layer1, seed1, layer2, seed2, n_samples)


def bayes_mlp(
    x: Tensor,
    layer1: Sequence[Optional[Tensor]],
    seed1: int,
    layer2: Sequence[Optional[Tensor]],
    seed2: int,
    n_samples: int = 1,
) -> Tensor:
    """:func:`bayes_mlp_inference` with a backward (training): the same forward pass; the
    backward samples both layers' weights again from the seeds and computes every gradient
    without writing the hidden activations either (csrc/cpu/mlp.cpp). The gradients are those
    of the layers run one by one with the same seeds (up to the order of the sums), and do not
    depend on the thread count. Arguments, shapes and errors as :func:`bayes_mlp_inference`,
    but CPU only; double backward raises a clear error."""
    return _mlp_call("bayes_mlp", x, layer1, seed1, layer2, seed2, n_samples)


def _mlp_call(name, x, layer1, seed1, layer2, seed2, n_samples):
    if not _LOADED:
        raise RuntimeError(f"{name}: the compiled extension is not loaded; " + _REASON)
    if not has_kernel(name, x.device.type):
        where = "the CPU and CUDA have" if name == "bayes_mlp_inference" else "only the CPU has"
        raise ValueError(f"{name}: {where} this kernel (CUDA: when the CUDA kernels are compiled), "
                         f"got x on {x.device}")
    return getattr(torch.ops.bnn_fast, name)(
        x, *layer1, _to_i64(seed1), *layer2, _to_i64(seed2), int(n_samples)
    )


def cpu_keeps_weight() -> bool:
    """Whether bayes_linear's CPU forward keeps the sampled weight for its backward: yes, unless
    the environment variable BNN_FAST_CPU_SAVE_WEIGHT is "0" (then the backward samples it again:
    one weight-sized buffer less per training step, one noise pass more). Read on every call, by
    the kernel as by this function."""
    return os.environ.get("BNN_FAST_CPU_SAVE_WEIGHT") != "0"


def _register() -> None:
    """Fake (meta) implementations of the compiled operators (their autograd formulas are C++
    kernels: csrc/autograd.cpp)."""

    @torch.library.register_fake("bnn_fast::gaussian_kl")
    def _(mu, log_sigma, prior_mu, prior_log_sigma):
        return mu[0].new_empty(())

    @torch.library.register_fake("bnn_fast::gaussian_kl_backward")
    def _(grad, mu, log_sigma, prior_mu, prior_log_sigma):
        return [torch.empty_like(m) for m in mu], [torch.empty_like(s) for s in log_sigma]

    @torch.library.register_fake("bnn_fast::sample_gaussian")
    def _(mu, log_sigma, seed, stream, n_samples):
        if mu is not None and mu.device != log_sigma.device:
            raise ValueError(f"sample_gaussian: mu is on {mu.device}, log_sigma on {log_sigma.device}; they must match")
        return log_sigma.new_empty((n_samples, *log_sigma.shape))

    @torch.library.register_fake("bnn_fast::sample_gaussian_backward")
    def _(grad, log_sigma, seed, stream, n_samples, output_mask):
        return tuple(log_sigma.new_empty(log_sigma.shape) if needed else log_sigma.new_empty((0,))
                     for needed in output_mask)

    @torch.library.register_fake("bnn_fast::fill_normal_")
    def _(out, seed, stream, offset):
        return None

    def check_devices(op, x, *params, layers=("",)):
        # params: (weight_mu, weight_log_sigma, bias_mu, bias_log_sigma) of each layer, named
        # weight{layer}_mu, ... for each entry of `layers`.
        names = [f"{kind}{layer}_{part}" for layer in layers
                 for kind, part in (("weight", "mu"), ("weight", "log_sigma"), ("bias", "mu"), ("bias", "log_sigma"))]
        for name, t in zip(names, params):
            if t is not None and t.device != x.device:
                raise ValueError(f"{op}: {name} must be on {x.device} like x, got {t.device}")

    @torch.library.register_fake("bnn_fast::bayes_linear")
    def _(x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, seed, n_samples):
        check_devices("bayes_linear", x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma)
        out_f, in_f = weight_mu.shape
        y = x.new_empty((n_samples, x.shape[1], out_f))
        keeps_weight = x.device.type == "cpu" and cpu_keeps_weight()
        saved = weight_mu.new_empty((n_samples, out_f, in_f)) if keeps_weight else weight_mu.new_empty((0,))
        return y, saved

    @torch.library.register_fake("bnn_fast::bayes_linear_inference")
    def _(x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, seed, n_samples):
        check_devices("bayes_linear_inference", x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma)
        return x.new_empty((n_samples, x.shape[1], weight_mu.shape[0]))

    def mlp_fake(name):
        @torch.library.register_fake(f"bnn_fast::{name}")
        def _(x, weight1_mu, weight1_log_sigma, bias1_mu, bias1_log_sigma, seed1,
              weight2_mu, weight2_log_sigma, bias2_mu, bias2_log_sigma, seed2, n_samples):
            check_devices(name, x, weight1_mu, weight1_log_sigma, bias1_mu, bias1_log_sigma,
                          weight2_mu, weight2_log_sigma, bias2_mu, bias2_log_sigma, layers=("1", "2"))
            return x.new_empty((n_samples, x.shape[1], weight2_mu.shape[0]))

    mlp_fake("bayes_mlp_inference")
    mlp_fake("bayes_mlp")

    @torch.library.register_fake("bnn_fast::bayes_mlp_backward")
    def _(grad_y, x, weight1_mu, weight1_log_sigma, bias1_mu, bias1_log_sigma, seed1,
          weight2_mu, weight2_log_sigma, bias2_mu, bias2_log_sigma, seed2, n_samples, output_mask):
        inputs = (x, weight1_mu, weight1_log_sigma, bias1_mu, bias1_log_sigma,
                  weight2_mu, weight2_log_sigma, bias2_mu, bias2_log_sigma)
        return tuple(torch.empty_like(t) if needed and t is not None else x.new_empty((0,))
                     for t, needed in zip(inputs, output_mask))

    @torch.library.register_fake("bnn_fast::bayes_linear_local")
    def _(x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, seed, n_samples):
        check_devices("bayes_linear_local", x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma)
        out_f = weight_mu.shape[0]
        return x.new_empty((n_samples, x.shape[1], out_f)), x.new_empty((x.shape[0], x.shape[1], out_f))

    @torch.library.register_fake("bnn_fast::bayes_linear_flipout")
    def _(x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma, seed, n_samples):
        check_devices("bayes_linear_flipout", x, weight_mu, weight_log_sigma, bias_mu, bias_log_sigma)
        out_f, in_f = weight_mu.shape
        y = x.new_empty((n_samples, x.shape[1], out_f))
        saved = weight_mu.new_empty((n_samples, out_f, in_f)) if x.device.type == "cpu" else weight_mu.new_empty((0,))
        return y, saved

    for name in ("bayes_linear", "bayes_linear_local", "bayes_linear_flipout"):
        _register_linear_backward_fake(name)


def _register_linear_backward_fake(name: str) -> None:
    """The fake implementation of a fused Bayesian-linear operator's backward, `name`_backward
    (grad_out, x, weight_mu, weight_log_sigma, bias_log_sigma, saved, seed, n_samples,
    output_mask), which gives the five input gradients. The autograd formulas that call it are
    C++ kernels (csrc/autograd.cpp), like gaussian_kl's."""

    @torch.library.register_fake(f"bnn_fast::{name}_backward")
    def _(grad_out, x, weight_mu, weight_log_sigma, bias_log_sigma, saved, seed, n_samples, output_mask):
        def grad_like(t, needed):
            return torch.empty_like(t) if needed and t is not None else weight_mu.new_empty((0,))

        return (
            grad_like(x, output_mask[0]),
            grad_like(weight_mu, output_mask[1]),
            grad_like(weight_log_sigma, output_mask[2]),
            grad_like(bias_log_sigma, output_mask[3]),
            grad_like(bias_log_sigma, output_mask[4]),
        )


if _LOADED:
    _register()
