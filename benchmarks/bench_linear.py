"""One Bayesian linear layer: forward+backward, and forward alone under torch.no_grad.

Implementations: bnn_fast.BayesLinear, torchbnn.BayesLinear (same parameters, loaded through
state_dict), bayesian-torch's LinearReparameterization and LinearFlipout, blitz's BayesianLinear,
and torch.nn.Linear as the deterministic floor. Shapes (in x out, batch): 1024x1024 at batch 1, 32
and 256; 4096x4096 at batch 1 and 64.

Also: on the CPU, where the forward without a backward switches from sampling and multiplying in
cache-sized blocks (the weight never written) to sampling the weight whole and calling the GEMM
(BNN_FAST_CPU_FUSED_MAX_ROWS forces either path at every batch size); the allocator peak of one training step of the 4096x4096 layer at batch 64 (bnn_fast,
torchbnn, nn.Linear), sanity checks of bnn_fast's outputs against torchbnn's, a log-log plot of
time against batch size (results/linear_<device>.png), and the issue's targets: >= 5x faster than
torchbnn at batch 1 and 32 and >= 1.5x at batch 256 (forward+backward, 1024x1024), and forward
alone at batch 1 within 3x of nn.Linear.

On a GPU also the issue's GPU targets (gpu_targets): the 4096x4096 forward at batch 1..16 at >= 70%
of the floor of reading mu and log_sigma once (at the measured copy bandwidth), forward+backward
>= 3x faster than torchbnn, and at batch 4096 within 1.2x of nn.Linear plus one sampling pass;
and the fused / sample-then-GEMM crossover by batch.
"""
import functools
import gc
import os

import matplotlib

matplotlib.use("Agg")  # headless: only a PNG is written
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchbnn  # noqa: E402
from bayesian_torch.layers import LinearFlipout, LinearReparameterization  # noqa: E402
from blitz.modules import BayesianLinear  # noqa: E402

import bnn_fast  # noqa: E402
from benchmarks import harness  # noqa: E402

PRIOR_MU, PRIOR_SIGMA = 0.0, 0.1
CONFIGS = [(1024, 1), (1024, 32), (1024, 256), (4096, 1), (4096, 64)]  # (features in = out, batch)
MEMORY_CONFIG = (4096, 64)
MEMORY_IMPLS = ("bnn_fast", "torchbnn", "nn.Linear")
TRAIN = "Linear forward+backward"
FORWARD = "Linear forward (no_grad)"
SPEEDUP_TARGETS = {1: 5.0, 32: 5.0, 256: 1.5}  # 1024x1024 forward+backward, batch -> x torchbnn
FORWARD_VS_LINEAR_TARGET = 3.0  # forward at batch 1: bnn_fast time / nn.Linear time


def column(features: int, batch: int) -> str:
    return f"{features}x{features} b={batch}"


def make_layers(features: int, device: torch.device) -> dict:
    """name -> (module, forward callable), on `device`."""
    torch.manual_seed(0)
    tb = torchbnn.BayesLinear(PRIOR_MU, PRIOR_SIGMA, features, features)
    bf = bnn_fast.BayesLinear(PRIOR_MU, PRIOR_SIGMA, features, features)
    bf.load_state_dict(tb.state_dict())
    reparam = LinearReparameterization(features, features)
    flipout = LinearFlipout(features, features)
    layers = {
        "bnn_fast": (bf, bf),
        "torchbnn": (tb, tb),
        # bayesian-torch's forward returns (out, kl) by default; no other layer computes the KL in
        # its forward, so ask for the output alone.
        "bayesian-torch Reparameterization": (reparam, functools.partial(reparam, return_kl=False)),
        "bayesian-torch Flipout": (flipout, functools.partial(flipout, return_kl=False)),
        # blitz always computes its log-prior and log-posterior in forward; there is no switch.
        "blitz BayesianLinear": (BayesianLinear(features, features), None),
        "nn.Linear": (nn.Linear(features, features), None),
    }
    return {name: (module.to(device), forward or module) for name, (module, forward) in layers.items()}


def train_step(module, forward, x, grad_out):
    """Forward, then the gradients of x and every parameter. torch.autograd.grad returns fresh
    gradients instead of accumulating into .grad, so each iteration does the same work.
    allow_unused: blitz registers each mean and rho twice (layer and sampler) and uses one copy."""
    inputs = [x] + list(module.parameters())

    def step():
        return torch.autograd.grad(forward(x), inputs, grad_out, allow_unused=True)
    return step


def forward_step(forward, x):
    def step():
        with torch.no_grad():
            return forward(x)
    return step


NOT_KEPT = "bnn_fast, BNN_FAST_CPU_SAVE_WEIGHT=0"


def with_env(name, value, step):
    """`step` run with the environment variable `name` set to `value` (read on every call)."""
    def run():
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return step()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
    return run


def measure_memory(runner, layers, x, grad_out):
    """The allocator peak of one training step, and its excess over nn.Linear in weight-sized
    buffers (features * features float32)."""
    features = x.shape[-1]
    weight_bytes = features * features * 4
    peaks = {}
    for name in MEMORY_IMPLS:
        module, forward = layers[name]
        step = train_step(module, forward, x, grad_out)
        step()  # warm-up outside the measurement
        gc.collect()
        peaks[name] = harness.peak_memory(step, runner.device)
    if runner.device.type == "cpu":
        # The CPU's memory mode: the forward keeps no sampled weight, the backward samples it again.
        module, forward = layers["bnn_fast"]
        step = with_env("BNN_FAST_CPU_SAVE_WEIGHT", "0", train_step(module, forward, x, grad_out))
        step()
        gc.collect()
        peaks[NOT_KEPT] = harness.peak_memory(step, runner.device)
        kept = train_step(module, forward, x, grad_out)
        label = f"CPU training step, sampled weight kept or not, {column(*MEMORY_CONFIG)}"
        runner.measure([harness.Case(label, "bnn_fast", column(*MEMORY_CONFIG), kept),
                        harness.Case(label, NOT_KEPT, column(*MEMORY_CONFIG), step)])
    rows = [
        [name, f"{peak / harness.MIB:.1f}", f"{(peak - peaks['nn.Linear']) / harness.MIB:.1f}",
         f"{(peak - peaks['nn.Linear']) / weight_bytes:.2f}"]
        for name, peak in peaks.items()
    ]
    runner.add_table(
        f"Peak memory of one training step, {column(*MEMORY_CONFIG)} ({runner.device.type})",
        ["implementation", "peak MiB", "extra vs nn.Linear MiB", f"extra in {features}x{features} float32 buffers"],
        rows,
    )


def sanity(runner, layers, device):
    """bnn_fast against torchbnn with the same parameters, in eval mode under no_grad:
    the same seed (does bnn_fast reproduce torchbnn's draws?), frozen noise drawn under the same
    seed, and Monte Carlo moments against the closed form mean x mu^T + b_mu and variance
    x^2 sigma^2^T + sigma_b^2 (RMS z-score of the sample mean and mean variance ratio, both ~1)."""
    tb, bf = layers["torchbnn"][0].eval(), layers["bnn_fast"][0].eval()
    x = torch.randn(8, tb.in_features, device=device)
    draws = 256
    rows = []
    with torch.no_grad():
        torch.manual_seed(1)
        y_tb = tb(x)
        torch.manual_seed(1)
        y_bf = bf(x)
        rows.append(["same seed: max |bnn_fast - torchbnn|", f"{(y_bf - y_tb).abs().max().item():.3g}"])

        for layer in (tb, bf):
            torch.manual_seed(2)
            layer.freeze()
        rows.append(["frozen noise, same seed: max |bnn_fast - torchbnn|", f"{(bf(x) - tb(x)).abs().max().item():.3g}"])
        for layer in (tb, bf):
            layer.unfreeze()

        mean = x @ tb.weight_mu.T + tb.bias_mu
        var = x**2 @ torch.exp(2 * tb.weight_log_sigma).T + torch.exp(2 * tb.bias_log_sigma)
        for name, layer in (("torchbnn", tb), ("bnn_fast", bf)):
            samples = torch.stack([layer(x) for _ in range(draws)])
            z = (samples.mean(0) - mean) / (var / draws).sqrt()
            rows.append([f"{name}: RMS z-score of the mean over {draws} draws (~1)", f"{z.pow(2).mean().sqrt().item():.3f}"])
            rows.append([f"{name}: sample variance / closed-form variance (~1)", f"{(samples.var(0) / var).mean().item():.3f}"])
    runner.add_table(f"Sanity: bnn_fast vs torchbnn, {tb.in_features}x{tb.out_features}, batch 8, eval mode", ["check", "value"], rows)


CROSSOVER_BATCHES = (1, 2, 4, 8, 16, 32)
CROSSOVER_SIZES = (1024, 4096)

# The GPU targets (4096x4096, float32).
GPU_FEATURES = 4096
GPU_SMALL_BATCHES = (1, 2, 4, 8, 16)  # forward at >= 70% of the floor of reading mu and log_sigma once
GPU_BANDWIDTH_FRACTION = 0.70
GPU_TRAIN_SPEEDUP = 3.0  # forward+backward vs torchbnn, every configuration
GPU_LARGE_BATCH = 4096  # within 1.2x of nn.Linear plus one sampling pass
GPU_LARGE_VS_LINEAR = 1.2
GPU_CROSSOVER_BATCHES = (1, 4, 8, 12, 16, 24, 32)


def copy_bandwidth(runner) -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read plus bytes written:
    the memory-bandwidth ceiling the floors below are measured against."""
    src = torch.randn(2**28, device=runner.device)
    dst = torch.empty_like(src)
    label = "GPU device-to-device copy"
    runner.measure([harness.Case(label, "Tensor.copy_", "1 GiB", lambda: dst.copy_(src))])
    return 2 * src.nbytes / runner.median(label, "Tensor.copy_", "1 GiB")


def gpu_targets(runner):
    """The issue's GPU targets on a 4096x4096 float32 layer: the forward at batch 1..16 against the
    floor of reading mu and log_sigma once at the measured copy bandwidth; the forward and the
    forward+backward at batch 4096 against nn.Linear plus one ideal sampling pass (read mu and
    log_sigma, write W, at the copy bandwidth); and the fused-kernel / sample-then-GEMM crossover
    (BNN_FAST_CUDA_FUSED_MAX_ROWS forces either path)."""
    device, f = runner.device, GPU_FEATURES
    bandwidth = copy_bandwidth(runner)
    torch.manual_seed(0)
    layer = bnn_fast.BayesLinear(PRIOR_MU, PRIOR_SIGMA, f, f).to(device)
    linear = nn.Linear(f, f).to(device)
    weight_bytes = layer.weight_mu.nbytes
    read_floor = 2 * weight_bytes / bandwidth
    label = f"GPU forward (no_grad), {f}x{f}"
    rows = []
    for batch in GPU_SMALL_BATCHES:
        x = torch.randn(batch, f, device=device)
        runner.measure([harness.Case(label, "bnn_fast", column(f, batch), forward_step(layer, x)),
                        harness.Case(label, "nn.Linear", column(f, batch), forward_step(linear, x))])
        t = runner.median(label, "bnn_fast", column(f, batch))
        fraction = read_floor / t
        rows.append([batch, f"{t * 1e6:.1f}", f"{read_floor * 1e6:.1f}", f"{fraction:.2f}",
                     f"{2 * weight_bytes / t / 1e12:.2f}"])
        runner.check(f"GPU forward at the memory floor, {column(f, batch)} (floor time / time)",
                     fraction, ">=", GPU_BANDWIDTH_FRACTION)
    runner.add_table(
        f"GPU forward (no_grad) against the floor of reading mu and log_sigma once "
        f"({2 * weight_bytes / 2**20:.0f} MiB at the copy's {bandwidth / 1e12:.2f} TB/s)",
        ["batch", "bnn_fast us", "floor us", "floor / time", "effective TB/s"], rows)

    x = torch.randn(GPU_LARGE_BATCH, f, device=device, requires_grad=True)
    grad_out = torch.randn(GPU_LARGE_BATCH, f, device=device)
    big = column(f, GPU_LARGE_BATCH)
    sampling_pass = 3 * weight_bytes / bandwidth
    large_rows = []
    for mode, make in (("forward (no_grad)", lambda m: forward_step(m, x)),
                       ("forward+backward", lambda m: train_step(m, m, x, grad_out))):
        big_label = f"GPU {mode}, {f}x{f}, batch {GPU_LARGE_BATCH}"
        runner.measure([harness.Case(big_label, "bnn_fast", big, make(layer)),
                        harness.Case(big_label, "nn.Linear", big, make(linear))])
        t_bf, t_lin = runner.median(big_label, "bnn_fast", big), runner.median(big_label, "nn.Linear", big)
        ratio = t_bf / (t_lin + sampling_pass)
        large_rows.append([mode, f"{t_bf * 1e3:.3f}", f"{t_lin * 1e3:.3f}", f"{sampling_pass * 1e3:.3f}", f"{ratio:.2f}x"])
        runner.check(f"GPU {mode} {big}: time / (nn.Linear + one sampling pass)", ratio, "<=", GPU_LARGE_VS_LINEAR)
    runner.add_table(
        "GPU at large batch: bnn_fast against nn.Linear plus one ideal sampling pass "
        "(read mu and log_sigma, write W, at the copy bandwidth)",
        ["mode", "bnn_fast ms", "nn.Linear ms", "sampling pass ms", "ratio"], large_rows)
    del x, grad_out

    cross = "GPU forward (no_grad): fused kernel vs sample W then GEMM"
    paths = {"fused (W never written)": "16", "sample W, then GEMM": "0"}
    for features in CROSSOVER_SIZES:
        torch.manual_seed(0)
        crossing = layer if features == f else bnn_fast.BayesLinear(PRIOR_MU, PRIOR_SIGMA, features, features).to(device)
        for batch in GPU_CROSSOVER_BATCHES:
            x = torch.randn(batch, features, device=device)
            cases = [harness.Case(cross, name, column(features, batch),
                                  with_env("BNN_FAST_CUDA_FUSED_MAX_ROWS", rows, forward_step(crossing, x)))
                     for name, rows in paths.items() if batch <= 16 or rows == "0"]
            runner.measure(cases)
    runner.add_table(
        "GPU forward (no_grad): sample-W-then-GEMM time / fused time (> 1: fused is faster; the "
        "default fuses up to 16 rows)",
        ["layer"] + [f"b={b}" for b in GPU_CROSSOVER_BATCHES if b <= 16],
        [[f"{c}x{c}"] + [f"{runner.ratio(cross, column(c, b), 'sample W, then GEMM', 'fused (W never written)'):.2f}x"
                         for b in GPU_CROSSOVER_BATCHES if b <= 16] for c in CROSSOVER_SIZES],
    )


def crossover(runner):
    """CPU forward without grad: the blocked fused path against sample-W-then-GEMM, by batch."""
    label = "CPU forward (no_grad): blocked sample-and-multiply vs sample W then GEMM"
    paths = {"blocked (W never written)": "1000000", "sample W, then GEMM": "0"}
    for features in CROSSOVER_SIZES:
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(features, features, generator=g) * 0.03
        ls = torch.full((features, features), -3.0)
        bmu, bls = torch.zeros(features), torch.full((features,), -3.0)
        for batch in CROSSOVER_BATCHES:
            x = torch.randn(1, batch, features, generator=g)

            def step(x=x, mu=mu, ls=ls, bmu=bmu, bls=bls):
                return torch.ops.bnn_fast.bayes_linear_inference(x, mu, ls, bmu, bls, 5, 1)
            for name, rows in paths.items():
                runner.measure([harness.Case(label, name, column(features, batch),
                                             with_env("BNN_FAST_CPU_FUSED_MAX_ROWS", rows, step))])
    runner.add_table(
        "CPU forward (no_grad): sample-W-then-GEMM time / blocked time (> 1: blocked is faster; "
        "the default switches at 16 rows without a backward, 12 in training)",
        ["layer"] + [f"b={b}" for b in CROSSOVER_BATCHES],
        [[f"{f}x{f}"] + [f"{runner.ratio(label, column(f, b), 'sample W, then GEMM', 'blocked (W never written)'):.2f}x"
                         for b in CROSSOVER_BATCHES] for f in CROSSOVER_SIZES],
    )


def plot(runner):
    """Time against batch size, log-log, one panel per mode and layer size."""
    sizes = sorted({f for f, _ in CONFIGS})
    modes = (TRAIN, FORWARD)
    fig, axes = plt.subplots(len(modes), len(sizes), figsize=(6 * len(sizes), 4.5 * len(modes)), squeeze=False)
    train_label = f"{TRAIN} ({runner.device.type})"
    names = list(dict.fromkeys(m.sub_label for m in runner.measurements if m.label == train_label))
    for row, mode in enumerate(modes):
        for col, features in enumerate(sizes):
            ax = axes[row][col]
            batches = [b for f, b in CONFIGS if f == features]
            for name in names:
                times = [runner.median(f"{mode} ({runner.device.type})", name, column(features, b)) * 1e3 for b in batches]
                ax.plot(batches, times, marker="o", label=name)
            ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median time (ms)",
                   title=f"{mode}, {features}x{features}, {runner.device.type}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    harness.save_figure(fig, f"linear_{runner.device.type}")


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    if not harness.device_available(args.device):
        return
    runner = harness.Runner("linear", args)
    device = runner.device
    train_label, forward_label = f"{TRAIN} ({device.type})", f"{FORWARD} ({device.type})"

    for features in sorted({f for f, _ in CONFIGS}):
        layers = make_layers(features, device)
        if features == CONFIGS[0][0]:
            sanity(runner, layers, device)
        for f, batch in CONFIGS:
            if f != features:
                continue
            x = torch.randn(batch, features, device=device, requires_grad=True)
            grad_out = torch.ones(batch, features, device=device)
            cases = []
            for name, (module, forward) in layers.items():
                cases.append(harness.Case(train_label, name, column(f, batch), train_step(module, forward, x, grad_out)))
                cases.append(harness.Case(forward_label, name, column(f, batch), forward_step(forward, x)))
            runner.measure(cases)
            if (f, batch) == MEMORY_CONFIG:
                measure_memory(runner, layers, x, grad_out)
        del layers  # the 4096x4096 layers hold over a GiB together
        gc.collect()

    runner.add_table(
        "bnn_fast time / nn.Linear time (same run)",
        ["mode"] + [column(*c) for c in CONFIGS],
        [[label] + [f"{runner.ratio(label, column(*c), 'bnn_fast', 'nn.Linear'):.2f}x" for c in CONFIGS]
         for label in (train_label, forward_label)],
    )
    if device.type == "cpu":  # the CPU targets
        for batch, target in SPEEDUP_TARGETS.items():
            speedup = runner.ratio(train_label, column(1024, batch), "torchbnn", "bnn_fast")
            runner.check(f"forward+backward speedup vs torchbnn, {column(1024, batch)}", speedup, ">=", target)
        for features in sorted({f for f, _ in CONFIGS}):
            slowdown = runner.ratio(forward_label, column(features, 1), "bnn_fast", "nn.Linear")
            runner.check(f"forward (no_grad) time / nn.Linear time, {column(features, 1)}", slowdown, "<=",
                         FORWARD_VS_LINEAR_TARGET)
    else:
        for f, batch in CONFIGS:
            speedup = runner.ratio(train_label, column(f, batch), "torchbnn", "bnn_fast")
            runner.check(f"GPU forward+backward speedup vs torchbnn, {column(f, batch)}", speedup, ">=", GPU_TRAIN_SPEEDUP)

    plot(runner)
    if device.type == "cpu" and bnn_fast.backend().cpp:
        crossover(runner)
    if device.type == "cuda" and bnn_fast.backend().cuda_compiled:
        gpu_targets(runner)
    runner.finish(baseline="torchbnn")


if __name__ == "__main__":
    main()
