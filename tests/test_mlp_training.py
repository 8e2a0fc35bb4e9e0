"""bnn_fast::bayes_mlp (BayesLinear -> ReLU -> BayesLinear, forward and backward, in one CPU
operator) and FusedSequential / fuse (the opt-in that trains through it)."""
import copy
from collections import OrderedDict

import pytest
import torch
import torchbnn
from torch import nn

import bnn_fast
from bnn_fast import _ops, fusion
from conftest import CUDA, SIMD_LEVELS, make_layer, requires_ext
from test_mlp_fusion import CASES, article_net, reference_with_kernel_noise, spy_on

pytestmark = requires_ext

OP = torch.ops.bnn_fast.bayes_mlp
NAMES = ("x", "weight1_mu", "weight1_log_sigma", "bias1_mu", "bias1_log_sigma",
         "weight2_mu", "weight2_log_sigma", "bias2_mu", "bias2_log_sigma")


def layers(in_f, hidden, out_f, dtype, bias1=True, bias2=True):
    return make_layer(hidden, in_f, dtype, "cpu", bias1, seed=1), make_layer(out_f, hidden, dtype, "cpu", bias2, seed=2)


def leaves(x, layer1, layer2):
    """Fresh leaf copies that require grad (None stays None)."""
    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_(True)
    return leaf(x), tuple(map(leaf, layer1)), tuple(map(leaf, layer2))


def grads_of(y, grad_y, x, layer1, layer2):
    inputs = [t for t in (x, *layer1, *layer2) if t is not None]
    return torch.autograd.grad(y, inputs, grad_y)


def grads_one_by_one(x0, l1, l2, seed1, seed2, S, grad_y):
    """The gradients of bayes_linear, relu, bayes_linear with the same seeds."""
    x, a, b = leaves(x0, l1, l2)
    hidden = torch.relu(torch.ops.bnn_fast.bayes_linear(x, *a, seed1, S)[0])
    return grads_of(torch.ops.bnn_fast.bayes_linear(hidden, *b, seed2, S)[0], grad_y, x, a, b)


def tolerance(dtype, hidden, n_terms):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    # float32 sums of hidden (dx) or S * N (dW) terms in another order than the reference's
    return dict(rtol=1e-4, atol=1e-4) if max(hidden, n_terms) > 64 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs,N,in_f,hidden,out_f,bias1,bias2", CASES)
def test_gradients_equal_the_reference_with_the_kernel_noise(monkeypatch, simd, dtype, S, xs, N, in_f, hidden,
                                                             out_f, bias1, bias2):
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    l1, l2 = layers(in_f, hidden, out_f, dtype, bias1, bias2)
    x0 = torch.randn(xs, N, in_f, dtype=dtype)
    grad_y = torch.randn(S, N, out_f, dtype=dtype)
    x, a, b = leaves(x0, l1, l2)
    y = OP(x, *a, 11, *b, 12, S)
    got = grads_of(y, grad_y, x, a, b)
    x, a, b = leaves(x0, l1, l2)
    want_y = reference_with_kernel_noise(x, a, 11, b, 12, S)
    want = grads_of(want_y, grad_y, x, a, b)
    tol = tolerance(dtype, hidden, S * N)
    torch.testing.assert_close(y, want_y, **tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_gradients_equal_the_layers_run_one_by_one():
    l1, l2 = layers(3, 150, 2, torch.float32)
    x0 = torch.randn(1, 40, 3)
    grad_y = torch.randn(4, 40, 2)
    x, a, b = leaves(x0, l1, l2)
    fused = grads_of(OP(x, *a, 5, *b, 6, 4), grad_y, x, a, b)
    apart = grads_one_by_one(x0, l1, l2, 5, 6, 4, grad_y)
    for g, w in zip(fused, apart):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_gradients_do_not_depend_on_the_thread_count():
    l1, l2 = layers(2, 300, 3, torch.float32)
    x0 = torch.randn(1, 200, 2)
    grad_y = torch.randn(3, 200, 3)
    before = torch.get_num_threads()

    def run(threads):
        torch.set_num_threads(threads)
        x, a, b = leaves(x0, l1, l2)
        return grads_of(OP(x, *a, 8, *b, 9, 3), grad_y, x, a, b)
    try:
        one, many = run(1), run(max(2, before))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(g, h) for g, h in zip(one, many))


@pytest.mark.parametrize("S,xs,bias", [(1, 1, True), (3, 1, False), (2, 2, True)])
def test_gradcheck_float64(S, xs, bias):
    l1, l2 = layers(2, 11, 2, torch.float64, bias, bias)
    x, a, b = leaves(torch.randn(xs, 3, 2, dtype=torch.float64), l1, l2)
    inputs = [t for t in (x, *a, *b) if t is not None]

    def fn(*flat):
        it = iter(flat)
        x_, a_, b_ = next(it), tuple(next(it) if t is not None else None for t in a), \
            tuple(next(it) if t is not None else None for t in b)
        return _ops.bayes_mlp(x_, a_, 21, b_, 22, S)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("S,xs,N", [(1, 1, 1), (3, 1, 10), (2, 2, 5)])
def test_opcheck(S, xs, N):
    l1, l2 = layers(2, 20, 3, torch.float32)
    x, a, b = leaves(torch.randn(xs, N, 2), l1, l2)
    torch.library.opcheck(OP.default, (x, *a, 1, *b, 2, S))


def test_only_the_gradients_asked_for_are_computed():
    l1, l2 = layers(1, 16, 2, torch.float64)
    x0 = torch.randn(1, 5, 1, dtype=torch.float64)
    grad_y = torch.randn(2, 5, 2, dtype=torch.float64)
    x, a, b = leaves(x0, l1, l2)
    all_grads = grads_of(OP(x, *a, 3, *b, 4, 2), grad_y, x, a, b)
    # One input needing a gradient at a time: that gradient equals the one computed with all.
    for k in range(len(NAMES)):
        x, a, b = leaves(x0, l1, l2)
        flat = [x, *a, *b]
        for j, t in enumerate(flat):
            t.requires_grad_(j == k)
        y = OP(flat[0], *flat[1:5], 3, *flat[5:], 4, 2)
        (g,) = torch.autograd.grad(y, flat[k], grad_y)
        torch.testing.assert_close(g, all_grads[k], rtol=0, atol=0, msg=NAMES[k])
    # The backward operator returns an empty tensor for a gradient not asked for.
    mask = [False, True] + [False] * 7
    got = torch.ops.bnn_fast.bayes_mlp_backward(grad_y, x0, *l1, 3, *l2, 4, 2, mask)
    assert got[1].shape == l1[0].shape and all(g.numel() == 0 for k, g in enumerate(got) if k != 1)


def test_hidden_widths_around_the_vector_width_and_empty_inputs():
    grad = torch.ones
    for hidden in (0, 1, 7, 8, 9, 63, 64, 65):
        l1, l2 = layers(2, hidden, 3, torch.float32)
        x0 = torch.randn(1, 6, 2)
        x, a, b = leaves(x0, l1, l2)
        got = grads_of(OP(x, *a, 1, *b, 2, 2), grad(2, 6, 3), x, a, b)
        x, a, b = leaves(x0, l1, l2)
        want = grads_of(reference_with_kernel_noise(x, a, 1, b, 2, 2), grad(2, 6, 3), x, a, b)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # No rows: every gradient but the (empty) input's is zero.
    l1, l2 = layers(2, 10, 3, torch.float32)
    x, a, b = leaves(torch.randn(1, 0, 2), l1, l2)
    got = grads_of(OP(x, *a, 1, *b, 2, 2), torch.ones(2, 0, 3), x, a, b)
    assert got[0].shape == (1, 0, 2) and all(torch.equal(g, torch.zeros_like(g)) for g in got[1:])


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("where", ["weight2", "x", "weight1"])
def test_nan_gradients_equal_the_layers_run_one_by_one(monkeypatch, simd, where):
    # relu's backward passes the gradient at a NaN activation (threshold_backward zeroes it only
    # where relu(a) <= 0): the finite gradients and the NaN pattern both match.
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    l1, l2 = layers(2, 21, 3, torch.float64)
    x0 = torch.randn(1, 4, 2, dtype=torch.float64)
    if where == "weight2":
        l2[0][0, 3] = float("nan")
    elif where == "x":
        x0[0, 2, 0] = float("nan")  # every hidden unit of row 2 is NaN
    else:
        l1[0][5, 1] = float("nan")  # hidden unit 5 is NaN for every row
    grad_y = torch.randn(1, 4, 3, dtype=torch.float64)
    x, a, b = leaves(x0, l1, l2)
    got = grads_of(OP(x, *a, 1, *b, 2, 1), grad_y, x, a, b)
    want = grads_one_by_one(x0, l1, l2, 1, 2, 1, grad_y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_double_backward_raises_clear_error():
    l1, l2 = layers(1, 8, 1, torch.float64)
    x, a, b = leaves(torch.randn(1, 3, 1, dtype=torch.float64), l1, l2)
    y = OP(x, *a, 1, *b, 2, 1)
    with pytest.raises(RuntimeError, match="bayes_mlp: double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_backward_names_a_bad_grad():
    l1, l2 = layers(1, 8, 2, torch.float32)
    x = torch.randn(1, 3, 1)
    with pytest.raises(ValueError, match=r"bayes_mlp_backward: grad_y must have shape \[1, 3, 2\]"):
        torch.ops.bnn_fast.bayes_mlp_backward(torch.ones(1, 3, 3), x, *l1, 1, *l2, 2, 1, [True] * 9)
    with pytest.raises(TypeError, match="bayes_mlp_backward: grad_y must have dtype Float"):
        torch.ops.bnn_fast.bayes_mlp_backward(torch.ones(1, 3, 2, dtype=torch.float64), x, *l1, 1, *l2, 2, 1,
                                              [True] * 9)


def test_forward_names_a_bad_argument():
    l1, l2 = layers(2, 6, 9, torch.float32)
    with pytest.raises(ValueError, match="bayes_mlp: the fused kernel takes in_features <= 8 and out_features <= 8"):
        OP(torch.randn(1, 4, 2), *l1, 1, *l2, 2, 1)
    l1, l2 = layers(2, 6, 3, torch.float32)
    with pytest.raises(ValueError, match=r"bayes_mlp: x must have last dim 2"):
        OP(torch.randn(1, 4, 3), *l1, 1, *l2, 2, 1)


# ----------------------------------------------------------------------------------------------
# FusedSequential / fuse

@pytest.fixture
def calls(monkeypatch):
    """Counts the training operator's calls."""
    return spy_on(monkeypatch, "bayes_mlp")


def step_grads(model, x, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    y = model(x)
    y.pow(2).mean().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


def test_fuse_shares_the_modules_and_computes_what_the_sequential_computes(calls):
    model = article_net()
    fused = bnn_fast.fuse(model)
    assert isinstance(fused, nn.Sequential) and type(fused) is bnn_fast.FusedSequential
    assert all(a is b for a, b in zip(fused, model)) and list(fused.state_dict()) == list(model.state_dict())
    x = torch.linspace(-2, 2, 500).unsqueeze(1)
    y_apart, g_apart = step_grads(model, x, 4)
    y_fused, g_fused = step_grads(fused, x, 4)
    assert len(calls) == 1
    torch.testing.assert_close(y_fused, y_apart, rtol=1e-5, atol=1e-5)
    for g, w in zip(g_fused, g_apart):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_fuse_loads_a_torchbnn_checkpoint_and_trains():
    tb = article_net(hidden=64, lib=torchbnn)
    fused = bnn_fast.fuse(article_net(hidden=64))
    fused.load_state_dict(tb.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), tb.state_dict().values()))
    torch.manual_seed(1)
    x = torch.linspace(-2, 2, 200).unsqueeze(1)
    y = x.pow(5) - 10 * x + 2 * torch.rand(x.size())
    kl = bnn_fast.BKLLoss(reduction="mean", last_layer_only=False)
    opt = torch.optim.Adam(fused.parameters(), lr=0.01)
    losses = []
    for _ in range(300):
        cost = nn.functional.mse_loss(fused(x), y) + 0.01 * kl(fused)
        opt.zero_grad()
        cost.backward()
        opt.step()
        losses.append(cost.item())
    assert sum(losses[-20:]) / 20 < 0.3 * sum(losses[:20]) / 20


def test_fused_sequential_slices_and_keeps_its_class_and_mode():
    model = article_net(hidden=16).eval()
    fused = bnn_fast.fuse(model)
    assert not fused.training and type(fused[0:3]) is bnn_fast.FusedSequential
    assert bnn_fast.fuse(fused) is fused
    fused2 = bnn_fast.FusedSequential(OrderedDict(a=nn.Identity()))
    assert fusion.plan(fused2) is None and torch.equal(fused2(torch.ones(2, 1)), torch.ones(2, 1))


def test_fuse_refuses_what_is_not_a_sequential():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = article_net(hidden=8)

        def forward(self, x):
            return self.body(x)
    with pytest.raises(TypeError, match="fuse: model must be an nn.Sequential, got Net"):
        bnn_fast.fuse(Net())
    net = Net()
    net.body = bnn_fast.fuse(net.body)  # what the message advises
    assert net(torch.randn(3, 1)).shape == (3, 1)


@pytest.mark.parametrize("why", ["frozen", "flipout estimator", "estimator block", "hook", "backward hook",
                                 "backward pre-hook", "global backward hook", "fusion off"])
def test_fused_sequential_runs_the_modules_one_by_one_where_fusion_does_not_apply(monkeypatch, request, calls,
                                                                                  why):
    fused = bnn_fast.fuse(article_net(hidden=30))
    fired = []

    def hook(*args):
        fired.append(why)
    if why == "frozen":
        fused[0].freeze()
    elif why == "flipout estimator":
        fused[2].estimator = "flipout"
    elif why == "hook":
        fused[1].register_forward_hook(hook)
    elif why == "backward hook":
        fused[0].register_full_backward_hook(hook)
    elif why == "backward pre-hook":
        fused[1].register_full_backward_pre_hook(hook)
    elif why == "global backward hook":
        request.addfinalizer(nn.modules.module.register_module_full_backward_hook(hook).remove)
    elif why == "fusion off":
        monkeypatch.setattr(fusion, "enabled", False)
    x = torch.randn(5, 1, requires_grad=True)  # (full backward hooks warn without an input gradient)
    if why == "estimator block":
        with bnn_fast.estimator("local"):
            y = fused(x)
    else:
        y = fused(x)
    y.sum().backward()
    assert calls == [] and fused[0].weight_mu.grad is not None
    assert bool(fired) == ("hook" in why)  # each hook saw its module run


def test_fused_sequential_under_sample_many_and_predictive(calls):
    fused = bnn_fast.fuse(article_net(in_f=2, hidden=40, out_f=3))
    x = torch.randn(7, 2)
    with bnn_fast.sampling.sample_many(4):
        y = fused(x)
    assert y.shape == (28, 3) and calls == [4]
    y.sum().backward()
    from bnn_fast.predictive import predictive
    res = predictive(fused, x, 100, seed=0, chunk_size=25)
    assert res.mean.shape == (7, 3) and torch.isfinite(res.std).all()


def test_inference_mode_uses_the_inference_operator(calls):
    fused = bnn_fast.fuse(article_net(hidden=30))
    with torch.inference_mode():
        y = fused(torch.randn(4, 1))
    assert y.shape == (4, 1) and calls == []
    with torch.no_grad():
        fused(torch.randn(4, 1))
    assert calls == []


def test_deepcopy_and_state_dict_round_trip():
    fused = bnn_fast.fuse(article_net(hidden=12))
    twin = copy.deepcopy(fused)
    assert type(twin) is bnn_fast.FusedSequential
    plain = article_net(hidden=12)
    plain.load_state_dict(twin.state_dict())
    x = torch.randn(3, 1)
    torch.manual_seed(2)
    a = fused(x)
    torch.manual_seed(2)
    b = plain(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled")
def test_on_cuda_training_runs_the_layers_and_prediction_fuses(monkeypatch, calls):
    inference = spy_on(monkeypatch, "bayes_mlp_inference")
    fused = bnn_fast.fuse(article_net(hidden=30)).cuda()
    x = torch.randn(6, 1, device="cuda")
    fused(x).sum().backward()  # no fused backward on CUDA: the modules, one by one
    assert calls == [] and inference == [] and fused[0].weight_mu.grad is not None
    with torch.no_grad():
        assert fused(x).shape == (6, 1)
    assert inference == [1]


@pytest.mark.parametrize("fused", [True, False])
def test_torch_compile_equals_eager(fused):
    # Fake kernels and the C++ autograd under dynamo/aot_autograd; the seeds are drawn eagerly
    # (new_seed is excluded from compilation), in the same order, so the same weights are drawn.
    model = article_net(hidden=24)
    if fused:
        model = bnn_fast.fuse(model)
    x = torch.randn(16, 1)
    eager_y, eager_g = step_grads(model, x, 9)
    compiled_y, compiled_g = step_grads(torch.compile(model), x, 9)
    torch.testing.assert_close(compiled_y, eager_y)
    for g, w in zip(compiled_g, eager_g):
        torch.testing.assert_close(g, w)
