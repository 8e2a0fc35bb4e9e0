"""The seed article's regression demo: posterior prediction with 10,000 samples, and training.

The network is the article's 1-1000-1 MLP (BayesLinear(0, 0.1, 1, 1000) - ReLU -
BayesLinear(0, 0.1, 1000, 1)), built with torchbnn and copied into bnn_fast through state_dict.

  a. Prediction on 300 points of linspace(-2, 2) from 10,000 weight samples:
     bnn_fast.predictive (default chunking, then chunk_size 2, 10 and 50, and with
     bnn_fast.fusion off: the layers run one by one, as before the fused operator existed)
     against the article's loop with torchbnn, one forward pass per sample followed by the mean and the
     (population) std over samples; also that loop under torch.no_grad, which the article does
     not use. A sanity table checks that bnn_fast's mean and std agree with the loop's within
     Monte Carlo error. Targets: bnn_fast >= 5x faster than the article's loop on the CPU,
     >= 100x on a GPU.
  b. The article's training: 2000 steps of Adam (lr 0.01) on MSE + 0.01 * BKLLoss over the
     example's 500 points, bnn_fast against torchbnn from the same initial parameters.
     Target: bnn_fast >= 2x faster on the CPU. bnn_fast runs twice: as a drop-in (the article's
     nn.Sequential with the import swapped) and with the one-line opt-in
     ``model = bnn_fast.fuse(model)`` (the whole network one fused operator, forward and
     backward). Also the same loop on the deterministic network (nn.Linear layers, MSE only):
     the floor that the layer-level speed of any drop-in Bayesian layer cannot beat, since
     ReLU, MSE and Adam (on half the parameters) are the same PyTorch operators.
     Two more anchors are the batched ways a user could write the same prediction without
     bnn_fast, under torch.no_grad, each at its best chunk size (samples per batched call) from
     a small sweep (ANCHOR_CHUNKS, timed at ANCHOR_SWEEP_SAMPLES samples): `torch.func.vmap`
     over `torch.func.functional_call` of the deterministic network with sampled parameter sets
     (the pattern of the `posteriors` library), and batched matmuls over sampled [S, out, in]
     weights (`torch.baddbmm`, as lightning-uq-box's batched Bayesian linear layers do).
  c. Scaling: bnn_fast predictive's time and peak memory at 10^3, 10^4 and 10^5 samples, plotted
     to results/predictive_<device>.png; past one chunk, memory should stay flat.

--quick: 1,000 samples instead of 10,000 in (a), 500 training steps in (b), no 10^5 in (c).

The compared cases (prediction at the article's sample count, training) are timed in
interleaved rounds: each case once per round, alternating, median of 3 rounds after an untimed
one. On the CPU every timed case runs under bnn_fast.utils.retain_cpu_memory() (malloc keeps freed memory
for reuse, as jemalloc or tcmalloc would), set once at the start for torchbnn and bnn_fast alike:
without it both pay page faults for their activations on every pass, and the times vary 1.5-4x
with the state of the heap.
"""
import copy
import gc

import matplotlib

matplotlib.use("Agg")  # headless: only a PNG is written
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchbnn  # noqa: E402

import bnn_fast  # noqa: E402
from bnn_fast import fusion  # noqa: E402
from bnn_fast.examples.regression import make_data  # noqa: E402
from bnn_fast.predictive import predictive  # noqa: E402
from benchmarks import harness  # noqa: E402

PRIOR_MU, PRIOR_SIGMA, HIDDEN = 0.0, 0.1, 1000
TEST_POINTS, TRAIN_POINTS = 300, 500
ARTICLE_SAMPLES, QUICK_SAMPLES = 10_000, 1_000
SCALING_SAMPLES, QUICK_SCALING_SAMPLES = (10**3, 10**4, 10**5), (10**3, 10**4)
GPU_SCALING_SAMPLES = (10**3, 10**4, 10**5, 10**6)  # a GPU's chunks are large: up to 10^6 in seconds
CHUNK_SIZES = (2, 10, 50)
MEMORY_CHUNKS = {"cpu": 20, "cuda": 200}  # the chunk size of the memory-vs-samples table
ROUNDS = 3  # interleaved timed runs of each compared case (after one untimed round)
TRAIN_STEPS, QUICK_TRAIN_STEPS = 2000, 500
LR, KL_WEIGHT = 0.01, 0.01
TAIL_STEPS = 100  # the training sanity value is the mean cost over the last TAIL_STEPS steps
PREDICT_TARGETS = {"cpu": 5.0, "cuda": 100.0}  # bnn_fast speedup vs the article's loop
TRAIN_TARGETS = {"cpu": 2.0}  # no training target was set for the GPU
# Every case here takes from a fraction of a second to a minute: 3 s of timed runs give the
# sub-second cases a median of several calls; a case of a second or more gets one timed call
# (after blocked_autorange's untimed first call).
MIN_RUN_TIME = 3.0


def build(lib) -> nn.Sequential:
    return nn.Sequential(
        lib.BayesLinear(PRIOR_MU, PRIOR_SIGMA, 1, HIDDEN),
        nn.ReLU(),
        lib.BayesLinear(PRIOR_MU, PRIOR_SIGMA, HIDDEN, 1),
    )


def make_models(device):
    """torchbnn and bnn_fast models with identical (freshly initialized) parameters. Training
    changes the values, not the work a forward pass does, so prediction is timed untrained."""
    torch.manual_seed(0)
    tb_model = build(torchbnn)
    bf_model = build(bnn_fast)
    bf_model.load_state_dict(tb_model.state_dict())
    return tb_model.to(device), bf_model.to(device)


def article_loop(model, x, n_samples):
    """The article's prediction, `np.array([model(x_test).data.numpy() for k in range(10000)])`
    then the mean and std over samples, in torch ops: the same work on the CPU (.numpy() shares
    the tensor's memory), and on a GPU it stays on the device instead of copying each sample to
    the host, the faster baseline. Grad mode stays on, as in the article."""
    samples = torch.stack([model(x).detach() for _ in range(n_samples)])
    return samples.mean(0), samples.std(0, correction=0)  # numpy's std: population, ddof=0


def article_loop_no_grad(model, x, n_samples):
    with torch.no_grad():
        return article_loop(model, x, n_samples)


def _posterior(model):
    """[(mu, sigma)] of the 1-1000-1 network's weight 1, bias 1, weight 2, bias 2."""
    layers = (model[0], model[2])
    return [(p_mu.detach(), p_ls.detach().exp()) for layer in layers
            for p_mu, p_ls in ((layer.weight_mu, layer.weight_log_sigma), (layer.bias_mu, layer.bias_log_sigma))]


def _sample(posterior, c):
    """c samples of each parameter, [c, *shape]."""
    return [mu + sigma * torch.randn((c,) + tuple(mu.shape), device=mu.device) for mu, sigma in posterior]


def _moments(draw, n_samples, chunk):
    """Mean and population std over n_samples outputs, drawn `chunk` at a time by draw(c) ->
    [c, points, 1], from running sums (a user's streaming reduction)."""
    total = total_sq = 0
    with torch.no_grad():
        for start in range(0, n_samples, chunk):
            y = draw(min(chunk, n_samples - start))
            total = total + y.sum(0)
            total_sq = total_sq + y.square().sum(0)
    mean = total / n_samples
    return mean, (total_sq / n_samples - mean.square()).clamp_min(0).sqrt()


def vmap_anchor(model, x, n_samples, chunk):
    """torch.func.vmap over functional_call of the deterministic network, one sampled parameter
    set per vmapped call (the posteriors library's pattern)."""
    det = nn.Sequential(nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)).to(x.device)
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    posterior = _posterior(model)

    def one(params):
        return torch.func.functional_call(det, params, (x,))

    batched = torch.func.vmap(one)
    return _moments(lambda c: batched(dict(zip(names, _sample(posterior, c)))), n_samples, chunk)


def bmm_anchor(model, x, n_samples, chunk):
    """Batched matmuls over sampled [c, out, in] weights (lightning-uq-box's batched linear)."""
    posterior = _posterior(model)

    def draw(c):
        w1, b1, w2, b2 = _sample(posterior, c)
        h = torch.relu(torch.baddbmm(b1.unsqueeze(1), x.expand(c, -1, -1), w1.transpose(1, 2)))
        return torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))

    return _moments(draw, n_samples, chunk)


ANCHORS = {"vmap(functional_call)": vmap_anchor, "batched matmuls": bmm_anchor}
ANCHOR_CHUNKS = (2, 5, 10, 50, 200, 1000)
ANCHOR_SWEEP_SAMPLES = 2000


def best_chunk(fn, model, x, runner):
    """The chunk size of ANCHOR_CHUNKS at which fn runs ANCHOR_SWEEP_SAMPLES samples fastest
    (one warm call, then the best of three), and the sweep's times."""
    import time
    times = {}
    for c in ANCHOR_CHUNKS:
        fn(model, x, ANCHOR_SWEEP_SAMPLES, c)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn(model, x, ANCHOR_SWEEP_SAMPLES, c)
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        times[c] = best
    return min(times, key=times.get), times


def train(lib, initial, x, y, steps):
    """The article's training loop on a fresh copy of `initial` (copying ~4,000 parameters costs
    nothing next to the loop); returns the mean cost of the last TAIL_STEPS steps, a sanity
    value that both libraries should bring to about the same level."""
    model = copy.deepcopy(initial)
    mse_loss = nn.MSELoss()
    kl_loss = lib.BKLLoss(reduction="mean", last_layer_only=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    tail = []
    for step in range(steps):
        cost = mse_loss(model(x), y) + KL_WEIGHT * kl_loss(model)
        optimizer.zero_grad()
        cost.backward()
        optimizer.step()
        if step >= steps - TAIL_STEPS:
            tail.append(cost.detach())
    return torch.stack(tail).mean().item()


def train_deterministic(x, y, steps):
    """The same loop on nn.Linear layers of the same shapes (MSE only, Adam on their 2,001
    parameters): what the step costs without any Bayesian layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)).to(x.device)
    mse_loss = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(steps):
        cost = mse_loss(model(x), y)
        optimizer.zero_grad()
        cost.backward()
        optimizer.step()
    return cost.item()


def unfused(fn):
    """`fn` run with bnn_fast.fusion off."""
    def run():
        fusion.enabled = False
        try:
            return fn()
        finally:
            fusion.enabled = True
    return run


def recording(results, name, fn):
    """A statement that keeps its last result, so that the sanity checks reuse the timed calls
    instead of repeating calls of several seconds."""
    def stmt():
        results[name] = fn()
    return stmt


def column(n_samples: int) -> str:
    return f"S={n_samples:,}"


def sanity_predictive(runner, result, loop_mean, loop_std, n_samples):
    """bnn_fast's predictive mean and std against the article loop's, in units of their Monte
    Carlo standard errors: the difference of two independent means of S draws has variance
    (s1^2 + s2^2) / S, and the std of S Gaussian draws has a standard error of about s / sqrt(2S)."""
    mean, std = result.mean.double(), result.std.double()
    loop_mean, loop_std = loop_mean.double(), loop_std.double()
    z_mean = (mean - loop_mean) / ((std**2 + loop_std**2) / n_samples).sqrt()
    z_std = (std - loop_std) / ((std**2 + loop_std**2) / (2 * n_samples)).sqrt()
    rows = [
        ["RMS z-score of the mean difference (~1)", f"{z_mean.pow(2).mean().sqrt().item():.3f}"],
        ["max |z| of the mean difference", f"{z_mean.abs().max().item():.2f}"],
        ["RMS z-score of the std difference (~1; Gaussian approximation)", f"{z_std.pow(2).mean().sqrt().item():.3f}"],
        ["mean std ratio bnn_fast / torchbnn (~1)", f"{(std / loop_std).mean().item():.4f}"],
    ]
    runner.add_table(
        f"Sanity: bnn_fast predictive vs the article's torchbnn loop, {column(n_samples)}, {TEST_POINTS} points",
        ["check", "value"],
        rows,
    )


def measure_peak(runner, fn) -> float:
    """Peak MiB of one call of `fn` (already warmed up by its timing)."""
    gc.collect()
    return harness.peak_memory(fn, runner.device) / harness.MIB


def plot(runner, label, scaling, peaks, chunk_sizes, article_samples):
    """Time (log-log) and peak memory (log x) against the number of samples."""
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    times = [runner.median(label, "bnn_fast", column(s)) for s in scaling]
    ax_time.plot(scaling, times, marker="o", label="bnn_fast predictive (default chunks)")
    ax_time.plot([article_samples], [runner.median(label, "torchbnn", column(article_samples))],
                 marker="s", linestyle="none", label="torchbnn, the article's loop")
    ax_time.set(xscale="log", yscale="log", xlabel="samples", ylabel="median time (s)",
                title=f"Predictive time, 1-{HIDDEN}-1 net, {TEST_POINTS} points ({runner.device.type})")
    ax_time.legend(fontsize="small")
    ax_mem.plot(scaling, [peaks[s] for s in scaling], marker="o")
    for s in scaling:
        ax_mem.annotate(f"chunk {MEMORY_CHUNKS[runner.device.type]}", (s, peaks[s]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize="small")
    ax_mem.set(xscale="log", xlabel="samples", ylabel="peak MiB above the start",
               title=f"bnn_fast predictive peak memory ({runner.device.type})")
    ax_mem.set_ylim(0, 1.2 * max(peaks.values()))  # room for the labels above the points
    for ax in (ax_time, ax_mem):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    harness.save_figure(fig, f"predictive_{runner.device.type}")


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    if not harness.device_available(args.device):
        return
    runner = harness.Runner("predictive", args, min_run_time=MIN_RUN_TIME)
    device = runner.device
    article_samples = QUICK_SAMPLES if args.quick else ARTICLE_SAMPLES
    scaling = QUICK_SCALING_SAMPLES if args.quick else (GPU_SCALING_SAMPLES if device.type == "cuda" else SCALING_SAMPLES)
    memory_chunk = MEMORY_CHUNKS[device.type]
    steps = args.train_steps or (QUICK_TRAIN_STEPS if args.quick else TRAIN_STEPS)
    tb_model, bf_model = make_models(device)
    x_test = torch.linspace(-2, 2, TEST_POINTS, device=device).unsqueeze(1)

    def bf_predict(n_samples, chunk_size=None):
        return predictive(bf_model, x_test, n_samples, chunk_size=chunk_size, progress=False)

    # (a) and (c) share one table: every row at the article's sample count (itself a scaling
    # count, 10^4, or 10^3 with --quick), the default bnn_fast row also at every scaling count.
    predict_label = f"Predictive, 1-{HIDDEN}-1 net, {TEST_POINTS} points ({device.type})"
    results = {}
    scaling_cases = {s: harness.Case(predict_label, "bnn_fast", column(s), recording(results, s, lambda s=s: bf_predict(s)))
                     for s in scaling if s != article_samples}
    cases = [harness.Case(predict_label, "bnn_fast", column(article_samples),
                          recording(results, article_samples, lambda: bf_predict(article_samples)))]
    for c in CHUNK_SIZES:
        cases.append(harness.Case(predict_label, f"bnn_fast chunk_size={c}", column(article_samples),
                                  lambda c=c: bf_predict(article_samples, c)))
    cases.append(harness.Case(predict_label, "bnn_fast unfused", column(article_samples),
                              unfused(lambda: bf_predict(article_samples))))
    cases.append(harness.Case(predict_label, "torchbnn", column(article_samples),
                              recording(results, "torchbnn", lambda: article_loop(tb_model, x_test, article_samples))))
    cases.append(harness.Case(predict_label, "torchbnn no_grad", column(article_samples),
                              lambda: article_loop_no_grad(tb_model, x_test, article_samples)))
    sweep_rows = []
    for name, fn in ANCHORS.items():
        chunk, times = best_chunk(fn, tb_model, x_test, runner)
        sweep_rows.append([name] + [harness.format_time(times[c]) for c in ANCHOR_CHUNKS] + [chunk])
        cases.append(harness.Case(predict_label, name, column(article_samples),
                                  lambda fn=fn, chunk=chunk: fn(tb_model, x_test, article_samples, chunk)))
    runner.add_table(f"Batched anchors: time for {ANCHOR_SWEEP_SAMPLES:,} samples by chunk size (best of 3)",
                     ["anchor"] + [f"chunk {c}" for c in ANCHOR_CHUNKS] + ["chosen"], sweep_rows)
    # Peak memory first, before retain_cpu_memory(): on the CPU it is measured under the
    # profiler, which keeps every event, and with malloc's trimming off its memory was not
    # reused (24 GB and an out-of-memory kill at 10^4 samples). Memory at each sample count is
    # taken at one fixed chunk size: flat in the sample count at a fixed chunk is the claim.
    # Also, under the profiler glibc's heap fragmented: its event buffers landed between the
    # freed activation blocks, so new blocks came from fresh memory (the process grew by about
    # one chunk of activations per chunk, 20 GB and a kill at 10^5 samples, though no tensor was
    # alive). A fixed 1 MiB mmap threshold gives every large block its own mapping, returned on
    # free, for the memory measurements only (retain_cpu_memory below replaces it).
    if device.type == "cpu":
        harness.mmap_large_cpu_blocks()
    print("peak memory (one call each, under the profiler on the CPU)", flush=True)
    peaks = {s: measure_peak(runner, lambda s=s: bf_predict(s, memory_chunk)) for s in scaling}
    default_peak = measure_peak(runner, lambda: bf_predict(article_samples))
    chunk_peaks = {c: measure_peak(runner, lambda c=c: bf_predict(article_samples, c)) for c in CHUNK_SIZES}
    if device.type == "cpu":
        applied = bnn_fast.utils.retain_cpu_memory()
        print(f"bnn_fast.utils.retain_cpu_memory(): {'applied' if applied else 'not available'}", flush=True)
        runner.add_table("Settings", ["setting", "value"],
                         [["bnn_fast.utils.retain_cpu_memory() (for every timed case, after the memory measurements)",
                           "applied" if applied else "not available"]])

    print(f"prediction: {TEST_POINTS} points, samples {scaling}, on {args.device}, {args.threads} threads", flush=True)
    # The cases compared at the article's sample count alternate, ROUNDS times each; the other
    # sample counts (scaling only) are timed on their own.
    runner.measure([c for s, c in scaling_cases.items() if s < article_samples])
    runner.measure_interleaved(cases, ROUNDS)
    runner.measure([c for s, c in scaling_cases.items() if s > article_samples])
    sanity_predictive(runner, results[article_samples], *results["torchbnn"], article_samples)
    chunk_sizes = {s: results[s].chunk_size for s in scaling}
    runner.add_table(
        f"bnn_fast predictive: time and peak memory vs samples ({device.type})",
        ["samples", "chunk size (default)", "median time (default chunks)",
         f"peak MiB above the start (chunks of {memory_chunk})"],
        [[f"{s:,}", chunk_sizes[s], harness.format_time(runner.median(predict_label, "bnn_fast", column(s))),
          f"{peaks[s]:.1f}"] for s in scaling],
    )
    chunk_rows = [[f"{chunk_sizes[article_samples]} (default)",
                   harness.format_time(runner.median(predict_label, "bnn_fast", column(article_samples))),
                   f"{default_peak:.1f}"]]
    for c in CHUNK_SIZES:
        median = runner.median(predict_label, f"bnn_fast chunk_size={c}", column(article_samples))
        chunk_rows.append([c, harness.format_time(median), f"{chunk_peaks[c]:.1f}"])
    runner.add_table(f"bnn_fast predictive by chunk size, {column(article_samples)} ({device.type})",
                     ["chunk size", "median time", "peak MiB above the start"], chunk_rows)

    # (b) The article's training loop.
    torch.manual_seed(1)
    x_train, y_train = make_data(TRAIN_POINTS, device)
    train_label = f"Article training, {TRAIN_POINTS} points ({device.type})"
    train_column = f"{steps} steps"
    tails = {}
    print(f"training: {steps} steps", flush=True)
    runner.measure_interleaved([
        harness.Case(train_label, name, train_column,
                     recording(tails, name, lambda lib=lib, model=model: train(lib, model, x_train, y_train, steps)))
        for name, lib, model in (("bnn_fast", bnn_fast, bf_model), ("bnn_fast fuse()", bnn_fast, bnn_fast.fuse(bf_model)),
                                 ("torchbnn", torchbnn, tb_model))
    ] + [harness.Case(train_label, "nn.Linear (deterministic)", train_column,
                      lambda: train_deterministic(x_train, y_train, steps))], ROUNDS)
    runner.add_table(
        f"Sanity: training cost (MSE + {KL_WEIGHT} KL), mean of the last {TAIL_STEPS} of {steps} steps",
        ["implementation", "cost"],
        [[name, f"{tail:.3f}"] for name, tail in tails.items()],
    )

    target = PREDICT_TARGETS[device.type]
    speedup = runner.ratio(predict_label, column(article_samples), "torchbnn", "bnn_fast")
    runner.check(f"predictive speedup vs the article's torchbnn loop, {column(article_samples)}", speedup, ">=", target)
    if device.type in TRAIN_TARGETS:
        speedup = runner.ratio(train_label, train_column, "torchbnn", "bnn_fast")
        runner.check(f"training speedup vs torchbnn, {train_column}", speedup, ">=", TRAIN_TARGETS[device.type])
        speedup = runner.ratio(train_label, train_column, "torchbnn", "bnn_fast fuse()")
        runner.check(f"training speedup vs torchbnn with bnn_fast.fuse(model), {train_column}", speedup, ">=",
                     TRAIN_TARGETS[device.type])

    plot(runner, predict_label, scaling, peaks, chunk_sizes, article_samples)
    runner.finish(baseline="torchbnn")


if __name__ == "__main__":
    main()
