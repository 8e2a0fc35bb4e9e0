"""The seed article's training step, bnn_fast against torchbnn side by side in one process.

Usage: python -m benchmarks.train_step_ab [default|retain] [profile]

Four rounds of 300 Adam steps each (MSE + 0.01 * BKLLoss on the 1-1000-1 network, 500 points),
the two libraries alternating, milliseconds per step and the median per library. "retain" first
calls bnn_fast.utils.retain_cpu_memory(). A quicker, interleaved complement to bench_predictive's
one-run-each training timing, which swings with the machine.

Also prints each library's minor page faults per step (ru_minflt over its timed steps), and with
"profile" the five operators with the most self CPU time over 200 more steps of each library
(torch.profiler).
"""
import resource, sys, time, torch, torchbnn, bnn_fast, torch.nn as nn, statistics
mode = sys.argv[1] if len(sys.argv) > 1 else "default"
profile = "profile" in sys.argv[2:]
if mode == "retain": bnn_fast.utils.retain_cpu_memory()
torch.manual_seed(0)
x = torch.linspace(-2, 2, 500).unsqueeze(1); y = x.pow(5) - 10 * x + 2 * torch.rand(x.size())
def make(lib):
    torch.manual_seed(0)
    m = nn.Sequential(lib.BayesLinear(0, 0.1, 1, 1000), nn.ReLU(), lib.BayesLinear(0, 0.1, 1000, 1))
    return m, lib.BKLLoss(reduction='mean', last_layer_only=False), torch.optim.Adam(m.parameters(), lr=0.01)
runs = {"bnn_fast": make(bnn_fast), "torchbnn": make(torchbnn)}
mse = nn.MSELoss()
def step(m, kl, opt):
    cost = mse(m(x), y) + 0.01 * kl(m); opt.zero_grad(); cost.backward(); opt.step()
res = {k: [] for k in runs}
faults = {k: 0 for k in runs}
for rep in range(4):
    for name, (m, kl, opt) in runs.items():
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        for _ in range(300):
            step(m, kl, opt)
        res[name].append((time.perf_counter() - t) / 300 * 1e3)
        faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
print(mode, {k: [round(v, 2) for v in vs] for k, vs in res.items()}, {k: round(statistics.median(v), 2) for k, v in res.items()})
print("minor page faults per step:", {k: round(v / 1200) for k, v in faults.items()})
if profile:
    for name, (m, kl, opt) in runs.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(200):
                step(m, kl, opt)
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
        print(name, "per step:", ", ".join(f"{e.key} {e.self_cpu_time_total / 200 / 1e3:.2f} ms" for e in top))
