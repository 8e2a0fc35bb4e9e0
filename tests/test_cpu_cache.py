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
    want = [t.clone() for t in (y1,) + g1]
    in_use_held = cpu_cache_info()[0]
    assert in_use_held >= 2 * 600 * 600 * 4  # grad_mu and grad_log_sigma at least
    ptrs = {t.data_ptr() for t in g1[:2]}
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
    big = torch.ones(1 << 20)  # a cached block, freed below under the bad setting
    monkeypatch.setenv("BNN_FAST_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="BNN_FAST_CPU_CACHE_MB"):
        step(big_layer(2), torch.randn(1, 64, 600), 1)
    with pytest.raises(ValueError, match="BNN_FAST_CPU_CACHE_MB"):
        torch.empty(1 << 20)  # PyTorch's own large allocations report it too
    del big  # the deleter must not throw: the block is unmapped, not kept


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


# ---- the allocator: PyTorch's own large CPU tensors ------------------------------------------

def test_pytorch_large_tensors_use_the_cache_and_small_ones_do_not(monkeypatch):
    monkeypatch.delenv("BNN_FAST_CPU_CACHE_MB", raising=False)
    assert _ops._CPU_ALLOCATOR  # installed at import
    release_cpu_cache()
    in_use = cpu_cache_info()[0]
    small = torch.empty(1000)  # 4 KB: the allocator it replaced
    assert cpu_cache_info()[0] == in_use
    big = torch.ones(300, 1000)  # 1.2 MB: a block of whole 64 KiB
    block = -(-1_200_000 // 65536) * 65536
    assert cpu_cache_info()[0] == in_use + block
    ptr = big.data_ptr()
    del big
    assert cpu_cache_info()[1] >= block
    again = torch.full((300, 1000), 2.0)  # the same size: the same block, refilled
    assert again.data_ptr() == ptr and bool((again == 2).all())
    del small, again


def test_allocator_serves_numpy_views_resizes_and_large_blocks(monkeypatch):
    monkeypatch.delenv("BNN_FAST_CPU_CACHE_MB", raising=False)
    t = torch.arange(3 * (1 << 20), dtype=torch.float32)  # 12 MiB: huge-page blocks
    t.resize_(4 * (1 << 20))  # a storage resize goes through the allocator (copy_data)
    assert t[3 * (1 << 20) - 1].item() == 3 * (1 << 20) - 1
    assert t.numpy()[3 * (1 << 20) - 1] == 3 * (1 << 20) - 1
    s = torch.randn(256, 1024)
    torch.testing.assert_close(torch.from_numpy(s.numpy().copy()), s)


def run_python(code, env=None, timeout=120):
    import os
    import subprocess
    import sys
    full_env = dict(os.environ, **(env or {}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                         env=full_env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_allocator_can_be_turned_off():
    out = run_python("import bnn_fast, torch; from bnn_fast import _ops, utils; t = torch.ones(1 << 20);"
                     "print(_ops._CPU_ALLOCATOR, utils.cpu_cache_info()[0])",
                     env={"BNN_FAST_CPU_ALLOCATOR": "0"})
    assert out.split() == ["False", "0"]


def test_a_forked_child_allocates_from_the_cache():
    # DataLoader workers fork: the child must find the cache's lock free and its blocks usable.
    out = run_python(
        "import os, threading, torch, bnn_fast\n"
        "stop = False\n"
        "def churn():\n"
        "    while not stop: torch.empty(1 << 20).fill_(1)\n"
        "th = threading.Thread(target=churn); th.start()\n"
        "for _ in range(20):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        ok = float(torch.ones(1 << 20).sum()) == (1 << 20)\n"
        "        os._exit(0 if ok else 1)\n"
        "    assert os.waitpid(pid, 0)[1] == 0\n"
        "stop = True; th.join(); print('ok')\n", timeout=60)
    assert out.strip() == "ok"


def test_article_prediction_loop_keeps_only_its_outputs():
    # The seed article's prediction loop as written: grad enabled, every output kept through
    # .data.numpy(). With glibc's heap serving the 1.2 MB hidden activations, each kept 1.2 KB
    # output split the hole its pass's activation left, and the process grew by about 0.6 MB
    # per pass. Now the growth per kept output must stay within a few times its own size.
    out = run_python(
        "import numpy as np, torch, torch.nn as nn, bnn_fast as bnn\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(bnn.BayesLinear(0, 0.1, 1, 1000), nn.ReLU(), bnn.BayesLinear(0, 0.1, 1000, 1))\n"
        "x_test = torch.linspace(-2, 2, 300).unsqueeze(1)\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "warm = [model(x_test).data.numpy() for k in range(50)]\n"
        "before = rss()\n"
        "kept = [model(x_test).data.numpy() for k in range(2000)]\n"
        "print((rss() - before) / len(kept), kept[0].nbytes)\n")
    per_output, nbytes = (float(v) for v in out.split())
    assert nbytes == 1200
    assert per_output < 5 * nbytes, f"{per_output:.0f} bytes of resident memory per kept output"
