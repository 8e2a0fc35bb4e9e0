"""The CPU kernels' cache of large output buffers (csrc/cpu/memory.{h,cpp})."""
import pytest
import torch

import bnn_fast
from bnn_fast import _ops
from bnn_fast.utils import cpu_cache_info, release_cpu_cache
from conftest import requires_ext

pytestmark = requires_ext

MiB = 1 << 20


def big_layer(seed=0):
    # 600 x 600 float32: 1.37 MiB per weight-sized buffer, above the cache's 1 MiB threshold
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(600, 600, generator=g) * 0.05
    ls = torch.full((600, 600), -3.0) + 0.1 * torch.randn(600, 600, generator=g)
    return [t.requires_grad_(True) for t in (mu, ls, torch.zeros(600), torch.full((600,), -3.0))]


def step(params, x, seed):
    y = _ops.bayes_linear(x, *params, seed, 1)
    return y, torch.autograd.grad((y * y).sum(), params)


def test_outputs_reuse_cached_blocks_and_stay_correct(monkeypatch):
    monkeypatch.delenv("BNN_FAST_CPU_CACHE_MB", raising=False)
    params, x = big_layer(), torch.randn(1, 64, 600)
    release_cpu_cache()
    y1, g1 = step(params, x, 5)
    in_use_held = cpu_cache_info()[0]
    assert in_use_held >= 2 * 600 * 600 * 4  # grad_mu and grad_log_sigma at least
    ptrs = {t.data_ptr() for t in g1[:2]}
    want = [t.clone() for t in (y1,) + g1]
    del y1, g1
    assert cpu_cache_info()[0] < in_use_held and cpu_cache_info()[1] > 0  # given back, kept
    y2, g2 = step(params, x, 5)
    assert {t.data_ptr() for t in g2[:2]} & ptrs  # the same blocks, reused
    for a, b in zip((y2,) + g2, want):  # reused memory gives the same results
        assert torch.equal(a, b)
    # and the results are right: the reference fed the kernel's noise
    eps = _ops.normal((600, 600), 5, 0)
    w = params[0] + params[1].exp() * eps
    b = params[2] + params[3].exp() * _ops.normal((600,), 5, 1)
    torch.testing.assert_close(y2[0], torch.nn.functional.linear(x[0], w, b), rtol=1e-5, atol=1e-5)


def test_cache_limit_and_release(monkeypatch):
    params, x = big_layer(1), torch.randn(1, 64, 600)
    monkeypatch.setenv("BNN_FAST_CPU_CACHE_MB", "0")  # off: plain allocations
    release_cpu_cache()
    before = cpu_cache_info()
    y, grads = step(params, x, 3)
    assert cpu_cache_info() == before
    del y, grads
    monkeypatch.setenv("BNN_FAST_CPU_CACHE_MB", "2")  # room for one 2 MiB block
    y, grads = step(params, x, 3)
    del y, grads
    assert 0 < cpu_cache_info()[1] <= 2 * MiB
    release_cpu_cache()
    assert cpu_cache_info()[1] == 0


def test_cache_limit_must_be_a_number(monkeypatch):
    monkeypatch.setenv("BNN_FAST_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="BNN_FAST_CPU_CACHE_MB"):
        step(big_layer(2), torch.randn(1, 64, 600), 1)


def test_cached_gradients_accumulate_in_training(monkeypatch):
    # Parameters' .grad may be a cached block; accumulation and the optimizer work on it as usual.
    monkeypatch.delenv("BNN_FAST_CPU_CACHE_MB", raising=False)
    torch.manual_seed(0)
    layer = bnn_fast.BayesLinear(0, 0.1, 600, 600)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(64, 600)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        layer(x).square().mean().backward()  # a second backward adds into the same .grad
        opt.step()
    assert all(torch.isfinite(p).all() for p in layer.parameters())


def test_profiler_sees_cached_blocks(monkeypatch):
    # Peak-memory measurements read the profiler's memory events: the cache reports its blocks.
    monkeypatch.delenv("BNN_FAST_CPU_CACHE_MB", raising=False)
    params, x = big_layer(3), torch.randn(1, 64, 600)
    step(params, x, 2)  # warm the cache: the measured call reuses blocks
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        y, grads = step(params, x, 2)
    allocated = sum(e.nbytes() for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.nbytes() > 0)
    assert allocated >= 3 * 600 * 600 * 4  # W, grad_mu, grad_log_sigma
