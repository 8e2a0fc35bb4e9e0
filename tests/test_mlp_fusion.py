"""bnn_fast::bayes_mlp_inference (BayesLinear -> ReLU -> BayesLinear in one CPU pass) and its use
by predictive (bnn_fast.fusion)."""

import pytest
import torch
from torch import nn

import bnn_fast
from bnn_fast import _ops, fusion, reference
from bnn_fast.predictive import predictive
from conftest import CUDA, SIMD_LEVELS, make_layer, requires_ext

pytestmark = requires_ext

OP = torch.ops.bnn_fast.bayes_mlp_inference


def layers(in_f, hidden, out_f, dtype, bias1=True, bias2=True):
    return make_layer(hidden, in_f, dtype, "cpu", bias1, seed=1), make_layer(out_f, hidden, dtype, "cpu", bias2, seed=2)


def reference_with_kernel_noise(x, layer1, seed1, layer2, seed2, S):
    """The pure-PyTorch twin fed the exact noise the kernel draws (each layer as bayes_linear)."""
    def with_noise(params, seed):
        mu, _, bmu, _ = params
        eps_w = _ops.normal((S, *mu.shape), seed, 0, dtype=mu.dtype)
        eps_b = _ops.normal((S, mu.shape[0]), seed, 1, dtype=mu.dtype) if bmu is not None else None
        return (*params, eps_w, eps_b)

    return reference.bayes_mlp(x, with_noise(layer1, seed1), with_noise(layer2, seed2))


def tolerance(dtype, hidden):
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    # float32 sums of `hidden` terms in another order than the reference's
    return dict(rtol=1e-5, atol=1e-5) if hidden <= 64 else dict(rtol=1e-4, atol=1e-4)


CASES = [  # (S, x_samples, N, in, hidden, out, bias1, bias2)
    (1, 1, 1, 1, 3, 1, True, True),
    (6, 1, 300, 1, 1000, 1, True, True),  # the seed article's network
    (3, 3, 7, 3, 37, 2, True, False),
    (2, 1, 9, 8, 16, 8, False, True),
    (4, 4, 5, 2, 13, 5, False, False),
    (2, 1, 131, 1, 8, 3, True, True),  # two full blocks of 64 rows and a part block
    (2, 2, 6, 5, 41, 4, True, True),
    (3, 1, 5, 2, 29, 6, True, True),
    (2, 1, 4, 4, 24, 7, True, True),
    # one input and one output: the CPU kernel's 6-row (AVX2) or 8-row (AVX-512) groups (17
    # rows: two and a part group) over 5 vectors of 8 hidden units and a tail of 5 (AVX-512: 2
    # vectors of 16 and a masked 13)
    (2, 1, 17, 1, 45, 1, True, False),
]


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs,N,in_f,hidden,out_f,bias1,bias2", CASES)
def test_equals_reference(monkeypatch, simd, dtype, S, xs, N, in_f, hidden, out_f, bias1, bias2):
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    layer1, layer2 = layers(in_f, hidden, out_f, dtype, bias1, bias2)
    x = torch.randn(xs, N, in_f, dtype=dtype)
    got = OP(x, *layer1, 11, *layer2, 12, S)
    assert got.shape == (S, N, out_f) and got.dtype == dtype
    torch.testing.assert_close(got, reference_with_kernel_noise(x, layer1, 11, layer2, 12, S), **tolerance(dtype, hidden))


def test_equals_the_layers_run_one_by_one():
    layer1, layer2 = layers(2, 100, 3, torch.float32)
    x = torch.randn(1, 50, 2)
    hidden = torch.relu(torch.ops.bnn_fast.bayes_linear_inference(x, *layer1, 5, 4))
    apart = torch.ops.bnn_fast.bayes_linear_inference(hidden, *layer2, 6, 4)
    torch.testing.assert_close(OP(x, *layer1, 5, *layer2, 6, 4), apart, **tolerance(torch.float32, 100))


def test_thread_count_does_not_change_the_output():
    layer1, layer2 = layers(1, 300, 2, torch.float32)
    x = torch.randn(1, 200, 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(x, *layer1, 8, *layer2, 9, 5)
        torch.set_num_threads(max(2, before))
        many = OP(x, *layer1, 8, *layer2, 9, 5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("S,xs,N", [(1, 1, 1), (3, 1, 10), (2, 2, 5)])
def test_opcheck(S, xs, N):
    layer1, layer2 = layers(2, 20, 3, torch.float32)
    x = torch.randn(xs, N, 2)
    torch.library.opcheck(torch.ops.bnn_fast.bayes_mlp_inference.default, (x, *layer1, 1, *layer2, 2, S))


def test_empty_batch_and_empty_hidden_layer():
    layer1, layer2 = layers(1, 10, 2, torch.float32)
    assert OP(torch.randn(1, 0, 1), *layer1, 1, *layer2, 2, 3).shape == (3, 0, 2)
    # No hidden units: every output is the sampled bias of layer 2.
    layer1, layer2 = layers(1, 0, 2, torch.float32)
    got = OP(torch.randn(1, 4, 1), *layer1, 1, *layer2, 2, 3)
    bias = layer2[2] + torch.exp(layer2[3]) * _ops.normal((3, 2), 2, 1)
    torch.testing.assert_close(got, bias.unsqueeze(1).expand(3, 4, 2))


def test_non_finite_parameters_propagate():
    layer1, layer2 = layers(1, 20, 2, torch.float32)
    layer1[0][7, 0] = float("nan")  # hidden unit 7 is NaN for every row: relu keeps it
    got = OP(torch.randn(1, 3, 1), *layer1, 1, *layer2, 2, 2)
    assert torch.isnan(got).all()
    layer1, layer2 = layers(1, 20, 2, torch.float32)
    layer2[1][1, 3] = float("inf")  # log_sigma inf: output 1's weight is +-inf
    got = OP(torch.ones(1, 3, 1), *layer1, 1, *layer2, 2, 2)
    assert torch.isfinite(got[..., 0]).all() and not torch.isfinite(got[..., 1]).all()


def test_refuses_inputs_that_need_a_gradient():
    layer1, layer2 = layers(1, 8, 1, torch.float32)
    layer2[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="bayes_mlp_inference: weight2_mu requires grad"):
        OP(torch.randn(1, 2, 1), *layer1, 1, *layer2, 2, 1)
    with torch.no_grad():
        OP(torch.randn(1, 2, 1), *layer1, 1, *layer2, 2, 1)


def bad(**changes):
    (w1, l1, b1, c1), (w2, l2, b2, c2) = layers(2, 6, 3, torch.float32)
    args = dict(x=torch.randn(1, 4, 2), weight1_mu=w1, weight1_log_sigma=l1, bias1_mu=b1, bias1_log_sigma=c1,
                seed1=1, weight2_mu=w2, weight2_log_sigma=l2, bias2_mu=b2, bias2_log_sigma=c2, seed2=2, n_samples=1)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,exc,match", [
    (dict(x=torch.randn(1, 4, 3)), ValueError, r"x must have last dim 2 \(in_features of layer 1\), got 3"),
    (dict(x=torch.randn(4, 2)), ValueError, r"x must be 3-D"),
    (dict(n_samples=0), ValueError, r"n_samples must be >= 1, got 0"),
    (dict(weight2_mu=torch.zeros(3, 7), weight2_log_sigma=torch.zeros(3, 7)), ValueError,
     r"weight2_mu must be 2-D \[out_features, 6\]"),
    (dict(weight2_log_sigma=torch.zeros(3, 5)), ValueError, r"weight2_log_sigma must have the shape of weight2_mu"),
    (dict(bias1_mu=torch.zeros(5), bias1_log_sigma=torch.zeros(5)), ValueError, r"bias1_mu must have shape \[6\]"),
    (dict(bias2_log_sigma=None), ValueError, r"bias2_mu and bias2_log_sigma must be given together"),
    (dict(weight2_mu=torch.zeros(3, 6, dtype=torch.float64)), TypeError, r"weight2_mu must have dtype Float"),
    (dict(x=torch.ones(1, 4, 2, dtype=torch.int64)), TypeError, r"x must be a floating-point"),
    (dict(weight2_mu=torch.zeros(9, 6), weight2_log_sigma=torch.zeros(9, 6), bias2_mu=None, bias2_log_sigma=None),
     ValueError, r"the fused kernel takes in_features <= 8 and out_features <= 8, got 2 and 9"),
])
def test_bad_input_names_the_argument(changes, exc, match):
    with pytest.raises(exc, match="bayes_mlp_inference: " + match):
        OP(**bad(**changes))


def test_the_wrappers_refuse_a_device_without_the_kernel():
    layer1, layer2 = layers(1, 8, 1, torch.float32)
    meta = [tuple(t.to("meta") for t in layer) for layer in (layer1, layer2)]
    with pytest.raises(ValueError, match="bayes_mlp_inference: the CPU and CUDA have this kernel.*got x on meta"):
        _ops.bayes_mlp_inference(torch.randn(1, 2, 1, device="meta"), meta[0], 1, meta[1], 2)
    with pytest.raises(ValueError, match="bayes_mlp: only the CPU has this kernel.*got x on meta"):
        _ops.bayes_mlp(torch.randn(1, 2, 1, device="meta"), meta[0], 1, meta[1], 2)
    assert _ops.has_kernel("bayes_mlp_inference", "cpu") and not _ops.has_kernel("bayes_mlp", "cuda")
    assert _ops.has_kernel("bayes_mlp_inference", "cuda") == bnn_fast.backend().cuda_compiled


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,xs,N,in_f,hidden,out_f,bias1,bias2", CASES)
def test_cuda_equals_reference_and_the_cpu(dtype, S, xs, N, in_f, hidden, out_f, bias1, bias2):
    layer1, layer2 = layers(in_f, hidden, out_f, dtype, bias1, bias2)
    x = torch.randn(xs, N, in_f, dtype=dtype)
    on_gpu = [tuple(None if t is None else t.cuda() for t in layer) for layer in (layer1, layer2)]
    got = OP(x.cuda(), *on_gpu[0], 11, *on_gpu[1], 12, S)
    assert got.device.type == "cuda" and got.shape == (S, N, out_f) and got.dtype == dtype
    # The CUDA noise, fed to the pure-PyTorch twin on the GPU: equal up to the order of the sums.
    def with_noise(params, seed):
        mu, _, bmu, _ = params
        eps_w = _ops.normal((S, *mu.shape), seed, 0, dtype=dtype, device="cuda")
        eps_b = _ops.normal((S, mu.shape[0]), seed, 1, dtype=dtype, device="cuda") if bmu is not None else None
        return (*params, eps_w, eps_b)
    want = reference.bayes_mlp(x.cuda(), with_noise(on_gpu[0], 11), with_noise(on_gpu[1], 12))
    torch.testing.assert_close(got, want, **tolerance(dtype, hidden))
    # The CPU kernel: the same samples up to a few ulp of the noise (CPU and GPU log/sin/cos).
    torch.testing.assert_close(got.cpu(), OP(x, *layer1, 11, *layer2, 12, S), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled")
def test_cuda_opcheck_and_predictive_fuses_on_the_gpu(monkeypatch, calls):
    layer1, layer2 = layers(2, 20, 3, torch.float32)
    on_gpu = [tuple(t.cuda() for t in layer) for layer in (layer1, layer2)]
    torch.library.opcheck(OP.default, (torch.randn(1, 5, 2, device="cuda"), *on_gpu[0], 1, *on_gpu[1], 2, 3))
    x = torch.linspace(-2, 2, 300, device="cuda").unsqueeze(1)
    model = article_net().cuda()
    assert fusion.plan(model, x) is not None
    fused, apart = predict_both_ways(model, x, 500, monkeypatch, chunk_size=64)
    assert sum(calls) == 500
    torch.testing.assert_close(fused.samples, apart.samples, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# predictive runs the fused operator for BayesLinear -> ReLU -> BayesLinear


def article_net(in_f=1, hidden=1000, out_f=1, lib=bnn_fast):
    torch.manual_seed(0)
    return nn.Sequential(lib.BayesLinear(0, 0.1, in_f, hidden), nn.ReLU(), lib.BayesLinear(0, 0.1, hidden, out_f))


def spy_on(monkeypatch, name):
    """The n_samples of every call of the wrapper _ops.<name> (the one bnn_fast.fusion uses)."""
    count = []
    original = getattr(_ops, name)

    def spy(*args):
        count.append(args[-1])
        return original(*args)

    monkeypatch.setattr(_ops, name, spy)
    return count


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused inference operator's calls."""
    return spy_on(monkeypatch, "bayes_mlp_inference")


def predict_both_ways(model, x, n, monkeypatch, **kwargs):
    fused = predictive(model, x, n, seed=3, return_samples=True, **kwargs)
    monkeypatch.setattr(fusion, "enabled", False)
    apart = predictive(model, x, n, seed=3, return_samples=True, **kwargs)
    return fused, apart


def test_predictive_fuses_the_article_network_and_draws_the_same_samples(monkeypatch, calls):
    x = torch.linspace(-2, 2, 300).unsqueeze(1)
    fused, apart = predict_both_ways(article_net(), x, 500, monkeypatch, chunk_size=64)
    assert sum(calls) == 500 and max(calls) == 64
    # The same weight samples; only the order of the 1000-term sums differs.
    torch.testing.assert_close(fused.samples, apart.samples, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.mean, apart.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.std, apart.std, rtol=1e-4, atol=1e-4)


def test_a_longer_sequential_fuses_its_run_and_runs_the_rest_as_usual(monkeypatch, calls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), bnn_fast.BayesLinear(0, 0.1, 2, 40), nn.ReLU(),
                          bnn_fast.BayesLinear(0, 0.1, 40, 4), nn.Tanh(), bnn_fast.BayesLinear(0, 0.1, 4, 2))
    steps = fusion.plan(model)
    assert [type(s).__name__ for s in steps] == ["Linear", "tuple", "Tanh", "BayesLinear"]
    fused, apart = predict_both_ways(model, torch.randn(7, 3), 200, monkeypatch, chunk_size=50)
    assert sum(calls) == 200
    torch.testing.assert_close(fused.samples, apart.samples, rtol=1e-5, atol=1e-5)


def test_fused_chunks_are_not_charged_for_hidden_activations(monkeypatch):
    x = torch.linspace(-2, 2, 300).unsqueeze(1)
    fused = predictive(article_net(), x, 3000, seed=1).chunk_size
    monkeypatch.setattr(fusion, "enabled", False)
    apart = predictive(article_net(), x, 3000, seed=1).chunk_size
    assert fused > 10 * apart


@pytest.mark.parametrize("why", ["hook", "wide input", "wide output", "subclass", "not sequential"])
def test_no_plan_where_fusion_could_change_what_runs(why):
    model = article_net()
    if why == "hook":
        model[1].register_forward_hook(lambda m, i, o: None)
    elif why == "wide input":
        model = article_net(in_f=9)
    elif why == "wide output":
        model = article_net(out_f=9)
    elif why == "subclass":
        class Mine(bnn_fast.BayesLinear):
            pass
        model[0] = Mine(0, 0.1, 1, 1000)
    else:
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = article_net()

            def forward(self, x):
                return self.body(x)
        model = Net()
    assert fusion.plan(model) is None


@pytest.mark.parametrize("why", ["frozen", "local estimator", "float64 input"])
def test_run_time_conditions_fall_back_to_the_modules(why, calls):
    model = article_net(hidden=30)
    x = torch.randn(5, 1)
    steps = fusion.plan(model)
    assert steps is not None
    if why == "frozen":
        model[2].freeze()
    elif why == "local estimator":
        model[0].estimator = "local"
    elif why == "float64 input":
        x = x.double()
    if why == "float64 input":
        with pytest.raises(RuntimeError):  # what the unfused layers raise for mixed dtypes
            with torch.no_grad():
                fusion.run(steps, x)
    else:
        with torch.no_grad():
            assert fusion.run(steps, x).shape == (5, 1)
    assert calls == []


@pytest.mark.parametrize("n_samples", [None, 5])
def test_run_equals_the_model_in_a_loop_of_ones_own(n_samples, calls):
    model = article_net(in_f=2, hidden=50, out_f=3)
    x = torch.randn(7, 2)
    steps = fusion.plan(model)

    def once(fn):
        torch.manual_seed(11)
        with torch.no_grad():
            if n_samples is None:
                return fn(x)
            with bnn_fast.sampling.sample_many(n_samples):
                return fn(x)

    fused, apart = once(lambda v: fusion.run(steps, v)), once(model)
    assert len(calls) == 1 and fused.shape == apart.shape == ((n_samples or 1) * 7, 3)
    torch.testing.assert_close(fused, apart, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why", ["frozen", "local estimator"])
def test_a_plan_for_an_input_leaves_out_what_will_not_fuse_and_chunks_stay_in_budget(monkeypatch, why):
    model = article_net()
    if why == "frozen":
        model[0].freeze()
    else:
        model[2].estimator = "local"
    x = torch.linspace(-2, 2, 300).unsqueeze(1)
    assert fusion.plan(model) is not None and fusion.plan(model, x) is None
    # predictive sizes its chunks for the layers run one by one, as they will be.
    chunk = predictive(model, x, 200, seed=1).chunk_size
    monkeypatch.setattr(fusion, "enabled", False)
    assert chunk == predictive(model, x, 200, seed=1).chunk_size < 50
